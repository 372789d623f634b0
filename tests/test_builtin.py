"""The built-in model: it loads through the same loaders as real checkpoints, `kinema generate`
uses it when no checkpoint is given, and what it generates passes the world analyser."""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest

import kinema
from kinema.builtin import MODEL
from kinema.sampling.enhance import EnhanceVideo
from kinema.sampling.skip_layers import SkipLayers
from kinema.toy import world
from kinema.toy.analyse import analyse
from kinema.toy.evaluate import to_uint8

# Fixed prompt / seed pairs checked on every run (not used in training: the eval world seed).
CASES = [
    ("a red circle moving right on a black background", 1),
    ("a blue square moving up on a white background", 2),
    ("a yellow triangle moving left on a gray background", 3),
    ("a white square moving down on a black background", 4),
]


@pytest.fixture(scope="module")
def pipe():
    return kinema.Pipeline.load()  # no checkpoint: the built-in model


def test_builtin_is_small_and_loads_through_the_public_loaders(pipe):
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 60 * 2**20, f"built-in model is {size / 2**20:.1f} MiB"
    models = pipe.models
    dit = models.dit
    assert dit.config.model_type == "i2v" and dit.config.in_dim == 36
    assert set(models.info.tasks) >= {"t2v", "t2i", "i2v", "flf2v", "v2v"}
    assert models.info.sample_defaults["size"] == "64*64" and models.info.sample_defaults["frame_num"] == 17
    assert models.text_encoder.tokenizer.source.endswith("spiece.model")
    assert models.clip.image_size == 64 and models.vae.z_dim == 16 and models.source == str(MODEL.resolve())
    # its skip-layer guidance (one block of six, early steps only: within 2 points of every eval percentage)
    assert pipe.prepare("x", skip_layers=True, progress=False).extras.skip_layers == SkipLayers((3,), 0.1, 0.3)
    assert pipe.prepare("x", enhance=True, progress=False).extras.enhance == EnhanceVideo(0.5)  # 5 latent frames


@pytest.fixture(scope="module")
def t2v_frames(pipe):
    """Each fixed case generated once: (uint8 frames, analysis) by prompt, for the checks below."""
    cache = {}

    def frames(prompt, seed):
        if prompt not in cache:
            f = to_uint8(pipe(prompt, seed=seed, progress=False).video)
            cache[prompt] = f, analyse(f)
        return cache[prompt]

    return frames


@pytest.mark.parametrize("prompt,seed", CASES)
def test_builtin_t2v_passes_the_analyser(t2v_frames, prompt, seed):
    frames, a = t2v_frames(prompt, seed)
    assert frames.shape == (17, 64, 64, 3)
    got = a.matches(prompt)
    assert got["background"] and got["color"] and got["direction"], (prompt, a.caption())
    assert np.mean([p and s for p, s in zip(a.present, a.single)]) >= 0.9


def test_builtin_t2v_draws_the_shapes(t2v_frames):
    """The shape of each fixed case (a circle, two squares, a triangle). The model draws 82% of the eval's shapes
    right (docs/training.md), so one miss in four is allowed; a model that draws blobs (session 7's: every square
    and triangle read as a circle) gets at most two."""
    got = [t2v_frames(prompt, seed)[1].matches(prompt)["shape"] for prompt, seed in CASES]
    assert sum(got) >= 3, list(zip([p for p, _ in CASES], got))


def test_builtin_i2v_keeps_the_first_frame(pipe):
    from kinema.toy.analyse import psnr

    spec = world.random_spec(world.clip_rng(99, 0))
    clip = world.render(spec)
    video = pipe(spec.caption, task="i2v", image=clip[0], seed=0, progress=False).video
    assert psnr(to_uint8(video)[0], clip[0]) > 16  # an unconditioned sample scores ~10 dB


def test_generate_without_checkpoint_uses_the_builtin(tmp_path):
    out = tmp_path / "red.mp4"
    r = subprocess.run([sys.executable, "-m", "kinema.cli.main", "generate", "--prompt", CASES[0][0], "--base_seed", "1",
                        "--save_file", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "built-in model" in r.stderr
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        assert (stream.width, stream.height, float(stream.average_rate)) == (64, 64, 8.0)
    assert len(frames) == 17
    assert analyse(np.stack(frames)).background == "black"


def test_eval_prints_the_table(tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "kinema.cli.main", "eval", "--t2v", "2", "--i2v", "1", "--flf2v", "1",
                        "--vae", "2", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    results = json.loads(out.read_text())
    for row in ("t2v colour %", "i2v first-frame PSNR dB", "flf2v monotonic %", "VAE reconstruction PSNR dB"):
        line = next(line for line in r.stdout.splitlines() if line.startswith(row))
        assert f"{results[row]:8.2f}" in line  # the table prints the measured value
    assert results["t2v colour %"] in (0.0, 50.0, 100.0)  # 2 samples
    assert 20 < results["VAE reconstruction PSNR dB"] < 40 and results["i2v first-frame PSNR dB"] > 16
    assert results["t2v background %"] == 100.0  # the shipped model's t2v background is right every time


def test_eval_takes_the_guidance_extras(tmp_path):
    """`kinema eval` samples with `kinema generate`'s guidance-extras flags (how the issue's "within 2 points at the
    default setting" is measured); a tuning flag without its extra is refused before the model loads."""
    from kinema.toy.evaluate import EvalSettings

    s = EvalSettings(steps=4, extras={"skip_layers": {"blocks": "3"}, "enhance": {"weight": 2.0}})
    assert s.sampling() == dict(steps=4, solver=None, shift=None, guide_scale=None,
                                skip_layers={"blocks": "3"}, enhance={"weight": 2.0})
    r = subprocess.run([sys.executable, "-m", "kinema.cli.main", "eval", "--only", "t2v", "--t2v", "1", "--slg_end", "0.5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--slg_end tunes --slg, which is not given; add --slg." in r.stderr, r.stderr
    out = tmp_path / "e.json"
    r = subprocess.run([sys.executable, "-m", "kinema.cli.main", "eval", "--only", "t2v", "--t2v", "1", "--slg", "default",
                        "--feta", "default", "--cfg_zero_star", "--sample_steps", "4", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "t2v colour %" in r.stdout and out.exists()
