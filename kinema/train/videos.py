"""Captioned real videos for training: caption files, up-front validation, and the clip dataset.

A dataset is a captions file or a folder:
- JSON: a list of {"file" | "video" | "file_path": ..., "text" | "caption" | "prompt": ...}
  objects (EasyAnimate's metadata format), or a {filename: caption} mapping;
- CSV: a header naming a file column and a caption column (same names);
- a folder holding captions.json / captions.csv / metadata.json / metadata.csv,
  or else videos with .txt sidecars (clip.mp4 + clip.txt).
Paths are relative to the captions file's folder unless absolute. Images
(png / jpg / webp) are 1-frame videos.

`validate` finds every problem before training starts and raises them as one
`KinemaError`; `VideoClips` gives each item as a [3, F, H, W] clip in [-1, 1],
sampled from a seeded random start and cropped to the item's aspect bucket.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kinema.errors import KinemaError
from kinema.media.metadata import FRAME_SIZE_TAG, get_tag
from kinema.media.read import (ANIMATED_SUFFIXES, DEFAULT_FPS, IMAGE_SUFFIXES, check_readable,
                               open_container, open_image, read_video)
from kinema.media.yuv import frame_to_rgb
from kinema.train.buckets import aspect_buckets, nearest_bucket, token_bucket

CAPTION_FILES = ("captions.json", "captions.csv", "metadata.json", "metadata.csv")
FILE_KEYS = ("file", "video", "file_path")
TEXT_KEYS = ("text", "caption", "prompt")
VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".gif", ".webp"}
PIL_SUFFIXES = IMAGE_SUFFIXES | ANIMATED_SUFFIXES  # decoded with Pillow, as read_video does
MEDIA_SUFFIXES = VIDEO_SUFFIXES | IMAGE_SUFFIXES
MAX_SHOWN = 8  # problems listed in one error


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int
    fps: float


@dataclass(frozen=True)
class CaptionedVideo:
    path: Path
    caption: str
    source: str = ""  # where it was listed, for messages: "captions.json item 3"
    info: VideoInfo | None = None  # filled by validate / probe_video


def _raise(problems: list[str]) -> None:
    n = len(problems)
    lines = "\n".join(f"  - {p}" for p in problems[:MAX_SHOWN])
    more = f"\n  ... and {n - MAX_SHOWN} more" if n > MAX_SHOWN else ""
    raise KinemaError(f"{n} problem{'s' if n != 1 else ''} in the training data; fix "
                      f"{'them' if n != 1 else 'it'} before training:\n{lines}{more}")


def _first(row: dict, keys: Sequence[str]) -> object:
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    return next((lower[k] for k in keys if lower.get(k) not in (None, "")), None)


def _rows(base: Path, rows: list[tuple[str, object]]) -> tuple[list[CaptionedVideo], list[str]]:
    """(where, row) pairs -> items and the problems of the rows that are not usable."""
    items, problems = [], []
    for where, row in rows:
        if not isinstance(row, dict):
            problems.append(f"{where} is {type(row).__name__}, not an object with a file and a caption")
            continue
        file, text = _first(row, FILE_KEYS), _first(row, TEXT_KEYS)
        if not isinstance(file, str) or not file.strip():
            problems.append(f"{where} has no file (give one of {', '.join(FILE_KEYS)})")
        elif not isinstance(text, str) or not text.strip():
            problems.append(f"{where} ({file}) has no caption (give one of {', '.join(TEXT_KEYS)})")
        else:
            path = Path(file.strip()).expanduser()
            items.append(CaptionedVideo(path if path.is_absolute() else base / path, text.strip(), where))
    return items, problems


def _load_json(path: Path) -> tuple[list[CaptionedVideo], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        return [], [f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} (char {e.pos})"]
    except UnicodeDecodeError as e:
        return [], [f"{path} is not UTF-8 text ({e})"]
    if isinstance(data, dict):
        rows = [(f"{path.name} entry {k!r}", {"file": k, "text": v}) for k, v in data.items()]
    elif isinstance(data, list):
        rows = [(f"{path.name} item {i}", row) for i, row in enumerate(data)]
    else:
        return [], [f"{path} holds a JSON {type(data).__name__}; expected a list of "
                    "{\"file\": ..., \"text\": ...} objects or a {filename: caption} mapping"]
    return _rows(path.parent, rows)


def _load_csv(path: Path) -> tuple[list[CaptionedVideo], list[str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return [], [f"{path} is not UTF-8 text ({e})"]
    reader = csv.reader(io.StringIO(text), strict=True)
    rows: list[tuple[str, object]] = []
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if not header:
            return [], [f"{path} is empty; it needs a header with a file and a caption column"]
        missing = [f"{path} has no {what} column (one of {', '.join(keys)}); its header is {header}"
                   for what, keys in (("file", FILE_KEYS), ("caption", TEXT_KEYS)) if not set(keys) & set(header)]
        if missing:
            return [], missing
        for row in reader:
            if any(c.strip() for c in row):
                rows.append((f"{path.name} line {reader.line_num}", dict(zip(header, row))))
    except csv.Error as e:
        return [], [f"{path} is not valid CSV: {e} at line {reader.line_num}"]
    return _rows(path.parent, rows)


def _load_folder(folder: Path) -> tuple[list[CaptionedVideo], list[str]]:
    for name in CAPTION_FILES:
        if (folder / name).is_file():
            return _load(folder / name)
    media = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES
                   and not p.name.startswith("."))
    if not media:
        return [], [f"{folder} holds no videos: no {' / '.join(CAPTION_FILES)} and no video or image files"]
    items, problems = [], []
    for p in media:
        txt = p.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8-sig").strip() if txt.is_file() else ""
        if caption:
            items.append(CaptionedVideo(p, caption, txt.name))
        else:
            problems.append(f"{p} has no caption: {txt.name} is {'empty' if txt.is_file() else 'missing'}")
    return items, problems


def _load(path: Path) -> tuple[list[CaptionedVideo], list[str]]:
    if not path.exists():
        return [], [f"captions file {path} does not exist (relative paths start at {Path.cwd()})"]
    if path.is_dir():
        return _load_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        items, problems = _load_json(path)
    elif suffix == ".csv":
        items, problems = _load_csv(path)
    else:
        return [], [f"{path} is not a captions file; pass a .json or .csv file, or a folder"]
    if not items and not problems:
        problems.append(f"{path} lists no videos")
    return items, problems


def read_captions(path: str | os.PathLike) -> list[CaptionedVideo]:
    """The (video path, caption) items of a captions file or folder; raises on unusable rows.
    Files are not opened: `validate` does that."""
    items, problems = _load(Path(path).expanduser())
    if problems:
        _raise(problems)
    return items


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Size, frame count and rate of a video or image, decoding only its first frame."""
    import av

    path = Path(path)
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix in PIL_SUFFIXES:
        with open_image(path) as im:
            n = getattr(im, "n_frames", 1) if suffix in ANIMATED_SUFFIXES else 1
            ms = im.info.get("duration") or 0
            return VideoInfo(im.width, im.height, n, 1000.0 / ms if n > 1 and ms > 0 else DEFAULT_FPS)
    with open_container(path) as container:
        if not container.streams.video:
            raise KinemaError(f"{path} has no video stream; pass a video file")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        n = stream.frames
        if not n and stream.duration and stream.time_base:
            n = round(float(stream.duration * stream.time_base) * rate)
        if not n and container.duration:
            n = round(container.duration / av.time_base * rate)
        try:
            frame = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise KinemaError(f"{path} could not be decoded ({e}); the file is corrupt or truncated") from None
        if frame is None:
            raise KinemaError(f"{path} holds no video frames; it is empty or truncated. Re-export it")
        width, height = frame.width, frame.height
        size = get_tag(container.metadata, FRAME_SIZE_TAG)
    if size:
        width, height = (int(v) for v in size.split("x"))
    return VideoInfo(width, height, max(int(n or 1), 1), rate)


def _is_still(item: CaptionedVideo) -> bool:
    return item.path.suffix.lower() in PIL_SUFFIXES and item.info is not None and item.info.frames == 1


def validate(source: str | os.PathLike | Sequence[CaptionedVideo], probe: bool = True,
             min_frames: int | None = None) -> list[CaptionedVideo]:
    """Every problem of a dataset (a captions file, a folder or items) as one KinemaError; else the
    items, probed (with `info`) when `probe` or `min_frames` is given. Videos shorter than
    `min_frames` are problems; stills are exempt (they train as 1-frame clips)."""
    if isinstance(source, (str, os.PathLike)):
        items, problems = _load(Path(source).expanduser())
    else:
        items, problems = list(source), []
        if not items:
            problems.append("no videos to train on: the item list is empty")
    out = []
    for item in items:
        where = f" (listed in {item.source})" if item.source else ""
        if not item.path.is_file():
            problems.append(f"video {item.path.name} does not exist: {item.path}{where}")
            continue
        if (probe or min_frames) and item.info is None:
            try:
                item = replace(item, info=probe_video(item.path))
            except KinemaError as e:
                problems.append(f"{e}{where}")
                continue
        if min_frames and item.info and item.info.frames < min_frames and not _is_still(item):
            problems.append(f"video {item.path.name} has {item.info.frames} frames, fewer than the "
                            f"{min_frames} needed{where}")
            continue
        out.append(item)
    if problems:
        _raise(problems)
    return out


def decode_frames(path: Path, indices: Sequence[int]) -> torch.Tensor:
    """The frames at ascending `indices` as uint8 [len(indices), H, W, 3]; indices past the end
    repeat the last frame. Container videos convert only the frames kept."""
    import av

    last = max(indices)
    if path.suffix.lower() in PIL_SUFFIXES:
        frames = read_video(path, max_frames=last + 1).frames
        return frames[[min(i, len(frames) - 1) for i in indices]]
    wanted, got, final = set(indices), {}, None
    with open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        size = get_tag(container.metadata, FRAME_SIZE_TAG)
        try:
            for i, frame in enumerate(container.decode(stream)):
                final = (i, frame)
                if i in wanted:
                    got[i] = frame_to_rgb(frame)
                if i >= last:
                    break
        except av.FFmpegError as e:
            if final is None:
                raise KinemaError(f"{path} could not be decoded ({e}); the file is corrupt or truncated") from None
    if final is None:
        raise KinemaError(f"{path} holds no video frames; it is empty or truncated. Re-export it")
    if final[0] not in got:
        got[final[0]] = frame_to_rgb(final[1])
    video = np.stack([got[i] if i in got else got[final[0]] for i in indices])  # [F, H, W, 3]
    if size:
        w, h = (int(v) for v in size.split("x"))
        video = video[:, :h, :w]
    return torch.from_numpy(np.ascontiguousarray(video))


def resize_crop(frames: torch.Tensor, width: int, height: int, chunk: int = 8) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [3, F, height, width] in [-1, 1]: scaled (antialiased) to cover
    the size, then centre-cropped."""
    _, H, W, _ = frames.shape
    s = max(width / W, height / H)
    nh, nw = max(height, round(H * s)), max(width, round(W * s))
    top, left = (nh - height) // 2, (nw - width) // 2
    out = []
    for part in frames.split(chunk):
        x = part.permute(0, 3, 1, 2).float()  # [f, 3, H, W]
        if (nh, nw) != (H, W):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        out.append(x[..., top : top + height, left : left + width])
    return torch.cat(out).clamp(0, 255).div(127.5).sub(1.0).permute(1, 0, 2, 3).contiguous()


class Tokenizer(Protocol):
    def token_ids(self, text: str) -> list[int]: ...


class VideoClips(Dataset):
    """Item i -> {"video": float [3, F, H, W] in [-1, 1], "caption": str, "path": str}.

    F is `num_frames` (4n+1), or for a video too short for it the largest 4n+1
    it holds, and 1 for stills. Frames are taken every `stride` source frames,
    or at `fps` (a step of source fps / fps) when given, squeezed to fit a clip
    that is too short, from a start drawn from (seed, epoch, index).
    (width, height) is the item's nearest aspect bucket (`aspect_buckets(base_area)`
    unless `buckets` are given). Call `set_epoch` with the sampler's epoch.
    """

    def __init__(self, source: str | os.PathLike | Sequence[CaptionedVideo], num_frames: int = 17, stride: int = 1,
                 fps: float | None = None, buckets: Sequence[tuple[int, int]] | None = None,
                 base_area: int = 64 * 64, multiple: int = 16, seed: int = 0):
        if num_frames < 1 or (num_frames - 1) % 4:
            raise KinemaError(f"num_frames must be 4n+1 (1, 5, 9, ..., 81), got {num_frames}")
        if stride < 1 or (fps is not None and fps <= 0):
            raise KinemaError(f"stride must be >= 1 and fps positive, got stride={stride}, fps={fps}")
        self.items = validate(source, probe=True)
        self.num_frames, self.stride, self.fps, self.seed, self.epoch = num_frames, stride, fps, seed, 0
        self.buckets = list(buckets) if buckets else aspect_buckets(base_area, multiple)
        self.sizes = [nearest_bucket(it.info.width, it.info.height, self.buckets) for it in self.items]
        self.frames = [1 if it.info.frames < 5 else min(num_frames, (it.info.frames - 1) // 4 * 4 + 1)
                       for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def bucket_keys(self, tokenizer: Tokenizer | None = None, token_multiple: int = 8) -> list[tuple[int, ...]]:
        """(frames, width, height[, token_bucket]) per item, for `BucketBatchSampler`."""
        keys = [(f, *size) for f, size in zip(self.frames, self.sizes)]
        if tokenizer is None:
            return keys
        return [(*k, token_bucket(len(tokenizer.token_ids(it.caption)), token_multiple))
                for k, it in zip(keys, self.items)]

    def frame_indices(self, index: int, epoch: int | None = None) -> list[int]:
        """The source frames item `index` uses in `epoch` (default: the current one)."""
        n, f = self.items[index].info.frames, self.frames[index]
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])
        if f == 1:
            return [int(rng.integers(n))]
        step = self.items[index].info.fps / self.fps if self.fps else float(self.stride)
        step = min(step, (n - 1) / (f - 1))
        start = int(rng.integers(int(n - 1 - (f - 1) * step + 1e-6) + 1))
        return [min(n - 1, start + int(k * step + 1e-6)) for k in range(f)]

    def __getitem__(self, index: int) -> dict:
        item, (width, height) = self.items[index], self.sizes[index]
        frames = decode_frames(item.path, self.frame_indices(index))
        return {"video": resize_crop(frames, width, height), "caption": item.caption, "path": str(item.path)}
