"""The built-in model: a small Wan2.1-architecture model trained by Kinema on its synthetic world
(kinema.toy), shipped inside the package and used whenever no checkpoint is given.

The folder `model/` is a diffusers-style pipeline folder (transformer/, vae/,
text_encoder/ + tokenizer/, image_encoder/) in the official key names, so it goes
through the same loaders as any real checkpoint. docs/training.md records how it
was trained.
"""

from __future__ import annotations

from pathlib import Path

from kinema.errors import KinemaError

MODEL = Path(__file__).with_name("model")


def builtin_lora(name: str) -> Path:
    """A LoRA shipped beside the built-in model (model/loras/NAME.safetensors), e.g. "distill-4step"."""
    path = MODEL / "loras" / f"{name}.safetensors"
    if not path.is_file():
        have = sorted(p.stem for p in (MODEL / "loras").glob("*.safetensors")) if (MODEL / "loras").is_dir() else []
        raise KinemaError(f"no built-in LoRA named {name!r}; the built-in ones are: {', '.join(have) or 'none'}.")
    return path


def builtin_path() -> Path:
    if not (MODEL / "transformer").is_dir():
        raise KinemaError(f"the built-in model is missing from {MODEL}; reinstall Kinema, or pass --ckpt_dir.")
    return MODEL
