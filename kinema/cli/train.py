"""`kinema train vae|dit|lora|distill|upscaler CONFIG`: train, or resume the run in the config's output_dir."""

from __future__ import annotations

import argparse
import json

TRAINERS = ("vae", "dit", "lora", "distill", "upscaler")


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a VAE, a DiT, a LoRA, a step-distillation LoRA or an upscaler (resumes the "
                       "run in output_dir)",
                       description=__doc__)
    t.add_argument("--debug", action="store_true", help="show tracebacks")
    t.add_argument("what", choices=TRAINERS, help="what to train")
    t.add_argument("config", help="a .json or .toml file of config keys (see docs/training.md)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (VALUE is JSON, or a plain string); repeatable")
    t.add_argument("--max_minutes", type=float, default=None, help="stop with a checkpoint after this long (a stage)")
    t.add_argument("--no_progress", action="store_true", help="no progress bar (logs only)")
    t.set_defaults(run=run)


def _overrides(pairs: list[str]) -> dict:
    from kinema.errors import KinemaError

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise KinemaError(f"--set {pair!r} is not KEY=VALUE.")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> None:
    import torch

    from kinema.train import config as configs
    from kinema.train.loop import train

    overrides = _overrides(args.overrides)
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    if args.what == "vae":
        from kinema.train.vae import VAEConfig as Config, VAETask as Task
    elif args.what == "dit":
        from kinema.train.dit import DiTTask as Task, DiTTrainConfig as Config
    elif args.what == "upscaler":
        from kinema.train.upscaler import UpscalerTask as Task, UpscalerTrainConfig as Config
    elif args.what == "distill":
        from kinema.train.distill import DistillConfig as Config, DistillTask as Task
    else:
        from kinema.train.lora import LoRATask as Task, LoRATrainConfig as Config
    cfg = configs.load(Config, args.config, overrides)
    if cfg.data != "world":  # every problem with the videos is reported before any model is built
        from kinema.train.videos import validate

        validate(cfg.data, probe=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":  # fixed shapes step after step: let cuDNN pick its fastest kernels; TF32 outside autocast
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result = train(Task(cfg, device), cfg, progress=not args.no_progress)
    print(json.dumps(result))
