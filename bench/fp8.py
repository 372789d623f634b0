"""fp8 weights: weight bytes and output error of each fp8 mode against the same model in bf16.

Models (random weights, seeded): a 1.3B-shaped DiT cut to 2 blocks (dim 1536, 12 heads,
ffn 8960, text_dim 4096) with its modulation tables drawn at std 0.5, so the blocks make
a large part of the output and their error shows, and a umT5 of XXL widths cut to 2 blocks
(dim 4096, 64 heads, ffn 10240). Both are built the way the loaders build them (bf16 big
matrices, the DiT's float32 islands), quantised in memory, and run on the same inputs.
Weight bytes count every parameter and buffer, the kept high-precision ones included;
the full-depth DiT rows are exact byte counts on the meta device (no memory used).
Relative error: max |fp8 - bf16| / max |bf16| (the test suite's measure) and the L2 ratio.

    OMP_NUM_THREADS=1 python bench/fp8.py            # the shapes above (~4 GB RAM, a few minutes on 1 core)
    OMP_NUM_THREADS=1 python bench/fp8.py --small    # dim 256 / 64 stand-ins, seconds
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from kinema.loading.dit import dtype_policy
from kinema.ops.fp8 import MODES, quantize_fp8, weight_bytes
from kinema.models.dit import WAN_DIT, DiTConfig, WanDiT
from kinema.models.t5 import UMT5Encoder

DIT = {
    "full": DiTConfig("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=2, text_dim=4096),
    "small": DiTConfig("t2v", dim=256, ffn_dim=1024, num_heads=2, num_layers=2, text_dim=64),
}
T5 = {
    "full": dict(vocab_size=4096, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=2),
    "small": dict(vocab_size=256, dim=256, dim_attn=256, dim_ffn=640, num_heads=4, num_layers=2),
}


def as_loaded(model: torch.nn.Module, dtype: torch.dtype, policy=None) -> torch.nn.Module:
    policy = policy or (lambda _name: dtype)
    for name, p in model.named_parameters():
        p.data = p.data.to(policy(name))
    return model.eval().requires_grad_(False)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max()).item(), ((got - want).norm() / want.norm()).item()


def timed(run, model):
    with torch.no_grad():
        run(model)  # warm-up
        t0 = time.perf_counter()
        out = run(model)
    return out, (time.perf_counter() - t0) * 1e3


def measure(name: str, model: torch.nn.Module, run) -> list[dict]:
    want, ms = timed(run, model)
    base = weight_bytes(model)
    rows = [dict(model=name, mode="bf16", bytes=base, ratio=1.0, err=(0.0, 0.0), ms=ms)]
    for mode in MODES:
        quantised = quantize_fp8(copy.deepcopy(model), mode)
        got, ms = timed(run, quantised)
        rows.append(dict(model=name, mode=mode, bytes=weight_bytes(quantised), ratio=weight_bytes(quantised) / base,
                         err=errors(got, want), ms=ms))
        del quantised
    return rows


def full_depth_bytes() -> list[str]:
    lines = []
    for variant in ("t2v-1.3B", "t2v-14B"):
        with torch.device("meta"):
            model = as_loaded(WanDiT(WAN_DIT[variant]), torch.bfloat16, dtype_policy(torch.bfloat16))
        base = weight_bytes(model)
        fp8 = weight_bytes(quantize_fp8(model, "fp8_e4m3fn_scaled"))  # every mode stores 1 byte per weight
        lines.append(f"{variant} full depth (meta, exact): bf16 {base / 2**30:.2f} GiB -> fp8 {fp8 / 2**30:.2f} GiB "
                     f"= {fp8 / base:.4f}x (target <= 0.52x)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small stand-ins (dim 256 DiT, dim 256 umT5) instead of the 1.3B / XXL widths")
    args = ap.parse_args()
    size = "small" if args.small else "full"
    torch.manual_seed(0)

    cfg = DIT[size]
    dit = WanDiT(cfg)
    with torch.no_grad():
        for block in dit.blocks:
            block.modulation.normal_(0, 0.5)
    dit = as_loaded(dit, torch.bfloat16, dtype_policy(torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 5, 16, 16, generator=g)  # latents [B, C, F, H, W] -> 5 x 8 x 8 = 320 tokens
    context = torch.randn(1, 32, cfg.text_dim, generator=g)
    t = torch.tensor([500.0])
    blocks, dit.blocks = dit.blocks, torch.nn.ModuleList()
    with torch.no_grad():
        without_blocks = dit(x, t, context)
    dit.blocks = blocks

    def run_dit(m):
        return m(x, t, context)

    t5 = as_loaded(UMT5Encoder(**T5[size]), torch.bfloat16)
    ids = torch.randint(0, T5[size]["vocab_size"], (2, 64), generator=g)

    def run_t5(m):
        return m(ids)

    dit_name = f"DiT dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_layers} blocks"
    rows = measure(dit_name, dit, run_dit)
    rows += measure(f"umT5 dim {T5[size]['dim']}, ffn {T5[size]['dim_ffn']}, 2 blocks", t5, run_t5)

    with torch.no_grad():
        blocks_share = errors(without_blocks, dit(x, t, context))[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); DiT blocks' share of its output "
          f"(max |out - out without blocks| / max |out|): {blocks_share:.2f}")
    print(f"{'model':<34} {'mode':<18} {'weights MiB':>11} {'x bf16':>7} {'rel err max':>11} {'rel err L2':>10} {'fwd ms (CPU)':>12}")
    for r in rows:
        print(f"{r['model']:<34} {r['mode']:<18} {r['bytes'] / 2**20:>11.1f} {r['ratio']:>7.3f} "
              f"{r['err'][0]:>11.4f} {r['err'][1]:>10.4f} {r['ms']:>12.1f}")
    for line in full_depth_bytes():
        print(line)
    print("targets: full-depth DiT weight bytes <= 0.52x bf16; DiT output relative error <= 3%")


if __name__ == "__main__":
    main()
