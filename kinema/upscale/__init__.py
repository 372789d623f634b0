"""Upscaling a generated video: Kinema's learned cascade (kinema/models/upscaler.py), pixel upscalers users
already have (Real-ESRGAN family, through spandrel), tiled so large frames fit, and the refine stage's resize."""

from kinema.upscale.load import BUILTIN_UPSCALER, Upscaler, load_upscaler, save_upscaler
from kinema.upscale.run import resize_video, upscale_video

__all__ = ["BUILTIN_UPSCALER", "Upscaler", "load_upscaler", "resize_video", "save_upscaler", "upscale_video"]
