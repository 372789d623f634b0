"""The one sampler loop: call the model, take a solver step, tell the caller, repeat.

Guidance, conditioning, device placement and block hooks live in `model_fn`, so the
same loop serves t2v, i2v, v2v and second stages. The latent stays float32 whatever
precision the model runs at, as in the official Wan2.1 loop. After every step a
`callback` sees the step (`StepInfo`) and may stop the run, and a `cancel` event set
from any thread stops it at the end of the step it is in: both raise `Cancelled`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from kinema.errors import Cancelled
from kinema.sampling.context import StepContext
from kinema.sampling.solvers import STEPS, SolverState, check_solver

ModelFn = Callable[[torch.Tensor, torch.Tensor, StepContext], torch.Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a step callback sees, after step `step` (0-based) of `steps`."""

    step: int
    steps: int
    sigma: float  # the noise level the step started from
    timestep: int
    latents: torch.Tensor  # x after the step [B, 16, T, h, w]
    denoised: torch.Tensor  # the step's x0 estimate, x - sigma * v [B, 16, T, h, w]
    _preview: Callable[[torch.Tensor], np.ndarray] | None = None

    def preview(self) -> np.ndarray:
        """uint8 [T, h, w, 3]: the x0 estimate through a cheap linear latent -> RGB projection (no VAE decode)."""
        if self._preview is None:
            raise RuntimeError("this run has no latent preview (sample(..., preview=...) was not given one)")
        return self._preview(self.denoised[0])


def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    solver: str = "unipc",
    start_step: int = 0,
    progress: bool = True,
    callback: Callable[[StepInfo], bool | None] | None = None,
    cancel: threading.Event | None = None,
    preview: Callable[[torch.Tensor], np.ndarray] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Integrate from sigmas[start_step] to 0 and return the clean latent x0.

    model_fn(x, t, step) -> v: flow prediction (noise - x0) for latents x at timestep t
    (int64 [1], as the official code passes it), same shape as x; `step` is the StepContext.
    noise: the latent at sigmas[start_step]; pure noise for start_step = 0, else the input
    noised with `add_noise` (v2v, second stages). Multistep solvers start a part-way run at
    first order, having no history yet. progress: a tqdm bar. callback(StepInfo) after every
    step: returning False raises Cancelled. cancel: a threading.Event checked after every step.
    preview: the latent -> uint8 RGB projection StepInfo.preview uses. seed: the run's seed, for the fresh
    noise of stochastic solvers (lcm).
    """
    step = STEPS[check_solver(solver)]
    n = len(timesteps)
    if len(sigmas) != n + 1:
        raise ValueError(f"need one more sigma than timesteps, got {len(sigmas)} sigmas and {n} timesteps")
    if not 0 <= start_step < n:
        raise ValueError(f"start_step must be in [0, {n}), got {start_step}")
    sigma = sigmas.tolist()  # the solvers' coefficients are host-side scalars
    x = noise.float()
    state = SolverState(seed=seed)
    for i in tqdm(range(start_step, n), disable=not progress, desc=f"sampling ({solver})"):
        ctx = StepContext(step=i, steps=n, sigma=sigma[i], timestep=int(timesteps[i]))
        v = model_fn(x, timesteps[i : i + 1].to(x.device), ctx).float()
        x_in = x
        x, state = step(x, v, sigma, i, state)
        if callback is not None:
            info = StepInfo(i, n, sigma[i], ctx.timestep, x, x_in - sigma[i] * v, preview)
            if callback(info) is False:
                raise Cancelled(f"stopped by the step callback after step {i + 1} of {n}")
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after step {i + 1} of {n}")
    return x
