"""The memory plan (kinema/memory/plan.py) against real runs: estimated vs measured memory per phase, on CPU.

Writes random-weight checkpoints in the official folder layout (kinema.demo's tiny set, with a wider DiT,
umT5 or VAE swapped in), runs `kinema generate` in a fresh process per configuration and measures each
phase's peak resident memory: the kernel's high-water mark (VmHWM), reset when a phase starts
(/proc/self/clear_refs), less the process's RSS before loading. The plan is the one the run's own memory
check made. Error = (estimated - measured) / measured, per phase.

    OMP_NUM_THREADS=1 python bench/memory_plan.py                  # every configuration (a few minutes)
    OMP_NUM_THREADS=1 python bench/memory_plan.py --only dit --json  # one (tests/test_memory_plan.py)
    python bench/memory_plan.py --wan21                           # the plan for the released shapes (README)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from proc_status import status_bytes

PROMPT = "a red circle moving right on a black background"
# name -> (what to swap into the tiny checkpoint, `kinema generate` flags). Each runs in seconds on one core.
CONFIGS = {
    "tiny": ({}, ["--size", "64*48", "--frame_num", "5", "--sample_steps", "2"]),
    "dit": ({"dit": dict(dim=768, ffn_dim=3072, num_heads=6, num_layers=2)},
            ["--task", "t2i-14B", "--size", "640*640", "--sample_steps", "1"]),
    "dit-bf16-fp8": ({"dit": dict(dim=768, ffn_dim=3072, num_heads=6, num_layers=2)},
                     ["--task", "t2i-14B", "--size", "640*640", "--sample_steps", "1", "--dtype", "bf16",
                      "--quantization", "fp8_e4m3fn_scaled"]),
    "dit-batched": ({"dit": dict(dim=768, ffn_dim=3072, num_heads=6, num_layers=2)},
                    ["--task", "t2i-14B", "--size", "640*640", "--sample_steps", "1", "--batched_cfg"]),
    "dit-swap": ({"dit": dict(dim=768, ffn_dim=3072, num_heads=6, num_layers=4)},
                 ["--task", "t2i-14B", "--size", "512*512", "--sample_steps", "1", "--blocks_to_swap", "2"]),
    "t5": ({"t5": dict(dim=1024, dim_attn=1024, dim_ffn=4096, num_heads=16, num_layers=2)},
           ["--size", "64*48", "--frame_num", "5", "--sample_steps", "1"]),
    "vae": ({"vae": dict(dim=32)}, ["--size", "256*256", "--frame_num", "17", "--sample_steps", "1"]),
    "video": ({"dit": dict(dim=768, ffn_dim=3072, num_heads=6, num_layers=2)},
              ["--size", "256*256", "--frame_num", "17", "--sample_steps", "1"]),
}
PHASES = ("load", "text encode", "image encode", "VAE encode", "sampling", "decode", "save")


def write_checkpoint(folder: Path, dit: dict | None = None, t5: dict | None = None, vae: dict | None = None) -> None:
    """kinema.demo's tiny random set, with a DiT / umT5 / VAE of the given sizes in its place."""
    import torch
    from safetensors.torch import save_file

    from kinema.demo import write_random_checkpoint
    from kinema.models.dit import DiTConfig, WanDiT
    from kinema.models.t5 import UMT5Encoder
    from kinema.models.vae import WanVAE

    write_random_checkpoint(folder)
    text_dim = 64
    if t5:
        model = UMT5Encoder(vocab_size=64, **t5)
        torch.save(model.state_dict(), folder / "models_t5_umt5-xxl-enc-bf16.pth")
        text_dim = model.dim
    if dit or t5:
        cfg = DiTConfig(**{"dim": 128, "ffn_dim": 256, "num_heads": 2, "num_layers": 2, **(dit or {}), "text_dim": text_dim})
        save_file({k: v.contiguous() for k, v in WanDiT(cfg).state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "t2v", "dim": cfg.dim, "num_heads": cfg.num_heads}))
    if vae:
        torch.save(WanVAE(dim_mult=(1, 2, 2, 2), **vae).state_dict(), folder / "Wan2.1_VAE.pth")


def child(argv: list[str]) -> None:
    """Runs in a fresh process: one `kinema generate`, each phase's peak RSS above the start, and the plan."""
    import kinema.cli.plan as cli_plan
    import kinema.encoders.image as image
    import kinema.encoders.text as text
    import kinema.media as media
    import kinema.memory.vae_tiling as vae_tiling
    import kinema.pipeline.sample as sampling
    from kinema.cli.main import main
    from kinema.memory.plan import estimate

    measured: dict[str, int] = {}
    start: dict[str, int] = {}  # RSS when each phase starts: what the phases before it left
    current = ["load"]
    clear = Path("/proc/self/clear_refs")

    def close(next_phase: str) -> None:
        measured[current[0]] = max(measured.get(current[0], 0), status_bytes("VmHWM") - base)
        clear.write_text("5")  # resets VmHWM to the current RSS
        current[0] = next_phase
        start.setdefault(next_phase, status_bytes("VmRSS") - base)

    def timed(owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            close(phase)
            try:
                return original(*args, **kwargs)
            finally:
                close("between")

        setattr(owner, name, wrapper)

    for owner, name, phase in ((text.TextEncoder, "encode", "text encode"), (image.ClipVisionEncoder, "encode", "image encode"),
                               (vae_tiling.TiledVAE, "encode", "VAE encode"), (sampling, "sample", "sampling"),
                               (vae_tiling.TiledVAE, "decode", "decode"), (media, "save_video", "save")):
        timed(owner, name, phase)
    planned = {}
    check_fits = cli_plan.check_fits

    def keep(models, run, *args, **kwargs):  # the memory check of every run: what it planned
        planned["models"], planned["run"] = models, run
        return check_fits(models, run, *args, **kwargs)

    cli_plan.check_fits = keep
    base = status_bytes("VmRSS")
    clear.write_text("5")
    code = main(["generate", *argv])
    close("between")
    if code != 0:
        raise SystemExit(f"kinema generate exited {code}")
    plan = estimate(planned["models"], planned["run"])
    estimated = {p.name: p.total("cpu") for p in plan.phases}
    print(json.dumps({"base": base, "measured": {k: v for k, v in measured.items() if k in PHASES}, "estimated": estimated,
                      "start": {k: v for k, v in start.items() if k in PHASES}, "tokens": plan.tokens,
                      "uses": {p.name: [(u.component, u.weights, u.activations) for u in p.uses] for p in plan.phases}}))


def measure(name: str, folder: Path) -> dict:
    parts, flags = CONFIGS[name]
    ckpt = folder / name
    write_checkpoint(ckpt, **parts)
    argv = ["--ckpt_dir", str(ckpt), "--prompt", PROMPT, "--base_seed", "1", "--save_file", str(folder / f"{name}.mp4"), *flags]
    if "--task" not in flags:
        argv = ["--task", "t2v-1.3B", *argv]
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["config"] = name
    phases = [p for p in PHASES if p in row["measured"] and p in row["estimated"]]
    row["error"] = {p: (row["estimated"][p] - row["measured"][p]) / row["measured"][p] for p in phases}
    peak_m, peak_e = max(row["measured"][p] for p in phases), max(row["estimated"][p] for p in phases)
    row.update(peak_measured=peak_m, peak_estimated=peak_e, peak_error=(peak_e - peak_m) / peak_m)
    return row


def least_gpu(models, run) -> int:
    """The least free GPU memory the run fits in (bytes, to 1/16 GiB), --vae_tile auto tiling as it would there."""
    from kinema.memory.plan import estimate

    def fits(gpu: int) -> bool:
        return not estimate(models, run, {"cuda": gpu, "cpu": 2**50}).short({"cuda": gpu, "cpu": 2**50})

    low, high = 0, 2**40
    while high - low > 2**26:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def wan21_table() -> str:
    """The plan of the released models at their sizes, for the README."""
    import torch

    from kinema.memory.plan import Run, estimate, wan21_models

    fp8 = "fp8_e4m3fn_scaled"
    rows = [
        ("T2V 1.3B, 832x480", "t2v-1.3B", dict(width=832, height=480), [
            ("bf16, no offload", dict(offload=False)),
            ("bf16 (default: --offload_model)", {}),
            ("bf16 --t5_cpu", dict(t5_cpu=True)),
            ("fp32 weights --t5_cpu (as the official run)", dict(dtype=torch.float32, t5_cpu=True)),
            ("fp8 --t5_cpu", dict(quantization=fp8, t5_cpu=True)),
        ]),
        ("T2V 14B, 1280x720", "t2v-14B", dict(width=1280, height=720), [
            ("bf16, no offload", dict(offload=False)),
            ("bf16 (default: --offload_model)", {}),
            ("fp32 weights (as the official run)", dict(dtype=torch.float32)),
            ("fp8", dict(quantization=fp8)),
            ("bf16 --blocks_to_swap 20", dict(blocks_to_swap=20)),
            ("fp8 --t5_cpu --blocks_to_swap 30", dict(quantization=fp8, t5_cpu=True, blocks_to_swap=30)),
        ]),
        ("I2V 14B, 1280x720", "i2v-14B", dict(width=1280, height=720, task="i2v"), [
            ("bf16 (default: --offload_model)", {}),
            ("fp8 --t5_cpu --blocks_to_swap 30", dict(quantization=fp8, t5_cpu=True, blocks_to_swap=30)),
        ]),
    ]
    lines = ["| model, 81 frames | flags | GPU peak, VAE untiled | least GPU memory it fits in (VAE tiled by auto) | host RAM peak |",
             "|---|---|---|---|---|"]
    for label, name, size, variants in rows:
        models = wan21_models(name)
        for flags, fields in variants:
            run = Run(**size, **{"offload": True, **fields})
            plan = estimate(models, run)
            gpu, host = plan.peak("cuda"), plan.peak("cpu")
            lines.append(f"| {label} | {flags} | {gpu[0] / 2**30:.1f} GiB ({gpu[1]}) | {least_gpu(models, run) / 2**30:.1f} GiB "
                         f"| {host[0] / 2**30:.1f} GiB ({host[1]}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(CONFIGS), action="append", help="measure these configurations")
    ap.add_argument("--json", action="store_true", help="print the results as JSON lines")
    ap.add_argument("--wan21", action="store_true", help="print the plan for the released Wan2.1 shapes (no run)")
    ap.add_argument("--mmap_threshold", action="store_true",
                    help="run with MALLOC_MMAP_THRESHOLD_=65536: every tensor over 64 KiB gets its own mapping and is "
                         "returned when freed, as the large tensors of full-size models are; the default lets glibc keep "
                         "freed tensors under 32 MiB in its heap, which later phases then show")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    if args.wan21:
        return print(wan21_table())
    with tempfile.TemporaryDirectory(prefix="kinema-memplan-") as tmp:
        if args.mmap_threshold:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        rows = [measure(name, Path(tmp)) for name in args.only or CONFIGS]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    mib = 2**20
    print(f"{'config':<14} {'phase':<12} {'estimated MiB':>14} {'measured MiB':>13} {'error':>7}")
    for r in rows:
        for p, err in r["error"].items():
            print(f"{r['config']:<14} {p:<12} {r['estimated'][p] / mib:>14.0f} {r['measured'][p] / mib:>13.0f} {err:>+7.0%}")
        print(f"{r['config']:<14} {'PEAK':<12} {r['peak_estimated'] / mib:>14.0f} {r['peak_measured'] / mib:>13.0f} "
              f"{r['peak_error']:>+7.0%}   (process RSS before loading: {r['base'] / mib:.0f} MiB)")


if __name__ == "__main__":
    main()
