"""Reading tensors out of checkpoint files without loading them whole.

A `TensorSource` presents one or many files (a single safetensors or .pth file,
or a sharded set behind an `*.index.json`) as one lazy mapping from key to
tensor. Safetensors are memory-mapped and `.pth` files are opened with
`weights_only=True` (memory-mapped when they use the zip format), so a tensor's
bytes are only touched when the loader asks for it.

ComfyUI's "scaled fp8" convention (a `scaled_fp8` marker and a per-layer
`<name>.scale_weight`) is undone here: callers see dequantised tensors under
the plain names and never the scale keys; a loader asked to keep fp8 storage
reads the stored fp8 tensor and its scale with `get_fp8` instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from kinema.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys that only carry the fp8 scaling convention, never model weights.
_FP8_MARKERS = ("scaled_fp8",)  # also under a wrapper prefix, e.g. "model.diffusion_model.scaled_fp8"
_FP8_SCALE_SUFFIXES = (".scale_weight", ".scale_input")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# ComfyUI's later per-layer quantization format: a different scale name and a JSON `comfy_quant` tensor.
_NEWER_QUANT_SUFFIXES = (".comfy_quant", ".weight_scale")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _open_safetensors(path: Path, backend: str = "mmap"):
    from safetensors import safe_open

    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(
            f"{path} is not a safetensors file: it is only {size} bytes long. "
            "The download or save was probably interrupted; fetch or save it again."
        )
    try:
        handle = safe_open(str(path), framework="pt", device="cpu", backend=backend)
        handle.keys()
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}). It is truncated or corrupt: "
            "fetch or save it again."
        ) from None
    return handle


class _SafetensorsFile:
    """One safetensors file, read two ways: memory-mapped views for tensors used as they are
    (zero copy, pages touched lazily) and pread for tensors that get converted, so a
    converted tensor's source pages never stay resident beside its copy. With `views=False` every
    tensor is read with pread, so no page of the file is ever mapped into the process (streaming)."""

    def __init__(self, path: Path, views: bool = True):
        self.path = path
        self.mapped = _open_safetensors(path)
        self.views = views
        self._pread = None

    def keys(self) -> list[str]:
        return list(self.mapped.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.mapped.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype | None:
        return _ST_DTYPES.get(self.mapped.get_slice(name).get_dtype())

    def get(self, name: str, convert: bool) -> torch.Tensor:
        if not convert and self.views:
            return self.mapped.get_tensor(name)
        if self._pread is None:
            self._pread = _open_safetensors(self.path, "pread")
        return self._pread.get_tensor(name)


class _TorchFile:
    """A .pth/.bin checkpoint, memory-mapped when it uses the zip format."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # Legacy (non-zip) .pth files cannot be memory-mapped.
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path} could not be read as a PyTorch checkpoint ({type(exc).__name__}: {exc}). "
                "It is truncated, corrupt, or holds non-tensor objects that are unsafe to load."
            ) from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a flat dictionary of tensors; it is not a model checkpoint.")
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str, convert: bool) -> torch.Tensor:
        return self.state[name]


def _read_index(path: Path) -> list[Path]:
    try:
        index = json.loads(path.read_text())
        shards = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a valid shard index ({exc}); expected JSON with a 'weight_map'.") from None
    files = [path.parent / name for name in shards]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{path} names shard files that are missing: {', '.join(missing)}.")
    return files


class TensorSource:
    """A lazy, read-only view of the tensors in one or more checkpoint files."""

    def __init__(self, paths: list[Path], mapped: bool = True):
        """`mapped=False`: safetensors tensors are always read into memory of their own (pread), never
        returned as views of the mapped file, whose pages would then count in the process's resident set."""
        self.paths = [Path(p) for p in paths]
        self._files: dict[str, _SafetensorsFile | _TorchFile] = {}
        self.origin: dict[str, Path] = {}  # key -> the file that holds it, for error messages
        for path in self.paths:
            if path.suffix in SAFETENSORS_SUFFIXES:
                file = _SafetensorsFile(path, views=mapped)
            elif path.suffix in TORCH_SUFFIXES:
                file = _TorchFile(path)
            else:
                raise CheckpointError(
                    f"{path}: unknown checkpoint file type '{path.suffix}'; expected "
                    f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} or a sharded '*.index.json'."
                )
            for key in file.keys():
                self._files[key] = file
                self.origin[key] = path
        self._scales = {k[: -len(".scale_weight")]: k for k in self._files if k.endswith(".scale_weight")}
        newer = [k for k in self._files if k.endswith(_NEWER_QUANT_SUFFIXES)]
        if newer:
            raise CheckpointError(
                f"{self.name}: key '{newer[0]}' belongs to ComfyUI's newer quantized layout (`weight_scale` / "
                "`comfy_quant`: fp8, int8, nvfp4 or mxfp8 per layer), which Kinema does not read. Use a bf16 / fp16 "
                "file or a scaled-fp8 one (`scale_weight` keys), e.g. the *_fp8_e4m3fn_scaled.safetensors releases."
            )

    @property
    def name(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0].parent} ({len(self.paths)} shards)"

    def use_views(self, views: bool) -> None:
        """Whether safetensors tensors may be views of the mapped file (`mapped` of the constructor)."""
        for file in set(self._files.values()):
            if isinstance(file, _SafetensorsFile):
                file.views = views

    @staticmethod
    def _is_marker(key: str) -> bool:
        return key.rpartition(".")[2] in _FP8_MARKERS

    @property
    def is_scaled_fp8(self) -> bool:
        return any(self._is_marker(k) for k in self._files) or bool(self._scales)

    def keys(self) -> list[str]:
        return [k for k in self._files if not self._is_marker(k) and not k.endswith(_FP8_SCALE_SUFFIXES)]

    def __contains__(self, key: str) -> bool:
        return key in self._files and not self._is_marker(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[key].shape(key)

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored dtype (before any dequantisation)."""
        return self._files[key].dtype(key)

    def _scale(self, key: str) -> torch.Tensor | None:
        """The float32 `scale_weight` stored for weight `key`: one per tensor, or one per output row."""
        scale_key = self._scales.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if scale_key is None:
            return None
        scale = self._files[scale_key].get(scale_key, convert=True).to(torch.float32)
        shape = self.shape(key)
        if scale.numel() != 1 and tuple(scale.shape) != (shape[0],) + (1,) * (len(shape) - 1):
            raise CheckpointError(
                f"{self.origin[scale_key]}: '{scale_key}' has shape {list(scale.shape)}, which is neither one scale "
                f"for '{key}' {list(shape)} nor one per output row; Kinema does not know this fp8 layout."
            )
        return scale

    def has_scale(self, key: str) -> bool:
        """Whether weight `key` comes with a ComfyUI `scale_weight`."""
        return key.endswith(".weight") and key[: -len(".weight")] in self._scales

    def get_fp8(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`key` as stored, in fp8, with its per-tensor scale (None for a plain fp8 cast): for loaders that keep fp8."""
        file = self._files[key]
        stored = file.dtype(key)
        if stored not in _FP8_DTYPES:
            raise CheckpointError(
                f"{self.origin[key]}: '{key}' is stored as {stored or 'a dtype Kinema does not know'}, "
                "not as fp8 (float8_e4m3fn / float8_e5m2)."
            )
        scale = self._scale(key)
        if scale is not None and scale.numel() != 1:
            raise CheckpointError(
                f"{self.origin[key]}: '{key}' has one fp8 scale per output row; Kinema keeps fp8 storage only with one "
                "scale per tensor (ComfyUI's scaled fp8). Load it without quantization to dequantise it instead."
            )
        return file.get(key, convert=False), None if scale is None else scale.reshape(())

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor for `key`, dequantised if it is scaled fp8, cast to `dtype` if given."""
        file = self._files[key]
        stored = file.dtype(key)
        scale = self._scale(key)
        fp8 = stored in _FP8_DTYPES
        tensor = file.get(key, convert=scale is not None or fp8 or (dtype is not None and stored != dtype))
        if scale is not None:
            tensor = tensor.to(torch.float32) * scale
        elif fp8:
            tensor = tensor.to(torch.float32)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor


def read_config(folder: Path) -> dict:
    """The `config.json` in `folder` as a dict ({} when there is none); a broken one is an error.

    In an official Wan2.1 folder this is the DiT's config, so each loader checks
    that what it reads there is meant for it.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or remove it.") from None
    return cfg if isinstance(cfg, dict) else {}


def checkpoint_files(
    path: str | os.PathLike,
    component: str,
    candidates: tuple[str, ...] = (),
    subfolder: str | None = None,
    kind: str | None = None,
) -> list[Path]:
    """Resolve a user-given path (a file, an index file, or a folder) to the files holding one component.

    In a folder: the first existing name of `candidates` wins (a file, or an index
    that lists shards); a diffusers pipeline folder is entered at `subfolder`
    (e.g. "transformer"); failing that, the one checkpoint file in the folder, or,
    in a folder of single files (ComfyUI's models/ layout), the one whose keys
    belong to component `kind` ('dit', 'vae', 't5', 'clip').
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{component} checkpoint not found: {p}. Check the path (file or folder).")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _read_index(p)
        return [p]
    if subfolder and (p / subfolder).is_dir() and not any((p / name).is_file() for name in candidates):
        p = p / subfolder
    for name in candidates:
        cand = p / name
        if cand.is_file():
            return _read_index(cand) if cand.name.endswith(".index.json") else [cand]
    indexes = sorted(p.glob("*.safetensors.index.json")) + sorted(p.glob("*.bin.index.json"))
    if len(indexes) == 1:
        return _read_index(indexes[0])
    files = [f for f in sorted(p.iterdir()) if f.is_file() and f.suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES]
    if len(files) == 1:
        return files
    if not files:
        raise CheckpointError(f"no {component} checkpoint file in folder {p}; expected one of: {', '.join(candidates)}.")
    if kind is not None:
        from kinema.loading.identify import identify

        matching = [f for f in files if identify(TensorSource([f]).keys()) == kind]
        if len(matching) == 1:
            return matching
    raise CheckpointError(
        f"folder {p} holds several checkpoint files ({', '.join(f.name for f in files)}) and none is a known "
        f"{component} file name; pass the file itself."
    )
