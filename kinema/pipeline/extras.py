"""The guidance extras of a call, in one record: skip-layer guidance, CFG-Zero*, Enhance-A-Video, RIFLEx.

Each is off unless asked for. `parse_extras` turns a call's arguments (Python values or the
command line's) into a checked `Extras` against the model (its depth, its head size, its
training length); `hooks` gives the block hooks a run composes around the DiT's blocks, and
`record` the flat keys saved in a file's metadata, which `kinema generate --from` reads back
as the same flags.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kinema.errors import KinemaError
from kinema.sampling.cfg_zero import CFGZeroStar
from kinema.sampling.enhance import EnhanceHook, EnhanceVideo
from kinema.sampling.riflex import Riflex, RiflexHook, parse_riflex
from kinema.sampling.skip_layers import SkipLayers, SkipLayersHook, parse_blocks

TRAIN_FRAMES = 81  # pixel frames Wan2.1 was trained on, for a model that does not state its own


@dataclass(frozen=True)
class Extras:
    skip_layers: SkipLayers | None = None
    cfg_zero_star: CFGZeroStar | None = None
    enhance: EnhanceVideo | None = None
    riflex: Riflex | None = None

    def hooks(self, dit, train_frames: int) -> tuple:
        """The block hooks for a run on `dit`; train_frames: the model's training length in latent frames."""
        out = []
        if self.riflex is not None:
            out.append(RiflexHook(self.riflex, dit.config.head_dim, train_frames))
        if self.enhance is not None:
            out.append(EnhanceHook(self.enhance))
        if self.skip_layers is not None:
            out.append(SkipLayersHook(self.skip_layers, dit.config.num_layers))
        return tuple(out)

    def record(self) -> dict:
        """The flat keys saved in metadata (the flag names of `kinema generate`)."""
        rec = {}
        if (s := self.skip_layers) is not None:
            rec.update(slg=",".join(map(str, s.blocks)), slg_start=s.start, slg_end=s.end, slg_mode=s.mode)
            if s.mode == "sd3":
                rec["slg_scale"] = s.scale
        if self.cfg_zero_star is not None:
            rec.update(cfg_zero_star=True, zero_init_steps=self.cfg_zero_star.zero_init_steps)
        if (e := self.enhance) is not None:
            rec.update(feta=e.weight, feta_start=e.start, feta_end=e.end)
        if self.riflex is not None:
            rec["riflex"] = self.riflex.describe()
        return rec

    def describe(self) -> str:
        parts = [f"{name} ({value.describe()})" for name, value in
                 (("skip-layer guidance", self.skip_layers), ("CFG-Zero*", self.cfg_zero_star),
                  ("Enhance-A-Video", self.enhance), ("RIFLEx", self.riflex)) if value is not None]
        return ", ".join(parts)


def train_latent_frames(sample_defaults: dict, temporal: int = 4) -> int:
    """The model's training length in latent frames (its declared frame_num, else Wan2.1's 81)."""
    frames = int(sample_defaults.get("frame_num", TRAIN_FRAMES))
    return (frames - 1) // temporal + 1


def parse_extras(*, skip_layers=None, cfg_zero_star=None, enhance=None, riflex=None, guided: bool = True,
                 dit_config=None, model_defaults: dict | None = None, names: dict | None = None) -> Extras:
    """A call's extras arguments -> Extras, or one KinemaError naming the value and the fix.

    skip_layers: None, True or "default" (the model's choice), blocks ("9,10", [9, 10], 10), a SkipLayers or its
    fields as a dict; cfg_zero_star: None / False, True, a CFGZeroStar or a dict; enhance: None, True or "default",
    the weight (2.0), an EnhanceVideo or a dict; riflex: None / "off", "auto", an index K, or a Riflex. guided:
    whether the call runs classifier-free guidance; dit_config: the DiT's config, to check block and frequency
    indices. model_defaults: the model's sample_defaults; the skip-layer and Enhance-A-Video fields a call does not
    give come from its `slg` and `feta` (the wrapper's defaults are set for Wan2.1's 30-40 blocks and 21 latent
    frames, which a 6-block DiT of 5 latent frames does not share), else from SkipLayers' / EnhanceVideo's own
    (the wrapper's: block 10 over steps 10-100%; weight 2 over every step)."""
    names = names or {}
    model_defaults = model_defaults or {}
    extras = Extras(_skip_layers(skip_layers, names.get("skip_layers", "skip_layers"), model_defaults.get("slg", {})),
                    record_of(cfg_zero_star, CFGZeroStar, names.get("cfg_zero_star", "cfg_zero_star")),
                    _enhance(enhance, names.get("enhance", "enhance"), model_defaults.get("feta", {})),
                    parse_riflex(riflex, names.get("riflex", "riflex")))
    s = extras.skip_layers
    if s is not None and s.mode == "uncond" and not guided:
        raise KinemaError(f"{names.get('skip_layers', 'skip_layers')} in the uncond mode skips blocks of the uncond "
                          "pass, and this call runs no guidance (guide scale 1); raise the guide scale or use the sd3 "
                          "mode.")
    if dit_config is not None:  # the block indices and the frequency index, against this DiT
        if s is not None:
            named(names.get("skip_layers", "skip_layers"), SkipLayersHook, s, dit_config.num_layers)
        if extras.riflex is not None:
            named(names.get("riflex", "riflex"), RiflexHook, extras.riflex, dit_config.head_dim, 1)
    return extras


def named(name: str, make, *args, **kwargs):
    """make(*args, **kwargs), its refusal (a KinemaError) starting with `name`: the argument or flag the value came
    from."""
    try:
        return make(*args, **kwargs)
    except KinemaError as e:
        raise KinemaError(f"{name}: {e}") from None


def is_default(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == "default"


def is_off(value) -> bool:
    """The word `off` (any case, spaces around): a feature the model would use by default, turned off."""
    return isinstance(value, str) and value.strip().lower() == "off"


def with_defaults(value, main: str, defaults: dict) -> dict:
    """True / "default" / the main field's value / a dict of fields (its main field may be "default", as the
    command line's `--slg default --slg_end 0.5` gives) -> the fields, the model's defaults under them."""
    if value is True or is_default(value):
        value = {}
    elif not isinstance(value, dict):
        value = {main: value}
    if is_default(value.get(main)):
        value = {k: v for k, v in value.items() if k != main}
    return {**defaults, **value}


def _skip_layers(value, name: str, defaults: dict) -> SkipLayers | None:
    if value is None or value is False:
        return None
    if isinstance(value, SkipLayers):
        return value
    value = with_defaults(value, "blocks", defaults)
    if "blocks" in value:
        value["blocks"] = parse_blocks(value["blocks"], name)
    return record_of(value, SkipLayers, name)


def _enhance(value, name: str, defaults: dict) -> EnhanceVideo | None:
    if value is None or value is False:
        return None
    if isinstance(value, EnhanceVideo):
        return value
    if isinstance(value, str) and not is_default(value):
        raise KinemaError(f"{name} {value!r} is not understood; pass a weight (2.0), True or 'default' (the "
                          "model's), an EnhanceVideo or a dict of its fields.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return record_of(with_defaults(value, "weight", defaults), EnhanceVideo, name)


def record_of(value, kind, name: str):
    """None / False -> None; True -> kind(); a kind as it is; a dict of its fields -> kind(**dict). A value the
    record refuses is an error that starts with `name` (the argument or flag the user gave)."""
    if value is None or value is False:
        return None
    if isinstance(value, kind):
        return value
    if value is True:
        value = {}
    if isinstance(value, dict):
        known = {f.name for f in fields(kind)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise KinemaError(f"{name} has no field {', '.join(map(repr, unknown))}; its fields are "
                              f"{', '.join(sorted(known))}.")
        return named(name, kind, **value)
    raise KinemaError(f"{name} {value!r} is not understood; pass True, a {kind.__name__} or a dict of its fields.")
