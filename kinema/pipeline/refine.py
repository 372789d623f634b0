"""Stages after the first pass: refine at a larger size, and the learned upscaler.

Refine (the workflow's "samples" path, as one call): the first pass's result is resized to `size` (its pixels,
bicubic or lanczos, then encoded; or its latents, bilinear), noised to the step `denoise` starts at and denoised
again at the new size by the same DiT with the same prompt, condition and seed: the DiT adds the detail the
low-resolution pass could not hold. Upscale: the decoded video through an x2 cascade (kinema/upscale).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kinema.errors import KinemaError
from kinema.pipeline.settings import MAX_STEPS, Settings, parse_size, round_size

METHODS = ("bicubic", "lanczos", "latent")


@dataclass(frozen=True)
class Refine:
    width: int
    height: int
    denoise: float = 0.3
    steps: int | None = None  # None: the first pass's
    method: str = "bicubic"

    def settings(self, s: Settings) -> Settings:
        """The refine pass's settings: the first pass's at the new size, steps and strength."""
        return replace(s, width=self.width, height=self.height, steps=self.steps or s.steps, denoise=self.denoise)

    def record(self) -> dict:
        return {"refine_size": f"{self.width}*{self.height}", "refine_denoise": self.denoise,
                "refine_steps": self.steps, "refine_method": self.method}


@dataclass(frozen=True)
class Upscale:
    factor: int
    upscaler: str | None = None  # a Kinema upscaler folder / file or a spandrel model file; None: the built-in one
    tile: int = 128  # low-resolution pixels per tile

    def record(self) -> dict:
        return {"upscale": self.factor, **({"upscaler": self.upscaler} if self.upscaler else {})}


def parse_refine(value, names: dict | None = None) -> Refine | None:
    """None -> None; a dict {size, denoise, steps, method} (size required) -> Refine, every value checked."""
    n = (names or {}).get
    if value is None:
        return None
    if isinstance(value, Refine):
        return value
    if not isinstance(value, dict) or "size" not in value:
        raise KinemaError(f"{n('refine', 'refine')} {value!r} must be a dict with at least a size, e.g. "
                          "dict(size='128*128', denoise=0.3).")
    unknown = set(value) - {"size", "denoise", "steps", "method"}
    if unknown:
        raise KinemaError(f"{n('refine', 'refine')} has no field {sorted(unknown)[0]!r}; its fields are size, denoise, "
                          "steps, method.")
    width, height = round_size(*parse_size(value["size"], n("refine_size", "refine size")))
    denoise = value.get("denoise", 0.3)
    if isinstance(denoise, bool) or not isinstance(denoise, numbers.Real) or not 0 < denoise <= 1:
        raise KinemaError(f"{n('refine_denoise', 'refine denoise')} {denoise!r} must be in (0, 1] (0.2-0.5 keeps the "
                          "first pass's layout and adds detail).")
    steps = value.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS):
        raise KinemaError(f"{n('refine_steps', 'refine steps')} {steps!r} must be a whole number from 1 to {MAX_STEPS}.")
    method = value.get("method", "bicubic")
    if method not in METHODS:
        raise KinemaError(f"{n('refine_method', 'refine method')} {method!r} is not one of {', '.join(METHODS)}.")
    return Refine(width, height, float(denoise), steps, method)


def parse_upscale(factor, upscaler=None, tile: int = 128, names: dict | None = None) -> Upscale | None:
    n = (names or {}).get
    if factor in (None, 1):
        if upscaler is not None:
            raise KinemaError(f"{n('upscaler', 'upscaler')} is used by {n('upscale', 'upscale')}; add it (2 or 4).")
        return None
    if isinstance(factor, bool) or factor not in (2, 4, 8):
        raise KinemaError(f"{n('upscale', 'upscale')} {factor!r} must be 2, 4 or 8 (x2 stages in a cascade).")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16:
        raise KinemaError(f"{n('upscale_tile', 'upscale tile')} {tile!r} must be a whole number of pixels >= 16.")
    from pathlib import Path

    if upscaler is not None and not Path(upscaler).exists():
        raise KinemaError(f"{n('upscaler', 'upscaler')} {upscaler} does not exist; give a Kinema upscaler folder or "
                          "file, or a Real-ESRGAN family model file.")
    return Upscale(int(factor), None if upscaler is None else str(upscaler), tile)


@torch.no_grad()
def refine_input(refine: Refine, x0: torch.Tensor, video: torch.Tensor | None, spatial: int = 8):
    """What the refine pass starts from: (video [3, F, H', W'] to encode, None) for a pixel method, or
    (None, latents [z, T, h', w']) for "latent"."""
    from kinema.upscale import resize_video

    if refine.method == "latent":
        z = F.interpolate(x0[0].float().transpose(0, 1), size=(refine.height // spatial, refine.width // spatial), mode="bilinear",
                          align_corners=False)  # [T, z, h', w']
        return None, z.transpose(0, 1)
    return resize_video(video, refine.width, refine.height, refine.method), None
