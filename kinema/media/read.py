"""Reading videos and images back as uint8 frames, and into the model's range.

Everything comes back as a torch uint8 tensor [F, H, W, 3] (RGB), the layout
`save_video` takes, so a clip can be read, edited and saved without thinking
about formats; `to_model_range` then gives the [3, F, H, W] floats in [-1, 1]
the VAE encodes (i2v / flf2v conditioning, video-to-video).

Images with transparency are composited onto white (what a viewer shows),
grayscale and palette images are expanded to RGB. Videos that `save_video`
padded to an even size are cropped back to the size that was asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.media.files import IMAGE_SUFFIXES, check_readable, open_container, open_image
from kinema.media.metadata import FRAME_SIZE_TAG, from_json, get_tag, sidecar_path
from kinema.media.yuv import frame_to_rgb

ANIMATED_SUFFIXES = {".gif", ".webp"}  # decoded with Pillow: FFmpeg cannot read animated WebP
DEFAULT_FPS = 16.0  # Wan2.1's rate, reported for stills and sequences without a sidecar
# Fraction of the declared length a complete file may still fall short by: WebM states only a duration
# in milliseconds, and an edit list can hide a frame or two that the mp4 index counts.
LENGTH_SLACK = 0.02


class Video(NamedTuple):
    frames: torch.Tensor  # [F, H, W, 3] uint8
    fps: float


def pil_rgb(im) -> np.ndarray:
    """One Pillow frame -> [H, W, 3] uint8; alpha is composited onto white."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if im.mode in ("I;16", "I;16B", "I"):  # 16-bit grayscale: keep the high byte
        return np.repeat((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def read_image(path: str | Path) -> torch.Tensor:
    """An image file -> [H, W, 3] uint8 (first frame of an animation)."""
    path = Path(path)
    check_readable(path)
    with open_image(path) as im:
        return torch.from_numpy(pil_rgb(im).copy())


def truncated(path: Path, read: int, declared: float | None, why: str) -> KinemaError:
    """The one message for a clip that stops early, so a cut-off download is never taken for a short clip."""
    of = f" of {declared:.0f}" if declared is not None else ""
    return KinemaError(
        f"{path} is truncated or corrupt: only {read}{of} frames could be read ({why}); re-export or re-copy the file"
    )


def _read_animation(path: Path, max_frames: int | None) -> Video:
    from PIL import ImageSequence

    frames, durations = [], []
    with open_image(path) as im:
        try:
            for frame in ImageSequence.Iterator(im):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                frames.append(pil_rgb(frame))
                durations.append(frame.info.get("duration") or 0)
        except (OSError, IndexError, ValueError, SyntaxError) as e:  # how Pillow says the data ran out
            raise truncated(path, len(frames), None, f"Pillow: {e}") from None
    mean_ms = sum(durations) / len(durations)
    return Video(torch.from_numpy(np.stack(frames)), 1000.0 / mean_ms if mean_ms > 0 else DEFAULT_FPS)


def _read_sequence(folder: Path, max_frames: int | None) -> Video:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
    if not files:
        raise KinemaError(f"{folder} is a directory with no PNG frames; pass a video file or a folder of numbered .png files")
    files = files[:max_frames] if max_frames is not None else files
    frames = [read_image(p).numpy() for p in files]
    if len({f.shape for f in frames}) > 1:
        raise KinemaError(f"the PNG frames in {folder} differ in size; a sequence needs frames of one size")
    side = sidecar_path(folder)
    fps = from_json(side.read_text(encoding="utf-8")).get("frame_rate", DEFAULT_FPS) if side.is_file() else DEFAULT_FPS
    return Video(torch.from_numpy(np.stack(frames)), float(fps))


def _declared_frames(container, stream) -> float | None:
    """How many frames the container says the stream holds; None where it does not say."""
    import av

    if stream.frames:  # mp4 / mov: the sample count of the index
        return float(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        return None
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base * rate)
    if container.duration and len(container.streams) == 1:  # the file's duration is its longest stream's
        return container.duration / av.time_base * float(rate)
    return None


def _read_container(path: Path, max_frames: int | None) -> Video:
    """Decode a video, refusing one that ends before its container says it should.

    FFmpeg stops quietly at most cuts: frame threading drops the frames of a
    packet that fails, the mp4 demuxer flags (but returns) a sample the end of
    the file cuts short, and a WebM cut between frames just ends. So a flagged
    packet, a decoder error, or fewer frames than the declared count or
    duration is an error that names how many frames could be read.
    """
    import av

    with open_container(path) as container:
        if not container.streams.video:
            raise KinemaError(f"{path} has no video stream; pass a video file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        size = get_tag(container.metadata, FRAME_SIZE_TAG)
        declared = _declared_frames(container, stream)
        frames, damage = [], None
        try:
            for packet in container.demux(stream):
                if packet.is_corrupt:
                    damage = f"the packet at {float(packet.pts * packet.time_base):.3g}s is cut short"
                    break
                frames.extend(frame_to_rgb(frame) for frame in packet.decode())
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.FFmpegError as e:
            damage = f"FFmpeg: {e}"
        rate = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
    frames = frames[:max_frames]
    if damage is not None:
        raise truncated(path, len(frames), declared, damage)
    if declared is not None:
        wanted = declared if max_frames is None else min(declared, max_frames)
        if len(frames) < wanted * (1 - LENGTH_SLACK) - 0.5:
            raise truncated(path, len(frames), declared, "the file ends before its stated length")
    if not frames:
        raise KinemaError(f"{path} holds no video frames; it is empty or truncated. Re-export it")
    video = np.stack(frames)  # [F, H, W, 3]
    if size:
        w, h = (int(v) for v in size.split("x"))
        video = video[:, :h, :w]
    return Video(torch.from_numpy(np.ascontiguousarray(video)), float(rate))


def read_video(path: str | Path, max_frames: int | None = None) -> Video:
    """A video, animation, PNG-sequence folder or still -> Video(frames [F, H, W, 3] uint8, fps).

    `max_frames` stops decoding early (the first frames of a long clip for i2v).
    """
    path = Path(path)
    check_readable(path, allow_dir=True)
    if path.is_dir():
        return _read_sequence(path, max_frames)
    suffix = path.suffix.lower()
    if suffix in ANIMATED_SUFFIXES:
        return _read_animation(path, max_frames)
    if suffix in IMAGE_SUFFIXES:
        with open_image(path) as im:
            fps = from_json(im.info.get("kinema")).get("frame_rate", DEFAULT_FPS)
        return Video(read_image(path)[None], float(fps))
    return _read_container(path, max_frames)


def first_frame(path: str | Path) -> torch.Tensor:
    """The first frame [H, W, 3] uint8 of a video or image (e.g. to continue a clip with i2v)."""
    return read_video(path, max_frames=1).frames[0]


def last_frame(path: str | Path) -> torch.Tensor:
    """The last frame [H, W, 3] uint8: the natural start image for extending a clip."""
    return read_video(path).frames[-1]


def to_model_range(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] (or one image [H, W, 3]) -> float32 [3, F, H, W] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.dtype != torch.uint8:
        raise KinemaError(f"to_model_range expects uint8 frames, got {x.dtype}; pass what read_video returns")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise KinemaError(f"to_model_range expects frames [F, H, W, 3], got shape {tuple(x.shape)}")
    return x.permute(3, 0, 1, 2).float().div(127.5).sub(1.0).contiguous()  # [3, F, H, W]
