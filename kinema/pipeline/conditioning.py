"""Stage: build the condition. The image condition of i2v, flf2v and inpainting: one builder for all of them.

The Wan2.1 i2v/flf2v DiT takes, beside the noise, a 20-channel condition
y = [4-channel frame mask, 16-channel VAE latent of the known frames with zeros
elsewhere]. The mask is per pixel frame, with the first frame repeated 4 times
so that its length (F + 3) folds into 4 channels per latent frame.

The official code hard-codes an 81-frame mask, which breaks every other frame
count; here the mask follows the actual frame count F = 4k + 1.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kinema.sampling.windows import travel_section


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


def fit_last_frame(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The last frame [3, h, w] fitted to the first's size: scaled (bilinear, antialiased) to cover it, then
    centre-cropped, the top-left of the crop at floor(excess / 2).

    This is what the official flf2v code says it does ("resize", then "center crop"). What that code does
    is different, and deliberately not copied: it computes the covering size but never resizes, and passes
    the size to torchvision's center_crop in (w, h) order, so a last frame of another size is cropped or
    zero-padded, unscaled, to a transposed size (tests/test_pipeline_parity.py restates it). torchvision's
    crop offset is round(excess / 2), one pixel off this one when the excess is 3 mod 4."""
    (h1, w1), (h2, w2) = first.shape[1:], last.shape[1:]
    if (h1, w1) == (h2, w2):
        return last
    ratio = max(w1 / w2, h1 / h2)
    size = (round(h2 * ratio), round(w2 * ratio))
    last = F.interpolate(last[None].float(), size=size, mode="bilinear", antialias=True)[0]
    top, left = (size[0] - h1) // 2, (size[1] - w1) // 2
    return last[:, top : top + h1, left : left + w1]


@dataclass
class Condition:
    """What the DiT takes besides noise and text; the same for both guidance branches (images are not guided)."""

    clip_fea: torch.Tensor | None = None  # [1, N, image_dim] CLIP tokens, joined sequence-wise (i2v 257, flf2v 2 x 257)
    y: torch.Tensor | None = None  # [1, 4 + z, T, h, w] mask + known-frame latents, joined channel-wise to the noise
    anchors: torch.Tensor | None = None  # [n, z, h, w] reference latents for context windows (window_args)

    def args(self) -> dict:
        return {"clip_fea": self.clip_fea, "y": self.y}


def window_args(args: dict, window, anchors: torch.Tensor | None = None) -> dict:
    """A branch's DiT inputs for a context window (latent frame indices): the condition y sliced to the window's
    frames with the video's first frame (its mask and latent) as the window's first, every window's anchor (the
    wrapper's rule); CLIP tokens and text as they are. `anchors` (reference latents [n, z, h, w], the wrapper's
    context `reference_latent`): a window that does not start at the video's first frame takes one of them as its
    first frame's latent instead (the video's first frame's mask kept); with several, the one of the section its
    last frame falls in, as prompt travel chooses."""
    y = args.get("y")
    if y is None or window is None:
        return args
    part = y[:, :, list(window)].clone()
    part[:, :, 0] = y[:, :, 0]
    if anchors is not None and window[0] != 0:
        part[:, 4:, 0] = anchors[travel_section(window, y.shape[2], anchors.shape[0])].to(part)
    return {**args, "y": part}


@torch.no_grad()
def encode_references(vae, images, height: int, width: int) -> torch.Tensor:
    """Reference images [3, h, w] in [-1, 1] -> their latents [n, z, H/8, W/8], each image resized to the run's size
    (bicubic, as the known frames are) and encoded as a one-frame video."""
    return torch.cat([vae.encode(condition_video({0: im}, 1, height, width)[None])[:, :, 0] for im in images])


def _no_visit(name: str):
    return nullcontext()


@torch.no_grad()
def make_condition(task, images: dict[str, torch.Tensor], frame_num: int, height: int, width: int, vae, clip,
                   dit_config, device, visit=_no_visit, blanks: dict | None = None) -> Condition:
    """The condition of one run. `images`: the task's image inputs {name: [3, h, w] in [-1, 1]}
    (kinema.pipeline.tasks.Task.known_frames says where each goes; flf2v's last frame is fitted to the
    first's size by the official rule). An i2v-type DiT running a task without images (t2v on a model trained
    with condition dropout, Wan-Fun / Kinema) gets the empty condition; a t2v DiT none. `visit(name)`: a
    context the encoders run in (kinema.memory.offload.Offloader.visit). `blanks`: where the empty conditions
    already made are kept (Models.blank_conditions; see `empty_condition`)."""
    if task.images:
        first = images[task.images[0]]
        known = {}
        for name, index in task.known_frames(frame_num).items():
            known[index] = images[name] if name == task.images[0] else fit_last_frame(first, images[name])
        with visit("clip"):
            tokens = torch.cat([clip.encode(f[None].to(clip.device)) for f in known.values()], dim=1)
        with visit("vae"):
            y = build_condition(vae, known, frame_num, height, width)
        return Condition(tokens.to(device), y.to(device))
    if dit_config.in_dim > vae.z_dim:
        empty = empty_condition(dit_config, vae, frame_num, height, width, blanks, visit)
        return Condition(empty.clip_fea.to(device), empty.y.to(device))
    return Condition()


BLANKS_KEPT = 8  # sizes whose empty condition is kept


def _weights_version(vae) -> int:
    """Changes whenever the VAE's weights are updated in place (an optimizer step, a load): a kept empty condition
    of older weights is not reused."""
    inner = vae
    for _ in range(3):  # a ParallelVAE wraps a TiledVAE (.tiled), which wraps the WanVAE (.vae)
        inner = getattr(inner, "tiled", None) or getattr(inner, "vae", None) or inner
    weight = getattr(getattr(inner, "conv1", None), "weight", None)
    return -1 if weight is None else weight._version


def empty_condition(dit_config, vae, frame_num: int, height: int, width: int, blanks: dict | None = None,
                    visit=_no_visit) -> Condition:
    """The image inputs of an i2v-type DiT when no frame is given (mask 0, the latent of a blank video,
    CLIP tokens of zeros): how a model trained with condition dropout (Wan-Fun / Kinema) runs t2v.
    They depend only on the VAE and the size: given `blanks` (a pipeline's Models.blank_conditions, a trainer's
    dict), the ones made are kept there, so the VAE encodes a blank video once per size, not once per call; the
    VAE runs inside `visit("vae")`, only when it has to."""
    key = (frame_num, height, width, type(vae).__name__, getattr(vae, "tile", None), _weights_version(vae))
    if blanks is not None and key in blanks:
        return blanks[key]
    with visit("vae"):
        y = build_condition(vae, {}, frame_num, height, width)
    empty = Condition(y.new_zeros(1, 1, dit_config.image_dim), y)
    if blanks is not None:
        if len(blanks) >= BLANKS_KEPT:
            blanks.pop(next(iter(blanks)))  # the oldest size
        blanks[key] = empty
    return empty
