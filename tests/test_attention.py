"""Attention backends: selection, dispatch to flash_attn / sageattn (fake modules here), fallbacks, errors.

The real kernels need a CUDA GPU; their test skips without one. Everything else
injects stand-in `flash_attn` / `sageattention` modules and lets the kernels'
path run on CPU tensors (`KERNEL_DEVICES`), to check what Kinema passes and uses.
"""

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import StubTextEncoder

from kinema.cli.main import main
from kinema.errors import KinemaError
from kinema.ops import attention as attn
from kinema.ops import cpu_half

B, LQ, LK, H, D = 2, 7, 5, 3, 16  # Lq != Lk != H, so a wrong layout cannot pass


def _sdpa(q, k, v, scale=None):
    """The reference, computed independently of Kinema, from [B, L, H, D] inputs."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


@pytest.fixture(autouse=True)
def _fresh_kernel_cache(monkeypatch):
    monkeypatch.setattr(attn, "_LOADED", {})  # the fakes below must be imported anew by each test


@pytest.fixture
def fakes(monkeypatch):
    """Stand-in kernel modules that record their calls and return the true attention + 1 (so using it shows)."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, **kwargs):
        calls.append(dict(name="flash_attn", q=q, k=k, v=v, scale=softmax_scale, kwargs=kwargs))
        return (_sdpa(q, k, v, softmax_scale) + 1).to(q.dtype)

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kwargs):
        calls.append(dict(name="sageattn", q=q, k=k, v=v, scale=sm_scale, layout=tensor_layout, causal=is_causal))
        assert tensor_layout == "NHD"
        return (_sdpa(q, k, v, sm_scale) + 1).to(q.dtype)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    monkeypatch.setattr(attn, "KERNEL_DEVICES", ("cuda", "cpu"))  # let the kernels' path take CPU tensors
    return calls


def _qkv(dtype=torch.float16, d=D):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, n, H, d, generator=g).to(dtype) for n in (LQ, LK, LK)]


@pytest.mark.parametrize("name", ["flash_attn", "sageattn"])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_dispatch_layout_and_output(fakes, name, scale):
    q, k, v = _qkv()
    assert attn.resolve_backend(name) == name
    out = attn.attention(q, k, v, scale=scale, backend=name)
    (call,) = fakes
    assert call["name"] == name and call["q"] is q and call["k"] is k and call["v"] is v  # [B, L, H, D], no copies
    assert call["scale"] == scale
    if name == "sageattn":
        assert call["layout"] == "NHD" and call["causal"] is False
    assert out.shape == (B, LQ, H, D) and out.dtype == torch.float16
    assert torch.allclose(out.float(), _sdpa(q, k, v, scale) + 1, atol=2e-2)  # the kernel's output, as it returned it


@pytest.mark.parametrize("name", ["flash_attn", "sageattn"])
def test_fallbacks_to_sdpa(fakes, monkeypatch, name):
    attn.resolve_backend(name)
    q, k, v = _qkv()
    cases = {
        "mask": dict(mask=torch.ones(B, LK, dtype=torch.bool)),
        "float32": dict(dtype=torch.float32),
        "head_dim": dict(d=attn.MAX_HEAD_DIM[name] + 8),
    }
    for why, case in cases.items():
        qq, kk, vv = _qkv(case.get("dtype", torch.float16), case.get("d", D))
        out = attn.attention(qq, kk, vv, mask=case.get("mask"), backend=name)
        assert not fakes, why
        assert torch.allclose(out.float(), _sdpa(qq, kk, vv), atol=2e-2), why
    monkeypatch.setattr(attn, "KERNEL_DEVICES", ("cuda",))  # CPU tensors
    attn.attention(q, k, v, backend=name)
    assert not fakes
    monkeypatch.setattr(attn, "KERNEL_DEVICES", ("cuda", "cpu"))
    q.requires_grad_(True)
    with torch.enable_grad():
        attn.attention(q, k, v, backend=name)
    assert [c["name"] for c in fakes] == ([] if name == "sageattn" else ["flash_attn"])  # sageattn has no backward


def test_auto_picks_the_best_installed(fakes, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="kinema"):
        assert attn.resolve_backend("auto", announce=True) == "sageattn"
    assert "Attention backend: sageattn (auto)" in caplog.text
    monkeypatch.setitem(sys.modules, "sageattention", None)  # not installed
    assert attn.resolve_backend("auto") == "flash_attn"
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert attn.resolve_backend("auto") == "sdpa"
    assert attn.available_backends() == ["sdpa"]


def test_auto_without_cuda_is_sdpa(fakes, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attn.available_backends() == ["sdpa", "flash_attn", "sageattn"]
    assert attn.resolve_backend("auto") == "sdpa"


def test_unknown_and_missing_backends(monkeypatch):
    with pytest.raises(KinemaError, match="unknown; use one of sdpa, flash_attn, sageattn, auto"):
        attn.resolve_backend("xformers")
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "sageattention", None)
    with pytest.raises(KinemaError, match="pip install flash-attn"):
        attn.resolve_backend("flash_attn")
    with pytest.raises(KinemaError, match="pip install sageattention"):
        attn.resolve_backend("sageattn")
    assert attn._LOADED == {}  # nothing half-imported


def test_the_backend_is_per_call_not_global(fakes):
    """A call names its backend; nothing it does changes what another call (another pipeline) uses."""
    q, k, v = _qkv()
    attn.attention(q, k, v, backend="flash_attn")
    assert [c["name"] for c in fakes] == ["flash_attn"]
    assert torch.allclose(attn.attention(q, k, v).float(), _sdpa(q, k, v), atol=2e-2) and len(fakes) == 1


def test_pipeline_uses_its_backend(fakes):
    """A pipeline's runtime backend routes the DiT's attention to the kernel; another pipeline keeps sdpa."""
    from kinema.models.dit import DiTConfig, WanDiT
    from kinema.models.vae import WanVAE
    from kinema.pipeline.models import Models, Runtime
    from kinema.pipeline.pipeline import Pipeline

    vae = WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval().requires_grad_(False)
    dit = WanDiT(DiTConfig("t2v", dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=1)).eval().half()

    def run(backend):
        runtime = Runtime(torch.device("cpu"), torch.float16, torch.float32, attn.resolve_backend(backend))
        return Pipeline(Models(dit, vae, StubTextEncoder()), runtime)(
            "a red circle", size=(32, 32), frame_num=1, steps=2, progress=False, decode=False, seed=0)

    out = run("flash_attn")
    # 2 steps x (cond + uncond) x (self + cross attention); the VAE / text encoder are outside the block
    assert [c["name"] for c in fakes] == ["flash_attn"] * 8
    assert out.settings["attention"] == "flash_attn"
    # the kernel's output (the true attention + 1) is what the blocks used: the latents move off the sdpa run's
    fakes.clear()
    ref = run("sdpa")
    assert not fakes and "attention" not in ref.settings
    assert (out.latents - ref.latents).abs().max() > 1e-2
    assert torch.equal(run("sdpa").latents, ref.latents)  # and the difference is not run-to-run noise


@pytest.mark.parametrize("argv", [["--attention", "flash_attn"], ["--attention", "xformers"]])
def test_cli_attention_errors(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert main(["generate", "--prompt", "a red circle", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert ("pip install flash-attn" in err) if argv[1] == "flash_attn" else ("unknown; use one of" in err)


@pytest.mark.parametrize("name", ["flash_attn", "sageattn"])
def test_real_kernel_matches_sdpa(name):
    if not torch.cuda.is_available():
        pytest.skip("the flash_attn / sageattn kernels run on CUDA only; no GPU here")
    pytest.importorskip(attn.KERNELS[name][0], reason=f"{attn.KERNELS[name][0]} is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16) for n in (300, 77, 77))
    want = attn.attention(q, k, v).float()
    got = attn.attention(q, k, v, backend=attn.resolve_backend(name)).float()
    tol = 1e-2 if name == "flash_attn" else 5e-2  # sageattn quantises Q and K to int8
    assert ((got - want).abs().max() / want.abs().max()).item() < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", [None, "keys", "per_head", "bias"])
def test_cpu_half_float32_way_by_head_groups(monkeypatch, dtype, mask_kind):
    """The float32 way of bf16 / fp16 CPU attention: float32 attention of the same inputs, a group of heads at a
    time, bit for bit; the native way agrees to the half precision's rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 4, 8, generator=g).to(dtype) for _ in range(3))
    mask = {None: None, "keys": torch.tensor([[True] * 7, [True] * 4 + [False] * 3])[:, None, None, :],
            "per_head": torch.randn(1, 4, 7, 7, generator=g), "bias": torch.randn(2, 1, 1, 7, generator=g)}[mask_kind]
    whole = cpu_half.in_float32(q, k, v, mask, None)
    monkeypatch.setattr(cpu_half, "CPU_HEAD_GROUP_BYTES", 2 * 7 * 8 * 4)  # one head per group
    grouped = cpu_half.in_float32(q, k, v, mask, None)
    want = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2)
    assert grouped.dtype == whole.dtype == dtype
    assert torch.equal(grouped, whole)
    assert torch.equal(grouped, want.to(dtype))
    native = cpu_half.native(q, k, v, mask, None)
    assert native.dtype == dtype and (native.float() - want).abs().max().item() < 2e-2


def test_cpu_half_way_is_raced_once_per_shape_class(monkeypatch):
    """The first call of a shape class times both ways and keeps the faster; later calls of the class (other
    lengths rounding to the same powers of two) run that way alone, a new class races again."""
    calls = []
    clock = iter(range(10_000))

    def fake(name, cost):
        def run(q, k, v, mask, scale):
            calls.append(name)
            for _ in range(cost - 1):
                next(clock)
            return cpu_half.in_float32(q, k, v, mask, scale)
        return run

    monkeypatch.setattr(cpu_half.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(cpu_half, "RUN", {"native": fake("native", 2), "float32": fake("float32", 3)})
    choices = cpu_half.CpuHalfChoices()
    q = torch.randn(1, 100, 2, 8).bfloat16()
    out = cpu_half.cpu_half_attention(q, q, q, None, None, choices)
    assert calls == ["native", "float32", "native", "float32"]  # float32 lost by less than 2x: both run twice
    assert out.dtype == torch.bfloat16 and list(choices.ways.values()) == ["native"]
    calls.clear()
    cpu_half.cpu_half_attention(torch.randn(1, 120, 2, 8).bfloat16(), q, q, None, None, choices)  # 120 -> 128 too
    assert calls == ["native"]
    calls.clear()
    monkeypatch.setattr(cpu_half, "RUN", {"native": fake("native", 20), "float32": fake("float32", 2)})
    cpu_half.cpu_half_attention(torch.randn(1, 300, 2, 8).bfloat16(), q, q, None, None, choices)  # a new class
    assert calls == ["native", "float32", "float32"]  # native lost by more than 2x: not run again
    assert sorted(choices.ways.values()) == ["float32", "native"]


def test_cpu_half_way_can_be_pinned(monkeypatch):
    q = torch.randn(1, 9, 2, 8).bfloat16()
    choices = cpu_half.CpuHalfChoices()
    monkeypatch.setenv("KINEMA_CPU_HALF", "float32")
    assert torch.equal(cpu_half.cpu_half_attention(q, q, q, None, None, choices), cpu_half.in_float32(q, q, q, None, None))
    assert not choices.ways  # no race
    monkeypatch.setenv("KINEMA_CPU_HALF", "fast")
    with pytest.raises(KinemaError, match="KINEMA_CPU_HALF='fast'"):
        cpu_half.cpu_half_attention(q, q, q, None, None, choices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_half_linear_ways(dtype, bias):
    """Both ways of a half-precision linear layer give F.linear's result: the float32 way is the float32 product
    rounded once (exactly), the native way within half-precision rounding of it; float32 weights are plain F.linear."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 37, 64).to(dtype), (torch.randn(48, 64) / 8).to(dtype)
    b = torch.randn(48).to(dtype) if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    up = cpu_half.linear_float32(x, w, b)
    assert up.dtype == dtype and torch.equal(up, want.to(dtype))
    nat = F.linear(x, w, b)
    assert (nat.float() - want).abs().max().item() < 3e-2
    for way in cpu_half.WAYS:
        choices = cpu_half.CpuHalfChoices()
        choices.ways.update({key: way for key in [("linear", dtype, (48, 64), bias, 128, torch.get_num_threads())]})
        got = cpu_half.linear(x, w, b, choices)
        assert torch.equal(got, nat if way == "native" else up)
    x32, w32 = x.float(), w.float()
    assert torch.equal(cpu_half.linear(x32, w32, None, cpu_half.CpuHalfChoices()), F.linear(x32, w32))


def test_cpu_half_linear_races_on_a_bounded_slice(monkeypatch):
    """A linear layer's first call per class races the two ways on at most RACE_ROWS rows of its input, keeps the
    winner, and runs the whole input that way; classes are rows rounded up to a power of two, capped at RACE_ROWS."""
    seen = []

    def fake(name, cost):
        def run(x, w, b):
            seen.append((name, x.shape[0] if x.dim() == 2 else None))
            for _ in range(cost - 1):
                next(clock)
            return cpu_half.linear_float32(x, w, b)
        return run

    clock = iter(range(10_000))
    monkeypatch.setattr(cpu_half.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(cpu_half, "RACE_ROWS", 16)
    monkeypatch.setattr(cpu_half, "LINEAR", {"native": fake("native", 30), "float32": fake("float32", 2)})
    choices = cpu_half.CpuHalfChoices()
    w = torch.randn(8, 4).bfloat16()
    x = torch.randn(2, 40, 4).bfloat16()  # 80 rows: the race runs on 16
    out = cpu_half.linear(x, w, None, choices)
    assert seen == [("native", 16), ("float32", 16), ("float32", 16), ("float32", None)]  # then the whole input
    assert out.shape == (2, 40, 8) and torch.equal(out, cpu_half.linear_float32(x, w, None))
    seen.clear()
    cpu_half.linear(torch.randn(1000, 4).bfloat16(), w, None, choices)  # 1000 rows: the same (capped) class
    assert seen == [("float32", 1000)] and len(choices.ways) == 1
    seen.clear()
    small = torch.randn(5, 4).bfloat16()  # 5 rows -> class 8, small enough that the race's own output is returned
    with torch.no_grad():  # (with autograd on, the call runs again so its result has a graph)
        assert torch.equal(cpu_half.linear(small, w, None, choices), cpu_half.linear_float32(small, w, None))
    assert [name for name, _ in seen] == ["native", "float32", "float32"] and len(choices.ways) == 2
    monkeypatch.setenv("KINEMA_CPU_HALF", "native")
    seen.clear()
    cpu_half.linear(torch.randn(3, 4).bfloat16(), w, None, cpu_half.CpuHalfChoices())
    assert seen == [("native", 3)]


def test_bf16_models_run_their_matrices_through_the_cpu_choice(monkeypatch):
    """The DiT's, umT5's and CLIP's linear layers call kinema.ops.cpu_half.linear (the float32 way pinned here)."""
    from kinema.models import clip, layers, t5
    calls = []
    real = cpu_half.linear
    monkeypatch.setattr(layers, "linear", lambda *a: calls.append(a[1].dtype) or real(*a))
    monkeypatch.setenv("KINEMA_CPU_HALF", "float32")
    for mod in (t5.T5FeedForward(8, 16), clip.Linear(8, 8)):
        mod.to(torch.bfloat16)(torch.randn(2, 3, 8).bfloat16())
    assert calls and set(calls) == {torch.bfloat16}
    assert isinstance(t5.T5Attention(8, 8, 2).q, layers.Linear) and clip.Linear is layers.Linear
