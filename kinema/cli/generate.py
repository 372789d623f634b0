"""`kinema generate`: the official generate.py flags, as a thin user of kinema.Pipeline.

Every flag is checked before any weight is read: the loading options (LoadOptions.check), the
output and writer options (kinema.media.check_save), the call itself against the checkpoints'
headers (prepare_job) and its memory (the memory plan). Then the models load, the job runs and
the result is saved. Messages name the flags as typed (FLAGS).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

from kinema.errors import KinemaError

log = logging.getLogger("kinema")

# How the pipeline's argument names read on the command line, for messages.
FLAGS = {
    "ckpt": "--ckpt_dir", "dit": "--dit", "vae": "--vae", "t5": "--t5", "tokenizer": "--tokenizer", "clip": "--clip",
    "loras": "--lora", "lora_ignore_unmatched": "--lora_ignore_unmatched", "lora_runtime": "--lora_runtime", "dtype": "--dtype", "quantization": "--quantization", "t5_quantization": "--t5_quantization",
    "offload": "--offload_model", "t5_cpu": "--t5_cpu", "blocks_to_swap": "--blocks_to_swap",
    "prefetch_blocks": "--prefetch_blocks", "stream_dit": "--stream_dit", "attention": "--attention",
    "compile": "--compile", "fp8_fast": "--fp8_fast", "prompt": "--prompt", "negative_prompt": "--negative_prompt",
    "size": "--size", "frame_num": "--frame_num", "steps": "--sample_steps", "shift": "--sample_shift",
    "guide_scale": "--sample_guide_scale", "seed": "--base_seed", "solver": "--sample_solver", "denoise": "--denoise",
    "image": "--image", "first_frame": "--first_frame", "last_frame": "--last_frame", "video": "--video",
    "cache": "--cache", "vae_tile": "--vae_tile", "skip_layers": "--slg", "cfg_zero_star": "--cfg_zero_star",
    "enhance": "--feta", "riflex": "--riflex", "context_windows": "--context_frames", "extend_frames": "--extend_frames",
    "overlap_frames": "--overlap_frames", "loop": "--loop", "colour_match": "--colour_match",
    "overlap_join": "--overlap_join", "context_reference": "--context_reference",
    "refine": "--refine_size", "refine_size": "--refine_size",
    "refine_denoise": "--refine_denoise", "refine_steps": "--refine_steps", "refine_method": "--refine_method",
    "upscale": "--upscale", "upscaler": "--upscaler", "upscale_tile": "--upscale_tile",
    "batched_cfg": "--batched_cfg", "ulysses_size": "--ulysses_size", "ring_size": "--ring_size",
    "cfg_parallel": "--cfg_parallel", "t5_fsdp": "--t5_fsdp", "dit_fsdp": "--dit_fsdp", "vae_parallel": "--vae_parallel",
}


def load_options(args):
    """The loading flags as checked LoadOptions and their Runtime."""
    from kinema.parallel.mesh import ParallelOptions, launched_world_size
    from kinema.pipeline.load import LoadOptions

    parallel = ParallelOptions(args.ulysses_size, args.ring_size, args.cfg_parallel, args.t5_fsdp, args.dit_fsdp,
                               args.vae_parallel)
    if launched_world_size() > 1 and not parallel.active:
        raise KinemaError(f"{launched_world_size()} processes were started (torchrun), but no flag shares the work: "
                          "add --ulysses_size / --ring_size / --cfg_parallel (their product = the processes), and / or "
                          "--dit_fsdp --t5_fsdp; or run one process.")
    return LoadOptions(
        ckpt=args.ckpt_dir, dit=args.dit, vae=args.vae, t5=args.t5, tokenizer=args.tokenizer, clip=args.clip,
        loras=tuple(args.lora or ()), dtype=args.dtype, quantization=args.quantization,
        t5_quantization=args.t5_quantization, offload=args.offload_model, t5_cpu=args.t5_cpu,
        blocks_to_swap=args.blocks_to_swap, prefetch_blocks=args.prefetch_blocks, stream_dit=args.stream_dit,
        attention=args.attention, compile=args.compile, fp8_fast=args.fp8_fast,
        lora_ignore_unmatched=args.lora_ignore_unmatched, lora_runtime=args.lora_runtime, parallel=parallel,
        names=FLAGS,
    ).check()


def call_arguments(args) -> dict:
    """The flags of the call itself, as Pipeline.__call__'s keyword arguments."""
    return dict(task=args.task, size=args.size, frame_num=args.frame_num, steps=args.sample_steps,
                shift=args.sample_shift, guide_scale=args.sample_guide_scale, seed=args.base_seed,
                solver=args.sample_solver, negative_prompt=args.negative_prompt, image=args.image,
                first_frame=args.first_frame, last_frame=args.last_frame, video=args.video,
                denoise=args.denoise, cache=args.cache, vae_tile=args.vae_tile, batched_cfg=args.batched_cfg,
                extend_frames=args.extend_frames, overlap_frames=args.overlap_frames, loop=args.loop,
                colour_match=args.colour_match, overlap_join=args.overlap_join,
                context_reference=args.context_reference, refine=refine_argument(args), upscale=args.upscale,
                upscaler=args.upscaler, upscale_tile=args.upscale_tile, **extras_arguments(args))


def refine_argument(args) -> dict | None:
    """--refine_* as Pipeline.__call__'s refine; a tuning flag without --refine_size is an error."""
    tune = {k: v for k, v in (("denoise", args.refine_denoise), ("steps", args.refine_steps),
                              ("method", args.refine_method)) if v is not None}
    if args.refine_size is None:
        if tune:
            raise KinemaError(f"{', '.join('--refine_' + k for k in tune)} tunes the refine pass, which is off; add "
                              "--refine_size.")
        return None
    return {"size": args.refine_size, **tune}


def or_default(cast, what: str, off: bool = False):
    """An argparse type for a flag that takes a value or `default` (the model's own), and with `off` the word `off`:
    `default` / `off`, else cast(text). `what` names the type in argparse's error ("invalid WHAT value: ...")."""
    def parse(text: str):
        from kinema.pipeline.extras import is_default, is_off  # here: the parser is built before torch is imported

        if off and is_off(text):
            return "off"
        return "default" if is_default(text) else cast(text)

    parse.__name__ = what
    return parse


weight_or_default = or_default(float, "weight (a number or 'default')")  # --feta
frames_or_default = or_default(int, "frame count (4n+1, 'default' or 'off')", off=True)  # --context_frames


def extras_flags(g) -> None:
    x = g.add_argument_group("guidance extras (README, \"Guidance extras\")")
    x.add_argument("--slg", default=None, metavar="BLOCKS",
                   help="skip-layer guidance: skip these DiT blocks (e.g. 9,10) in the uncond pass (or, --slg_mode sd3, "
                        "in an extra cond pass); `default`: the model's own blocks (Wan2.1: 10, the wrapper's)")
    x.add_argument("--slg_start", type=float, default=None,
                   help="first step of --slg, a fraction of the steps (default: the model's, else 0.1)")
    x.add_argument("--slg_end", type=float, default=None,
                   help="last step of --slg, a fraction of the steps (default: the model's, else 1.0)")
    x.add_argument("--slg_mode", default=None, choices=["uncond", "sd3"],
                   help="uncond: the wrapper's form (default); sd3: v += scale * (cond - cond_skipped)")
    x.add_argument("--slg_scale", type=float, default=None, help="the sd3 form's scale (default 3.0)")
    x.add_argument("--cfg_zero_star", action="store_true",
                   help="CFG-Zero*: an optimised scale on the uncond prediction, and zero-init of the first steps")
    x.add_argument("--zero_init_steps", type=int, default=None,
                   help="with --cfg_zero_star: steps given a zero velocity at the start (default 1; 0 turns it off)")
    x.add_argument("--feta", type=weight_or_default, default=None, metavar="WEIGHT",
                   help="Enhance-A-Video: scale self-attention by the cross-frame intensity times (frames + WEIGHT); "
                        "`default`: the model's weight (Wan2.1: the wrapper's 2.0)")
    x.add_argument("--feta_start", type=float, default=None,
                   help="first step of --feta, a fraction (default: the model's, else 0.0)")
    x.add_argument("--feta_end", type=float, default=None,
                   help="last step of --feta, a fraction (default: the model's, else 1.0)")
    w = g.add_argument_group("context windows (README, \"Long video\")")
    w.add_argument("--context_frames", type=frames_or_default, default=None, metavar="N",
                   help="denoise in overlapping windows of N pixel frames (4n+1; e.g. 81, 17 for the built-in model), "
                        "for videos longer than the model takes; `default`: the model's own windows (Wan2.1: the "
                        "wrapper's 81 frames, overlap 16; the built-in model: 17, overlap 16); `off`: one pass. Not "
                        "given: a model that declares its windows (the built-in one) uses them for clips longer than "
                        "a window, a checkpoint that declares none (Wan2.1) runs in one pass")
    w.add_argument("--context_stride", type=int, default=None, help="with --context_frames: the wrapper's stride (default 4)")
    w.add_argument("--context_overlap", type=int, default=None,
                   help="with --context_frames: overlap in pixel frames (default: the model's, else 16)")
    w.add_argument("--context_schedule", default=None, choices=["uniform_standard", "uniform_looped", "static_standard"],
                   help="with --context_frames: how windows are placed each step (default uniform_standard)")
    w.add_argument("--context_fuse", default=None, choices=["linear", "pyramid", "flat"],
                   help="with --context_frames: how overlapping windows blend (default linear)")
    w.add_argument("--context_rope", default=None, choices=["relative", "absolute"],
                   help="with --context_frames: RoPE positions from each window's start (default, the wrapper's) or "
                        "where the window sits in the video")
    w.add_argument("--freenoise", dest="freenoise", action="store_const", const=True, default=None,
                   help="with --context_frames: FreeNoise initial noise (the default, as the wrapper's)")
    w.add_argument("--no_freenoise", dest="freenoise", action="store_const", const=False,
                   help="with --context_frames: every window's own initial noise")
    w.add_argument("--context_reference", nargs="+", default=None, metavar="IMAGE",
                   help="i2v / flf2v / extend with windows: the image whose latent is the first frame of every window "
                        "not starting at the video's (default: the video's first frame); several: one per section of "
                        "the video, as the wrapper's context reference_latent")
    x.add_argument("--riflex", default="off", metavar="auto|K|off",
                   help="RIFLEx for videos longer than the model was trained on: lower the K-th temporal RoPE "
                        "frequency (auto: the paper's rule, only when longer than trained)")


def extras_arguments(args) -> dict:
    """The guidance-extras flags as Pipeline.__call__'s skip_layers / cfg_zero_star / enhance / riflex; a flag
    that tunes an extra not asked for is an error (it would do nothing)."""
    def given(**flags):
        return {k: v for k, v in flags.items() if v is not None}

    slg = given(start=args.slg_start, end=args.slg_end, mode=args.slg_mode, scale=args.slg_scale)
    feta = given(start=args.feta_start, end=args.feta_end)
    for flags, owner, on in ((slg, "--slg", args.slg), (feta, "--feta", args.feta),
                             (given(zero_init_steps=args.zero_init_steps), "--cfg_zero_star", args.cfg_zero_star or None)):
        if flags and on is None:
            prefix = {"--slg": "--slg_", "--feta": "--feta_", "--cfg_zero_star": "--"}[owner]
            raise KinemaError(f"{', '.join(prefix + k for k in flags)} tunes {owner}, which is not given; add {owner}.")
    zero = given(zero_init_steps=args.zero_init_steps)
    windows = given(stride=args.context_stride, overlap=args.context_overlap, schedule=args.context_schedule,
                    fuse=args.context_fuse, rope=args.context_rope) | ({} if args.freenoise is None else {"freenoise": args.freenoise})
    if windows and args.context_frames in (None, "off"):
        raise KinemaError(f"{', '.join('--' + (('' if args.freenoise else 'no_') + k if k == 'freenoise' else 'context_' + k) for k in windows)} "
                          "tunes context windows; add --context_frames N, or --context_frames default for the model's "
                          "own" + (" (not with --context_frames off)." if args.context_frames == "off" else "."))
    frames = args.context_frames
    return dict(context_windows=frames if frames in (None, "off") else dict(frames=frames, **windows),
                skip_layers=dict(blocks=args.slg, **slg) if args.slg is not None else None,
                cfg_zero_star=zero if args.cfg_zero_star else None,
                enhance=dict(weight=args.feta, **feta) if args.feta is not None else None,
                riflex=args.riflex)


def output(args, task: str) -> tuple[str, Path, str]:
    """(format, file or folder, filename prefix) of the output: --save_file as given; else --filename_prefix
    counters in --output_dir; else the official default name there (a PNG sequence: that name as the
    prefix of its numbered folder)."""
    from kinema.media import FORMATS
    from kinema.pipeline.result import output_format

    if args.save_file:
        return output_format(args.save_file, args.format, 1 if task == "t2i" else 0), Path(args.save_file), "kinema"
    fmt = args.format or ("png" if task == "t2i" else "h264-mp4")
    if args.filename_prefix:
        return fmt, Path(args.output_dir), args.filename_prefix
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    prompt = (args.prompt or "").replace(" ", "_").replace("/", "_")[:50]
    stem = f"{args.task}_{args.size or 'default'}_1_1_{prompt}_{stamp}"  # the official default name
    ext = FORMATS[fmt].ext
    return (fmt, Path(args.output_dir) / f"{stem}.{ext}", "kinema") if ext else (fmt, Path(args.output_dir), stem)


def writer_options(args, prefix: str) -> dict:
    return dict(loop_count=args.loop_count, pingpong=args.pingpong, crf=args.crf, pix_fmt=args.pix_fmt,
                lossless=args.lossless, filename_prefix=prefix)


def check_output(args, fmt: str, target: Path, prefix: str) -> None:
    """Every writer option and the output place, before anything loads (a bad --fps must not wait for sampling)."""
    from kinema.media import check_save
    from kinema.media.metadata import sidecar_path

    if args.save_file and target.suffix and not target.is_dir():  # the writer's own message names the Python fix
        for p in (target, sidecar_path(target)):
            if p.exists():
                raise KinemaError(f"{p} already exists and Kinema never overwrites a file: give --save_file another "
                                  "name (or move that file away), or leave --save_file out for a new name in "
                                  "--output_dir.")
    options = {k: v for k, v in writer_options(args, prefix).items() if k != "pingpong"}
    check_save(target, format=fmt, frame_rate=16 if args.fps is None else args.fps, **options)


def cmd_generate(args) -> None:
    from kinema.pipeline.job import prepare_job
    from kinema.pipeline.load import open_checkpoints
    from kinema.pipeline.pipeline import Pipeline, check_parallel_call
    from kinema.pipeline.tasks import get_task

    task = get_task(args.task)
    if not args.prompt and not args.plan:
        raise KinemaError("--prompt is missing; say what to generate.")
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 logs and writes the file; the others say what is wrong
        logging.getLogger("kinema").setLevel(logging.WARNING)
    opts, runtime = load_options(args)
    mesh = runtime.parallel
    fmt, target, prefix = output(args, task.name)
    if not args.plan:
        check_output(args, fmt, target, prefix)
    log.info("Generation job args: %s", {k: v for k, v in vars(args).items() if k not in ("debug", "command", "run")})
    ckpts = open_checkpoints(opts)
    from kinema.cli.plan import memory_plan, read_target

    meta, target_models = read_target(ckpts)
    job = prepare_job(target_models, args.prompt or "", names=FLAGS, progress=True, **call_arguments(args))
    check_parallel_call(mesh, job, FLAGS)
    if memory_plan(args, job, opts, runtime, ckpts, meta):
        return  # --plan: printed, nothing to generate
    pipe = Pipeline.from_options(opts, runtime, ckpts)
    log.info("Generating %s ...", "image" if task.name == "t2i" else "video")
    result = pipe.run(job)
    if mesh is None or mesh.leader:
        log.info("Saving generated %s to %s", "image" if task.name == "t2i" else "video",
                 target if target.suffix else f"{target}/{prefix}_NNNNN")
        path = result.save(target, format=fmt, fps=args.fps, **writer_options(args, prefix))
        log.info("Saved %s", path)
    if mesh is not None:
        from kinema.parallel.mesh import finish

        finish(mesh)
    log.info("Finished.")
