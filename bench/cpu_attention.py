"""Half-precision attention on this CPU: PyTorch's kernel in bf16 / fp16 vs the same attention in float32.

For each shape (batch 1, heads x query length x key length x head dim) and half dtype it times, in
one process and interleaved (N F F N ...), the two ways kinema/ops/cpu_half.py chooses between:
`native` (scaled_dot_product_attention on the half inputs) and `float32` (the inputs cast to float32,
a group of heads at a time, the result cast back), and prints the ratio and the way the run-time
race (cpu_half_attention) picked for the shape on this machine. This is the table the choice is
made from; it differs between machines (AMX or not), which is why Kinema measures it at run time.

    python bench/cpu_attention.py            # the DiT's self- and cross-attention shapes up to 8k tokens (~2 min)
    python bench/cpu_attention.py --large    # plus 1.3B-shaped 480p self-attention (12 x 32760 x 128; slow)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kinema.ops import cpu_half

SHAPES = [  # (heads, query tokens, key tokens, head dim, what)
    (8, 1024, 1024, 64, "self, dim 512 at 1k"),
    (8, 3456, 3456, 64, "self, dim 512 at 3.5k"),
    (8, 8192, 8192, 64, "self, dim 512 at 8k"),
    (8, 3456, 41, 64, "cross, folded 40-token prompt"),
    (8, 3456, 512, 64, "cross, 512 padded rows"),
    (12, 8192, 8192, 128, "self, 1.3B heads at 8k"),
]
LARGE = [(12, 32760, 32760, 128, "self, 1.3B at 480p")]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per way, after one untimed warm-up each")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    ap.add_argument("--large", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| dtype | shape (H x Lq x Lk x D) | what | native ms | float32 ms | native / float32 | race picked |")
    print("|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        for h, lq, lk, d, what in SHAPES + (LARGE if args.large else []):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, lq, h, d, generator=g).to(dtype)
            k, v = (torch.randn(1, lk, h, d, generator=g).to(dtype) for _ in range(2))
            ways = {"native": lambda: cpu_half.native(q, k, v, None, None),
                    "float32": lambda: cpu_half.in_float32(q, k, v, None, None)}
            times = {name: [] for name in ways}
            for i in range(args.runs + 1):
                for name in (("native", "float32") if i % 2 == 0 else ("float32", "native")):
                    t = timed(ways[name])
                    if i:  # the first pair is the warm-up
                        times[name].append(t)
            nat, f32 = (statistics.median(times[n]) for n in ("native", "float32"))
            choices = cpu_half.CpuHalfChoices()
            cpu_half.cpu_half_attention(q, k, v, None, None, choices)
            print(f"| {dtype_name} | {h} x {lq} x {lk} x {d} | {what} | {nat * 1e3:.1f} | {f32 * 1e3:.1f} | "
                  f"{nat / f32:.2f} | {next(iter(choices.ways.values()))} |", flush=True)


if __name__ == "__main__":
    main()
