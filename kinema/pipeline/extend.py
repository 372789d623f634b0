"""Stage: extend a video. Its last frames become the known first frames of a new clip (the inpaint way),
and the new frames are colour-matched to them and joined on.

The new clip is `overlap + extend` frames long (`+ overlap - 1` with `loop`). Its first `overlap` pixel
frames are the video's last ones: known through the image condition y (mask + their latents) on DiTs
that take one, and on every DiT by latent replacement: on each step the model sees the known latent
frames at the step's noise level, (1 - sigma) z + sigma eps with the run's own noise, so the new frames
continue them (ComfyUI's "noise mask" inpainting). With `loop` the clip's last `overlap - 1` frames are
the video's first ones (known through y only: a causal VAE's latent of a clip's start is not the latent
of the same frames mid-clip), so the join leads back into the first frame.

The join appends the new frames after the overlap (`overlap_join`): `blend` (the default) cross-fades the
source's last `overlap` frames into the overlap as generated (frame i of K given weight (i + 1) / K, so the
last is the generated one), so the first new frame follows a frame of its own decode: the generated overlap is
the known frames decoded again, within the VAE's round trip of the source, and what differs (a fraction of a
pixel of the object's place, a level of colour) is spread over the overlap instead of jumping at the join (on
the built-in model, three extensions of six prompts: the join's jump within 1.5x the median jump elsewhere on
four, against two with `cut`); `cut` keeps every input frame as it was. Both are colour-corrected
(`colour_match`): `overlap` (the default) shifts every new frame, per channel, by the difference of the source
overlap's mean and the overlap as generated (it removes the clip's offset from the source; the generated
overlap is the same frames, decoded again, so that offset is all it can measure: a gain from the spread of the
two overlaps would mostly be edge and sharpness differences, and multiplying by it moves every colour far from
the frame's mean, the object's above all: on the built-in model it made object colour drift 8-18/255 over
three extensions, against 4-9 with the shift and the blended join); `hm` matches each new frame's histogram,
per channel, to the input overlap's (ComfyUI's ColorMatch `hm`, what extension workflows put after each
segment): it also removes the colour the model drifts to within the new frames, so repeated extensions keep
the overlap's colours, but it gives every frame the overlap's distribution of values, so it is for continuing
one scene (a frame whose object grew loses the growth's edge pixels to the background); `off` joins them as
generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kinema.errors import KinemaError

COLOUR_MATCH = ("overlap", "hm", "off")
OVERLAP_JOIN = ("blend", "cut")


@dataclass(frozen=True)
class Extension:
    """How a video is extended: `frames` new frames after an overlap of the last `overlap` frames."""

    frames: int
    overlap: int = 9
    loop: bool = False
    colour: str = "overlap"  # how the new frames are colour-matched to the overlap: one of COLOUR_MATCH
    join: str = "blend"  # how they are joined on: one of OVERLAP_JOIN
    sized: bool = False  # the new clip generated at a size asked for, not the video's (resized to the video's after)

    def clip_frames(self) -> int:
        """Frames of the clip the model generates."""
        return self.overlap + self.frames + (self.overlap - 1 if self.loop else 0)

    def latent_overlap(self, temporal: int = 4) -> int:
        """Latent frames the overlap fills exactly (overlap = temporal k + 1)."""
        return (self.overlap - 1) // temporal + 1

    def record(self) -> dict:
        return {"extend_frames": self.frames, "overlap_frames": self.overlap, "loop": self.loop,
                "colour_match": self.colour, "overlap_join": self.join}


def parse_extension(frames, overlap, loop, video_frames: int, names: dict | None = None, temporal: int = 4,
                    colour: str = "overlap", join: str = "blend") -> Extension:
    """The extension settings, checked against the source video's frame count."""
    n = (names or {}).get
    for value, name, rule in ((frames, n("extend_frames", "extend_frames"), f"a multiple of {temporal}, e.g. 32"),
                              (overlap, n("overlap_frames", "overlap_frames"), f"{temporal}k + 1, e.g. 9 or 17")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KinemaError(f"{name} {value!r} must be a whole number of frames: {rule}.")
    if frames % temporal:
        raise KinemaError(f"{n('extend_frames', 'extend_frames')} {frames} must be a multiple of {temporal} (the "
                          f"VAE makes {temporal} frames per latent frame); use {max(temporal, frames // temporal * temporal)}.")
    if (overlap - 1) % temporal or overlap < temporal + 1:
        raise KinemaError(f"{n('overlap_frames', 'overlap_frames')} {overlap} must be {temporal}k + 1 and at least "
                          f"{temporal + 1} (e.g. 9 or 17), so the known frames fill whole latent frames.")
    if overlap > video_frames:
        raise KinemaError(f"{n('overlap_frames', 'overlap_frames')} {overlap} is more than the {video_frames} frames of "
                          "the video; use a shorter overlap or a longer video.")
    if not isinstance(loop, bool):
        raise KinemaError(f"{n('loop', 'loop')} {loop!r} must be True or False.")
    if colour not in COLOUR_MATCH:
        raise KinemaError(f"{n('colour_match', 'colour_match')} {colour!r} is not one of {', '.join(COLOUR_MATCH)} "
                          "(overlap: one shift per channel, from the overlap; hm: each frame's histogram to the "
                          "overlap's; off).")
    if join not in OVERLAP_JOIN:
        raise KinemaError(f"{n('overlap_join', 'overlap_join')} {join!r} is not one of {', '.join(OVERLAP_JOIN)} "
                          "(blend: cross-fade the overlap into the new clip's; cut: keep every input frame).")
    return Extension(frames, overlap, loop, colour, join)


def known_frames(ext: Extension, video: torch.Tensor) -> dict[int, torch.Tensor]:
    """{pixel frame of the new clip: frame [3, H, W]} for a source video [3, F, H, W]: its last `overlap` frames
    first; with `loop`, its first `overlap - 1` frames last."""
    k = ext.overlap
    known = {i: video[:, -k + i] for i in range(k)}
    if ext.loop:
        end = ext.clip_frames() - (k - 1)
        known.update({end + i: video[:, i] for i in range(k - 1)})
    return known


def anchor_images(ext: Extension, video: torch.Tensor, two: bool) -> list[torch.Tensor]:
    """The images whose CLIP tokens condition an image DiT: the video's last frame (and its first with `loop`);
    `two`: a DiT that takes exactly two images (flf2v) gets the last frame twice when there is no loop."""
    images = [video[:, -1]] + ([video[:, 0]] if ext.loop else [])
    return images * 2 if two and len(images) == 1 else images


def replace_known(model_fn, z: torch.Tensor, noise: torch.Tensor):
    """model_fn(x, t, step) that sees the known latent frames z [1, C, k, h, w] (the clip's first k) at the step's
    noise level, (1 - sigma) z + sigma noise, whatever the solver carries there."""
    k = z.shape[2]

    def fn(x: torch.Tensor, t: torch.Tensor, step) -> torch.Tensor:
        x = x.clone()
        x[:, :, :k] = (1 - step.sigma) * z + step.sigma * noise[:, :, :k]
        return model_fn(x, t, step)

    return fn


def colour_match(new: torch.Tensor, generated_overlap: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """New frames [3, F, H, W] shifted per channel by the source overlap's mean less the generated overlap's (both
    [3, K, H, W]: the same frames), clamped to [-1, 1]."""
    shift = overlap.float().mean((1, 2, 3)) - generated_overlap.float().mean((1, 2, 3))
    return (new.float() + shift[:, None, None, None]).clamp(-1, 1)


def histogram_match(new: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each frame of new [3, F, H, W], per channel, given the distribution of values of reference [3, K, H, W]: a
    pixel of rank r among its frame's N values takes the reference's value at the same quantile, r / (N - 1),
    interpolated between the reference's sorted values (tied values share their mid-rank, so equal stays equal)."""
    ref = reference.float().flatten(1).sort(dim=1).values  # [3, M]
    m = ref.shape[1]
    out = torch.empty(new.shape, dtype=torch.float32, device=new.device)
    for f in range(new.shape[1]):  # a frame at a time: the ranks of a long, large video would not fit at once
        x = new[:, f].float().reshape(new.shape[0], -1).contiguous()  # [3, N]
        ordered = x.sort(dim=1).values
        rank = (torch.searchsorted(ordered, x) + torch.searchsorted(ordered, x, right=True) - 1).float() / 2
        pos = rank * ((m - 1) / max(x.shape[1] - 1, 1))
        lo = pos.floor().long().clamp(0, m - 1)
        hi = (lo + 1).clamp(max=m - 1)
        frac = pos - lo
        out[:, f] = (ref.gather(1, lo) * (1 - frac) + ref.gather(1, hi) * frac).view_as(new[:, f])
    return out


def join(ext: Extension, video: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """The source video [3, F, H, W] with the generated clip's new frames appended, colour-matched (ext.colour):
    [3, F + frames, H, W]; with ext.join "blend", the source's last `overlap` frames cross-faded into the clip's
    (colour-matched the same way). A clip generated at another size (the video's rounded to the model's grid) is
    resized to the video's first, so the source frames stay as they were."""
    if clip.shape[-2:] != video.shape[-2:]:
        clip = F.interpolate(clip.float().transpose(0, 1), size=tuple(video.shape[-2:]), mode="bilinear",
                             antialias=True).transpose(0, 1).clamp(-1, 1)
    k = ext.overlap
    ours = clip[:, : k + ext.frames].float()  # the generated overlap, then the new frames
    if ext.colour == "overlap":
        ours = colour_match(ours, clip[:, :k], video[:, -k:])
    elif ext.colour == "hm":
        ours = histogram_match(ours, video[:, -k:])
    if ext.join == "cut":
        return torch.cat([video.float(), ours[:, k:]], dim=1)
    w = torch.arange(1, k + 1, dtype=torch.float32, device=ours.device).div(k).view(1, k, 1, 1)
    faded = video[:, -k:].float() * (1 - w) + ours[:, :k] * w
    return torch.cat([video[:, :-k].float(), faded, ours[:, k:]], dim=1)


@torch.no_grad()
def extension_inputs(ext: Extension, video: torch.Tensor, vae, clip, dit_config, device, visit):
    """(Condition, overlap latents [1, z, k, h, w]) of the new clip for a source video [3, F, H, W] at the run's
    size: the image condition (CLIP tokens of the anchors, y of the known frames) where the DiT takes one; the
    overlap encoded on its own (a clip's start: exactly the latents of the new clip's first frames)."""
    from kinema.pipeline.conditioning import Condition, build_condition

    frames = ext.clip_frames()
    _, _, height, width = video.shape
    condition = Condition()
    if dit_config.in_dim > vae.z_dim:
        anchors = anchor_images(ext, video, dit_config.model_type == "flf2v")
        with visit("clip"):
            tokens = torch.cat([clip.encode(a[None].to(clip.device)) for a in anchors], dim=1)
        with visit("vae"):
            y = build_condition(vae, known_frames(ext, video), frames, height, width)
        condition = Condition(tokens.to(device), y.to(device))
    with visit("vae"):
        z = vae.encode(video[:, -ext.overlap :][None].to(vae.device))
    return condition, z.to(device)
