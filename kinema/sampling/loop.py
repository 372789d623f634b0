"""The one sampler loop: call the model, take a solver step, repeat.

Guidance, conditioning and device placement live in `model_fn`, so the same
loop serves t2v, i2v, v2v and second stages. The latent stays float32 whatever
precision the model runs at, as in the official Wan2.1 loop.
"""

from typing import Callable

import torch
from tqdm import tqdm

from kinema.sampling.solvers import STEPS, SolverState, check_solver


def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    solver: str = "unipc",
    start_step: int = 0,
    progress: bool | Callable[[int, int], None] = True,
) -> torch.Tensor:
    """Integrate from sigmas[start_step] to 0 and return the clean latent x0.

    model_fn(x, t) -> v: flow prediction (noise - x0) for latents x at
    timestep t (int64 [1], as the official code passes it), same shape as x.
    noise: the latent at sigmas[start_step]; pure noise for start_step = 0,
    else the input noised with `add_noise` (v2v, second stages). Multistep
    solvers start a part-way run at first order, having no history yet.
    progress: True for a tqdm bar, False for none, or a callable
    progress(steps_done, steps_total) called after every step.
    """
    step = STEPS[check_solver(solver)]
    n = len(timesteps)
    if len(sigmas) != n + 1:
        raise ValueError(f"need one more sigma than timesteps, got {len(sigmas)} sigmas and {n} timesteps")
    if not 0 <= start_step < n:
        raise ValueError(f"start_step must be in [0, {n}), got {start_step}")
    sigmas = sigmas.tolist()  # the solvers' coefficients are host-side scalars
    x = noise.float()
    state = SolverState()
    for i in tqdm(range(start_step, n), disable=progress is not True, desc=f"sampling ({solver})"):
        v = model_fn(x, timesteps[i : i + 1].to(x.device)).float()
        x, state = step(x, v, sigmas, i, state)
        if callable(progress):
            progress(i + 1, n)
    return x
