"""One job on many processes: the DiT's weights per rank with FSDP, and the step time of 1, 2 and 4 ranks.

A DiT with the 1.3B model's depth (30 blocks; width --dim, --heads heads, ffn 4 x dim) is written as a
checkpoint, then each world size runs as that many processes (torch.multiprocessing; gloo on the CPU,
nccl on GPUs), joined as torchrun would:

- weights: with --dit_fsdp on the largest world, each rank's DiT weight bytes at rest (its shards) and
  at their peak during a forward (its shards plus the units gathered whole at that moment, counted by
  forward hooks inside every FSDP unit), against the whole model's bytes in one process. On a GPU the
  allocator's peak (torch.cuda.max_memory_allocated) during loading and the forward is printed too.
- step time: one guided DiT step (cond and uncond, sequential) on a latent grid of --grid tokens, for
  each split of 1, 2 and 4 ranks (Ulysses, ring, both, CFG parallel), median of --runs after a warm-up,
  with the time rank 0 spends in the collectives Kinema calls (all-to-all, ring send / receive, gathers,
  broadcasts): the communication share. Ring transfers overlap compute, so only their exposed part counts;
  FSDP's own all-gathers (issued and awaited inside FSDP) are not counted there, they show in the step time.

    python bench/distributed.py                     # CPU, gloo: ~5 min on 2 cores
    python bench/distributed.py --dim 256 --grid 4x16x16 --runs 2   # a quick smoke run

On a CPU the ranks share the machine's cores (each gets cores / ranks threads), so the step times show
the cost of the split, not a speed-up; on a GPU machine each rank has its own GPU. Rank 0's CPU seconds
per step (process time) are printed beside the wall time: on a machine other jobs share, they show the
work a rank does when the wall time shows mostly the wait for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLITS = {
    1: {"1 rank": {}},
    2: {"ulysses 2": dict(ulysses_size=2), "ring 2": dict(ring_size=2), "cfg 2": dict(cfg_parallel=True)},
    4: {"ulysses 4": dict(ulysses_size=4), "ring 4": dict(ring_size=4), "ulysses 2 x ring 2": dict(ulysses_size=2, ring_size=2),
        "ulysses 2 x cfg 2": dict(ulysses_size=2, cfg_parallel=True), "fsdp + ulysses 4": dict(ulysses_size=4, dit_fsdp=True)},
}
TEXT_DIM = 4096


def write_checkpoint(folder: Path, dim: int, heads: int, layers: int) -> None:
    from safetensors.torch import save_file

    from kinema.models.dit import DiTConfig, WanDiT

    torch.manual_seed(0)
    cfg = DiTConfig("t2v", dim=dim, ffn_dim=4 * dim, num_heads=heads, num_layers=layers, text_dim=TEXT_DIM)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in WanDiT(cfg).state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": dim,
                                                    "num_heads": heads}))


# -- collectives, timed (the bench's own wrapper: the library is not changed) ----------------------------------
class CommTimer:
    def __init__(self):
        self.seconds = 0.0

    def wrap(self):
        for name in ("all_to_all_single", "all_gather", "broadcast", "all_reduce", "barrier"):
            setattr(dist, name, self._timed(getattr(dist, name)))
        batch = dist.batch_isend_irecv

        timer = self

        class TimedWork:  # ring.py waits on its transfers: the exposed part of them
            def __init__(self, work):
                self.work = work

            def wait(self):
                return timer._timed(self.work.wait)()

        def timed_batch(ops):
            return [TimedWork(w) for w in batch(ops)]

        dist.batch_isend_irecv = timed_batch

    def _timed(self, fn):
        def call(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return call


def weight_bytes(model) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole model) of the parameters and buffers."""
    local = full = 0
    for t in [*model.parameters(), *model.buffers()]:
        shard = t.to_local() if hasattr(t, "to_local") else t
        local += shard.numel() * shard.element_size()
        full += t.numel() * t.element_size()
    return local, full


def unit_peak(model) -> dict:
    """Forward hooks inside each FSDP unit: at each moment, shards + units gathered whole; the largest seen."""
    from torch.distributed.tensor import DTensor

    from kinema.parallel.fsdp import units

    names = units(model)
    parts = {n: model.get_submodule(n) for n in names}
    shard, _ = weight_bytes(model)
    record = {"peak": shard}

    def whole_now() -> int:
        total = 0
        for module in parts.values():
            ps = list(module.parameters())
            if ps and not isinstance(ps[0], DTensor):  # unsharded: FSDP swapped in the gathered tensors
                total += sum(p.numel() * p.element_size() for p in ps)
        return total

    def hook(*_):
        record["peak"] = max(record["peak"], shard + whole_now())

    for module in parts.values():
        for sub in module.modules():
            sub.register_forward_pre_hook(hook)
    return record


def rank_main(rank: int, world: int, port: int, args, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from kinema.loading.dit import open_dit
    from kinema.parallel.mesh import ParallelOptions, start
    from kinema.parallel.sequence import sequence_hooks
    from kinema.sampling.context import StepContext

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    comm = CommTimer()
    comm.wrap()
    results = {}
    for name, split in SPLITS[world].items():
        options = ParallelOptions(**split)
        mesh, dev = start(options, device) if world > 1 else (None, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ckpt_open = open_dit(ckpt)
        if options.dit_fsdp:
            from kinema.parallel.fsdp import shard_dit

            dit = shard_dit(ckpt_open, mesh.shard_group, dtype, dev).model
            peak = unit_peak(dit)
        else:
            dit = ckpt_open.load(dtype, dev).model
            peak = None
        g = torch.Generator().manual_seed(0)
        f, h, w = args.grid
        x = torch.randn(1, 16, f, 2 * h, 2 * w, generator=g).to(dev)  # patch 1x2x2: f x h x w tokens
        context = {b: torch.randn(1, 40, TEXT_DIM, generator=g).to(dev) for b in ("cond", "uncond")}
        hooks = sequence_hooks(mesh)

        def step():
            from kinema.pipeline.guidance import guidance_for
            from kinema.parallel.cfg import CFGParallel

            strategy = CFGParallel(mesh) if options.cfg_parallel else guidance_for(False)
            ctx = StepContext(0, 1, 0.5, 500)
            run = lambda x, t, a, st: dit(x, t, context=a["context"], hooks=hooks, step=st)  # noqa: E731
            with torch.no_grad():
                out = strategy.predict(run, x, torch.tensor([500], device=dev),
                                       {b: {"context": c} for b, c in context.items()}, ctx)
            if cuda:
                torch.cuda.synchronize()
            return out

        step()  # warm-up
        times, comms, cpus = [], [], []
        for _ in range(args.runs):
            if world > 1:
                dist.barrier()
            comm.seconds = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            comms.append(comm.seconds)
        local, full = weight_bytes(dit)
        results[name] = {"step_s": statistics.median(times), "comm_s": statistics.median(comms),
                         "cpu_s": statistics.median(cpus),
                         "weights_local": local, "weights_full": full,
                         "weights_peak": peak["peak"] if peak else local,
                         "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None}
        del dit
    if rank == 0:
        torch.save(results, out)
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--grid", default="6x24x24", help="latent token grid FxHxW (after the 1x2x2 patch)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--worlds", default="1,2,4")
    args = ap.parse_args(argv)
    args.grid = tuple(int(v) for v in args.grid.split("x"))
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "dit"
        write_checkpoint(ckpt, args.dim, args.heads, args.layers)
        table = {}
        for world in worlds:
            out = Path(tmp) / f"world{world}.pt"
            if world == 1:
                rank_main(0, 1, free_port(), args, str(ckpt), str(out))
            else:
                mp.spawn(rank_main, args=(world, free_port(), args, str(ckpt), str(out)), nprocs=world)
            table[world] = torch.load(out)
    device = f"CUDA ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    tokens = args.grid[0] * args.grid[1] * args.grid[2]
    print(f"DiT: {args.layers} blocks, dim {args.dim}, {args.heads} heads; {tokens} tokens ({'x'.join(map(str, args.grid))}); "
          f"{device}; median of {args.runs}\n")
    base = table[worlds[0]][next(iter(table[worlds[0]]))]
    print("| ranks | split | step (s) | vs 1 rank | rank 0 CPU (s) | communication | weights per rank: at rest | at peak |")
    print("|---|---|---|---|---|---|---|---|")
    for world, rows in table.items():
        for name, r in rows.items():
            full = r["weights_full"]
            print(f"| {world} | {name} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}x | {r['cpu_s']:.2f} | "
                  f"{r['comm_s'] / r['step_s']:.0%} ({r['comm_s']:.3f} s) | "
                  f"{r['weights_local'] / 2**20:.1f} MiB ({r['weights_local'] / full:.2f}x) | "
                  f"{r['weights_peak'] / 2**20:.1f} MiB ({r['weights_peak'] / full:.2f}x) |"
                  + (f" CUDA peak {r['cuda_peak'] / 2**30:.2f} GiB |" if r["cuda_peak"] else ""))


if __name__ == "__main__":
    main()
