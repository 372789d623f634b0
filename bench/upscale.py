"""The learned upscaler against bicubic on held-out world clips, and `upscale=2` on the built-in model.

Compares, per x2 stage and for the x4 cascade, on clips the upscaler never trained on (a world seed of its
own), rendered natively at 64, 128 and 256 pixels (the ground truth at each size):
- PSNR of the learned result and of bicubic against the truth (8-bit, dB), and the gain;
- edge sharpness: mean gradient magnitude where the truth has an edge, over the truth's (1 = as sharp);
- temporal error: mean |frame-to-frame change - the truth's| in 8-bit levels (lower is steadier);
- speed: frames per second of the upscaler on this machine (torch's threads), a 17-frame clip at a time.
Then `--generate N`: N t2v prompts of the eval world through the built-in model with `upscale=2`, the
output size and the share the analyser still reads right (background, colour, direction, shape).

    .venv/bin/python bench/upscale.py [--clips 16] [--generate 12] [--upscaler PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from kinema.toy import world
from kinema.train.upscaler import upscale_metrics
from kinema.upscale import load_upscaler, upscale_video

SEED = 4_242_424  # clips no upscaler stage trained on


def render(spec, size: int, frames: int = 17) -> torch.Tensor:
    return world.to_tensor(world.render(spec, size, size, frames))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--generate", type=int, default=12)
    p.add_argument("--upscaler", default=None, help="a Kinema upscaler folder (default: the built-in one)")
    args = p.parse_args()
    up2, up4 = load_upscaler(args.upscaler, 2), load_upscaler(args.upscaler, 4)
    colors = tuple(world.COLORS) + tuple(world.EXTRA_COLORS)
    specs = [world.random_spec(world.clip_rng(SEED, i), 64, 64, colors=colors) for i in range(args.clips)]
    rows = {"x2 (64 -> 128)": [], "x2 stage 2 (128 -> 256)": [], "x4 (64 -> 256)": []}
    with torch.no_grad():
        for spec in specs:
            v64, v128, v256 = render(spec, 64), render(spec, 128), render(spec, 256)
            rows["x2 (64 -> 128)"].append(upscale_metrics(up2.model, v64, v128))
            rows["x2 stage 2 (128 -> 256)"].append(upscale_metrics(up4.model.stages[1], v128, v256))
            rows["x4 (64 -> 256)"].append(upscale_metrics(up4.model, v64, v256))
    print(f"{'':26} {'PSNR learned':>12} {'bicubic':>8} {'gain':>6} {'sharpness':>10} {'bicubic':>8} "
          f"{'temporal':>9} {'bicubic':>8}")
    for name, r in rows.items():
        m = {k: float(np.mean([x[k] for x in r])) for k in r[0]}
        print(f"{name:26} {m['learned_psnr']:12.2f} {m['bicubic_psnr']:8.2f} {m['learned_psnr'] - m['bicubic_psnr']:+6.2f} "
              f"{m['learned_sharpness']:10.3f} {m['bicubic_sharpness']:8.3f} {m['learned_temporal']:9.3f} "
              f"{m['bicubic_temporal']:8.3f}")
    clip = render(specs[0], 64)
    for name, up in (("x2", up2), ("x4", up4)):
        upscale_video(up, clip)  # warm-up
        t0 = time.perf_counter()
        upscale_video(up, clip)
        print(f"{name}: {clip.shape[1] / (time.perf_counter() - t0):.1f} frames/s (64x64 in, {torch.get_num_threads()} "
              "threads)")
    if args.generate:
        import kinema
        from kinema.toy.analyse import analyse
        from kinema.toy.evaluate import EVAL_SEED, _specs, to_uint8

        pipe = kinema.Pipeline.load()
        hits = {k: [] for k in ("background", "color", "direction", "shape")}
        size = None
        for i, spec in enumerate(_specs(EVAL_SEED, args.generate, 64, 64)):
            video = pipe(spec.caption, seed=EVAL_SEED + i, upscale=2, upscaler=args.upscaler, progress=False).video
            size = tuple(video.shape[2:])
            for k, ok in analyse(to_uint8(video)).matches(spec).items():
                hits[k].append(ok)
        print(f"generate --upscale 2: {size[1]}x{size[0]} frames; analyser "
              + ", ".join(f"{k} {100 * np.mean(v):.0f}%" for k, v in hits.items()))


if __name__ == "__main__":
    main()
