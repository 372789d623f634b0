"""Stages: sample (the guided DiT through the one sampler loop, with the run's block hooks) and decode."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from kinema.errors import KinemaError
from kinema.pipeline.conditioning import Condition
from kinema.pipeline.extend import replace_known
from kinema.pipeline.extras import Extras, train_latent_frames
from kinema.pipeline.guidance import Guidance, Sequential, guided_model
from kinema.pipeline.latents import Start
from kinema.pipeline.prompts import Prompts
from kinema.pipeline.settings import Settings
from kinema.sampling import sample
from kinema.sampling.windows import ContextWindows, windowed

log = logging.getLogger("kinema")


@torch.no_grad()
def sample_latents(dit, prompts: Prompts | list[Prompts], condition: Condition, start: Start, settings: Settings, *,
                   guidance: Guidance = Sequential(), extras: Extras = Extras(), windows: ContextWindows | None = None,
                   known_latents: torch.Tensor | None = None, train_frames: int | None = None, hooks=(), cache=None, callback=None, cancel=None, preview=None,
                   progress: bool = True, attention: str = "sdpa") -> torch.Tensor:
    """Denoise `start.x` [1, z, T, h, w] from step `start.start_step` to sigma 0; returns x0 [1, z, T, h, w].

    prompts: the text context, or one per prompt-travel section (with `windows`: each window takes its
    section's). extras: the guidance extras (kinema.pipeline.extras); windows: context windows
    (kinema.sampling.windows) or None; known_latents: [1, z, k, h, w], the clean latents of the video's first k
    latent frames (task extend), which the model sees at each step's noise level (kinema.pipeline.extend); train_frames: the model's training length in latent frames, for RIFLEx's
    auto (default: Wan2.1's). hooks: more BlockHooks around the DiT's blocks (kinema/models/hooks.py); `cache`,
    a StepCache, is one more, reset for this run. callback / cancel / preview: as kinema.sampling.sample.
    attention: the DiT's backend."""
    sections = prompts if isinstance(prompts, (list, tuple)) else [prompts]
    if len(sections) > 1 and windows is None:
        raise KinemaError(f"{len(sections)} prompts ('|' prompt travel) need context windows to spread over.")
    hooks = (*hooks, *extras.hooks(dit, train_frames or train_latent_frames({})))
    if cache is not None:
        cache.begin(settings.steps, start.start_step)
        hooks = (*hooks, cache)
    if extras.describe():
        log.info("Guidance extras: %s", extras.describe())
    fns = []
    for p in sections:
        cond = {"context": p.cond, **condition.args()}
        uncond = {"context": p.uncond, **condition.args()} if p.uncond is not None else None
        fns.append(guided_model(dit, cond, uncond, settings.guide_scale, guidance, hooks, attention,
                                extras.cfg_zero_star, extras.skip_layers, condition.anchors))
    model_fn = fns[0]
    if windows is not None:
        log.info("Context windows: %s over %d latent frames%s", windows.describe(), start.x.shape[2],
                 "" if start.x.shape[2] > windows.latent_frames else " (one window holds them all: one pass)")
        model_fn = windowed(fns, windows, start.x.shape[2], cancel)
    if known_latents is not None:
        model_fn = replace_known(model_fn, known_latents, start.x)
    x0 = sample(model_fn, start.x, start.sigmas, start.timesteps, settings.solver, start.start_step, progress,
                callback, cancel, preview, settings.seed)
    if known_latents is not None:  # the known frames exactly as given
        x0[:, :, : known_latents.shape[2]] = known_latents.to(x0)
    if cache is not None:
        log.info("%s", cache.summary())
    return x0


@torch.no_grad()
def decode_latents(vae, x0: torch.Tensor, visit=lambda name: nullcontext()) -> torch.Tensor:
    """x0 [1, z, T, h, w] -> video [3, F, H, W] in [-1, 1]; the VAE runs in a `visit("vae")`."""
    with visit("vae"):  # after the DiT has left the GPU, as in the official code
        return vae.decode(x0.to(vae.device))[0]
