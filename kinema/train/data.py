"""Training batches from a folder of captioned videos (see kinema.train.videos), deterministic per step.

Items are grouped by bucket (frame count, aspect-ratio size, caption length) so
mixed sizes train together; step s takes batch s mod len of epoch s // len of a
seeded `BucketBatchSampler`, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.train.buckets import BucketBatchSampler
from kinema.train.videos import VideoClips


def folder_dataset(cfg, frames: int, tokenizer=None) -> tuple[VideoClips, BucketBatchSampler]:
    dataset = VideoClips(cfg.data, num_frames=frames, fps=cfg.fps, base_area=cfg.width * cfg.height, seed=cfg.seed)
    sampler = BucketBatchSampler(dataset.bucket_keys(tokenizer), cfg.batch_size, seed=cfg.seed)
    if len(sampler) == 0:
        raise KinemaError(
            f"{cfg.data}: no bucket (frames, size) holds batch_size={cfg.batch_size} videos; "
            f"lower batch_size or add videos ({len(dataset)} found)."
        )
    return dataset, sampler


def folder_batches(cfg, frames: int):
    """step -> video batch [B, 3, F, H, W] in [-1, 1] (random square crops when cfg.crop is set)."""
    dataset, sampler = folder_dataset(cfg, frames)
    crop = getattr(cfg, "crop", 0)

    def batch(step: int) -> torch.Tensor:
        epoch, position = divmod(step, len(sampler))
        dataset.set_epoch(epoch)
        videos = [dataset[i]["video"] for i in sampler.batches(epoch)[position]]
        if crop:
            rng = np.random.default_rng([cfg.seed, step, 11])
            out = []
            for v in videos:
                h, w = v.shape[-2:]
                c = min(crop, h, w) // 8 * 8
                y, x = rng.integers(0, h - c + 1), rng.integers(0, w - c + 1)
                out.append(v[..., y : y + c, x : x + c])
            videos = out
        return torch.stack(videos)

    return batch
