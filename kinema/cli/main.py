"""The `kinema` command line: `kinema generate` (the official generate.py flags) and `kinema info`.

User errors end in one line on stderr and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kinema.cli.generate import cmd_generate, extras_flags
from kinema.errors import KinemaError
from kinema.pipeline.tasks import OFFICIAL_TASKS, TASKS

log = logging.getLogger("kinema")

# Settings stored in a file's metadata that `--from` turns back into flags.
FROM_KEYS = {
    "task": "task", "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "base_seed", "steps": "sample_steps",
    "shift": "sample_shift", "guide_scale": "sample_guide_scale", "solver": "sample_solver", "frame_num": "frame_num",
    "size": "size", "fps": "fps", "format": "format", "denoise": "denoise", "cache": "cache", "batched_cfg": "batched_cfg",
    "quantization": "quantization", "t5_quantization": "t5_quantization", "attention": "attention", "vae_tile": "vae_tile",
    **{k: k for k in ("slg", "slg_start", "slg_end", "slg_mode", "slg_scale", "cfg_zero_star", "zero_init_steps", "feta",
                      "feta_start", "feta_end", "riflex", "context_frames", "context_stride", "context_overlap",
                      "context_schedule", "context_fuse", "freenoise", "context_rope", "extend_frames", "overlap_frames",
                      "loop", "colour_match", "overlap_join", "refine_size", "refine_denoise", "refine_steps", "refine_method", "upscale", "upscaler")},
}



class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one: an unset (None) or off (False) default says nothing; the help
    text tells what then applies."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kinema", description="Wan2.1 video generation.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video or image", formatter_class=_DefaultsHelp)
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    _model_flags(g)
    _memory_flags(g)
    _sampling_flags(g)
    _input_flags(g)
    _stage_flags(g)
    _output_flags(g)
    _parallel_flags(g)
    g.set_defaults(run=cmd_generate)
    p.generate = g  # `--from` sets its defaults
    from kinema.cli import evaluate, train

    train.add_parser(sub)
    evaluate.add_parser(sub)
    from kinema.cli import run

    run.add_parser(sub)
    from kinema.cli import serve

    serve.add_parser(sub)
    i = sub.add_parser("info", help="print the generation settings stored in a file")
    i.add_argument("--debug", action="store_true", help="show tracebacks")
    i.add_argument("file")
    i.set_defaults(run=cmd_info)
    return p


def _model_flags(g) -> None:
    g.add_argument("--task", default="t2v-14B", choices=[*OFFICIAL_TASKS, *TASKS], help="what to generate")
    g.add_argument("--ckpt_dir", default=None, help="checkpoint folder (official, diffusers or a folder of single files); "
                   "default: the built-in model")
    g.add_argument("--dit", default=None, help="DiT checkpoint (file or folder), overrides --ckpt_dir")
    g.add_argument("--vae", default=None, help="VAE checkpoint, overrides --ckpt_dir")
    g.add_argument("--t5", default=None, help="umT5 checkpoint, overrides --ckpt_dir")
    g.add_argument("--tokenizer", default=None, help="umT5 tokenizer folder or file (default: found next to the umT5 weights)")
    g.add_argument("--clip", default=None, help="CLIP vision checkpoint for i2v/flf2v, overrides --ckpt_dir")
    g.add_argument("--lora", action="append", default=None, metavar="FILE[:STRENGTH]",
                   help="merge a LoRA .safetensors into the DiT at STRENGTH (1.0 if not given); repeatable, applied in order; "
                        "any common layout (diffusers / PEFT, kohya, ComfyUI / musubi, DiffSynth, LightX2V diff, LyCORIS "
                        "LoKr / LoHa); builtin:NAME for one shipped with the built-in model (builtin:distill-4step: "
                        "4 steps, no guidance)")
    g.add_argument("--lora_runtime", action="store_true",
                   help="run every --lora unmerged: added to its layers' outputs at run time (fp8 and streamed DiTs "
                        "untouched); FILE:S1,S2,... (one strength per step, the last repeated) always runs unmerged")
    g.add_argument("--lora_ignore_unmatched", action="store_true",
                   help="leave out LoRA keys that match no layer of the DiT (a warning names them) instead of refusing")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="DiT weights (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--quantization", default=None, metavar="MODE",
                   help="store the DiT's block weights in fp8, upcast to --dtype per layer: fp8_e4m3fn, fp8_e5m2, "
                        "fp8_e4m3fn_scaled (per-tensor scales), or auto (keep an fp8 checkpoint's own layout)")
    g.add_argument("--t5_quantization", default=None, metavar="MODE", help="the same for the umT5 text encoder's weights")
    g.add_argument("--fp8_fast", action="store_true",
                   help="run the fp8 layers' matmuls in fp8 (torch._scaled_mm); needs a CUDA GPU of compute capability >= 8.9")
    g.add_argument("--attention", default="sdpa", metavar="sdpa|flash_attn|sageattn|auto",
                   help="attention kernel: PyTorch's sdpa, flash_attn (FlashAttention-2), sageattn (SageAttention, approximate) "
                        "or auto (the best installed); calls a kernel cannot take (fp32, masks, CPU) use sdpa")
    g.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the DiT blocks (compiled once on the first step, reused by every block); MODE: "
                        "default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs")


def _memory_flags(g) -> None:
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
    g.add_argument("--vae_tile", default="auto", metavar="auto|off|WxH",
                   help="VAE encode/decode on overlapping spatial tiles of WxH pixels (e.g. 512x512) to bound its memory; "
                        "auto tiles only when the estimated peak exceeds the free memory")
    g.add_argument("--plan", action="store_true",
                   help="print the memory each phase will need on each device (estimated from the checkpoints' headers, "
                        "kinema/memory/plan.py) and exit without generating")
    g.add_argument("--no_memory_check", action="store_true",
                   help="run even when the memory estimate exceeds the free memory (by default such a run is refused up front)")


def _sampling_flags(g) -> None:
    from kinema.sampling import SOLVERS

    g.add_argument("--size", default=None, help="W*H of the output (for i2v/flf2v: the area; the image sets the aspect); "
                   "default: the model's own, else 1280*720")
    g.add_argument("--frame_num", type=int, default=None, help="frames, 4n+1 (default 81; 1 for t2i)")
    g.add_argument("--sample_solver", default=None, choices=SOLVERS,
                   help="sampler (default unipc, or what the model or a distillation LoRA is made for)")
    g.add_argument("--sample_steps", type=int, default=None, help="sampling steps (default 50; 40 for i2v)")
    g.add_argument("--sample_shift", type=float, default=None, help="flow shift (default 5.0; 3.0 for i2v at 480p; 16 for flf2v)")
    g.add_argument("--sample_guide_scale", type=float, default=None, help="classifier-free guidance scale (default 5.0, or the model's)")
    g.add_argument("--batched_cfg", action="store_true", help="run cond and uncond as one batch (same result, more memory)")
    g.add_argument("--cache", default=None, metavar="SPEC",
                   help="step caching: teacache:THRESH (e.g. teacache:0.2) or magcache:THRESH:K (e.g. magcache:0.12:2) "
                        "reuses the DiT blocks' last output on steps that barely change; off computes every step (docs/caching.md)")
    g.add_argument("--base_seed", type=int, default=-1, help="seed; -1 picks one at random")
    extras_flags(g)


def _parallel_flags(g) -> None:
    p = g.add_argument_group("many GPUs (README, \"Many GPUs and many machines\"): start with torchrun "
                             "--nproc_per_node=N -m kinema generate ...")
    p.add_argument("--ulysses_size", type=int, default=1, metavar="U",
                   help="split the video tokens over U processes, exchanging heads by all-to-all (the DiT's heads must "
                        "divide by U)")
    p.add_argument("--ring_size", type=int, default=1, metavar="R",
                   help="split the video tokens over R processes, passing keys and values around a ring; U x R x "
                        "(2 with --cfg_parallel) must equal the processes")
    p.add_argument("--cfg_parallel", action="store_true", help="run cond and uncond on two groups of processes at once")
    p.add_argument("--t5_fsdp", action="store_true", help="shard the umT5 text encoder over the processes (FSDP)")
    p.add_argument("--dit_fsdp", action="store_true", help="shard the DiT over the processes (FSDP): each holds 1/N")
    p.add_argument("--vae_parallel", action="store_true",
                   help="split the VAE decode by spatial tiles over the processes (the tiles of --vae_tile, or about one "
                        "per process)")


def _stage_flags(g) -> None:
    r = g.add_argument_group("refine and upscale (README, \"Refine and upscale\")")
    r.add_argument("--refine_size", default=None, metavar="W*H",
                   help="a second pass at this size: the first pass's result resized (--refine_method), re-noised to "
                        "--refine_denoise and denoised again by the same model")
    r.add_argument("--refine_denoise", type=float, default=None, help="with --refine_size: strength in (0, 1] (default 0.3)")
    r.add_argument("--refine_steps", type=int, default=None, help="with --refine_size: steps of the schedule (default: "
                   "the first pass's; the pass runs the last refine_denoise of them)")
    r.add_argument("--refine_method", default=None, choices=["bicubic", "lanczos", "latent"],
                   help="with --refine_size: resize pixels (bicubic, lanczos) or latents (default bicubic)")
    r.add_argument("--upscale", type=int, default=None, choices=[2, 4, 8],
                   help="raise the decoded video's resolution with the learned x2 cascade (the built-in upscaler, or "
                        "--upscaler)")
    r.add_argument("--upscaler", default=None, metavar="PATH",
                   help="with --upscale: a Kinema upscaler folder / file, or a Real-ESRGAN family model file "
                        "(pip install 'kinema[upscalers]')")
    r.add_argument("--upscale_tile", type=int, default=128, metavar="PIXELS",
                   help="with --upscale: tile side in input pixels (exact: tiles overlap by the network's reach)")


def _input_flags(g) -> None:
    g.add_argument("--prompt", default=None, help="what to generate")
    g.add_argument("--negative_prompt", default=None, help="what to avoid (default: the official one for the task)")
    g.add_argument("--image", default=None, help="i2v: the first frame")
    g.add_argument("--first_frame", default=None, help="flf2v: the first frame")
    g.add_argument("--last_frame", default=None, help="flf2v: the last frame")
    g.add_argument("--video", default=None, help="v2v: the input video")
    g.add_argument("--denoise", type=float, default=0.7, help="v2v: how much of the input to re-noise, in (0, 1]")
    g.add_argument("--extend_frames", type=int, default=None, metavar="N",
                   help="task extend: frames to add after --video (a multiple of 4); run again on the output to go on")
    g.add_argument("--overlap_frames", type=int, default=9, metavar="K",
                   help="task extend: the video's last K frames (4k+1) the new frames continue from")
    g.add_argument("--loop", action="store_true", help="task extend: make the new end lead back into the first frame")
    g.add_argument("--colour_match", default="overlap", choices=["overlap", "hm", "off"],
                   help="task extend: colour-correct the new frames by the offset measured on the overlap (overlap: "
                        "one shift per channel), each frame's histogram matched to the overlap's (hm: for repeated "
                        "extensions of one scene), or not at all (off)")
    g.add_argument("--overlap_join", default="blend", choices=["blend", "cut"],
                   help="task extend: cross-fade the video's last K frames into the new clip's own decode of them "
                        "(blend: no jump at the join), or keep every input frame as it was (cut)")
    g.add_argument("--from", dest="from_file", default=None, help="repeat the run recorded in a Kinema output file's metadata")


def _output_flags(g) -> None:
    from kinema.media import FORMATS

    g.add_argument("--fps", type=float, default=None, help="frame rate of the output (default 16, or the model's)")
    g.add_argument("--format", default=None, choices=list(FORMATS), help="output format (default: from --save_file, else h264-mp4; png for t2i)")
    g.add_argument("--crf", type=int, default=19, help="quality of h264 / h265 / webm (lower is better)")
    g.add_argument("--pix_fmt", default=None, help="pixel format, e.g. yuv420p or yuv420p10le (default: the format's own)")
    g.add_argument("--lossless", action="store_true", help="lossless webp / video where the codec allows")
    g.add_argument("--loop_count", type=int, default=0, help="gif / webp: times to loop (0 = forever)")
    g.add_argument("--pingpong", action="store_true", help="play forward then backward")
    g.add_argument("--save_file", default=None, help="output file (default: the official name in --output_dir)")
    g.add_argument("--output_dir", default=".", help="folder for outputs without --save_file")
    g.add_argument("--filename_prefix", default=None, help="name outputs PREFIX_00001.ext, ... instead of the official name")


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
        code = args.run(args)  # a command may return its exit code (kinema run: 1 for a refused workflow)
    except KinemaError as exc:
        if debug:
            raise
        rank = os.environ.get("RANK", "0") if "LOCAL_RANK" in os.environ else "0"  # torchrun's processes
        print(f"kinema: error: {'' if rank == '0' else f'[rank {rank}] '}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kinema: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
