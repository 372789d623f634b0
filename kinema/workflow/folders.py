"""Model files in ComfyUI's folder layout, so a ComfyUI models folder works as it is.

Under `--models DIR`: diffusion_models/ (and the legacy unet/), text_encoders/ (and clip/), vae/,
clip_vision/, loras/, upscale_models/; plus the folders an `extra_model_paths.yaml` in ComfyUI's format names. Names
are what ComfyUI shows: the path below the kind's folder with forward slashes, found recursively,
sorted. A folder that is a checkpoint of its own (a diffusers folder: config.json or model_index.json
inside) is one name. The built-in model is listed first under fixed names, so every node works with
no download.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from kinema.errors import KinemaError
from kinema.loading.files import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES

# Each kind and its folder names under a models folder, in ComfyUI's search order.
KINDS = {
    "diffusion_models": ("unet", "diffusion_models"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "clip_vision": ("clip_vision",),
    "loras": ("loras",),
    "upscale_models": ("upscale_models",),
}
ALIASES = {"unet": "diffusion_models", "clip": "text_encoders"}  # ComfyUI's map_legacy
EXTENSIONS = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES  # what Kinema's loaders read
CHECKPOINT_FOLDER_MARKERS = ("config.json", "model_index.json")

# The built-in model's parts (kinema/builtin/model/<part>), under the names the nodes list.
BUILTIN = {
    "diffusion_models": ("kinema_builtin_dit.safetensors", "transformer"),
    "text_encoders": ("kinema_builtin_umt5.safetensors", "text_encoder"),
    "vae": ("kinema_builtin_vae.safetensors", "vae"),
    "clip_vision": ("kinema_builtin_clip_vision.safetensors", "image_encoder"),
    "upscale_models": ("kinema_builtin_upscaler", "upscaler"),  # the learned x2 stages (x4 in all)
}


def canonical_kind(kind: str) -> str:
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise KinemaError(f"unknown model folder kind {kind!r}; use one of {', '.join([*KINDS, *ALIASES])}.")
    return kind


class ModelFolders:
    """Where each kind of model file is looked for, and the names ComfyUI's loader nodes list."""

    def __init__(self, models_dir=None, extra_paths_yaml=None, builtin: bool = True):
        self.builtin = builtin
        self.folders: dict[str, list[Path]] = {k: [] for k in KINDS}
        if models_dir is not None:
            root = Path(models_dir).expanduser()
            if not root.is_dir():
                raise KinemaError(f"--models {models_dir} is not a folder; pass a ComfyUI-style models folder "
                                  "(with diffusion_models/, text_encoders/, vae/, clip_vision/, loras/).")
            for kind, names in KINDS.items():
                self.folders[kind] += [root / n for n in names]
        if extra_paths_yaml is not None:
            self.add_yaml(extra_paths_yaml)

    def add(self, kind: str, folder, is_default: bool = False) -> None:
        """One more folder for `kind` (first in the search order with `is_default`, as in ComfyUI)."""
        kind, folder = canonical_kind(kind), Path(folder)
        if folder in self.folders[kind]:
            self.folders[kind].remove(folder)
        self.folders[kind].insert(0, folder) if is_default else self.folders[kind].append(folder)

    def add_yaml(self, path) -> None:
        """The folders of an extra_model_paths.yaml, read as ComfyUI reads it: sections with an optional
        base_path (relative to the YAML's folder, `~` and $VARS expanded) and is_default, then per kind one or
        more folders (a multi-line value gives several), relative to base_path. Kinds Kinema has no use for
        (checkpoints, controlnet, ...) are skipped."""
        import yaml

        path = Path(path).expanduser()
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise KinemaError(f"cannot read the extra model paths file {path}: {e.strerror or e}.") from None
        except yaml.YAMLError as e:
            raise KinemaError(f"{path} is not valid YAML ({e}); see ComfyUI's extra_model_paths.yaml.example.") from None
        if config is None:
            return
        if not isinstance(config, dict):
            raise KinemaError(f"{path}: expected sections (e.g. 'comfyui:') with base_path and folder lists, "
                              f"got a {type(config).__name__}.")
        here = path.resolve().parent
        for section, conf in config.items():
            if conf is None:
                continue
            if not isinstance(conf, dict):
                raise KinemaError(f"{path}: section {section!r} must map folder kinds to paths, got {conf!r}.")
            conf = dict(conf)
            base = conf.pop("base_path", None)
            if base is not None:
                base = Path(os.path.expandvars(os.path.expanduser(str(base))))
                base = base if base.is_absolute() else here / base
            is_default = bool(conf.pop("is_default", False))
            for kind, value in conf.items():
                kind = ALIASES.get(kind, kind)
                if kind not in KINDS:
                    continue
                if not isinstance(value, str):
                    raise KinemaError(f"{path}: {section}.{kind} must be a path or several on separate lines, got {value!r}.")
                for line in value.split("\n"):
                    line = line.strip()
                    if not line:
                        continue
                    p = Path(os.path.expanduser(line))
                    full = base / p if base is not None else (p if p.is_absolute() else here / p)
                    self.add(kind, Path(os.path.normpath(full)), is_default)

    # -- names ---------------------------------------------------------------------------------------
    def list(self, kind: str) -> list[str]:
        """Every name of `kind`: the built-in part first, then the files found, sorted, without repeats."""
        kind = canonical_kind(kind)
        found: set[str] = set()
        for folder in self.folders[kind]:
            if folder.is_dir():
                found.update(_scan(folder))
        builtin = [BUILTIN[kind][0]] if self.builtin and kind in BUILTIN else []
        return builtin + sorted(found - set(builtin))

    def path(self, kind: str, name: str) -> Path:
        """The file (or checkpoint folder) named `name` of `kind`; a KinemaError naming it and the folders."""
        kind = canonical_kind(kind)
        if not isinstance(name, str) or not name:
            raise KinemaError(f"no {kind} file named: got {name!r}; pick one of {self._some(kind)}.")
        parts = PurePosixPath(name.replace("\\", "/"))
        if parts.is_absolute() or Path(name).is_absolute() or ".." in parts.parts or ":" in parts.parts[0]:
            raise KinemaError(f"{kind} name {name!r} points outside the model folders; give a name as listed "
                              f"(a path below {kind}/, e.g. {self._some(kind)}).")
        if self.builtin and kind in BUILTIN and name == BUILTIN[kind][0]:
            return builtin_part(kind)
        for folder in self.folders[kind]:
            candidate = folder.joinpath(*parts.parts)
            if candidate.is_file() or (candidate.is_dir() and _is_checkpoint_folder(candidate)):
                return candidate
        where = ", ".join(str(f) for f in self.folders[kind]) or "(no models folder given: pass --models DIR)"
        raise KinemaError(f"{kind} file {name!r} not found in {where}; put it there, or pick one of {self._some(kind)}.")

    def _some(self, kind: str) -> str:
        names = self.list(kind)
        shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
        return shown or f"(none: {kind}/ is empty)"

    def __repr__(self) -> str:
        return f"ModelFolders({ {k: [str(p) for p in v] for k, v in self.folders.items()} })"


def _is_checkpoint_folder(folder: Path) -> bool:
    return any((folder / m).is_file() for m in CHECKPOINT_FOLDER_MARKERS)


def _scan(folder: Path) -> set[str]:
    """Names below `folder`: model files, and checkpoint folders as one name each (their files not listed)."""
    names = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        rel = here.relative_to(folder)
        if rel.parts and _is_checkpoint_folder(here):
            names.add(rel.as_posix())
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and Path(f).suffix.lower() in EXTENSIONS:
                names.add((rel / f).as_posix())
    return names


def builtin_part(kind: str) -> Path:
    """The built-in model's folder for a part of `kind` (kinema/builtin/model/<part>)."""
    from kinema.builtin import builtin_path

    return builtin_path() / BUILTIN[canonical_kind(kind)][1]


def folders_of(ctx) -> ModelFolders:
    """The model folders a node sees: its context's, or the defaults (the built-in model only) without one
    (a node called directly, /object_info listed with no context)."""
    f = getattr(ctx, "folders", ctx)
    return f if isinstance(f, ModelFolders) else ModelFolders()


def listed(*kinds: str):
    """A combo's options: the names of these model folders, read when validated or listed (no repeats)."""

    def options(ctx=None) -> list[str]:
        names: list[str] = []
        for kind in kinds:
            names += [n for n in folders_of(ctx).list(kind) if n not in names]
        return names

    return options
