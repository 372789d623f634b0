"""What tests/test_parallel.py runs on each rank: generate with tiny random checkpoints, save what came out.

A spec is (name, checkpoint, task, parallel options, call arguments). The same `generate` runs the
single-process reference in the test's own process, so both sides take one code path.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch

PROMPT = "a red circle moving right"
# 80x48 pixels, 9 frames: a 3 x 3 x 5 token grid, 45 tokens: divisible by neither 2 nor 4
CALL = dict(size="80*48", frame_num=9, steps=3, seed=3, progress=False)


def image(seed: int, h: int = 48, w: int = 80) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [3, H, W] in [-1, 1]


TASK_INPUTS = {"t2v": lambda: {}, "i2v": lambda: {"image": image(1)},
               "flf2v": lambda: {"first_frame": image(1), "last_frame": image(2)}}


def generate(root: Path, spec: tuple) -> dict:
    """Run one spec; {'latents', 'video', 'decisions'} or {'error': message} for a KinemaError."""
    import kinema
    from kinema.errors import KinemaError

    _, ckpt, task, parallel, call = spec
    call = dict(CALL) | dict(call)
    try:
        load = {k: call.pop(k) for k in ("loras", "quantization") if k in call}
        pipe = kinema.Pipeline.load(Path(root) / ckpt, **load, **parallel)
        result = pipe(PROMPT, task=task, **TASK_INPUTS[task](), **call)
    except KinemaError as exc:
        return {"error": str(exc)}
    cache = result.cache
    return {"latents": result.latents, "video": result.video,
            "decisions": None if cache is None else cache.decisions}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, root: str, specs: list, out: str) -> None:
    """One rank: torchrun's environment by hand, one CPU thread, every spec in order; rank r's results in
    out/rank{r}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    results = {}
    try:
        for spec in specs:
            results[spec[0]] = generate(Path(root), spec)
    except Exception:
        results["crash"] = traceback.format_exc()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(world: int, root: Path, specs: list, out: Path) -> list[dict]:
    """Run `specs` on `world` gloo ranks; every rank's results."""
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(rank_main, args=(world, free_port(), str(root), specs, str(out)), nprocs=world)
    results = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    return results
