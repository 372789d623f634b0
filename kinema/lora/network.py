"""LoRA adapters on the Linear layers of a model (made for `WanDiT`, works on any nn.Module).

An adapter adds `scale * B(A(x))` to a Linear's output, with A [rank, in]
(kaiming-uniform), B [out, rank] (zero, so a fresh adapter changes nothing) and
scale = alpha / rank. It is a child module `lora` of the Linear it adapts and runs
from a forward hook, so it moves with `.to()` and block offloading, shows in
`parameters()`, and the model's own parameters keep their names. Its parameters are
hidden from `state_dict()` (and not expected by `load_state_dict`), so base
checkpoints save and load as before; `lora_state_dict` returns them.

`merge_lora` folds LoRA weights (injected or read from a file) into the base
weights in place, for inference at no extra cost.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kinema.errors import CheckpointError, KinemaError
from kinema.ops.fp8 import FP8Linear

# The Linear layers of a Wan2.1 DiT block, by the official module names.
SELF_ATTN = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
CROSS_ATTN = ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img")
FFN = ("ffn.0", "ffn.2")
GROUPS: dict[str, tuple[str, ...]] = {
    "self_attn": SELF_ATTN, "cross_attn": CROSS_ATTN, "attn": SELF_ATTN + CROSS_ATTN, "ffn": FFN,
    "all": SELF_ATTN + CROSS_ATTN + FFN,
}
DEFAULT_TARGETS = SELF_ATTN + CROSS_ATTN[:4] + FFN

# One LoRA layer as stored or loaded: A [rank, in], B [out, rank], alpha.
LoRAWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]


class LoRAAdapter(nn.Module):
    """`scale * B(A(dropout(x)))`, computed in the adapter's dtype (float32 by default)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.rank, self.alpha = rank, float(alpha)
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x.to(self.A.dtype)), self.A), self.B) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora(args[0]).to(output.dtype)


def _hide_from_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "lora.")]:
        del state_dict[key]


def _not_expected_on_load(module: nn.Module, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".lora." not in k]


def expand_targets(targets: Iterable[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Each target as given, with the name suffixes it stands for (a group, or itself)."""
    if isinstance(targets, str):
        targets = [targets]
    return [(t, GROUPS.get(t, (t,))) for t in targets]


def inject_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: Iterable[str] = DEFAULT_TARGETS,
                dropout: float = 0.0, dtype: torch.dtype = torch.float32, freeze_base: bool = True) -> dict[str, LoRAAdapter]:
    """Add a LoRA adapter to every Linear whose name ends with a target (or a group: attn, self_attn,
    cross_attn, ffn, all); alpha defaults to rank. The model's own parameters are frozen unless
    `freeze_base=False`. Returns {module name: adapter}."""
    if rank < 1:
        raise KinemaError(f"LoRA rank {rank} must be at least 1.")
    alpha = float(rank if alpha is None else alpha)
    expanded = expand_targets(targets)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: dict[str, nn.Linear] = {}
    for given, suffixes in expanded:
        hits = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
        if not hits:
            example = ", ".join(list(linears)[:4]) or "none"
            raise KinemaError(
                f"LoRA target {given!r} matches no Linear layer of the model (its Linear layers are named like: "
                f"{example}). Use module name endings such as 'self_attn.q' or 'ffn.0', or a group: {', '.join(GROUPS)}."
            )
        chosen.update((n, linears[n]) for n in hits)
    taken = [n for n, m in chosen.items() if hasattr(m, "lora")]
    if taken:
        raise KinemaError(f"'{taken[0]}' already has a LoRA adapter; call remove_lora(model) first.")
    if freeze_base:
        model.requires_grad_(False)
    adapters = {}
    for name, linear in chosen.items():
        w = linear.weight
        adapter = LoRAAdapter(linear.in_features, linear.out_features, rank, alpha, dropout, w.device, dtype)
        linear.add_module("lora", adapter)
        adapter._handles = [
            linear.register_forward_hook(_forward_hook),
            linear._register_state_dict_hook(_hide_from_state_dict),
            linear.register_load_state_dict_post_hook(_not_expected_on_load),
        ]
        adapters[name] = adapter
    return adapters


def lora_adapters(model: nn.Module) -> dict[str, LoRAAdapter]:
    """{name of the adapted Linear: adapter} for every injected adapter."""
    return {name[: -len(".lora")] if name.endswith(".lora") else name: m
            for name, m in model.named_modules() if isinstance(m, LoRAAdapter)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (A and B of every adapter)."""
    return [p for a in lora_adapters(model).values() for p in (a.A, a.B)]


def lora_state_dict(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A, B, alpha)}, detached copies on the CPU: what `save_lora` and `merge_lora` take."""
    return {name: (a.A.detach().cpu().clone(), a.B.detach().cpu().clone(), a.alpha) for name, a in lora_adapters(model).items()}


def remove_lora(model: nn.Module) -> list[str]:
    """Take every adapter off the model (its weights are dropped; merge them first to keep them)."""
    removed = []
    for name, adapter in lora_adapters(model).items():
        for handle in adapter._handles:
            handle.remove()
        linear = model.get_submodule(name) if name else model
        del linear.lora
        removed.append(name)
    return removed


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_lora(model: nn.Module, weights: LoRAWeights, source: str = "LoRA",
               keys: Mapping[str, str] | None = None) -> None:
    """Raise a CheckpointError naming the key if a layer has no place in `model` or does not fit its shape.
    `keys` maps module names to the file's key names, for the messages."""
    modules = dict(model.named_modules())
    for name, (A, B, alpha) in weights.items():
        key = (keys or {}).get(name, name)
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            what = "is not a Linear layer" if module is not None else "does not exist"
            raise CheckpointError(
                f"{source}: key '{key}' is for module '{name}', which {what} in this "
                f"{_model_name(model)}. The LoRA was made for another model (or variant, e.g. i2v vs t2v); "
                "nothing was applied."
            )
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(
                f"{source}: key '{key}' holds A {_fmt(A.shape)} and B {_fmt(B.shape)}, which are not a LoRA pair "
                "(A [rank, in], B [out, rank]); the file is corrupt. Nothing was applied."
            )
        want = tuple(module.weight.shape)
        if (B.shape[0], A.shape[1]) != want:
            raise CheckpointError(
                f"{source}: key '{key}' makes a {_fmt((B.shape[0], A.shape[1]))} update but the model's "
                f"'{name}.weight' is {_fmt(want)}: the LoRA was trained for a different model size "
                "(e.g. 14B vs 1.3B). Use a LoRA made for this model; nothing was applied."
            )


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return f"{cfg.model_type} DiT (width {cfg.dim})" if hasattr(cfg, "model_type") and hasattr(cfg, "dim") else "model"


@torch.no_grad()
def merge_lora(model: nn.Module, lora_weights: LoRAWeights, strength: float = 1.0) -> list[str]:
    """Add strength * alpha / rank * B @ A to each matching Linear weight in place (computed in float32,
    cast back to the weight's dtype; an fp8 layer is quantised again with its scale). Everything is checked before any weight changes.
    Returns the names of the modules changed (none for strength 0)."""
    if not math.isfinite(strength):
        raise KinemaError(f"LoRA strength {strength} must be a finite number.")
    check_lora(model, lora_weights)
    if strength == 0:
        return []
    changed = []
    for name, (A, B, alpha) in lora_weights.items():
        module = model.get_submodule(name)
        w = module.weight
        scale = strength * float(alpha) / A.shape[0]
        delta = B.to(w.device, torch.float32) @ A.to(w.device, torch.float32)
        if isinstance(module, FP8Linear):  # fp8 storage with a scale: the layer re-quantises itself
            module.add_to_weight(delta * scale)
        else:
            w.copy_((w.float() + delta * scale).to(w.dtype))
        changed.append(name)
    return changed
