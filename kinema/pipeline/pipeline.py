"""`kinema.Pipeline`: load a model set once, then generate with it, as often and from as many threads as needed.

    pipe = kinema.Pipeline.load()                       # the built-in model; or a checkpoint folder / parts
    result = pipe("a red circle moving right on a black background")
    result.save("outputs/")                              # outputs/kinema_00001.mp4, settings embedded

A call is `prepare` (every input checked and every setting resolved, before any model runs)
then `run`, which composes the stages: encode the prompts, build the condition, prepare the
latents, sample, decode. The stages are public functions (kinema.pipeline.prompts,
.conditioning, .latents, .sample) for callers that drive them one by one (workflow nodes).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import torch

import kinema
from kinema.errors import KinemaError
from kinema.memory.offload import Offloader
from kinema.memory.plan import dit_activations, human_bytes
from kinema.memory.vae_tiling import TiledVAE, free_memory
from kinema.parallel.cfg import CFGParallel
from kinema.parallel.mesh import ParallelOptions, broadcast_object, shared_stop
from kinema.parallel.sequence import sequence_hooks
from kinema.parallel.vae import ParallelVAE
from kinema.pipeline.conditioning import encode_references, make_condition
from kinema.pipeline.extend import extension_inputs, join
from kinema.pipeline.extras import train_latent_frames
from kinema.pipeline.job import Job, parse_windows, prepare_job
from kinema.pipeline.latents import fit_video, prepare_latents
from kinema.pipeline.load import LoadOptions, load_models, open_checkpoints
from kinema.pipeline.models import Models, Runtime
from kinema.pipeline.preview import LatentPreview
from kinema.pipeline.prompts import encode_prompts
from kinema.pipeline.refine import refine_input
from kinema.pipeline.result import Result
from kinema.pipeline.sample import decode_latents, sample_latents
from kinema.sampling.cache import CacheSpec, calibration_beside, make_cache
from kinema.upscale import load_upscaler, upscale_video

log = logging.getLogger("kinema")


class Pipeline:
    """A loaded model set and its runtime; calling it generates. Calls from several threads run one at a time."""

    def __init__(self, models: Models, runtime: Runtime | None = None):
        self.models = models
        self.runtime = runtime or _runtime_of(models)
        self.offloader = (Offloader(models, self.runtime.device, t5_cpu=self.runtime.t5_cpu) if self.runtime.offload
                          else Offloader(models, enabled=False))
        self.preview = LatentPreview(models.vae)
        self._lock = threading.RLock()
        self._upscalers = {}

    @classmethod
    def load(cls, ckpt=None, *, dit=None, vae=None, t5=None, tokenizer=None, clip=None, loras=(), dtype=None, device=None,
             quantization=None, t5_quantization=None, offload=None, t5_cpu=False, blocks_to_swap=0, prefetch_blocks=None,
             stream_dit=False, attention="auto", compile=False, fp8_fast=False,
             lora_ignore_unmatched=False, lora_runtime=False, ulysses_size=1, ring_size=1, cfg_parallel=False,
             t5_fsdp=False, dit_fsdp=False, vae_parallel=False) -> Pipeline:
        """Load a model set: `ckpt` (an official Wan2.1, diffusers or ComfyUI-style folder) or its parts (`dit`,
        `vae`, `t5`, `tokenizer`, `clip`: files or folders in any format the loaders read); neither: the built-in
        model. loras: [(path, strength), ...] merged into the DiT; a LoRA given per-step strengths (a list, the
        last repeated) runs unmerged, as does every LoRA with lora_runtime=True (kinema/lora/runtime.py). dtype:
        the DiT's weights, None = bf16 on CUDA, fp32 on the CPU. device: None = cuda if available, else cpu. lora_ignore_unmatched: LoRA keys that match
        no layer are left out with a warning naming them (by default an error). The memory options are `kinema generate`'s
        (README, "Memory and speed"); the parallel ones (ulysses_size ... vae_parallel) too, for a program started
        by torchrun on every rank (README, "Many GPUs and many machines"). Every option is checked before any file
        is read."""
        parallel = ParallelOptions(ulysses_size, ring_size, cfg_parallel, t5_fsdp, dit_fsdp, vae_parallel)
        opts, runtime = LoadOptions(ckpt, dit, vae, t5, tokenizer, clip, loras, dtype, device, quantization,
                                    t5_quantization, offload, t5_cpu, blocks_to_swap, prefetch_blocks, stream_dit,
                                    attention, compile, fp8_fast, bool(lora_ignore_unmatched),
                                    bool(lora_runtime), parallel=parallel).check()
        return cls.from_options(opts, runtime)

    @classmethod
    def from_options(cls, opts: LoadOptions, runtime: Runtime, checkpoints=None) -> Pipeline:
        """Load from checked options (`LoadOptions.check`), with checkpoints already opened when given."""
        return cls(load_models(opts, runtime, checkpoints or open_checkpoints(opts)), runtime)

    # -- a call ------------------------------------------------------------------------------------
    def __call__(self, prompt, *, task="t2v", size=None, frame_num=None, steps=None, shift=None, guide_scale=None,
                 seed=0, solver=None, negative_prompt=None, image=None, first_frame=None, last_frame=None,
                 video=None, denoise=1.0, latents=None, cache=None, vae_tile="auto", batched_cfg=False,
                 skip_layers=None, cfg_zero_star=None, enhance=None, riflex=None, context_windows=None,
                 context_reference=None, extend_frames=None, overlap_frames=9, loop=False, colour_match="overlap",
                 overlap_join="blend", refine=None, upscale=None, upscaler=None, upscale_tile=128, callback=None,
                 cancel=None, decode=True, progress=True) -> Result:
        """Generate one video (or image, task "t2i"). See the README's Python section for every argument;
        unset values take the model's own defaults, then the task's official ones."""
        with self._lock:
            job = self.prepare(prompt, task=task, size=size, frame_num=frame_num, steps=steps, shift=shift,
                               guide_scale=guide_scale, seed=seed, solver=solver, negative_prompt=negative_prompt,
                               image=image, first_frame=first_frame, last_frame=last_frame, video=video,
                               denoise=denoise, latents=latents, cache=cache, vae_tile=vae_tile, batched_cfg=batched_cfg,
                               skip_layers=skip_layers, cfg_zero_star=cfg_zero_star, enhance=enhance, riflex=riflex,
                               context_windows=context_windows, context_reference=context_reference,
                               extend_frames=extend_frames,
                               overlap_frames=overlap_frames, loop=loop, colour_match=colour_match,
                               overlap_join=overlap_join, refine=refine, upscale=upscale,
                               upscaler=upscaler, upscale_tile=upscale_tile,
                               callback=callback, cancel=cancel, decode=decode, progress=progress)
            return self.run(job)

    def prepare(self, prompt, **kw) -> Job:
        """Check every input and resolve every setting of a call (`__call__`'s arguments), running no model;
        a call whose DiT activations cannot fit in the memory free now is refused here too."""
        job = prepare_job(self.models.target, prompt, **kw)
        check_parallel_call(self.runtime.parallel, job)
        self.check_memory(job)
        return job

    def check_memory(self, job: Job) -> None:
        """Refuse a call whose DiT activations alone exceed the memory free on the device (the command line's
        memory plan counts everything; kinema/memory/plan.py)."""
        s, g, dit = job.settings, self.models.geometry, self.models.dit
        if job.refine is not None and job.refine.width * job.refine.height > s.width * s.height:
            s = job.refine.settings(s)  # the larger pass decides
        _, t, h, w = s.latent_shape(g)
        if job.windows is not None:  # one window at a time
            t = min(t, job.windows.latent_frames)
        tokens = t * (h // g.patch[1]) * (w // g.patch[2])
        if (mesh := self.runtime.parallel) is not None:  # each rank holds its chunk of the tokens
            tokens = -(-tokens // mesh.sequence.size)
        slg = job.extras.skip_layers
        branches = 1 + s.guided + (slg is not None and slg.mode == "sd3")
        batch = branches if job.guidance.name == "batched" else 1
        need = dit_activations(dit, tokens, batch, self.runtime.dtype)
        free = free_memory(self.runtime.device)
        if need > free:
            raise KinemaError(f"a {s.width}x{s.height}, {s.frame_num}-frame call needs about {human_bytes(need)} for the "
                              f"DiT's activations alone ({tokens:,} tokens), more than the {human_bytes(free)} free on "
                              f"{self.runtime.device}; ask for a smaller size or fewer frames.")

    def run(self, job: Job) -> Result:
        """Execute a prepared call: the stages in order, each model visiting the device for its own stage.
        Runs hold the pipeline's lock: from several threads they run one after the other."""
        with self._lock:
            return self._run(job)

    def _run(self, job: Job) -> Result:
        m, off, mesh = self.models, self.offloader, self.runtime.parallel
        if mesh is not None:  # every rank runs rank 0's call: its seed (drawn at random?) and prompt
            settings, prompts = broadcast_object((job.settings, job.prompts), mesh)
            job = replace(job, settings=settings, prompts=prompts, progress=job.progress and mesh.leader,
                          guidance=CFGParallel(mesh) if mesh.options.cfg_parallel else job.guidance,
                          callback=shared_stop(job.callback, job.cancel, mesh), cancel=None)
        s = job.settings
        cache = make_cache(_beside(job.cache, m.source), m.dit, s.width * s.height)  # calibration read before any model runs
        vae = m.vae if isinstance(m.vae, TiledVAE) else TiledVAE(m.vae, job.vae_tile)
        if mesh is not None and mesh.options.vae_parallel:
            vae = ParallelVAE(vae, mesh)  # the decode split by tiles over the ranks (encodes run whole)
        device = off.device
        with off.visit("t5"):  # the official order: umT5, CLIP, VAE encode, DiT, VAE decode
            prompts = [encode_prompts(m.text_encoder, p, s.negative_prompt if s.guided else None, m.dit.config.text_len,
                                      device) for p in job.prompts or (s.prompt,)]
        ext = job.extension
        if ext is not None:  # task extend: the known frames of the new clip, and the latents of its overlap
            video = fit_video(job.video, s, m.geometry.temporal, keep_frames=True)
            condition, known = extension_inputs(ext, video, vae, m.clip, m.dit.config, device, off.visit)
        else:
            condition = make_condition(s.task, job.images, s.frame_num, s.height, s.width, vae, m.clip, m.dit.config,
                                       device, off.visit, m.blank_conditions)
        condition = self._with_references(job, condition, vae, s)
        start = prepare_latents(s, m.geometry, device, vae, None if ext else job.video, job.latents, off.visit,
                                job.windows)
        x0 = self._sample(job, s, prompts, condition, start, cache, known if ext else None)
        partway = start.partway
        out = decode_latents(vae, x0, off.visit) if job.decode or (job.refine and job.refine.method != "latent") else None
        if job.refine is not None:  # the second pass, at the larger size
            s = job.refine.settings(s)
            cache = make_cache(_beside(job.cache, m.source), m.dit, s.width * s.height)
            source, latents = refine_input(job.refine, x0, out, m.geometry.spatial)
            condition = make_condition(s.task, job.images, s.frame_num, s.height, s.width, vae, m.clip, m.dit.config,
                                       device, off.visit, m.blank_conditions)
            condition = self._with_references(job, condition, vae, s)
            start = prepare_latents(s, m.geometry, device, vae, source, latents, off.visit, job.windows)
            x0 = self._sample(job, s, prompts, condition, start, cache, None, "Refining")
            out = decode_latents(vae, x0, off.visit) if job.decode else None
        if ext is not None and out is not None:  # joined at the video's own size, its frames as they came
            out = join(ext, job.video, out)
        if job.upscale is not None and out is not None:
            out = upscale_video(self.upscaler(job.upscale), out, job.upscale.tile, progress=job.progress)
        return Result(out, x0[0], self.record(job, partway, cache), cache)

    def _with_references(self, job: Job, condition, vae, s):
        """The condition with the context windows' reference latents (job.references encoded at this pass's size)."""
        if not job.references:
            return condition
        with self.offloader.visit("vae"):
            anchors = encode_references(vae, job.references, s.height, s.width)
        return replace(condition, anchors=anchors.to(self.offloader.device))

    def _sample(self, job: Job, s, prompts, condition, start, cache, known=None, what="Generating"):
        """One sampling pass of the DiT (kinema.pipeline.sample.sample_latents) with the job's options."""
        m, off = self.models, self.offloader
        log.info("%s %s %dx%d, %d frames, %d steps (%s, shift %g, guidance %g, seed %d)", what, s.task.name, s.width,
                 s.height, s.frame_num, s.steps - start.start_step, s.solver, s.shift, s.guide_scale, s.seed)
        with off.visit("dit"):
            return sample_latents(m.dit, prompts, condition, start, s, guidance=job.guidance, extras=job.extras,
                                  windows=job.windows, known_latents=known,
                                  hooks=(*m.lora_hooks, *sequence_hooks(self.runtime.parallel)),
                                  train_frames=train_latent_frames(m.info.sample_defaults, m.geometry.temporal),
                                  cache=cache, callback=job.callback, cancel=job.cancel, preview=self.preview,
                                  progress=job.progress, attention=self.runtime.attention)

    def upscaler(self, spec):
        """The upscaler a job asks for, loaded once per pipeline (kinema.upscale.load_upscaler)."""
        key = (spec.upscaler, spec.factor)
        if key not in self._upscalers:
            self._upscalers[key] = load_upscaler(spec.upscaler, spec.factor, self.runtime.device)
        return self._upscalers[key]

    def record(self, job: Job, partway: bool, cache=None) -> dict:
        """Every value the run used: the settings embedded in saved files, which `kinema generate --from` repeats."""
        m, rt = self.models, self.runtime
        rec = job.settings.record(partway)
        rec["fps"] = int(m.info.sample_defaults.get("fps", 16))
        for key, value in (("cache", cache and str(cache)), ("batched_cfg", job.guidance.name == "batched" or None),
                           ("attention", rt.attention if rt.attention != "sdpa" else None),
                           ("vae_tile", job.vae_tile if job.vae_tile != "auto" else None),
                           ("quantization", m.quantization), ("t5_quantization", m.t5_quantization)):
            if value:
                rec[key] = value if not isinstance(value, tuple) else f"{value[0]}x{value[1]}"
        rec.update(job.extras.record())
        if job.extension is not None:  # the clip's length (and unless asked for, its size) follow from the video
            for key in ("frame_num",) if job.extension.sized else ("size", "width", "height", "frame_num"):
                rec.pop(key, None)
            rec.update(job.extension.record())
        for stage in (job.refine, job.upscale):
            if stage is not None:
                rec.update({k: v for k, v in stage.record().items() if v is not None})
        if (w := job.windows) is not None:
            rec.update(context_frames=w.frames, context_stride=w.stride, context_overlap=w.overlap,
                       context_schedule=w.schedule, context_fuse=w.fuse, freenoise=w.freenoise, context_rope=w.rope)
            if job.references:  # the images themselves are inputs, like --image: not recorded, only how many
                rec["context_reference"] = len(job.references)
        elif parse_windows(None, defaults=m.info.sample_defaults.get("context", {}), frames=job.settings.frame_num):
            rec["context_frames"] = "off"  # one pass where the model's own windows would apply: asked for, so kept
        if m.loras:
            rec["loras"] = [[p, s] for p, s in m.loras]
        rec["model"] = m.source or "in-memory"
        rec["kinema_version"] = kinema.__version__
        return rec


def check_parallel_call(mesh, job: Job, names: dict | None = None) -> None:
    """A call the run's split cannot do (kinema.parallel.mesh.ParallelOptions.check_call), before any model runs."""
    if mesh is not None:
        mesh.options.check_call(job.settings.guided, job.guidance.name == "batched", job.extras.enhance is not None,
                                job.vae_tile, names)


def _beside(cache, source: str | None):
    """A cache setting with no calibration named takes the one written beside the checkpoint, if any
    (bench/calibrate_cache.py), before the shipped table."""
    if isinstance(cache, CacheSpec) and cache.calibration is None:
        found = calibration_beside(source)
        return replace(cache, calibration=str(found)) if found else cache
    return cache


def _runtime_of(models: Models) -> Runtime:
    """The runtime of models built in memory (a trainer's, a test's): where and in what the DiT's weights are."""
    w = models.dit.patch_embedding.weight  # never an fp32 island, never fp8
    te = getattr(models.text_encoder, "model", None)
    enc = next(te.parameters()).dtype if isinstance(te, torch.nn.Module) else torch.float32
    return Runtime(w.device, w.dtype, enc)
