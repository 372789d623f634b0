"""3D rotary position embedding of the Wan2.1 DiT.

The head dimension d is split into a time, a height and a width part of sizes
d - 4*(d//6), 2*(d//6), 2*(d//6); each part rotates interleaved channel pairs
(x[2i], x[2i+1]) by position * theta^(-2i/part) along its own axis.

The reference computes this in float64 complex arithmetic on every step. Here
the angles are computed once per grid in float64 and kept as one complex64
table (float32 cos + i sin); the rotation is one complex64 multiply, which
matches the reference to ~1e-7 relative.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to the (time, height, width) axes."""
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def inv_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The rotation speeds of one axis's channel pairs, float64 [dim/2]: theta^(-2i/dim)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _axis_angles(n: int, start: int, dim: int, theta: float, riflex: tuple[int, int] | None = None) -> torch.Tensor:
    inv_freq = inv_frequencies(dim, theta)  # [dim/2]
    if riflex is not None:  # RIFLEx: the k-th (1-based) frequency completes 0.9 of a turn over L frames
        k, frames = riflex
        inv_freq[k - 1] = 0.9 * 2 * math.pi / frames
    pos = torch.arange(start, start + n, dtype=torch.float64)
    return torch.outer(pos, inv_freq)  # [n, dim/2]


@lru_cache(maxsize=16)
def _table(grid: tuple[int, int, int], offset: tuple[int, int, int], head_dim: int, theta: float, device: str,
           riflex: tuple[int, int] | None = None):
    f, h, w = grid
    dt, dh, dw = rope_split(head_dim)
    at = _axis_angles(f, offset[0], dt, theta, riflex)[:, None, None].expand(f, h, w, -1)
    ah = _axis_angles(h, offset[1], dh, theta)[None, :, None].expand(f, h, w, -1)
    aw = _axis_angles(w, offset[2], dw, theta)[None, None, :].expand(f, h, w, -1)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(f * h * w, head_dim // 2)  # [L, D/2]
    return torch.complex(angles.cos().float(), angles.sin().float()).to(device)


def rope_table(
    grid: tuple[int, int, int],
    head_dim: int,
    device: torch.device | str = "cpu",
    offset: tuple[int, int, int] = (0, 0, 0),
    theta: float = 10000.0,
    riflex: tuple[int, int] | None = None,
) -> torch.Tensor:
    """cos + i sin, complex64 [L, head_dim/2], for the tokens of a (frames, height, width) grid in raster order.

    `offset` shifts the positions, so a window of frames cut from a longer video
    keeps the positions it has in the whole. `riflex` (k, L): the time axis's k-th frequency
    (1-based) lowered to 0.9 * 2 pi / L, RIFLEx's cure for videos longer than trained
    (kinema/sampling/riflex.py); None: the model's own table.
    """
    if riflex is not None:
        riflex = (int(riflex[0]), int(riflex[1]))
        if not 1 <= riflex[0] <= rope_split(head_dim)[0] // 2 or riflex[1] < 1:
            raise ValueError(f"RIFLEx (k, frames) {riflex} out of range: k in 1..{rope_split(head_dim)[0] // 2}")
    return _table(tuple(grid), tuple(offset), head_dim, theta, str(device), riflex)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] (any float dtype) by a `rope_table`; returns float32 [B, L, H, D]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, H, D/2]
    return torch.view_as_real(pairs * rotation[None, :, None]).flatten(-2)
