"""CFG-Zero*: classifier-free guidance with an optimised scale on the uncond prediction, and zero-init.

Per sample, s* = <v_c, v_u> / (||v_u||^2 + eps) (the projection of the cond prediction on the
uncond one, over all of a sample's latent values), then v = s* v_u + w (v_c - s* v_u); w = 1
gives v_c, s* = 1 gives plain CFG. Zero-init: the first `zero_init_steps` steps return a zero
velocity (the sample stays at the noise), where the early flow estimates are least accurate
(Fan et al., 2025). The wrapper's `zero_star_steps` K zeroes the steps 0..K, i.e. K + 1 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kinema.errors import KinemaError

EPS = 1e-8


@dataclass(frozen=True)
class CFGZeroStar:
    zero_init_steps: int = 1  # the first steps given a zero velocity; 0: none

    def __post_init__(self):
        if isinstance(self.zero_init_steps, bool) or not isinstance(self.zero_init_steps, int) or self.zero_init_steps < 0:
            raise KinemaError(f"zero_init_steps {self.zero_init_steps!r} must be a whole number >= 0 (0 turns "
                              "zero-init off).")

    def describe(self) -> str:
        return f"zero-init {self.zero_init_steps}"


def optimized_scale(v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
    """s* per sample, shaped [B, 1, ...] to broadcast against v [B, ...]; computed in float32."""
    c, u = v_cond.float().flatten(1), v_uncond.float().flatten(1)
    s = (c * u).sum(1) / (u.square().sum(1) + EPS)
    return s.view(-1, *([1] * (v_cond.dim() - 1)))


def cfg_zero_star(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v = s* v_u + w (v_c - s* v_u)."""
    s = optimized_scale(v_cond, v_uncond)
    u = v_uncond.float() * s
    return u + scale * (v_cond.float() - u)
