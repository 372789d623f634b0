"""Kinema's own nodes: the whole engine, `kinema.Pipeline`, as a loader, a generate and a save node.

They are what the web page at `/` submits: one small graph per run (loader -> generate -> save, plus
LoadImage / KinemaLoadVideo for the task's inputs), so the page speaks only ComfyUI's API and a page
run is an ordinary prompt in the queue and the history. Settings left at 0 take the model's defaults,
exactly as `kinema generate` without the flag.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.pipeline.extend import COLOUR_MATCH, OVERLAP_JOIN
from kinema.workflow.types import BOOLEAN, CHOICE, FLOAT, INT, LINK, STRING, NodeOutput, node

BUILTIN = "builtin"
NONE = "none"
TASKS = ("t2v", "i2v", "flf2v", "t2i", "v2v", "extend")
DTYPES = ("default", "fp32", "bf16", "fp16")
ATTENTION = ("auto", "sdpa", "flash_attn", "sageattn")
CACHE_PRESETS = ("off", "teacache:0.05", "teacache:0.1", "teacache:0.2", "magcache:0.06:2", "magcache:0.12:2",
                 "magcache:0.24:3")
VAE_TILES = ("auto", "off", "256x256", "512x512", "768x768")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".gif", ".webp", ".avi")
CATEGORY = "kinema"


# -- the loader ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineRecipe:
    """KINEMA_PIPELINE: a whole model set and its load options. The executor's model cache loads it once
    (ModelCache.pipeline) and keeps it between prompts, so only a changed recipe reloads."""

    ckpt: str | None = None  # a checkpoint folder; None with no dit: the built-in model
    dit: str | None = None
    t5: str | None = None
    vae: str | None = None
    clip: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    dtype: str | None = None
    quantization: str | None = None
    attention: str = "auto"
    blocks_to_swap: int = 0

    def options(self) -> dict:
        return dict(ckpt=self.ckpt, dit=self.dit, t5=self.t5, vae=self.vae, clip=self.clip, loras=self.loras,
                    dtype=self.dtype, quantization=self.quantization, attention=self.attention,
                    blocks_to_swap=self.blocks_to_swap)

    def load(self, **parallel):
        """The pipeline; `parallel`: Pipeline.load's parallel options (a multi-rank Ray worker's)."""
        import kinema

        return kinema.Pipeline.load(**self.options(), **parallel)


def _folder_list(ctx, kind: str) -> list[str]:
    folders = getattr(ctx, "folders", None)
    if folders is None:
        return []
    try:
        return list(folders.list(kind))
    except KinemaError:
        return []


def _checkpoints(ctx) -> list[str]:
    return [BUILTIN] + [n for n in _folder_list(ctx, "diffusion_models") if not n.startswith("kinema_builtin_")]


def _part_choices(kind: str):
    return lambda ctx: ["auto"] + _folder_list(ctx, kind)


def _loras(ctx) -> list[str]:
    return [NONE] + _folder_list(ctx, "loras")


def _quantizations(ctx=None) -> list[str]:
    from kinema.ops.fp8 import MODES

    return ["disabled", *MODES]


@node("KinemaPipelineLoader", category=CATEGORY, display_name="Kinema Pipeline Loader", outputs=("KINEMA_PIPELINE",),
      output_names=("pipeline",),
      required={
          "ckpt": CHOICE(_checkpoints, default=BUILTIN, tooltip="builtin: the shipped model; a checkpoint folder, "
                         "or a DiT file or folder in diffusion_models/ with text_encoder and vae chosen below"),
          "dtype": CHOICE(DTYPES, tooltip="the DiT's weights; default: bf16 on CUDA, fp32 on the CPU"),
          "quantization": CHOICE(_quantizations, default="disabled", tooltip="store the DiT's block weights in fp8"),
          "attention": CHOICE(ATTENTION),
          "blocks_to_swap": INT(0, min=0, max=100, tooltip="DiT blocks kept on the CPU and moved in per step"),
      },
      optional={
          "text_encoder": CHOICE(_part_choices("text_encoders"), default="auto",
                                 tooltip="auto: the checkpoint folder's own"),
          "vae": CHOICE(_part_choices("vae"), default="auto", tooltip="auto: the checkpoint folder's own"),
          "clip_vision": CHOICE(_part_choices("clip_vision"), default="auto", tooltip="auto: the checkpoint folder's "
                                "own (i2v / flf2v)"),
          "lora_1": CHOICE(_loras, default=NONE), "strength_1": FLOAT(1.0, min=-10, max=10, step=0.01),
          "lora_2": CHOICE(_loras, default=NONE), "strength_2": FLOAT(1.0, min=-10, max=10, step=0.01),
      })
def load_pipeline(ctx, ckpt, dtype, quantization, attention, blocks_to_swap, text_encoder="auto", vae="auto",
                  clip_vision="auto", lora_1=NONE, strength_1=1.0, lora_2=NONE, strength_2=1.0):
    """A whole Kinema model set (DiT, umT5, VAE, CLIP), loaded once and kept by the model cache."""
    from kinema.pipeline.load import LoadOptions

    def part(kind, name):
        return None if name in ("auto", "", None) else str(ctx.folders.path(kind, name))

    parts = dict(t5=part("text_encoders", text_encoder), vae=part("vae", vae), clip=part("clip_vision", clip_vision))
    loras = tuple((str(ctx.folders.path("loras", name)), float(s))
                  for name, s in ((lora_1, strength_1), (lora_2, strength_2)) if name not in (NONE, "", None))
    if ckpt == BUILTIN:
        if any(parts.values()):
            named = ", ".join(k for k, v in zip(("text_encoder", "vae", "clip_vision"), parts.values()) if v)
            raise KinemaError(f"KinemaPipelineLoader: ckpt builtin uses its own parts; set {named} to auto, or pick a "
                              "checkpoint in ckpt.")
        where = {}
    else:
        path = ctx.folders.path("diffusion_models", ckpt)
        if Path(path).is_dir() and not (parts["t5"] or parts["vae"]):  # a whole checkpoint folder
            where = {"ckpt": str(path)}
        else:  # a DiT file or DiT folder, with its parts from the other folders
            missing = [k for k, v in (("text_encoder", parts["t5"]), ("vae", parts["vae"])) if not v]
            if missing:
                raise KinemaError(f"KinemaPipelineLoader: ckpt {ckpt!r} is a DiT alone; choose its "
                                  f"{' and '.join(missing)} (files in text_encoders/ and vae/).")
            where = {"dit": str(path)}
    recipe = PipelineRecipe(**where, **{k: v for k, v in parts.items() if v}, loras=loras,
                            dtype=None if dtype == "default" else dtype,
                            quantization=None if quantization == "disabled" else quantization,
                            attention=attention, blocks_to_swap=int(blocks_to_swap))
    names = {k: f"KinemaPipelineLoader.{k}" for k in ("dtype", "quantization", "attention", "blocks_to_swap")}
    names["loras"] = "KinemaPipelineLoader.lora"
    LoadOptions(**recipe.options(), names=names).check(complete=False)  # every option checked before any weight
    return (recipe,)


# -- generate ------------------------------------------------------------------------------------
def _image_arg(image):
    """IMAGE [B, H, W, 3] in [0, 1] -> the Pipeline's float [3, H, W] in [-1, 1] (the first image)."""
    if image is None:
        return None
    return image[0].permute(2, 0, 1).float() * 2 - 1


def _video_arg(video):
    """IMAGE frames [F, H, W, 3] in [0, 1] -> float [3, F, H, W] in [-1, 1]."""
    if video is None:
        return None
    return video.permute(3, 0, 1, 2).float() * 2 - 1


GENERATE_NAMES = {"prompt": "KinemaGenerate.prompt", "negative_prompt": "KinemaGenerate.negative_prompt",
                  "size": "KinemaGenerate.width/height", "frame_num": "KinemaGenerate.frame_num",
                  "steps": "KinemaGenerate.steps", "shift": "KinemaGenerate.shift", "seed": "KinemaGenerate.seed",
                  "guide_scale": "KinemaGenerate.guide_scale", "solver": "KinemaGenerate.solver",
                  "denoise": "KinemaGenerate.denoise", "cache": "KinemaGenerate.cache",
                  "vae_tile": "KinemaGenerate.vae_tile", "image": "KinemaGenerate's image input",
                  "first_frame": "KinemaGenerate's first_frame input", "last_frame": "KinemaGenerate's last_frame input",
                  "video": "KinemaGenerate's video input", "extend_frames": "KinemaGenerate.extend_frames",
                  "overlap_frames": "KinemaGenerate.overlap_frames", "loop": "KinemaGenerate.loop",
                  "colour_match": "KinemaGenerate.colour_match", "overlap_join": "KinemaGenerate.overlap_join",
                  "skip_layers": "KinemaGenerate.slg", "enhance": "KinemaGenerate.feta",
                  "cfg_zero_star": "KinemaGenerate.cfg_zero_star", "upscale": "KinemaGenerate.upscale"}


def _solvers(ctx=None) -> list[str]:
    from kinema.sampling import SOLVERS

    return list(SOLVERS)


@node("KinemaGenerate", category=CATEGORY, display_name="Kinema Generate", outputs=("IMAGE", "FLOAT", "STRING"),
      output_names=("frames", "fps", "settings"),
      required={
          "pipeline": LINK("KINEMA_PIPELINE"),
          "task": CHOICE(TASKS),
          "prompt": STRING("", multiline=True),
          "negative_prompt": STRING("", multiline=True, tooltip="empty: the model's default negative prompt"),
          "width": INT(0, min=0, max=8192, step=16, tooltip="0: the model's default size"),
          "height": INT(0, min=0, max=8192, step=16, tooltip="0: the model's default size"),
          "frame_num": INT(0, min=0, max=1025, step=4, tooltip="4n + 1 frames; 0: the model's default"),
          "steps": INT(0, min=0, max=1000, tooltip="0: the model's default"),
          "seed": INT(0, min=0, max=2**63 - 1, control_after_generate=True),
          "guide_scale": FLOAT(-1.0, min=-1.0, max=100.0, step=0.1, tooltip="-1: the model's default; 1: no guidance"),
          "shift": FLOAT(0.0, min=0.0, max=100.0, step=0.1, tooltip="0: the model's default"),
          "solver": CHOICE(_solvers, default="unipc"),
          "cache": CHOICE(CACHE_PRESETS, tooltip="step caching, as kinema generate --cache"),
          "vae_tile": CHOICE(VAE_TILES, tooltip="VAE decode tiles in pixels; auto: only when memory needs it"),
      },
      optional={
          "image": LINK("IMAGE", tooltip="i2v: the first frame"),
          "first_frame": LINK("IMAGE", tooltip="flf2v"),
          "last_frame": LINK("IMAGE", tooltip="flf2v"),
          "video": LINK("IMAGE", tooltip="v2v: the source frames; extend: the video to continue"),
          "denoise": FLOAT(1.0, min=0.0, max=1.0, step=0.01, tooltip="v2v: the share of the schedule re-run"),
          "extend_frames": INT(32, min=4, max=1024, step=4, tooltip="extend: frames to add (a multiple of 4)"),
          "overlap_frames": INT(9, min=5, max=1025, step=4,
                                tooltip="extend: the video's last frames the new clip starts from (4k + 1)"),
          "loop": BOOLEAN(False, tooltip="extend: the new frames also lead back into the video's first frame"),
          "colour_match": CHOICE(COLOUR_MATCH, tooltip="extend: overlap shifts the new frames by the overlap's colour "
                                                        "offset; hm matches each frame's histogram; off"),
          "overlap_join": CHOICE(OVERLAP_JOIN, tooltip="extend: blend cross-fades the overlap into the new clip's; "
                                                        "cut keeps every input frame"),
          "slg": STRING("off", tooltip="skip-layer guidance: off, default (the model's blocks) or blocks like 9,10"),
          "feta": FLOAT(0.0, min=-1.0, max=20.0, step=0.1,
                        tooltip="Enhance-A-Video weight; 0: off; -1: the model's own weight"),
          "cfg_zero_star": BOOLEAN(False, tooltip="CFG-Zero*: the optimised guidance scale and zero-init"),
          "upscale": CHOICE(("off", "2", "4"), tooltip="the model's learned upscaler after decoding, x2 or x4"),
      })
def generate(ctx, pipeline, task, prompt, negative_prompt, width, height, frame_num, steps, seed, guide_scale, shift,
             solver, cache, vae_tile, image=None, first_frame=None, last_frame=None, video=None, denoise=1.0,
             extend_frames=32, overlap_frames=9, loop=False, colour_match="overlap", overlap_join="blend", slg="off",
             feta=0.0, cfg_zero_star=False, upscale="off"):
    """One kinema.Pipeline call: frames (IMAGE), their frame rate and the run's settings (JSON). Task extend
    continues `video` (the whole video comes back, the new frames joined on); the extend inputs are read only for
    it, as ComfyUI sends every widget's value whatever the task. slg / feta / cfg_zero_star: the guidance extras at
    kinema generate's flags of the same names (off by default); upscale: the learned upscaler."""
    from kinema.errors import Cancelled
    from kinema.pipeline.extras import is_off

    pipe = ctx.models.pipeline(pipeline)
    if (width == 0) != (height == 0):
        raise KinemaError(f"KinemaGenerate: width {width} and height {height}: set both, or both to 0 for the "
                          "model's default size.")
    first = {}

    def on_step(info):
        first.setdefault("step", info.step)
        done, total = info.step + 1 - first["step"], info.steps - first["step"]
        preview = None
        if ctx.preview:
            frames = info.preview()  # uint8 [T, h, w, 3] at latent resolution
            preview = frames[len(frames) // 2]
        ctx.progress(done, total, preview)

    try:
        job = pipe.prepare(prompt, task=task, size=(width, height) if width else None, frame_num=frame_num or None,
                           steps=steps or None, shift=shift or None,
                           guide_scale=None if guide_scale < 0 else guide_scale, seed=seed, solver=solver,
                           negative_prompt=negative_prompt or None, image=_image_arg(image),
                           first_frame=_image_arg(first_frame), last_frame=_image_arg(last_frame),
                           video=_video_arg(video), denoise=denoise, cache=cache, vae_tile=vae_tile, callback=on_step,
                           **(dict(extend_frames=extend_frames, overlap_frames=overlap_frames, loop=bool(loop),
                                   colour_match=colour_match, overlap_join=overlap_join) if task == "extend" else {}),
                           skip_layers=None if not str(slg).strip() or is_off(slg) else slg,
                           enhance=None if feta == 0 else "default" if feta == -1 else feta,
                           cfg_zero_star=True if cfg_zero_star else None,
                           upscale=None if is_off(upscale) else int(upscale),
                           cancel=ctx.cancel, progress=False, names=GENERATE_NAMES)
        result = pipe.run(job)
    except Cancelled:
        raise
    except KinemaError as e:
        raise KinemaError(str(e) if "KinemaGenerate" in str(e) else f"KinemaGenerate: {e}") from None
    frames = torch.from_numpy(result.frames.astype(np.float32) / 255.0)  # [F, H, W, 3] in [0, 1], as written
    return frames, float(result.settings.get("fps", 16)), json.dumps(result.settings)


# -- save ----------------------------------------------------------------------------------------
def _formats(ctx=None) -> list[str]:
    from kinema.media import FORMATS

    return list(FORMATS)


MIME = {"h264-mp4": "video/mp4", "h265-mp4": "video/mp4", "webm": "video/webm", "prores-mov": "video/quicktime",
        "gif": "image/gif", "webp": "image/webp", "png": "image/png"}


def _settings_dict(settings: str) -> dict:
    if not settings or not settings.strip():
        return {}
    try:
        value = json.loads(settings)
    except ValueError as e:
        raise KinemaError(f"KinemaSaveVideo.settings is not JSON ({e}); link KinemaGenerate's settings output or "
                          "leave it empty.") from None
    if not isinstance(value, dict):
        raise KinemaError("KinemaSaveVideo.settings must be a JSON object (KinemaGenerate's settings output).")
    return value


def _split_prefix(ctx, prefix: str) -> tuple[Path, str]:
    """ComfyUI prefixes may name a subfolder ("video/kinema"); it must stay inside the output folder."""
    parts = [p for p in prefix.replace("\\", "/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts) or prefix.startswith(("/", "\\")) or ":" in prefix:
        raise KinemaError(f"KinemaSaveVideo.filename_prefix {prefix!r} must be a name, optionally under a subfolder "
                          "of the output folder (e.g. 'kinema' or 'video/kinema'), with no '..' or absolute path.")
    return Path(ctx.output_dir).joinpath(*parts[:-1]), parts[-1]


@node("KinemaSaveVideo", category=CATEGORY, display_name="Kinema Save Video", output_node=True,
      required={
          "images": LINK("IMAGE"),
          "fps": FLOAT(16.0, min=0.01, max=240.0, step=0.01),
          "format": CHOICE(_formats, default="h264-mp4"),
          "filename_prefix": STRING("kinema"),
      },
      optional={"settings": STRING("", force_input=True, tooltip="KinemaGenerate's settings, embedded in the file")})
def save(ctx, images, fps, format, filename_prefix, settings=""):
    """Write the frames with Kinema's writers (settings embedded) into the output folder."""
    from kinema.media import save_video

    meta = {**_settings_dict(settings), "fps": float(fps), "format": format}
    folder, prefix = _split_prefix(ctx, filename_prefix)
    frames = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # [F, H, W, 3]
    if format == "png" and len(frames) > 1:
        raise KinemaError(f"KinemaSaveVideo.format png holds one frame, got {len(frames)}; use png-sequence or a "
                          "video format.")
    try:
        path = save_video(frames, folder, format=format, frame_rate=float(fps), filename_prefix=prefix, metadata=meta)
    except KinemaError as e:
        raise KinemaError(f"KinemaSaveVideo: {e}") from None
    sub = os.path.relpath(path.parent, ctx.output_dir)
    entry = {"filename": path.name, "subfolder": "" if sub == "." else sub.replace(os.sep, "/"), "type": "output",
             "format": MIME.get(format, format), "frame_rate": float(fps), "frames": len(frames)}
    key = "images" if format == "png" else "gifs"
    return NodeOutput((), {key: [entry], "settings": [meta]})


# -- load a video --------------------------------------------------------------------------------
def _input_videos(ctx) -> list[str]:
    folder = getattr(ctx, "input_dir", None)
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _video_path(ctx, video: str) -> Path:
    folder = Path(ctx.input_dir).resolve()
    path = (folder / video).resolve()
    if folder not in path.parents or not path.is_file():
        raise KinemaError(f"KinemaLoadVideo.video {video!r} is not a file in the input folder {folder}; upload it "
                          "first (POST /upload/image) or pick one of the listed files.")
    return path


def _video_fingerprint(ctx, video, **_):
    st = _video_path(ctx, video).stat()
    return (video, st.st_mtime_ns, st.st_size)


@node("KinemaLoadVideo", category=CATEGORY, display_name="Kinema Load Video", outputs=("IMAGE", "FLOAT"),
      output_names=("frames", "fps"), fingerprint=_video_fingerprint,
      required={"video": CHOICE(_input_videos, upload="video", tooltip="a video in the input folder")},
      optional={"frame_load_cap": INT(0, min=0, max=1025, tooltip="at most this many frames; 0: all"),
                "force_4n1": BOOLEAN(True, tooltip="drop trailing frames down to 4n + 1, the count Wan models take")})
def load_video(ctx, video, frame_load_cap=0, force_4n1=True):
    """A video from the input folder as IMAGE frames [F, H, W, 3] and its frame rate (v2v's source)."""
    from kinema.media import read_video

    try:
        clip = read_video(_video_path(ctx, video), max_frames=frame_load_cap or None)
    except KinemaError as e:
        raise KinemaError(str(e) if "KinemaLoadVideo" in str(e) else f"KinemaLoadVideo: {e}") from None
    frames = clip.frames
    if force_4n1:
        frames = frames[: (len(frames) - 1) // 4 * 4 + 1]
    frames = torch.as_tensor(np.asarray(frames)).float() / 255.0
    return frames, float(clip.fps or 16)
