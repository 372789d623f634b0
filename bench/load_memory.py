"""Loading never holds two copies of the weights: peak RSS / checkpoint size, Kinema vs diffusers.

Writes a random bf16 DiT checkpoint (1.3B-shaped by default, ~2.8 GB) in the
diffusers layout (which both libraries read) to a temporary folder, then loads
it in a fresh process per library, touches every weight, and reports the
process's peak resident memory against the file size.

    python bench/load_memory.py            # 1.3B-shaped, Kinema and diffusers
    python bench/load_memory.py --small --only kinema --json   # what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_status import status_bytes

SHAPES = {
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096),
    "small": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=4, text_dim=4096),
}


def write_checkpoint(folder: Path, shape: str) -> int:
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = WanTransformer3DModel(in_channels=16, out_channels=16, freq_dim=256, **SHAPES[shape])
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    model.save_config(folder)
    return (folder / "diffusion_pytorch_model.safetensors").stat().st_size


def peak_rss() -> int:
    """This process's resident high-water mark in bytes (VmHWM; ru_maxrss where there is none)."""
    try:
        return status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(lib: str, folder: str) -> None:
    """Runs in a fresh process: load, touch every weight, report memory as JSON."""
    import torch

    if lib == "kinema":
        import kinema
        from kinema.models.dit import DiTConfig, WanDiT

        with torch.device("meta"):  # warm up the meta-device machinery (a fixed ~70 MB of Python state)
            WanDiT(DiTConfig(dim=128, num_heads=1, num_layers=1))
    else:
        from diffusers import WanTransformer3DModel

        with torch.device("meta"):
            WanTransformer3DModel(num_attention_heads=1, attention_head_dim=128, num_layers=1)
    base = peak_rss()
    start = time.perf_counter()
    if lib == "kinema":
        model = kinema.load_dit(folder, dtype=torch.bfloat16)
    else:
        model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    # Read one value per 4 KiB page of every weight, so every page is really resident (and no large temporaries).
    total = sum(p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum().item() for p in model.parameters())
    peak = peak_rss()
    print(json.dumps({"lib": lib, "peak": peak, "base": base, "seconds": seconds, "checksum": total}))


def measure(lib: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", lib, str(folder)], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"{lib} load failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a ~0.4 GB checkpoint (4 blocks of the 1.3B model) instead of the 1.3B-shaped one")
    ap.add_argument("--only", choices=["kinema", "diffusers"], help="measure one library")
    ap.add_argument("--json", action="store_true", help="print the results as JSON lines")
    ap.add_argument("--child", nargs=2, metavar=("LIB", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory(prefix="kinema-loadmem-") as tmp:
        folder = Path(tmp) / "dit"
        size = write_checkpoint(folder, "small" if args.small else "1.3B")
        libs = [args.only] if args.only else ["kinema", "diffusers"]
        rows = []
        for lib in libs:
            r = measure(lib, folder)
            r.update(file=size, ratio=r["peak"] / size, ratio_above_base=(r["peak"] - r["base"]) / size)
            rows.append(r)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    gb = 1024**3
    print(f"checkpoint: {size / gb:.2f} GiB bf16 ({'small' if args.small else '1.3B-shaped'})")
    print(f"{'library':<10} {'peak RSS GiB':>12} {'import GiB':>11} {'load s':>7} {'peak/file':>10} {'(peak-import)/file':>19}")
    for r in rows:
        print(f"{r['lib']:<10} {r['peak'] / gb:>12.2f} {r['base'] / gb:>11.2f} {r['seconds']:>7.1f} {r['ratio']:>10.2f} {r['ratio_above_base']:>19.2f}")
    print("target: Kinema peak/file <= 1.3")


if __name__ == "__main__":
    main()
