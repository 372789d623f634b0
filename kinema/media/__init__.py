"""Saving and loading clips: ComfyUI Video Combine-style writers, readers, and metadata.

    check_save("outputs", format="h264-mp4")  # before sampling: bad options fail in seconds
    path = save_video(vae_output, "outputs", format="h264-mp4", metadata={"prompt": ..., "seed": 42})
    frames, fps = read_video(path)          # uint8 [F, H, W, 3]
    read_metadata(path)["seed"]             # 42
"""

from kinema.media.metadata import read_metadata
from kinema.media.read import Video, first_frame, last_frame, read_image, read_video, to_model_range
from kinema.media.write import FORMATS, check_save, pingpong_frames, save_video, to_uint8_frames

__all__ = [
    "FORMATS",
    "Video",
    "check_save",
    "first_frame",
    "last_frame",
    "pingpong_frames",
    "read_image",
    "read_metadata",
    "read_video",
    "save_video",
    "to_model_range",
    "to_uint8_frames",
]
