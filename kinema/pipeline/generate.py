"""One generation pipeline for every task: t2v, t2i, i2v, flf2v, v2v and second stages.

Top to bottom, as the official scripts do it: encode the prompts, build the
image condition (i2v / flf2v), draw the seeded noise, sample with classifier-free
guidance, decode. The tasks differ only in which conditions they add and where
sampling starts, so there is one function, not one pipeline per task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kinema.errors import KinemaError
from kinema.memory.offload import offloader
from kinema.memory.vae_tiling import TiledVAE
from kinema.ops.attention import attention_backend
from kinema.pipeline.conditioning import build_condition, target_size
from kinema.pipeline.tasks import TEXT_LEN, Task, get_task
from kinema.sampling import add_noise, initial_noise, sample, schedule, start_step_for_denoise
from kinema.sampling.cache import make_cache

log = logging.getLogger("kinema")


@dataclass
class Models:
    dit: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: object  # kinema.encoders.text.TextEncoder
    clip: object | None = None  # kinema.encoders.image.ClipVisionEncoder, for i2v / flf2v


def round_frames(frame_num: int) -> int:
    """The nearest valid frame count 4n + 1 (at least 1), warning when it changes."""
    fixed = max(1, 4 * round((frame_num - 1) / 4) + 1)
    if fixed != frame_num:
        log.warning("frame count %d is not 4n+1; using %d", frame_num, fixed)
    return fixed


def round_size(width: int, height: int, multiple: int = 16) -> tuple[int, int]:
    """Width and height rounded to multiples of 16 (VAE stride x patch), warning when they change."""
    w, h = (max(multiple, multiple * round(v / multiple)) for v in (width, height))
    if (w, h) != (width, height):
        log.warning("size %dx%d is not a multiple of %d; using %dx%d", width, height, multiple, w, h)
    return w, h


def pad_context(embs: list[torch.Tensor], length: int = TEXT_LEN) -> torch.Tensor:
    """Text embeddings [L_i, D] -> [B, length, D], zero-padded as the reference pads before the DiT,
    and cut to `length` tokens (the reference's tokenizer never gives more than text_len)."""
    return torch.stack([torch.cat([e[:length], e.new_zeros(max(0, length - e.shape[0]), e.shape[1])]) for e in embs])


def _fit_last_frame(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The official flf2v rule: scale the last frame to cover the first's size, then centre-crop to it."""
    (h1, w1), (h2, w2) = first.shape[1:], last.shape[1:]
    if (h1, w1) == (h2, w2):
        return last
    ratio = max(w1 / w2, h1 / h2)
    size = (round(h2 * ratio), round(w2 * ratio))
    last = F.interpolate(last[None].float(), size=size, mode="bilinear", antialias=True)[0]
    top, left = (size[0] - h1) // 2, (size[1] - w1) // 2
    return last[:, top : top + h1, left : left + w1]


def check_task(dit, spec: Task) -> None:
    """Can this DiT run this task? Kinema-trained models list their tasks; official ones follow their variant."""
    tasks = getattr(dit, "tasks", ())
    if tasks:
        if spec.name not in tasks:
            raise KinemaError(f"this model was trained for {', '.join(tasks)}, not {spec.name}.")
    elif dit.config.model_type != spec.model_type:
        raise KinemaError(f"task {spec.name} needs a {spec.model_type} DiT, but the checkpoint is a {dit.config.model_type} model.")


def empty_condition(dit, vae, frame_num: int, height: int, width: int) -> dict:
    """The image inputs of an i2v-type DiT when no frame is given (mask 0, the latent of a blank video,
    CLIP tokens of zeros): how a model trained with condition dropout (Wan-Fun / Kinema) runs t2v."""
    y = build_condition(vae, {}, frame_num, height, width)
    return {"clip_fea": y.new_zeros(1, 1, dit.config.image_dim), "y": y}


def guided_model(dit, cond: dict, uncond: dict | None, guide_scale: float, batched: bool, cache=None):
    """model_fn(x, t) for the sampler: uncond + g * (cond - uncond), as two passes or one batch of two.

    cache: a StepCache (kinema/sampling/cache.py); each DiT call tells it which guidance
    branch each batch row is, so cond and uncond keep separate cached residuals."""

    def run(x, t, args, branches):
        return dit(x, t, **args) if cache is None else dit(x, t, **args, block_hook=cache.hook(branches))

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if uncond is None:
            return run(x, t, cond, ("cond",))
        if batched:
            both = {k: None if v is None else torch.cat([v, uncond[k]]) for k, v in cond.items()}
            v_cond, v_uncond = run(torch.cat([x, x]), torch.cat([t, t]), both, ("cond", "uncond")).chunk(2)
        else:
            v_cond, v_uncond = run(x, t, cond, ("cond",)), run(x, t, uncond, ("uncond",))
        return v_uncond + guide_scale * (v_cond - v_uncond)

    return model_fn


@torch.no_grad()
def generate(
    models: Models,
    task: str = "t2v",
    prompt: str = "",
    negative_prompt: str | None = None,
    size: tuple[int, int] | None = None,
    frame_num: int | None = None,
    steps: int | None = None,
    shift: float | None = None,
    guide_scale: float | None = None,
    seed: int = 0,
    solver: str = "unipc",
    image: torch.Tensor | None = None,
    first_frame: torch.Tensor | None = None,
    last_frame: torch.Tensor | None = None,
    video: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    denoise: float = 1.0,
    batched_cfg: bool = False,
    cache=None,
    vae_tile="auto",
    offload=False,
    attention: str | None = None,
    decode: bool = True,
    progress=True,
) -> dict:
    """Generate one video. Images are [3, H, W] and videos [3, F, H, W], in [-1, 1].

    Returns {"video": [3, F, H, W] in [-1, 1] (None when decode=False), "latents":
    [16, T, h, w], "settings": the values actually used, "cache": the StepCache or None}.
    `latents` (a first stage's output) or `video` (v2v) start sampling part-way,
    at the noise level `denoise` in (0, 1].
    `cache`: step caching, "teacache:THRESH" / "magcache:THRESH:K", a CacheSpec or a
    StepCache (kinema/sampling/cache.py); None computes every step.
    `vae_tile`: VAE encode/decode on spatial tiles: "auto" (only when the estimated
    memory exceeds what is free), "off", or (width, height) / "WxH" in pixels
    (kinema/memory/vae_tiling.py); a TiledVAE in `models.vae` is used as given.
    `offload`: True moves each model to the GPU only for its stage, in the official order
    (umT5, CLIP, VAE encode, DiT, VAE decode), and back to the CPU after; or an Offloader
    (kinema/memory/offload.py, e.g. with t5_cpu=True). False leaves the models where they are.
    `attention`: the DiT's attention backend while sampling, 'sdpa', 'flash_attn', 'sageattn'
    or 'auto' (kinema/ops/attention.py); None keeps the current one (`set_backend`).
    """
    spec = get_task(task)
    off = offloader(models, offload)  # moves nothing unless offloading; its device is where the DiT runs
    dit, vae, device = models.dit, models.vae, off.device
    if not isinstance(vae, TiledVAE):
        vae = TiledVAE(vae, vae_tile)
    check_task(dit, spec)
    # Unset values: the model's own defaults (Kinema-trained models carry them), then the task's.
    model_defaults = getattr(dit, "sample_defaults", {})
    if size is None:
        size = tuple(int(v) for v in model_defaults.get("size", spec.size).split("*"))
    width, height = round_size(*size)
    frame_num = 1 if spec.name == "t2i" else round_frames(frame_num or model_defaults.get("frame_num", spec.frame_num))
    steps = steps or model_defaults.get("steps", spec.steps)
    if shift is None:
        shift = model_defaults.get("shift", spec.default_shift(f"{width}*{height}"))
    if guide_scale is None:
        guide_scale = model_defaults.get("guide_scale", spec.guide_scale)
    if negative_prompt is None:
        negative_prompt = model_defaults.get("negative_prompt", spec.negative_prompt)

    first = image if spec.name == "i2v" else first_frame
    if spec.name in ("i2v", "flf2v"):  # missing inputs are reported before any model runs
        if models.clip is None:
            raise KinemaError(f"task {spec.name} needs the CLIP vision encoder; pass --clip or a checkpoint folder that has it.")
        if first is None:
            raise KinemaError(f"task {spec.name} needs {'an image (--image)' if spec.name == 'i2v' else 'a first frame (--first_frame)'}.")
        if spec.name == "flf2v" and last_frame is None:
            raise KinemaError("task flf2v needs a last frame (--last_frame).")

    with off.visit("t5"):  # the official order: umT5, CLIP, VAE encode, DiT, VAE decode
        embs = models.text_encoder.encode([prompt] + ([negative_prompt] if guide_scale != 1.0 else []))
    context = pad_context([e.to(device) for e in embs], dit.config.text_len)
    cond: dict = {"clip_fea": None, "y": None}
    uncond: dict = {"clip_fea": None, "y": None}
    if spec.name in ("i2v", "flf2v"):
        height, width = target_size(first.shape[1], first.shape[2], width * height, vae.spatial_ratio, dit.config.patch_size[1])
        known = {0: first}
        if spec.name == "flf2v":
            known[frame_num - 1] = _fit_last_frame(first, last_frame)
        with off.visit("clip"):
            clip = torch.cat([models.clip.encode(f[None].to(models.clip.device)) for f in known.values()], dim=1)
        with off.visit("vae"):
            y = build_condition(vae, known, frame_num, height, width)
        cond = uncond = {"clip_fea": clip.to(device), "y": y.to(device)}  # the image condition is not guided
    elif dit.config.in_dim > vae.z_dim:
        with off.visit("vae"):
            cond = uncond = {k: v.to(device) for k, v in empty_condition(dit, vae, frame_num, height, width).items()}
    lat_shape = (1, vae.z_dim, (frame_num - 1) // vae.temporal_ratio + 1, height // vae.spatial_ratio, width // vae.spatial_ratio)

    cond = {"context": context[:1], **cond}
    uncond = {"context": context[1:], **uncond} if guide_scale != 1.0 else None

    sigmas, timesteps = schedule(solver, steps, shift)
    noise = initial_noise(lat_shape, seed).to(device)
    start = 0
    if video is not None or latents is not None:
        if latents is None:
            v = F.interpolate(video.float().transpose(0, 1), size=(height, width), mode="bilinear", antialias=True)
            v = v[: 1 + (v.shape[0] - 1) // vae.temporal_ratio * vae.temporal_ratio].transpose(0, 1)  # [3, F', H, W]
            with off.visit("vae"):
                latents = vae.encode(v[None])[0]
        if tuple(latents.shape) != lat_shape[1:]:
            raise KinemaError(f"the input latents have shape {list(latents.shape)}, but this size and frame count need {list(lat_shape[1:])}.")
        start = start_step_for_denoise(steps, denoise)
        noise = add_noise(latents[None].to(device).float(), noise, sigmas[start].item())
    log.info("Generating %s %dx%d, %d frames, %d steps (%s, shift %g, guidance %g, seed %d)",
             spec.name, width, height, frame_num, steps - start, solver, shift, guide_scale, seed)
    step_cache = make_cache(cache, dit, width * height)
    if step_cache is not None:
        step_cache.begin(steps, start)
    with attention_backend(attention) as backend, off.visit("dit"):
        x0 = sample(guided_model(dit, cond, uncond, guide_scale, batched_cfg, step_cache), noise, sigmas, timesteps, solver, start, progress)
    if step_cache is not None:
        log.info("%s", step_cache.summary())
    out = None
    if decode:
        with off.visit("vae"):  # after the DiT has left the GPU, as in the official code
            out = vae.decode(x0.to(vae.device))[0]
    settings = dict(task=spec.name, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                    frame_num=frame_num, steps=steps, shift=shift, guide_scale=guide_scale, seed=seed, solver=solver,
                    denoise=denoise if start else 1.0)
    if step_cache is not None:
        settings["cache"] = str(step_cache)
    if backend != "sdpa":
        settings["attention"] = backend
    return {"video": out, "latents": x0[0], "settings": settings, "cache": step_cache}
