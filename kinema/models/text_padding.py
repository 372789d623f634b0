"""Folding the zero-padded text tokens of Wan's cross-attention into one key, exactly.

Wan pads every prompt's umT5 output with zero rows up to `text_len` (512) before its text
projection, so the padding rows all become the same vector: each gives the same key and value
in every block's cross-attention. n identical keys with logit s weigh n * exp(s) in the softmax,
which is what one copy with logit s + log(n) weighs, and they add n identical values weighted
the same way. So the attention over [the prompt's L tokens, 512 - L padding rows] equals the
attention over [the L tokens, one padding row] with log(512 - L) added to that row's logit: the
same result up to float rounding, with the text projection, the key / value projections and the
attention itself over L + 1 instead of 512 rows (a prompt is typically 10-60 tokens).

In a batch whose rows have prompts of different lengths (cond and uncond in one batched pass)
the folded context is as long as the longest prompt plus one; a shorter row's padding then
takes several of the kept rows, and its log(count) is shared among them.
"""

from __future__ import annotations

import torch


def fold_padding(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text context [B, L, C] zero-padded at its end -> (the context cut to its longest prompt + 1 row,
    an additive attention bias [B, 1, 1, L'] float32 or None when nothing was folded)."""
    b, length, _ = context.shape
    real = context.detach().abs().amax(-1) > 0  # [B, L]
    positions = torch.arange(1, length + 1, device=context.device)
    lengths = (real * positions).amax(-1)  # [B]: one past the last non-zero row
    kept = int(lengths.max()) + 1
    if kept >= length:  # at most one padding row: nothing to gain
        return context, None
    # Row b keeps (kept - L_b) of its (length - L_b) padding rows; each kept one stands for their share.
    pad_kept = (kept - lengths).to(torch.float64)
    share = torch.log((length - lengths).to(torch.float64) / pad_kept).float()  # [B]
    is_pad = torch.arange(kept, device=context.device)[None] >= lengths[:, None]  # [B, L']
    bias = torch.where(is_pad, share[:, None], torch.zeros((), device=context.device))
    return context[:, :kept], bias[:, None, None, :]
