"""VAE decode: peak memory and time, Kinema's WanVAE vs diffusers' AutoencoderKLWan, untiled and tiled.

A Wan2.1 VAE (dim 96, or 16 with --small) with random O(1) weights is written once in the diffusers
layout; Kinema loads it with `load_vae` and diffusers with `from_pretrained`, so both decode the same
weights from the same latents. Every row runs in a fresh process (one small untiled warm-up decode
each, the same for both libraries), so each peak is its own: on CPU the process's resident high-water
mark above what it held just before the decode, on CUDA torch.cuda.max_memory_allocated above the
memory allocated before. Three pairs per frame count, the library that runs first alternating:
- untiled vs untiled;
- matched: both tiled with the same tile and overlap in pixels (default diffusers' own, 256x256 with
  a 64-pixel overlap: diffusers' tile_sample_min = 256, tile_sample_stride = 256 - 64; Kinema's
  TiledVAE(vae, (256, 256), overlap=64 // 8)). The layouts still differ: Kinema spreads as few tiles
  as cover the frame evenly (neighbours may share more than the overlap), diffusers steps by the
  stride to the edge (the last tile of a row may be partial); the `tiles` column counts them;
- own: each at its own default: Kinema's tile what `--vae_tile auto` picks with a third of the
  untiled estimate free, its 128-pixel overlap (64 with --small); diffusers' enable_tiling()
  (256x256, stride 192). When the matched tile is diffusers' default, its matched row is also its own.
PSNR is against the same library's untiled output (range [-1, 1]); "vs diffusers" against diffusers
untiled. Ratios are Kinema / diffusers per pair.

    python bench/vae_decode.py --frames 17 --size 832x480   # full width (~35 min on 2 CPU cores, ~9 GB RAM)
    python bench/vae_decode.py --device cuda                 # on a GPU
    python bench/vae_decode.py --frames 5 17 --modes untiled # the untiled pair only (the decode time target)
    python bench/vae_decode.py --small                       # width 16, 5 frames at 320x192 (a couple of minutes)
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
RATIO = 8  # pixels per latent pixel


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
    """Runs in a fresh process: load, warm up, decode once, save the video, print one JSON line.

    cfg["tile"]: None (untiled), "default" (diffusers' enable_tiling()) or [width, height] in pixels, with
    cfg["overlap"] in pixels. Reports the tile count and `used`: [tile W, tile H, the least overlap neighbours
    share across W and across H (pixels; 0 with one tile on that axis)], None when untiled."""
    import torch

    device = torch.device(cfg["device"])
    frames, (height, width) = cfg["frames"], cfg["size"]
    z = torch.randn(1, Z_DIM, 1 + (frames - 1) // 4, height // RATIO, width // RATIO, generator=torch.Generator().manual_seed(1))
    h, w = z.shape[3], z.shape[4]
    tile, overlap = cfg["tile"], cfg["overlap"]
    if cfg["lib"] == "kinema":
        import kinema
        from kinema.memory.vae_tiling import TiledVAE, spans, tile_overlap

        vae = TiledVAE(kinema.load_vae(cfg["folder"], device=device), "off" if tile is None else tuple(tile),
                       overlap=(overlap or 0) // RATIO)
        decode = vae.decode
        plan = vae.plan("decode", z.shape)  # (th, tw) latent pixels, None = untiled
        tiles, used = 1, None
        if plan is not None:
            o = tile_overlap(plan, vae.overlap)
            rows, cols = spans(h, plan[0], o), spans(w, plan[1], o)
            shared = [min((a[1] - b[0] for a, b in zip(p, p[1:])), default=0) * RATIO for p in (cols, rows)]
            tiles, used = len(rows) * len(cols), [*tile, *shared]
    else:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(cfg["folder"]).to(device).eval()
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        z = z * std + mean  # diffusers decodes raw latents; Kinema normalised ones
        if tile == "default":
            vae.enable_tiling()
        elif tile is not None:
            vae.enable_tiling(tile_sample_min_width=tile[0], tile_sample_min_height=tile[1],
                              tile_sample_stride_width=tile[0] - overlap, tile_sample_stride_height=tile[1] - overlap)
        tiles, used = 1, None
        if tile is not None:
            min_w, min_h = vae.tile_sample_min_width, vae.tile_sample_min_height
            stride_w, stride_h = vae.tile_sample_stride_width, vae.tile_sample_stride_height
            if w > min_w // RATIO or h > min_h // RATIO:  # when AutoencoderKLWan._decode tiles
                n_w, n_h = len(range(0, w, stride_w // RATIO)), len(range(0, h, stride_h // RATIO))
                tiles = n_w * n_h
                used = [min_w, min_h, (min_w - stride_w) * (n_w > 1), (min_h - stride_h) * (n_h > 1)]

        def decode(x):
            return vae.decode(x).sample

    with torch.no_grad():
        decode(z[:, :, :2, :4, :4].to(device))  # warm-up (untiled at this size): kernels and workspaces
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
    print(json.dumps({"peak": peak - base, "seconds": seconds, "tiles": tiles, "used": used}))


def measure(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        raise SystemExit(f"{cfg['lib']} {cfg['mode']} failed:\n{out.stderr[-3000:]}")
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


def kinema_tile(dim: int, frames: int, size: tuple[int, int], overlap: int) -> tuple[int, int] | None:
    """What --vae_tile auto picks with a third of the untiled estimate free (of the part that grows with the frame):
    (height, width) in latent pixels."""
    import torch

    from kinema.memory.vae_tiling import FIXED_BYTES, choose_tile, decode_bytes
    from kinema.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(dim=dim, z_dim=Z_DIM)
    shape = (1, Z_DIM, 1 + (frames - 1) // 4, size[0] // 8, size[1] // 8)
    budget = FIXED_BYTES + (decode_bytes(vae, shape) - FIXED_BYTES) // 3
    return choose_tile(lambda t: decode_bytes(vae, shape, t), shape[3], shape[4], budget, overlap)


def pixels(text: str, what: str) -> tuple[int, int]:
    """'WxH' -> (W, H), both multiples of the VAE's 8 pixels per latent pixel."""
    w, h = (int(v) for v in text.lower().split("x"))
    if w % RATIO or h % RATIO:
        raise SystemExit(f"{what} {text}: width and height must be multiples of {RATIO} pixels")
    return w, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="width 16, 5 frames at 320x192, Kinema's own overlap 64 px")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts (default 17 33; 5 with --small)")
    ap.add_argument("--size", default=None, help="WxH in pixels (default 832x480; 320x192 with --small)")
    ap.add_argument("--match_tile", default="256x256", help="the matched pair's tile WxH in pixels (default diffusers' own)")
    ap.add_argument("--match_overlap", type=int, default=64, help="the matched pair's overlap in pixels (default diffusers' own)")
    ap.add_argument("--tile", default=None, help="Kinema's own tile WxH in pixels (default: auto's pick at 1/3 of the memory)")
    ap.add_argument("--overlap", type=int, default=None,
                    help="Kinema's own overlap in latent pixels (default its 16 = 128 px; 8 with --small)")
    ap.add_argument("--modes", nargs="+", default=["untiled", "matched", "own"], choices=["untiled", "matched", "own"],
                    help="which pairs to run (untiled always runs: the other rows are measured against it)")
    ap.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="Kinema only")
    ap.add_argument("--json", action="store_true", help="print the results as JSON lines")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))

    import torch

    from kinema.memory.vae_tiling import OVERLAP, memory_budget

    dim = 16 if args.small else 96
    frames_list = args.frames or ([5] if args.small else [17, 33])
    width, height = pixels(args.size or ("320x192" if args.small else "832x480"), "--size")
    size = (height, width)
    own_overlap = args.overlap or (8 if args.small else OVERLAP)  # latent pixels
    match_tile, match_overlap = list(pixels(args.match_tile, "--match_tile")), args.match_overlap
    if match_overlap % RATIO or not 0 <= match_overlap < min(match_tile):
        raise SystemExit(f"--match_overlap {match_overlap}: a multiple of {RATIO} pixels below the tile's side is needed")
    modes = ["untiled", *(m for m in ("matched", "own") if m in args.modes)]
    # AutoencoderKLWan's tile_sample_* defaults: its matched row is also its own
    matched_is_default = match_tile == [256, 256] and match_overlap == 64 and "matched" in modes
    rows = []
    with tempfile.TemporaryDirectory(prefix="kinema-vaebench-") as tmp:
        folder = Path(tmp) / "vae"
        write_checkpoint(folder, dim)
        for n, frames in enumerate(frames_list):
            fitted = fit_size(dim, frames, size, memory_budget(args.device))
            if fitted != size:
                print(f"note: {size[1]}x{size[0]} untiled would not fit in this machine's memory; using {fitted[1]}x{fitted[0]}")
            if args.tile:
                own = list(pixels(args.tile, "--tile"))
            else:
                t = kinema_tile(dim, frames, fitted, own_overlap)
                own = None if t is None else [t[1] * RATIO, t[0] * RATIO]
            pairs = [  # (mode, Kinema's (tile, overlap px), diffusers' (tile, overlap px) or None: not run)
                ("untiled", (None, None), (None, None)),
                ("matched", (match_tile, match_overlap), (match_tile, match_overlap)),
                ("own", (own, own_overlap * RATIO), None if matched_is_default else ("default", None)),
            ]
            pairs = [p for p in pairs if p[0] in modes]
            outs, start = {}, n % 2  # which library starts alternates from pair to pair and frame count to frame count
            for i, (mode, k_tile, d_tile) in enumerate(pairs):
                sides = [("kinema", k_tile)] + ([("diffusers", d_tile)] if args.diffusers and d_tile else [])
                if (i + start) % 2:
                    sides.reverse()
                for lib, (tile, overlap) in sides:
                    cfg = dict(lib=lib, mode=mode, tile=tile, overlap=overlap, frames=frames, size=fitted, device=args.device,
                               folder=str(folder), out=str(Path(tmp) / f"{lib}-{mode}-{frames}.pt"))
                    r = measure(cfg)
                    r["first"] = sides[0][0]
                    outs[(lib, mode)] = torch.load(r["out"])
                    rows.append(r)
            if args.diffusers and matched_is_default and "own" in modes:
                outs[("diffusers", "own")] = outs[("diffusers", "matched")]
            for r in (x for x in rows if x["frames"] == frames):
                video, untiled = outs[(r["lib"], r["mode"])], outs[(r["lib"], "untiled")]
                r["psnr"], r["max_diff"] = psnr(video, untiled), (video - untiled).abs().max().item()
                if args.diffusers:
                    r["psnr_vs_diffusers"] = psnr(video, outs[("diffusers", "untiled")])
                base = next(x for x in rows if x["lib"] == r["lib"] and x["mode"] == "untiled" and x["frames"] == frames)
                r["peak_ratio"] = r["peak"] / base["peak"]
    if args.json:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k not in ("folder", "out")}))
        return
    print(f"Wan2.1 VAE dim {dim}, random weights, decode on {args.device}, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    kinema_own = f"--tile {args.tile}" if args.tile else "auto's pick at 1/3 of the untiled memory"
    print(f"matched: both at a {match_tile[0]}x{match_tile[1]} tile, {match_overlap}-px overlap"
          f"{' (diffusers default)' if matched_is_default else ''}; own: Kinema {kinema_own}, {own_overlap * RATIO}-px overlap"
          f"{' (its default is 128)' if own_overlap != OVERLAP else ''}, diffusers enable_tiling() defaults "
          f"(256x256, stride 192){' = its matched row' if matched_is_default else ''}")
    print_table(rows, args.diffusers)


def print_table(rows: list[dict], with_diffusers: bool) -> None:
    mib = 2**20
    head = (f"{'library':<10} {'mode':<8} {'first':<9} {'frames':>6} {'size':>9} {'tile WxH':>9} {'overlap':>9} {'tiles':>5} "
            f"{'peak MiB':>9} {'x untiled':>9} {'time s':>7} {'PSNR dB':>8} {'max|diff|':>9}")
    if with_diffusers:
        head += f" {'vs diffusers dB':>15}"
    print(head)
    for r in rows:
        u = r["used"]
        tile, overlap = ("-", "-") if u is None else (f"{u[0]}x{u[1]}", "x".join(str(v) if v else "-" for v in u[2:]))
        line = (f"{r['lib']:<10} {r['mode']:<8} {r['first']:<9} {r['frames']:>6} {r['size'][1]:>4}x{r['size'][0]:<4} {tile:>9} "
                f"{overlap:>9} {r['tiles']:>5} {r['peak'] / mib:>9.0f} {r['peak_ratio']:>9.2f} {r['seconds']:>7.1f} "
                f"{r['psnr']:>8.1f} {r['max_diff']:>9.2e}")
        if with_diffusers:
            line += f" {r['psnr_vs_diffusers']:>15.1f}"
        print(line)
    if with_diffusers:
        print()
        def find(frames, lib, mode):
            return next((r for r in rows if (r["frames"], r["lib"], r["mode"]) == (frames, lib, mode)), None)

        for frames in dict.fromkeys(r["frames"] for r in rows):
            for mode in ("untiled", "matched", "own"):
                k, d = find(frames, "kinema", mode), find(frames, "diffusers", mode)
                if k is None:
                    continue
                note = "" if d else " (diffusers' own default is its matched run)"
                d = d or find(frames, "diffusers", "matched")
                print(f"{frames} frames, {mode}: Kinema {k['seconds'] / d['seconds']:.2f}x of diffusers' time, "
                      f"{k['peak'] / d['peak']:.2f}x of its peak{note}")
    print("targets: Kinema tiled peak <= 0.35x untiled at 832x480, PSNR >= 40 dB vs untiled")


if __name__ == "__main__":
    main()
