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
    params = dict(model.named_parameters())
    for name, update in weights.items():
        key = (keys or {}).get(name, name)
        if not isinstance(update, tuple):
            _check_delta(model, modules, params, name, update, source, key)
            continue
        A, B, alpha = update
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


def _targets(modules: dict, params: dict, name: str) -> tuple[str | None, str | None]:
    """The parameter names a delta for `name` updates: (weight, bias); a module's weight / bias, or a parameter."""
    if name in params:
        return name, None
    module = modules.get(name)
    if module is None:
        return None, None
    weight = f"{name}.weight" if getattr(module, "weight", None) is not None else None
    bias = f"{name}.bias" if getattr(module, "bias", None) is not None else None
    return weight, bias


def _check_delta(model, modules, params, name, delta, source, key) -> None:
    weight, bias = _targets(modules, params, name)
    if weight is None and bias is None:
        raise CheckpointError(f"{source}: key '{key}' is for '{name}', which does not exist in this "
                              f"{_model_name(model)}. The LoRA was made for another model; nothing was applied.")
    for part, target, shape in (("weight", weight, delta.weight_shape()),
                                ("bias", bias, None if delta.bias() is None else tuple(delta.bias().shape))):
        if shape is None:
            continue
        if target is None:
            raise CheckpointError(f"{source}: key '{key}' updates the {part} of '{name}', which has none; nothing "
                                  "was applied.")
        want = tuple(model.get_parameter(target).shape) if target in params else tuple(_param(model, target).shape)
        if math.prod(shape) != math.prod(want) or (len(shape) == len(want) and shape != want):
            raise CheckpointError(
                f"{source}: key '{key}' makes a {_fmt(shape)} {delta.describe()} but the model's '{target}' is "
                f"{_fmt(want)}: the LoRA was made for a different model size. Nothing was applied.")


def _param(model: nn.Module, name: str) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, attr)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return f"{cfg.model_type} DiT (width {cfg.dim})" if hasattr(cfg, "model_type") and hasattr(cfg, "dim") else "model"


@torch.no_grad()
def merge_lora(model: nn.Module, lora_weights: LoRAWeights, strength: float = 1.0) -> list[str]:
    """Add strength times each layer's update to its weights in place: alpha / rank * B @ A for a low-rank pair,
    the Delta's product for the other kinds (computed in float32, cast back to the weight's dtype; an fp8 layer
    is quantised again with its scale). Everything is checked before any weight changes. Returns the names
    changed (none for strength 0)."""
    return merge_loras(model, [(lora_weights, strength)])


@torch.no_grad()
def merge_loras(model: nn.Module, loras: list[tuple[LoRAWeights, float]]) -> list[str]:
    """merge_lora for several LoRAs at once: each parameter gets the sum of its updates in one add (one
    rounding to its dtype, one re-quantisation of an fp8 layer, however many LoRAs touch it)."""
    for _, strength in loras:
        if not math.isfinite(strength):
            raise KinemaError(f"LoRA strength {strength} must be a finite number.")
    for weights, _ in loras:
        check_lora(model, weights)
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    names = list(dict.fromkeys(n for weights, s in loras if s != 0 for n in weights))
    for name in names:
        total: dict[str, torch.Tensor] = {}
        for weights, strength in loras:
            if strength == 0 or name not in weights:
                continue
            for target, delta in _deltas(modules, params, name, weights[name]):
                d = delta * strength
                total[target] = d if target not in total else total[target] + d
        for target, delta in total.items():
            _add(model, target, delta)
    return names


def _deltas(modules, params, name: str, update) -> list[tuple[str, torch.Tensor]]:
    """[(parameter name, float32 update)] of one layer's update (strength 1)."""
    if isinstance(update, tuple):
        A, B, alpha = update
        return [(f"{name}.weight", (B.float() @ A.float()) * (float(alpha) / A.shape[0]))]
    weight, bias = _targets(modules, params, name)
    out = []
    if update.weight_shape() is not None:
        out.append((weight, update.weight()))
    if update.bias() is not None:
        out.append((bias, update.bias()))
    return out


def _add(model: nn.Module, target: str, delta: torch.Tensor) -> None:
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    w = getattr(module, attr)
    delta = delta.to(w.device).reshape(w.shape)
    if isinstance(module, FP8Linear) and attr == "weight":  # fp8 storage with a scale: the layer re-quantises itself
        module.add_to_weight(delta)
    else:
        w.copy_((w.float() + delta).to(w.dtype))
