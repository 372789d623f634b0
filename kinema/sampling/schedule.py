"""Noise schedules, noise and v2v start points for flow-matching sampling.

Wan is a rectified-flow model: x_t = (1 - sigma) * x0 + sigma * noise, and the
DiT predicts the velocity v = noise - x0. Sampling walks sigma from ~1 to 0.

The schedules reproduce the official Wan2.1 code exactly, timesteps included,
because the model only ever saw integer timesteps and a value truncated one
way or the other changes its output:

- unipc (and euler): sigmas = shift(linspace(0.999, 0, steps + 1)[:-1]), then 0.
  0.999 is the official scheduler's sigma_max (1 - 1/1000, read back from
  float32). Euler is not in the official code; it uses this, Wan's default
  schedule, so switching solver changes only the update rule.
- dpm++: sigmas = shift(linspace(1, 0, steps + 1)[:steps]), then 0: it starts
  at sigma = 1 exactly, as the official `get_sampling_sigmas` does.
- timesteps = int64(sigmas * 1000), truncated, for every solver, while the
  solvers use the float32 sigmas.

diffusers differs on all three points (its flow UniPC starts from 1 - 1e-6,
its flow DPM-Solver from 0.999, and FlowMatchEuler passes float timesteps);
tests/test_sampling_parity.py drives it with these values so both do the same
maths. The arithmetic is float64 numpy, as in the official code, so that the
truncation to integers lands on the same side.
"""

import math

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.sampling.solvers import check_solver

NUM_TRAIN_TIMESTEPS = 1000
UNIPC_SIGMA_MAX = float(np.float32(1 - 1 / NUM_TRAIN_TIMESTEPS))  # 0.9990000128746033


def shift_sigmas(sigmas, shift: float):
    """Bend the schedule towards high noise: sigma' = s*sigma / (1 + (s-1)*sigma); s = 1 is the identity."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def schedule(solver: str, steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official Wan2.1 schedule for `solver`: sigmas float32 [steps + 1] ending in 0, timesteps int64 [steps];
    for the distilled solvers (below) timesteps float32 = sigmas * 1000, as ComfyUI-WanVideoWrapper passes them."""
    check_solver(solver)
    if not isinstance(steps, int) or steps < 1:
        raise KinemaError(f"sampling steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise KinemaError(f"shift must be positive (Wan uses 1 to 8), got {shift!r}")
    if solver in DISTILLED:
        sigmas = shift_sigmas(DISTILLED[solver](steps), shift)
        return (torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32)),
                torch.from_numpy((sigmas * NUM_TRAIN_TIMESTEPS).astype(np.float32)))
    if solver == "dpm++":
        sigmas = np.linspace(1, 0, steps + 1)[:steps]
    else:
        sigmas = np.linspace(UNIPC_SIGMA_MAX, 0, steps + 1)[:-1]
    sigmas = shift_sigmas(sigmas, shift)
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)  # truncation, as official
    sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    return sigmas, timesteps


def _distill_sigmas(steps: int) -> np.ndarray:
    """The step-distillation grid before the shift: 1 - k / steps, the first at 999 / 1000. At 4 steps this is
    the wrapper's flowmatch_distill list of timesteps [999, 750, 500, 250] (LightX2V's 4-step LoRAs)."""
    sigmas = 1 - np.arange(steps) / steps
    sigmas[0] = 1 - 1 / NUM_TRAIN_TIMESTEPS
    return sigmas


def _lcm_sigmas(steps: int) -> np.ndarray:
    """The wrapper's lcm grid before the shift: timesteps linspace(1000, 1, steps) / 1000 (diffusers' flow-match
    Euler grid)."""
    return np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps) / NUM_TRAIN_TIMESTEPS


DISTILLED = {"flowmatch_distill": _distill_sigmas, "lcm": _lcm_sigmas}


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The forward process: the latent a sampler expects at noise level sigma."""
    return (1 - sigma) * x0 + sigma * noise


def start_step_for_denoise(steps: int, denoise: float) -> int:
    """First step of a v2v / second-stage run that re-generates a fraction `denoise` of the trajectory.

    denoise = 1 starts from pure noise (step 0); smaller values keep more of the
    input. start = round(steps * (1 - denoise)), rounding halves up (Python's
    round() would send 2.5 to 2), and capped so at least one step runs. Noise
    the input to `sigmas[start]` with `add_noise` and pass `start_step=start`.
    """
    if not 0 < denoise <= 1:
        raise KinemaError(f"denoise strength must be in (0, 1], got {denoise!r}; 1 = ignore the input video")
    return min(math.floor(steps * (1 - denoise) + 0.5), steps - 1)


def initial_noise(shape, seed: int) -> torch.Tensor:
    """Gaussian starting latents, float32 on the CPU.

    Drawn on the CPU so a seed gives the same video on every device; the
    official code draws on the GPU, so its seeds do not carry over bit for bit.
    """
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
