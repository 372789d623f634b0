"""`kinema generate --plan`, and the memory check before every run: the command line's flags as a
kinema.memory.plan `Run`, checked against the memory free now before any model loads."""

from __future__ import annotations

import logging

import torch

from kinema.errors import KinemaError
from kinema.memory.plan import MetaModels, Run, available_memory, check_fits, estimate, read_models
from kinema.pipeline.conditioning import target_size
from kinema.pipeline.tasks import get_task
from kinema.sampling.cache import parse_cache

log = logging.getLogger("kinema")


def plan_run(args, size, images: dict, device: str, dtype: torch.dtype, offload: bool, prefetch: int,
             dit_fp8: str | None, t5_fp8: str | None) -> tuple[MetaModels, Run]:
    """The checkpoints' architectures and the run `cmd_generate` is about to make."""
    task = get_task(args.task)
    models = read_models(args.dit or args.ckpt_dir, args.t5 or args.ckpt_dir, args.vae or args.ckpt_dir,
                         (args.clip or args.ckpt_dir) if task.model_type != "t2v" else None)
    # Resolved as generate() resolves them (without its warnings, which it gives itself): the model's own
    # defaults, then the task's; sizes to multiples of 16, frame counts to 4n + 1, i2v at the image's aspect.
    defaults = models.sample_defaults
    width, height = size or (int(v) for v in defaults.get("size", task.size).split("*"))
    width, height = (max(16, 16 * round(v / 16)) for v in (width, height))
    frames = 1 if task.name == "t2i" else args.frame_num or defaults.get("frame_num", task.frame_num)
    frames = max(1, 4 * round((frames - 1) / 4) + 1)
    first = images.get("image", images.get("first_frame"))
    if first is not None and task.name in ("i2v", "flf2v"):
        height, width = target_size(first.shape[1], first.shape[2], width * height, models.vae.spatial_ratio,
                                    models.dit.config.patch_size[1])
    guide = args.sample_guide_scale if args.sample_guide_scale is not None else defaults.get("guide_scale", task.guide_scale)
    run = Run(
        task=task.name, width=width, height=height, frame_num=frames, device=device, dtype=dtype,
        quantization=dit_fp8, t5_quantization=t5_fp8, fp8_fast=args.fp8_fast, guided=guide != 1.0, batched_cfg=args.batched_cfg,
        t5_cpu=args.t5_cpu, offload=bool(offload), blocks_to_swap=getattr(args, "blocks_to_swap", 0) or 0,
        prefetch_blocks=getattr(args, "prefetch_blocks", None) or prefetch or 1, stream=bool(getattr(args, "stream_dit", False)),
        vae_tile=args.vae_tile, cache=parse_cache(args.cache, "--cache") is not None,
    )
    return models, run


def memory_plan(args, size, images: dict, device: str, dtype: torch.dtype, offload: bool, prefetch: int,
                dit_fp8: str | None, t5_fp8: str | None) -> bool:
    """With --plan: print the plan and return True (nothing to generate). Otherwise refuse, with a KinemaError that
    names flags that would fit, a run whose estimate exceeds the free memory (unless --no_memory_check); False."""
    if not args.plan and args.no_memory_check:
        return False
    try:
        models, run = plan_run(args, size, images, device, dtype, offload, prefetch, dit_fp8, t5_fp8)
        available = available_memory(device)
        if args.plan:
            print(estimate(models, run, available).table())
            return True
        plan = check_fits(models, run, available)
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
