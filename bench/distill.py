"""The built-in model's 4-step distillation LoRA against its own 20-step guided sampling.

Compares, on the t2v eval prompts (`kinema eval`'s world seed, never trained on):
- the analyser's percentages (background, colour, direction, shape, present+single) of the base model at its
  defaults (20 UniPC steps, guidance 4: 40 DiT passes, batched) and of the base with the LoRA at the settings
  the LoRA carries (4 flowmatch_distill steps, guidance 1: 4 DiT passes), and the largest drop;
- sampling time per video: the sampling loop alone (the DiT steps, timed from the step callbacks), median over
  the prompts, both warmed, and the speed-up; beside it the whole call (decode=False: prompt encoding and
  the image condition, which both sides pay once, included).

    .venv/bin/python bench/distill.py [--t2v 120] [--timed 10] [--lora builtin:distill-4step]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import kinema
from kinema.toy.evaluate import EVAL_SEED, EvalSettings, _specs, eval_t2v


def sampling_seconds(pipe, n: int) -> tuple[float, float]:
    """Median seconds per video of the whole call (prompt encoding, condition, the loop; decode=False) and of
    the sampling loop alone (the DiT steps: from the first step's end to the last's, scaled by steps / (steps - 1))."""
    calls, loops = [], []
    pipe("a red circle moving right on a black background", seed=0, decode=False, progress=False)  # warm-up
    for i, spec in enumerate(_specs(EVAL_SEED, n, 64, 64)):
        ends = []
        t0 = time.perf_counter()
        pipe(spec.caption, seed=EVAL_SEED + i, batched_cfg=True, decode=False, progress=False,
             callback=lambda info: ends.append(time.perf_counter()))
        calls.append(time.perf_counter() - t0)
        loops.append((ends[-1] - ends[0]) * len(ends) / (len(ends) - 1))
    return float(np.median(calls)), float(np.median(loops))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t2v", type=int, default=120)
    p.add_argument("--timed", type=int, default=10)
    p.add_argument("--lora", default="builtin:distill-4step")
    p.add_argument("--timing_only", action="store_true", help="skip the eval percentages")
    args = p.parse_args()
    base, fast = kinema.Pipeline.load(), kinema.Pipeline.load(loras=[args.lora])
    s = fast.prepare("x").settings
    print(f"LoRA sampling: {s.solver}, {s.steps} steps, guidance {s.guide_scale}, shift {s.shift}")
    results = {}
    for name, pipe in (("20-step guided", base), ("4-step LoRA", fast)):
        t0 = time.perf_counter()
        results[name] = {} if args.timing_only else eval_t2v(pipe, EvalSettings(t2v=args.t2v))[0]
        results[name]["eval s"] = time.perf_counter() - t0
        results[name]["call s / video"], results[name]["sampling s / video"] = sampling_seconds(pipe, args.timed)
    keys = list(results["20-step guided"])
    print(f"{'':30} {'20-step guided':>15} {'4-step LoRA':>12}")
    for k in keys:
        print(f"{k:30} {results['20-step guided'][k]:15.2f} {results['4-step LoRA'][k]:12.2f}")
    pct = [k for k in keys if k.endswith("%")]
    drop = max((results["20-step guided"][k] - results["4-step LoRA"][k] for k in pct), default=float("nan"))
    speed = results["20-step guided"]["sampling s / video"] / results["4-step LoRA"]["sampling s / video"]
    whole = results["20-step guided"]["call s / video"] / results["4-step LoRA"]["call s / video"]
    print(f"largest drop {drop:.1f} points (bound 5); sampling {speed:.1f}x faster (bound 4x), the whole call "
          f"(prompt encoding and the condition too) {whole:.1f}x")


if __name__ == "__main__":
    main()
