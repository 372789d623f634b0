"""Opening media files: the checks and openers that both `read` and `metadata` need.

Kept apart so the dependency runs one way: `read` and `metadata` use this,
and `read` uses `metadata`, never the reverse.
"""

from __future__ import annotations

from pathlib import Path

from kinema.errors import KinemaError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def check_readable(path: Path, allow_dir: bool = False) -> None:
    """Fail early, naming the path, for the mistakes a decoder reports cryptically."""
    if not path.exists():
        raise KinemaError(f"{path} does not exist; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir() and not allow_dir:
        raise KinemaError(f"{path} is a directory; pass the path of an image or video file inside it")
    if path.is_file() and path.stat().st_size == 0:
        raise KinemaError(f"{path} is empty (0 bytes); it was probably not finished writing. Re-export it")


def open_container(path: Path):
    import av  # PyAV loads FFmpeg's libraries: only when a video is opened

    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise KinemaError(
            f"{path} is not a readable video ({e}): it is truncated, corrupt or not a video, and no frames "
            "could be read; check that it is a complete mp4/mov/webm file"
        ) from None


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise KinemaError(f"{path} is not a readable image ({e}); check that it is a complete, uncorrupted file") from None
