"""The step-distilled solvers: flowmatch_distill (Euler on the fixed distillation sigmas, the wrapper's grid) and
lcm (x0 re-noised with fresh seeded noise each step), against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kinema.sampling import sample, schedule, shift_sigmas
from kinema.sampling.solvers import step_noise


def test_flowmatch_distill_grid_is_the_wrappers_four_timesteps():
    for shift in (1.0, 3.0, 5.0):
        sigmas, timesteps = schedule("flowmatch_distill", 4, shift)
        want = shift_sigmas(np.array([999, 750, 500, 250]) / 1000, shift)
        assert np.allclose(sigmas[:4].numpy(), want, atol=1e-7) and sigmas[4] == 0
        assert timesteps.dtype == torch.float32 and np.allclose(timesteps.numpy(), want * 1000, atol=1e-4)
    sigmas, _ = schedule("flowmatch_distill", 8, 1.0)  # any count: 1 - k / n, the first at 0.999
    assert np.allclose(sigmas.numpy(), [0.999, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])


def test_lcm_grid_is_the_flow_match_euler_grid():
    sigmas, timesteps = schedule("lcm", 4, 5.0)
    want = shift_sigmas(np.linspace(1000, 1, 4) / 1000, 5.0)
    assert np.allclose(sigmas[:4].numpy(), want, atol=1e-7) and sigmas[-1] == 0
    assert np.allclose(timesteps.numpy(), want * 1000, atol=1e-3)


def _model(x, t, step):  # a fixed smooth velocity field, so the maths can be checked by hand
    return torch.tanh(x) + t.float().view(-1, 1, 1, 1, 1) / 1000


def test_flowmatch_distill_is_euler_on_its_grid():
    x = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas, timesteps = schedule("flowmatch_distill", 4, 3.0)
    got = sample(_model, x, sigmas, timesteps, "flowmatch_distill", progress=False)
    want = x.clone()
    for i in range(4):
        want = want + (sigmas[i + 1] - sigmas[i]) * _model(want, timesteps[i : i + 1], None)
    assert torch.allclose(got, want, atol=1e-6)


def test_lcm_renoises_the_x0_estimate_with_seeded_noise():
    x = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas, timesteps = schedule("lcm", 4, 3.0)
    s = sigmas.tolist()
    got = sample(_model, x, sigmas, timesteps, "lcm", progress=False, seed=7)
    want = x.clone()
    for i in range(4):
        x0 = want - s[i] * _model(want, timesteps[i : i + 1], None)
        want = x0 if i == 3 else (1 - s[i + 1]) * x0 + s[i + 1] * step_noise(x.shape, 7, i)
    assert torch.allclose(got, want, atol=1e-6)
    again = sample(_model, x, sigmas, timesteps, "lcm", progress=False, seed=7)
    other = sample(_model, x, sigmas, timesteps, "lcm", progress=False, seed=8)
    assert torch.equal(got, again) and (got - other).abs().max() > 1e-3  # the seed decides the fresh noise
    assert not torch.equal(step_noise((4,), 7, 0), step_noise((4,), 7, 1))


@pytest.mark.parametrize("solver", ["flowmatch_distill", "lcm"])
def test_pipeline_and_cli_take_the_distilled_solvers(solver, tmp_path):
    from kinema.cli.main import main
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_metadata

    ckpt = tmp_path / "tiny"
    write_random_checkpoint(ckpt)
    out = tmp_path / "a.webp"
    assert main(["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--size", "32*32", "--frame_num", "5",
                 "--sample_steps", "4", "--sample_solver", solver, "--sample_guide_scale", "1", "--prompt", "a cat",
                 "--save_file", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["solver"] == solver and meta["steps"] == 4 and meta["guide_scale"] == 1.0


def test_a_distillation_loras_sampling_becomes_the_default(tmp_path, caplog):
    """A LoRA whose metadata says what sampling it is made for (kinema train distill writes it) sets the
    defaults: flags and arguments still win."""
    import json

    import kinema
    from kinema.demo import write_random_checkpoint
    from kinema.loading.dit import open_dit
    from kinema.lora import inject_lora, lora_state_dict, save_lora

    caplog.set_level("INFO", logger="kinema")
    ckpt = tmp_path / "tiny"
    write_random_checkpoint(ckpt)
    dit = open_dit(str(ckpt)).load().model
    inject_lora(dit, 2, 2.0, ("self_attn",))
    lora = tmp_path / "distill.safetensors"
    save_lora(lora, lora_state_dict(dit), alpha=2.0, rank=2, metadata={
        "sampling": json.dumps({"solver": "lcm", "steps": 4, "guide_scale": 1.0, "shift": 2.0})})
    pipe = kinema.Pipeline.load(str(ckpt), loras=[(str(lora), 1.0)])
    job = pipe.prepare("a cat", size="32*32", frame_num=5, progress=False)
    s = job.settings
    assert (s.solver, s.steps, s.guide_scale, s.shift) == ("lcm", 4, 1.0, 2.0)
    assert "is made for solver lcm, steps 4" in caplog.text
    s = pipe.prepare("a cat", size="32*32", frame_num=5, steps=6, solver="euler", progress=False).settings
    assert (s.solver, s.steps, s.guide_scale) == ("euler", 6, 1.0)
    off = kinema.Pipeline.load(str(ckpt), loras=[(str(lora), 0.0)]).prepare("a cat", size="32*32", frame_num=5)
    assert off.settings.solver == "unipc" and off.settings.steps != 4  # at strength 0 the LoRA says nothing
