"""Resolving a request into the settings a run uses: one place for defaults, rounding and checks.

A value left unset takes the model's own default (Kinema-trained checkpoints carry
them), else the task's official one. Sizes round to multiples of 16 and frame counts
to 4n + 1, with a warning; i2v / flf2v keep the first image's aspect ratio at about the
requested area (the official rule). Every value a user can get wrong is checked here,
before any model runs, with one KinemaError naming the value and the fix.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from dataclasses import dataclass

from kinema.errors import KinemaError
from kinema.pipeline.conditioning import target_size
from kinema.pipeline.tasks import Task, get_task
from kinema.sampling import SOLVERS, start_step_for_denoise

log = logging.getLogger("kinema")

MIN_SIDE = 16  # pixels: one latent patch (VAE stride 8 x patch 2)
MAX_SIDE = 8192  # pixels: beyond any Wan2.1 model's training (1280x720) many times over; larger is a typo
MAX_FRAMES = 1025  # 4n + 1; longer videos need context windows, not one pass
MAX_STEPS = 1000  # the model's timestep grid


@dataclass(frozen=True)
class Geometry:
    """What the models fix about the latent grid: VAE strides and the DiT's patch size."""

    spatial: int = 8  # pixels per latent pixel
    temporal: int = 4  # pixel frames per latent frame (after the first)
    patch: tuple[int, int, int] = (1, 2, 2)
    z_dim: int = 16


@dataclass(frozen=True)
class Settings:
    """Every value one run uses, resolved and checked."""

    task: Task
    prompt: str
    negative_prompt: str
    width: int
    height: int
    frame_num: int
    steps: int
    shift: float
    guide_scale: float
    seed: int
    solver: str
    denoise: float = 1.0  # the share of the schedule re-run when starting from a video or latents

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs (a negative prompt and a second DiT pass)."""
        return self.guide_scale != 1.0

    @property
    def size(self) -> str:
        return f"{self.width}*{self.height}"

    def latent_shape(self, g: Geometry) -> tuple[int, int, int, int]:
        """[z, T, h, w] of the run's latents."""
        return g.z_dim, (self.frame_num - 1) // g.temporal + 1, self.height // g.spatial, self.width // g.spatial

    def start_step(self, partway: bool) -> int:
        """First step run: 0 from pure noise, else the step `denoise` of the trajectory starts at."""
        return start_step_for_denoise(self.steps, self.denoise) if partway else 0

    def record(self, partway: bool = False) -> dict:
        """The settings as stored in a file's metadata (and read back by `kinema generate --from`)."""
        return dict(task=self.task.name, prompt=self.prompt, negative_prompt=self.negative_prompt, width=self.width,
                    height=self.height, size=self.size, frame_num=self.frame_num, steps=self.steps, shift=self.shift,
                    guide_scale=self.guide_scale, seed=self.seed, solver=self.solver,
                    denoise=self.denoise if partway and self.start_step(True) else 1.0)


def parse_size(size, name: str = "size") -> tuple[int, int]:
    """"W*H" (or "WxH") or a (W, H) pair -> (width, height), within MIN_SIDE..MAX_SIDE pixels."""
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+)\s*[x*X]\s*(\d+)\s*", size)
        if m is None:
            raise KinemaError(f"{name} {size!r} is not W*H (e.g. 832*480).")
        w, h = int(m[1]), int(m[2])
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(v) for v in size):
        w, h = int(size[0]), int(size[1])
    else:
        raise KinemaError(f"{name} {size!r} is not a 'W*H' string or a (width, height) pair of whole numbers.")
    if w < MIN_SIDE or h < MIN_SIDE:
        raise KinemaError(f"{name} {w}*{h} is too small; width and height must be at least {MIN_SIDE}.")
    if w > MAX_SIDE or h > MAX_SIDE:
        raise KinemaError(f"{name} {w}*{h} is too large: at most {MAX_SIDE} pixels a side (Wan2.1 is trained at "
                          "832*480 and 1280*720); generate smaller and upscale.")
    return w, h


def round_frames(frame_num: int) -> int:
    """The nearest valid frame count 4n + 1 (at least 1), warning when it changes."""
    fixed = max(1, 4 * round((frame_num - 1) / 4) + 1)
    if fixed != frame_num:
        log.warning("frame count %d is not 4n+1; using %d", frame_num, fixed)
    return fixed


def round_size(width: int, height: int, multiple: int = 16) -> tuple[int, int]:
    """Width and height rounded to multiples of 16 (VAE stride x patch), warning when they change."""
    w, h = (max(multiple, multiple * round(v / multiple)) for v in (width, height))
    if (w, h) != (width, height):
        log.warning("size %dx%d is not a multiple of %d; using %dx%d", width, height, multiple, w, h)
    return w, h


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(value, name: str, fix: str, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise KinemaError(f"{name} {value!r} is not a finite number; {fix}.")
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        raise KinemaError(f"{name} {value!r} is out of range; {fix}.")
    return float(value)


def _whole(value, name: str, fix: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= int(value) <= high:
        raise KinemaError(f"{name} {value!r} must be a whole number from {low} to {high}; {fix}.")
    return int(value)


def resolve_settings(task, defaults: dict, *, prompt, negative_prompt=None, size=None, frame_num=None, steps=None,
                     shift=None, guide_scale=None, seed=0, solver=None, denoise=1.0, image_size=None,
                     video_frames: int | None = None, geometry: Geometry = Geometry(), names=None) -> Settings:
    """The settings of one run. `defaults`: the model's own sampling defaults (kinema.loading.dit.ModelInfo).
    `image_size`: (height, width) of the first known frame (i2v / flf2v: the output takes its aspect).
    `video_frames`: frames of a v2v source video (the default frame count: the whole video, as 4n + 1).
    `names`: how messages name each argument (the command line passes its flags)."""
    task = task if isinstance(task, Task) else get_task(task)
    n = (names or {}).get
    if not isinstance(prompt, str):
        raise KinemaError(f"{n('prompt', 'prompt')} must be a string, got {type(prompt).__name__}; say what to generate.")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise KinemaError(f"{n('negative_prompt', 'negative_prompt')} must be a string or None, got "
                          f"{type(negative_prompt).__name__}.")
    asked = size if size is not None else defaults.get("size", task.size)
    width, height = round_size(*parse_size(asked, n("size", "size")))
    frames = _frames(task, defaults, frame_num, video_frames, n("frame_num", "frame_num"))
    steps = defaults.get("steps", task.steps) if steps is None else _whole(
        steps, n("steps", "steps"), "e.g. 50 (the official default)", 1, MAX_STEPS)
    if shift is None:
        shift = defaults.get("shift", task.default_shift(f"{width}*{height}"))
    shift = _number(shift, n("shift", "shift"), "use a positive number (Wan uses 1 to 16)", 0, None, low_open=True)
    if guide_scale is None:
        guide_scale = defaults.get("guide_scale", task.guide_scale)
    guide_scale = _number(guide_scale, n("guide_scale", "guide_scale"), "use e.g. 5.0 (1 turns guidance off)", 0, 100)
    if negative_prompt is None:
        negative_prompt = defaults.get("negative_prompt", task.negative_prompt)
    seed = _seed(seed, n("seed", "seed"))
    if solver is None:
        solver = defaults.get("solver", "unipc")
    if solver not in SOLVERS:
        raise KinemaError(f"unknown {n('solver', 'solver')} {solver!r}; choose one of {', '.join(SOLVERS)}.")
    denoise = _number(denoise, n("denoise", "denoise"), "use a strength in (0, 1] (1 = ignore the input video)", 0, 1,
                      low_open=True)
    if image_size is not None and task.images:
        g = geometry
        height, width = target_size(image_size[0], image_size[1], width * height, g.spatial, g.patch[1])
        if height < g.spatial * g.patch[1] or width < g.spatial * g.patch[2]:
            raise KinemaError(f"the image's aspect ratio ({image_size[1]}x{image_size[0]}) is too extreme for size "
                              f"{asked}; crop it or ask for a larger size.")
    return Settings(task, prompt, negative_prompt, width, height, frames, int(steps), shift, guide_scale, seed, solver,
                    denoise)


def _seed(seed, name: str) -> int:
    """A whole number >= 0; -1 (or None) picks one at random, as the official script does."""
    if seed is None or (_is_int(seed) and int(seed) == -1):
        import random

        return random.randint(0, 2**31 - 1)
    return _whole(seed, name, "use a whole number >= 0, or -1 for a random one", 0, 2**63 - 1)


def _frames(task: Task, defaults: dict, frame_num, video_frames: int | None, name: str) -> int:
    if task.frames is not None:
        return task.frames
    if frame_num is not None:
        frame_num = _whole(frame_num, name, "use 4n+1 frames: 1, 5, ..., 81", 1, MAX_FRAMES)
    elif video_frames is not None:
        frame_num = 1 + (video_frames - 1) // 4 * 4  # the whole source video, as 4n + 1
    else:
        frame_num = defaults.get("frame_num", task.frame_num)
    frames = round_frames(frame_num)
    if video_frames is not None and frames > video_frames:
        raise KinemaError(f"{name} {frames} is more than the {video_frames} frames of the input video; "
                          f"use at most {1 + (video_frames - 1) // 4 * 4}.")
    if len(task.images) > 1 and frames < 5:
        raise KinemaError(f"task {task.name} needs at least 5 frames for its first and last frame; {name} is {frames}.")
    return frames
