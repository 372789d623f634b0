"""`kinema eval`: how well a model does in the synthetic world, measured by the analyser.

Prompts, seeds and clips come from an evaluation world seed that training never
uses. Every sample is generated with the model's default settings through the
same kinema.Pipeline the CLI uses, decoded to 8-bit frames and analysed.

Rows and the bars the built-in model must clear:
- t2v: background, object colour, direction, shape accuracy; frames with the
  object present and single;
- i2v (first frame rendered): PSNR of the generated first frame vs the image, direction;
- flf2v: PSNR of the first and last frames, centroid track monotonic;
- VAE: reconstruction PSNR on clips;
- LoRA (when given): share of orange objects at strength 1 and at 0.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kinema.toy import world
from kinema.toy.analyse import analyse, psnr

EVAL_SEED = 424242  # never used by the trainers' worlds

BARS = {  # row -> (comparison, bar)
    "t2v background %": (">=", 95), "t2v colour %": (">=", 95), "t2v direction %": (">=", 90),
    "t2v shape %": (">=", 80), "t2v present+single frames %": (">=", 95),
    "i2v first-frame PSNR dB": (">=", 28), "i2v direction %": (">=", 90),
    "flf2v first-frame PSNR dB": (">=", 26), "flf2v last-frame PSNR dB": (">=", 26), "flf2v monotonic %": (">=", 90),
    "VAE reconstruction PSNR dB": (">=", 34),
    "LoRA orange % at 1.0": (">=", 80), "LoRA orange % at 0.0": ("<", 10),
}


@dataclass
class EvalSettings:
    t2v: int = 120
    i2v: int = 40
    flf2v: int = 40
    vae: int = 32
    lora: int = 40
    seed: int = EVAL_SEED
    steps: int | None = None  # None: the model's default
    solver: str | None = None  # None: the model's default (a distillation LoRA's, when merged)
    shift: float | None = None
    guide_scale: float | None = None
    cache: str | None = None  # step caching for every generated sample, e.g. "teacache:0.1" (kinema/sampling/cache.py)
    only: tuple[str, ...] = field(default=("t2v", "i2v", "flf2v", "vae", "lora"))
    # the Pipeline's guidance extras / context windows for every sample (skip_layers, cfg_zero_star, enhance, riflex,
    # context_windows), as `kinema generate`'s flags give them
    extras: dict = field(default_factory=dict)

    def sampling(self) -> dict:
        """The pipeline's sampling arguments these settings fix (None: the model's own)."""
        return dict(steps=self.steps, solver=self.solver, shift=self.shift, guide_scale=self.guide_scale,
                    **self.extras)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((video.permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def _specs(seed: int, n: int, width: int, height: int, colors=tuple(world.COLORS)) -> list[world.ClipSpec]:
    return [world.random_spec(world.clip_rng(seed, i), width, height, colors=colors) for i in range(n)]


def _size(pipe) -> tuple[int, int, int]:
    d = pipe.models.info.sample_defaults
    w, h = (int(v) for v in d.get("size", "64*64").split("*"))
    return w, h, int(d.get("frame_num", 17))


def _pct(values) -> float:
    return 100.0 * float(np.mean(values)) if len(values) else float("nan")


def eval_t2v(pipe, s: EvalSettings, progress=None, colors=tuple(world.COLORS), seed_offset: int = 0) -> tuple[dict, list]:
    w, h, f = _size(pipe)
    hits = {k: [] for k in ("background", "color", "direction", "shape")}
    frames_ok, records = [], []
    for i, spec in enumerate(_specs(s.seed + seed_offset, s.t2v, w, h, colors)):
        video = pipe(spec.caption, task="t2v", seed=s.seed + i, batched_cfg=True, cache=s.cache, progress=False,
                     **s.sampling()).video
        a = analyse(to_uint8(video))
        m = a.matches(spec)
        for k in hits:
            hits[k].append(m[k])
        frames_ok += [p and q for p, q in zip(a.present, a.single)]
        records.append({"prompt": spec.caption, "seed": s.seed + i, "got": a.caption()})
        if progress:
            progress(1)
    return {"t2v background %": _pct(hits["background"]), "t2v colour %": _pct(hits["color"]),
            "t2v direction %": _pct(hits["direction"]), "t2v shape %": _pct(hits["shape"]),
            "t2v present+single frames %": _pct(frames_ok)}, records


def eval_i2v(pipe, s: EvalSettings, progress=None) -> dict:
    w, h, f = _size(pipe)
    out = {"i2v": ([], []), "flf2v": ([], [], [])}
    for task, n in (("i2v", s.i2v), ("flf2v", s.flf2v)):
        for i, spec in enumerate(_specs(s.seed + (1 if task == "i2v" else 2), n, w, h)):
            clip = world.render(spec, w, h, f)
            first, last = (world.to_tensor(clip[j : j + 1])[:, 0] for j in (0, f - 1))
            kwargs = {"image": first} if task == "i2v" else {"first_frame": first, "last_frame": last}
            video = pipe(spec.caption, task=task, seed=s.seed + i, batched_cfg=True, cache=s.cache, progress=False,
                         **s.sampling(), **kwargs).video
            frames = to_uint8(video)
            a = analyse(frames)
            if task == "i2v":
                out["i2v"][0].append(psnr(frames[0], clip[0]))
                out["i2v"][1].append(a.direction == spec.direction)
            else:
                out["flf2v"][0].append(psnr(frames[0], clip[0]))
                out["flf2v"][1].append(psnr(frames[-1], clip[-1]))
                out["flf2v"][2].append(a.monotonic and a.direction == spec.direction)
            if progress:
                progress(1)
    res = {}
    if s.i2v:
        res |= {"i2v first-frame PSNR dB": float(np.mean(out["i2v"][0])), "i2v direction %": _pct(out["i2v"][1])}
    if s.flf2v:
        res |= {"flf2v first-frame PSNR dB": float(np.mean(out["flf2v"][0])),
                "flf2v last-frame PSNR dB": float(np.mean(out["flf2v"][1])), "flf2v monotonic %": _pct(out["flf2v"][2])}
    return res


@torch.no_grad()
def eval_vae(vae, s: EvalSettings, width: int, height: int, frames: int) -> dict:
    values = []
    for spec in _specs(s.seed + 3, s.vae, width, height, tuple(world.COLORS) + tuple(world.EXTRA_COLORS)):
        clip = world.render(spec, width, height, frames)
        recon = vae.decode(vae.encode(world.to_tensor(clip)[None].to(vae.device)))[0]
        values.append(psnr(to_uint8(recon), clip))
    return {"VAE reconstruction PSNR dB": float(np.mean(values))}


def eval_lora(pipe, lora_path: str, s: EvalSettings, progress=None) -> dict:
    """The share of orange objects with the LoRA merged at strength 1 and at 0, each into a copy of the DiT."""
    from dataclasses import replace

    from kinema.lora import apply_loras
    from kinema.pipeline.pipeline import Pipeline

    res = {}
    for strength in (1.0, 0.0):
        dit = copy.deepcopy(pipe.models.dit)
        if strength:
            apply_loras(dit, [(lora_path, strength)])
        sub = EvalSettings(t2v=s.lora, seed=s.seed + 4, steps=s.steps, solver=s.solver, shift=s.shift,
                           guide_scale=s.guide_scale)
        with_lora = Pipeline(replace(pipe.models, dit=dit, loras=((str(lora_path), strength),) if strength else ()),
                             pipe.runtime)
        _, records = eval_t2v(with_lora, sub, progress, colors=tuple(world.EXTRA_COLORS))
        res[f"LoRA orange % at {strength:.1f}"] = _pct([r["got"].split()[1] == "orange" for r in records])
    return res


def evaluate(pipe, s: EvalSettings, lora: str | None = None, show_progress: bool = True) -> dict:
    """Every row of the evaluation `s` asks for, for the model set of `pipe` (a kinema.Pipeline)."""
    from tqdm import tqdm

    total = (s.t2v * ("t2v" in s.only) + (s.i2v + s.flf2v) * any(t in s.only for t in ("i2v", "flf2v"))
             + 2 * s.lora * (lora is not None and "lora" in s.only))
    bar = tqdm(total=total, desc="kinema eval", unit="sample", disable=not show_progress)
    results, start = {}, time.perf_counter()
    if "t2v" in s.only and s.t2v:
        results |= eval_t2v(pipe, s, bar.update)[0]
    if "i2v" in s.only or "flf2v" in s.only:
        sub = EvalSettings(**{**s.__dict__, "i2v": s.i2v if "i2v" in s.only else 0, "flf2v": s.flf2v if "flf2v" in s.only else 0})
        results |= eval_i2v(pipe, sub, bar.update)
    if "vae" in s.only and s.vae:
        results |= eval_vae(pipe.models.vae, s, *_size(pipe))
    if lora is not None and "lora" in s.only:
        results |= eval_lora(pipe, lora, s, bar.update)
    bar.close()
    results["seconds"] = time.perf_counter() - start
    return results


def passes(row: str, value: float) -> bool | None:
    if row not in BARS:
        return None
    op, bar = BARS[row]
    return value >= bar if op == ">=" else value < bar


def table(results: dict) -> str:
    lines = [f"{'metric':32} {'value':>8}  {'bar':>6}  result", "-" * 58]
    for row, value in results.items():
        if row == "seconds":
            continue
        ok = passes(row, value)
        bar = f"{BARS[row][0]}{BARS[row][1]}" if row in BARS else ""
        lines.append(f"{row:32} {value:8.2f}  {bar:>6}  {'-' if ok is None else ('pass' if ok else 'FAIL')}")
    lines.append(f"({results.get('seconds', 0):.0f} s)")
    return "\n".join(lines)


def to_json(results: dict) -> str:
    return json.dumps(results, indent=2)
