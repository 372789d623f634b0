"""EasyAnimate-style bucketing: aspect-ratio buckets and a resumable, single-bucket batch sampler.

Every item gets a bucket key, e.g. (frames, width, height, token_bucket): its
frame count, the (width, height) of the aspect bucket it is cropped to, and its
caption's token count rounded up (`token_bucket`) so padding inside a batch
stays small. `BucketBatchSampler` yields batches of one key only, shuffled
within and across buckets, deterministically per (seed, epoch); its
`state_dict` (epoch, position) lets a resumed run continue with exactly the
batches it would have seen.
"""

from __future__ import annotations

import math
from typing import Hashable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from kinema.errors import KinemaError

# width / height, from 1:3 (tall) to 3:1 (wide)
DEFAULT_RATIOS = (1 / 3, 2 / 5, 1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 5 / 2, 3.0)


def aspect_buckets(base_area: int, multiple: int = 16, ratios: Sequence[float] = DEFAULT_RATIOS) -> list[tuple[int, int]]:
    """(width, height) sizes of about `base_area` pixels, both multiples of `multiple`, one per
    aspect ratio (sizes that round to the same one are merged), ordered from tall to wide."""
    if base_area <= 0 or multiple <= 0:
        raise KinemaError(f"aspect_buckets needs a positive base_area and multiple, got {base_area}, {multiple}")
    sizes: list[tuple[int, int]] = []
    for r in sorted(ratios):
        h = math.sqrt(base_area / r)
        size = (max(multiple, round(h * r / multiple) * multiple), max(multiple, round(h / multiple) * multiple))
        if size not in sizes:
            sizes.append(size)
    return sorted(sizes, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width / height in log space."""
    if not buckets:
        raise KinemaError("nearest_bucket got no buckets; build them with aspect_buckets(base_area)")
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))


def token_bucket(n_tokens: int, multiple: int = 8) -> int:
    """A token count rounded up to a multiple: captions in one batch pad to at most `multiple - 1` extra tokens."""
    return -(-n_tokens // multiple) * multiple


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose items share a key, deterministic per (seed, epoch).

    Each epoch shuffles every bucket, cuts it into batches (a bucket's remainder
    is dropped with `drop_last`, else kept as a smaller batch) and shuffles the
    batches across buckets. Iterating continues from `position` in `epoch` and
    moves on to the next epoch at the end, so `for batch in sampler` runs one
    epoch. `set_epoch(e)` starts epoch e from the top unless it is the current
    one (so a resumed run may call it with the epoch it resumed in).

    With a DataLoader that prefetches, the sampler runs ahead of training: save
    {"epoch": ..., "position": batches the loop consumed in that epoch} rather
    than the sampler's own state in that case.
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int, seed: int = 0, drop_last: bool = True):
        if batch_size < 1:
            raise KinemaError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise KinemaError(f"seed must be >= 0, got {seed}")
        self.groups: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            self.groups.setdefault(key, []).append(i)
        self.num_items = len(keys)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.epoch, self.position = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch`, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        out: list[list[int]] = []
        for indices in self.groups.values():
            perm = rng.permutation(indices).tolist()
            for s in range(0, len(perm), self.batch_size):
                if len(perm) - s >= self.batch_size or not self.drop_last:
                    out.append(perm[s : s + self.batch_size])
        return [out[j] for j in rng.permutation(len(out))]

    def __len__(self) -> int:
        bs = self.batch_size
        return sum(len(g) // bs if self.drop_last else -(-len(g) // bs) for g in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.position
        batches = self.batches(epoch)
        for pos in range(start, len(batches)):
            # advance before yielding: the state after k batches says k were taken
            self.epoch, self.position = (epoch, pos + 1) if pos + 1 < len(batches) else (epoch + 1, 0)
            yield batches[pos]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "num_items": self.num_items, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in ("seed", "batch_size", "num_items", "drop_last") if k in state and state[k] != mine[k]]
        if changed:
            diff = ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed)
            raise KinemaError(f"cannot resume the batch order: {diff} changed since the state was saved; "
                              "resume with the same data and settings, or start a new run")
        if not 0 <= state["position"] <= len(self):
            raise KinemaError(f"sampler position {state['position']} is outside this epoch's {len(self)} batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
