"""LoRA files: saving in the layout other Wan tools load, and loading the layouts people share.

Saved keys (ComfyUI / musubi-tuner "diffusion_model" layout):
  diffusion_model.<module>.lora_A.weight [rank, in], .lora_B.weight [out, rank], .alpha (scalar)
with the settings (rank, alpha, base model, training config) in the safetensors header.

Read key layouts: kinema/lora/formats.py (low rank in the ComfyUI / musubi, diffusers / PEFT, kohya,
DiffSynth and finetrainers namings, full "diff" deltas, LyCORIS LoKr and LoHa).
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
from kinema.lora.formats import KOHYA_PREFIXES, NEEDED, PREFIXES, REFUSED, Delta, alpha_of, split_key
from kinema.lora.network import check_lora, merge_loras

log = logging.getLogger("kinema")

LoRAFileWeights = dict[str, "tuple[torch.Tensor, torch.Tensor, float] | Delta"]  # module or parameter name -> update


def _diffusers_rules():
    from kinema.loading.dit import DIFFUSERS

    return [(re.compile(p), t) for p, t in DIFFUSERS.rules]


def _dit_module_names(max_block: int) -> list[str]:
    """The module and parameter names of a Wan2.1 DiT with `max_block + 1` blocks (all variants), for kohya
    names when no model is given."""
    from kinema.models.dit import DiTConfig, WanDiT

    with torch.device("meta"):
        dit = WanDiT(DiTConfig("flf2v", in_dim=36, dim=8, ffn_dim=8, freq_dim=8, text_dim=8, num_heads=1,
                               num_layers=max_block + 1, image_dim=8))
    return [n for n, _ in dit.named_modules() if n] + [n for n, _ in dit.named_parameters()]


def _module_name(bare: str, rules, kohya: dict[str, str] | None) -> str | None:
    """The official module (or parameter) name for a key's module part; None if unknown."""
    for prefix in KOHYA_PREFIXES:
        if bare.startswith(prefix):
            return None if kohya is None else kohya.get(bare[len(prefix):])
    for prefix in PREFIXES:
        if bare.startswith(prefix):
            bare = bare[len(prefix):]
            break
    for pattern, template in rules:
        m = pattern.fullmatch(bare + ".weight")
        if m:
            return m.expand(template)[: -len(".weight")]
        m = pattern.fullmatch(bare)  # a parameter itself (diffusers' scale_shift_table: the modulation)
        if m:
            return m.expand(template)
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


def read_lora(path: str | os.PathLike, model: nn.Module | None = None,
              ignore_unmatched: bool = False) -> tuple[LoRAFileWeights, dict[str, str]]:
    """({module name: update}, {module name: the file's key for it}), checked against `model` if given. An update
    is (A, B, alpha) for a low-rank pair, else a Delta (full, LoKr, LoHa; kinema/lora/formats.py).
    Keys no layout uses, and layers the model (or a Wan2.1 DiT) does not have, are errors naming them; with
    `ignore_unmatched` they are left out with a warning that names them."""
    path = Path(path).expanduser()
    tensors = _read(path)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        bare, kind, role = split
        if (kind, role) in REFUSED:
            raise CheckpointError(f"{path}: key '{key}' is {REFUSED[kind, role]}, which Kinema does not merge; use a "
                                  "LoRA without it. Nothing was applied.")
        parts.setdefault(bare, {})[role if kind in ("lora", "any", "full") else f"{kind}.{role}"] = (key, tensor)
    if not parts:
        raise CheckpointError(
            f"{path} holds no LoRA weights (no lora_A/lora_B, lora_down/lora_up, diff, lokr_ or hada_ keys; it has e.g. "
            f"{', '.join(repr(k) for k in list(tensors)[:3]) or 'no keys'}). If it is a full model, pass it with --dit."
        )
    if unknown and not ignore_unmatched:
        raise CheckpointError(
            f"{path}: keys {_shown(unknown)} are not LoRA weights Kinema reads (lora_A/lora_B or lora_down/lora_up with "
            "alpha, diff / diff_b, LyCORIS lokr_ / hada_); nothing was applied. --lora_ignore_unmatched "
            "(ignore_unmatched=True) leaves them out."
        )
    kohya = None
    if any(b.startswith(KOHYA_PREFIXES) for b in parts):
        if model is not None:
            names = [n for n, m in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
        else:
            blocks = [int(m.group(1)) for b in parts if (m := re.search(r"blocks_(\d+)_", b))]
            names = _dit_module_names(max(blocks, default=0))
        kohya = {n.replace(".", "_"): n for n in names}
    rules = _diffusers_rules()
    weights: LoRAFileWeights = {}
    keys: dict[str, str] = {}
    unmatched = list(unknown)
    for bare, found in parts.items():
        first = next((k for r, (k, _) in found.items() if r != "alpha"), found.get("alpha", ("?",))[0])
        name = _module_name(bare, rules, kohya)
        if name is None or (model is not None and not _has_target(model, name)):
            if ignore_unmatched:
                unmatched += [k for k, _ in found.values()]
                continue
            if name is None:
                raise CheckpointError(
                    f"{path}: key '{first}' names no module of the {'model' if model is not None else 'Wan2.1 DiT'}; "
                    "the LoRA was made for another model. Nothing was applied (--lora_ignore_unmatched leaves such "
                    "keys out)."
                )
        update = _update(path, first, found)
        if name in weights:
            raise CheckpointError(f"{path}: keys '{keys[name]}' and '{first}' are both for module '{name}'; the file is inconsistent.")
        weights[name], keys[name] = update, first
    if unmatched:
        log.warning("LoRA %s: %d keys match nothing and were left out: %s", path.name, len(unmatched), _shown(unmatched))
    if not weights:
        raise CheckpointError(f"{path}: no key matches a layer of the model (e.g. {_shown(unmatched)}); the LoRA was "
                              "made for another model. Nothing was applied.")
    if model is not None:
        check_lora(model, weights, str(path), keys)
    return weights, keys


def _shown(keys: list[str]) -> str:
    return ", ".join(repr(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _has_target(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        pass
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _update(path: Path, first: str, found: dict):
    """One layer's tensors by role -> (A, B, alpha) or a Delta; an incomplete set is an error naming the key."""
    roles = {r: t for r, (_, t) in found.items()}
    try:
        alpha = alpha_of(roles["alpha"]) if "alpha" in roles else None
    except ValueError:
        raise CheckpointError(f"{path}: key '{found['alpha'][0]}' holds no usable alpha; the file is corrupt.") from None
    kinds = {r.split(".")[0] if "." in r else ("full" if r.startswith("diff") else "lora") for r in roles if r != "alpha"}
    if len(kinds) != 1:
        raise CheckpointError(f"{path}: key '{first}' mixes kinds of update ({', '.join(sorted(kinds)) or 'alpha only'}) "
                              "for one layer; the file is inconsistent.")
    (kind,) = kinds
    if kind == "lora":
        if "A" not in roles or "B" not in roles:
            half = "lora_B / lora_up" if "A" in roles else "lora_A / lora_down"
            raise CheckpointError(f"{path}: key '{first}' has no matching {half} weight; the LoRA file is incomplete.")
        A, B = roles["A"], roles["B"]
        return A, B, float(A.shape[0]) if alpha is None else alpha
    parts = {r.split(".", 1)[1] if "." in r else r: t for r, t in roles.items() if r != "alpha"}
    for need in NEEDED.get(kind, ()):
        if not any(n in parts for n in need):
            raise CheckpointError(f"{path}: key '{first}' has no {' or '.join(need)} part ({kind}); the file is "
                                  "incomplete.")
    for a, b in (("w1_a", "w1_b"), ("w2_a", "w2_b")):
        if (a in parts) != (b in parts) and kind == "lokr":
            raise CheckpointError(f"{path}: key '{first}' has lokr_{a} without lokr_{b}; the file is incomplete.")
    return Delta(kind, parts, alpha)


def load_lora(path: str | os.PathLike, model: nn.Module | None = None, ignore_unmatched: bool = False) -> LoRAFileWeights:
    """{module name: (A [rank, in], B [out, rank], alpha) or a Delta} from a LoRA file in any supported layout.
    With `model`, kohya names are matched against its modules and every layer is checked to fit it."""
    return read_lora(path, model, ignore_unmatched)[0]


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


BUILTIN_PREFIX = "builtin:"


def parse_lora_spec(spec: str) -> tuple[str, float | tuple[float, ...]]:
    """`FILE[:STRENGTH]` -> (file, strength), or `FILE:S1,S2,...` -> (file, per-step strengths: the LoRA then runs
    unmerged, kinema/lora/runtime.py); the strength is taken after the last ':' only if it is a number (or a
    list of them), so paths with ':' (e.g. C:\\loras\\x.safetensors) still work. The file must exist.
    `builtin:NAME[:STRENGTH]` names a LoRA shipped with the built-in model (e.g. builtin:distill-4step)."""
    if spec.startswith(BUILTIN_PREFIX):  # builtin:NAME[:STRENGTH], a LoRA shipped with the built-in model
        from kinema.builtin import builtin_lora

        name, sep, tail = spec[len(BUILTIN_PREFIX):].partition(":")
        return parse_lora_spec(str(builtin_lora(name)) + (sep + tail if sep else ""))
    head, sep, tail = spec.rpartition(":")
    path, strength = spec, 1.0
    if sep and head and not Path(spec).expanduser().is_file():
        try:
            values = tuple(float(v) for v in tail.split(","))
            path, strength = head, values[0] if len(values) == 1 else values
        except ValueError:
            if not Path(spec).expanduser().exists() and Path(head).expanduser().is_file():
                raise KinemaError(f"--lora {spec}: strength {tail!r} is not a number; write FILE:STRENGTH, e.g. "
                                  f"{head}:0.8 (or per-step strengths {head}:1,1,0.5).") from None
    if not all(math.isfinite(v) for v in (strength if isinstance(strength, tuple) else (strength,))):
        raise KinemaError(f"--lora {spec}: strength {tail!r} must be a finite number, e.g. 0.8.")
    if not Path(path).expanduser().is_file():
        raise KinemaError(f"--lora {spec}: LoRA file {path} not found. Check the path.")
    return path, strength


def read_loras(specs: list[tuple[str | os.PathLike, float]], model: nn.Module,
               ignore_unmatched: bool = False) -> list[tuple[Path, float, LoRAFileWeights]]:
    """Read and check every LoRA file against `model` (a loaded DiT, or one on the meta device: only shapes
    matter), before any weight changes: [(path, strength, weights)] (strength as given: a number, or per-step
    strengths for an unmerged LoRA)."""
    return [(Path(p), s if isinstance(s, tuple) else float(s), read_lora(p, model, ignore_unmatched)[0])
            for p, s in specs]


def apply_loras(dit: nn.Module, specs: list[tuple[str | os.PathLike, float]], loaded=None,
                ignore_unmatched: bool = False) -> list[str]:
    """Merge several LoRAs into `dit`, each at its strength. Every file is read and checked before any weight
    changes (`loaded`: what `read_loras` gave already). Each layer gets the sum of its updates in one add, so
    an fp8 layer is quantised once however many LoRAs touch it. Returns the names changed."""
    loaded = read_loras(specs, dit, ignore_unmatched) if loaded is None else loaded
    changed = merge_loras(dit, [(weights, strength) for _, strength, weights in loaded])
    for path, strength, weights in loaded:
        kinds = sorted({f"rank {u[0].shape[0]}" if isinstance(u, tuple) else u.describe() for u in weights.values()})
        log.info("Applied LoRA %s at strength %g: %d layers (%s)", path.name, strength, len(weights), ", ".join(kinds))
    return changed
