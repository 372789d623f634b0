"""The training loop every trainer shares: AdamW, warm-up + cosine LR, grad clipping, EMA,
resumable atomic checkpoints, a metrics CSV, periodic samples and a progress bar.

A trainer is a `TrainTask`: it owns the models and says how to compute the loss
of step `s`. All randomness of a step is drawn from a generator seeded by
(seed, step), so a run resumed from a checkpoint continues bit for bit as if it
had never stopped.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from kinema.errors import KinemaError
from kinema.train import config as configs

log = logging.getLogger("kinema")

# Keys that may change between the stages of one run; anything else must match the checkpoint.
RESUMABLE_CHANGES = {"steps", "max_minutes", "budget_minutes", "checkpoint_every", "sample_every", "log_every",
                     "threads", "keep_checkpoints", "device", "output_dir"}
# Steps timed before `budget_minutes` fixes `steps` (the first one, with its one-off set-up, is not counted).
BUDGET_PROBE_STEPS = 20


class TrainTask:
    """What a trainer provides. `modules` are saved whole; `trainable` are optimised."""

    name = "task"

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        return [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]

    def loss(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradients are clipped each on its own (a GAN's generator and discriminator); the
        first group's norm is the one logged."""
        return [self.trainable()]

    def sample(self, folder: Path, step: int) -> None:  # optional
        pass

    def export(self, folder: Path) -> None:  # optional
        pass


def init_state(path: str, module: str, load_exported) -> dict:
    """Weights to start a new run from: module `module` of a training checkpoint (.pt, or the latest in a
    run folder), or the model `load_exported(path)` reads from an exported folder / file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise KinemaError(f"init_from {p} does not exist; give a training checkpoint (.pt), a run folder or a model folder.")
    if p.is_dir() and checkpoints(p):
        p = checkpoints(p)[-1]
    if p.suffix == ".pt":
        state = torch.load(p, map_location="cpu", weights_only=False)
        if module not in state.get("modules", {}):
            raise KinemaError(f"init_from {p} holds no '{module}' weights (it is a {state.get('task', '?')} checkpoint).")
        return state["modules"][module]
    return load_exported(p).state_dict()


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919) % (2**63 - 1))
    return g


def fit_steps(cfg: configs.TrainConfig, step: int, elapsed_s: float, sec_per_step: float) -> int:
    """The step count that ends a `budget_minutes` run on time: what is left of the budget after `elapsed_s`,
    less a 5% reserve for the final sample and export, at the measured speed."""
    left = cfg.budget_minutes * 60 * 0.95 - elapsed_s
    return max(step + 1, step + int(left / max(sec_per_step, 1e-9)))


def lr_at(cfg: configs.TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    def __init__(self, params: list[nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up, as usual for EMA
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - d)

    @contextlib.contextmanager
    def swapped(self):
        """Temporarily put the EMA weights into the model."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


def checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / "checkpoints").glob("step-*.pt"))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _config_changes(saved: dict, current: dict) -> list[str]:
    return [k for k in sorted(set(saved) | set(current))
            if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]


def _load_latest(folder: Path):
    for path in reversed(checkpoints(folder)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged file: fall back to the one before
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, e)
    return None, None


class MetricsCSV:
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.fields: list[str] | None = None
        if path.exists():  # drop rows past the checkpoint we resume from: they will be redone
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                self.fields = list(rows[0].keys())
                kept = [r for r in rows if int(r["step"]) <= resume_step]
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, self.fields)
                    w.writeheader()
                    w.writerows(kept)

    def write(self, row: dict) -> None:
        new = not self.path.exists() or self.fields is None
        if self.fields is None:
            self.fields = list(row.keys())
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def train(task: TrainTask, cfg: configs.TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) training until cfg.steps or cfg.max_minutes; returns the last metrics."""
    out = Path(cfg.output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    params = task.trainable()
    if not params:
        raise KinemaError(f"{task.name}: nothing to train (no parameters require gradients).")
    device = params[0].device
    if cfg.budget_minutes and cfg.warmup_steps < BUDGET_PROBE_STEPS + 1:
        # The probe must run inside the warm-up, whose LR does not depend on `steps`: otherwise the steps before
        # the fit would follow another schedule than a run started with the fitted count, and resuming would differ.
        raise KinemaError(f"budget_minutes needs warmup_steps >= {BUDGET_PROBE_STEPS + 1} (it times the first "
                          f"{BUDGET_PROBE_STEPS} steps to fit steps); got warmup_steps={cfg.warmup_steps}.")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(params, cfg.ema) if cfg.ema > 0 else None
    current = configs.to_dict(cfg)

    step = 0
    path, state = _load_latest(out)
    if state is not None:
        changed = _config_changes(state["config"], current)
        if changed:
            raise KinemaError(
                f"{out} holds a {state.get('task', '?')} run with a different config ({', '.join(changed)} changed); "
                "resume with the same settings, or pick a new output_dir."
            )
        for name, module in task.modules().items():
            module.load_state_dict(state["modules"][name])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            for s, v in zip(ema.shadow, state["ema"]):
                s.copy_(v)
        step = state["step"]
        if state.get("fitted_steps"):  # a budget run keeps the step count it fitted, whatever the config says
            cfg.steps = current["steps"] = state["fitted_steps"]
        log.info("resumed %s from %s (step %d)", task.name, path, step)
    fitted = state.get("fitted_steps") if state is not None else None

    def write_config() -> None:
        (out / "config.json").write_text(json.dumps({"task": task.name, **current}, indent=2))

    write_config()

    def save() -> None:
        target = out / "checkpoints" / f"step-{step:07d}.pt"
        _atomic_save({
            "task": task.name, "step": step, "config": current,
            "modules": {n: m.state_dict() for n, m in task.modules().items()},
            "optimizer": opt.state_dict(), "ema": ema.shadow if ema is not None else None, "fitted_steps": fitted,
        }, target)
        for old in checkpoints(out)[: -max(1, cfg.keep_checkpoints)]:
            old.unlink(missing_ok=True)

    def weights():
        return ema.swapped() if ema is not None else contextlib.nullcontext()

    metrics_csv = MetricsCSV(out / "metrics.csv", step)
    start_step, t_start, last = step, time.perf_counter(), {}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16
                else contextlib.nullcontext())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {task.name}", unit="step", dynamic_ncols=True)
    stopped_early = False
    try:
        t_log, logged_step = time.perf_counter(), step
        t_probe, probe_step = None, 0  # when (and after which step) a budget run's timed probe began
        while step < cfg.steps:
            if cfg.max_minutes and time.perf_counter() - t_start > cfg.max_minutes * 60:
                stopped_early = True
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            with autocast:
                loss, extra = task.loss(step, step_generator(cfg.seed, step, device))
            if not torch.isfinite(loss):
                raise KinemaError(f"{task.name}: the loss became {loss.item()} at step {step}; lower lr "
                                  f"(now {cfg.lr}) or resume from an earlier checkpoint.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            limit = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = [torch.nn.utils.clip_grad_norm_(g, limit) for g in task.clip_groups()][0]
            opt.step()
            step += 1
            if ema is not None:
                ema.update(step)
            if cfg.budget_minutes and fitted is None:
                if t_probe is None:
                    t_probe, probe_step = time.perf_counter(), step
                elif step == BUDGET_PROBE_STEPS + 1 or step - probe_step >= BUDGET_PROBE_STEPS:
                    now = time.perf_counter()
                    speed = (now - t_probe) / (step - probe_step)
                    fitted = cfg.steps = fit_steps(cfg, step, now - t_start, speed)
                    current["steps"] = fitted
                    write_config()
                    log.info("%s: %.1f min budget: %d steps at %.3f s/step", task.name, cfg.budget_minutes, fitted, speed)
                    if bar is not None:
                        bar.total = fitted
                        bar.refresh()
            last = {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm), **extra}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                last["sec_per_step"] = (now - t_log) / (step - logged_step)  # over the steps since the last row
                last["samples_per_sec"] = cfg.batch_size / max(last["sec_per_step"], 1e-9)
                t_log, logged_step = now, step
                metrics_csv.write(last)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save()
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                with weights():
                    task.sample(out / "samples", step)
    except KeyboardInterrupt:
        stopped_early = True
        log.warning("interrupted: saving a checkpoint at step %d", step)
    finally:
        if bar is not None:
            bar.close()
    if step > start_step:
        save()
    if not stopped_early and step >= cfg.steps:
        with weights():
            task.sample(out / "samples", step)
            task.export(out / "model")
        log.info("%s: finished %d steps; model written to %s", task.name, step, out / "model")
    else:
        log.info("%s: stopped at step %d of %d; run the same command again to resume", task.name, step, cfg.steps)
    return last | {"finished": step >= cfg.steps, "step": step}
