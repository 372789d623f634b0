"""The engine reproduces the golden runs of the built-in model (first recorded before the Pipeline existed,
recorded anew through it when the built-in model was retrained: tests/golden/record_builtin.py).

tests/golden/builtin.npz holds the final latents and decoded frames of every case in
tests/golden/builtin_cases.py (t2v, t2i, i2v, flf2v, v2v, and t2v with step caching, a LoRA,
VAE tiles, block swap, fp8 and batched guidance), recorded first through the
pre-refactor `generate()` as `kinema generate` assembled the models. On the machine that recorded them
(same PyTorch, kernel instruction set, CPU and thread count) they must match bit for bit. On
another CPU the kernels' summation order differs in the last bits: emulating other machines here
(ATEN_CPU_CAPABILITY=avx2 / default, oneDNN and MKL limited to AVX2, one thread) moved the latents
by at most 2.6e-5 and a few frame values by one level, so elsewhere the bound is 2e-4 on the
latents and at most 2 levels on any pixel, with at most 0.5% of the values changed at all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from builtin_cases import CASES, DATA, machine  # noqa: E402
from record_builtin import run_case  # noqa: E402

LATENT_TOL = 2e-4
FRAME_TOL = 2
FRAME_SHARE = 0.005

_PIPELINES: dict = {}


@pytest.fixture(scope="module")
def golden():
    data = np.load(DATA)
    recorded = json.loads(str(data["machine"]))["machine"]
    return data, recorded == machine()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_engine_reproduces_the_golden_run(golden, case):
    data, same_machine = golden
    latents, frames = run_case(case, _PIPELINES)
    want_latents, want_frames = torch.from_numpy(data[f"{case.name}/latents"]), data[f"{case.name}/frames"]
    assert latents.shape == want_latents.shape and frames.shape == want_frames.shape
    if same_machine:
        assert torch.equal(latents, want_latents), (case.name, (latents - want_latents).abs().max().item())
        assert np.array_equal(frames, want_frames), case.name
    else:
        assert (latents - want_latents).abs().max().item() <= LATENT_TOL, case.name
        diff = np.abs(frames.astype(np.int16) - want_frames.astype(np.int16))
        assert diff.max() <= FRAME_TOL and (diff > 0).mean() <= FRAME_SHARE, case.name


def test_the_cases_differ_from_each_other(golden):
    """Each option that changes the numbers does (else its case would not test it); block swap, which only
    moves weights, equals plain t2v bit for bit, and batched guidance equals it within float rounding."""
    data, _ = golden
    plain = data["t2v/latents"]
    for case in CASES:
        if case.name.startswith("t2v-") and case.name not in ("t2v-batched-cfg", "t2v-block-swap"):
            assert np.abs(data[f"{case.name}/latents"] - plain).max() > 1e-2, case.name
    assert np.array_equal(data["t2v-block-swap/latents"], plain)
    assert np.abs(data["t2v-batched-cfg/latents"] - plain).max() < 1e-4
