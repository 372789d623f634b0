"""Kinema's sampler against diffusers' schedulers and the official Wan2.1 formulas.

diffusers is driven with the official Wan2.1 schedule (its own flow defaults
differ, see kinema/sampling/schedule.py) and the model is called with the same
integer timesteps in both loops, so any difference is in the solver maths.
A tiny random WanDiT is the model: it is nonlinear in x and depends on t, so a
wrong coefficient, order or timestep shows up in the final latent.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from kinema.errors import KinemaError
from kinema.models.dit import DiTConfig, WanDiT
from kinema.sampling import (
    SOLVERS,
    WAN_SOLVERS,
    add_noise,
    initial_noise,
    sample,
    schedule,
    start_step_for_denoise,
)

# diffusers' DPM-Solver builds an unused beta schedule with a numpy-2 deprecation warning
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (1, 16, 2, 4, 4)  # [B, C, F, H, W] -> 8 tokens with patch (1, 2, 2)


@pytest.fixture(scope="module")
def model_fn():
    torch.manual_seed(0)
    dit = WanDiT(DiTConfig("t2v", dim=64, ffn_dim=64, text_dim=16, freq_dim=32, num_heads=1, num_layers=1)).eval()
    context = torch.randn(1, 5, 16)

    @torch.no_grad()
    def fn(x, t, step=None):  # step: the loop's StepContext, unused
        return dit(x, t, context)

    return fn


def official_unshifted(solver, steps):
    """The official pipelines' sigmas before the shift, float64 numpy [steps] (see official_schedule)."""
    if solver == "dpm++":
        return np.linspace(1, 0, steps + 1)[:steps]
    # FlowUniPCMultistepScheduler(shift=1): the 1000 training sigmas in float32, sigma_max / sigma_min read back
    train = torch.from_numpy(1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()).to(torch.float32)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    return np.linspace(sigma_max, sigma_min, steps + 1)[:-1]


def official_schedule(solver, steps, shift):
    """Wan2.1's sampling schedule, restated from its code: sigmas float32 [steps + 1], timesteps int64 [steps].

    dpm++: text2video.py hands fm_solvers.get_sampling_sigmas(steps, shift), i.e.
    shift(linspace(1, 0, steps + 1)[:steps]), as custom sigmas to a dpm++ scheduler
    built with shift=1, whose set_timesteps re-shifts them by 1 (a no-op).
    unipc: a scheduler built with shift=1 keeps sigma_max = float32(0.999) and
    sigma_min = 0 from its training sigmas; set_timesteps(steps, shift=shift) shifts
    linspace(sigma_max, sigma_min, steps + 1)[:-1].
    Both then take timesteps = int64(sigmas * 1000), truncating, from the float64
    sigmas, and append a final sigma of 0 before casting to float32. Euler is not in
    the official code; Kinema gives it the unipc schedule.
    """
    sigmas = official_unshifted(solver, steps)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * 1000).to(torch.int64)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), timesteps


def diffusers_sample(solver, model_fn, noise, steps, shift, start_step=0):
    """The reference loop: diffusers' solver on the official sigmas, the model called at the official timesteps.

    start_step > 0: a part-way run (set_begin_index), `noise` being the latent at sigmas[start_step]."""
    sigmas, timesteps = official_schedule(solver, steps, shift)
    unshifted = official_unshifted(solver, steps)
    if solver == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(sigmas=unshifted)  # shifts in float32: ~1e-7 off the float64 official values
    elif solver == "unipc":
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        sched.set_timesteps(sigmas=unshifted)
        assert torch.equal(sched.timesteps, timesteps)
    else:
        sched = DPMSolverMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            solver_order=2,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        sched.set_timesteps(steps)
        # its flow schedule starts at shift(0.999) and it takes no custom sigmas: impose the official one
        # (recomputed here, not Kinema's)
        sched.sigmas, sched.timesteps = sigmas.clone(), timesteps.clone()
    torch.testing.assert_close(sched.sigmas.float(), schedule(solver, steps, shift)[0], rtol=0, atol=1e-6)
    sched.set_begin_index(start_step)
    x = noise.clone()
    for i, t in enumerate(sched.timesteps[start_step:], start_step):
        v = model_fn(x, timesteps[i : i + 1])
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("solver", WAN_SOLVERS)
def test_matches_diffusers(solver, shift, steps, model_fn):
    noise = initial_noise(SHAPE, seed=1)
    ref = diffusers_sample(solver, model_fn, noise, steps, shift)
    out = sample(model_fn, noise, *schedule(solver, steps, shift), solver=solver, progress=False)
    assert (out - ref).abs().max().item() < 1e-4


def test_solvers_differ(model_fn):
    """Guards the parity test against a model too simple to tell the solvers apart."""
    noise = initial_noise(SHAPE, seed=1)
    outs = {s: sample(model_fn, noise, *schedule(s, 4, 3.0), solver=s, progress=False) for s in SOLVERS}
    assert (outs["euler"] - outs["unipc"]).abs().max() > 1e-3
    assert (outs["unipc"] - outs["dpm++"]).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 20, 40, 50])
@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 5.0, 8.0, 16.0])
@pytest.mark.parametrize("solver", WAN_SOLVERS)
def test_schedule_is_official(solver, steps, shift):
    """Every sigma (the final 0 included) and every integer timestep, bit for bit."""
    sigmas, timesteps = schedule(solver, steps, shift)
    ref_sigmas, ref_timesteps = official_schedule(solver, steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    assert torch.equal(sigmas, ref_sigmas)
    assert timesteps.dtype == torch.int64 and timesteps.shape == (steps,)
    assert timesteps.tolist() == ref_timesteps.tolist()
    assert (timesteps[0] == 1000) == (solver == "dpm++")
    assert (sigmas[0] == 1) == (solver == "dpm++")


# Worked by hand from the formulas at 4 steps: dpm++ starts at sigma 1, unipc / euler at
# float32(0.999); shift 5 maps 0.75 -> 3.75 / 4 = 0.9375 and 0.24975 -> 1.24875 / 1.999 = 0.6246873.
# Timesteps truncate: 499.5 -> 499, 249.75 -> 249, 624.69 -> 624.
KNOWN = {
    ("dpm++", 1.0): ([1.0, 0.75, 0.5, 0.25, 0.0], [1000, 750, 500, 250]),
    ("unipc", 1.0): ([0.999, 0.74925, 0.4995, 0.24975, 0.0], [999, 749, 499, 249]),
    ("dpm++", 5.0): ([1.0, 0.9375, 5 / 6, 0.625, 0.0], [1000, 937, 833, 625]),
    ("unipc", 5.0): ([0.9997998, 0.9372655, 0.8330554, 0.6246874, 0.0], [999, 937, 833, 624]),
}


@pytest.mark.parametrize("solver, shift", list(KNOWN))
def test_schedule_known_values(solver, shift):
    sigmas, timesteps = schedule(solver, 4, shift)
    ref_sigmas, ref_timesteps = KNOWN[solver, shift]
    torch.testing.assert_close(sigmas, torch.tensor(ref_sigmas), rtol=0, atol=1e-6)
    assert timesteps.tolist() == ref_timesteps
    if solver == "unipc":  # euler shares the unipc schedule
        assert all(torch.equal(a, b) for a, b in zip(schedule("euler", 4, shift), (sigmas, timesteps)))


def test_timesteps_truncate_the_float64_sigmas():
    """dpm++ at 10 steps, shift 1: float64 linspace gives 0.4 as 0.3999999999999999, so the official t is 399.

    Timesteps computed from the float32 sigmas, or rounded, would read 400 (and 300, 200, 100).
    """
    _, timesteps = schedule("dpm++", 10, 1.0)
    assert timesteps.tolist() == [1000, 900, 800, 700, 600, 500, 399, 299, 199, 99]


def test_seed_determinism(model_fn):
    a, b = initial_noise(SHAPE, 7), initial_noise(SHAPE, 7)
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert torch.equal(a, torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(7)))
    assert not torch.equal(a, initial_noise(SHAPE, 8))
    sched = schedule("unipc", 4, 5.0)
    assert torch.equal(sample(model_fn, a, *sched, progress=False), sample(model_fn, b, *sched, progress=False))


@pytest.mark.parametrize("solver", SOLVERS)
def test_start_step(solver, model_fn):
    steps, k = 10, 4
    sigmas, timesteps = schedule(solver, steps, 3.0)
    x0, noise = torch.randn(SHAPE), initial_noise(SHAPE, 3)
    seen, progress = [], []

    def counting(x, t, *step):
        seen.append(float(t))
        return model_fn(x, t)

    latents = add_noise(x0, noise, sigmas[k])
    out = sample(counting, latents, sigmas, timesteps, solver, start_step=k, progress=False,
                 callback=lambda info: progress.append((info.step + 1, info.steps)))
    assert seen == timesteps[k:].tolist()
    assert progress == [(i, steps) for i in range(k + 1, steps + 1)]
    assert out.shape == SHAPE and torch.isfinite(out).all()
    if solver in WAN_SOLVERS:
        # diffusers started at the same index: its multistep solvers also begin at first order, without history
        ref = diffusers_sample(solver, model_fn, latents, steps, 3.0, start_step=k)
        assert (out - ref).abs().max().item() < 1e-4
    # a last-step-only run is one first-order step to sigma 0: x0 = x - sigma * v, whatever the solver
    x = add_noise(x0, noise, sigmas[-2])
    last = sample(model_fn, x, sigmas, timesteps, solver, start_step=steps - 1, progress=False)
    torch.testing.assert_close(last, x - sigmas[-2] * model_fn(x, timesteps[-1:]), rtol=0, atol=1e-5)


def test_add_noise_and_denoise_strength():
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.equal(add_noise(x0, noise, 0.0), x0)
    torch.testing.assert_close(add_noise(x0, noise, 0.25), 0.75 * x0 + 0.25 * noise)
    assert start_step_for_denoise(10, 1.0) == 0
    assert start_step_for_denoise(10, 0.75) == 3  # 2.5 rounds up
    assert start_step_for_denoise(10, 0.3) == 7
    assert start_step_for_denoise(10, 0.01) == 9  # at least one step runs
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(KinemaError, match="denoise"):
            start_step_for_denoise(10, bad)


def test_unknown_solver_and_bad_arguments(model_fn):
    with pytest.raises(KinemaError, match=r"'ddim'.*euler, unipc, dpm\+\+"):
        schedule("ddim", 10, 5.0)
    sigmas, timesteps = schedule("unipc", 4, 5.0)
    with pytest.raises(KinemaError, match="ddim"):
        sample(model_fn, initial_noise(SHAPE, 0), sigmas, timesteps, solver="ddim", progress=False)
    with pytest.raises(KinemaError, match="steps"):
        schedule("unipc", 0, 5.0)
    with pytest.raises(KinemaError, match="shift"):
        schedule("unipc", 10, 0.0)
    with pytest.raises(ValueError, match="start_step"):
        sample(model_fn, initial_noise(SHAPE, 0), sigmas, timesteps, start_step=4, progress=False)
