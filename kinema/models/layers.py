"""Small layers shared by Kinema's models, written for mixed precision.

Kinema keeps the residual stream and all normalisation in float32 (as the
reference does under autocast) while the big matrix multiplies run in the
weights' dtype. `Linear` therefore casts its input to its own weight dtype, so
a model whose weights were loaded in bf16 needs no autocast and a float32
"island" is simply a module whose weights were kept in float32. On the CPU a
bf16 / fp16 layer multiplies natively or in float32, whichever this machine
runs faster (kinema/ops/cpu_half.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinema.ops.cpu_half import linear


class Linear(nn.Linear):
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype it computes and returns in; an fp8 layer (kinema.ops.fp8) has a wider one than its weight."""
        return self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x.to(self.weight.dtype), self.weight, self.bias)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input or weight dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class RMSNorm32(nn.Module):
    """RMS norm over the last dim, in float32; returns float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, L, D] normalised, shift/scale [B, D]. Without autograd x is overwritten (it is
    always a fresh norm output)."""
    if torch.is_grad_enabled():
        return x * (1 + scale[:, None]) + shift[:, None]
    return x.mul_(1 + scale[:, None]).add_(shift[:, None])
