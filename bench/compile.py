"""torch.compile of the DiT blocks (kinema.memory.compile): first-call compile time and steady speed vs eager.

Models (random weights, seeded, float32, no_grad, CPU unless a GPU is there):
- tiny: dim 64, 2 heads, ffn 128, 3 blocks, text_dim 16 (tests/test_compile.py's);
- 512: dim 512, 4 heads, ffn 2048, 8 blocks, text_dim 512.
Input: latents [1, 16, 5, 16, 16] (320 tokens), 512 text tokens. Each model's
inductor cache starts empty, so the first call pays the whole compile (the first model
in a process also pays inductor's own start-up). Times are medians of `--runs` forward
passes of the whole DiT (embeddings and head stay eager), eager and compiled interleaved;
the ratio is the median of the per-pair ratios.

    OMP_NUM_THREADS=1 python bench/compile.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from kinema.memory.compile import compile_blocks, uncompile_blocks
from kinema.models.dit import DiTConfig, WanDiT

CONFIGS = {
    "tiny": DiTConfig("t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=3, text_dim=16, freq_dim=32),
    "512": DiTConfig("t2v", dim=512, ffn_dim=2048, num_heads=4, num_layers=8, text_dim=512),
}


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(name: str, cfg: DiTConfig, runs: int, device: str) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"kinema-compile-{name}-")
    torch._dynamo.reset()
    torch.manual_seed(0)
    dit = WanDiT(cfg).eval().requires_grad_(False).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 5, 16, 16, generator=g).to(device)
    context = torch.randn(1, 512, cfg.text_dim, generator=g).to(device)
    step = [torch.tensor([t], device=device) for t in torch.linspace(999, 1, runs + 2).tolist()]
    with torch.no_grad():
        dit(x, step[0], context)  # warm-up
        eager_first = timed(lambda: dit(x, step[0], context))
        want = dit(x, step[-1], context)
        compile_blocks(dit)
        first = timed(lambda: dit(x, step[0], context))
        err = (dit(x, step[-1], context) - want).abs().max().item()
        eager, compiled = [], []
        for t in step[1:]:  # interleaved, so load from other processes hits both alike
            uncompile_blocks(dit)
            eager.append(timed(lambda: dit(x, t, context)))
            compile_blocks(dit)  # the compiled forward is cached: no second compilation
            compiled.append(timed(lambda: dit(x, t, context)))
    return dict(model=name, compile_s=first - eager_first, eager_ms=statistics.median(eager) * 1e3,
                compiled_ms=statistics.median(compiled) * 1e3,
                speedup=statistics.median(e / c for e, c in zip(eager, compiled)), max_abs_diff=err)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--models", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | first-call compile (s) | eager (ms) | compiled (ms) | eager / compiled | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, CONFIGS[name], args.runs, device)
        print(f"| {r['model']} | {r['compile_s']:.1f} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
