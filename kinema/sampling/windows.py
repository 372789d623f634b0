"""Context windows: a video longer than the model takes, denoised as overlapping windows of latent frames.

ComfyUI-WanVideoWrapper's semantics (from AnimateDiff-Evolved), in latent frames: the user's pixel
values convert as frames (F - 1) // 4 + 1, stride // 4, overlap // 4. On every step each window's
frames go through the guided model on their own and the predictions are blended per frame, each
weighted by the window's mask and normalised by the sum of the masks.

Schedules: `static_standard` (the same windows every step: start 0, then every frames - overlap,
the last one moved back to end at the video's end); `uniform_standard` (per step offsets from the
bit-reversed "ordered halving" of the step index, windows at strides 1, 2, 4, ... up to
context_stride, windows that run past the end shifted back, duplicates dropped); `uniform_looped`
(the same, wrapping around the end: for loops). Fuse methods: `linear` (ramps 0 -> 1 over the
overlap on the sides that have a neighbour), `pyramid` (1, 2, ... peaking mid-window), `flat`.
FreeNoise: the frames after each static window (every frames - overlap) start from a shuffle of
that window's first frames' noise, so the windows start from correlated noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kinema.errors import Cancelled, KinemaError

SCHEDULES = ("uniform_standard", "uniform_looped", "static_standard")
FUSE = ("linear", "pyramid", "flat")
ROPE = ("relative", "absolute")


@dataclass(frozen=True)
class ContextWindows:
    """Window settings in pixel frames, as the wrapper's WanVideoContextOptions takes them."""

    frames: int = 81
    stride: int = 4
    overlap: int = 16
    schedule: str = "uniform_standard"
    fuse: str = "linear"
    freenoise: bool = True  # FreeNoise initial noise, on by default as in the wrapper's node (docs/long_video.md:
    # without it each window drew its own colour for the object on the built-in model; --no_freenoise)
    rope: str = "relative"  # window positions from 0 (the wrapper's), or absolute (where the window sits)

    def __post_init__(self):
        for name in ("frames", "stride", "overlap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise KinemaError(f"context {name} {v!r} must be a whole number of pixel frames.")
        if self.frames < 5 or (self.frames - 1) % 4:
            raise KinemaError(f"context frames {self.frames} must be 4n + 1 and at least 5 (e.g. 81, or 17 for the "
                              "built-in model).")
        if self.stride < 4:
            raise KinemaError(f"context stride {self.stride} must be at least 4 pixel frames (1 latent frame).")
        if self.overlap < 4 or self.overlap // 4 >= self.latent_frames:
            raise KinemaError(f"context overlap {self.overlap} must be at least 4 pixel frames and under the window's "
                              f"{self.frames} frames.")
        for name, allowed in (("schedule", SCHEDULES), ("fuse", FUSE), ("rope", ROPE)):
            if getattr(self, name) not in allowed:
                raise KinemaError(f"context {name} {getattr(self, name)!r} is not one of {', '.join(allowed)}.")

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1

    def latent(self) -> tuple[int, int, int]:
        """(frames, stride, overlap) in latent frames."""
        return self.latent_frames, self.stride // 4, self.overlap // 4

    def describe(self) -> str:
        return (f"{self.frames} frames, stride {self.stride}, overlap {self.overlap}, {self.schedule}, {self.fuse}"
                + (", FreeNoise" if self.freenoise else "") + (", absolute RoPE" if self.rope == "absolute" else ""))


# -- schedules (latent frames) -------------------------------------------------------------------------
def ordered_halving(step: int) -> float:
    """The step index's 64 bits reversed, as a fraction of 2^64: 0, 1/2, 1/4, 3/4, 1/8, ..."""
    return int(f"{step:064b}"[::-1], 2) / (1 << 64)


def _uniform(step: int, total: int, size: int, stride: int, overlap: int, closed_loop: bool = True) -> list[list[int]]:
    out = []
    stride = min(stride, math.ceil(math.log2(total / size)) + 1)
    for context_step in (1 << s for s in range(stride)):
        pad = int(round(total * ordered_halving(step)))
        for j in range(int(ordered_halving(step) * context_step) + pad,
                       total + pad + (0 if closed_loop else -overlap), size * context_step - overlap):
            out.append([e % total for e in range(j, j + size * context_step, context_step)])
    return out


def _rolls_over(window: list[int], total: int) -> int | None:
    prev = -1
    for i, v in enumerate(window):
        v %= total
        if v < prev:
            return i
        prev = v
    return None


def windows_for(schedule: str, step: int, total: int, size: int, stride: int, overlap: int) -> list[list[int]]:
    """The windows (lists of latent frame indices) of one step."""
    if total <= size:
        return [list(range(total))]
    if schedule == "static_standard":
        out, delta = [], size - overlap
        for start in range(0, total, delta):
            if start + size >= total:
                out.append(list(range(total - size, total)))
                break
            out.append(list(range(start, start + size)))
        return out
    windows = _uniform(step, total, size, stride, overlap)
    if schedule == "uniform_looped":
        return windows
    i = 0
    keep = []
    while i < len(windows):
        roll = _rolls_over(windows[i], total)
        if roll is not None:
            value = windows[i][roll]
            start = windows[i][0]
            shifted = [((v - start) + total) % total for v in windows[i]]
            windows[i] = [v + total - shifted[-1] - 1 for v in shifted]  # slid to end at the last frame
            if value not in windows[(i + 1) % len(windows)]:
                windows.insert(i + 1, list(range(value, value + size)))
        if windows[i] not in keep:
            keep.append(windows[i])
        i += 1
    return keep


def window_weights(window: list[int], total: int, overlap: int, fuse: str, looped: bool = False) -> torch.Tensor:
    """The blend weight of each of the window's frames [len(window)] float32 (never exactly 0, so a frame
    only one window reaches at its ramp's foot still counts)."""
    n = len(window)
    if fuse == "flat":
        w = torch.ones(n)
    elif fuse == "pyramid":
        w = torch.tensor([min(i + 1, n - i) for i in range(n)], dtype=torch.float32)
    else:
        w = torch.ones(n)
        k = min(overlap, n)
        if min(window) > 0 or (looped and max(window) == total - 1):
            w[:k] = torch.linspace(0, 1, k)
        if max(window) < total - 1 or (looped and min(window) == 0):
            w[n - k:] = torch.minimum(w[n - k:], torch.linspace(1, 0, k))
    return w.clamp_min(1e-4)


def freenoise(noise: torch.Tensor, size: int, overlap: int, generator: torch.Generator) -> torch.Tensor:
    """FreeNoise on [B, C, T, h, w] (a copy): after each window [s, s + size), the next size - overlap frames
    take the noise of frames s, s + 1, ... in a random order."""
    noise = noise.clone()
    total, delta = noise.shape[2], size - overlap
    for start in range(0, total - size, delta):
        place = start + size
        if place >= total:
            break
        count = min(delta, total - place)
        idx = torch.arange(start, start + count)[torch.randperm(count, generator=generator)]
        noise[:, :, place:place + count] = noise[:, :, idx]
        if place + delta >= total:
            break
    return noise


def travel_section(window, total: int, sections: int) -> int:
    """Prompt travel: the section (of `sections` equal spans of the `total` latent frames) a window's last frame
    falls in, as the wrapper spreads '|' prompts."""
    return min(int(max(window) / (total / sections)), sections - 1)


def unused_sections(spec: ContextWindows, total: int, sections: int, steps: int) -> list[int]:
    """The prompt-travel sections no window of any of `steps` steps takes: more sections than the clip has
    windows to give them (each window takes one section, by its last frame)."""
    size, stride, overlap = spec.latent()
    used = {travel_section(w, total, sections) for step in range(max(steps, 1))
            for w in windows_for(spec.schedule, step, total, size, stride, overlap)}
    return [k for k in range(sections) if k not in used]


def travel_warning(spec: ContextWindows, total: int, sections, steps: int, name: str = "prompt") -> str | None:
    """What to warn of when some of the prompt-travel `sections` (their texts) go to no window, else None."""
    unused = unused_sections(spec, total, len(sections), steps) if len(sections) > 1 else []
    if not unused:
        return None
    texts = ", ".join(repr(sections[k]) for k in unused)
    return (f"{name}: {len(unused)} of its {len(sections)} '|' sections fall on no window's last frame and are not "
            f"used ({texts}): {4 * (total - 1) + 1} frames in {spec.frames}-frame windows give fewer windows than "
            "sections; write fewer sections or a longer clip.")


def windowed(model_fns, spec: ContextWindows, total: int, cancel=None):
    """model_fn(x, t, step) over context windows of `total` latent frames. `model_fns`: one model function, or
    one per prompt (prompt travel: a window takes the prompt of the section its last frame falls in); each is
    called on a window's frames with `step.window` set to their indices. `cancel` (a threading.Event) is also
    checked between windows: a long video's step is many DiT calls, and a stop should not wait for all of them."""
    fns = list(model_fns) if isinstance(model_fns, (list, tuple)) else [model_fns]
    size, stride, overlap = spec.latent()
    looped = spec.schedule == "uniform_looped"

    def fn(x: torch.Tensor, t: torch.Tensor, step) -> torch.Tensor:
        out = torch.zeros_like(x, dtype=torch.float32)
        count = torch.zeros(total, dtype=torch.float32, device=x.device)
        windows = windows_for(spec.schedule, step.step, total, size, stride, overlap)
        for i, window in enumerate(windows):
            if i and cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled in step {step.step + 1} of {step.steps}, before window {i + 1} of "
                                f"{len(windows)}")
            prompt = travel_section(window, total, len(fns))
            idx = torch.tensor(window, device=x.device)
            offset = window[0] if spec.rope == "absolute" else 0  # a looped window's positions run on past the end
            v = fns[prompt](x[:, :, idx], t, replace(step, window=tuple(window), frame_offset=offset)).float()
            w = window_weights(window, total, overlap, spec.fuse, looped).to(x.device)
            out.index_add_(2, idx, v * w[None, None, :, None, None])
            count.index_add_(0, idx, w)
        return out / count[None, None, :, None, None]

    return fn
