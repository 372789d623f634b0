"""The `kinema` command line: `kinema generate` (the official generate.py flags) and `kinema info`.

User errors end in one line on stderr and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from datetime import datetime
from pathlib import Path

from kinema.errors import KinemaError
from kinema.pipeline.tasks import OFFICIAL_TASKS, TASKS

log = logging.getLogger("kinema")

FORMAT_BY_SUFFIX = {".mp4": "h264-mp4", ".webm": "webm", ".mov": "prores-mov", ".gif": "gif", ".webp": "webp", ".png": "png"}
# Settings stored in a file's metadata that `--from` turns back into flags.
FROM_KEYS = {
    "task": "task", "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "base_seed", "steps": "sample_steps",
    "shift": "sample_shift", "guide_scale": "sample_guide_scale", "solver": "sample_solver", "frame_num": "frame_num",
    "size": "size", "fps": "fps", "format": "format", "denoise": "denoise", "cache": "cache",
    "quantization": "quantization", "t5_quantization": "t5_quantization", "attention": "attention", "vae_tile": "vae_tile",
}


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    from kinema.media import FORMATS
    from kinema.sampling import SOLVERS

    p = argparse.ArgumentParser(prog="kinema", description="Wan2.1 video generation.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video or image", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument("--task", default="t2v-14B", choices=[*OFFICIAL_TASKS, *TASKS], help="what to generate")
    g.add_argument("--size", default=None, help="W*H of the output (for i2v/flf2v: the area; the image sets the aspect); "
                   "default: the model's own, else 1280*720")
    g.add_argument("--frame_num", type=int, default=None, help="frames, 4n+1 (default 81; 1 for t2i)")
    g.add_argument("--ckpt_dir", default=None, help="checkpoint folder (official, diffusers or a folder of single files); "
                   "default: the built-in model")
    g.add_argument("--dit", default=None, help="DiT checkpoint (file or folder), overrides --ckpt_dir")
    g.add_argument("--vae", default=None, help="VAE checkpoint, overrides --ckpt_dir")
    g.add_argument("--t5", default=None, help="umT5 checkpoint, overrides --ckpt_dir")
    g.add_argument("--tokenizer", default=None, help="umT5 tokenizer folder or file (default: found next to the umT5 weights)")
    g.add_argument("--clip", default=None, help="CLIP vision checkpoint for i2v/flf2v, overrides --ckpt_dir")
    g.add_argument("--lora", action="append", default=None, metavar="FILE[:STRENGTH]",
                   help="merge a LoRA .safetensors into the DiT at STRENGTH (1.0 if not given); repeatable, applied in order")
    g.add_argument("--offload_model", type=_bool, default=None,
                   help="move each model (umT5, CLIP, DiT, VAE) to the GPU only while it runs and back to the CPU after, "
                        "as the official code; default: True with a GPU (the official single-GPU default), False on CPU")
    g.add_argument("--t5_cpu", action="store_true", help="keep the text encoder on the CPU")
    g.add_argument("--blocks_to_swap", type=int, default=0, metavar="N",
                   help="keep N of the DiT's blocks in pinned CPU memory, each copied to the GPU just before it runs "
                        "(saves N blocks of GPU memory; costs a copy of N blocks per DiT call)")
    g.add_argument("--prefetch_blocks", type=int, default=None, metavar="K",
                   help="with --blocks_to_swap or --stream_dit: blocks copied (read) ahead on a side stream so transfers "
                        "overlap compute (default 1; each costs one block of GPU memory)")
    g.add_argument("--stream_dit", action="store_true",
                   help="read the DiT's block weights from its file each time they run, one block at a time: runs a DiT "
                        "larger than RAM, slowly (the whole file is read on every DiT call)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="DiT weights (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--quantization", default=None, metavar="MODE",
                   help="store the DiT's block weights in fp8, upcast to --dtype per layer: fp8_e4m3fn, fp8_e5m2, "
                        "fp8_e4m3fn_scaled (per-tensor scales), or auto (keep an fp8 checkpoint's own layout)")
    g.add_argument("--t5_quantization", default=None, metavar="MODE", help="the same for the umT5 text encoder's weights")
    g.add_argument("--fp8_fast", action="store_true",
                   help="run the fp8 layers' matmuls in fp8 (torch._scaled_mm); needs a CUDA GPU of compute capability >= 8.9")
    g.add_argument("--sample_solver", default="unipc", choices=SOLVERS, help="sampler")
    g.add_argument("--sample_steps", type=int, default=None, help="sampling steps (default 50; 40 for i2v)")
    g.add_argument("--sample_shift", type=float, default=None, help="flow shift (default 5.0; 3.0 for i2v at 480p; 16 for flf2v)")
    g.add_argument("--sample_guide_scale", type=float, default=None, help="classifier-free guidance scale (default 5.0, or the model's)")
    g.add_argument("--batched_cfg", action="store_true", help="run cond and uncond as one batch (same result, more memory)")
    g.add_argument("--cache", default=None, metavar="SPEC",
                   help="step caching: teacache:THRESH (e.g. teacache:0.2) or magcache:THRESH:K (e.g. magcache:0.12:2) "
                        "reuses the DiT blocks' last output on steps that barely change; off computes every step (docs/caching.md)")
    g.add_argument("--attention", default="sdpa", metavar="sdpa|flash_attn|sageattn|auto",
                   help="attention kernel: PyTorch's sdpa, flash_attn (FlashAttention-2), sageattn (SageAttention, approximate) "
                        "or auto (the best installed); calls a kernel cannot take (fp32, masks, CPU) use sdpa")
    g.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the DiT blocks (compiled once on the first step, reused by every block); MODE: "
                        "default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs")
    g.add_argument("--vae_tile", default="auto", metavar="auto|off|WxH",
                   help="VAE encode/decode on overlapping spatial tiles of WxH pixels (e.g. 512x512) to bound its memory; "
                        "auto tiles only when the estimated peak exceeds the free memory")
    g.add_argument("--plan", action="store_true",
                   help="print the memory each phase will need on each device (estimated from the checkpoints' headers, "
                        "kinema/memory/plan.py) and exit without generating")
    g.add_argument("--no_memory_check", action="store_true",
                   help="run even when the memory estimate exceeds the free memory (by default such a run is refused up front)")
    g.add_argument("--base_seed", type=int, default=-1, help="seed; -1 picks one at random")
    g.add_argument("--prompt", default=None, help="what to generate")
    g.add_argument("--negative_prompt", default=None, help="what to avoid (default: the official one for the task)")
    g.add_argument("--image", default=None, help="i2v: the first frame")
    g.add_argument("--first_frame", default=None, help="flf2v: the first frame")
    g.add_argument("--last_frame", default=None, help="flf2v: the last frame")
    g.add_argument("--video", default=None, help="v2v: the input video")
    g.add_argument("--denoise", type=float, default=0.7, help="v2v: how much of the input to re-noise, in (0, 1]")
    g.add_argument("--fps", type=int, default=None, help="frame rate of the output (default 16, or the model's)")
    g.add_argument("--format", default=None, choices=list(FORMATS), help="output format (default: from --save_file, else h264-mp4; png for t2i)")
    g.add_argument("--crf", type=int, default=19, help="quality of h264 / h265 / webm (lower is better)")
    g.add_argument("--pix_fmt", default=None, help="pixel format, e.g. yuv420p or yuv420p10le (default: the format's own)")
    g.add_argument("--lossless", action="store_true", help="lossless webp / video where the codec allows")
    g.add_argument("--loop_count", type=int, default=0, help="gif / webp: times to loop (0 = forever)")
    g.add_argument("--pingpong", action="store_true", help="play forward then backward")
    g.add_argument("--save_file", default=None, help="output file (default: the official name in --output_dir)")
    g.add_argument("--output_dir", default=".", help="folder for outputs without --save_file")
    g.add_argument("--filename_prefix", default=None, help="name outputs PREFIX_00001.ext, ... instead of the official name")
    g.add_argument("--from", dest="from_file", default=None, help="repeat the run recorded in a Kinema output file's metadata")
    g.set_defaults(run=cmd_generate)
    p.generate = g  # `--from` sets its defaults
    from kinema.cli import evaluate, train

    train.add_parser(sub)
    evaluate.add_parser(sub)
    i = sub.add_parser("info", help="print the generation settings stored in a file")
    i.add_argument("--debug", action="store_true", help="show tracebacks")
    i.add_argument("file")
    i.set_defaults(run=cmd_info)
    return p


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().replace("x", "*").split("*"))
    except ValueError:
        raise KinemaError(f"--size {size!r} is not W*H (e.g. 832*480).") from None
    if w < 16 or h < 16:
        raise KinemaError(f"--size {size!r} is too small; width and height must be at least 16.")
    return w, h


def _check(args) -> None:
    from kinema.pipeline.tasks import get_task

    task = get_task(args.task).name
    if not args.prompt and not getattr(args, "plan", False):
        raise KinemaError("--prompt is missing; say what to generate.")
    if args.frame_num is not None and args.frame_num < 1:
        raise KinemaError(f"--frame_num {args.frame_num} must be at least 1 (4n+1: 1, 5, ..., 81).")
    if not args.ckpt_dir and (args.dit or args.vae or args.t5) and not (args.dit and args.vae and args.t5):
        raise KinemaError("incomplete checkpoint: pass --ckpt_dir, or all of --dit, --vae and --t5 "
                          "(or none of them to use the built-in model).")
    if args.ckpt_dir and not Path(args.ckpt_dir).is_dir():
        raise KinemaError(f"--ckpt_dir {args.ckpt_dir} is not a folder.")
    needs = {"i2v": ["image"], "flf2v": ["first_frame", "last_frame"], "v2v": ["video"]}.get(task, [])
    for name in ("image", "first_frame", "last_frame", "video"):
        if getattr(args, name) and name not in needs:
            raise KinemaError(f"--{name} is not used by task {args.task}; use " + {"image": "--task i2v-14B", "video": "--task v2v"}.get(name, "--task flf2v-14B") + ".")
    for name in needs:
        if not getattr(args, name):
            raise KinemaError(f"task {args.task} needs --{name}.")
        if not Path(getattr(args, name)).exists():
            raise KinemaError(f"--{name} {getattr(args, name)} does not exist.")
    if not 0 < args.denoise <= 1:
        raise KinemaError(f"--denoise {args.denoise} must be in (0, 1].")
    from kinema.sampling.cache import parse_cache

    parse_cache(args.cache, "--cache")
    from kinema.memory.vae_tiling import parse_vae_tile

    parse_vae_tile(args.vae_tile)
    from kinema.ops.attention import resolve_backend

    resolve_backend(args.attention)  # unknown or not installed: the error names the package
    _check_memory_flags(args)
    if args.sample_steps is not None and args.sample_steps < 1:
        raise KinemaError(f"--sample_steps {args.sample_steps} must be at least 1.")


def _check_memory_flags(args) -> None:
    """--blocks_to_swap / --prefetch_blocks / --stream_dit values that cannot work, before anything loads
    (N against the DiT's depth is checked once its file is opened, in _block_swap)."""
    if args.blocks_to_swap < 0:
        raise KinemaError(f"--blocks_to_swap {args.blocks_to_swap} is negative; give the number of DiT blocks to keep "
                          "on the CPU (0 to swap none).")
    if args.prefetch_blocks is not None and not (args.blocks_to_swap or args.stream_dit):
        raise KinemaError(f"--prefetch_blocks {args.prefetch_blocks} needs --blocks_to_swap N (or --stream_dit): "
                          "it says how many swapped blocks are copied ahead.")
    if args.prefetch_blocks is not None and args.prefetch_blocks < 1:
        raise KinemaError(f"--prefetch_blocks {args.prefetch_blocks} must be at least 1.")
    if args.stream_dit and args.blocks_to_swap:
        raise KinemaError("--stream_dit and --blocks_to_swap both place the DiT's blocks; use one "
                          "(--stream_dit reads them from disk, --blocks_to_swap keeps them in CPU memory).")
    if args.stream_dit and args.lora:
        raise KinemaError("--lora cannot be merged into a streamed DiT (its block weights are re-read from the file "
                          "on every call); merge the LoRA into a checkpoint first, or leave out --stream_dit.")


def _block_swap(args, dit_path) -> int:
    """--prefetch_blocks to use, after checking --blocks_to_swap against the DiT's depth (read from the file's header)."""
    if not args.blocks_to_swap:
        return 0
    from kinema.loading.dit import open_dit
    from kinema.memory.block_swap import check_block_swap

    return check_block_swap(open_dit(dit_path).model.config.num_layers, args.blocks_to_swap, args.prefetch_blocks)


def _fp8_modes(args, device: str) -> tuple[str | None, str | None]:
    """--quantization and --t5_quantization (None: keep the dtype), and --fp8_fast, checked before anything loads."""
    from kinema.memory.fp8 import check_mode, fp8_fast_unavailable

    modes = tuple(None if getattr(args, flag) in (None, "none") else check_mode(getattr(args, flag), True, f"--{flag}")
                  for flag in ("quantization", "t5_quantization"))
    if args.fp8_fast:
        if modes == (None, None):
            raise KinemaError("--fp8_fast runs fp8 layers' matmuls in fp8; add --quantization and/or --t5_quantization.")
        reason = fp8_fast_unavailable(device)
        if reason:
            raise KinemaError(f"--fp8_fast: {reason}. Leave it out: the fp8 weights are then upcast per layer.")
    return modes


def _cache_spec(args):
    """--cache, with the calibration written beside the checkpoint when there is one (bench/calibrate_cache.py)."""
    from dataclasses import replace

    from kinema.sampling.cache import calibration_beside, parse_cache

    spec = parse_cache(args.cache, "--cache")
    found = calibration_beside(args.dit or args.ckpt_dir) if spec else None
    return replace(spec, calibration=str(found)) if found else spec


def _output(args, task: str) -> tuple[str, Path, str | None]:
    """(format, folder or file, prefix) for save_video."""
    fmt = args.format
    if args.save_file:
        suffix = Path(args.save_file).suffix.lower()
        fmt = fmt or FORMAT_BY_SUFFIX.get(suffix)
        if fmt is None:
            raise KinemaError(f"--save_file {args.save_file}: unknown extension {suffix!r}; use one of {', '.join(FORMAT_BY_SUFFIX)} or pass --format.")
        return fmt, Path(args.save_file), None
    fmt = fmt or ("png" if task == "t2i" else "h264-mp4")
    if args.filename_prefix:
        return fmt, Path(args.output_dir), args.filename_prefix
    from kinema.media.write import FORMATS

    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    prompt = (args.prompt or "").replace(" ", "_").replace("/", "_")[:50]
    name = f"{args.task}_{args.size or 'default'}_1_1_{prompt}_{stamp}.{FORMATS[fmt].ext}"  # the official default name
    return fmt, Path(args.output_dir) / name, None


def cmd_generate(args) -> None:
    import torch

    import kinema
    from kinema.lora import apply_loras, parse_lora_spec
    from kinema.media import read_image, read_video, save_video, to_model_range
    from kinema.memory.offload import Offloader
    from kinema.pipeline.generate import Models, generate
    from kinema.pipeline.tasks import get_task

    _check(args)
    dit_fp8, t5_fp8 = _fp8_modes(args, "cuda" if torch.cuda.is_available() else "cpu")
    if args.compile:
        from kinema.memory.compile import check_compile, compile_blocks

        check_compile(args.compile, "cuda" if torch.cuda.is_available() else "cpu")  # mode and compiler, before loading
    loras = [parse_lora_spec(spec) for spec in args.lora or []]
    task = get_task(args.task)
    size = _parse_size(args.size) if args.size else None
    if not (args.ckpt_dir or args.dit):
        from kinema.builtin import builtin_path

        args.ckpt_dir = str(builtin_path())
        log.info("No checkpoint given: using the built-in model (%s)", args.ckpt_dir)
    fmt, target, prefix = _output(args, task.name)
    if args.save_file and target.exists() and not getattr(args, "plan", False):
        raise KinemaError(f"--save_file {target} already exists; Kinema never overwrites. Choose another name.")
    seed = args.base_seed if args.base_seed >= 0 else random.randint(0, 2**31 - 1)
    log.info("Generation job args: %s", {k: v for k, v in vars(args).items() if k not in ("debug", "command")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)
    images = {}
    for name in ("image", "first_frame", "last_frame"):
        if getattr(args, name):
            images[name] = to_model_range(read_image(getattr(args, name)))[:, 0]  # [3, H, W]
    video = to_model_range(read_video(args.video).frames) if args.video else None
    offload = args.offload_model
    if offload is None:  # the official default: offload on a single GPU; on the CPU there is nowhere to offload from
        offload = device == "cuda"
        log.info("--offload_model not given: %s", offload)
    prefetch = _block_swap(args, args.dit or args.ckpt_dir)
    from kinema.cli.plan import memory_plan
    from kinema.memory.plan import encoder_dtype

    if memory_plan(args, size, images, device, dtype, offload, prefetch, dit_fp8, t5_fp8):
        return  # --plan: printed, nothing to generate
    home = "cpu" if offload else device  # where each model is loaded; an offloaded one visits `device` to run
    t0 = time.perf_counter()
    log.info("Loading models from %s", args.ckpt_dir or "the given files")
    enc_dtype = encoder_dtype(device)
    te = kinema.load_text_encoder(args.t5 or args.ckpt_dir, tokenizer=args.tokenizer, device="cpu" if args.t5_cpu else home,
                                  dtype=enc_dtype, quantization=t5_fp8, fp8_fast=args.fp8_fast)
    if args.stream_dit:
        from kinema.memory.streaming import stream_dit

        dit = stream_dit(args.dit or args.ckpt_dir, dtype=dtype, device=device, quantization=dit_fp8, fp8_fast=args.fp8_fast,
                         prefetch_blocks=args.prefetch_blocks or 1)
    else:
        dit = kinema.load_dit(args.dit or args.ckpt_dir, dtype=dtype, device="cpu" if prefetch else home,
                              quantization=dit_fp8, fp8_fast=args.fp8_fast)
    if loras:
        apply_loras(dit, loras)
    if prefetch:
        from kinema.memory.block_swap import BlockSwap

        BlockSwap(dit, args.blocks_to_swap, prefetch, device=device)  # kept as dit.block_placement
    if args.compile:
        compile_blocks(dit, args.compile, device=device)  # where it runs, not where offload keeps it
    vae = kinema.load_vae(args.vae or args.ckpt_dir, device=home)
    clip = kinema.load_clip_vision(args.clip or args.ckpt_dir, dtype=enc_dtype, device=home) if task.model_type != "t2v" else None
    log.info("Models loaded in %.1fs: %s DiT, %d layers, width %d", time.perf_counter() - t0, dit.config.model_type, dit.config.num_layers, dit.config.dim)
    log.info("Generating %s ...", "image" if task.name == "t2i" else "video")
    models = Models(dit, vae, te, clip)
    out = generate(
        models, task.name, prompt=args.prompt, negative_prompt=args.negative_prompt, size=size,
        frame_num=args.frame_num, steps=args.sample_steps, shift=args.sample_shift, guide_scale=args.sample_guide_scale,
        seed=seed, solver=args.sample_solver, image=images.get("image"), first_frame=images.get("first_frame"),
        last_frame=images.get("last_frame"), video=video, denoise=args.denoise, batched_cfg=args.batched_cfg,
        cache=_cache_spec(args), vae_tile=args.vae_tile, attention=args.attention,
        offload=Offloader(models, device, t5_cpu=args.t5_cpu) if offload else False,
    )
    s = out["settings"]
    fps = args.fps or int(getattr(dit, "sample_defaults", {}).get("fps", 16))
    metadata = {**s, "size": f"{s['width']}*{s['height']}", "fps": fps, "format": fmt,
                "model": str(Path(args.dit or args.ckpt_dir).resolve()), "kinema_version": kinema.__version__}
    if loras:
        metadata["loras"] = [[str(Path(p).resolve()), strength] for p, strength in loras]
    metadata.update({k: v for k, v in (("quantization", dit_fp8), ("t5_quantization", t5_fp8)) if v})
    if args.vae_tile != "auto":  # tiles change the pixels slightly (<= 1e-3): repeat them with --from
        metadata["vae_tile"] = args.vae_tile
    log.info("Saving generated %s to %s", "image" if task.name == "t2i" else "video", target if prefix is None else f"{target}/{prefix}_NNNNN")
    path = save_video(out["video"], target, format=fmt, frame_rate=fps, loop_count=args.loop_count, pingpong=args.pingpong,
                      crf=args.crf, pix_fmt=args.pix_fmt, lossless=args.lossless, filename_prefix=prefix or "kinema", metadata=metadata)
    log.info("Saved %s", path)
    log.info("Finished.")


def cmd_info(args) -> None:
    from kinema.media import read_metadata

    if not Path(args.file).exists():
        raise KinemaError(f"{args.file} does not exist.")
    meta = read_metadata(args.file)
    if not meta:
        raise KinemaError(f"{args.file} holds no Kinema generation metadata.")
    print(json.dumps(meta, indent=2, ensure_ascii=False))


def _apply_from(parser, argv: list[str]) -> list[str]:
    """`--from FILE`: the file's recorded settings become the defaults; flags given now still win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--from", dest="from_file")
    known, _ = pre.parse_known_args(argv)
    if not known.from_file:
        return argv
    from kinema.media import read_metadata

    if not Path(known.from_file).exists():
        raise KinemaError(f"--from {known.from_file} does not exist.")
    meta = read_metadata(known.from_file)
    if not meta:
        raise KinemaError(f"--from {known.from_file} holds no Kinema generation metadata to repeat.")
    parser.generate.set_defaults(**{FROM_KEYS[k]: v for k, v in meta.items() if k in FROM_KEYS})
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s: %(message)s", stream=sys.stderr)
    parser = build_parser()
    try:
        argv = _apply_from(parser, argv)
        args = parser.parse_args(argv)
        args.run(args)
    except KinemaError as exc:
        if debug:
            raise
        print(f"kinema: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kinema: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
