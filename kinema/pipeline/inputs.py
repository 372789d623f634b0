"""The pipeline's media inputs in every form a caller has them, as the model-range tensors the stages take.

An image (image / first_frame / last_frame) is a path, a PIL image, uint8 [H, W, 3] (numpy or
torch) or float [3, H, W] in [-1, 1]; a video is a path (video file, animation, PNG-sequence
folder), uint8 [F, H, W, 3] or float [3, F, H, W] in [-1, 1]. Paths and uint8 frames go
through the same readers and conversion as `kinema generate`, so both give the same numbers.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.media.read import pil_rgb, read_image, read_video, to_model_range

RANGE_SLACK = 1e-3  # float inputs may overshoot [-1, 1] by rounding (e.g. a bicubic resize)


def _as_tensor(value, name: str):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return None


def _check_float(x: torch.Tensor, name: str, layout: str) -> torch.Tensor:
    if not x.is_floating_point():
        raise KinemaError(f"{name} has dtype {x.dtype}; pass uint8 frames or floats {layout} in [-1, 1].")
    if x.numel() and (not torch.isfinite(x).all() or x.abs().max() > 1 + RANGE_SLACK):
        raise KinemaError(f"{name}: float pixels must be finite and in [-1, 1] (got {x.min().item():.3g} to "
                          f"{x.max().item():.3g}); map [0, 1] images with x * 2 - 1, or pass uint8.")
    return x.float()


def image_input(value, name: str = "image") -> torch.Tensor:
    """One image in any accepted form -> float32 [3, H, W] in [-1, 1]."""
    if isinstance(value, (str, os.PathLike)):
        return to_model_range(read_image(value))[:, 0]
    if type(value).__module__.startswith("PIL."):
        return to_model_range(torch.from_numpy(pil_rgb(value).copy()))[:, 0]
    x = _as_tensor(value, name)
    if x is None:
        raise KinemaError(f"{name} is a {type(value).__name__}; pass a path, a PIL image, uint8 [H, W, 3] "
                          "or float [3, H, W] in [-1, 1].")
    if x.dtype == torch.uint8:
        if x.ndim != 3 or x.shape[-1] != 3:
            raise KinemaError(f"{name}: uint8 images are [H, W, 3] RGB, got shape {list(x.shape)}.")
        return to_model_range(x)[:, 0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise KinemaError(f"{name}: float images are [3, H, W] in [-1, 1], got shape {list(x.shape)}.")
    return _check_float(x, name, "[3, H, W]")


def video_input(value, name: str = "video") -> torch.Tensor:
    """A video in any accepted form -> float32 [3, F, H, W] in [-1, 1]."""
    if isinstance(value, (str, os.PathLike)):
        return to_model_range(read_video(value).frames)
    x = _as_tensor(value, name)
    if x is None:
        raise KinemaError(f"{name} is a {type(value).__name__}; pass a path, uint8 [F, H, W, 3] or float [3, F, H, W].")
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise KinemaError(f"{name}: uint8 videos are [F, H, W, 3] RGB, got shape {list(x.shape)}.")
        return to_model_range(x)
    if x.ndim != 4 or x.shape[0] != 3:
        raise KinemaError(f"{name}: float videos are [3, F, H, W] in [-1, 1], got shape {list(x.shape)}.")
    return _check_float(x, name, "[3, F, H, W]")
