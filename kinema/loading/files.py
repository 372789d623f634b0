"""Reading tensors out of checkpoint files without loading them whole.

A `TensorSource` presents one or many files (a single safetensors or .pth file,
or a sharded set behind an `*.index.json`) as one lazy mapping from key to
tensor. Safetensors are memory-mapped and `.pth` files are opened with
`weights_only=True` (memory-mapped when they use the zip format), so a tensor's
bytes are only touched when the loader asks for it.

ComfyUI's "scaled fp8" convention (a `scaled_fp8` marker and a per-layer
`<name>.scale_weight`) is undone here: callers see dequantised tensors under
the plain names and never the scale keys.
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
_FP8_MARKERS = ("scaled_fp8",)
_FP8_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def _open_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(
            f"{path} is not a safetensors file: it is only {size} bytes long. "
            "The download or save was probably interrupted; fetch or save it again."
        )
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}). It is truncated or corrupt: "
            "fetch or save it again."
        ) from None
    return {key: (handle, key) for key in keys}


def _open_torch(path: Path) -> dict:
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
    return {key: (state, key) for key in state}


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

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._entries: dict[str, tuple[object, str]] = {}
        self.origin: dict[str, Path] = {}
        for path in self.paths:
            if path.suffix in SAFETENSORS_SUFFIXES:
                entries = _open_safetensors(path)
            elif path.suffix in TORCH_SUFFIXES:
                entries = _open_torch(path)
            else:
                raise CheckpointError(
                    f"{path}: unknown checkpoint file type '{path.suffix}'; expected "
                    f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} or a sharded '*.index.json'."
                )
            for key, entry in entries.items():
                self._entries[key] = entry
                self.origin[key] = path
        self._scales = {k[: -len(".scale_weight")]: k for k in self._entries if k.endswith(".scale_weight")}

    @property
    def name(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0].parent} ({len(self.paths)} shards)"

    @property
    def is_scaled_fp8(self) -> bool:
        return any(k in self._entries for k in _FP8_MARKERS) or bool(self._scales)

    def keys(self) -> list[str]:
        return [k for k in self._entries if k not in _FP8_MARKERS and not k.endswith(_FP8_SCALE_SUFFIXES)]

    def __contains__(self, key: str) -> bool:
        return key in self._entries and key not in _FP8_MARKERS

    def _raw(self, key: str) -> torch.Tensor:
        holder, name = self._entries[key]
        if isinstance(holder, dict):
            return holder[name]
        return holder.get_tensor(name)

    def shape(self, key: str) -> tuple[int, ...]:
        holder, name = self._entries[key]
        if isinstance(holder, dict):
            return tuple(holder[name].shape)
        return tuple(holder.get_slice(name).get_shape())

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor for `key`, dequantised if it is scaled fp8, cast to `dtype` if given."""
        tensor = self._raw(key)
        scale_key = self._scales.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if scale_key is not None:
            tensor = tensor.to(torch.float32) * self._raw(scale_key).to(torch.float32)
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor


def checkpoint_files(path: str | os.PathLike, component: str, candidates: tuple[str, ...] = ()) -> list[Path]:
    """Resolve a user-given path (a file, an index file, or a folder) to the files holding one component.

    In a folder, the first existing name of `candidates` wins (a file, or an index
    that lists shards); failing that, a single checkpoint file in the folder.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{component} checkpoint not found: {p}. Check the path (file or folder).")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _read_index(p)
        return [p]
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
    raise CheckpointError(
        f"folder {p} holds several checkpoint files ({', '.join(f.name for f in files)}) and none is a known "
        f"{component} file name; pass the file itself."
    )
