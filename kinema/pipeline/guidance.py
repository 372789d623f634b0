"""Classifier-free guidance: how the branch predictions of one step are computed, and how they combine.

v = v_uncond + g * (v_cond - v_uncond), the official formula in its official order of
operations. A strategy decides only how the branch passes run: one after the other
(`sequential`, the default and the official way), or as one batch (`batched`: the same
numbers within float rounding, a wider activation per branch, one weight read), and later
on rank groups. Without guidance (g = 1) only the cond pass runs.

The branches of a step: "cond", "uncond" when guided, and "skip" (the cond inputs with blocks
skipped) while the SD3 form of skip-layer guidance is active. The combination takes the
guidance extras: CFG-Zero* (an optimised scale on the uncond prediction, and zero-init of the
first steps: the model is not called) and the SD3 skip-layer term scale * (v_cond - v_skip).
Each DiT call gets a step context naming the branch of every batch row, so the block hooks
(step cache, skip-layer guidance) keep per-branch state.
"""

from __future__ import annotations

import torch

from kinema.pipeline.conditioning import window_args
from kinema.sampling.cfg_zero import CFGZeroStar, cfg_zero_star
from kinema.sampling.context import StepContext
from kinema.sampling.skip_layers import SKIP_BRANCH, SkipLayers


class Guidance:
    """Runs the branch passes of one step: `predict(run, x, t, branches, step)` -> {branch: v}, where
    `branches` maps each branch name to the DiT's keyword inputs and `run(x, t, args, step)` is one DiT call."""

    name = "sequential"

    def predict(self, run, x, t, branches: dict[str, dict], step: StepContext) -> dict[str, torch.Tensor]:
        return {name: run(x, t, args, step.with_branches(name)) for name, args in branches.items()}


class Sequential(Guidance):
    name = "sequential"


class Batched(Guidance):
    name = "batched"

    def predict(self, run, x, t, branches, step):
        if len(branches) == 1:
            return super().predict(run, x, t, branches, step)
        names, args = list(branches), list(branches.values())
        n = len(names)
        both = {k: None if args[0][k] is None else torch.cat([a[k] for a in args]) for k in args[0]}
        out = run(torch.cat([x] * n), torch.cat([t] * n), both, step.with_branches(*names)).chunk(n)
        return dict(zip(names, out))


STRATEGIES = {"sequential": Sequential(), "batched": Batched()}


def guidance_for(batched: bool) -> Guidance:
    """The strategy for `batched_cfg`."""
    return STRATEGIES["batched" if batched else "sequential"]


def combine(v: dict[str, torch.Tensor], scale: float, zero_star: CFGZeroStar | None = None,
            skip_layers: SkipLayers | None = None) -> torch.Tensor:
    """The step's prediction from its branch predictions (see the module doc)."""
    out = v["cond"]
    if "uncond" in v:
        u = v["uncond"]
        out = cfg_zero_star(out, u, scale) if zero_star is not None else u + scale * (out - u)
    if SKIP_BRANCH in v:
        out = out + skip_layers.scale * (v["cond"] - v[SKIP_BRANCH])
    return out


def guided_model(dit, cond: dict, uncond: dict | None, scale: float, guidance: Guidance, hooks=(),
                 attention: str = "sdpa", zero_star: CFGZeroStar | None = None, skip_layers: SkipLayers | None = None,
                 anchors: torch.Tensor | None = None):
    """model_fn(x, t, step) for the sampler: the DiT under `guidance`, with `hooks` around its blocks and its
    attention on `attention`. cond / uncond: the DiT's keyword inputs of each branch (context, clip_fea, y);
    uncond None: unguided. zero_star: CFG-Zero*, or None; skip_layers: the SLG spec when its SD3 form adds a
    branch (its blocks are skipped by its hook, which `hooks` must hold), else None. anchors: reference latents
    for context windows' first frames (kinema.pipeline.conditioning.window_args), or None."""
    sd3 = skip_layers if skip_layers is not None and skip_layers.mode == "sd3" else None

    def run(x, t, args, step):
        if step.window is not None:
            args = window_args(args, step.window, anchors)
        return dit(x, t, **args, hooks=hooks, step=step, attention=attention)

    def model_fn(x: torch.Tensor, t: torch.Tensor, step: StepContext) -> torch.Tensor:
        if zero_star is not None and step.step < zero_star.zero_init_steps:
            return torch.zeros_like(x, dtype=torch.float32)  # CFG-Zero*'s zero-init: the model is not called
        branches = {"cond": cond}
        if uncond is not None:
            branches["uncond"] = uncond
        if sd3 is not None and step.active(sd3.start, sd3.end):
            branches[SKIP_BRANCH] = cond
        return combine(guidance.predict(run, x, t, branches, step), scale, zero_star, sd3)

    return model_fn
