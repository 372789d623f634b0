"""Skip-layer guidance (SLG): chosen DiT blocks skipped in one guidance pass, within a range of the steps.

Two forms. `uncond` (ComfyUI-WanVideoWrapper's WanVideoSLG, the default): the uncond pass runs
without the chosen blocks, so classifier-free guidance pushes away from a degraded prediction;
it needs guidance (guide_scale != 1). `sd3` (Stable Diffusion 3.5's form): one more pass, the
cond inputs without the chosen blocks, and v += scale * (v_cond - v_cond_skipped) on top of
the guided prediction. A skipped block passes its input through unchanged (the residual
stream skips it). The steps are chosen by progress = step / steps in [start, end], the
wrapper's start / end percents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kinema.errors import KinemaError
from kinema.models.hooks import BlockHook

SKIP_BRANCH = "skip"  # the branch name of the sd3 form's extra pass (a StepContext branch, a cache stream)
MODES = ("uncond", "sd3")


@dataclass(frozen=True)
class SkipLayers:
    """Which blocks to skip, when, and how (see the module doc). Defaults: the wrapper's (block 10, 10%-100%)."""

    blocks: tuple[int, ...] = (10,)
    start: float = 0.1
    end: float = 1.0
    mode: str = "uncond"
    scale: float = 3.0  # the sd3 form's weight of (v_cond - v_cond_skipped); unused in the uncond form

    def __post_init__(self):
        if not isinstance(self.blocks, tuple):  # "9,10", [9, 10], 10
            object.__setattr__(self, "blocks", parse_blocks(self.blocks))
        if not self.blocks or any(not isinstance(b, int) or isinstance(b, bool) or b < 0 for b in self.blocks):
            raise KinemaError(f"skip-layer blocks {self.blocks!r} must be block indices >= 0, e.g. (9, 10).")
        if self.mode not in MODES:
            raise KinemaError(f"skip-layer mode {self.mode!r} is not one of {', '.join(MODES)}.")
        check_range(self.start, self.end, "skip-layer")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise KinemaError(f"skip-layer scale {self.scale!r} is not a number (SD3.5 uses 2.8-3.0).")

    @property
    def branch(self) -> str:
        """The guidance branch whose pass skips the blocks."""
        return "uncond" if self.mode == "uncond" else SKIP_BRANCH

    def describe(self) -> str:
        extra = f", scale {self.scale:g}" if self.mode == "sd3" else ""
        return f"blocks {','.join(map(str, self.blocks))}, {self.start:g}-{self.end:g}, {self.mode}{extra}"


def check_range(start: float, end: float, what: str) -> None:
    """A start / end pair of fractions of the schedule, 0 <= start <= end <= 1."""
    for v in (start, end):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise KinemaError(f"{what} start / end {v!r} is not a number; use fractions of the steps, e.g. 0.1 and 1.0.")
    if not 0 <= start <= end <= 1:
        raise KinemaError(f"{what} range {start:g}..{end:g} must satisfy 0 <= start <= end <= 1 (fractions of the "
                          "steps).")


def parse_blocks(text, name: str = "skip-layer blocks") -> tuple[int, ...]:
    """"9,10" / "9, 10" / [9, 10] / 10 -> (9, 10)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return (text,)
    if isinstance(text, (list, tuple)):
        items = list(text)
    elif isinstance(text, str):
        items = [p.strip() for p in text.split(",") if p.strip()]
    else:
        raise KinemaError(f"{name} {text!r} is not a list of block indices like '9,10'.")
    try:
        blocks = tuple(int(p) for p in items)
    except (TypeError, ValueError):
        raise KinemaError(f"{name} {text!r} is not a list of block indices like '9,10'.") from None
    if not blocks:
        raise KinemaError(f"{name} {text!r} names no block; give indices like '9,10'.")
    return blocks


class SkipLayersHook(BlockHook):
    """The block hook: inside the step cache (it sees the rows the cache runs), outside nothing else."""

    order = 50

    def __init__(self, spec: SkipLayers, num_blocks: int):
        wrong = [b for b in spec.blocks if b >= num_blocks]
        if wrong:
            raise KinemaError(f"skip-layer blocks {','.join(map(str, wrong))} do not exist: this DiT has {num_blocks} "
                              f"blocks (0-{num_blocks - 1}).")
        self.spec = spec
        self.blocks = frozenset(spec.blocks)

    def around_block(self, index, run, tokens, inputs, step):
        if step is None or index not in self.blocks or not step.active(self.spec.start, self.spec.end):
            return run(tokens, inputs, step)
        skip = [b == self.spec.branch for b in step.branches]
        if not any(skip):
            return run(tokens, inputs, step)
        if all(skip):
            return tokens  # the block left out: its input goes on unchanged
        keep = [i for i, s in enumerate(skip) if not s]
        idx = torch.tensor(keep, device=tokens.device)
        out = tokens.clone()
        out[idx] = run(tokens[idx], inputs.rows(idx), step.rows(keep))
        return out
