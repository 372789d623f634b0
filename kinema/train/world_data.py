"""Batches from the synthetic world (kinema.toy.world) for the trainers, deterministic per step."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from kinema.toy import world

# Below this many clips, rendering in worker processes costs more than it saves.
PARALLEL_MIN_CLIPS = 64


def random_rgb_spec(rng: np.random.Generator, width: int, height: int) -> world.ClipSpec:
    """A world clip with arbitrary object and background colours (teaches a VAE colours in general)."""
    fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(fg.astype(int) - bg).sum() < 90:
        fg = rng.integers(0, 256, 3)
    spec = world.random_spec(rng, width, height)
    hexes = ["#" + "".join(f"{int(v):02x}" for v in c) for c in (fg, bg)]
    return world.ClipSpec(hexes[0], spec.shape, spec.direction, hexes[1], spec.size, spec.travel, spec.start)


def _render(seed: int, index: int, width: int, height: int, frames: int, colors, random_colors: float, crop: int,
            slow: float = 0.0):
    """Clip `index` of the world `seed` as uint8 [F, H, W, 3] (or crop x crop) and its spec. `slow`: the share of
    clips whose object travels a uniform random fraction of its distance (0: it stands still)."""
    rng = world.clip_rng(seed, index)
    spec = (random_rgb_spec(rng, width, height) if rng.random() < random_colors
            else world.random_spec(rng, width, height, colors=colors))
    if slow and rng.random() < slow:  # no draw without it: the clips of runs that do not ask stay as they were
        spec = replace(spec, travel=spec.travel * float(rng.uniform(0.0, 1.0)))
    clip = world.render(spec, width, height, frames)
    if crop:
        y, x = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
        clip = clip[:, y : y + crop, x : x + crop]
    return clip, spec


def _render_many(args):
    seed, indices, *rest = args
    return [_render(seed, i, *rest) for i in indices]


def default_workers() -> int:
    """Processes to render in: one per core on machines with more than 2 (a GPU host), else 1."""
    cores = os.cpu_count() or 1
    return cores if cores > 2 else 1


def render_clips(seed: int, indices, width: int, height: int, frames: int, colors=tuple(world.COLORS),
                 random_colors: float = 0.0, crop: int = 0, workers: int = 0, slow: float = 0.0):
    """Clips `indices` of the world `seed`: (uint8 [N, F, H, W, 3], specs). `workers` > 1 renders in that many
    processes (0 = default_workers()), for enough clips to pay for them; the clips are the same either way.
    `slow`: the share of clips with a slower (or still) object (`_render`)."""
    indices = [int(i) for i in indices]
    workers = workers or default_workers()
    rest = (width, height, frames, tuple(colors), random_colors, crop, slow)
    if workers <= 1 or len(indices) < PARALLEL_MIN_CLIPS:
        parts = _render_many((seed, indices, *rest))
    else:
        import concurrent.futures
        import multiprocessing

        jobs = [(seed, part.tolist(), *rest) for part in np.array_split(np.array(indices), 4 * workers) if len(part)]
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            parts = [c for chunk in ex.map(_render_many, jobs) for c in chunk]
    return np.stack([c for c, _ in parts]), [s for _, s in parts]


def clip_batch(seed: int, step: int, batch_size: int, width: int, height: int, frames: int,
               colors=tuple(world.COLORS), random_colors: float = 0.0, crop: int = 0, slow: float = 0.0):
    """[B, 3, F, H, W] in [-1, 1] (or crop x crop) and the B specs, for training step `step`."""
    clips, specs = render_clips(seed, range(step * batch_size, (step + 1) * batch_size), width, height, frames, colors,
                                random_colors, crop, workers=1, slow=slow)
    return torch.stack([world.to_tensor(c) for c in clips]), specs


class ClipPool:
    """Clips rendered once, from which each step draws a batch with random crops.

    On a GPU the trainer outruns the renderer (about 1 ms a frame on one core), so a
    VAE run renders its pool up front, in parallel, and trains on crops of it.
    """

    def __init__(self, seed: int, size: int, width: int, height: int, frames: int, colors, random_colors: float,
                 slow: float = 0.0):
        self.seed = seed
        self.clips, _ = render_clips(seed, range(size), width, height, frames, colors, random_colors,
                                     slow=slow)  # [N, F, H, W, 3]

    def batch(self, step: int, batch_size: int, crop: int, frames: int = 0, around_object: bool = False) -> torch.Tensor:
        """`frames` > 0: a random run of that many frames of each drawn clip (1: single frames, for images).
        around_object: each crop holds a random pixel of the object's path (a crop of plain background teaches
        little, and half of the random 32x32 crops of a 64x64 clip miss most of the object)."""
        rng = world.clip_rng(self.seed + 1, step)  # a stream of its own: draws and crops of step `step`
        n, f, h, w, _ = self.clips.shape
        frames = frames or f
        picked = []
        for i in rng.integers(0, n, batch_size):
            t = rng.integers(0, f - frames + 1) if frames < f else 0
            clip = self.clips[i, t : t + frames]
            y, x = (rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)) if crop else (0, 0)
            if crop and around_object:
                ys, xs = np.nonzero(object_mask(clip))
                if len(ys):
                    k = rng.integers(len(ys))
                    y = rng.integers(max(0, ys[k] - crop + 1), min(h - crop, ys[k]) + 1)
                    x = rng.integers(max(0, xs[k] - crop + 1), min(w - crop, xs[k]) + 1)
            picked.append(clip[:, y : y + (crop or h), x : x + (crop or w)])
        return torch.stack([world.to_tensor(c) for c in picked])


def object_mask(clip: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels that differ from the clip's median colour in any frame (the object's path), for
    uint8 frames [F, H, W, 3] of one object on a plain background."""
    median = np.median(clip.reshape(-1, 3), axis=0)
    return (np.abs(clip.astype(np.int16) - median).max(axis=3) > 25).any(axis=0)
