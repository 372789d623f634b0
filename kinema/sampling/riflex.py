"""RIFLEx: videos longer than the model was trained on, without the loop back to the start.

A video DiT trained on L_train latent frames repeats itself past them: the temporal RoPE
component whose period is closest to L_train (the "intrinsic frequency", index k) wraps
around. RIFLEx (Zhao et al., 2025) lowers that one frequency so it completes 0.9 of a turn
over the whole video: omega_k = 0.9 * 2 pi / L, L the video's latent frames. Nothing else
changes; a video no longer than trained is left alone.

`k` is 1-based, as in RIFLEx's code and ComfyUI-WanVideoWrapper's `riflex_freq_index`
(0 there means off). `auto` finds k from the model's head size and training length by the
paper's rule (the period 2 pi / omega_j nearest L_train): for Wan2.1's 128-channel heads and
81 training frames (21 latent) that is k = 4; the wrapper's tooltip suggests 6 for Wan2.1, a
value found by eye on the 14B model, which `--riflex 6` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kinema.errors import KinemaError
from kinema.models.hooks import BlockHook
from kinema.ops.rope import inv_frequencies, rope_split, rope_table


@dataclass(frozen=True)
class Riflex:
    """k: the temporal frequency index (1-based), or None for the paper's rule (`intrinsic_index`)."""

    k: int | None = None

    def __post_init__(self):
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise KinemaError(f"RIFLEx index {self.k!r} must be a whole number >= 1, 'auto' or 'off'.")

    def describe(self) -> str:
        return "auto" if self.k is None else str(self.k)


def intrinsic_index(head_dim: int, train_frames: int, theta: float = 10000.0) -> int:
    """The 1-based index of the time axis's frequency whose period is nearest `train_frames` latent frames."""
    periods = 2 * math.pi / inv_frequencies(rope_split(head_dim)[0], theta)
    return int((periods - train_frames).abs().argmin()) + 1


def parse_riflex(value, name: str = "riflex") -> Riflex | None:
    """'off' / None / False / 0 -> None; 'auto' / True -> Riflex(); K or 'K' -> Riflex(K); a Riflex as it is."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("off", "none", "")):
        return None
    if isinstance(value, Riflex):
        return value
    if value is True or (isinstance(value, str) and value.strip().lower() == "auto"):
        return Riflex()
    try:
        k = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        k = None
    if isinstance(k, int) and not isinstance(k, bool):
        return None if k == 0 else Riflex(k)  # 0: the wrapper's "disabled"
    raise KinemaError(f"{name} {value!r} is not auto, off or a frequency index (a whole number, e.g. 6).")


class RiflexHook(BlockHook):
    """Replaces the blocks' RoPE table by the RIFLEx one. An explicit k always applies; `auto` only to a video
    with more latent frames than `train_frames`."""

    order = 10  # outermost: every other hook sees the positions the blocks will

    def __init__(self, spec: Riflex, head_dim: int, train_frames: int):
        self.spec, self.head_dim, self.train_frames = spec, head_dim, train_frames
        self.k = spec.k if spec.k is not None else intrinsic_index(head_dim, train_frames)
        limit = rope_split(head_dim)[0] // 2
        if not 1 <= self.k <= limit:
            raise KinemaError(f"RIFLEx index {self.k} does not exist: this DiT's time axis has {limit} frequencies "
                              f"(1-{limit}).")

    def applies(self, frames: int) -> bool:
        return self.spec.k is not None or frames > self.train_frames

    def around_blocks(self, run, tokens, inputs, step):
        frames = inputs.grid[0]
        if not self.applies(frames):
            return run(tokens, inputs, step)
        offset = (step.frame_offset if step is not None else 0, 0, 0)
        rope = rope_table(inputs.grid, self.head_dim, tokens.device, offset, riflex=(self.k, frames))
        return run(tokens, replace(inputs, rope=rope), step)
