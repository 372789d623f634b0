"""Training configs: dataclasses read from JSON or TOML files, with every key checked up front.

A config file is a flat mapping of field names to values (TOML tables are not
needed). Unknown keys, wrong types and bad values are one `KinemaError` naming
the key, before any model is built.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path

from kinema.errors import KinemaError


@dataclasses.dataclass
class TrainConfig:
    """Fields every trainer shares."""

    output_dir: str = "runs/train"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0
    ema: float = 0.0  # EMA decay of the trained weights (0 = off); samples and exports use the EMA
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0 = only at the end
    log_every: int = 10
    threads: int = 0  # torch CPU threads (0 = torch's default)
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0 = no limit
    # Fit `steps` to this much wall time: after BUDGET_PROBE_STEPS steps the measured speed sets `steps`, so the LR
    # schedule runs to its end and the model is exported in time (a time-boxed stage, e.g. on a lent GPU); 0 = off.
    budget_minutes: float = 0.0
    data: str = "world"  # "world" (the synthetic world) or a folder / captions file of videos
    width: int = 64
    height: int = 64
    frames: int = 17
    fps: int = 8
    gradient_checkpointing: bool = False
    bf16: bool = True  # bf16 autocast when training on a GPU (CPU runs in fp32)
    device: str = "auto"
    init_from: str = ""  # start from these weights: a training checkpoint (.pt) or an exported model folder


def _coerce(name: str, value, kind):
    origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise KinemaError(f"config key {name!r} must be a list, got {value!r}.")
        args = typing.get_args(kind)
        item = args[0]
        if len(args) == 2 and args[1] is Ellipsis or len(args) == len(value):
            return tuple(_coerce(name, v, item if len(args) == 2 and args[1] is Ellipsis else args[i]) for i, v in enumerate(value))
        raise KinemaError(f"config key {name!r} needs {len(args)} values, got {len(value)}.")
    if kind is bool:
        if not isinstance(value, bool):
            raise KinemaError(f"config key {name!r} must be true or false, got {value!r}.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KinemaError(f"config key {name!r} must be an integer, got {value!r}.")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KinemaError(f"config key {name!r} must be a number, got {value!r}.")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise KinemaError(f"config key {name!r} must be a string, got {value!r}.")
        return value
    return value


def read_file(path: str | Path) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise KinemaError(f"training config not found: {p}. Pass a .json or .toml file.")
    text = p.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except json.JSONDecodeError as e:
        raise KinemaError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except tomllib.TOMLDecodeError as e:
        raise KinemaError(f"{p}: not valid TOML ({e}).") from None
    if not isinstance(data, dict):
        raise KinemaError(f"{p}: a training config must be a mapping of keys to values.")
    return data


def build(cls, values: dict, source: str = "config"):
    """`cls(**values)` with unknown keys and wrong types reported by name."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise KinemaError(
            f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(sorted(fields))}."
        )
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    cfg = cls(**kwargs)
    check = getattr(cfg, "check", None)
    if check:
        check()
    return cfg


def load(cls, path: str | Path, overrides: dict | None = None):
    values = read_file(path)
    values.update(overrides or {})
    return build(cls, values, str(path))


def to_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
