"""ComfyUI's core Wan nodes, under ComfyUI's class_type names, inputs, defaults and meaning, so the Wan2.1
workflows ComfyUI publishes run unmodified. The nodes call Kinema's stages (build_condition, guided_model,
the one sampler loop, the VAE, kinema.media's writers); only ComfyUI's own conventions live here: its
sigma schedules, its noise, its image resizing and its output names.

Where the numbers differ from ComfyUI's, and why:
- LATENT values are in the DiT's normalised latent space (Kinema's VAE normalises on encode); ComfyUI keeps
  raw VAE latents and normalises inside the sampler. Same pictures; a LATENT saved by one is not the other's.
- Timesteps: the DiT gets sigma * 1000 unrounded, as in ComfyUI; kinema.Pipeline truncates to integers and
  starts from sigma 0.999 (the official Wan schedule), ComfyUI's `simple` from 1.0. So a KSampler run and a
  Pipeline run with the same seed, solver and shift differ slightly by design (tests/test_workflow_comfy.py
  measures it); driven with the Pipeline's schedule the same code gives the Pipeline's numbers.
- uni_pc / uni_pc_bh2 are Wan's flow UniPC (order 2, lambda = log((1 - sigma) / sigma), B(h) = -h or e^-h - 1)
  on ComfyUI's sigmas (penultimate sigma dropped, as ComfyUI does); ComfyUI's runs order 3 in a
  variance-exploding parametrisation and ends at sigma 0.001. dpmpp_2m is k-diffusion's (in -log sigma).
- Several start (or end) frames: the condition's mask marks each known pixel frame (the engine's builder);
  ComfyUI marks whole latent frames. One image, as in every published workflow, gives the same mask.
- An i2v DiT sampled without an image condition gets ComfyUI's zeros, except the built-in model, which gets
  the condition it was trained with for t2v (the latent of a blank video), as kinema.Pipeline gives it.
- VAEDecodeTiled tiles with Kinema's TiledVAE (tile and overlap in pixels, the overlap at least Kinema's own);
  the VAE decodes causally frame by frame, so temporal_size / temporal_overlap have nothing to split.
- SaveAnimatedWEBP's `method` is Pillow's default (4) whatever is chosen; SaveWEBM writes VP9 only; the
  prompt and workflow go into the writers' metadata (JSON, read back by kinema.media.read_metadata).
"""

from __future__ import annotations

import functools

import hashlib
import os
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from kinema.errors import KinemaError
from kinema.workflow.folders import builtin_part, folders_of, listed
from kinema.workflow.types import BOOLEAN, CHOICE, FLOAT, INT, LINK, STRING, NodeOutput, node
from kinema.workflow.values import (ClipVisionOutput, ClipVisionRecipe, Conditioning, DiTRecipe, TextEncoderRecipe,
                                    VAERecipe, VideoValue)

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
DEFAULT_SHIFT = 8.0  # ComfyUI's sampling shift for Wan2.1 models without ModelSamplingSD3
SAMPLERS = {"euler": "euler", "dpmpp_2m": "dpmpp_2m", "uni_pc": "unipc_bh1", "uni_pc_bh2": "unipc"}
DISCARD_PENULTIMATE = ("uni_pc", "uni_pc_bh2")  # ComfyUI runs these on steps + 1 sigmas less the penultimate
SCHEDULERS = ("simple", "normal", "sgm_uniform")
CLIP_TYPES = ("stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image")
WEIGHT_DTYPES = {"default": "auto", "fp8_e4m3fn": "fp8_e4m3fn", "fp8_e4m3fn_fast": "fp8_e4m3fn", "fp8_e5m2": "fp8_e5m2"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# ComfyUI's fixed latent -> RGB preview map for the Wan2.1 VAE (comfy/latent_formats.py, Wan21).
WAN21_RGB = [[-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
             [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
             [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
             [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861]]
WAN21_RGB_BIAS = [-0.1835, -0.0868, -0.3360]


def _input_files(ctx) -> list[str]:
    """The images in the input folder, uploads to a subfolder as 'sub/name.png' (what /upload/image answers)."""
    folder = getattr(ctx, "input_dir", None)
    if folder is None or not Path(folder).is_dir():
        return []
    root = Path(folder)
    return sorted(f.relative_to(root).as_posix() for f in root.rglob("*")
                  if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(p.startswith(".") for p in f.relative_to(root).parts))


def _error(node_name: str, input_name: str, why: str) -> KinemaError:
    return KinemaError(f"{node_name}.{input_name}: {why}")


def _model_path(ctx, node_name: str, input_name: str, kind: str, name: str) -> str:
    try:
        return str(folders_of(ctx).path(kind, name))
    except KinemaError as e:
        raise _error(node_name, input_name, str(e)) from None


# -- images: ComfyUI's IMAGE [B, H, W, 3] in [0, 1] <-> Kinema's [3, H, W] in [-1, 1] ----------------------------
def _to_model(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [H, W, C] -> [3, H, W] in [-1, 1]."""
    return image[..., :3].permute(2, 0, 1).float() * 2 - 1


def _to_image(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> IMAGE [B * F, H, W, 3] in [0, 1] (a video's frames as the batch)."""
    return ((video.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1)


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str = "bilinear", crop: str = "center"):
    """ComfyUI's comfy.utils.common_upscale: [B, C, H, W] centre-cropped to the target's aspect, then resized."""
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    return F.interpolate(samples, size=(height, width), mode=method)


def _fit_images(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> [B, H', W', 3] resized as ComfyUI's Wan nodes do (bilinear, centre crop)."""
    return common_upscale(images[..., :3].movedim(-1, 1).float(), width, height, "bilinear", "center").movedim(1, -1)


# -- loaders ---------------------------------------------------------------------------------------------------
@node("UNETLoader", required={"unet_name": CHOICE(listed("diffusion_models")),
                              "weight_dtype": CHOICE(list(WEIGHT_DTYPES))},
      outputs=("MODEL",), category="advanced/loaders")
def unet_loader(ctx, unet_name, weight_dtype):
    """A diffusion model from diffusion_models/ (or unet/). weight_dtype 'default' keeps an fp8 file in fp8
    (Kinema's 'auto'); the fp8 choices store the blocks' Linear weights in that fp8 format."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise _error("UNETLoader", "weight_dtype", f"{weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}.")
    path = _model_path(ctx, "UNETLoader", "unet_name", "diffusion_models", unet_name)
    return (DiTRecipe(path, quantization=WEIGHT_DTYPES[weight_dtype], fp8_fast=weight_dtype.endswith("_fast")),)


@node("CLIPLoader", required={"clip_name": CHOICE(listed("text_encoders")), "type": CHOICE(CLIP_TYPES)},
      optional={"device": CHOICE(["default", "cpu"], extra={"advanced": True})},
      outputs=("CLIP",), category="advanced/loaders")
def clip_loader(ctx, clip_name, type="stable_diffusion", device="default"):
    """A text encoder from text_encoders/ (or clip/); Kinema runs type 'wan' (umT5-XXL, its tokenizer inside
    the file or beside it)."""
    if type != "wan":
        raise _error("CLIPLoader", "type", f"{type!r} is not supported: Kinema runs Wan2.1, whose text encoder is "
                     "umT5-XXL; set type to 'wan'.")
    path = _model_path(ctx, "CLIPLoader", "clip_name", "text_encoders", clip_name)
    return (TextEncoderRecipe(path, device="cpu" if device == "cpu" else None),)


@node("VAELoader", required={"vae_name": CHOICE(listed("vae"))}, outputs=("VAE",), category="loaders")
def vae_loader(ctx, vae_name):
    return (VAERecipe(_model_path(ctx, "VAELoader", "vae_name", "vae", vae_name)),)


@node("CLIPVisionLoader", required={"clip_name": CHOICE(listed("clip_vision"))}, outputs=("CLIP_VISION",),
      category="loaders")
def clip_vision_loader(ctx, clip_name):
    return (ClipVisionRecipe(_model_path(ctx, "CLIPVisionLoader", "clip_name", "clip_vision", clip_name)),)


@node("LoraLoaderModelOnly", required={"model": LINK("MODEL"), "lora_name": CHOICE(listed("loras")),
                                       "strength_model": FLOAT(1.0, -100.0, 100.0, 0.01)},
      outputs=("MODEL",), category="loaders")
def lora_loader_model_only(ctx, model: DiTRecipe, lora_name, strength_model):
    """The model with a LoRA from loras/ merged at load (the cached base model is not touched)."""
    if strength_model == 0:
        return (model,)
    path = _model_path(ctx, "LoraLoaderModelOnly", "lora_name", "loras", lora_name)
    return (replace(model, loras=(*model.loras, (path, float(strength_model)))),)


@node("UpscaleModelLoader", required={"model_name": CHOICE(listed("upscale_models"))}, outputs=("UPSCALE_MODEL",),
      category="loaders")
def upscale_model_loader(ctx, model_name):
    """An upscaler from upscale_models/: Kinema's learned x2 stages (a folder of them: the whole cascade; the
    built-in one is x4), or a Real-ESRGAN family file through spandrel."""
    from kinema.upscale import load_upscaler

    path = _model_path(ctx, "UpscaleModelLoader", "model_name", "upscale_models", model_name)
    try:
        return (load_upscaler(path, None),)
    except KinemaError as e:
        raise _error("UpscaleModelLoader", "model_name", str(e)) from None


@node("ImageUpscaleWithModel", required={"upscale_model": LINK("UPSCALE_MODEL"), "image": LINK("IMAGE")},
      outputs=("IMAGE",), category="image/upscaling")
def image_upscale_with_model(ctx, upscale_model, image):
    """Frames [F, H, W, 3] in [0, 1] upscaled by the model's factor, in tiles (Kinema's stages see the frames
    around each one: a video upscales as a video)."""
    from kinema.upscale import upscale_video

    video = image[..., :3].permute(3, 0, 1, 2).float() * 2 - 1  # [3, F, H, W]
    out = upscale_video(upscale_model, video)
    return (((out + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).contiguous(),)


@node("ModelSamplingSD3", required={"model": LINK("MODEL"), "shift": FLOAT(3.0, 0.0, 100.0, 0.01)},
      outputs=("MODEL",), category="advanced/model")
def model_sampling_sd3(ctx, model: DiTRecipe, shift):
    """The flow schedule's shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return (replace(model, shift=float(shift)),)


# -- images in ---------------------------------------------------------------------------------------------------
def _annotated(ctx, name: str) -> Path:
    """ComfyUI's annotated names: 'file.png', 'sub/file.png', 'file.png [output]'; confined to their folder."""
    folder = Path(ctx.input_dir)
    for tag, attr in ((" [input]", "input_dir"), (" [output]", "output_dir"), (" [temp]", "temp_dir")):
        if isinstance(name, str) and name.endswith(tag):
            name, folder = name[: -len(tag)], Path(getattr(ctx, attr))
    rel = PurePosixPath(str(name).replace("\\", "/"))
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise _error("LoadImage", "image", f"{name!r} points outside the input folder; give a file name in {folder}.")
    path = folder.joinpath(*rel.parts)
    if not path.is_file():
        raise _error("LoadImage", "image", f"{name!r} is not in {folder}; upload it (POST /upload/image) or copy it there.")
    return path


def _image_fingerprint(ctx, image=None, **_):
    path = _annotated(ctx, image)
    h = hashlib.sha256(path.read_bytes())
    return f"{h.hexdigest()}:{path.stat().st_mtime_ns}"


@node("LoadImage", required={"image": CHOICE(_input_files, upload="image")}, outputs=("IMAGE", "MASK"),
      category="image", fingerprint=_image_fingerprint)
def load_image(ctx, image):
    """An image (every frame of an animation of one size) from the input folder, and its alpha as a MASK
    (1 where transparent; a 64x64 zero mask without alpha), as ComfyUI reads it."""
    from PIL import ImageOps, ImageSequence

    from kinema.media.files import open_image

    path = _annotated(ctx, image)
    images, masks, size = [], [], None
    with open_image(path) as img:
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            size = size or rgb.size
            if rgb.size != size:
                continue
            images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None])
            if "A" in frame.getbands():
                mask = 1.0 - torch.from_numpy(np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0)
            elif frame.mode == "P" and "transparency" in frame.info:
                mask = 1.0 - torch.from_numpy(np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0)
            else:
                mask = torch.zeros(64, 64)
            masks.append(mask[None])
        multi = len(images) > 1 and img.format != "MPO"
    if multi:
        return torch.cat(images), torch.cat(masks)
    return images[0], masks[0]


# -- encoders ----------------------------------------------------------------------------------------------------
@node("CLIPTextEncode", required={"text": STRING(multiline=True, extra={"dynamicPrompts": True}), "clip": LINK("CLIP")},
      outputs=("CONDITIONING",), category="conditioning")
@torch.no_grad()
def clip_text_encode(ctx, text, clip: TextEncoderRecipe):
    """umT5 embeddings of the prompt, unpadded (the sampler pads them to the DiT's text length)."""
    if not isinstance(clip, TextEncoderRecipe):
        raise _error("CLIPTextEncode", "clip", "needs a CLIP from CLIPLoader (type 'wan').")
    encoder = ctx.models.text_encoder(clip)
    (emb,) = encoder.encode([text])  # [L, dim]
    return (Conditioning(emb[None].float().cpu(), prompt=text),)


@node("CLIPVisionEncode", required={"clip_vision": LINK("CLIP_VISION"), "image": LINK("IMAGE"),
                                    "crop": CHOICE(["center", "none"])},
      outputs=("CLIP_VISION_OUTPUT",), category="conditioning")
@torch.no_grad()
def clip_vision_encode(ctx, clip_vision: ClipVisionRecipe, image, crop="center"):
    """CLIP tokens of each image: 'center' crops it square first; 'none' squashes the whole frame (the
    reference's preprocessing, which the Wan i2v DiT was trained on)."""
    clip = ctx.models.clip_vision(clip_vision)
    x = image[..., :3].movedim(-1, 1).float()  # [B, 3, H, W]
    if crop == "center":
        side = min(x.shape[-2:])
        x = common_upscale(x, side, side, "bilinear", "center")
    tokens = clip.encode(x * 2 - 1)  # [B, N, dim]
    return (ClipVisionOutput(tokens.float().cpu()),)


def _vae(ctx, recipe, node_name: str):
    if not isinstance(recipe, VAERecipe):
        raise _error(node_name, "vae", "needs a VAE from VAELoader.")
    return ctx.models.vae(recipe)


def _condition(ctx, node_name, vae, frames: dict, length: int, width: int, height: int) -> torch.Tensor:
    from kinema.pipeline.conditioning import build_condition

    if (length - 1) % vae.temporal_ratio:
        raise _error(node_name, "length", f"{length} frames: Wan2.1 makes 4n + 1 frames (1, 5, ..., 81); use "
                     f"{1 + (length - 1) // 4 * 4} or {1 + ((length - 1) // 4 + 1) * 4}.")
    if width % vae.spatial_ratio or height % vae.spatial_ratio:
        raise _error(node_name, "width", f"{width}x{height} is not a multiple of {vae.spatial_ratio}.")
    with torch.no_grad():
        return build_condition(vae, frames, length, height, width).float().cpu()  # [1, 4 + z, T, h, w]


def _empty_latent(vae_z: int, batch: int, length: int, height: int, width: int, temporal=4, spatial=8):
    return {"samples": torch.zeros(batch, vae_z, (length - 1) // temporal + 1, height // spatial, width // spatial)}


_SIZE = dict(width=INT(832, 16, MAX_RESOLUTION, 16), height=INT(480, 16, MAX_RESOLUTION, 16),
             length=INT(81, 1, MAX_RESOLUTION, 4), batch_size=INT(1, 1, 4096))


@node("EmptyHunyuanLatentVideo", required={"width": INT(848, 16, MAX_RESOLUTION, 16),
                                           "height": INT(480, 16, MAX_RESOLUTION, 16),
                                           "length": INT(25, 1, MAX_RESOLUTION, 4), "batch_size": INT(1, 1, 4096)},
      outputs=("LATENT",), category="latent/video")
def empty_hunyuan_latent_video(ctx, width, height, length, batch_size=1):
    return (_empty_latent(16, batch_size, length, height, width),)


@node("WanImageToVideo", required={"positive": LINK("CONDITIONING"), "negative": LINK("CONDITIONING"),
                                   "vae": LINK("VAE"), **_SIZE},
      optional={"clip_vision_output": LINK("CLIP_VISION_OUTPUT"), "start_image": LINK("IMAGE")},
      outputs=("CONDITIONING", "CONDITIONING", "LATENT"), output_names=("positive", "negative", "latent"),
      category="conditioning/video_models")
def wan_image_to_video(ctx, positive, negative, vae, width, height, length, batch_size, clip_vision_output=None,
                       start_image=None):
    """The i2v condition: the start image(s) resized to width x height (bilinear, centre crop) as the known
    first frames, gray elsewhere, VAE-encoded with the frame mask; the CLIP tokens beside the text."""
    v = _vae(ctx, vae, "WanImageToVideo")
    y = None
    if start_image is not None:
        start = _fit_images(start_image[:length], width, height)
        y = _condition(ctx, "WanImageToVideo", v, {i: _to_model(f) for i, f in enumerate(start)}, length, width, height)
    clip = clip_vision_output.tokens if clip_vision_output is not None else None
    latent = _empty_latent(v.z_dim, batch_size, length, height, width, v.temporal_ratio, v.spatial_ratio)
    return positive.with_image(y, clip), negative.with_image(y, clip), latent


@node("WanFirstLastFrameToVideo", required={"positive": LINK("CONDITIONING"), "negative": LINK("CONDITIONING"),
                                            "vae": LINK("VAE"), **_SIZE},
      optional={"clip_vision_start_image": LINK("CLIP_VISION_OUTPUT"), "clip_vision_end_image": LINK("CLIP_VISION_OUTPUT"),
                "start_image": LINK("IMAGE"), "end_image": LINK("IMAGE")},
      outputs=("CONDITIONING", "CONDITIONING", "LATENT"), output_names=("positive", "negative", "latent"),
      category="conditioning/video_models")
def wan_first_last_frame_to_video(ctx, positive, negative, vae, width, height, length, batch_size,
                                  clip_vision_start_image=None, clip_vision_end_image=None, start_image=None,
                                  end_image=None):
    """The flf2v condition: start frames first, end frames last (each resized as ComfyUI does), and the CLIP
    tokens of the start and the end image concatenated sequence-wise."""
    v = _vae(ctx, vae, "WanFirstLastFrameToVideo")
    frames = {}
    if start_image is not None:
        frames.update(enumerate(_to_model(f) for f in _fit_images(start_image[:length], width, height)))
    if end_image is not None:
        end = _fit_images(end_image[-length:], width, height)
        frames.update({length - len(end) + i: _to_model(f) for i, f in enumerate(end)})
    y = _condition(ctx, "WanFirstLastFrameToVideo", v, frames, length, width, height)
    parts = [c.tokens for c in (clip_vision_start_image, clip_vision_end_image) if c is not None]
    clip = torch.cat(parts, dim=-2) if parts else None
    latent = _empty_latent(v.z_dim, batch_size, length, height, width, v.temporal_ratio, v.spatial_ratio)
    return positive.with_image(y, clip), negative.with_image(y, clip), latent


# -- sampling ----------------------------------------------------------------------------------------------------
def _time_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def scheduler_sigmas(scheduler: str, steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's schedules on a flow model (ModelSamplingDiscreteFlow: 1000 shifted sigmas t/1000), float32
    [steps + 1] ending in 0."""
    table = _time_shift(shift, torch.arange(1, 1001, dtype=torch.float32) / 1000)  # sigma_min .. sigma_max (= 1)
    if scheduler == "simple":
        ss = len(table) / steps
        sigs = [float(table[-(1 + int(x * ss))]) for x in range(steps)]
    elif scheduler in ("normal", "sgm_uniform"):
        start, end = float(table[-1]) * 1000, float(table[0]) * 1000  # timesteps of sigma_max / sigma_min
        ts = torch.linspace(start, end, steps + 1)[:-1] if scheduler == "sgm_uniform" else torch.linspace(start, end, steps)
        sigs = [float(_time_shift(shift, t / 1000)) for t in ts]
    else:
        raise KinemaError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def ksampler_sigmas(sampler_name: str, scheduler: str, steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """comfy.samplers.KSampler's sigmas: uni_pc's penultimate-sigma discard, and denoise < 1 as the tail of a
    longer schedule (int(steps / denoise) steps)."""

    def calc(n: int) -> torch.Tensor:
        if sampler_name in DISCARD_PENULTIMATE:
            s = scheduler_sigmas(scheduler, n + 1, shift)
            return torch.cat([s[:-2], s[-1:]])
        return scheduler_sigmas(scheduler, n, shift)

    if denoise is None or denoise > 0.9999:
        return calc(steps)
    if denoise <= 0:
        return torch.zeros(0)
    return calc(int(steps / denoise))[-(steps + 1):]


def _preview_fn(ctx, recipe: DiTRecipe):
    """latents [z, T, h, w] -> uint8 [h, w, 3] of the first frame: the built-in VAE's fitted map for the built-in
    DiT, else ComfyUI's fixed Wan2.1 matrix."""
    if _is_builtin(recipe):
        from kinema.pipeline.preview import LatentPreview

        preview = LatentPreview(ctx.models.vae(VAERecipe(str(builtin_part("vae")))))
        return lambda z: preview(z[:, :1])[0]
    w, b = torch.tensor(WAN21_RGB), torch.tensor(WAN21_RGB_BIAS)

    def project(z):
        rgb = z[:, 0].detach().float().cpu().permute(1, 2, 0) @ w + b  # [h, w, 3] in about [-1, 1]
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    return project


def _is_builtin(recipe: DiTRecipe) -> bool:
    try:
        return Path(recipe.path).resolve() == builtin_part("diffusion_models").resolve()
    except KinemaError:
        return False


def _empty_condition(ctx, dit, latent: torch.Tensor):
    """The built-in model's empty image condition for this latent (one VAE encode of a blank video)."""
    from kinema.pipeline.conditioning import empty_condition

    t, h, w = latent.shape[2:]
    vae = ctx.models.vae(VAERecipe(str(builtin_part("vae"))))
    return empty_condition(dit.config, vae, (t - 1) * vae.temporal_ratio + 1, h * vae.spatial_ratio, w * vae.spatial_ratio)


def _branch(ctx, cond: Conditioning, dit, latent: torch.Tensor, recipe: DiTRecipe, device, node_name: str, which: str,
            empty=None):
    """The DiT's keyword inputs of one guidance branch: the text padded to its length, and the image condition
    (an i2v DiT given none: the empty one, `empty()`, built once for both branches; see the module docstring)."""
    from kinema.pipeline.prompts import pad_context

    if not isinstance(cond, Conditioning):
        raise _error(node_name, which, "needs a CONDITIONING (CLIPTextEncode, WanImageToVideo, ...).")
    cfg, b, (t, h, w) = dit.config, latent.shape[0], latent.shape[2:]
    context = pad_context([cond.context[0].to(device)], cfg.text_len)  # [1, text_len, text_dim]
    y, clip = cond.y, cond.clip_fea
    needs_y = cfg.in_dim > latent.shape[1]
    if needs_y and y is None:
        if _is_builtin(recipe):
            blank = empty() if empty is not None else _empty_condition(ctx, dit, latent)
            y, clip = blank.y, clip if clip is not None else blank.clip_fea
        else:
            y = torch.zeros(1, cfg.in_dim - latent.shape[1], t, h, w)
    if needs_y and clip is None:
        if cfg.model_type == "flf2v":
            raise _error(node_name, which, "a first-last-frame DiT needs the CLIP tokens of both frames; connect "
                         "clip_vision_start_image and clip_vision_end_image of WanFirstLastFrameToVideo.")
        clip = torch.zeros(1, 1, cfg.image_dim)
    if not needs_y:
        y = clip = None  # a t2v DiT takes neither
    elif tuple(y.shape[2:]) != (t, h, w):
        raise _error(node_name, which, f"its image condition is for a latent of {list(y.shape[2:])} (T, h, w) but "
                     f"latent_image is {list(latent.shape[2:])}; give both nodes the same width, height and length.")
    out = {"context": context, "clip_fea": clip, "y": y}
    return {k: None if v is None else v.to(device).expand(b, *v.shape[1:]) if v.shape[0] == 1 else v.to(device)
            for k, v in out.items()}


def _place(part) -> torch.device:
    """The DiT on the device it runs on (the cache loads it on the host when offloading; it stays there while
    cached unless a block placement moves its blocks)."""
    device = part.runtime.device
    if part.placement is None and part.model.patch_embedding.weight.device != device:
        part.model.to(device)
    return device


@torch.no_grad()
def run_sampler(ctx, recipe: DiTRecipe, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, solver: str,
                positive: Conditioning, negative: Conditioning, cfg: float, node_name: str = "KSampler") -> torch.Tensor:
    """The guided DiT through kinema.sampling.sample from x at sigmas[0]; per-step progress, previews and cancel."""
    from kinema.pipeline.guidance import Sequential, guided_model
    from kinema.sampling import sample

    part = ctx.models.dit(recipe)
    device = _place(part)
    empty = functools.cache(lambda: _empty_condition(ctx, part.model, x))
    cond = _branch(ctx, positive, part.model, x, recipe, device, node_name, "positive", empty)
    uncond = _branch(ctx, negative, part.model, x, recipe, device, node_name, "negative", empty) if cfg != 1.0 else None
    model_fn = guided_model(part.model, cond, uncond, float(cfg), Sequential(), (), part.runtime.attention)
    total = len(timesteps)
    preview = _preview_fn(ctx, recipe) if getattr(ctx, "preview", False) else None

    def callback(info):
        ctx.progress(info.step + 1, total, preview(info.denoised[0]) if preview is not None else None)

    return sample(model_fn, x.to(device), sigmas, timesteps, solver, 0, False, callback, ctx.cancel).float().cpu()


def _ksample(ctx, node_name, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
             denoise=1.0, add_noise=True, start_step=None, last_step=None, force_full_denoise=False):
    """ComfyUI's common_ksampler on the flow model: seeded CPU noise of the latent's shape, x = sigma0 * noise +
    (1 - sigma0) * latent, the sampler over the sigmas, and the result divided by (1 - sigma_last)."""
    from kinema.sampling import initial_noise

    if not isinstance(model, DiTRecipe):
        raise _error(node_name, "model", "needs a MODEL from UNETLoader.")
    if sampler_name not in SAMPLERS:
        raise _error(node_name, "sampler_name", f"{sampler_name!r} is not one Kinema runs; use {', '.join(SAMPLERS)}.")
    if scheduler not in SCHEDULERS:
        raise _error(node_name, "scheduler", f"{scheduler!r} is not one Kinema runs; use {', '.join(SCHEDULERS)}.")
    shift = model.shift
    if shift is None:
        info = ctx.models.dit(model).info
        shift = float(info.sample_defaults.get("shift", DEFAULT_SHIFT))
    if not shift > 0:
        raise _error(node_name, "model", f"the sampling shift is {shift}; set ModelSamplingSD3's shift above 0 (Wan uses 3 to 16).")
    sigmas = ksampler_sigmas(sampler_name, scheduler, steps, shift, denoise)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return ({**latent, "samples": latent["samples"].clone()},)
        sigmas = sigmas[start_step:]
    if len(sigmas) <= 1:
        return ({**latent, "samples": latent["samples"].clone()},)
    samples = latent["samples"].float()
    noise = initial_noise(samples.shape, int(seed)) if add_noise else torch.zeros_like(samples)
    x = sigmas[0] * noise + (1 - sigmas[0]) * samples
    x0 = run_sampler(ctx, model, x, sigmas, sigmas[:-1] * 1000, SAMPLERS[sampler_name], positive, negative, cfg, node_name)
    return ({**latent, "samples": x0 / (1 - sigmas[-1])},)


_SAMPLER_INPUTS = dict(cfg=FLOAT(8.0, 0.0, 100.0, 0.1, extra={"round": 0.01}), sampler_name=CHOICE(list(SAMPLERS)),
                       scheduler=CHOICE(list(SCHEDULERS)))


@node("KSampler", required={"model": LINK("MODEL"),
                            "seed": INT(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                            "steps": INT(20, 1, 10000), **_SAMPLER_INPUTS,
                            "positive": LINK("CONDITIONING"), "negative": LINK("CONDITIONING"),
                            "latent_image": LINK("LATENT"), "denoise": FLOAT(1.0, 0.0, 1.0, 0.01)},
      outputs=("LATENT",), category="sampling")
def ksampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
    return _ksample(ctx, "KSampler", model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                    latent_image, denoise)


@node("KSamplerAdvanced", required={"model": LINK("MODEL"), "add_noise": CHOICE(["enable", "disable"]),
                                    "noise_seed": INT(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                                    "steps": INT(20, 1, 10000), **_SAMPLER_INPUTS,
                                    "positive": LINK("CONDITIONING"), "negative": LINK("CONDITIONING"),
                                    "latent_image": LINK("LATENT"), "start_at_step": INT(0, 0, 10000),
                                    "end_at_step": INT(10000, 0, 10000),
                                    "return_with_leftover_noise": CHOICE(["disable", "enable"])},
      outputs=("LATENT",), category="sampling")
def ksampler_advanced(ctx, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                      latent_image, start_at_step, end_at_step, return_with_leftover_noise):
    return _ksample(ctx, "KSamplerAdvanced", model, noise_seed, steps, cfg, sampler_name, scheduler, positive,
                    negative, latent_image, 1.0, add_noise == "enable", start_at_step, end_at_step,
                    return_with_leftover_noise != "enable")


# -- VAE ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _decode(vae, samples: torch.Tensor) -> torch.Tensor:
    return _to_image(vae.decode(samples.float().to(vae.device)))


@node("VAEDecode", required={"samples": LINK("LATENT"), "vae": LINK("VAE")}, outputs=("IMAGE",), category="latent")
def vae_decode(ctx, samples, vae):
    """Latents -> frames; a batch of videos comes out as one batch of frames, as in ComfyUI."""
    from kinema.memory.vae_tiling import TiledVAE

    return (_decode(TiledVAE(_vae(ctx, vae, "VAEDecode"), "auto"), samples["samples"]),)


@node("VAEDecodeTiled", required={"samples": LINK("LATENT"), "vae": LINK("VAE"),
                                  "tile_size": INT(512, 64, 4096, 32), "overlap": INT(64, 0, 4096, 32),
                                  "temporal_size": INT(64, 8, 4096, 4), "temporal_overlap": INT(8, 4, 4096, 4)},
      outputs=("IMAGE",), category="_for_testing")
def vae_decode_tiled(ctx, samples, vae, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
    """Decoded on tile_size-pixel tiles; overlapping by `overlap` pixels or by Kinema's own overlap (16 latent
    pixels, at most half a tile), whichever is larger: its seam blend needs that much."""
    from kinema.memory.vae_tiling import MIN_TILE, OVERLAP, TiledVAE

    v = _vae(ctx, vae, "VAEDecodeTiled")
    r = v.spatial_ratio
    tile = max(tile_size // r * r, MIN_TILE * r)
    return (_decode(TiledVAE(v, (tile, tile), overlap=max(overlap // r, OVERLAP)), samples["samples"]),)


@node("VAEEncode", required={"pixels": LINK("IMAGE"), "vae": LINK("VAE")}, outputs=("LATENT",), category="latent")
@torch.no_grad()
def vae_encode(ctx, pixels, vae):
    """Frames -> latents: cropped (centred) to multiples of the VAE's stride, and to 4n + 1 frames."""
    v = _vae(ctx, vae, "VAEEncode")
    r, tr = v.spatial_ratio, v.temporal_ratio
    h, w = pixels.shape[1] // r * r, pixels.shape[2] // r * r
    if h == 0 or w == 0:
        raise _error("VAEEncode", "pixels", f"{pixels.shape[2]}x{pixels.shape[1]} is smaller than the VAE's {r}-pixel stride.")
    top, left = (pixels.shape[1] % r) // 2, (pixels.shape[2] % r) // 2
    frames = pixels[: 1 + (pixels.shape[0] - 1) // tr * tr, top : top + h, left : left + w, :3]
    video = frames.permute(3, 0, 1, 2)[None].float() * 2 - 1  # [1, 3, F, H, W]
    return ({"samples": v.encode(video.to(v.device)).float().cpu()},)


# -- outputs -----------------------------------------------------------------------------------------------------
def save_target(ctx, filename_prefix: str, node_name: str):
    """ComfyUI's folder_paths.get_save_image_path: (folder, file stem, next counter, subfolder); a prefix may
    hold subfolders ('video/ComfyUI'), never one outside the output folder."""
    out = Path(ctx.output_dir).resolve()
    rel = PurePosixPath(os.path.normpath(str(filename_prefix).replace("\\", "/")))
    if not filename_prefix or rel.is_absolute() or ".." in rel.parts or rel.name in ("", "."):
        raise _error(node_name, "filename_prefix", f"{filename_prefix!r} leaves the output folder; use a name such as "
                     "'ComfyUI' or 'video/ComfyUI'.")
    subfolder = str(rel.parent) if str(rel.parent) != "." else ""
    folder = out.joinpath(*PurePosixPath(subfolder).parts) if subfolder else out
    folder.mkdir(parents=True, exist_ok=True)
    stem = rel.name
    counter = 0
    for name in os.listdir(folder):
        if name.startswith(stem + "_"):
            digits = name[len(stem) + 1 :].split("_")[0]
            if digits.isdigit() and name[len(stem) + 1 + len(digits) :].startswith("_"):
                counter = max(counter, int(digits))
    return folder, stem, counter + 1, subfolder


def _metadata(ctx, hidden: dict) -> dict:
    """ComfyUI's: the API prompt under "prompt", and each extra_pnginfo entry (the UI "workflow") by its key."""
    meta = {}
    prompt = hidden.get("prompt") or getattr(ctx, "prompt", None)
    if prompt:
        meta["prompt"] = prompt
    meta.update(hidden.get("extra_pnginfo") or getattr(ctx, "extra_pnginfo", None) or {})
    return meta


def _write(ctx, node_name, frames, filename_prefix, ext, hidden: dict, **writer):
    """One file `prefix_00001_.ext` through kinema.media.save_video (never overwrites; .partial until done)."""
    from kinema.media import save_video

    folder, stem, counter, subfolder = save_target(ctx, filename_prefix, node_name)
    for _ in range(100):
        path = folder / f"{stem}_{counter:05}_.{ext}"
        if not path.exists():
            break
        counter += 1
    save_video(frames, path, metadata=_metadata(ctx, hidden) or None, **writer)
    return {"filename": path.name, "subfolder": subfolder, "type": "output"}, counter


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images[..., :3].float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # as ComfyUI's np.clip(255 x)


_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


@node("SaveImage", required={"images": LINK("IMAGE"), "filename_prefix": STRING("ComfyUI")}, hidden=_HIDDEN,
      output_node=True, category="image")
def save_image(ctx, images, filename_prefix="ComfyUI", **hidden):
    """Each image as `prefix_00001_.png`, the prompt and workflow in its metadata."""
    results = []
    frames = _uint8(images)
    for frame in frames:
        saved, _ = _write(ctx, "SaveImage", frame[None], filename_prefix, "png", hidden, format="png")
        results.append(saved)
    return NodeOutput((), {"images": results})


@node("SaveAnimatedWEBP", required={"images": LINK("IMAGE"), "filename_prefix": STRING("ComfyUI"),
                                    "fps": FLOAT(6.0, 0.01, 1000.0, 0.01), "lossless": BOOLEAN(True),
                                    "quality": INT(80, 0, 100), "method": CHOICE(["default", "fastest", "slowest"])},
      hidden=_HIDDEN, output_node=True, category="image/animation")
def save_animated_webp(ctx, images, filename_prefix, fps, lossless, quality, method="default", **hidden):
    saved, _ = _write(ctx, "SaveAnimatedWEBP", _uint8(images), filename_prefix, "webp", hidden, format="webp",
                      frame_rate=float(fps), lossless=bool(lossless), quality=int(quality))
    return NodeOutput((), {"images": [saved], "animated": [len(images) != 1]})


@node("SaveWEBM", required={"images": LINK("IMAGE"), "filename_prefix": STRING("ComfyUI"), "codec": CHOICE(["vp9"]),
                            "fps": FLOAT(24.0, 0.01, 1000.0, 0.01),
                            "crf": FLOAT(32.0, 0, 63.0, 1, tooltip="Higher crf means lower quality with a smaller "
                                         "file size, lower crf means higher quality higher filesize.")},
      hidden=_HIDDEN, output_node=True, category="image/video")
def save_webm(ctx, images, filename_prefix, codec, fps, crf, **hidden):
    saved, _ = _write(ctx, "SaveWEBM", _uint8(images), filename_prefix, "webm", hidden, format="webm", frame_rate=float(fps),
                      crf=int(crf))
    return NodeOutput((), {"images": [saved], "animated": [True]})


@node("CreateVideo", required={"images": LINK("IMAGE"), "fps": FLOAT(30.0, 1.0, 120.0, 1.0)},
      optional={"audio": LINK("AUDIO", tooltip="The audio to add to the video.")}, outputs=("VIDEO",),
      category="image/video", display_name="Create Video")
def create_video(ctx, images, fps, audio=None):
    return (VideoValue(images, float(fps), audio),)


@node("SaveVideo", required={"video": LINK("VIDEO"), "filename_prefix": STRING("video/ComfyUI"),
                             "format": CHOICE(["auto", "mp4"], "auto"), "codec": CHOICE(["auto", "h264"], "auto")},
      hidden=_HIDDEN, output_node=True, category="image/video", display_name="Save Video")
def save_video_node(ctx, video: VideoValue, filename_prefix="video/ComfyUI", format="auto", codec="auto", **hidden):
    """The video as `prefix_00001_.mp4` (H.264), the prompt and workflow in its metadata."""
    if video.audio is not None:
        raise _error("SaveVideo", "video", "has audio, which Kinema's writers cannot mux yet; leave CreateVideo's "
                     "audio unconnected.")
    saved, _ = _write(ctx, "SaveVideo", _uint8(video.frames), filename_prefix, "mp4", hidden, format="h264-mp4",
                      frame_rate=float(video.fps))
    return NodeOutput((), {"images": [saved], "animated": [True]})


__all__ = ["common_upscale", "ksampler_sigmas", "run_sampler", "save_target", "scheduler_sigmas"]
