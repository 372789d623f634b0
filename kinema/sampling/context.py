"""The step context: where in sampling a model call happens, handed to the model function and the block hooks.

One record per DiT call instead of loose arguments, so that a hook (step caching,
skip-layer guidance) or a guidance strategy can ask "which step, which noise level,
which guidance branch, which frame window, which rank" without the sampler knowing
about any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class StepContext:
    step: int  # 0-based index into the schedule (a part-way run starts above 0)
    steps: int  # length of the whole schedule
    sigma: float  # noise level of the latent the model sees
    timestep: int  # the integer timestep passed to the model (official truncation of sigma * 1000)
    branches: tuple[str, ...] = ("cond",)  # guidance branch of each batch row: "cond", "uncond"
    window: tuple[int, ...] | None = None  # the latent frame indices of a context window; None: the whole video
    frame_offset: int = 0  # the RoPE position of the call's first latent frame (a window's, with absolute positions)
    rank: int = 0  # this process's rank, and how many take part (sequence / CFG parallel)
    world_size: int = 1

    @property
    def branch(self) -> str:
        """The one branch of a single-branch call."""
        if len(self.branches) != 1:
            raise ValueError(f"this call runs branches {self.branches}; read `branches`")
        return self.branches[0]

    @property
    def progress(self) -> float:
        """How far through the schedule this step is, in [0, 1): the unit of start / end percents."""
        return self.step / self.steps

    def with_branches(self, *branches: str) -> StepContext:
        return replace(self, branches=branches)

    def rows(self, rows) -> StepContext:
        """The context of the batch rows `rows` (indices) of this call."""
        return replace(self, branches=tuple(self.branches[i] for i in rows))

    def active(self, start: float, end: float) -> bool:
        """Is this step within [start, end] of the schedule (fractions, the wrappers' start / end percents)?"""
        return start <= self.progress <= end
