"""Stage: resolve a call. Every input checked and every setting resolved into a `Job`, before any model runs.

Checked against a `Target` (kinema.pipeline.models: what the model set declares), so the
command line can check a call against the checkpoints' headers before it loads a weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from kinema.errors import KinemaError
from kinema.memory.vae_tiling import parse_vae_tile
from kinema.pipeline.extras import Extras, is_default, is_off, parse_extras, record_of, with_defaults
from kinema.pipeline.guidance import Guidance, guidance_for
from kinema.pipeline.extend import Extension, parse_extension
from kinema.pipeline.inputs import image_input, video_input
from kinema.pipeline.models import Target
from kinema.pipeline.refine import Refine, Upscale, parse_refine, parse_upscale
from kinema.pipeline.settings import Settings, resolve_settings
from kinema.pipeline.tasks import ANY_MODEL, Task, get_task, task_using
from kinema.sampling.cache import CacheSpec, StepCache, parse_cache
from kinema.sampling.windows import ContextWindows, travel_warning

log = logging.getLogger("kinema")


@dataclass
class Job:
    """One call, checked and resolved: what `Pipeline.run` executes."""

    settings: Settings
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # the task's image inputs, [3, H, W] in [-1, 1]
    video: torch.Tensor | None = None  # v2v source [3, F, H, W] in [-1, 1]
    latents: torch.Tensor | None = None  # a first stage's latents [z, T, h, w]
    cache: CacheSpec | StepCache | None = None
    vae_tile: object = "auto"
    guidance: Guidance = field(default_factory=lambda: guidance_for(False))
    extras: Extras = field(default_factory=Extras)  # skip-layer guidance, CFG-Zero*, Enhance-A-Video, RIFLEx
    windows: ContextWindows | None = None  # context windows (kinema/sampling/windows.py)
    extension: Extension | None = None  # task extend: how the video is continued (kinema/pipeline/extend.py)
    refine: Refine | None = None  # a second pass at a larger size (kinema/pipeline/refine.py)
    upscale: Upscale | None = None  # the learned upscaler after decoding
    prompts: tuple[str, ...] = ()  # the prompt's '|' sections (prompt travel), or the one prompt
    references: tuple[torch.Tensor, ...] = ()  # context windows' reference images [3, H, W] (conditioning.window_args)
    callback: object = None
    cancel: object = None
    decode: bool = True
    progress: bool = True


def prepare_job(target: Target, prompt, *, task="t2v", image=None, first_frame=None, last_frame=None, video=None,
                latents=None, cache=None, vae_tile="auto", batched_cfg=False, skip_layers=None, cfg_zero_star=None,
                enhance=None, riflex=None, context_windows=None, context_reference=None, extend_frames=None,
                overlap_frames=9, loop=False, colour_match="overlap", overlap_join="blend", refine=None, upscale=None,
                upscaler=None, upscale_tile=128, callback=None, cancel=None, decode=True, progress=True, names=None,
                **settings) -> Job:
    """A call's arguments (`Pipeline.__call__`'s) -> Job, or one KinemaError naming the value and the fix.
    `names` maps argument names to the names messages use (the command line's flags)."""
    names = names or {}
    spec = get_task(task)
    check_task(target, spec, task)
    media = media_inputs(spec, task, {"image": image, "first_frame": first_frame, "last_frame": last_frame,
                                      "video": video}, names)
    first = media.get(spec.images[0]) if spec.images else None
    extension = _extension(spec, target, media.get("video"), extend_frames, overlap_frames, loop, colour_match,
                           overlap_join, settings, names)
    s = resolve_settings(spec, target.info.sample_defaults, prompt=prompt, geometry=target.geometry, names=names,
                         image_size=None if first is None else tuple(first.shape[1:]),
                         video_frames=None if video is None or extension else media["video"].shape[1], **settings)
    if extension is not None and (s.width, s.height) != (media["video"].shape[3], media["video"].shape[2]):
        log.info("the new frames are generated at %dx%d and resized to the video's %dx%d; its own frames are kept as "
                 "they are", s.width, s.height, media["video"].shape[3], media["video"].shape[2])
    if latents is not None:
        want = s.latent_shape(target.geometry)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != want:
            got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise KinemaError(f"latents {got} do not fit: this size and frame count need a tensor {list(want)}.")
    if callback is not None and not callable(callback):
        raise KinemaError(f"callback must be callable (info) -> bool | None, got {type(callback).__name__}.")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise KinemaError(f"cancel must be a threading.Event (anything with is_set()), got {type(cancel).__name__}.")
    if not isinstance(cache, StepCache):
        cache = parse_cache(cache, names.get("cache", "cache")) if isinstance(cache, str) or cache is None else cache
    parse_vae_tile(vae_tile)
    extras = parse_extras(skip_layers=skip_layers, cfg_zero_star=cfg_zero_star, enhance=enhance, riflex=riflex,
                          guided=s.guided, dit_config=target.dit_config,
                          model_defaults=target.info.sample_defaults, names=names)
    windows = parse_windows(context_windows, names.get("context_windows", "context_windows"),
                            target.info.sample_defaults.get("context", {}), s.frame_num)
    sections = prompt_sections(s.prompt, windows is not None, names.get("prompt", "prompt"))
    if windows is not None and (warning := travel_warning(windows, (s.frame_num - 1) // 4 + 1, sections, s.steps,
                                                          names.get("prompt", "prompt"))):
        log.warning("%s", warning)
    references = parse_references(context_reference, windows, spec, target, names)
    second = parse_refine(refine, names)
    if second is not None and extension is not None:
        raise KinemaError(f"{names.get('refine', 'refine')} is not for task extend (it would re-generate the video "
                          "being continued); refine the first clip, then extend it.")
    up = parse_upscale(upscale, upscaler, upscale_tile, names)
    return Job(s, {k: media[k] for k in spec.images}, media.get("video"), latents, cache, vae_tile,
               guidance_for(bool(batched_cfg)), extras, windows, extension, second, up, sections, references,
               callback, cancel, bool(decode), bool(progress))


def _extension(spec: Task, target: Target, video, frames, overlap, loop, colour, join, settings: dict, names: dict):
    """Task extend: its Extension, with the run's size and frame count set from the video (settings changed in
    place); other tasks: None, and the extension arguments refused."""
    n = names.get
    if spec.name != "extend":
        for given, key in ((frames is not None, "extend_frames"), (bool(loop), "loop"),
                           (colour != "overlap", "colour_match"), (join != "blend", "overlap_join")):
            if given:
                raise KinemaError(f"{n(key, key)} is for task extend; add it (with the video to continue) or drop "
                                  "the flag.")
        return None
    if settings.get("frame_num") is not None:
        raise KinemaError(f"task extend adds {n('extend_frames', 'extend_frames')} frames to the video's; drop "
                          f"{n('frame_num', 'frame_num')}.")
    if frames is None:
        raise KinemaError(f"task extend needs {n('extend_frames', 'extend_frames')}: how many frames to add (e.g. 32).")
    ext = parse_extension(frames, overlap, loop, video.shape[1], names, target.geometry.temporal, colour, join)
    if ext.loop and target.dit_config.in_dim <= target.geometry.z_dim:
        raise KinemaError(f"{n('loop', 'loop')} needs a DiT that takes known frames anywhere (an image-to-video type "
                          "model, like the built-in one); this checkpoint is a text-to-video model.")
    if target.dit_config.in_dim > target.geometry.z_dim and not target.has_clip:
        raise KinemaError("task extend on an image-to-video type DiT needs the CLIP vision encoder (the known frames' "
                          "tokens); pass clip=... (--clip) or a checkpoint folder that has it.")
    sized = settings.get("size") is not None  # a working size: the new clip made there, then resized to the video's
    if not sized:
        settings["size"] = (video.shape[3], video.shape[2])
    settings["frame_num"] = ext.clip_frames()
    return replace(ext, sized=sized)


def parse_windows(value, name: str = "context_windows", defaults: dict | None = None,
                  frames: int | None = None) -> ContextWindows | None:
    """None -> the model's own windows when it declares some (`sample_defaults.context`, `defaults`) and the clip
    (`frames` pixel frames) is longer than one of them, else none; False / "off" -> none; True or "default" -> the
    model's windows; a ContextWindows; the frames (17); a dict of its fields (`frames` may be "default"). Fields not
    given come from the model's `sample_defaults.context`, then from ContextWindows' own (the wrapper's: 81 frames,
    overlap 16, for Wan2.1's 81-frame training). A checkpoint that declares none (Wan2.1's) runs in one pass unless
    windows are asked for, as in the wrapper."""
    if value is None:
        if not defaults or frames is None:
            return None
        own = record_of(with_defaults(True, "frames", dict(defaults)), ContextWindows, name)
        return own if (frames - 1) // 4 + 1 > own.latent_frames else None
    if value is False or is_off(value):
        return None
    if isinstance(value, ContextWindows):
        return value
    if value is True or isinstance(value, (dict, int)) or is_default(value):  # an int: the frames
        return record_of(with_defaults(value, "frames", dict(defaults or {})), ContextWindows, name)
    raise KinemaError(f"{name} {value!r} is not understood; pass True or 'default' (the model's windows), 'off' or "
                      "False (one pass), a ContextWindows or a dict of its fields.")


def parse_references(value, windows: ContextWindows | None, spec: Task, target: Target,
                     names: dict) -> tuple[torch.Tensor, ...]:
    """context_reference: None, one image or a list of them (any form image inputs take) -> the images. They
    replace the first frame's latent as the anchor of the windows that do not start at the video's first frame
    (the wrapper's context reference_latent), so they need windows, an image-to-video type DiT and a task whose
    first frame is known (i2v, flf2v, extend)."""
    if value is None:
        return ()
    name = names.get("context_reference", "context_reference")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        return ()
    if windows is None:
        raise KinemaError(f"{name} anchors context windows, and this call runs in one pass; turn windows on "
                          f"({names.get('context_windows', 'context_windows')}) or drop it.")
    if target.dit_config.in_dim <= target.geometry.z_dim:
        raise KinemaError(f"{name} takes the place of a window's first known frame, and this checkpoint is a "
                          "text-to-video DiT (no image condition); use an image-to-video type model or drop it.")
    if not (spec.images or spec.name == "extend"):
        raise KinemaError(f"{name} takes the place of a window's first known frame, and task {spec.name} has none; "
                          "use it with i2v, flf2v or extend.")
    return tuple(image_input(v, f"{name} {i + 1}" if len(items) > 1 else name) for i, v in enumerate(items))


def prompt_sections(prompt: str, windows: bool, name: str = "prompt") -> tuple[str, ...]:
    """'a | b | c' -> ('a', 'b', 'c') for prompt travel over context windows; one prompt otherwise."""
    parts = tuple(p.strip() for p in prompt.split("|"))
    if len(parts) == 1:
        return parts
    if not windows:
        raise KinemaError(f"{name} has {len(parts)} '|'-separated prompts: prompt travel spreads them over context "
                          "windows; turn windows on (--context_frames) or write one prompt.")
    if not all(parts):
        raise KinemaError(f"{name} {prompt!r} has an empty '|' section; write text between every '|'.")
    return parts


def check_task(target: Target, spec: Task, asked: str) -> None:
    """Can this model set run this task? Kinema-trained models list their tasks; official ones follow their
    DiT variant."""
    if spec.model_type == ANY_MODEL:  # e.g. extend: the known frames by latent replacement work on any DiT
        pass
    elif target.info.tasks:
        if spec.name not in target.info.tasks:
            raise KinemaError(f"this model was trained for {', '.join(target.info.tasks)}, not {asked}.")
    elif target.model_type != spec.model_type:
        raise KinemaError(f"task {asked} needs a {spec.model_type} DiT, but the checkpoint is a {target.model_type} "
                          "model.")
    if spec.needs_clip and not target.has_clip:
        raise KinemaError(f"task {asked} needs the CLIP vision encoder; pass clip=... (--clip) or a checkpoint folder "
                          "that has it.")


def media_inputs(spec: Task, asked: str, given: dict, names: dict) -> dict[str, torch.Tensor]:
    """The task's media inputs as tensors; an input the task does not use, or one it lacks, is an error."""
    out = {}
    for key, value in given.items():
        label = names.get(key, key)
        if value is not None and key not in spec.inputs:
            raise KinemaError(f"{label} is not used by task {asked}; use task {task_using(key)}.")
        if value is None and key in spec.inputs:
            raise KinemaError(f"task {asked} needs {label}.")
    for key, value in given.items():
        if value is not None:
            label = names.get(key, key)
            out[key] = video_input(value, label) if key == "video" else image_input(value, label)
    return out
