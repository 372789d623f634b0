"""Regional torch.compile of the DiT blocks: one compiled block forward shared by every block, same output."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from kinema.cli.main import main
from kinema.errors import KinemaError
from kinema.loading.dit import dtype_policy
from kinema.memory.compile import compile_blocks, compiler_unavailable, uncompile_blocks
from kinema.ops.fp16_guard import guard_fp16
from kinema.models.dit import DiTConfig, WanDiT

CFG = DiTConfig("t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=3, text_dim=16, freq_dim=32)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def no_compiler():
    """Inductor looking for its C++ compiler where there is none."""
    return torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)})


def _dit() -> WanDiT:
    torch.manual_seed(0)
    dit = WanDiT(CFG).eval().requires_grad_(False)
    for b in dit.blocks:
        b.modulation.normal_(0, 0.5)
    return dit


def _inputs(t: float = 700.0):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([t]), torch.randn(1, 12, CFG.text_dim, generator=g)


def test_one_graph_for_all_blocks_and_same_output():
    """The wrapping itself, traced by dynamo without inductor (fast): one graph serves every block."""
    dit = _dit()
    keys = list(dit.state_dict())
    with torch.no_grad():
        eager = [dit(*_inputs(t)) for t in (700.0, 300.0)]
        mode = compile_blocks(dit, backend="aot_eager")
        got = [dit(*_inputs(t)) for t in (700.0, 300.0)]
    assert counters["stats"]["unique_graphs"] == 1  # 3 blocks x 2 steps, one compilation
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, eager))
    assert list(dit.state_dict()) == keys and mode == "default"  # names and weights untouched
    assert all("forward" in vars(b) for b in dit.blocks) and not hasattr(dit, "compiled")  # nothing on the DiT itself
    uncompile_blocks(dit)
    assert "forward" not in vars(dit.blocks[0])


def test_fp16_guard_recomputes_a_compiled_block_eagerly():
    dit = _dit()
    dit.blocks[0].ffn[0].weight.mul_(300)
    dit.blocks[0].ffn[2].weight.mul_(300)
    with torch.no_grad():
        ref = dit(*_inputs())
        half = copy.deepcopy(dit)
        policy = dtype_policy(torch.float16)  # as load_dit(dtype=torch.float16) casts
        for name, p in half.named_parameters():
            p.data = p.data.to(policy(name))
        guard = guard_fp16(half)
        compile_blocks(half, backend="aot_eager")
        out = half(*_inputs())
    assert guard.recomputed == 1 and torch.isfinite(out).all()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 2e-3


def test_composes_with_fp8_and_block_swap():
    """fp8 layers and block swap (forward hooks that move the weights) around compiled blocks: same output."""
    from kinema.memory.block_swap import BlockSwap
    from kinema.ops.fp8 import quantize_fp8

    dit = quantize_fp8(_dit(), "fp8_e4m3fn_scaled", compute_dtype=torch.float32)
    with torch.no_grad():
        eager = [dit(*_inputs(t)) for t in (700.0, 300.0)]
        BlockSwap(dit, 2, 1, device="cpu")
        compile_blocks(dit, backend="aot_eager")
        got = [dit(*_inputs(t)) for t in (700.0, 300.0)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, eager))


@pytest.mark.slow  # inductor writes and builds C++ on the first call: 22 s on one core (4 s with its disk cache warm)
def test_inductor_on_cpu_equals_eager():
    if compiler_unavailable("cpu"):
        pytest.skip(compiler_unavailable("cpu"))
    dit = _dit()
    with torch.no_grad():
        eager = dit(*_inputs())
        compile_blocks(dit)
        compiled = dit(*_inputs())
    assert (compiled - eager).abs().max().item() < 1e-5


def test_bad_mode_and_missing_compiler():
    with pytest.raises(KinemaError, match="compile mode 'fast' is unknown"):
        compile_blocks(_dit(), "fast")
    with no_compiler():
        assert "C++ compiler" in compiler_unavailable("cpu")
        with pytest.raises(KinemaError, match="needs a C\\+\\+ compiler"):
            compile_blocks(_dit())


@pytest.mark.parametrize("flag", [["--compile", "fast"], ["--compile"]])
def test_cli_compile_errors(capsys, flag):
    """A bad mode, or no compiler: one line and exit code 2, before any model loads."""
    if len(flag) == 1 and torch.cuda.is_available():
        pytest.skip("with a GPU --compile checks Triton, not the C++ compiler")
    with no_compiler():
        assert main(["generate", "--prompt", "a red circle", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert ("unknown; use one of" in err) if len(flag) == 2 else ("needs a C++ compiler" in err)
