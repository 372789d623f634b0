"""Kinema: a video-generation engine for the Wan2.1 model family.

    pipe = kinema.Pipeline.load()      # the built-in model, or a checkpoint
    pipe("a red circle moving right on a black background").save("outputs/")

The public names are imported lazily, so `import kinema` (and the CLI's start)
stays fast and only the parts a program uses are loaded.
"""

from kinema.errors import Cancelled, CheckpointError, KinemaError

__version__ = "0.1.0"

_LAZY = {
    "Pipeline": "kinema.pipeline.pipeline",
    "Result": "kinema.pipeline.result",
    "load_dit": "kinema.loading.dit",
    "load_vae": "kinema.loading.vae",
    "load_text_encoder": "kinema.loading.t5",
    "load_clip_vision": "kinema.loading.clip",
}

__all__ = [*_LAZY, "Cancelled", "KinemaError", "CheckpointError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kinema' has no attribute {name!r}")
