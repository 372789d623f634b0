"""`save_video`: frames -> an mp4 / webm / mov / gif / webp / png file, like ComfyUI's Video Combine.

Formats and their knobs follow VideoHelperSuite so ComfyUI users find what
they know: `h264-mp4` with `crf` 19 and `yuv420p` (or `yuv420p10le`),
`h265-mp4`, `webm` (VP9), `prores-mov` (ProRes 422 HQ, for editing),
animated `gif` and `webp` with `loop_count` (0 = forever), a `png` still
(1-frame text-to-image) and a `png-sequence` folder. Names, the
never-overwrite rule and atomic writes are in `naming`, where metadata goes
is in `metadata`. `check_save` refuses bad options and an output place that
cannot be written before a run starts; `save_video` runs it first.

Choices a caller may trip over:
- yuv420 / yuv422 need an even width and height; odd sizes are padded by
  repeating the last row/column (h265 also up to 64x64, below which libx265
  crashes), the true size goes into the `kinema_frame_size` tag and
  `read_video` crops it off again.
- Colour is converted with BT.709 (limited range) and tagged so, which is what
  browsers and players assume for HD video.
- Pillow's gif and webp encoders fold a frame identical to the one before it
  into that frame's duration: the timing is kept, the decoded count may drop.
- `lossless` is exact for webp and png; for the video codecs it switches the
  encoder to its lossless mode, but the RGB -> YUV conversion (and 4:2:0
  chroma, unless `pix_fmt="yuv444p"`) still rounds. ProRes ignores it and `crf`.
"""

from __future__ import annotations

import errno
import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.media import metadata as meta
from kinema.media import naming
from kinema.media.yuv import rgb_to_frame


@dataclass(frozen=True)
class Format:
    ext: str  # file extension without the dot; "" for a folder
    codec: str | None = None  # PyAV encoder; None for formats written by Pillow
    muxer: str | None = None  # FFmpeg container
    pix_fmt: str | None = None  # default pixel format
    max_crf: int = 51
    min_size: int = 2  # smallest width / height the encoder handles safely


FORMATS = {
    "h264-mp4": Format("mp4", "libx264", "mp4", "yuv420p"),
    # libx265 corrupts its heap on frames smaller than one 64x64 CTU (seen with flat content).
    "h265-mp4": Format("mp4", "libx265", "mp4", "yuv420p", min_size=64),
    "webm": Format("webm", "libvpx-vp9", "webm", "yuv420p", max_crf=63),
    "prores-mov": Format("mov", "prores_ks", "mov", "yuv422p10le"),
    "gif": Format("gif"),
    "webp": Format("webp"),
    "png": Format("png"),
    "png-sequence": Format(""),
}


def to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any of Kinema's frame layouts -> uint8 [F, H, W, 3].

    Accepted: uint8 [F, H, W, 3] or [H, W, 3] (what the readers give), and the
    VAE's float output [3, F, H, W] or [1, 3, F, H, W] in [-1, 1].
    """
    x = frames.detach().cpu() if isinstance(frames, torch.Tensor) else torch.as_tensor(np.asarray(frames))
    shape = tuple(x.shape)
    if x.dtype == torch.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise KinemaError(f"uint8 frames must be [F, H, W, 3] or [H, W, 3] RGB, got shape {shape}")
        return np.ascontiguousarray(x.numpy())
    if not x.is_floating_point():
        raise KinemaError(f"frames must be uint8 [F, H, W, 3] or float [3, F, H, W] in [-1, 1], got {x.dtype}")
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise KinemaError(f"float frames [B, 3, F, H, W] have batch {x.shape[0]}; save one video at a time: frames[i]")
        x = x[0]
    if x.ndim != 4 or x.shape[0] != 3:
        raise KinemaError(
            f"float frames must be the VAE's [3, F, H, W] or [1, 3, F, H, W] in [-1, 1], got shape {shape}; "
            "for [F, H, W, 3] images convert to uint8 first"
        )
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, F, H, W]
    return np.ascontiguousarray(x.permute(1, 2, 3, 0).numpy())  # [F, H, W, 3]


def pingpong_frames(frames: np.ndarray) -> np.ndarray:
    """Forward then backward without repeating either end: F frames -> 2F - 2 (a seamless loop)."""
    return frames if len(frames) < 3 else np.concatenate([frames, frames[-2:0:-1]])


def pad_frames(frames: np.ndarray, min_size: int = 2) -> np.ndarray:
    """Repeat the last row / column until H and W are even (4:2:0 and 4:2:2 chroma need it)
    and at least `min_size`."""
    _, h, w, _ = frames.shape
    ph, pw = max(h + h % 2, min_size) - h, max(w + w % 2, min_size) - w
    if ph == 0 and pw == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


def _check_codec(name: str, fmt: Format, pix_fmt: str) -> None:
    import av

    if fmt.codec not in av.codecs_available:
        raise KinemaError(
            f"format {name!r} needs the {fmt.codec} encoder, which this PyAV/FFmpeg build lacks; "
            f"choose another format or install a PyAV build with {fmt.codec}"
        )
    allowed = [f.name for f in av.Codec(fmt.codec, "w").video_formats or []]
    if pix_fmt not in allowed:
        raise KinemaError(f"pix_fmt {pix_fmt!r} is not supported by {fmt.codec} here; use one of {allowed}")


def _encoder_options(codec: str, crf: int, lossless: bool, pix_fmt: str) -> dict[str, str]:
    if codec == "libx264":
        return {"qp": "0"} if lossless else {"crf": str(crf)}
    if codec == "libx265":
        return {"x265-params": "log-level=error" + (":lossless=1" if lossless else ""), "crf": str(crf)}
    if codec == "libvpx-vp9":
        return {"lossless": "1"} if lossless else {"crf": str(crf), "b": "0", "row-mt": "1"}
    if codec == "prores_ks":  # 3 = 422 HQ, 4 = 4444
        return {"profile": "4" if pix_fmt.startswith("yuv444") else "3"}
    return {}


def _write_av(frames, tmp: Path, fmt: Format, fps: Fraction, crf: int, pix_fmt: str, lossless: bool, tags: dict) -> None:
    import av

    _, h, w, _ = frames.shape
    padded = pad_frames(frames, fmt.min_size)  # [F, H', W', 3]
    if padded.shape != frames.shape:
        tags = {**tags, meta.FRAME_SIZE_TAG: f"{w}x{h}"}
    options = {"movflags": "use_metadata_tags+faststart"} if fmt.muxer in ("mp4", "mov") else {}
    with av.open(str(tmp), "w", format=fmt.muxer, options=options) as container:
        container.metadata.update(tags)
        stream = container.add_stream(fmt.codec, rate=fps, options=_encoder_options(fmt.codec, crf, lossless, pix_fmt))
        stream.width, stream.height, stream.pix_fmt = padded.shape[2], padded.shape[1], pix_fmt
        cc = stream.codec_context
        cc.colorspace = cc.color_primaries = cc.color_trc = 1  # BT.709
        cc.color_range = 1  # limited ("tv")
        for i, rgb in enumerate(padded):
            frame = rgb_to_frame(rgb, pix_fmt)
            frame.pts = i
            container.mux(_checked_dts(stream.encode(frame), len(padded)))
        container.mux(_checked_dts(stream.encode(None), len(padded)))


def _checked_dts(packets: list, frames: int) -> list:
    """libx265 under FFmpeg 8 leaves the dts of a 1- or 2-frame clip uninitialised (seen: -1.4e14,
    8.5e18), which the mp4 muxer refuses; a dts can only lie at or before its pts, by less than
    the clip's length, and a packet outside that is given its pts, as in a clip with no reordering."""
    for packet in packets:
        if packet.dts is not None and packet.pts is not None and not packet.pts - frames <= packet.dts <= packet.pts:
            packet.dts = packet.pts
    return packets


def _pil_frames(frames: np.ndarray):
    from PIL import Image

    return [Image.fromarray(f) for f in frames]


def _write_gif(frames: np.ndarray, tmp: Path, fps: float, loop_count: int) -> None:
    """Clips with <= 256 colours get an exact palette; others Pillow's adaptive one, per frame."""
    from PIL import Image

    colours = np.unique(frames.reshape(-1, 3), axis=0)
    if len(colours) <= 256:
        palette = colours.astype(np.uint8)  # [C, 3]
        keys = frames.reshape(-1, 3).astype(np.int32) @ np.array([65536, 256, 1])
        index = np.searchsorted(palette.astype(np.int32) @ np.array([65536, 256, 1]), keys).astype(np.uint8)
        index = index.reshape(frames.shape[:3])  # [F, H, W]
        flat = palette.reshape(-1).tolist() + [0] * (768 - palette.size)
        images = []
        for idx in index:
            im = Image.fromarray(idx, mode="P")
            im.putpalette(flat)
            images.append(im)
    else:
        images = _pil_frames(frames)
    images[0].save(
        tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=loop_count, optimize=False
    )


def _write_webp(frames: np.ndarray, tmp: Path, fps: float, loop_count: int, lossless: bool, quality: int,
                comfy: dict | None = None) -> None:
    images = _pil_frames(frames)
    extra = {}
    if comfy:  # ComfyUI's SaveAnimatedWEBP: EXIF Model (0x0110) "prompt:{...}", Make (0x010F) "workflow:{...}"
        from PIL import Image

        exif = Image.Exif()
        for tag, key in ((0x0110, "prompt"), (0x010F, "workflow")):
            if key in comfy:
                exif[tag] = f"{key}:{comfy[key]}"
        extra["exif"] = exif
    images[0].save(
        tmp, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000.0 / fps),
        loop=loop_count, lossless=lossless, quality=100 if lossless else quality, method=4, **extra,
    )


def comfy_keys(metadata: dict | None) -> dict[str, str]:
    """ComfyUI's own metadata keys, where a record has them (workflow outputs): "prompt" (the API prompt) and
    "workflow" (the editor's graph), each as JSON. ComfyUI's editor loads a file by drag and drop from these:
    PNG text chunks, container tags of mp4 / webm, and the EXIF strings of an animated WebP."""
    if not isinstance(metadata, dict):
        return {}
    import json

    return {k: json.dumps(metadata[k]) for k in ("prompt", "workflow") if isinstance(metadata.get(k), dict)}


def _write_png(image: np.ndarray, path: Path, text: str | None, comfy: dict | None = None) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text is not None:
        info.add_itxt(meta.PNG_KEY, text)
    for key, value in (comfy or {}).items():
        info.add_text(key, value)
    Image.fromarray(image).save(path, format="PNG", pnginfo=info, compress_level=4)


def _write_sequence(frames: np.ndarray, folder: Path, text: str | None, comfy: dict | None = None) -> None:
    folder.mkdir()
    for i, frame in enumerate(frames, start=1):
        _write_png(frame, folder / f"frame_{i:05d}.png", text, comfy)


def _whole(value) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )


def _check(path, format, frame_rate, loop_count, crf, pix_fmt, quality, filename_prefix, overwrite):
    """`check_save`, also giving the explicit file (None for a counter name) that `save_video` writes."""
    if format not in FORMATS:
        raise KinemaError(f"unknown format {format!r}; choose one of {sorted(FORMATS)}")
    fmt = FORMATS[format]
    is_number = isinstance(frame_rate, numbers.Real) and not isinstance(frame_rate, bool)
    if not is_number or not math.isfinite(frame_rate) or frame_rate <= 0:
        raise KinemaError(f"frame_rate {frame_rate!r} is not a positive number; Wan2.1 clips play at 16")
    if not _whole(loop_count) or not 0 <= loop_count <= 65535:
        raise KinemaError(f"loop_count {loop_count!r} is not a whole number in 0..65535; pass 0 to loop forever")
    if fmt.codec:
        if not _whole(crf) or not 0 <= crf <= fmt.max_crf:
            raise KinemaError(
                f"crf {crf!r} is out of range for {format}; use a whole number in 0..{fmt.max_crf} (lower is better; 19 is typical)"
            )
        _check_codec(format, fmt, pix_fmt or fmt.pix_fmt)
    if format == "webp" and (not _whole(quality) or not 0 <= quality <= 100):
        raise KinemaError(f"quality {quality!r} is not a whole number in 0..100; 90 is typical for lossy webp")

    path = Path(path)
    try:
        return _target(path, format, fmt, filename_prefix, overwrite)
    except OSError as e:  # a folder above that cannot be searched, a read-only or full file system
        raise naming.write_error(path, e) from None


def _target(path: Path, format: str, fmt: Format, prefix: str, overwrite: bool) -> tuple[Path | None, Path]:
    """(the explicit file, or None for a counter name; the folder it goes in, created and tried)."""
    if path.is_dir() or not path.suffix or not fmt.ext:
        naming.check_prefix(prefix)
        explicit, folder = None, path
    else:
        if path.suffix.lower() != f".{fmt.ext}":
            raise KinemaError(f"{path} ends in {path.suffix} but {format} writes .{fmt.ext}; rename it or change format")
        for p in (path, meta.sidecar_path(path)):
            if p.exists() and not overwrite:
                raise KinemaError(
                    f"{p} already exists and will not be overwritten; pass overwrite=True, "
                    "or a directory to get the next free prefix_00001-style name"
                )
        explicit, folder = path, path.parent
    folder.mkdir(parents=True, exist_ok=True)
    naming.check_writable(folder)
    return explicit, folder


def check_save(
    path: str | Path = "output",
    format: str = "h264-mp4",
    frame_rate: float = 16,
    loop_count: int = 0,
    crf: int = 19,
    pix_fmt: str | None = None,
    lossless: bool = False,
    quality: int = 90,
    filename_prefix: str = "kinema",
    overwrite: bool = False,
) -> Path:
    """Refuse, before minutes of sampling, what `save_video` would refuse after them; return the output folder.

    Everything that does not depend on the frames: the format and its options,
    the encoder and pixel format in this FFmpeg build, the file name, and an
    output folder that can be written (it is created if missing). `save_video`
    runs the same checks, so the two cannot disagree. `lossless` has no
    invalid value; it is accepted so callers can pass the writer's options as one dict.
    """
    return _check(path, format, frame_rate, loop_count, crf, pix_fmt, quality, filename_prefix, overwrite)[1]


def save_video(
    frames: torch.Tensor | np.ndarray,
    path: str | Path = "output",
    format: str = "h264-mp4",
    frame_rate: float = 16,
    loop_count: int = 0,
    pingpong: bool = False,
    crf: int = 19,
    pix_fmt: str | None = None,
    lossless: bool = False,
    quality: int = 90,
    filename_prefix: str = "kinema",
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write frames (see `to_uint8_frames`) and return the path written.

    `path` is a directory (the file is named `filename_prefix_00001.ext` with
    the next free counter) or an explicit file path, which is never replaced
    unless `overwrite=True`. `png-sequence` always writes a counter-named
    folder of `frame_00001.png`... inside `path`.
    `crf` / `pix_fmt` (default per format; `yuv420p10le` for 10-bit) apply to
    the video codecs, `loop_count` (0 = forever) to gif / webp, `quality` to
    lossy webp. `metadata` (JSON-serialisable) is embedded; see `metadata`.
    """
    explicit, folder = _check(path, format, frame_rate, loop_count, crf, pix_fmt, quality, filename_prefix, overwrite)
    fmt = FORMATS[format]
    video = to_uint8_frames(frames)  # [F, H, W, 3]
    if video.shape[0] == 0 or video.shape[1] == 0 or video.shape[2] == 0:
        raise KinemaError(f"nothing to save: frames have shape {video.shape}")
    if pingpong:
        video = pingpong_frames(video)
    if format == "png" and len(video) != 1:
        raise KinemaError(f"format 'png' writes one image but got {len(video)} frames; use 'png-sequence' or pass frames[-1]")
    text = meta.to_json(metadata) if metadata is not None else None
    sidecar = None
    if format == "png-sequence":
        sidecar = meta.to_json({"frame_rate": float(frame_rate), **(metadata or {})})
    elif format in ("gif", "webp") and text is not None:
        sidecar = text

    naming.remove_stale(folder)
    tmp = naming.temp_path(explicit or folder / f"{filename_prefix}.{fmt.ext or 'frames'}")
    side_tmp = naming.temp_path(folder / f"{filename_prefix}.json") if sidecar is not None else None
    try:
        if fmt.codec:
            rate = Fraction(float(frame_rate)).limit_denominator(1001)
            tags = {**comfy_keys(metadata), **({meta.COMMENT_TAG: text} if text is not None else {})}
            _write_av(video, tmp, fmt, rate, int(crf), pix_fmt or fmt.pix_fmt, lossless, tags)
        elif format == "gif":
            _write_gif(video, tmp, float(frame_rate), int(loop_count))
        elif format == "webp":
            _write_webp(video, tmp, float(frame_rate), int(loop_count), lossless, int(quality), comfy_keys(metadata))
        elif format == "png":
            _write_png(video[0], tmp, text, comfy_keys(metadata))
        else:
            _write_sequence(video, tmp, text, comfy_keys(metadata))
        if side_tmp is not None:  # written before anything is published, so a full disk stops both
            side_tmp.write_text(sidecar, encoding="utf-8")
        final = _publish(tmp, explicit, folder, filename_prefix, fmt.ext, overwrite)
        if side_tmp is not None:
            side = meta.sidecar_path(final)
            try:
                naming.publish(side_tmp, side, overwrite=explicit is not None and overwrite)
            except FileExistsError:
                raise KinemaError(f"{side} appeared while writing {final}; another run is using this name") from None
    except OSError as e:
        if e.errno not in errno.errorcode:  # Pillow's encoder errors and FFmpeg's own codes are no I/O failure
            raise
        raise naming.write_error(explicit or folder, e) from None
    finally:
        naming.remove(tmp)
        if side_tmp is not None:
            naming.remove(side_tmp)
    return final


def _publish(tmp: Path, explicit: Path | None, folder: Path, prefix: str, ext: str, overwrite: bool) -> Path:
    """Move the finished file into place; a counter name that another run took meanwhile is skipped."""
    if explicit is not None:
        try:
            naming.publish(tmp, explicit, overwrite)
        except FileExistsError:
            raise KinemaError(f"{explicit} already exists and will not be overwritten; pass overwrite=True") from None
        return explicit
    for _ in range(100):
        final = folder / naming.counter_name(prefix, naming.next_counter(folder, prefix), ext)
        try:
            naming.publish(tmp, final)
            return final
        except FileExistsError:
            continue
    raise KinemaError(f"could not find a free name for {prefix!r} in {folder}; pass a different filename_prefix")
