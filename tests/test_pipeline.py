"""kinema.Pipeline: every task on small random models, the call's checks, callbacks, cancel, preview, threads."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from conftest import StubTextEncoder

import kinema
from kinema.encoders.image import ClipVisionEncoder
from kinema.errors import Cancelled, KinemaError
from kinema.models.clip import ClipVisionConfig, CLIPVisionTower
from kinema.models.dit import DiTConfig, WanDiT
from kinema.models.vae import WanVAE
from kinema.pipeline.models import Models
from kinema.pipeline.pipeline import Pipeline
from kinema.pipeline.settings import round_frames, round_size


@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    vae = WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval().requires_grad_(False)
    clip = ClipVisionEncoder(CLIPVisionTower(ClipVisionConfig(dim=32, mlp_dim=64, num_heads=2, num_layers=2)).eval())
    te = StubTextEncoder()

    def dit(kind):
        image = kind != "t2v"
        return WanDiT(DiTConfig(kind, in_dim=36 if image else 16, dim=64, ffn_dim=64, text_dim=16, num_heads=2,
                                num_layers=1, image_dim=32)).eval()

    return {kind: Pipeline(Models(dit(kind), vae, te, clip if kind != "t2v" else None)) for kind in ("t2v", "i2v", "flf2v")}


KW = dict(size=(48, 32), steps=3, progress=False)
PROMPT = "a red circle moving right"


def test_t2v_shapes_determinism_and_result(pipes):
    a = pipes["t2v"](PROMPT, frame_num=5, seed=7, **KW)
    b = pipes["t2v"](PROMPT, frame_num=5, seed=7, **KW)
    c = pipes["t2v"](PROMPT, frame_num=5, seed=8, **KW)
    assert a.video.shape == (3, 5, 32, 48) and a.latents.shape == (16, 2, 4, 6)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (5, 32, 48, 3)
    assert np.array_equal(a.frames, ((a.video.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
    s = a.settings
    assert (s["steps"], s["shift"], s["solver"], s["seed"], s["size"], s["frame_num"]) == (3, 5.0, "unipc", 7, "48*32", 5)
    assert s["negative_prompt"].startswith("色调艳丽") and s["kinema_version"] == kinema.__version__


def test_batched_cfg_equals_two_passes(pipes):
    a = pipes["t2v"](PROMPT, frame_num=5, decode=False, **KW)
    b = pipes["t2v"](PROMPT, frame_num=5, decode=False, batched_cfg=True, **KW)
    assert a.video is None and a.frames is None
    assert torch.allclose(a.latents, b.latents, atol=1e-5) and b.settings["batched_cfg"] is True


def _count_dit_calls(pipe, **kw) -> int:
    calls = []
    handle = pipe.models.dit.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe(PROMPT, frame_num=1, decode=False, **KW, **kw)
    finally:
        handle.remove()
    return len(calls)


def test_guidance_one_skips_the_negative_pass(pipes):
    assert _count_dit_calls(pipes["t2v"], guide_scale=1.0) == 3
    assert _count_dit_calls(pipes["t2v"], guide_scale=5.0) == 6
    assert _count_dit_calls(pipes["t2v"], guide_scale=5.0, batched_cfg=True) == 3


def test_t2i_is_one_frame(pipes):
    out = pipes["t2v"](PROMPT, task="t2i", frame_num=81, **KW)
    assert out.video.shape == (3, 1, 32, 48) and out.settings["task"] == "t2i"


def test_i2v_and_flf2v_take_every_image_form(pipes, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "first.png")
    forms = [u8, torch.from_numpy(u8), Image.fromarray(u8), str(tmp_path / "first.png"), tmp_path / "first.png",
             torch.from_numpy(u8).permute(2, 0, 1).float() / 127.5 - 1]
    runs = [pipes["i2v"](PROMPT, task="i2v", image=f, frame_num=9, **KW) for f in forms]
    assert runs[0].video.shape[1] == 9
    assert all(torch.equal(r.latents, runs[0].latents) for r in runs)  # every form is the same image
    last = rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)  # another size: scaled and centre-cropped, as official
    out = pipes["flf2v"](PROMPT, task="flf2v", first_frame=u8, last_frame=last, frame_num=13, **KW)
    assert out.video.shape[1] == 13 and out.settings["shift"] == 16.0


def test_v2v_starts_part_way(pipes):
    src = pipes["t2v"](PROMPT, frame_num=5, **KW).frames
    steps = []
    out = pipes["t2v"](PROMPT, task="v2v", video=src, denoise=0.34, callback=lambda i: steps.append(i.step),
                       **{**KW, "steps": 6})
    assert steps == [4, 5]  # round(6 * (1 - 0.34)) = 4 steps skipped
    assert out.video.shape == (3, 5, 32, 48) and out.settings["denoise"] == 0.34
    longer = np.concatenate([src, src, src])  # 15 frames: frame_num defaults to the whole video as 4n+1 = 13
    assert pipes["t2v"](PROMPT, task="v2v", video=longer, decode=False, **KW).settings["frame_num"] == 13


def test_second_stage_from_latents(pipes):
    first = pipes["t2v"](PROMPT, frame_num=5, decode=False, **KW)
    again = pipes["t2v"](PROMPT, frame_num=5, latents=first.latents, denoise=0.5, **KW)
    assert again.settings["denoise"] == 0.5 and again.latents.shape == first.latents.shape


@pytest.mark.parametrize("kind, kw, message", [
    ("t2v", {"task": "i2v", "image": np.zeros((8, 8, 3), np.uint8)}, "needs a i2v DiT"),
    ("i2v", {"task": "i2v"}, "task i2v needs image"),
    ("flf2v", {"task": "flf2v", "first_frame": np.zeros((8, 8, 3), np.uint8)}, "task flf2v needs last_frame"),
    ("t2v", {"image": np.zeros((8, 8, 3), np.uint8)}, "image is not used by task t2v; use task i2v-14B"),
    ("t2v", {"task": "x2v"}, "unknown task 'x2v'"),
    ("t2v", {"size": "wide"}, "size 'wide' is not W*H"),
    ("t2v", {"size": "99999*99999"}, "too large"),
    ("t2v", {"size": (8, 8)}, "too small"),
    ("t2v", {"frame_num": 0}, "frame_num 0 must be a whole number"),
    ("t2v", {"frame_num": 5.5}, "frame_num 5.5 must be a whole number"),
    ("t2v", {"steps": 0}, "steps 0 must be a whole number"),
    ("t2v", {"guide_scale": float("nan")}, "guide_scale nan is not a finite number"),
    ("t2v", {"shift": -1.0}, "shift -1.0 is out of range"),
    ("t2v", {"seed": "42"}, "seed '42' must be a whole number"),
    ("t2v", {"solver": "ddim"}, "unknown solver 'ddim'"),
    ("t2v", {"denoise": 1.5}, "denoise 1.5 is out of range"),
    ("t2v", {"cache": "teacache:x"}, "the threshold 'x' is not a number"),
    ("t2v", {"vae_tile": "big"}, "is not auto, off or WxH"),
    ("t2v", {"callback": 3}, "callback must be callable"),
    ("t2v", {"cancel": True}, "cancel must be a threading.Event"),
    ("t2v", {"latents": torch.zeros(16, 1, 1, 1)}, "latents [16, 1, 1, 1] do not fit"),
    ("i2v", {"task": "i2v", "image": np.zeros((8, 8), np.uint8)}, "uint8 images are [H, W, 3]"),
    ("i2v", {"task": "i2v", "image": np.full((3, 8, 8), 2.0, np.float32)}, "float pixels must be finite and in [-1, 1]"),
    ("i2v", {"task": "i2v", "image": [1, 2, 3]}, "image is a list"),
    ("i2v", {"task": "i2v", "image": "nowhere.png"}, "nowhere.png does not exist"),
    ("t2v", {"task": "v2v", "video": np.zeros((4, 8, 3), np.uint8)}, "uint8 videos are [F, H, W, 3]"),
])
def test_bad_inputs_are_one_clear_error_before_any_model_runs(pipes, kind, kw, message):
    pipe = pipes[kind]
    calls = []
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (pipe.models.dit, pipe.models.vae)]
    try:
        with pytest.raises(KinemaError) as err:
            pipe(PROMPT, **{**KW, **kw})
    finally:
        for h in handles:
            h.remove()
    assert message in str(err.value) and not calls


def test_a_call_that_cannot_fit_is_refused_up_front(pipes, monkeypatch):
    import kinema.pipeline.pipeline as pipeline

    monkeypatch.setattr(pipeline, "free_memory", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(KinemaError, match=r"needs about .* MiB for the DiT's activations alone \(7,200 tokens\)"):
        pipes["t2v"](PROMPT, frame_num=5, **{**KW, "size": "1280*720"})


def test_prompt_must_be_text(pipes):
    with pytest.raises(KinemaError, match="prompt must be a string, got int"):
        pipes["t2v"](3, **KW)


def test_rounding_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="kinema"):
        assert round_frames(80) == 81 and round_frames(1) == 1 and round_frames(16) == 17
        assert round_size(833, 479) == (832, 480)
    assert "not 4n+1" in caplog.text and "not a multiple of 16" in caplog.text


# -- callback, cancel, preview --------------------------------------------------------------------
def test_callback_sees_every_step(pipes):
    seen = []
    out = pipes["t2v"](PROMPT, frame_num=5, callback=seen.append, **{**KW, "steps": 4})
    assert [i.step for i in seen] == [0, 1, 2, 3] and all(i.steps == 4 for i in seen)
    sigmas = [i.sigma for i in seen]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:])) and 0 < sigmas[-1] < sigmas[0] < 1
    assert all(i.timestep == int(i.sigma * 1000) for i in seen)  # the official truncation
    assert torch.equal(seen[-1].latents, out.latents[None])  # x after the last step is the result
    for i in seen:
        assert i.latents.shape == i.denoised.shape == (1, 16, 2, 4, 6)
        preview = i.preview()
        assert preview.dtype == np.uint8 and preview.shape == (2, 4, 6, 3)


def test_callback_returning_false_stops_after_that_step(pipes, tmp_path):
    seen = []

    def stop_at_2(info):
        seen.append(info.step)
        return info.step != 2

    with pytest.raises(Cancelled, match="after step 3 of 5"):
        pipes["t2v"](PROMPT, frame_num=5, callback=stop_at_2, **{**KW, "steps": 5}).save(tmp_path)
    assert seen == [0, 1, 2] and not list(tmp_path.iterdir())  # nothing written


def test_cancel_from_another_thread_stops_within_a_step(pipes):
    cancel, reached, seen = threading.Event(), threading.Event(), []

    def callback(info):
        seen.append(info.step)
        if info.step == 1:
            reached.set()
            cancel.wait(5)  # the other thread sets it while this step is still ending

    setter = threading.Thread(target=lambda: reached.wait(5) and cancel.set())
    setter.start()
    with pytest.raises(Cancelled, match="cancelled after step 2 of 8"):
        pipes["t2v"](PROMPT, frame_num=5, callback=callback, cancel=cancel, **{**KW, "steps": 8})
    setter.join()
    assert seen == [0, 1]
    assert pipes["t2v"](PROMPT, frame_num=1, decode=False, **KW).latents.shape == (16, 1, 4, 6)  # the pipe still works


def test_preview_projects_latents_to_their_colours():
    """The fitted projection maps a VAE latent back near the colour it encodes (the built-in VAE, a red frame)."""
    from kinema.builtin import builtin_path
    from kinema.pipeline.preview import LatentPreview

    vae = kinema.load_vae(builtin_path())
    frame = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1, 1).expand(3, 1, 64, 64)
    rgb = LatentPreview(vae)(vae.encode(frame[None])[0])  # [1, 8, 8, 3]
    centre = rgb[0, 2:6, 2:6].reshape(-1, 3).astype(int).mean(0)
    assert centre[0] > 200 and centre[1] < 60 and centre[2] < 60, centre


def test_calls_from_two_threads_run_one_after_the_other(pipes):
    log, errors = [], []

    def run(name):
        try:
            pipes["t2v"](PROMPT, frame_num=5, decode=False, callback=lambda i: log.append(name), **{**KW, "steps": 4})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(log) == list("aaaabbbb")
    assert log in (list("aaaabbbb"), list("bbbbaaaa")), log  # never interleaved


def test_save_never_overwrites(pipes, tmp_path):
    out = pipes["t2v"](PROMPT, frame_num=5, **KW)
    first = out.save(tmp_path / "clip.mp4")
    assert first == tmp_path / "clip.mp4"
    with pytest.raises(KinemaError, match="already exists"):
        out.save(tmp_path / "clip.mp4")
    assert out.save(tmp_path).name == "kinema_00001.mp4" and out.save(tmp_path).name == "kinema_00002.mp4"
    from kinema.media import read_metadata, read_video

    meta = read_metadata(first)
    assert meta["seed"] == 0 and meta["format"] == "h264-mp4" and meta["fps"] == 16
    assert read_video(first).frames.shape == (5, 32, 48, 3)


def test_t2v_on_an_i2v_type_dit_encodes_the_blank_condition_once_per_size(pipes, monkeypatch):
    """An i2v-type DiT running t2v (condition dropout) gets the VAE latent of a blank video: the same for every call
    of a size, so the VAE encodes it once per size and later calls reuse it (the same video); new VAE weights
    make it anew."""
    from kinema.loading.dit import ModelInfo

    i2v = pipes["i2v"].models
    pipe = Pipeline(Models(i2v.dit, i2v.vae, i2v.text_encoder, i2v.clip, ModelInfo(("t2v", "i2v"))))  # trained for both
    vae = pipe.models.vae
    encodes = []
    real = type(vae).encode
    monkeypatch.setattr(type(vae), "encode", lambda self, v: encodes.append(tuple(v.shape)) or real(self, v))
    task = dict(task="t2v", frame_num=5, seed=3, **KW)
    a = pipe(PROMPT, **task)
    b = pipe(PROMPT, **task)
    assert len(encodes) == 1 and torch.equal(a.latents, b.latents)
    pipe(PROMPT, **{**task, "size": (32, 48)})  # another size: encoded once more
    assert len(encodes) == 2
    with torch.no_grad():
        vae.conv1.weight.mul_(1.0)  # weights updated in place (as by an optimizer step)
    pipe(PROMPT, **task)
    assert len(encodes) == 3
