"""Precision: bf16 / fp16 error against fp32 on a tiny DiT, and the fp16 overflow guard."""

import logging

import pytest
import torch
from conftest import rel_err
from safetensors.torch import save_file

import kinema
from kinema.ops.fp8 import quantize_fp8
from kinema.loading.dit import open_dit
from kinema.ops.fp16_guard import guard_fp16
from kinema.models.dit import DiTConfig, WanDiT

CFG = DiTConfig("t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=16, freq_dim=32)
FP16_MAX = torch.finfo(torch.float16).max
# Measured (seed 0): bf16 2.7e-3, fp16 3.8e-4 on the normal model; guarded fp16 4.7e-4 (bf16 4.2e-3) on the
# overflowing one, where plain fp16 gives NaN.
BF16_BOUND, FP16_BOUND, GUARDED_BOUND = 1e-2, 2e-3, 2e-3


def _dit(ffn_gain: float = 1.0) -> WanDiT:
    """A tiny random DiT whose modulation tables are drawn at std 0.5, so the blocks make much of the output;
    `ffn_gain` scales both FFN matrices of block 0 (gain^2 on its output)."""
    torch.manual_seed(0)
    dit = WanDiT(CFG).eval().requires_grad_(False)
    for mod in [dit.head.modulation, *(b.modulation for b in dit.blocks)]:
        mod.normal_(0, 0.5)
    dit.blocks[0].ffn[0].weight.mul_(ffn_gain)
    dit.blocks[0].ffn[2].weight.mul_(ffn_gain)
    return dit


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 12, CFG.text_dim, generator=g)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for name, gain in (("normal", 1.0), ("overflow", 300.0)):
        out[name] = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in _dit(gain).state_dict().items()}, out[name])
    return out


def _load(path, dtype, **kw):
    """The loaded record: its model and the fp16 guard the loader installed (None unless fp16)."""
    return open_dit(path, num_heads=CFG.num_heads).load(dtype, **kw)


def _run(path, dtype):
    loaded = _load(path, dtype)
    with torch.no_grad():
        return loaded, loaded.model(*_inputs())


def test_bf16_and_fp16_error_against_fp32(files):
    _, ref = _run(files["normal"], torch.float32)
    bf16_dit, bf16 = _run(files["normal"], torch.bfloat16)
    fp16_dit, fp16 = _run(files["normal"], torch.float16)
    assert rel_err(bf16, ref) < BF16_BOUND
    assert rel_err(fp16, ref) < FP16_BOUND  # 3 more mantissa bits than bf16: ~8x smaller error
    assert bf16_dit.fp16_guard is None  # only fp16 models are guarded
    assert fp16_dit.fp16_guard.recomputed == 0


def test_fp16_overflow_guard(files, caplog):
    fp32, ref = _run(files["overflow"], torch.float32)
    seen = []
    fp32.model.blocks[0].ffn[2].register_forward_hook(lambda m, a, out: seen.append(out.abs().max().item()))
    with torch.no_grad():
        fp32.model(*_inputs())
    assert max(seen) > FP16_MAX  # the float32 FFN output is beyond fp16's range

    loaded = _load(files["overflow"], torch.float16)
    dit = loaded.model
    weights = {k: v.clone() for k, v in dit.state_dict().items()}
    loaded.fp16_guard.remove()
    with torch.no_grad():
        assert not torch.isfinite(dit(*_inputs())).all()  # plain fp16: inf in the residual stream, NaN out

    guard = guard_fp16(dit)
    with caplog.at_level(logging.WARNING, logger="kinema"), torch.no_grad():
        out = dit(*_inputs())
        again = dit(*_inputs())
    assert torch.isfinite(out).all() and torch.equal(out, again)
    assert rel_err(out, ref) < GUARDED_BOUND  # block 0 recomputed in float32, block 1 in fp16
    assert guard.recomputed == 2  # block 0, once per call
    assert len([r for r in caplog.records if "fp16 overflow" in r.message]) == 1  # warned once
    for k, v in dit.state_dict().items():  # the weights went back to fp16 unchanged
        assert v.dtype == weights[k].dtype and torch.equal(v, weights[k]), k


def test_guard_changes_nothing_when_finite(files):
    loaded, guarded = _run(files["normal"], torch.float16)
    loaded.fp16_guard.remove()
    with torch.no_grad():
        assert torch.equal(loaded.model(*_inputs()), guarded)
    for dtype in (torch.float32, torch.bfloat16):
        assert guard_fp16(kinema.load_dit(files["normal"], dtype=dtype, num_heads=CFG.num_heads)) is None


def test_guard_covers_fp8_layers_computing_in_fp16(files):
    _, ref = _run(files["overflow"], torch.float32)
    loaded = _load(files["overflow"], torch.float16, quantization="fp8_e4m3fn_scaled")
    dit = loaded.model
    assert dit.blocks[0].ffn[0].compute_dtype == torch.float16
    with torch.no_grad():
        out = dit(*_inputs())
    assert torch.isfinite(out).all() and loaded.fp16_guard.recomputed == 1
    assert rel_err(out, ref) < 6e-2  # the fp8 weights' own error: 4.1e-2 measured
    assert dit.blocks[0].ffn[0].compute_dtype == torch.float16 and dit.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn


def test_quantize_after_guard_is_still_guarded(files):
    """guard_fp16 hooks the blocks, not their Linear layers, so swapping layers later keeps it."""
    _, ref = _run(files["overflow"], torch.float32)
    loaded = _load(files["overflow"], torch.float16)
    dit = loaded.model
    quantize_fp8(dit, "fp8_e4m3fn_scaled")
    with torch.no_grad():
        out = dit(*_inputs())
        assert torch.isfinite(out).all()
    assert dit.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn and loaded.fp16_guard.recomputed == 1
    assert rel_err(out, ref) < 6e-2  # block 0 recomputed: only the fp8 weights' own error is left
