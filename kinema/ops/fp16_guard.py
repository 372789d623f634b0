"""The fp16 overflow guard: recompute in float32 the parts of a model whose fp16 output overflowed.

fp16 tops out at 65504. Wan2.1 was trained and is run by its authors in bf16
(fp32's range), so nothing keeps its activations inside fp16's range: a large
FFN or projection output becomes inf in fp16 and the video NaN. Clamping to
+-65504 (the official T5's fix) keeps it finite but wrong wherever it bites.
Kinema instead watches the outputs of a few coarse parts (each DiT block, the
text and image embeddings): when one is not finite, that part runs again with
its fp16 weights upcast to float32 (exact, and reversed exactly afterwards),
so the result is what a float32 model computes for that part. The check is a
forward hook (one `isfinite` reduction and host sync per part), so the model
stays a plain nn.Module, and nothing changes while outputs are finite: bf16 and
float32 models are never guarded at all.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kinema.ops.fp8 import FP8Linear

log = logging.getLogger("kinema")


def computes_in_fp16(module: nn.Module) -> bool:
    """True when some of the module's matmuls run in fp16 (fp16 weights, or fp8 weights upcast to fp16)."""
    return any(p.dtype == torch.float16 for p in module.parameters()) or any(
        isinstance(m, FP8Linear) and m.compute_dtype == torch.float16 for m in module.modules())


@contextmanager
def upcast_fp16(module: nn.Module):
    """Within the block, the module's fp16 parameters are float32 and its fp8 layers compute in float32.

    fp16 -> float32 -> fp16 is exact, so the weights are unchanged afterwards; the
    float32 copy of one part's weights exists only while it runs."""
    params = [p for p in module.parameters() if p.dtype == torch.float16]
    fp8 = [m for m in module.modules() if isinstance(m, FP8Linear) and m.compute_dtype == torch.float16]
    for p in params:
        p.data = p.data.float()
    for m in fp8:
        m.compute_dtype = torch.float32
    try:
        yield
    finally:
        for p in params:
            p.data = p.data.half()
        for m in fp8:
            m.compute_dtype = torch.float16


def _finite(output) -> bool:
    tensors = output if isinstance(output, (tuple, list)) else (output,)
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


@dataclass
class FP16Guard:
    """The hooks guard_fp16 installed, and how many parts it had to recompute in float32."""

    recomputed: int = 0
    handles: list = field(default_factory=list, repr=False)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if _finite(output):
            return None
        self.recomputed += 1
        if self.recomputed == 1:
            log.warning("fp16 overflow in %s (values beyond +-65504): recomputing it in float32; "
                        "further overflows are recomputed without a warning. bf16 (--dtype bf16) has no such limit.",
                        type(module).__name__)
        with upcast_fp16(module):
            # The class's forward, not the module's call: no hooks twice, and no recompile of a compiled block.
            return type(module).forward(module, *args, **kwargs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def guarded_parts(model: nn.Module) -> list[nn.Module]:
    """The parts watched, as the model class declares them: each of its repeated blocks (`_repeated_blocks`)
    and its `_fp16_guarded_modules` (WanDiT: the text and image embeddings); any other model as a whole."""
    cls = type(model)
    if not hasattr(cls, "_repeated_blocks"):
        return [model]
    parts = list(getattr(model, cls._repeated_blocks))
    return parts + [m for name, m in model.named_children() if name in getattr(cls, "_fp16_guarded_modules", ())]


def guard_fp16(model: nn.Module, parts: list[nn.Module] | None = None) -> FP16Guard | None:
    """Install the overflow guard on a model that computes in fp16 (None, and nothing done, otherwise).

    Its hooks go first, so they see a part before offload hooks move its weights away. The caller keeps
    the returned guard (the loaders put it in their record, kinema.loading.dit.LoadedDiT): its
    `recomputed` counts the recomputations and `remove()` takes it off."""
    if not computes_in_fp16(model):
        return None
    guard = FP16Guard()
    for part in parts or guarded_parts(model):
        guard.handles.append(part.register_forward_hook(guard.hook, with_kwargs=True, prepend=True))
    return guard
