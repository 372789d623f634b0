"""Filling a meta-device model from a checkpoint, one tensor at a time.

Models are built on the meta device (no memory), every shape is checked
against the checkpoint before a byte of weights is read, and then each tensor
is read, cast and moved to its device and assigned in place of its meta
placeholder. At no point do two copies of the weights exist, and a model is
either loaded whole or not at all. The weights of fp8 layers (`FP8Linear`, put
in place by a loader asked for a quantization) are read by kinema.loading.fp8:
kept as stored when the file is fp8, quantised as they are read otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kinema.errors import CheckpointError
from kinema.loading.files import TensorSource
from kinema.loading.fp8 import read_fp8_weight
from kinema.loading.keymap import Plan
from kinema.ops.fp8 import FP8Linear


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _fits(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Same shape, or the same up to singleton dimensions (e.g. [1, 1, D] vs [D])."""
    if have == want:
        return True
    return [s for s in have if s != 1] == [s for s in want if s != 1]


def check_plan(model: nn.Module, plan: Plan, source: TensorSource, what: str, derived: frozenset[str] = frozenset()) -> None:
    """`derived`: model tensors that are not read under their own name (fp8 scales come with their weight)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in plan.sources and k not in derived]
    if missing:
        shown = ", ".join(f"'{k}' {_fmt(expected[k])}" for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{source.name}: missing {len(missing)} weight(s) of the {what}: {shown}{more}. "
            "The checkpoint is incomplete or belongs to another model; nothing was loaded."
        )
    extra = [k for k in plan.sources if k not in expected]
    if extra:
        raise CheckpointError(
            f"{source.name}: keys {', '.join(repr(plan.sources[k][0]) for k in extra[:5])} have no place in the "
            f"{what} (its architecture was inferred from the other keys). The checkpoint mixes variants; nothing was loaded."
        )
    for key, srcs in plan.sources.items():
        shapes = [source.shape(s) for s in srcs]
        have = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes),) + shapes[0][1:]
        if not _fits(have, expected[key]):
            raise CheckpointError(
                f"{source.origin[srcs[0]]}: key '{srcs[0]}' has shape {_fmt(have)} but the {what} expects "
                f"{_fmt(expected[key])} for '{key}'. The checkpoint does not match this architecture; nothing was loaded."
            )


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def materialize(
    model: nn.Module,
    plan: Plan,
    source: TensorSource,
    dtype_for: Callable[[str], torch.dtype],
    device: torch.device | str = "cpu",
    what: str = "model",
    progress: Callable[[int, int], None] | None = None,
    skip: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Check `plan` against `model` (on the meta device), then load every tensor in place.

    `skip(key)`: tensors left on the meta device, for a caller that reads them later with `read_tensor`
    (streaming, kinema/memory/streaming.py)."""
    fp8 = {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    check_plan(model, plan, source, what, frozenset(f"{name}.scale_weight" for name in fp8))
    device = torch.device(device)
    total = len(plan.sources)
    for i, key in enumerate(plan.sources):
        if skip is None or not skip(key):
            for name, tensor in read_tensor(model, key, plan, source, dtype_for).items():
                _assign(model, name, tensor.to(device))
        if progress is not None:
            progress(i + 1, total)
    return model.eval().requires_grad_(False)


def read_tensor(model: nn.Module, key: str, plan: Plan, source: TensorSource,
                dtype_for: Callable[[str], torch.dtype]) -> dict[str, torch.Tensor]:
    """The model tensor `key` read from the checkpoint, shaped and cast (on the CPU), plus the
    `scale_weight` that comes with the weight of an fp8 layer: {model name: tensor}."""
    srcs = plan.sources[key]
    owner, _, leaf = key.rpartition(".")
    layer = model.get_submodule(owner) if owner else model
    shape = get_tensor(model, key).shape
    if leaf == "weight" and isinstance(layer, FP8Linear):
        tensor, scale = read_fp8_weight(source, srcs, layer.mode)
        return {key: tensor.reshape(shape), f"{owner}.scale_weight": scale}
    if len(srcs) == 1:
        tensor = source.get(srcs[0], dtype_for(key))
    else:
        tensor = torch.cat([source.get(s, dtype_for(key)) for s in srcs], dim=0)
    return {key: tensor.reshape(shape)}


def get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]
