"""Short-clip flicker of built-in-type models, side by side: how steady the object's colour stays in plain t2v clips.

For the eval world's prompts (the eval seed, never trained on) each model generates a 17-frame t2v clip with its
own sampling defaults and the same seeds; the world analyser gives each frame's object colour (the median of its
interior, as `kinema eval` reads colour). Per clip: the largest deviation of a frame's object colour from the clip's
median, in 0-255 levels (any channel). Printed per model: the clips with a frame more than `--bound` levels off
(issue 17's object-colour bound is 6), the mean and largest of the per-clip deviations, and the t2v analyser's
direction and shape rates on the same clips (a steadier model must not lose them). The first model named is the
baseline the others are compared with, clip by clip.

    .venv/bin/python bench/flicker.py [--prompts 24] [--ckpt_dir DIR ...]   # default: the built-in model alone
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import kinema
from kinema.toy import world
from kinema.toy.analyse import analyse
from kinema.toy.evaluate import _specs, to_uint8


def clip_figures(frames: np.ndarray, spec) -> dict:
    a = analyse(frames)
    colors = np.array([c for c in a.frame_colors if c is not None], dtype=np.float64)
    dev = float(np.abs(colors - np.median(colors, 0)).max()) if len(colors) else float("nan")
    return dict(dev=dev, direction=a.direction == spec.direction, shape=a.shape == spec.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seed", type=int, default=20260)
    p.add_argument("--bound", type=float, default=6.0)
    p.add_argument("--ckpt_dir", action="append", default=None,
                   help="a model folder; repeat for several (default: the built-in model)")
    args = p.parse_args()
    dirs = args.ckpt_dir or [None]
    specs = list(_specs(args.seed, args.prompts, 64, 64, tuple(world.COLORS)))
    results = {}
    for d in dirs:
        pipe = kinema.Pipeline.load(d)
        t0 = time.perf_counter()
        rows = [clip_figures(to_uint8(pipe(s.caption, frame_num=17, seed=args.seed + i, progress=False).video), s)
                for i, s in enumerate(specs)]
        name = d or "built-in"
        results[name] = rows
        devs = np.array([r["dev"] for r in rows])
        direction, shape = (100 * np.mean([r[k] for r in rows]) for k in ("direction", "shape"))
        print(f"{name}: {int((devs > args.bound).sum())} / {len(rows)} clips with a frame > {args.bound:g} levels off; "
              f"per-clip largest deviation mean {np.nanmean(devs):.2f}, max {np.nanmax(devs):.1f}; direction "
              f"{direction:.1f}%, shape {shape:.1f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
    names = list(results)
    for other in names[1:]:
        a, b = (np.array([r["dev"] for r in results[n]]) for n in (names[0], other))
        print(f"{other} against {names[0]}: steadier on {int((b < a).sum())} clips, less steady on "
              f"{int((b > a).sum())}, mean change {np.nanmean(b - a):+.2f} levels")


if __name__ == "__main__":
    main()
