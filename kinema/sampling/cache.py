"""Step caching: skip the DiT's blocks on steps where their output would barely change.

Between neighbouring sampling steps the transformer blocks' residual (blocks
output minus blocks input) changes little over most of the trajectory. A cache
keeps the last computed residual of each guidance branch and, on steps a rule
judges safe, adds it to the new block input instead of running the blocks. The
embedding and the head still run, so a skipped step costs a few percent of a full one.

Two rules, each deciding per branch (cond and uncond are separate streams, as in
the references, so batched and two-pass guidance skip the same steps):

- TeaCache (ali-vilab/TeaCache, TeaCache4Wan2.1): accumulate the relative L1
  change of the time-modulation input between steps (`e`, the time embedding,
  or `e0`, its 6-way projection), rescaled by a polynomial fitted offline from
  input change to model-output change; skip while the sum is below the
  threshold, compute and reset when it reaches it. The first step(s) of a run,
  and the last as the reference does, are always computed.
- MagCache (Zehong-Ma/MagCache): from a calibrated per-step ratio of residual
  magnitudes |r_t| / |r_t-1|, accumulate the skip error |1 - prod(ratio)| since
  the last computed step; skip while it is below the threshold and at most K
  steps in a row. The first `retention` fraction of the steps are always computed.

For Wan the modulation input depends on the timestep alone, so both rules give a
skip pattern fixed by the schedule; what the calibration learns is how much the
output moves per step. Calibrations live in `cache_calibrations.json` (one entry
per model, matched by its config and, for Kinema's own models, a fingerprint of
the weights) or in a `cache_calibration.json` beside a checkpoint; they are made
with bench/calibrate_cache.py (docs/caching.md).

The model stays stateless: a StepCache is a block hook (kinema/models/hooks.py) that
wraps the whole stack of blocks; from the step context it knows the step and which
guidance branch each batch row is, and decides per row to run the blocks or reuse
the cached residual. The state lives here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.models.hooks import BlockHook

log = logging.getLogger("kinema")

TABLE = Path(__file__).with_name("cache_calibrations.json")  # the shipped calibrations, keyed by model
CALIBRATION_FILE = "cache_calibration.json"  # beside a checkpoint, read before the shipped table
METHODS = ("teacache", "magcache")
FORMS = "teacache:THRESH (e.g. teacache:0.2), magcache:THRESH:K (e.g. magcache:0.12:2) or off"
MAGCACHE_K = 2  # MagCache's default for K when the setting leaves it out
MAGCACHE_RETENTION = 0.2  # MagCache's default share of first steps always computed


# -- the setting: "teacache:0.2", "magcache:0.12:2" ------------------------------------------------
@dataclass(frozen=True)
class CacheSpec:
    method: str  # teacache | magcache
    threshold: float
    max_skips: int | None = None  # MagCache's K
    calibration: str | None = None  # a calibration JSON; None: beside the checkpoint, else the shipped table

    def __str__(self) -> str:
        return f"{self.method}:{self.threshold:g}" + (f":{self.max_skips}" if self.method == "magcache" else "")


def parse_cache(text: str | None, flag: str = "cache setting") -> CacheSpec | None:
    """'teacache:THRESH' | 'magcache:THRESH[:K]' -> CacheSpec; None, '' or 'off' -> None."""
    if text is None or text.strip().lower() in ("", "off", "none"):
        return None

    def bad(why: str) -> KinemaError:
        return KinemaError(f"{flag} {text!r}: {why}; use {FORMS}.")

    method, *values = text.strip().lower().split(":")
    if method not in METHODS:
        raise bad(f"unknown method {method!r}")
    if not 1 <= len(values) <= (1 if method == "teacache" else 2):
        raise bad("teacache takes one value, THRESH" if method == "teacache" else "magcache takes THRESH and K")
    try:
        threshold = float(values[0])
    except ValueError:
        raise bad(f"the threshold {values[0]!r} is not a number") from None
    if not (math.isfinite(threshold) and threshold >= 0):
        raise bad("the threshold must be a number >= 0 (0 computes every step)")
    if method == "teacache":
        return CacheSpec(method, threshold)
    k = values[1] if len(values) > 1 else str(MAGCACHE_K)
    if not k.isdigit():
        raise bad(f"K {k!r} is not a whole number >= 0 (the most steps skipped in a row)")
    return CacheSpec(method, threshold, int(k))


# -- calibrations --------------------------------------------------------------------------------
def fingerprint(dit) -> str:
    """A short hash of the DiT's modulation tables, telling one set of weights from another of the same
    shape without reading the big matrices (modulation stays float32 whatever dtype or fp8 the rest has)."""
    h = hashlib.sha256()
    for p in [dit.head.modulation, *(b.modulation for b in dit.blocks)]:
        if hasattr(p, "full_tensor"):  # sharded by FSDP (a DTensor): gathered whole, on every rank alike
            p = p.full_tensor()
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def calibration_beside(path) -> Path | None:
    """The `cache_calibration.json` written for a checkpoint (in its folder or transformer/, or beside its file)."""
    if not path:
        return None
    p = Path(path)
    for c in ([p / CALIBRATION_FILE, p / "transformer" / CALIBRATION_FILE] if p.is_dir() else [p.parent / CALIBRATION_FILE]):
        if c.is_file():
            return c
    return None


def read_calibrations(path=TABLE) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise KinemaError(f"cannot read the cache calibration {path}: {exc}") from None
    if not isinstance(data.get("models"), dict):
        raise KinemaError(f"{path} is not a cache calibration file (no 'models' table); write it with bench/calibrate_cache.py.")
    return data


def write_calibrations(data: dict, path=TABLE) -> None:
    """Write a calibration file, each list of numbers on one line so a diff shows what moved."""
    text = json.dumps(data, indent=1)
    text = re.sub(r"\[[-0-9.eE+,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    Path(path).write_text(text + "\n")


def load_calibration(dit, area: int | None = None, path=None) -> tuple[str, dict]:
    """(name, entry) of the calibration for this DiT: the entries whose `match` fits its config; among
    several, the one with its weights' fingerprint, else the one calibrated nearest this frame area."""
    path = path or TABLE
    entries = read_calibrations(path)["models"]
    cfg = dit.config
    found = {n: e for n, e in entries.items() if all(getattr(cfg, k, None) == v for k, v in e.get("match", {}).items())}
    if not found:
        raise KinemaError(
            f"no step-cache calibration for this DiT ({cfg.model_type}, width {cfg.dim}, {cfg.num_layers} layers) in {path}; "
            "make one with bench/calibrate_cache.py (docs/caching.md), or run without --cache.")
    fp = fingerprint(dit)
    pool = {n: e for n, e in found.items() if e.get("fingerprint") == fp} or found

    def distance(name: str) -> float:
        a = pool[name].get("area")
        return abs(math.log(area / a)) if area and a else 0.0

    name = min(pool, key=distance)
    if pool[name].get("fingerprint") not in (None, fp):
        log.warning("the step-cache calibration %r was made for other weights (fingerprint %s, this model %s); "
                    "rerun bench/calibrate_cache.py for this model", name, pool[name]["fingerprint"], fp)
    return name, pool[name]


def nearest_interp(values, n: int) -> list[float]:
    """A per-step table resampled to n steps by nearest index, as MagCache does for other step counts."""
    values = np.asarray(values, dtype=np.float64)
    if n == 1:
        return [float(values[-1])]
    idx = np.round(np.arange(n) * (len(values) - 1) / (n - 1)).astype(int)
    return values[idx].tolist()


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a - b| / mean |b|: the relative L1 change from b to a."""
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean().clamp_min(1e-12)).item()


# -- the cache -----------------------------------------------------------------------------------
@dataclass
class _Branch:
    """One guidance branch's stream of steps."""

    residual: torch.Tensor | None = None  # blocks output - input at its last computed step [1, L, dim]
    prev: dict = field(default_factory=dict)  # TeaCache: last modulation input; record: last e, e0, output, residual
    acc: float = 0.0  # TeaCache: accumulated rescaled change; MagCache: accumulated skip error
    ratio: float = 1.0  # MagCache: product of magnitude ratios since the last computed step
    run: int = 0  # MagCache: steps since the last computed one
    computed: list = field(default_factory=list)  # per step run: True if the blocks ran
    records: dict = field(default_factory=lambda: {"e": [], "e0": [], "out": [], "mag": []})


class StepCache(BlockHook):
    """Per-run cache state, a block hook around the DiT's blocks (pass it in `hooks`).

    method: teacache | magcache | record (compute every step and record, per branch
    and step, the relative change of e, e0 and the model output, and the residual
    magnitude ratio: what bench/calibrate_cache.py fits; it needs `head`, the DiT's head,
    which the pipeline sets). `calibration` is the method's part of a calibration entry.
    Call `begin(steps, start)` before each run. `order` 100: outside per-block hooks, so a
    skipped step skips them too and a computed one runs them.
    """

    order = 100

    def __init__(self, method: str, threshold: float = 0.0, max_skips: int | None = None, calibration: dict | None = None,
                 head=None):
        if method not in (*METHODS, "record"):
            raise KinemaError(f"unknown step-cache method {method!r}; choose {', '.join(METHODS)}")
        if method in METHODS and not calibration:
            raise KinemaError(f"{method} needs its calibration (coefficients / ratios); see docs/caching.md")
        self.method, self.threshold, self.max_skips, self.calibration = method, threshold, max_skips, calibration or {}
        self.head = head
        self.begin(1)

    def __str__(self) -> str:
        return str(CacheSpec(self.method, self.threshold, self.max_skips)) if self.method in METHODS else self.method

    @classmethod
    def from_spec(cls, spec: CacheSpec | str, dit, area: int | None = None) -> StepCache:
        spec = parse_cache(spec) if isinstance(spec, str) else spec
        name, entry = load_calibration(dit, area, spec.calibration)
        if spec.method not in entry:
            raise KinemaError(f"the step-cache calibration {name!r} has no {spec.method} part; "
                              "rerun bench/calibrate_cache.py, or use the other method.")
        log.info("Step cache %s with calibration %r", spec, name)
        return cls(spec.method, spec.threshold, spec.max_skips, entry[spec.method], head=dit.head)

    def begin(self, steps: int, start: int = 0) -> StepCache:
        """Forget the last run; the next one samples steps start..steps-1 of a `steps`-step schedule."""
        self.steps, self.start = steps, start
        self.branches: dict[str, _Branch] = {}
        self._ratios: dict[str, list[float]] = {}
        if self.method == "magcache":
            self._ratios = {b: nearest_interp(r, steps) for b, r in self.calibration["ratios"].items()}
        return self

    # -- counts --------------------------------------------------------------------------------
    @property
    def decisions(self) -> dict[str, list[bool]]:
        """Per branch, per step run: True where the blocks ran, False where the cached residual was reused."""
        return {b: list(s.computed) for b, s in self.branches.items()}

    @property
    def computed(self) -> int:
        return sum(sum(s.computed) for s in self.branches.values())

    @property
    def skipped(self) -> int:
        return sum(len(s.computed) - sum(s.computed) for s in self.branches.values())

    def summary(self) -> str:
        total = self.computed + self.skipped
        per = ", ".join(f"{b} {sum(s.computed)}/{len(s.computed)}" for b, s in self.branches.items())
        return (f"Step cache {self}: computed {self.computed} of {total} DiT block passes ({per}), "
                f"skipped {self.skipped}: {total / max(self.computed, 1):.2f}x fewer")

    @property
    def records(self) -> dict[str, dict[str, list[float]]]:
        return {b: s.records for b, s in self.branches.items()}

    # -- the rules -----------------------------------------------------------------------------
    def _decide(self, name: str, i: int, e: torch.Tensor, e0: torch.Tensor) -> bool:
        s = self.branches.setdefault(name, _Branch())
        if self.method == "record":
            compute = True
        elif self.method == "teacache":
            compute = self._teacache(s, i, e if self.calibration.get("input", "e") == "e" else e0)
        else:
            base = name.split("@")[0]
            compute = self._magcache(s, i, self._ratios.get(base) or self._ratios["cond"])
        if not compute and s.residual is None:  # nothing cached yet (a run starting past the forced steps)
            compute, s.acc, s.ratio, s.run = True, 0.0, 1.0, 0
        s.computed.append(compute)
        return compute

    def _teacache(self, s: _Branch, i: int, inp: torch.Tensor) -> bool:
        c = self.calibration
        prev, s.prev = s.prev.get("inp"), {"inp": inp.detach().clone()}
        if i - self.start < c.get("first_steps", 1) or i >= self.steps - c.get("last_steps", 1) or prev is None:
            s.acc = 0.0
            return True
        # A negative rescaled change (the polynomial can dip below 0 near x = 0) would let a threshold of 0 skip.
        s.acc += max(0.0, float(np.polyval(c["coefficients"], rel_l1(inp, prev))))
        if s.acc < self.threshold:
            return False
        s.acc = 0.0
        return True

    def _magcache(self, s: _Branch, i: int, ratios: list[float]) -> bool:
        if i < int(self.steps * self.calibration.get("retention", MAGCACHE_RETENTION)):
            return True
        s.ratio *= ratios[i]
        s.run += 1
        s.acc += abs(1 - s.ratio)
        if s.acc < self.threshold and s.run <= self.max_skips:
            return False
        s.acc, s.ratio, s.run = 0.0, 1.0, 0
        return True

    def _record(self, s: _Branch, residual, out, e, e0) -> None:
        if self.head is None:
            raise KinemaError("a recording StepCache needs the DiT's head: StepCache('record', head=dit.head)")
        v = self.head(out, e)  # the model output in token order (unpatchify only reorders it)
        p, r = s.prev, s.records
        if p:
            r["e"].append(rel_l1(e, p["e"]))
            r["e0"].append(rel_l1(e0, p["e0"]))
            r["out"].append(rel_l1(v, p["v"]))
            r["mag"].append((residual.norm(dim=-1) / p["residual"].norm(dim=-1).clamp_min(1e-12)).mean().item())
        s.prev = {"e": e.clone(), "e0": e0.clone(), "v": v, "residual": residual}

    # -- the hook ------------------------------------------------------------------------------
    def around_blocks(self, run, tokens, inputs, step):
        """Run the blocks for the batch rows whose branch computes this step; the others add their cached
        residual. `step.branches` names each row's guidance branch (("cond", "uncond") when batched)."""
        branches = step.branches
        if tokens.shape[0] != len(branches):
            raise ValueError(f"the step cache got a batch of {tokens.shape[0]} for branches {branches}")
        e, e0 = inputs.e, inputs.e0
        if step.window is not None:  # a context window's branches keep their own state
            branches = tuple(f"{b}@{','.join(map(str, step.window))}" for b in branches)
        compute = [self._decide(b, step.step, e[i : i + 1], e0[i : i + 1]) for i, b in enumerate(branches)]
        rows = [i for i, c in enumerate(compute) if c]
        if len(rows) == len(branches):
            done = run(tokens, inputs, step)
        elif rows:
            idx = torch.tensor(rows, device=tokens.device)
            done = run(tokens[idx], inputs.rows(idx), step.rows(rows))  # [len(rows), L, dim]
        out = []
        for i, name in enumerate(branches):
            s, x = self.branches[name], tokens[i : i + 1]
            if compute[i]:
                y = done[rows.index(i)][None]
                if self.method == "record":
                    self._record(s, y - x, y, e[i : i + 1], e0[i : i + 1])
                s.residual = y - x
            else:
                y = x + s.residual
            out.append(y)
        return done if len(rows) == len(branches) else torch.cat(out)  # [B, L, dim]


def make_cache(cache, dit, area: int | None = None) -> StepCache | None:
    """A run's `cache` argument -> a StepCache or None: a setting string, a CacheSpec, or a StepCache
    (given its DiT's head when it has none, for record mode)."""
    if isinstance(cache, StepCache):
        if cache.head is None:
            cache.head = dit.head
        return cache
    if cache is None:
        return None
    spec = parse_cache(cache) if isinstance(cache, str) else cache
    return None if spec is None else StepCache.from_spec(spec, dit, area)
