"""Running an upscaler on a whole video in tiles: spatial tiles and runs of frames, each with enough
context around it (the network's receptive field) that the stitched result equals an untiled run."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kinema.upscale.load import Upscaler

TILE = 128  # low-resolution pixels per tile side (before the context margin)
FRAMES = 16  # frames per run (before the context margin)


def _spans(n: int, size: int, margin: int) -> list[tuple[int, int, int, int]]:
    """(read start, read end, keep start, keep end) covering 0..n in pieces of `size`, each read with `margin` more
    on each side (clipped to the video)."""
    out = []
    for start in range(0, n, size):
        end = min(n, start + size)
        out.append((max(0, start - margin), min(n, end + margin), start, end))
    return out


@torch.no_grad()
def upscale_video(up: Upscaler, video: torch.Tensor, tile: int = TILE, frames: int = FRAMES,
                  progress: bool = False) -> torch.Tensor:
    """video [3, F, H, W] in [-1, 1] -> [3, F, sH, sW] (s = up.scale), in tiles of `tile` low-resolution pixels
    and runs of `frames` frames (0: whole), on the upscaler's device; the result on the CPU, float32."""
    c, f, h, w = video.shape
    s = up.scale
    mt, mp = up.receptive
    weight = next(up.model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    out = torch.empty(c, f, h * s, w * s)
    runs = _spans(f, frames or f, mt)
    rows, cols = _spans(h, tile or h, mp), _spans(w, tile or w, mp)
    bar = tqdm(total=len(runs) * len(rows) * len(cols), desc=f"upscaling x{s}", disable=not progress, unit="tile")
    for t0, t1, k0, k1 in runs:
        for y0, y1, a0, a1 in rows:
            for x0, x1, b0, b1 in cols:
                piece = video[:, t0:t1, y0:y1, x0:x1].float().to(device)
                if up.kind == "kinema":
                    res = up.model(piece[None])[0]
                else:  # frame by frame, in [0, 1]
                    res = up.model(((piece.transpose(0, 1) + 1) / 2).clamp(0, 1)).transpose(0, 1) * 2 - 1
                res = res[:, k0 - t0 : k1 - t0, (a0 - y0) * s : (a1 - y0) * s, (b0 - x0) * s : (b1 - x0) * s]
                out[:, k0:k1, a0 * s : a1 * s, b0 * s : b1 * s] = res.float().cpu()
                bar.update(1)
    bar.close()
    return out.clamp_(-1, 1)


def resize_video(video: torch.Tensor, width: int, height: int, method: str = "bicubic") -> torch.Tensor:
    """video [3, F, H, W] in [-1, 1] resized to width x height: bicubic (antialiased when shrinking) or lanczos
    (Pillow's, frame by frame)."""
    if method == "bicubic":
        shrink = width < video.shape[3] or height < video.shape[2]
        out = F.interpolate(video.float().transpose(0, 1), size=(height, width), mode="bicubic", align_corners=False,
                            antialias=shrink)
        return out.transpose(0, 1).clamp(-1, 1)
    if method == "lanczos":
        from PIL import Image

        frames = ((video.float().permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        big = np.stack([np.asarray(Image.fromarray(fr).resize((width, height), Image.LANCZOS)) for fr in frames])
        return torch.from_numpy(big).permute(3, 0, 1, 2).float() / 127.5 - 1
    raise ValueError(f"unknown resize method {method!r}")


def tiles_needed(h: int, w: int, tile: int = TILE) -> int:
    return math.ceil(h / tile) * math.ceil(w / tile)
