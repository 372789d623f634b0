"""Context windows: the wrapper's schedules and blends, FreeNoise, per-window conditioning and prompts, and
the engine's paths to them (Python, kinema generate, the wrapper's nodes)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import StubTextEncoder

from kinema.errors import KinemaError
from kinema.models.dit import DiTConfig, WanDiT
from kinema.models.hooks import BlockHook
from kinema.pipeline.models import Models
from kinema.pipeline.pipeline import Pipeline
from kinema.sampling.context import StepContext
from kinema.sampling.windows import (
    ContextWindows, freenoise, ordered_halving, unused_sections, window_weights, windowed, windows_for,
)

PROMPT = "a red circle moving right"


def ctx(step, steps=10):
    return StepContext(step=step, steps=steps, sigma=0.5, timestep=500)


# -- schedules --------------------------------------------------------------------------------------
def test_ordered_halving():
    assert [ordered_halving(i) for i in range(6)] == [0, 0.5, 0.25, 0.75, 0.125, 0.625]


def test_schedules_by_hand():
    r = lambda a, b: list(range(a, b))  # noqa: E731
    assert windows_for("static_standard", 0, 12, 5, 1, 2) == [r(0, 5), r(3, 8), r(6, 11), r(7, 12)]
    # step 0: offsets from 0; the window running past the end is slid back to end at frame 11
    assert windows_for("uniform_standard", 0, 12, 5, 1, 2) == [r(0, 5), r(3, 8), r(6, 11), r(7, 12)]
    # step 1: ordered_halving 1/2, windows start half-way round: 6, 9 (rolled -> 7..11), 12 = 0, 15 = 3
    assert windows_for("uniform_standard", 1, 12, 5, 1, 2) == [r(6, 11), r(7, 12), r(0, 5), r(3, 8)]
    looped = windows_for("uniform_looped", 1, 12, 5, 1, 2)
    assert [9, 10, 11, 0, 1] in looped  # the looped schedule wraps instead
    assert windows_for("uniform_standard", 3, 4, 5, 1, 2) == [r(0, 4)]  # shorter than a window: one window


@pytest.mark.parametrize("schedule", ["uniform_standard", "uniform_looped", "static_standard"])
@pytest.mark.parametrize("total,size,stride,overlap", [(41, 5, 1, 2), (21, 5, 2, 2), (30, 8, 3, 4), (9, 5, 1, 1)])
def test_every_frame_is_covered_every_step(schedule, total, size, stride, overlap):
    for step in range(12):
        wins = windows_for(schedule, step, total, size, stride, overlap)
        assert set().union(*map(set, wins)) == set(range(total)), (step, wins)
        assert all(0 <= f < total for w in wins for f in w)
        assert len({tuple(w) for w in wins}) == len(wins)
        if schedule != "uniform_looped":
            assert all(len(w) == size for w in wins)
        weights = torch.zeros(total)
        for w in wins:
            weights.index_add_(0, torch.tensor(w), window_weights(w, total, overlap, "linear", schedule == "uniform_looped"))
        assert weights.min() > 1e-3  # no frame left with (almost) no weight


def test_window_weights():
    assert window_weights(list(range(0, 5)), 12, 2, "linear").tolist() == pytest.approx([1, 1, 1, 1, 1e-4])
    assert window_weights(list(range(3, 8)), 12, 2, "linear").tolist() == pytest.approx([1e-4, 1, 1, 1, 1e-4])
    assert window_weights(list(range(7, 12)), 12, 3, "linear").tolist() == pytest.approx([1e-4, 0.5, 1, 1, 1])
    assert window_weights(list(range(3, 8)), 12, 2, "pyramid").tolist() == [1, 2, 3, 2, 1]
    assert window_weights(list(range(3, 9)), 12, 2, "pyramid").tolist() == [1, 2, 3, 3, 2, 1]
    assert window_weights(list(range(3, 8)), 12, 2, "flat").tolist() == [1] * 5


def test_freenoise_repeats_shuffled_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 2, 13, 2, 2, generator=g)
    out = freenoise(noise, 5, 2, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :, :5], noise[:, :, :5])  # the first window keeps its noise
    # frames 5..7 are frames 0..2 in some order; then 8..10 are (new) frames 3..5 in some order, ...
    for place, start in ((5, 0), (8, 3), (11, 6)):
        count = min(3, 13 - place)
        got = {tuple(out[0, :, f].flatten().tolist()) for f in range(place, place + count)}
        src = {tuple(out[0, :, f].flatten().tolist()) for f in range(start, start + count)}
        assert got == src, place
    assert not torch.equal(out, noise)


# -- the windowed model function ---------------------------------------------------------------------
def test_a_frame_local_model_is_unchanged_by_windows():
    """A model that acts on each frame alone gives the same prediction through any windows: the blend is a
    normalised weighting of identical values."""
    x = torch.randn(1, 4, 23, 3, 3)
    local = lambda x, t, step: torch.tanh(x) * 2 + 1  # noqa: E731
    for schedule in ("uniform_standard", "uniform_looped", "static_standard"):
        for fuse in ("linear", "pyramid", "flat"):
            spec = ContextWindows(frames=25, overlap=8, stride=8, schedule=schedule, fuse=fuse)
            fn = windowed(local, spec, 23)
            for step in range(4):
                assert torch.allclose(fn(x, None, ctx(step)), local(x, None, None), atol=1e-6), (schedule, fuse)


def test_windows_blend_by_their_weights():
    seen = []

    def model(x, t, step):
        seen.append(step.window)
        return torch.full_like(x, float(step.window[0]))  # each window predicts its start

    spec = ContextWindows(frames=17, overlap=8, schedule="static_standard")  # 5 latent frames, overlap 2
    out = windowed(model, spec, 12)(torch.zeros(1, 1, 12, 1, 1), None, ctx(0))[0, 0, :, 0, 0]
    assert seen == [tuple(range(0, 5)), tuple(range(3, 8)), tuple(range(6, 11)), tuple(range(7, 12))]
    want = torch.zeros(12)
    total = torch.zeros(12)
    for w in seen:
        wt = window_weights(list(w), 12, 2, "linear")
        want[list(w)] += wt * w[0]
        total[list(w)] += wt
    assert torch.allclose(out, want / total)


def test_cancel_is_seen_between_windows():
    """A stop set while a step's windows run ends the step at the next window, not after all of them."""
    import threading

    from kinema.errors import Cancelled

    cancel, calls = threading.Event(), []

    def model(x, t, s):
        calls.append(s.window)
        if len(calls) == 2:
            cancel.set()  # as POST /interrupt does, from another thread
        return torch.zeros_like(x)

    spec = ContextWindows(frames=17, overlap=8, schedule="static_standard")
    assert len(windows_for("static_standard", 0, 15, 5, 1, 2)) == 5
    with pytest.raises(Cancelled, match="before window 3 of 5"):
        windowed(model, spec, 15, cancel)(torch.zeros(1, 1, 15, 1, 1), None, ctx(0))
    assert len(calls) == 2


def test_prompt_travel_picks_the_section_of_the_last_frame():
    calls = []
    fns = [lambda x, t, s, i=i: (calls.append((i, s.window)), torch.zeros_like(x))[1] for i in range(3)]
    spec = ContextWindows(frames=17, overlap=8, schedule="static_standard")
    windowed(fns, spec, 15)(torch.zeros(1, 1, 15, 1, 1), None, ctx(0))
    # sections of 5 latent frames: a window's prompt is the section of its last frame
    assert [(i, w[-1]) for i, w in calls] == [(0, 4), (1, 7), (2, 10), (2, 13), (2, 14)]
    assert unused_sections(spec, 15, 3, 10) == []
    # 10 sections over those windows (last frames 4, 7, 10, 13, 14: sections 2, 4, 6, 8, 9): five are never taken
    assert unused_sections(spec, 15, 10, 1) == [0, 1, 3, 5, 7]
    # uniform_standard moves the windows each step: the union over the steps counts
    moving = ContextWindows(frames=17, overlap=8)
    once, every = unused_sections(moving, 15, 10, 1), unused_sections(moving, 15, 10, 20)
    assert set(every) <= set(once) and every != once


# -- through the pipeline -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    from kinema.models.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval().requires_grad_(False)
    dit = WanDiT(DiTConfig("i2v", in_dim=36, dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=2,
                           image_dim=32)).eval()
    from kinema.encoders.image import ClipVisionEncoder
    from kinema.models.clip import ClipVisionConfig, CLIPVisionTower

    clip = ClipVisionEncoder(CLIPVisionTower(ClipVisionConfig(dim=32, mlp_dim=64, num_heads=2, num_layers=2)).eval())
    from kinema.loading.dit import ModelInfo

    return Models(dit, vae, StubTextEncoder(), clip, ModelInfo(("t2v", "i2v", "flf2v")))


def run(models, **kw):
    kw = dict(size=(32, 32), frame_num=33, steps=3, seed=3, decode=False, progress=False) | kw
    return Pipeline(models)(kw.pop("prompt", PROMPT), **kw)


class Spy(BlockHook):
    order = 5

    def __init__(self):
        self.calls = []

    def around_blocks(self, run, tokens, inputs, step):
        self.calls.append((step.window, step.frame_offset, inputs.rope, inputs.context))
        return run(tokens, inputs, step)


def test_pipeline_windows(models, monkeypatch):
    plain = run(models)
    assert run(models, context_windows=dict(frames=33, overlap=8)).latents.equal(plain.latents)  # one window
    win = run(models, context_windows=dict(frames=17, overlap=8, schedule="static_standard"))
    assert win.latents.shape == plain.latents.shape == (16, 9, 4, 4)
    assert (win.latents - plain.latents).abs().max() > 1e-3
    rec = win.settings
    assert (rec["context_frames"], rec["context_overlap"], rec["context_schedule"], rec["freenoise"]) == \
        (17, 8, "static_standard", True)  # FreeNoise on by default, as the wrapper's node
    own = run(models, context_windows=dict(frames=17, overlap=8, freenoise=False))
    assert own.settings["freenoise"] is False
    assert (own.latents - run(models, context_windows=dict(frames=17, overlap=8)).latents).abs().max() > 1e-3

    # what the DiT sees per window: the window's frames, RoPE from 0 (relative) or from its start (absolute),
    # the first frame's condition as every window's anchor
    import kinema.pipeline.sample as sample_mod

    spy = Spy()
    real = sample_mod.guided_model

    def with_spy(dit, cond, uncond, scale, guidance, hooks=(), *a, **k):
        return real(dit, cond, uncond, scale, guidance, (spy, *hooks), *a, **k)

    monkeypatch.setattr(sample_mod, "guided_model", with_spy)
    run(models, steps=1, context_windows=dict(frames=17, overlap=8, schedule="static_standard"))
    run(models, steps=1, context_windows=dict(frames=17, overlap=8, schedule="static_standard", rope="absolute"))
    dit = models.dit
    rel, ab = spy.calls[: len(spy.calls) // 2], spy.calls[len(spy.calls) // 2:]
    assert [c[0] for c in rel] == [w for w in [tuple(range(0, 5)), tuple(range(3, 8)), tuple(range(4, 9))] for _ in "cu"]
    assert all(c[1] == 0 and torch.equal(c[2], dit.rope((5, 2, 2), "cpu")) for c in rel)
    assert [c[1] for c in ab] == [0, 0, 3, 3, 4, 4]
    assert torch.equal(ab[2][2], dit.rope((5, 2, 2), "cpu", (3, 0, 0)))


def test_prompt_travel_and_window_errors(models, caplog):
    with pytest.raises(KinemaError, match="prompt travel spreads them over context windows"):
        run(models, prompt="a red circle | a blue square")
    with pytest.raises(KinemaError, match="empty '\\|' section"):
        run(models, prompt="a red circle || a blue square", context_windows=True)
    travel = run(models, prompt="a red circle moving right | a blue square moving up",  # the stub encodes by length
                 context_windows=dict(frames=17, overlap=8, schedule="static_standard"))
    one = run(models, prompt="a red circle moving right", context_windows=dict(frames=17, overlap=8,
                                                                               schedule="static_standard"))
    assert (travel.latents - one.latents).abs().max() > 1e-3
    with caplog.at_level(logging.WARNING, logger="kinema"):
        run(models, steps=1, prompt=" | ".join(f"a red circle {i}" for i in range(8)),
            context_windows=dict(frames=17, overlap=8, schedule="static_standard"))
    assert "prompt: 5 of its 8 '|' sections fall on no window's last frame" in caplog.text
    assert "'a red circle 0', 'a red circle 1'" in caplog.text
    for kw, text in ((dict(frames=18), "4n \\+ 1"), (dict(frames=17, overlap=20), "overlap 20"),
                     (dict(frames=17, schedule="random"), "schedule 'random'"), (dict(size=3), "no field 'size'"),
                     (dict(frames=17, fuse="max"), "fuse 'max'")):
        with pytest.raises(KinemaError, match=text):
            run(models, context_windows=kw)


def test_windows_take_the_models_defaults(models):
    """A model may declare its windows (sample_defaults.context: what suits its training length); True, "default",
    a frame count or a dict take every field not given from them, then from the wrapper's (81 frames, overlap 16)."""
    from dataclasses import replace

    from kinema.loading.dit import ModelInfo
    from kinema.sampling.windows import ContextWindows

    own = replace(models, info=ModelInfo(models.info.tasks, {"context": {"frames": 17, "overlap": 12}}))
    pipe = Pipeline(own)

    def windows(value, p=pipe):
        return p.prepare(PROMPT, size=(32, 32), frame_num=33, context_windows=value, progress=False).windows

    for value in (True, "default", {}, {"frames": "default"}):
        assert windows(value) == ContextWindows(17, overlap=12), value
    assert windows(21) == ContextWindows(21, overlap=12)
    assert windows({"overlap": 8, "fuse": "pyramid"}) == ContextWindows(17, overlap=8, fuse="pyramid")
    assert windows(ContextWindows(9, overlap=4)) == ContextWindows(9, overlap=4)  # a record as it is
    assert windows(True, Pipeline(models)) == ContextWindows()  # no model defaults: the wrapper's
    assert windows({"frames": 17}, Pipeline(models)) == ContextWindows(17)
    with pytest.raises(KinemaError, match="context_windows 'some' is not understood"):
        windows("some")
    assert run(own, context_windows=True).latents.equal(run(models, context_windows=dict(frames=17, overlap=12)).latents)

    # not given: the model's own windows for a clip longer than one of them; off / False: one pass; a model that
    # declares none (Wan2.1's): one pass, as the wrapper
    assert windows(None) == ContextWindows(17, overlap=12)
    assert pipe.prepare(PROMPT, size=(32, 32), frame_num=17, progress=False).windows is None  # one window long
    assert windows(False) is None and windows("off") is None and windows(" OFF ") is None
    assert windows(None, Pipeline(models)) is None
    auto, off = run(own), run(own, context_windows="off")
    assert auto.latents.equal(run(models, context_windows=dict(frames=17, overlap=12)).latents)
    assert off.latents.equal(run(models).latents)
    assert auto.settings["context_frames"] == 17 and off.settings["context_frames"] == "off"
    assert "context_frames" not in run(own, frame_num=17).settings and "context_frames" not in run(models).settings


def test_i2v_windows_keep_the_first_frame_anchor(models):
    image = torch.rand(3, 32, 32) * 2 - 1
    out = run(models, task="i2v", image=image, context_windows=dict(frames=17, overlap=8))
    assert out.latents.shape == (16, 9, 4, 4)


def test_window_args_anchor_and_references():
    """Every window's first frame is the video's first (mask and latent), or with reference latents, for windows
    that do not start at the video's first frame, a reference's latent under the first frame's mask; with several,
    the one of the section the window's last frame falls in (the wrapper's reference_latent)."""
    from kinema.pipeline.conditioning import window_args

    y = torch.randn(1, 4 + 3, 12, 2, 2)
    refs = torch.randn(3, 3, 2, 2)
    first = window_args({"y": y}, (0, 1, 2, 3))["y"]
    assert first.equal(y[:, :, :4]) and window_args({"y": y}, (0, 1, 2, 3), refs)["y"].equal(first)
    later = window_args({"y": y}, (5, 6, 7, 8))["y"]
    assert later[:, :, 0].equal(y[:, :, 0]) and later[:, :, 1:].equal(y[:, :, 6:9])
    for window, k in (((4, 5, 6, 7), 1), ((8, 9, 10, 11), 2), ((1, 2, 3), 0)):  # sections of 4 latent frames
        part = window_args({"y": y}, window, refs)["y"]
        assert part[:, :4, 0].equal(y[:, :4, 0]) and part[0, 4:, 0].equal(refs[k]), window
        assert part[:, :, 1:].equal(y[:, :, list(window[1:])])
    one = window_args({"y": y}, (8, 9, 10, 11), refs[:1])["y"]
    assert one[0, 4:, 0].equal(refs[0])
    assert window_args({"y": None, "clip_fea": 1}, (5, 6), refs) == {"y": None, "clip_fea": 1}


def test_context_reference(models):
    """context_reference: the image whose latent anchors the windows after the first. The video's own first frame as
    the reference gives what no reference gives (the causal VAE encodes a first frame alone); another image changes
    the video; it needs windows, an image DiT and a task with a known first frame."""
    g = torch.Generator().manual_seed(3)
    image, other = (torch.rand(3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    win = dict(frames=17, overlap=8, schedule="static_standard")
    plain = run(models, task="i2v", image=image, context_windows=win)
    same = run(models, task="i2v", image=image, context_windows=win, context_reference=image)
    assert (same.latents - plain.latents).abs().max().item() < 1e-5
    # two references over 9 latent frames: sections 0-4 and 4.5-8; the windows after the first end at 7 and 8
    moved = run(models, task="i2v", image=image, context_windows=win, context_reference=[image, other])
    assert (moved.latents - plain.latents).abs().max().item() > 1e-4  # (a tiny random DiT: 8e-4 here)
    assert moved.latents.equal(run(models, task="i2v", image=image, context_windows=win, context_reference=other).latents)
    assert (run(models, task="i2v", image=image, context_windows=win, context_reference=[other, image]).latents
            - plain.latents).abs().max().item() < 1e-5  # the first section's reference goes to no window here
    assert moved.settings["context_reference"] == 2 and "context_reference" not in plain.settings
    for kw, text in ((dict(task="i2v", image=image, context_windows=False), "this call runs in one pass"),
                     (dict(context_windows=win), "task t2v has none"),
                     (dict(task="i2v", image=image, context_windows=win, context_reference=[image, "nothere.png"]),
                      "nothere.png does not exist")):
        with pytest.raises(KinemaError, match=text):
            run(models, context_reference=kw.pop("context_reference", other), **kw)


def test_cli_windows_and_repeat(tmp_path, capsys):
    from kinema.cli.main import main
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_metadata, read_video

    ckpt = tmp_path / "Wan2.1-T2V-tiny"
    write_random_checkpoint(ckpt)
    gen = ["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--size", "32*32", "--frame_num", "41",
           "--sample_steps", "2", "--prompt", "a red circle | a blue square", "--base_seed", "5"]
    out = tmp_path / "long.webp"  # lossless webp: exact frames (libx264's are not reproducible run to run)
    assert main([*gen, "--save_file", str(out), "--lossless", "--context_frames", "17", "--context_overlap", "8",
                 "--no_freenoise", "--context_fuse", "pyramid"]) == 0
    assert read_video(out).frames.shape == (41, 32, 32, 3)
    meta = read_metadata(out)
    assert meta["context_frames"] == 17 and meta["context_fuse"] == "pyramid" and meta["freenoise"] is False
    again = tmp_path / "again.webp"
    assert main(["generate", "--from", str(out), "--ckpt_dir", str(ckpt), "--save_file", str(again), "--lossless"]) == 0
    assert np.array_equal(read_video(out).frames, read_video(again).frames)
    capsys.readouterr()
    assert main([*gen, "--save_file", str(tmp_path / "x.mp4"), "--context_overlap", "8"]) == 2
    assert "--context_overlap tunes context windows; add --context_frames N" in capsys.readouterr().err
    assert main([*gen, "--save_file", str(tmp_path / "x.mp4"), "--context_frames", "off", "--context_overlap", "8"]) == 2
    assert "(not with --context_frames off)" in capsys.readouterr().err
    assert main([*gen, "--plan", "--context_frames", "off"]) == 2  # one pass: no windows to travel over
    assert "prompt travel spreads them over context windows" in capsys.readouterr().err
    assert main([*gen, "--plan", "--context_frames", "17"]) == 0
    assert "41 frames in windows of 17" in capsys.readouterr().out
    assert main([*gen, "--plan", "--context_frames", "17", "--context_reference", str(out)]) == 2
    assert "--context_reference takes the place of a window's first known frame" in capsys.readouterr().err
    # `default`: the model's windows (this Wan2.1-style checkpoint declares none: the wrapper's 81 frames, which
    # cover these 41 in one window)
    assert main([*gen, "--plan", "--context_frames", "default"]) == 0
    assert "41 frames in windows of 81" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*gen, "--plan", "--context_frames", "many"])
    assert e.value.code == 2
    assert "invalid frame count (4n+1, 'default' or 'off') value: 'many'" in capsys.readouterr().err
