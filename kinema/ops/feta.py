"""Enhance-A-Video (FETA): how strongly a video's frames attend to each other, as a gain on self-attention.

For each spatial position, the queries and keys of its F frames (one head at a time) give a
temporal attention map softmax(q k^T / sqrt(D)) [F, F]. The cross-frame intensity is the mean
of its off-diagonal entries, averaged over positions and heads; the gain is that mean times
(F + weight), clamped below at 1, and it multiplies the self-attention output (Enhance-A-Video,
NUS-HPC-AI-Lab; the ComfyUI-WanVideoWrapper weight default 2.0). The queries and keys are taken
after their RMS norm and before RoPE, as the wrapper does.

Wan's tokens are frame-major (frame, row, column), so frame f of position s is token f * S + s.
(The wrapper's version reshapes the sequence as position-major, which mixes positions and frames
for Wan's order; this one follows the order the DiT patchifies in.) The gain is computed per batch
row, so a batched-guidance call gives each branch the gain its own pass would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POSITIONS_PER_SLICE = 4096  # spatial positions per slice of the [S, H, F, F] maps (bounded memory at 720p)


@dataclass(frozen=True)
class Enhance:
    """What a self-attention needs to apply the gain on one call: the latent frames of its tokens and the weight."""

    frames: int
    weight: float


def feta_gain(q: torch.Tensor, k: torch.Tensor, frames: int, weight: float) -> torch.Tensor:
    """q, k [B, F*S, H, D] (frame-major tokens) -> the gain [B] float32 (1 where there is one frame)."""
    b, length, heads, d = q.shape
    if frames < 2:
        return torch.ones(b, dtype=torch.float32, device=q.device)
    if length % frames:
        raise ValueError(f"{length} tokens do not split into {frames} frames")
    s = length // frames
    qf = q.reshape(b, frames, s, heads, d)
    kf = k.reshape(b, frames, s, heads, d)
    eye = torch.eye(frames, dtype=torch.bool, device=q.device)
    total = torch.zeros(b, dtype=torch.float32, device=q.device)
    for start in range(0, s, POSITIONS_PER_SLICE):
        qs = qf[:, :, start : start + POSITIONS_PER_SLICE].float()
        ks = kf[:, :, start : start + POSITIONS_PER_SLICE].float()
        logits = torch.einsum("bfshd,bgshd->bshfg", qs, ks) * d**-0.5  # [B, S', H, F, F]
        maps = logits.softmax(dim=-1).masked_fill(eye, 0.0)
        total += maps.sum(dim=(1, 2, 3, 4))
    mean = total / (s * heads * (frames * frames - frames))
    return (mean * (frames + weight)).clamp(min=1.0)
