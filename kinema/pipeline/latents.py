"""Stage: prepare the latents. Seeded noise on the official schedule, or a part-way start from a video or latents."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kinema.errors import KinemaError
from kinema.pipeline.settings import Geometry, Settings
from kinema.sampling import add_noise, initial_noise, schedule
from kinema.sampling.windows import freenoise


@dataclass
class Start:
    """Where sampling starts: the latent at sigmas[start_step] and the whole schedule."""

    x: torch.Tensor  # [1, z, T, h, w] float32
    start_step: int
    sigmas: torch.Tensor  # float32 [steps + 1], ending in 0
    timesteps: torch.Tensor  # int64 [steps]

    @property
    def partway(self) -> bool:
        return self.start_step > 0


def fit_video(video: torch.Tensor, settings: Settings, temporal: int = 4, keep_frames: bool = False) -> torch.Tensor:
    """A source video [3, F, H, W] as the run encodes it: resized to the run's size (bilinear, antialiased)
    and cut to its first `frame_num` frames (a whole number of `temporal`-frame latent steps); keep_frames:
    every frame kept (a video to extend)."""
    v = F.interpolate(video.float().transpose(0, 1), size=(settings.height, settings.width), mode="bilinear",
                      antialias=True)  # [F, 3, H, W]
    keep = v.shape[0] if keep_frames else min(settings.frame_num, 1 + (v.shape[0] - 1) // temporal * temporal)
    return v[:keep].transpose(0, 1)  # [3, F', H, W]


@torch.no_grad()
def prepare_latents(settings: Settings, geometry: Geometry, device, vae=None, video: torch.Tensor | None = None,
                    latents: torch.Tensor | None = None, visit=lambda name: nullcontext(), windows=None) -> Start:
    """The starting latent of a run. From pure noise (seeded, drawn on the CPU so a seed gives the same video
    on every device); or, given `latents` [z, T, h, w] (a first stage's output) or a `video` [3, F, H, W] in
    [-1, 1] (v2v: encoded by `vae` in a `visit("vae")`), that latent noised to the step `settings.denoise` starts at.
    windows: the run's ContextWindows; with FreeNoise the noise is rearranged per window (its own generator)."""
    shape = (1, *settings.latent_shape(geometry))
    sigmas, timesteps = schedule(settings.solver, settings.steps, settings.shift)
    noise = initial_noise(shape, settings.seed)
    if windows is not None and windows.freenoise:
        size, _, overlap = windows.latent()
        noise = freenoise(noise, size, overlap, torch.Generator().manual_seed(settings.seed))
    noise = noise.to(device)
    if video is None and latents is None:
        return Start(noise, 0, sigmas, timesteps)
    if latents is None:
        with visit("vae"):
            latents = vae.encode(fit_video(video, settings, geometry.temporal)[None])[0]
    if tuple(latents.shape) != shape[1:]:
        raise KinemaError(f"the input latents have shape {list(latents.shape)}, but this size and frame count need "
                          f"{list(shape[1:])}.")
    start = settings.start_step(True)
    return Start(add_noise(latents[None].to(device).float(), noise, sigmas[start].item()), start, sigmas, timesteps)
