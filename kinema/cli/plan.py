"""`kinema generate --plan`, and the memory check before every run: the resolved job and the loading options
as a kinema.memory.plan `Run`, checked against the memory free now before any model loads."""

from __future__ import annotations

import logging

from kinema.errors import KinemaError
from kinema.memory.plan import MetaModels, Run, available_memory, check_fits, estimate, read_models
from kinema.pipeline.job import Job
from kinema.pipeline.load import Checkpoints, LoadOptions, swap_prefetch
from kinema.pipeline.models import Runtime, Target
from kinema.pipeline.settings import Geometry

log = logging.getLogger("kinema")


def read_target(ckpts: Checkpoints) -> tuple[MetaModels, Target]:
    """The checkpoints' architectures from their headers (the DiT already open), and the Target a call is checked
    against, before any weight is read."""
    meta = read_models(ckpts.dit_checkpoint, ckpts.t5, ckpts.vae, ckpts.clip)
    vae, cfg = meta.vae, meta.dit.config
    geometry = Geometry(vae.spatial_ratio, vae.temporal_ratio, tuple(cfg.patch_size), vae.z_dim)
    return meta, Target(ckpts.dit_checkpoint.info, cfg.model_type, geometry, ckpts.clip is not None, cfg)


def plan_run(job: Job, opts: LoadOptions, runtime: Runtime, prefetch: int) -> Run:
    """The job about to run, in the memory plan's terms."""
    settings = job.settings if job.refine is None else job.refine.settings(job.settings)  # the refine pass is larger
    mesh = runtime.parallel
    split = {} if mesh is None else dict(
        sequence_ranks=mesh.sequence.size, dit_shards=mesh.shard_group.size if mesh.options.dit_fsdp else 1,
        t5_shards=mesh.world_size if mesh.options.t5_fsdp else 1)
    return Run(
        task=settings.task.name, width=settings.width, height=settings.height, frame_num=settings.frame_num,
        device=runtime.device.type, dtype=runtime.dtype, quantization=opts.quantization,
        t5_quantization=opts.t5_quantization, fp8_fast=opts.fp8_fast, guided=settings.guided,
        batched_cfg=job.guidance.name == "batched",
        t5_cpu=runtime.t5_cpu, offload=runtime.offload, blocks_to_swap=opts.blocks_to_swap,
        prefetch_blocks=opts.prefetch_blocks or prefetch or 1, stream=opts.stream_dit, vae_tile=job.vae_tile,
        cache=job.cache is not None, window_frames=None if job.windows is None else job.windows.frames, **split,
    )


def memory_plan(args, job: Job, opts: LoadOptions, runtime: Runtime, ckpts: Checkpoints, meta: MetaModels) -> bool:
    """With --plan: print the plan and return True (nothing to generate). Otherwise refuse, with a KinemaError that
    names flags that would fit, a run whose estimate exceeds the free memory (unless --no_memory_check); False."""
    prefetch = swap_prefetch(opts, ckpts)  # checks --blocks_to_swap against the DiT's depth
    if not args.plan and args.no_memory_check:
        return False
    try:
        run = plan_run(job, opts, runtime, prefetch)
        available = available_memory(run.device)
        if args.plan:
            print(estimate(meta, run, available).table())
            return True
        plan = check_fits(meta, run, available)
    except KinemaError:
        raise
    except Exception as exc:  # a bug in the estimate must not stop a run that --plan was not asked for
        if args.plan:
            raise
        log.warning("No memory plan (%s: %s); running without the memory check", type(exc).__name__, exc)
        return False
    log.info("Memory plan: peak about %s (free: %s); --plan shows the breakdown",
             ", ".join(f"{plan.peak(d)[0] / 2**30:.1f} GiB on {d}" for d in plan.devices),
             ", ".join(f"{available[d] / 2**30:.1f} GiB on {d}" for d in plan.devices if d in available))
    return False
