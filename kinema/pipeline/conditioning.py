"""The image condition of i2v, flf2v and inpainting: one builder for all of them.

The Wan2.1 i2v/flf2v DiT takes, beside the noise, a 20-channel condition
y = [4-channel frame mask, 16-channel VAE latent of the known frames with zeros
elsewhere]. The mask is per pixel frame, with the first frame repeated 4 times
so that its length (F + 3) folds into 4 channels per latent frame.

The official code hard-codes an 81-frame mask, which breaks every other frame
count; here the mask follows the actual frame count F = 4k + 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def target_size(height: int, width: int, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """The official i2v size rule: keep the image's aspect ratio at about `max_area` pixels,
    rounded down to whole patches of the latent grid. Returns pixel (height, width)."""
    aspect = height / width
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    return lat_h * stride, lat_w * stride


def frame_mask(num_frames: int, known: list[int], lat_h: int, lat_w: int, temporal: int = 4) -> torch.Tensor:
    """Mask [temporal, T_lat, lat_h, lat_w]: 1 on latent slots of known pixel frames, else 0."""
    if (num_frames - 1) % temporal:
        raise ValueError(f"frame count must be {temporal}k + 1, got {num_frames}")
    m = torch.zeros(num_frames, lat_h, lat_w)
    for i in known:
        m[i] = 1.0
    m = torch.cat([m[:1].repeat(temporal, 1, 1), m[1:]])  # [F + temporal - 1, h, w]
    return m.view(-1, temporal, lat_h, lat_w).transpose(0, 1)  # [temporal, T_lat, h, w]


def condition_video(frames: dict[int, torch.Tensor], num_frames: int, height: int, width: int) -> torch.Tensor:
    """Pixel video [3, F, H, W] holding each known frame (resized bicubically to H x W) at its index, zeros elsewhere."""
    video = torch.zeros(3, num_frames, height, width)
    for i, image in frames.items():  # image [3, h, w] in [-1, 1]
        video[:, i] = F.interpolate(image[None].float().cpu(), size=(height, width), mode="bicubic")[0]
    return video


def build_condition(vae, frames: dict[int, torch.Tensor], num_frames: int, height: int, width: int) -> torch.Tensor:
    """y [1, 4 + z, T_lat, H/8, W/8] for known pixel frames {index: image [3, h, w] in [-1, 1]}.

    i2v passes {0: image}; flf2v {0: first, F - 1: last}; inpainting any set of frames.
    """
    for i in frames:
        if not 0 <= i < num_frames:
            raise ValueError(f"known frame index {i} is outside a {num_frames}-frame video")
    stride = vae.spatial_ratio
    mask = frame_mask(num_frames, sorted(frames), height // stride, width // stride, vae.temporal_ratio)
    latent = vae.encode(condition_video(frames, num_frames, height, width)[None])  # [1, z, T_lat, h, w]
    return torch.cat([mask[None].to(latent), latent], dim=1)
