"""Tiled VAE decode: peak memory and time, Kinema untiled vs tiled vs diffusers' AutoencoderKLWan.

A full-width Wan2.1 VAE (dim 96) with random O(1) weights is written once in the
diffusers layout; Kinema loads it with `load_vae` and diffusers with
`from_pretrained`, so both decode the same weights from the same latents. Each
configuration runs in a fresh process, so each peak is its own: on CPU the
process's peak resident memory above what it held before the decode (after a
small warm-up decode), on CUDA torch.cuda.max_memory_allocated above the
memory allocated before. PSNR is against the same library's untiled output
(range [-1, 1]); "vs diffusers" compares Kinema with diffusers untiled.

Kinema's tile is, unless --tile is given, what `--vae_tile auto` picks when a
third of the untiled estimate (of its part that grows with the frame) is free:
the fewest tiles that fit. diffusers tiles with its defaults (256-pixel tiles,
64-pixel overlap).

    python bench/vae_decode.py                 # 17 and 33 frames at 832x480 (shrunk if the machine lacks the memory)
    python bench/vae_decode.py --device cuda   # on a GPU
    python bench/vae_decode.py --small         # minutes: width 16, 5 and 9 frames at 320x192 (what proves the script)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_status import status_bytes

Z_DIM = 16


def write_checkpoint(folder: Path, dim: int) -> None:
    """A random diffusers AutoencoderKLWan, every weight O(1) so every path shows in the output."""
    import torch
    from diffusers import AutoencoderKLWan

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import randomise_vae  # the same random weights as the VAE parity tests

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=dim, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             temperal_downsample=[False, True, True])
    randomise_vae(model, torch.Generator().manual_seed(0), model.decoder.conv_out)
    model.save_pretrained(folder)


def child(cfg: dict) -> None:
    """Runs in a fresh process: load, warm up, decode once, save the video, print one JSON line."""
    import torch

    device = torch.device(cfg["device"])
    frames, (height, width) = cfg["frames"], cfg["size"]
    z = torch.randn(1, Z_DIM, 1 + (frames - 1) // 4, height // 8, width // 8, generator=torch.Generator().manual_seed(1))
    if cfg["lib"] == "kinema":
        import kinema
        from kinema.memory.vae_tiling import tiled_decode

        vae = kinema.load_vae(cfg["folder"], device=device)
        tile, overlap = cfg["tile"], cfg["overlap"]

        def decode(x):
            return vae.decode(x) if tile is None else tiled_decode(vae, x, tile, overlap)

        decode(z[:, :, :2, :4, :4].to(device))  # warm-up: kernels and workspaces that are not the frame's
    else:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(cfg["folder"]).to(device).eval()
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        z = z * std + mean  # diffusers decodes raw latents; Kinema normalised ones
        if cfg["tile"] is not None:
            vae.enable_tiling()

        def decode(x):
            return vae.decode(x).sample

        with torch.no_grad():
            decode(z[:, :, :2, :4, :4].to(device))
    z = z.to(device)
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux >= 4.0)
            base = status_bytes("VmRSS")
        start = time.perf_counter()
        video = decode(z)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else status_bytes("VmHWM")
    torch.save(video.float().cpu(), cfg["out"])
    print(json.dumps({"peak": peak - base, "seconds": seconds}))


def measure(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"{cfg['lib']} {cfg['name']} failed:\n{out.stderr[-3000:]}")
    return {**cfg, **json.loads(out.stdout.strip().splitlines()[-1])}


def psnr(a, b) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)  # peak-to-peak 2


def fit_size(dim: int, frames: int, size: tuple[int, int], budget: int) -> tuple[int, int]:
    """The largest size of the same aspect (multiples of 16) whose untiled decode the machine can hold."""
    import torch

    from kinema.memory.vae_tiling import decode_bytes
    from kinema.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(dim=dim, z_dim=Z_DIM)
    h, w = size
    while h > 64 and decode_bytes(vae, (1, Z_DIM, 1 + (frames - 1) // 4, h // 8, w // 8)) > budget:
        h, w = max(64, (h * 9 // 10) // 16 * 16), max(64, (w * 9 // 10) // 16 * 16)
    return h, w


def kinema_tile(dim: int, frames: int, size: tuple[int, int], overlap: int) -> tuple[int, int]:
    """What --vae_tile auto picks with a third of the untiled estimate free (of the part that grows with the frame)."""
    import torch

    from kinema.memory.vae_tiling import FIXED_BYTES, choose_tile, decode_bytes
    from kinema.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(dim=dim, z_dim=Z_DIM)
    shape = (1, Z_DIM, 1 + (frames - 1) // 4, size[0] // 8, size[1] // 8)
    budget = FIXED_BYTES + (decode_bytes(vae, shape) - FIXED_BYTES) // 3
    return choose_tile(lambda t: decode_bytes(vae, shape, t), shape[3], shape[4], budget, overlap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="width 16, 5 and 9 frames at 320x192, 8-latent-pixel overlap")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts (default 17 33)")
    ap.add_argument("--size", default=None, help="WxH in pixels (default 832x480)")
    ap.add_argument("--tile", default=None, help="Kinema's tile WxH in pixels (default: what auto picks at 1/3 of the memory)")
    ap.add_argument("--overlap", type=int, default=None, help="Kinema's overlap in latent pixels (default 16; 8 with --small)")
    ap.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="Kinema only")
    ap.add_argument("--json", action="store_true", help="print the results as JSON lines")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))

    import torch

    from kinema.memory.vae_tiling import OVERLAP, memory_budget

    dim = 16 if args.small else 96
    frames_list = args.frames or ([5, 9] if args.small else [17, 33])
    width, height = (int(v) for v in (args.size or ("320x192" if args.small else "832x480")).lower().split("x"))
    size = (height, width)
    overlap = args.overlap or (8 if args.small else OVERLAP)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kinema-vaebench-") as tmp:
        folder = Path(tmp) / "vae"
        write_checkpoint(folder, dim)
        for frames in frames_list:
            fitted = fit_size(dim, frames, size, memory_budget(args.device))
            if fitted != size:
                print(f"note: {size[1]}x{size[0]} untiled would not fit in this machine's memory; using {fitted[1]}x{fitted[0]}")
            if args.tile:
                tw, th = (int(v) // 8 for v in args.tile.lower().split("x"))
                tile = (th, tw)
            else:
                tile = kinema_tile(dim, frames, fitted, overlap)
            configs = [("kinema", "untiled", None), ("kinema", "tiled", tile)]
            if args.diffusers:
                configs += [("diffusers", "untiled", None), ("diffusers", "tiled", "default")]
            outs = {}
            for lib, name, t in configs:
                cfg = dict(lib=lib, name=name, tile=t, overlap=overlap, frames=frames, size=fitted, device=args.device,
                           folder=str(folder), out=str(Path(tmp) / f"{lib}-{name}-{frames}.pt"))
                r = measure(cfg)
                outs[(lib, name)] = torch.load(r["out"])
                rows.append(r)
            for r in rows[-len(configs):]:
                video = outs[(r["lib"], r["name"])]
                r["psnr"] = psnr(video, outs[(r["lib"], "untiled")])
                r["max_diff"] = (video - outs[(r["lib"], "untiled")]).abs().max().item()
                if args.diffusers:
                    r["psnr_vs_diffusers"] = psnr(video, outs[("diffusers", "untiled")])
                untiled = next(x for x in rows if x["lib"] == r["lib"] and x["name"] == "untiled" and x["frames"] == frames)
                r["peak_ratio"] = r["peak"] / untiled["peak"]
    if args.json:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k not in ("folder", "out")}))
        return
    mib = 2**20
    print(f"Wan2.1 VAE dim {dim}, random weights, decode on {args.device}, torch {torch.__version__}, "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')} threads; Kinema overlap {overlap * 8} px")
    head = (f"{'library':<10} {'mode':<8} {'frames':>6} {'size':>9} {'tile WxH':>9} {'peak MiB':>9} {'x untiled':>9} "
            f"{'time s':>7} {'PSNR dB':>8} {'max|diff|':>9}")
    if args.diffusers:
        head += f" {'vs diffusers dB':>15}"
    print(head)
    for r in rows:
        t = r["tile"]
        tile = "-" if t is None else ("256/192" if t == "default" else f"{t[1] * 8}x{t[0] * 8}")
        line = (f"{r['lib']:<10} {r['name']:<8} {r['frames']:>6} {r['size'][1]:>4}x{r['size'][0]:<4} {tile:>9} "
                f"{r['peak'] / mib:>9.0f} {r['peak_ratio']:>9.2f} {r['seconds']:>7.1f} {r['psnr']:>8.1f} {r['max_diff']:>9.2e}")
        if args.diffusers:
            line += f" {r['psnr_vs_diffusers']:>15.1f}"
        print(line)
    print("targets: Kinema tiled peak <= 0.35x untiled at 832x480, PSNR >= 40 dB vs untiled")


if __name__ == "__main__":
    main()
