"""The one attention entry point every Kinema model calls.

Tensors are batch-first and head-split: q [B, Lq, H, D], k and v [B, Lk, H, D].
`mask` is an optional boolean [B, Lk] (True = attend) or an additive float bias
broadcastable to [B, H, Lq, Lk]. `scale=None` means 1/sqrt(D); T5 passes 1.0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention; returns [B, Lq, H, D] in the dtype of v."""
    if mask is not None and mask.dtype == torch.bool and mask.dim() == 2:
        mask = mask[:, None, None, :]  # [B, 1, 1, Lk]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, H, Lq, D]
    return out.transpose(1, 2)
