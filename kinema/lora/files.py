"""LoRA files: saving in the layout other Wan tools load, and loading the layouts people share.

Saved keys (ComfyUI / musubi-tuner "diffusion_model" layout):
  diffusion_model.<module>.lora_A.weight [rank, in], .lora_B.weight [out, rank], .alpha (scalar)
with the settings (rank, alpha, base model, training config) in the safetensors header.

Read key layouts (A is also called lora_down, B lora_up; a missing alpha means alpha = rank):
- ours / ComfyUI: `diffusion_model.blocks.0.self_attn.q.lora_A.weight` (prefix optional);
- diffusers / PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight`, mapped to the official names;
- kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight`, underscores mapped back
  by matching the model's module names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from kinema.errors import CheckpointError, KinemaError
from kinema.lora.network import check_lora, merge_lora

log = logging.getLogger("kinema")

_SUFFIXES = {".lora_A.weight": "A", ".lora_down.weight": "A", ".lora_B.weight": "B", ".lora_up.weight": "B", ".alpha": "alpha"}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")

LoRAFileWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def _diffusers_rules():
    from kinema.loading.dit import DIFFUSERS

    return [(re.compile(p), t) for p, t in DIFFUSERS.rules]


def _dit_module_names(max_block: int) -> list[str]:
    """The Linear names of a Wan2.1 DiT with `max_block + 1` blocks (all variants), for kohya names
    when no model is given."""
    from kinema.models.dit import DiTConfig, WanDiT

    with torch.device("meta"):
        dit = WanDiT(DiTConfig("flf2v", in_dim=36, dim=8, ffn_dim=8, freq_dim=8, text_dim=8, num_heads=1,
                               num_layers=max_block + 1, image_dim=8))
    return [n for n, m in dit.named_modules() if isinstance(m, nn.Linear)]


def _module_name(bare: str, rules, kohya: dict[str, str] | None) -> str | None:
    """The official module name for a key's module part (prefixes removed); None if unknown."""
    for prefix in _KOHYA_PREFIXES:
        if bare.startswith(prefix):
            return None if kohya is None else kohya.get(bare[len(prefix):])
    for prefix in _PREFIXES:
        if bare.startswith(prefix):
            bare = bare[len(prefix):]
            break
    for pattern, template in rules:
        m = pattern.fullmatch(bare + ".weight")
        if m:
            return m.expand(template)[: -len(".weight")]
    return bare


def _read(path: Path) -> dict[str, torch.Tensor]:
    from kinema.loading.files import TensorSource

    if not path.exists():
        raise CheckpointError(f"LoRA file not found: {path}. Check the path.")
    if not path.is_file():
        raise CheckpointError(f"LoRA path {path} is a folder; pass the .safetensors file itself.")
    if path.suffix not in (".safetensors", ".sft"):
        raise CheckpointError(f"{path} is not a safetensors file (extension '{path.suffix}'); LoRAs are read from .safetensors files.")
    source = TensorSource([path])
    return {k: source.get(k) for k in source.keys()}


def read_lora(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[LoRAFileWeights, dict[str, str]]:
    """({module name: (A, B, alpha)}, {module name: the file's key for it}), checked against `model` if given."""
    path = Path(path).expanduser()
    tensors = _read(path)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        parts.setdefault(key[: -len(suffix)], {})[_SUFFIXES[suffix]] = (key, tensor)
    if not parts:
        raise CheckpointError(
            f"{path} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys; it has e.g. "
            f"{', '.join(repr(k) for k in list(tensors)[:3]) or 'no keys'}). If it is a full model, pass it with --dit."
        )
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise CheckpointError(
            f"{path}: keys {shown} are not LoRA weights Kinema reads (lora_A/lora_B or lora_down/lora_up, and alpha); "
            "nothing was applied."
        )
    kohya = None
    if any(b.startswith(_KOHYA_PREFIXES) for b in parts):
        if model is not None:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        else:
            blocks = [int(m.group(1)) for b in parts if (m := re.search(r"blocks_(\d+)_", b))]
            names = _dit_module_names(max(blocks, default=0))
        kohya = {n.replace(".", "_"): n for n in names}
    rules = _diffusers_rules()
    weights: LoRAFileWeights = {}
    keys: dict[str, str] = {}
    for bare, found in parts.items():
        first = found.get("A", found.get("B", found.get("alpha")))[0]
        if "A" not in found or "B" not in found:
            half = "lora_B / lora_up" if "A" in found else "lora_A / lora_down"
            raise CheckpointError(f"{path}: key '{first}' has no matching {half} weight; the LoRA file is incomplete.")
        name = _module_name(bare, rules, kohya)
        if name is None:
            raise CheckpointError(
                f"{path}: key '{first}' names no module of the {'model' if model is not None else 'Wan2.1 DiT'}; "
                "the LoRA was made for another model. Nothing was applied."
            )
        A, B = found["A"][1], found["B"][1]
        alpha = float(found["alpha"][1].float().reshape(-1)[0]) if "alpha" in found else float(A.shape[0])
        if name in weights:
            raise CheckpointError(f"{path}: keys '{keys[name]}' and '{first}' are both for module '{name}'; the file is inconsistent.")
        weights[name], keys[name] = (A, B, alpha), first
    if model is not None:
        check_lora(model, weights, str(path), keys)
    return weights, keys


def load_lora(path: str | os.PathLike, model: nn.Module | None = None) -> LoRAFileWeights:
    """{module name: (A [rank, in], B [out, rank], alpha)} from a LoRA file in any supported layout.
    With `model`, kohya names are matched against its modules and every layer is checked to fit it."""
    return read_lora(path, model)[0]


def save_lora(path: str | os.PathLike, state, alpha: float | None = None, rank: int | None = None,
              metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write {module name: (A, B) or (A, B, alpha)} (e.g. `lora_state_dict(model)`) as a safetensors file.
    `alpha` is used where an entry has none (default: its rank); `rank` is checked if given. Metadata values
    that are not str are stored as JSON. Never overwrites unless `overwrite=True`; the write is atomic."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise KinemaError(f"{path} already exists; Kinema never overwrites a LoRA file. Choose another name or pass overwrite=True.")
    if not state:
        raise KinemaError("save_lora got no LoRA weights; inject_lora(model, ...) first or pass a non-empty dict.")
    tensors, ranks, alphas = {}, set(), set()
    for name, entry in state.items():
        A, B = entry[0], entry[1]
        a = float(entry[2]) if len(entry) > 2 else float(A.shape[0] if alpha is None else alpha)
        if rank is not None and A.shape[0] != rank:
            raise KinemaError(f"save_lora: '{name}' has rank {A.shape[0]}, not the rank={rank} given.")
        ranks.add(A.shape[0])
        alphas.add(a)
        tensors[f"diffusion_model.{name}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"diffusion_model.{name}.lora_B.weight"] = B.detach().cpu().contiguous()
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(a, dtype=torch.float32)
    header = {"format": "pt", "lora_format": "diffusion_model.<module>.lora_A/lora_B/alpha"}
    if len(ranks) == 1:
        header["rank"] = str(ranks.pop())
    if len(alphas) == 1:
        header["alpha"] = f"{alphas.pop():g}"
    header.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The str -> str metadata in a LoRA file's safetensors header."""
    from kinema.loading.files import _open_safetensors

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}. Check the path.")
    return dict(_open_safetensors(path).metadata() or {})


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]` -> (file, strength); the strength is taken after the last ':' only if it is a
    number, so paths with ':' (e.g. C:\\loras\\x.safetensors) still work. The file must exist."""
    head, sep, tail = spec.rpartition(":")
    path, strength = spec, 1.0
    if sep and head and not Path(spec).expanduser().is_file():
        try:
            path, strength = head, float(tail)
        except ValueError:
            if not Path(spec).expanduser().exists() and Path(head).expanduser().is_file():
                raise KinemaError(f"--lora {spec}: strength {tail!r} is not a number; write FILE:STRENGTH, e.g. {head}:0.8.") from None
    if not math.isfinite(strength):
        raise KinemaError(f"--lora {spec}: strength {tail!r} must be a finite number, e.g. 0.8.")
    if not Path(path).expanduser().is_file():
        raise KinemaError(f"--lora {spec}: LoRA file {path} not found. Check the path.")
    return path, strength


def read_loras(specs: list[tuple[str | os.PathLike, float]], model: nn.Module) -> list[tuple[Path, float, LoRAFileWeights]]:
    """Read and check every LoRA file against `model` (a loaded DiT, or one on the meta device: only shapes
    matter), before any weight changes: [(path, strength, weights)]."""
    return [(Path(p), float(s), read_lora(p, model)[0]) for p, s in specs]


def apply_loras(dit: nn.Module, specs: list[tuple[str | os.PathLike, float]], loaded=None) -> list[list[str]]:
    """Merge several LoRAs into `dit` in order, each at its strength. Every file is read and checked
    before any weight changes (`loaded`: what `read_loras` gave already). Returns the modules changed by each."""
    loaded = read_loras(specs, dit) if loaded is None else loaded
    changed = []
    for path, strength, weights in loaded:
        modules = merge_lora(dit, weights, strength)
        ranks = sorted({a.shape[0] for a, _, _ in weights.values()})
        log.info("Applied LoRA %s at strength %g: %d layers, rank %s", path.name, strength, len(modules),
                 "/".join(map(str, ranks)))
        changed.append(modules)
    return changed
