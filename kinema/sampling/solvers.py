"""One update rule per solver, as plain functions over explicit state.

Each step function takes the latent x at sigmas[i], the model's flow
prediction v there, the whole schedule and the state the previous steps left,
and returns (x at sigmas[i + 1], new state). The one loop in `loop.py` drives
them all, so a solver is only its maths.

Multistep solvers (UniPC, DPM++) work on x0 predictions, x0 = x - sigma * v,
and the half log-SNR lambda = log((1 - sigma) / sigma). They follow the
official Wan2.1 `FlowUniPCMultistepScheduler` / `FlowDPMSolverMultistepScheduler`
with the settings Wan uses: order 2, lower_order_final, final sigma 0. The
coefficients are computed in float64 Python floats (the official code uses
float32 tensors; the difference is ~1e-7). lambda is -inf at sigma = 1 and +inf
at sigma = 0, as torch.log gives in the official code: that is what turns the
last step, and any step leaning on a sigma = 1 point, into a first-order step.
"""

import math
from dataclasses import dataclass

import torch

from kinema.errors import KinemaError


@dataclass(frozen=True)
class SolverState:
    """What a multistep solver remembers; empty at the first step of a run (so it warms up at first order)."""

    x0s: tuple[torch.Tensor, ...] = ()  # the last x0 predictions, newest last (at most 2)
    last_x: torch.Tensor | None = None  # UniPC: the x its last predictor started from
    last_order: int = 0  # UniPC: the order of that predictor
    seed: int = 0  # LCM: the run's seed, from which each step's fresh noise is drawn


def _lam(sigma: float) -> float:
    if sigma <= 0:
        return math.inf
    if sigma >= 1:
        return -math.inf
    return math.log((1 - sigma) / sigma)


def euler_step(x, v, sigmas, i, state):
    return x + (sigmas[i + 1] - sigmas[i]) * v, state


def step_noise(shape, seed: int, i: int) -> torch.Tensor:
    """The fresh noise a stochastic step `i` adds, float32 on the CPU: one stream per (seed, step), so a seed
    gives the same video on every device and whichever step a run starts at."""
    g = torch.Generator("cpu").manual_seed((seed * 1_000_003 + 7919 * (i + 1)) % (2**63 - 1))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def lcm_step(x, v, sigmas, i, state):
    """LCM on a flow model: the x0 estimate x - sigma v, noised afresh to the next sigma,
    (1 - sigma') x0 + sigma' eps; the last step returns x0. For step-distilled models (distillation LoRAs)."""
    x0 = x - sigmas[i] * v
    t = sigmas[i + 1]
    if t == 0:
        return x0, state
    return (1 - t) * x0 + t * step_noise(x.shape, state.seed, i).to(x.device), state


def _exp_integrator(x, m0, sigma_s, sigma_t):
    """The first-order (DDIM) step from sigma_s to sigma_t given the x0 prediction m0, with e^-h - 1.

    In flow matching this equals the Euler step; the higher-order corrections
    below are added on top of it.
    """
    neg_h_phi_1 = math.expm1(_lam(sigma_s) - _lam(sigma_t))  # e^-h - 1, h = lambda_t - lambda_s
    return (sigma_t / sigma_s) * x - (1 - sigma_t) * neg_h_phi_1 * m0, neg_h_phi_1


def dpmpp_step(x, v, sigmas, i, state):
    """DPM-Solver++ 2M (midpoint); first order at the first step of a run and at the last step."""
    s0, t = sigmas[i], sigmas[i + 1]
    m0 = x - s0 * v
    x_next, neg_h_phi_1 = _exp_integrator(x, m0, s0, t)
    if state.x0s and i + 1 < len(sigmas) - 1:
        m1 = state.x0s[-1]
        r0 = (_lam(s0) - _lam(sigmas[i - 1])) / (_lam(t) - _lam(s0))  # inf when sigmas[i-1] = 1: no correction
        x_next = x_next - 0.5 * (1 - t) * neg_h_phi_1 * (m0 - m1) / r0
    return x_next, SolverState(x0s=(m0,))


def _unipc_update(x, x0s, sigmas, s, t, order, m_new=None, variant="bh2"):
    """UniPC update with B(h) = e^-h - 1 ("bh2", Wan's) or B(h) = -h ("bh1") of x from sigmas[s] to sigmas[t]
    with predict-x0.

    x0s are the x0 predictions at sigmas[s], sigmas[s - 1], ... (newest first).
    Without m_new it is the predictor UniP (order 1 or 2); with m_new, the x0
    prediction at sigmas[t], it is the corrector UniC of the same order.
    """
    sigma_s, sigma_t = sigmas[s], sigmas[t]
    m0 = x0s[0]
    x_t, h_phi_1 = _exp_integrator(x, m0, sigma_s, sigma_t)  # h*phi_1 = e^-h - 1 for predict-x0
    h = _lam(sigma_t) - _lam(sigma_s)
    # B(h); a step from sigma 1 (lambda -inf) has h infinite, where only bh2's bounded B(h) -> -1 makes sense
    bh = h_phi_1 if variant == "bh2" or math.isinf(h) else -h
    if order == 2:
        r = (_lam(sigmas[s - 1]) - _lam(sigma_s)) / h
        d1 = (x0s[1] - m0) / r
    if m_new is None and order == 1:
        return x_t  # the plain first-order step (bh1's B(h) is infinite at sigma 0)
    if m_new is None:
        res = 0.5 * d1
    else:
        dt = m_new - m0
        if order == 1:
            res = 0.5 * dt  # the reference fixes rho = 1/2 here rather than solving for it
        else:
            # rho solves [[1, 1], [r, 1]] rho = b, b_k = k! hh*phi_{k+1}(hh) / B(h), hh = -h (predict-x0)
            hh = -h
            hh_phi_2 = h_phi_1 / hh - 1
            b1 = hh_phi_2 / bh
            b2 = 2 * (hh_phi_2 / hh - 0.5) / bh  # hh*phi_3(hh) = hh*phi_2(hh) / hh - 1/2
            rho0 = (b1 - b2) / (1 - r)
            res = rho0 * d1 + (b1 - rho0) * dt
    return x_t - (1 - sigma_t) * bh * res


def unipc_step(x, v, sigmas, i, state, variant="bh2"):
    """UniPC order 2, bh2: correct the last prediction with the new model output (UniC), then predict (UniP)."""
    m = x - sigmas[i] * v
    if state.x0s:
        x = _unipc_update(state.last_x, state.x0s[::-1], sigmas, i - 1, i, state.last_order, m_new=m, variant=variant)
    # warm up from first order; lower_order_final: first order on the last step
    order = min(2, len(sigmas) - 1 - i, len(state.x0s) + 1)
    x0s = (state.x0s + (m,))[-2:]
    x_next = _unipc_update(x, x0s[::-1], sigmas, i, i + 1, order, variant=variant)
    return x_next, SolverState(x0s=x0s, last_x=x, last_order=order)


def unipc_bh1_step(x, v, sigmas, i, state):
    """UniPC order 2 with B(h) = -h (bh1, ComfyUI's `uni_pc`); otherwise as `unipc_step`."""
    return unipc_step(x, v, sigmas, i, state, variant="bh1")


def kdiffusion_dpmpp_2m_step(x, v, sigmas, i, state):
    """k-diffusion's DPM-Solver++(2M) (ComfyUI's `dpmpp_2m`): the same midpoint rule as `dpmpp_step` but in
    t = -log(sigma), which is what it computes on a flow model; first order at the first and the last step."""
    s0, t = sigmas[i], sigmas[i + 1]
    m0 = x - s0 * v
    if t == 0:
        return m0, SolverState(x0s=(m0,))
    ratio = t / s0  # sigma_fn(t_next) / sigma_fn(t);  -expm1(-h) = 1 - ratio
    d = m0
    if state.x0s:
        r = math.log(sigmas[i - 1] / s0) / math.log(s0 / t)  # h_last / h
        d = (1 + 1 / (2 * r)) * m0 - (1 / (2 * r)) * state.x0s[-1]
    return ratio * x + (1 - ratio) * d, SolverState(x0s=(m0,))


STEPS = {"euler": euler_step, "unipc": unipc_step, "dpm++": dpmpp_step,
         # for step-distilled models (4-8 steps, guidance 1): Euler on the fixed distillation sigmas, and LCM
         "flowmatch_distill": euler_step, "lcm": lcm_step}
SOLVERS = tuple(STEPS)  # what the Pipeline and the command line offer: Wan's three and the distilled two
# ComfyUI's KSampler names whose maths differs from those (kinema/workflow/nodes/comfy.py); the one loop runs them.
STEPS.update({"unipc_bh1": unipc_bh1_step, "dpmpp_2m": kdiffusion_dpmpp_2m_step})


def check_solver(name: str) -> str:
    if name not in STEPS:  # the ComfyUI-only steps too: the loop runs them for the workflow nodes
        raise KinemaError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return name
