"""The generation pipeline end to end on small random models, one test per task."""

import logging

import pytest
import torch
from conftest import StubTextEncoder

from kinema.encoders.image import ClipVisionEncoder
from kinema.errors import KinemaError
from kinema.models.clip import ClipVisionConfig, CLIPVisionTower
from kinema.models.dit import DiTConfig, WanDiT
from kinema.pipeline import generate as gen
from kinema.pipeline.generate import Models, generate, round_frames, round_size


@pytest.fixture(scope="module")
def models():
    from kinema.models.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval().requires_grad_(False)
    t2v = WanDiT(DiTConfig("t2v", dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=1)).eval()
    clip = ClipVisionEncoder(CLIPVisionTower(ClipVisionConfig(dim=32, mlp_dim=64, num_heads=2, num_layers=2)).eval())
    i2v = WanDiT(DiTConfig("i2v", in_dim=36, dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=1, image_dim=32)).eval()
    flf2v = WanDiT(DiTConfig("flf2v", in_dim=36, dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=1, image_dim=32)).eval()
    te = StubTextEncoder()
    return {
        "t2v": Models(t2v, vae, te), "i2v": Models(i2v, vae, te, clip), "flf2v": Models(flf2v, vae, te, clip),
    }


KW = dict(prompt="a red circle moving right", size=(48, 32), steps=3, progress=False)


def test_t2v_shapes_and_determinism(models):
    a = generate(models["t2v"], "t2v", frame_num=5, seed=7, **KW)
    b = generate(models["t2v"], "t2v", frame_num=5, seed=7, **KW)
    c = generate(models["t2v"], "t2v", frame_num=5, seed=8, **KW)
    assert a["video"].shape == (3, 5, 32, 48) and a["latents"].shape == (16, 2, 4, 6)
    assert torch.equal(a["latents"], b["latents"])
    assert not torch.equal(a["latents"], c["latents"])
    assert a["video"].abs().max() <= 1.0
    assert a["settings"]["steps"] == 3 and a["settings"]["shift"] == 5.0 and a["settings"]["solver"] == "unipc"


def test_batched_cfg_equals_two_passes(models):
    a = generate(models["t2v"], "t2v", frame_num=5, decode=False, batched_cfg=False, **KW)
    b = generate(models["t2v"], "t2v", frame_num=5, decode=False, batched_cfg=True, **KW)
    assert torch.allclose(a["latents"], b["latents"], atol=1e-5)


def test_guidance_one_skips_the_negative_pass(models, monkeypatch):
    calls = []
    dit = models["t2v"].dit
    monkeypatch.setattr(dit, "forward", lambda *a, **k: (calls.append(1), torch.zeros_like(a[0]))[1])
    generate(models["t2v"], "t2v", frame_num=1, guide_scale=1.0, decode=False, **KW)
    assert len(calls) == 3
    calls.clear()
    generate(models["t2v"], "t2v", frame_num=1, guide_scale=5.0, decode=False, **KW)
    assert len(calls) == 6


def test_t2i_is_one_frame(models):
    out = generate(models["t2v"], "t2i", frame_num=81, **KW)
    assert out["video"].shape == (3, 1, 32, 48)


def test_i2v_and_flf2v_any_frame_count(models):
    img = torch.rand(3, 40, 60) * 2 - 1
    out = generate(models["i2v"], "i2v", image=img, frame_num=9, **KW)
    assert out["video"].shape[1] == 9
    last = torch.rand(3, 50, 50) * 2 - 1  # another size: scaled and centre-cropped like the official code
    out = generate(models["flf2v"], "flf2v", first_frame=img, last_frame=last, frame_num=13, **KW)
    assert out["video"].shape[1] == 13 and out["settings"]["shift"] == 16.0


def test_v2v_starts_part_way(models, monkeypatch):
    src = generate(models["t2v"], "t2v", frame_num=5, **KW)["video"]
    calls = []
    real = gen.guided_model

    def counting(*a, **k):
        fn = real(*a, **k)
        return lambda x, t: (calls.append(1), fn(x, t))[1]

    monkeypatch.setattr(gen, "guided_model", counting)
    out = generate(models["t2v"], "v2v", video=src, frame_num=5, denoise=0.34, **{**KW, "steps": 6})
    assert len(calls) == 2  # round(6 * (1 - 0.34)) = 4 steps skipped
    assert out["video"].shape == src.shape and out["settings"]["denoise"] == 0.34


def test_errors(models):
    with pytest.raises(KinemaError, match="needs a i2v DiT"):
        generate(models["t2v"], "i2v", image=torch.zeros(3, 8, 8), **KW)
    with pytest.raises(KinemaError, match="needs an image"):
        generate(models["i2v"], "i2v", **KW)
    with pytest.raises(KinemaError, match="last frame"):
        generate(models["flf2v"], "flf2v", first_frame=torch.zeros(3, 8, 8), **KW)


def test_rounding_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="kinema"):
        assert round_frames(80) == 81 and round_frames(1) == 1 and round_frames(16) == 17
        assert round_size(833, 479) == (832, 480)
    assert "not 4n+1" in caplog.text and "not a multiple of 16" in caplog.text
