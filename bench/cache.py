"""Step caching on the built-in model: DiT evaluations saved vs `kinema eval` metrics, per cache setting.

Runs `kinema eval`'s t2v, i2v and flf2v parts (kinema/toy/evaluate.py, the same
prompts, seeds and analyser) once with every step computed and once per cache
setting, counting the DiT block passes computed and skipped (one per guidance
branch and step), and prints a table: evaluations, how many times fewer, each
metric and its change against the uncached run. The issue-5 target: >= 1.8x fewer
DiT evaluations at <= 2 points lower on every percentage.

    OMP_NUM_THREADS=1 python bench/cache.py                 # the full eval (120 t2v, 40 i2v, 40 flf2v) per setting
    OMP_NUM_THREADS=1 python bench/cache.py --tiny          # 2 samples per task: a smoke test
    python bench/cache.py --settings off,teacache:0.1,magcache:0.1:2 --t2v 40 --json cache.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kinema  # noqa: E402
from kinema.sampling.cache import parse_cache  # noqa: E402
from kinema.toy.evaluate import EVAL_SEED, EvalSettings, evaluate  # noqa: E402

SETTINGS = ["off", "teacache:0.05", "teacache:0.1", "teacache:0.2", "magcache:0.05:2", "magcache:0.1:2", "magcache:0.2:3"]
TARGET_FEWER, TARGET_DROP = 1.8, 2.0


class Counting:
    """A pipeline whose every call adds its DiT block passes to `counts` (evaluate() passes the cache setting)."""

    def __init__(self, pipe, counts: dict):
        self.pipe, self.counts, self.models, self.runtime = pipe, counts, pipe.models, pipe.runtime

    def __call__(self, *args, **kwargs):
        out = self.pipe(*args, **kwargs)
        if out.cache is not None:
            self.counts["computed"] += out.cache.computed
            self.counts["skipped"] += out.cache.skipped
        else:
            s = out.settings
            self.counts["computed"] += s["steps"] * (1 if s["guide_scale"] == 1.0 else 2)  # every step, every branch
        return out


def table(rows: dict[str, dict]) -> str:
    base = rows.get("off")
    metrics = [k for k in next(iter(rows.values()))["metrics"] if k != "seconds"]
    head = ["setting", "computed", "skipped", "fewer"] + metrics + (["worst % drop", "target"] if base else []) + ["s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        c, k, m = r["computed"], r["skipped"], r["metrics"]
        fewer = (c + k) / max(c, 1)
        cells = [name, str(c), str(k), f"{fewer:.2f}x"]
        for key in metrics:
            delta = f" ({m[key] - base['metrics'][key]:+.1f})" if base and name != "off" else ""
            cells.append(f"{m[key]:.1f}{delta}")
        if base:
            drops = [base["metrics"][key] - m[key] for key in metrics if key.endswith("%")]
            worst = max(drops) if drops else 0.0
            ok = fewer >= TARGET_FEWER and worst <= TARGET_DROP
            cells += [f"{worst:.1f}", "-" if name == "off" else ("pass" if ok else "fail")]
        cells.append(f"{m['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated cache settings; off = every step")
    p.add_argument("--ckpt_dir", default=None, help="model folder (default: the built-in model)")
    p.add_argument("--t2v", type=int, default=120)
    p.add_argument("--i2v", type=int, default=40)
    p.add_argument("--flf2v", type=int, default=40)
    p.add_argument("--tiny", action="store_true", help="2 samples per task")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        parse_cache(s, "--settings")  # fail before loading anything
    if args.tiny:
        args.t2v = args.i2v = args.flf2v = 2
    pipe = kinema.Pipeline.load(args.ckpt_dir)  # None: the built-in model
    path = pipe.models.source
    rows = {}
    for setting in settings:
        counts = {"computed": 0, "skipped": 0}
        s = EvalSettings(t2v=args.t2v, i2v=args.i2v, flf2v=args.flf2v, vae=0, lora=0, seed=EVAL_SEED,
                         cache=None if setting == "off" else setting, only=("t2v", "i2v", "flf2v"))
        t0 = time.perf_counter()
        metrics = evaluate(Counting(pipe, counts), s, show_progress=False)
        rows[setting] = {**counts, "metrics": metrics}
        print(f"{setting}: {counts['computed']} computed, {counts['skipped']} skipped ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    print(f"Step caching on {path} (t2v {args.t2v}, i2v {args.i2v}, flf2v {args.flf2v} samples per setting; "
          f"target >= {TARGET_FEWER}x fewer DiT evaluations, <= {TARGET_DROP} points lower on every %)")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
