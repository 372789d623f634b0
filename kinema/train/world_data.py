"""Batches from the synthetic world (kinema.toy.world) for the trainers, deterministic per step."""

from __future__ import annotations

import numpy as np
import torch

from kinema.toy import world


def random_rgb_spec(rng: np.random.Generator, width: int, height: int) -> world.ClipSpec:
    """A world clip with arbitrary object and background colours (teaches a VAE colours in general)."""
    fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(fg.astype(int) - bg).sum() < 90:
        fg = rng.integers(0, 256, 3)
    spec = world.random_spec(rng, width, height)
    hexes = ["#" + "".join(f"{int(v):02x}" for v in c) for c in (fg, bg)]
    return world.ClipSpec(hexes[0], spec.shape, spec.direction, hexes[1], spec.size, spec.travel, spec.start)


def clip_batch(seed: int, step: int, batch_size: int, width: int, height: int, frames: int,
               colors=tuple(world.COLORS), random_colors: float = 0.0, crop: int = 0):
    """[B, 3, F, H, W] in [-1, 1] (or crop x crop) and the B specs, for training step `step`."""
    videos, specs = [], []
    for b in range(batch_size):
        rng = world.clip_rng(seed, step * batch_size + b)
        spec = (random_rgb_spec(rng, width, height) if rng.random() < random_colors
                else world.random_spec(rng, width, height, colors=colors))
        clip = world.render(spec, width, height, frames)
        if crop:
            y, x = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
            clip = clip[:, y : y + crop, x : x + crop]
        videos.append(world.to_tensor(clip))
        specs.append(spec)
    return torch.stack(videos), specs
