"""`kinema eval`: the synthetic-world metrics of a model (the built-in one by default)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="measure a model in the synthetic world (t2v / i2v / flf2v / VAE / LoRA)",
                       description=__doc__)
    e.add_argument("--debug", action="store_true", help="show tracebacks")
    e.add_argument("--ckpt_dir", default=None, help="model folder (default: the built-in model)")
    e.add_argument("--lora", default=None, help="a LoRA to measure (share of orange objects at strength 1 and 0)")
    e.add_argument("--t2v", type=int, default=120, help="t2v samples")
    e.add_argument("--i2v", type=int, default=40, help="i2v samples")
    e.add_argument("--flf2v", type=int, default=40, help="flf2v samples")
    e.add_argument("--vae", type=int, default=32, help="VAE reconstruction clips")
    e.add_argument("--lora_samples", type=int, default=40, help="t2v samples per LoRA strength")
    e.add_argument("--seed", type=int, default=None, help="evaluation world seed (default: one training never uses)")
    e.add_argument("--sample_steps", type=int, default=None, help="sampling steps (default: the model's)")
    e.add_argument("--sample_solver", default=None, help="sampler (default: the model's, or a merged distillation LoRA's)")
    e.add_argument("--sample_shift", type=float, default=None, help="flow shift (default: the model's)")
    e.add_argument("--sample_guide_scale", type=float, default=None, help="guidance scale (default: the model's)")
    e.add_argument("--merge_lora", action="append", default=None, metavar="FILE[:STRENGTH]",
                   help="merge a LoRA into the model for every part (e.g. a step-distillation LoRA, whose sampling "
                        "settings become the defaults); repeatable")
    e.add_argument("--cache", default=None, metavar="SPEC",
                   help="step caching while sampling, as `kinema generate --cache` (teacache:T, magcache:T:K)")
    from kinema.cli.generate import extras_flags

    extras_flags(e)  # `kinema generate`'s guidance extras and context windows, for every sample
    e.add_argument("--only", default="t2v,i2v,flf2v,vae,lora", help="comma-separated parts to run")
    e.add_argument("--json", default=None, help="also write the results to this JSON file (never overwritten)")
    e.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import kinema
    from kinema.errors import KinemaError
    from kinema.toy.evaluate import EVAL_SEED, EvalSettings, evaluate, table, to_json

    if args.json and Path(args.json).exists():
        raise KinemaError(f"--json {args.json} already exists; Kinema never overwrites. Choose another name.")
    if args.lora and not Path(args.lora).is_file():
        raise KinemaError(f"--lora {args.lora} does not exist.")
    only = tuple(p.strip() for p in args.only.split(",") if p.strip())
    bad = [p for p in only if p not in ("t2v", "i2v", "flf2v", "vae", "lora")]
    if bad:
        raise KinemaError(f"--only: unknown part {bad[0]!r}; choose from t2v, i2v, flf2v, vae, lora.")
    from kinema.cli.generate import extras_arguments

    extras = {k: v for k, v in extras_arguments(args).items() if v is not None and v != "off"}
    if args.cache:
        from kinema.sampling.cache import parse_cache

        parse_cache(args.cache, "--cache")  # a bad spec is an error before any model loads
    pipe = kinema.Pipeline.load(args.ckpt_dir, loras=tuple(args.merge_lora or ()))  # None: the built-in model
    s = EvalSettings(t2v=args.t2v, i2v=args.i2v, flf2v=args.flf2v, vae=args.vae, lora=args.lora_samples,
                     seed=EVAL_SEED if args.seed is None else args.seed, steps=args.sample_steps, only=only,
                     cache=args.cache, solver=args.sample_solver, shift=args.sample_shift,
                     guide_scale=args.sample_guide_scale, extras=extras)
    results = evaluate(pipe, s, lora=args.lora)
    print(table(results))
    if args.json:
        Path(args.json).write_text(to_json(results))
