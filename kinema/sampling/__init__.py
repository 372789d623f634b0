"""Flow-matching sampling: schedules, solver steps, the one loop with its step context and callbacks, step caching."""

from kinema.sampling.loop import sample
from kinema.sampling.schedule import add_noise, initial_noise, schedule, shift_sigmas, start_step_for_denoise
from kinema.sampling.solvers import SOLVERS, WAN_SOLVERS

__all__ = ["SOLVERS", "WAN_SOLVERS", "add_noise", "initial_noise", "sample", "schedule", "shift_sigmas", "start_step_for_denoise"]
