"""Regional torch.compile: the DiT's transformer block compiled once, reused by every block.

Compiling the whole DiT traces all its blocks into one long graph (minutes for
a 40-block model) and recompiles whenever step caching skips the blocks or
block swap moves them. All blocks run the same code on same-shaped weights, so
Kinema compiles `DiTBlock.forward` alone, once, and binds that compiled function
to each block: the first block's call compiles it, the others reuse the graph
(weights are graph inputs). The block modules themselves stay as they are (names,
weights, hooks), so LoRA, fp8, the fp16 guard and block swap work unchanged
around them; the fp16 guard recomputes an overflowed block eagerly.

On the CPU inductor writes C++ and needs a C++ compiler (g++ or clang++); on CUDA
it writes Triton kernels, which need Triton and a C compiler.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import types

import torch
from torch import nn

from kinema.errors import KinemaError

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compiler_unavailable(device: torch.device | str) -> str | None:
    """Why torch.compile's inductor cannot build kernels for `device`, or None when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs Triton (pip install triton), which is not installed"
        cc = os.environ.get("CC")
        if not (shutil.which(cc) if cc else any(shutil.which(c) for c in ("cc", "gcc", "clang"))):
            return "torch.compile on CUDA needs a C compiler for Triton (gcc or clang on PATH, or CC); none was found"
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own InvalidCxxCompiler
        detail = " ".join(str(exc).split())  # one line
        need = "torch.compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX)"
        return f"{need}: {detail}" if detail else need
    return None


def check_compile(mode: str | None, device: torch.device | str) -> str:
    """The mode ('default' for None), after checking it and the compiler: a KinemaError otherwise."""
    mode = mode or "default"
    if mode not in MODES:
        raise KinemaError(f"compile mode {mode!r} is unknown; use one of {', '.join(MODES)}.")
    reason = compiler_unavailable(device)
    if reason:
        raise KinemaError(f"{reason}. Install it, or run without --compile / compile_blocks (eager computes the same).")
    return mode


@functools.lru_cache(maxsize=None)
def _compiled(cls: type, mode: str, backend: str, dynamic: bool | None):
    """One compiled forward per block class and settings, shared by every block and every model."""
    return torch.compile(cls.forward, mode=None if mode == "default" else mode, backend=backend, dynamic=dynamic)


def compile_blocks(dit: nn.Module, mode: str | None = None, backend: str = "inductor",
                   dynamic: bool | None = None, device: torch.device | str | None = None) -> str:
    """Run each of the DiT's repeated blocks (`_repeated_blocks`) through one torch.compile'd block forward;
    returns the mode used (the pipeline records it).

    `mode`: 'default', 'reduce-overhead', 'max-autotune' or 'max-autotune-no-cudagraphs'.
    Compilation happens on the first call (see the README for its cost). `backend` other
    than inductor ('eager', 'aot_eager') skips the compiler check: for debugging. `device`: where the
    blocks will run (default: where the DiT's weights are now; offload and streaming keep them elsewhere)."""
    device = device if device is not None else next(dit.parameters()).device
    mode = check_compile(mode, device) if backend == "inductor" else (mode or "default")
    for block in _blocks(dit):
        block.forward = types.MethodType(_compiled(type(block), mode, backend, dynamic), block)
    return mode


def uncompile_blocks(dit: nn.Module) -> nn.Module:
    """Back to eager blocks."""
    for block in _blocks(dit):
        block.__dict__.pop("forward", None)
    return dit


def _blocks(dit: nn.Module) -> nn.ModuleList:
    return getattr(dit, getattr(type(dit), "_repeated_blocks", "blocks"))
