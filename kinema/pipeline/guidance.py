"""Classifier-free guidance as a strategy: how the cond and uncond predictions of one step are computed.

v = v_uncond + g * (v_cond - v_uncond), the official formula in its official order of
operations. Strategies differ only in how the two passes run: one after the other
(`sequential`, the default and the official way), as one batch of two (`batched`:
the same numbers within float rounding, twice the activation memory, one weight
read), and later on two rank groups. Without guidance (g = 1) only the cond pass runs.
Each DiT call gets a step context naming the branch of every batch row, so the block
hooks keep per-branch state.
"""

from __future__ import annotations

import torch

from kinema.sampling.context import StepContext


class Guidance:
    """Runs the guidance passes of one step. `run(x, t, args, step)` is one DiT call."""

    name = "none"

    def __call__(self, run, x, t, cond: dict, uncond: dict | None, scale: float, step: StepContext) -> torch.Tensor:
        return run(x, t, cond, step.with_branches("cond"))


class Sequential(Guidance):
    name = "sequential"

    def __call__(self, run, x, t, cond, uncond, scale, step):
        if uncond is None:
            return super().__call__(run, x, t, cond, uncond, scale, step)
        v_cond = run(x, t, cond, step.with_branches("cond"))
        v_uncond = run(x, t, uncond, step.with_branches("uncond"))
        return v_uncond + scale * (v_cond - v_uncond)


class Batched(Guidance):
    name = "batched"

    def __call__(self, run, x, t, cond, uncond, scale, step):
        if uncond is None:
            return super().__call__(run, x, t, cond, uncond, scale, step)
        both = {k: None if v is None else torch.cat([v, uncond[k]]) for k, v in cond.items()}
        v_cond, v_uncond = run(torch.cat([x, x]), torch.cat([t, t]), both, step.with_branches("cond", "uncond")).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)


STRATEGIES = {"sequential": Sequential(), "batched": Batched()}


def guidance_for(batched: bool) -> Guidance:
    """The strategy for `batched_cfg`."""
    return STRATEGIES["batched" if batched else "sequential"]


def guided_model(dit, cond: dict, uncond: dict | None, scale: float, guidance: Guidance, hooks=(),
                 attention: str = "sdpa"):
    """model_fn(x, t, step) for the sampler: the DiT under `guidance`, with `hooks` around its blocks and its
    attention on `attention`. cond / uncond: the DiT's keyword inputs of each branch (context, clip_fea, y);
    uncond None: unguided."""

    def run(x, t, args, step):
        return dit(x, t, **args, hooks=hooks, step=step, attention=attention)

    def model_fn(x: torch.Tensor, t: torch.Tensor, step: StepContext) -> torch.Tensor:
        return guidance(run, x, t, cond, uncond, scale, step)

    return model_fn
