"""Enhance-A-Video as a sampling option: the FETA gain (kinema/ops/feta.py) on every block's self-attention,
within a range of the steps (ComfyUI-WanVideoWrapper's WanVideoEnhanceAVideo: weight 2.0, 0%-100%)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kinema.errors import KinemaError
from kinema.models.hooks import BlockHook
from kinema.ops.feta import Enhance
from kinema.sampling.skip_layers import check_range


@dataclass(frozen=True)
class EnhanceVideo:
    weight: float = 2.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight >= 0:
            raise KinemaError(f"Enhance-A-Video weight {self.weight!r} must be a number >= 0 (the wrapper's default "
                              "is 2.0).")
        check_range(self.start, self.end, "Enhance-A-Video")

    def describe(self) -> str:
        return f"weight {self.weight:g}, {self.start:g}-{self.end:g}"


class EnhanceHook(BlockHook):
    """Sets the self-attentions' Enhance for the steps in range. Outside the step cache (order 60 < 100), so a
    computed step runs with it and a cached one reuses a residual that had it."""

    order = 60

    def __init__(self, spec: EnhanceVideo):
        self.spec = spec

    def around_blocks(self, run, tokens, inputs, step):
        if step is None or not step.active(self.spec.start, self.spec.end):
            return run(tokens, inputs, step)
        return run(tokens, replace(inputs, enhance=Enhance(inputs.grid[0], float(self.spec.weight))), step)
