"""One DiT forward pass: Kinema's WanDiT vs diffusers' WanTransformer3DModel with the same weights.

For each config and dtype both models run the same inputs in this process (text context of 512
tokens, t2v), their forwards interleaved K D | D K K D ... (ABBA; the side that starts alternates
from one config to the next, and the order is printed). The first pair is the warm-up: one untimed
forward per model, always, whatever its size; its activation peak (the resident high-water mark
during the forward, reset before it, minus the memory before it) is the one reported. Then each
model runs `--runs` timed forwards; the heap is trimmed (malloc_trim) before every forward, so none
runs in pages the other model left. The table gives the median time, the activation peak, the
Kinema / diffusers ratios of both, Kinema's FLOP count (matmuls and attention, counted from the
shapes) and the share of the machine's matmul peak it reaches (the peak is a large square product
through F.linear in the same dtype, the best of a measurement before and after the dtype's configs; for bf16 the faster of the native product
and the float32 way, operands cast up, that Kinema's layers may choose on this machine). For bf16,
the ways Kinema's run chose (kinema/ops/cpu_half.py, raced per shape class) are printed per config.

The text context is a prompt of `--text_tokens` umT5 rows (default 40) zero-padded to 512, as both
pipelines build it (Wan's and diffusers' pipelines pad with zeros to text_len); diffusers attends to all
512 rows, Kinema folds the padding into one key (kinema/models/text_padding.py, exact).

Configs:
  dim512-1k   dim 512, 8 heads, ffn 2048, 8 layers, 1024 tokens (latent 4x32x32)
  dim512-3.5k the same at 3456 tokens (latent 9x32x48)
  dim512      the same at 8192 tokens (latent 8x64x64)
  1.3B-1   the Wan2.1 1.3B block shapes (dim 1536, 12 heads, ffn 8960), 1 layer, 480p tokens
           (832x480x81 -> latent 21x60x104 -> 32760 tokens; --frames lowers the frame count)
  1.3B-2   the same with 2 layers

    python bench/dit_step.py                       # every config, fp32 and bf16 (~40 min on 2 CPU cores)
    python bench/dit_step.py --configs dim512 --dtypes fp32 --runs 3
    python bench/dit_step.py --small               # tiny stand-ins, 10 timed runs each, seconds (a smoke run)

Set OMP_NUM_THREADS to compare at a fixed thread count; both models use the same threads.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import diffusers
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from kinema.loading.dit import dtype_policy
from proc_status import reset_peak, status_bytes
from kinema.models.dit import DiTConfig, WanDiT
from kinema.ops.cpu_half import CHOICES, linear_float32

TEXT_DIM, TEXT_LEN = 4096, 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configs(frames: int) -> dict:
    f480 = (frames - 1) // 4 + 1
    return {
        "dim512-1k": (DiTConfig("t2v", dim=512, ffn_dim=2048, num_heads=8, num_layers=8, text_dim=TEXT_DIM), (4, 32, 32)),
        "dim512-3.5k": (DiTConfig("t2v", dim=512, ffn_dim=2048, num_heads=8, num_layers=8, text_dim=TEXT_DIM), (9, 32, 48)),
        "dim512": (DiTConfig("t2v", dim=512, ffn_dim=2048, num_heads=8, num_layers=8, text_dim=TEXT_DIM), (8, 64, 64)),
        "1.3B-1": (DiTConfig("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=1, text_dim=TEXT_DIM), (f480, 60, 104)),
        "1.3B-2": (DiTConfig("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=2, text_dim=TEXT_DIM), (f480, 60, 104)),
        "small": (DiTConfig("t2v", dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64), (2, 16, 16)),
    }


def flops(cfg: DiTConfig, tokens: int, text: int) -> float:
    """Multiply-adds x 2 of the blocks' matmuls and attention (patch embedding, head and embeddings are < 0.1%)."""
    d, f, L, C = cfg.dim, cfg.ffn_dim, tokens, text
    per_block = (4 * L * d * d  # self-attention q, k, v, o
                 + 2 * L * L * d  # QK^T and PV
                 + 2 * L * d * d + 2 * C * d * d  # cross-attention q, o and k, v
                 + 2 * L * C * d  # cross-attention QK^T and PV
                 + 2 * L * d * f)  # FFN
    return 2.0 * cfg.num_layers * per_block


def matmul_peak(dtype: torch.dtype, n: int = 2048, runs: int = 3) -> tuple[float, str]:
    """FLOP/s of the best of a few n x n x n products through F.linear (the call every linear layer makes), and
    how: in `dtype` itself ('native') or, for bf16 / fp16, also the float32 way (operands cast up, result cast
    back) Kinema's linear layers may choose on a CPU without fast half-precision units; the faster of the two is
    this machine's peak for the dtype. A way slower than 20x the best is timed once."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ways = {"native": lambda: F.linear(a, b)}
    if dtype in (torch.bfloat16, torch.float16):
        ways["float32"] = lambda: linear_float32(a, b, None)
    best = {}
    for way, fn in reversed(ways.items()):  # the float32 way first: it bounds how long native may take
        best[way] = _time(fn)
        if best[way] < 20 * min(best.values()):
            best[way] = min(best[way], *(_time(fn) for _ in range(runs)))
    way = min(best, key=best.__getitem__)
    for other, t in best.items():
        print(f"  {dtype} {n}^3 F.linear {other}: {2 * n**3 / t / 1e9:.1f} GFLOP/s")
    return 2 * n**3 / best[way], way


def trim_heap() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class PeakRSS:
    """Largest resident set size while inside the block, minus the size on entry (bytes): the kernel's
    high-water mark, reset on entry (no sampling thread competing with the timed work for the CPU)."""

    def __enter__(self):
        reset_peak()
        self.start = status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = status_bytes("VmHWM")

    @property
    def delta(self) -> int:
        return self.peak - self.start


def build(cfg: DiTConfig, dtype: torch.dtype) -> tuple[WanDiT, WanTransformer3DModel]:
    """Kinema's model as its loader makes it (fp32 islands), and diffusers' with the same weights
    (cast the way from_pretrained(torch_dtype=...) casts it: `_keep_in_fp32_modules` stay fp32)."""
    torch.manual_seed(0)
    ours = WanDiT(cfg).init_weights()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    policy = dtype_policy(dtype)
    for name, p in ours.named_parameters():
        p.data = p.data.to(policy(name))
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim,
        out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=cfg.eps,
    )
    ref.load_state_dict(convert_wan_transformer_to_diffusers(state), strict=True)
    ref.to(dtype)
    keep = tuple(WanTransformer3DModel._keep_in_fp32_modules)
    for name, module in ref.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    return ours.eval().requires_grad_(False), ref.eval().requires_grad_(False)


def schedule(runs: int, first: str) -> list[tuple[str, str]]:
    """Pairs of forwards in ABBA order, `first` starting: the warm-up pair, then `runs` timed forwards per side."""
    second = "diffusers" if first == "kinema" else "kinema"
    return [(first, second) if i % 2 == 0 else (second, first) for i in range(runs + 1)]


def measure(sides: dict, runs: int, first: str) -> tuple[dict, str]:
    """Run both models as `schedule` orders them. Per side: the median of its timed runs, the activation peak and
    the output of its warm-up forward. Every forward starts from a trimmed heap, so which side ran before it
    changes neither its peak nor the page faults it pays."""
    pairs = schedule(runs, first)
    result = {side: {"times": []} for side in sides}
    with torch.inference_mode():
        for i, pair in enumerate(pairs):
            for side in pair:
                trim_heap()
                if i == 0:  # warm-up, untimed
                    with PeakRSS() as rss:
                        result[side]["out"] = sides[side]()
                    result[side]["peak"] = rss.delta
                else:
                    result[side]["times"].append(_time(sides[side]))
    for r in result.values():
        r["time"] = statistics.median(r["times"])
    letters = [" ".join(side[0].upper() for side in pair) for pair in pairs]
    return result, f"{letters[0]} | {' '.join(letters[1:])}"  # warm-up | timed, e.g. "K D | D K K D"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["dim512-1k", "dim512-3.5k", "dim512", "1.3B-1"])
    ap.add_argument("--text_tokens", type=int, default=40,
                    help="rows of the prompt before its zero padding to 512 (the default is a long prompt)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--runs", type=int, default=None,
                    help="timed runs per model, after one untimed warm-up each (default 2; 10 with --small)")
    ap.add_argument("--frames", type=int, default=81, help="video frames of the 1.3B configs (480p tokens at 81)")
    ap.add_argument("--small", action="store_true", help="only the tiny 'small' config (a smoke run)")
    args = ap.parse_args()
    args.runs = args.runs or (10 if args.small else 2)
    if args.runs < 1:
        ap.error(f"--runs {args.runs}: at least one timed run per model is needed")
    diffusers.logging.set_verbosity_error()  # its note on casting with .to(): build() keeps its fp32 modules itself
    table = configs(args.frames)
    names = ["small"] if args.small else args.configs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    n = 0  # configs measured so far: the side that starts alternates with it
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        peak, way = matmul_peak(dtype)
        print(f"matmul peak {dtype_name}: {peak / 1e9:.1f} GFLOP/s ({way})")
        for name in names:
            cfg, (f, h, w) = table[name]
            ours, ref = build(cfg, dtype)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(1, cfg.in_dim, f, h, w, generator=g)
            t = torch.tensor([500.0])
            ctx = torch.zeros(1, TEXT_LEN, cfg.text_dim)
            ctx[:, : args.text_tokens] = torch.randn(1, args.text_tokens, cfg.text_dim, generator=g) * 0.1
            tokens = f * h * w // 4
            fl = flops(cfg, tokens, TEXT_LEN)
            first, n = ("kinema" if n % 2 == 0 else "diffusers"), n + 1
            sides = {"kinema": lambda: ours(x, t, ctx), "diffusers": lambda: ref(x.to(dtype), t, ctx.to(dtype)).sample}
            r, order = measure(sides, args.runs, first)
            k, d = r["kinema"], r["diffusers"]
            err = ((k["out"].float() - d["out"].float()).norm() / d["out"].float().norm()).item()
            rows.append((name, dtype_name, tokens, k["time"], d["time"], k["peak"], d["peak"], fl, peak, err))
            print(f"  {name} {dtype_name}: order {order}; kinema {', '.join(f'{v:.3f}' for v in k['times'])} s, "
                  f"diffusers {', '.join(f'{v:.3f}' for v in d['times'])} s", flush=True)
            if dtype != torch.float32:
                chosen = {}
                for key, way in CHOICES.ways.items():
                    chosen.setdefault(f"{key[0] if key[0] == 'linear' else 'attention'} {way}", []).append(key)
                print("    Kinema's CPU half-precision ways so far: "
                      + ", ".join(f"{k} x{len(v)}" for k, v in sorted(chosen.items())), flush=True)
            del ours, ref
        again, _ = matmul_peak(dtype)  # once more at the end: the best of the two is the dtype's peak
        if again > peak:
            print(f"matmul peak {dtype_name} at the end: {again / 1e9:.1f} GFLOP/s (used for this dtype's rows)")
            rows = [r[:8] + (again,) + r[9:] if r[1] == dtype_name else r for r in rows]
            peak = again
    print()
    print("| config | dtype | tokens | Kinema s | diffusers s | time K/D | Kinema act. MiB | diffusers act. MiB | "
          "act. peak K/D | GFLOP | Kinema GFLOP/s | % of matmul peak | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, dt, tokens, kt, dtm, km, dm, fl, peak, err in rows:
        print(f"| {name} | {dt} | {tokens} | {kt:.3f} | {dtm:.3f} | {kt / dtm:.2f}x | {km / 2**20:.0f} | {dm / 2**20:.0f} | "
              f"{km / max(dm, 1):.2f}x | {fl / 1e9:.0f} | {fl / kt / 1e9:.1f} | {100 * fl / kt / peak:.0f}% | {err:.1e} |")
    print()
    for name, dt, _, kt, dtm, km, dm, *_ in rows:
        print(f"{name} {dt}: Kinema {kt / dtm:.2f}x of diffusers' time, {km / max(dm, 1):.2f}x of its activation peak")


if __name__ == "__main__":
    main()
