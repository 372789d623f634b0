"""Upscaler files: Kinema's own (one safetensors file per x2 stage, its config in the metadata) and, through the
optional `spandrel` package, the pixel upscalers of the Real-ESRGAN family (.pth / .safetensors)."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kinema.errors import KinemaError
from kinema.models.upscaler import Upscaler2x, UpscalerCascade, UpscalerConfig

BUILTIN_UPSCALER = Path(__file__).resolve().parent.parent / "builtin" / "model" / "upscaler"  # x2 stages: stage1, ...
KIND = "kinema-upscaler-x2"
log = logging.getLogger("kinema")


@dataclass
class Upscaler:
    """A loaded upscaler: `model` maps [B, 3, F, H, W] in [-1, 1] to `scale` times the size (kind "kinema"), or
    images [N, 3, H, W] in [0, 1] (kind "spandrel", frame by frame)."""

    model: torch.nn.Module
    scale: int
    kind: str  # "kinema" | "spandrel"
    source: str

    @property
    def receptive(self) -> tuple[int, int]:
        """(frames, low-resolution pixels) of context each side of a tile for an exact tiled run."""
        if self.kind == "kinema":
            reach = [s.receptive for s in self.model.stages]
            frames = sum(t * 2**i for i, (t, _) in enumerate(reach))  # later stages see frames, not pixels, of earlier
            pixels = sum(-(-p // 2**i) for i, (_, p) in enumerate(reach))  # later stages' reach in input pixels
            return frames, pixels
        return 0, 16  # a frame-by-frame network: a fixed margin (its receptive field is not known here)


def save_upscaler(path: Path, stage: Upscaler2x, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": KIND, "config": json.dumps(stage.config.to_dict()), **(metadata or {})}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in stage.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def _kinema_stage(path: Path) -> Upscaler2x | None:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != KIND:
            return None
        stage = Upscaler2x(UpscalerConfig(**json.loads(meta["config"])))
        state = {k: f.get_tensor(k) for k in f.keys()}
    stage.load_state_dict(state)
    return stage.eval().requires_grad_(False)


def load_upscaler(source: str | Path | None = None, factor: int | None = 2, device="cpu") -> Upscaler:
    """An upscaler for `factor`: Kinema's stages (the built-in ones when `source` is None, or a folder of
    stage*.safetensors, or one stage file), as many x2 stages as the factor needs (None: all of them); or any
    other file, through spandrel (its own scale; a `factor` given must match it)."""
    if factor not in (None, 2, 4, 8):
        raise KinemaError(f"upscale factor {factor!r} must be 2, 4 or 8 (x2 stages in a cascade).")
    path = Path(source) if source is not None else BUILTIN_UPSCALER
    if not path.exists():
        raise KinemaError(f"upscaler {path} does not exist; give a Kinema upscaler folder or file, or a Real-ESRGAN "
                          "family model file (with `pip install spandrel`).")
    files = sorted(path.glob("stage*.safetensors")) if path.is_dir() else [path]
    stages = [s for s in (_kinema_stage(f) for f in files) if s is not None]
    need = len(stages) if factor is None else {2: 1, 4: 2, 8: 3}[factor]
    if stages:
        if len(stages) < need:
            raise KinemaError(f"upscaler {path} has {len(stages)} x2 stage(s); x{factor} needs {need}. Use "
                              f"x{2 ** len(stages)} or an upscaler with more stages.")
        return Upscaler(UpscalerCascade(stages[:need]).to(device), 2**need, "kinema", str(path))
    if path.is_dir():
        raise KinemaError(f"upscaler folder {path} holds no stage*.safetensors of Kinema's upscaler.")
    return _spandrel(path, factor, device)


def import_spandrel(path: Path | str = "this file"):
    """The spandrel module, or one KinemaError saying how to install it.

    spandrel imports torchvision (two of its architectures use it). A torchvision whose C++ ops cannot load beside
    this torch (PyPI's CUDA build beside a CPU torch wheel, the usual mismatch) fails on import in 0.28: it
    registers fake kernels for `torchvision::nms` / `qnms` without the ops. None of spandrel's image models calls
    those ops, so then the two are declared (no kernel: a call fails with torch's own message) and the import is
    tried once more, with a warning naming the mismatch."""
    try:
        import spandrel
    except ImportError:
        raise KinemaError(f"{path} is not a Kinema upscaler; other upscalers (Real-ESRGAN, ...) load through spandrel: "
                          "pip install 'kinema[upscalers]' (or pip install spandrel).") from None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import sys

        log.warning("torchvision's C++ ops do not load beside torch %s (%s); spandrel's upscalers do not use them: "
                    "going on without. Install the torchvision build made for this torch to silence this.",
                    torch.__version__, e)
        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "spandrel")]:
            del sys.modules[name]
        _declare_torchvision_ops()
        import spandrel
    return spandrel


@functools.cache
def _declare_torchvision_ops() -> torch.library.Library:
    """Declare (schema only) the torchvision ops its Python package needs at import; kept alive by the cache."""
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


def _spandrel(path: Path, factor: int, device) -> Upscaler:
    spandrel = import_spandrel(path)
    try:
        desc = spandrel.ModelLoader(device=torch.device(device)).load_from_file(str(path))
    except Exception as e:  # spandrel's own errors: unknown architecture, corrupt file
        raise KinemaError(f"upscaler {path} could not be read by spandrel: {e}") from None
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise KinemaError(f"upscaler {path} is a {type(desc).__name__}, not an image upscaler.")
    if factor is not None and desc.scale != factor:
        raise KinemaError(f"upscaler {path} upscales x{desc.scale}; ask for --upscale {desc.scale}.")
    if (desc.input_channels, desc.output_channels) != (3, 3):
        raise KinemaError(f"upscaler {path} maps {desc.input_channels} channels to {desc.output_channels}; video "
                          "upscaling needs an RGB (3 to 3) model.")
    desc.model.eval().requires_grad_(False)
    return Upscaler(_SpandrelModel(desc), desc.scale, "spandrel", str(path))


class _SpandrelModel(torch.nn.Module):
    """A spandrel image model as a module: images [N, 3, H, W] in [0, 1] through its descriptor, which pads them to
    the model's size requirements (a multiple of 4 for Real-ESRGAN x2plus) and crops the result back."""

    def __init__(self, desc):
        super().__init__()
        self.net = desc.model  # registered, so .to() / .parameters() reach it
        self._desc = desc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._desc(images.to(next(self.net.parameters()).dtype)).float()
