"""What a pipeline call returns, and saving it with the command line's writers and its settings embedded."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from kinema.errors import KinemaError

FORMAT_BY_SUFFIX = {".mp4": "h264-mp4", ".webm": "webm", ".mov": "prores-mov", ".gif": "gif", ".webp": "webp",
                    ".png": "png"}


def output_format(path, format: str | None, frames: int) -> str:
    """The writer format: `format` when given, else from the file's extension; a folder gets png for one
    frame, else h264-mp4."""
    if format is not None:
        return format
    suffix = Path(path).suffix.lower()
    if suffix and not Path(path).is_dir():
        if suffix not in FORMAT_BY_SUFFIX:
            raise KinemaError(f"{path}: unknown extension {suffix!r}; use one of {', '.join(FORMAT_BY_SUFFIX)} or pass "
                              "a format.")
        return FORMAT_BY_SUFFIX[suffix]
    return "png" if frames == 1 else "h264-mp4"


@dataclass
class Result:
    """One generated video (or image)."""

    video: torch.Tensor | None  # [3, F, H, W] float in [-1, 1]; None with decode=False
    latents: torch.Tensor  # [16, T, h, w] the final latents
    settings: dict  # every value used: the record embedded in saved files (`kinema generate --from` reads it)
    cache: object = field(default=None, repr=False)  # the run's StepCache (its counts), or None

    @cached_property
    def frames(self) -> np.ndarray | None:
        """uint8 [F, H, W, 3], as the writers store them (None with decode=False)."""
        from kinema.media import to_uint8_frames

        return None if self.video is None else to_uint8_frames(self.video)

    def save(self, path_or_dir, format: str | None = None, fps: float | None = None, **writer_options) -> Path:
        """Write the video with `kinema generate`'s writers (kinema.media.save_video) and return the path.

        A folder gets `PREFIX_00001.ext` (`filename_prefix`, default "kinema"); a file path is written as given.
        format: from the extension when None (png for one frame in a folder, else h264-mp4); fps: the model's
        (settings["fps"]). writer_options: save_video's (crf, pix_fmt, lossless, loop_count, pingpong, quality,
        filename_prefix). Never overwrites: an existing file is a KinemaError."""
        from kinema.media import save_video

        if self.video is None:
            raise KinemaError("this result was generated with decode=False; decode its latents first (or call with "
                              "decode=True).")
        if "overwrite" in writer_options:
            raise KinemaError("Result.save never overwrites; choose a new name or a folder.")
        fmt = output_format(path_or_dir, format, self.video.shape[1])
        fps = self.settings.get("fps", 16) if fps is None else fps
        metadata = {**self.settings, "fps": fps, "format": fmt}
        return save_video(self.frames, path_or_dir, format=fmt, frame_rate=fps, metadata=metadata, **writer_options)
