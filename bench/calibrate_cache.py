"""Calibrate step caching (TeaCache coefficients, MagCache magnitude ratios) for a model.

Generates over a set of prompts with every step computed and records, per
sampling step and guidance branch: the relative L1 change of the time-modulation
input (`e` and `e0`), the relative L1 change of the model output, and the mean
per-token ratio of the blocks' residual magnitudes |r_t| / |r_t-1|. Then fits
- TeaCache: a degree-4 polynomial from input change to output change
  (np.polyfit over all steps, branches and prompts, as TeaCache's calibration does);
- MagCache: the mean magnitude ratio of each step and branch (as MagCache's
  calibration does; its step 0 is 1.0, a step with no predecessor);
and writes them as one entry of a calibration file (kinema/sampling/cache.py reads it).

    # the built-in model (t2v, i2v and flf2v prompts from the synthetic world) -> the shipped table
    OMP_NUM_THREADS=1 python bench/calibrate_cache.py
    OMP_NUM_THREADS=1 python bench/calibrate_cache.py --prompts 3 --dry_run     # a quick check, writes nothing
    # a real checkpoint -> CKPT/cache_calibration.json, which `kinema generate --ckpt_dir CKPT --cache ...` reads
    python bench/calibrate_cache.py --ckpt_dir Wan2.1-T2V-1.3B --task t2v-1.3B --size 832*480 --frame_num 81 \\
        --steps 50 --prompts_file prompts.txt --dtype bf16

Rerun it whenever the model's weights change: the entry records a fingerprint of
the weights, and the cache warns when it is used with other weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kinema  # noqa: E402
from kinema.sampling.cache import (  # noqa: E402
    CALIBRATION_FILE, MAGCACHE_RETENTION, TABLE, StepCache, fingerprint, read_calibrations, write_calibrations,
)

CALIBRATION_SEED = 90210  # not the evaluation world's seed, so `kinema eval` is not measured on its own calibration
BUILTIN_NAME = "kinema-builtin"
DEFAULT_PROMPTS = [
    "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage.",
    "A stylish woman walks down a Tokyo street filled with warm glowing neon and animated city signage.",
    "A drone shot of waves crashing against rugged cliffs along Big Sur's Garay Point beach at sunset.",
    "A red panda eating bamboo in a misty forest, close-up, soft morning light.",
]


def builtin_jobs(models, n: int, tasks: list[str]) -> list[dict]:
    """Pipeline call keyword sets: synthetic-world prompts, the i2v / flf2v frames rendered from the same world."""
    from kinema.toy import world

    d = models.info.sample_defaults
    w, h = (int(v) for v in d.get("size", "64*64").split("*"))
    f = int(d.get("frame_num", 17))
    jobs = []
    for i in range(n):
        spec = world.random_spec(world.clip_rng(CALIBRATION_SEED, i), w, h)
        task = tasks[i % len(tasks)]
        job = {"task": task, "prompt": spec.caption, "seed": CALIBRATION_SEED + i}
        if task in ("i2v", "flf2v"):
            clip = world.render(spec, w, h, f)
            first, last = (world.to_tensor(clip[j : j + 1])[:, 0] for j in (0, f - 1))
            job |= {"image": first} if task == "i2v" else {"first_frame": first, "last_frame": last}
        jobs.append(job)
    return jobs


def checkpoint_jobs(args) -> list[dict]:
    prompts = Path(args.prompts_file).read_text().splitlines() if args.prompts_file else DEFAULT_PROMPTS
    prompts = [p.strip() for p in prompts if p.strip()][: args.prompts or None]
    image = None
    if args.image:
        from kinema.media import read_image, to_model_range

        image = to_model_range(read_image(args.image))[:, 0]
    size = tuple(int(v) for v in args.size.split("*")) if args.size else None
    jobs = []
    for i, prompt in enumerate(prompts):
        job = {"task": args.task, "prompt": prompt, "seed": CALIBRATION_SEED + i, "size": size, "frame_num": args.frame_num}
        if image is not None:
            job["image"] = image
        jobs.append(job)
    return jobs


def fit(records: list[dict], teacache_input: str, degree: int = 4) -> tuple[dict, dict, dict]:
    """records: one {branch: {e, e0, out, mag}} per run -> (teacache part, magcache part, fit report)."""
    x = np.concatenate([np.asarray(r[b][teacache_input]) for r in records for b in r])
    y = np.concatenate([np.asarray(r[b]["out"]) for r in records for b in r])
    coefficients = np.polyfit(x, y, degree)
    pred = np.polyval(coefficients, x)
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    branches = sorted({b for r in records for b in r})
    ratios, std = {}, {}
    for b in branches:
        mags = np.array([r[b]["mag"] for r in records if b in r])  # [runs, steps - 1]
        ratios[b] = [1.0] + [round(float(v), 5) for v in mags.mean(0)]
        std[b] = [0.0] + [round(float(v), 5) for v in mags.std(0)]
    report = {"teacache_points": int(len(x)), "teacache_r2": round(float(r2), 4),
              "input_change": [round(float(v), 5) for v in np.asarray(records[0][branches[0]][teacache_input])],
              "output_change_mean": [round(float(v), 5) for v in np.mean([r[branches[0]]["out"] for r in records], 0)]}
    tea = {"input": teacache_input, "coefficients": [float(c) for c in coefficients], "fit_r2": report["teacache_r2"]}
    mag = {"steps": len(ratios[branches[0]]), "retention": MAGCACHE_RETENTION, "ratios": ratios, "std": std}
    return tea, mag, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default=None, help="model folder (default: the built-in model)")
    p.add_argument("--task", default="t2v", help="checkpoint runs: the task of every prompt (t2v-1.3B, i2v-14B, ...)")
    p.add_argument("--tasks", default="t2v,i2v,flf2v", help="built-in runs: tasks taken in turn")
    p.add_argument("--prompts", type=int, default=None, help="how many prompts (default: 24 for the built-in, all given otherwise)")
    p.add_argument("--prompts_file", default=None, help="checkpoint runs: one prompt a line")
    p.add_argument("--image", default=None, help="checkpoint i2v runs: the first frame for every prompt")
    p.add_argument("--size", default=None, help="W*H (default: the model's / the task's)")
    p.add_argument("--frame_num", type=int, default=None, help="frames (default: the model's / the task's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's / the task's)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="DiT weights")
    p.add_argument("--teacache_input", default="e", choices=["e", "e0"],
                   help="TeaCache's modulation input: e, the time embedding (TeaCache4Wan2.1's default), or e0, its projection")
    p.add_argument("--first_steps", type=int, default=1, help="TeaCache: first steps always computed (the reference: 1; 5 with e0)")
    p.add_argument("--last_steps", type=int, default=1, help="TeaCache: last steps always computed (the reference: 1; 0 with e0)")
    p.add_argument("--name", default=None, help=f"entry name (default: {BUILTIN_NAME}, or the checkpoint folder's name)")
    p.add_argument("--out", default=None, help=f"calibration file to update (default: {TABLE.name} in kinema/sampling/ for the "
                   f"built-in model, CKPT/{CALIBRATION_FILE} for a checkpoint)")
    p.add_argument("--dry_run", action="store_true", help="fit and print, write nothing")
    args = p.parse_args(argv)

    builtin = args.ckpt_dir is None
    pipe = kinema.Pipeline.load(args.ckpt_dir, dtype=args.dtype, offload=False, attention="sdpa")  # None: built-in
    models = pipe.models
    path = Path(args.ckpt_dir) if args.ckpt_dir else None
    jobs = builtin_jobs(models, args.prompts or 24, args.tasks.split(",")) if builtin else checkpoint_jobs(args)

    cache, records, t0 = StepCache("record"), [], time.perf_counter()
    for i, job in enumerate(jobs):
        out = pipe(job.pop("prompt"), steps=args.steps, cache=cache, decode=False, batched_cfg=True, progress=False, **job)
        records.append(out.cache.records)
        print(f"[{i + 1}/{len(jobs)}] {out.settings['task']}: {out.settings['prompt'][:60]!r} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    s = out.settings
    tea, mag, report = fit(records, args.teacache_input)
    tea |= {"first_steps": args.first_steps, "last_steps": args.last_steps}
    cfg = models.dit.config
    entry = {
        "match": {"model_type": cfg.model_type, "in_dim": cfg.in_dim, "dim": cfg.dim, "num_layers": cfg.num_layers},
        "fingerprint": fingerprint(models.dit),
        "area": s["width"] * s["height"],
        "calibrated": {"runs": len(jobs), "tasks": sorted({j.get("task", "t2v") for j in jobs}), "steps": s["steps"],
                       "shift": s["shift"], "guide_scale": s["guide_scale"], "solver": s["solver"],
                       "size": f"{s['width']}*{s['height']}", "frame_num": s["frame_num"], "date": date.today().isoformat(),
                       "by": "bench/calibrate_cache.py"},
        "teacache": tea,
        "magcache": mag,
    }
    print(f"TeaCache: input {tea['input']}, coefficients {np.array2string(np.array(tea['coefficients']), precision=6)}, "
          f"R^2 {tea['fit_r2']} over {report['teacache_points']} points")
    print(f"  input change per step (first run): {report['input_change']}")
    print(f"  output change per step (mean):     {report['output_change_mean']}")
    for b, r in mag["ratios"].items():
        print(f"MagCache {b} ratios: {r}")
    if args.dry_run:
        print("(dry run: nothing written)")
        return 0
    name = args.name or (BUILTIN_NAME if builtin else path.resolve().name)
    out_path = Path(args.out) if args.out else (TABLE if builtin else path / CALIBRATION_FILE)
    data = read_calibrations(out_path) if out_path.exists() else {"about": "Step-cache calibration (docs/caching.md).", "models": {}}
    data["models"][name] = entry
    write_calibrations(data, out_path)
    print(f"wrote {name!r} to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
