"""Kinema: a video-generation engine for the Wan2.1 model family."""

__version__ = "0.1.0"

from kinema.errors import CheckpointError, KinemaError  # noqa: E402
from kinema.loading.clip import load_clip_vision  # noqa: E402
from kinema.loading.dit import load_dit  # noqa: E402
from kinema.loading.t5 import load_text_encoder  # noqa: E402
from kinema.loading.vae import load_vae  # noqa: E402

__all__ = ["load_dit", "load_vae", "load_text_encoder", "load_clip_vision", "KinemaError", "CheckpointError", "__version__"]
