"""Reading weights into fp8 layers: keep a checkpoint's fp8 storage, or quantise while reading.

A loader asked for a quantization swaps the meta model's Linear layers for
`FP8Linear` placeholders (kinema.ops.fp8) before it materialises the model;
each of their weights is then read here, one tensor at a time:
- stored in fp8 of the requested format (a plain cast, or ComfyUI's scaled fp8
  with its `scale_weight`): kept as stored, never re-quantised;
- stored in bf16 / fp16 / fp32: quantised as it is read;
- stored in the other fp8 format: an error, since re-quantising fp8 compounds its
  rounding; the message names the mode that keeps the file as it is.
A scaled file asked for with an unscaled mode keeps its scales (that is exact).
"""

from __future__ import annotations

import torch
from torch import nn

from kinema.errors import CheckpointError
from kinema.loading.files import TensorSource
from kinema.loading.keymap import Plan
from kinema.ops.fp8 import AUTO, FP8_DTYPES, MODES, check_mode, fp8_targets, mode_name, quantize_weight


def resolve_quantization(quantization: str | None, model: nn.Module, plan: Plan, source: TensorSource) -> str | None:
    """The mode to load `model` (on the meta device) with: `quantization` itself, or for 'auto' the
    layout the checkpoint stores its quantisable Linear weights in (None when they are not fp8)."""
    if quantization is None:
        return None
    if check_mode(quantization, allow_auto=True) != AUTO:
        return quantization
    first: dict[torch.dtype, str] = {}  # stored fp8 dtype -> the first key stored so
    scaled = False
    for name in fp8_targets(model):
        for key in plan.sources.get(f"{name}.weight", []):
            dtype = source.dtype(key)
            if dtype in FP8_DTYPES:
                first.setdefault(dtype, key)
                scaled |= source.has_scale(key)
    if len(first) > 1:
        shown = " and ".join(f"{str(d).removeprefix('torch.')} ('{k}')" for d, k in first.items())
        raise CheckpointError(
            f"{source.name}: the Linear weights mix fp8 formats, {shown}; Kinema keeps one fp8 format per model. "
            "Load it without quantization (dequantised) or with one mode, which re-quantises the others."
        )
    return mode_name(next(iter(first)), scaled) if first else None


def read_fp8_weight(source: TensorSource, keys: list[str], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 0-dim scale) for one FP8Linear, from its source key(s)."""
    fmt = MODES[mode].dtype
    if len(keys) == 1 and source.dtype(keys[0]) in FP8_DTYPES:
        q, scale = source.get_fp8(keys[0])
        if q.dtype != fmt:
            kept = mode_name(q.dtype, scale is not None)
            raise CheckpointError(
                f"{source.origin[keys[0]]}: '{keys[0]}' is stored as {str(q.dtype).removeprefix('torch.')} but "
                f"quantization {mode} was asked for, and re-quantising fp8 compounds its rounding. Load it with "
                f"quantization {kept}, or {AUTO} (keeps the file's own fp8 layout), or none (dequantised)."
            )
        return q, torch.ones(()) if scale is None else scale
    # Stored in higher precision (or in parts to join): quantise now, one tensor at a time.
    parts = [source.get(k, torch.float32) for k in keys]
    return quantize_weight(parts[0] if len(parts) == 1 else torch.cat(parts), mode)
