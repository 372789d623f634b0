"""Task extend: a video continued from its last frames (known by the image condition and latent replacement),
colour-matched and joined; through the Python API and kinema generate, with its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import StubTextEncoder

from kinema.errors import KinemaError
from kinema.models.dit import DiTConfig, WanDiT
from kinema.pipeline.extend import (OVERLAP_JOIN, Extension, colour_match, histogram_match, join, known_frames, parse_extension,
                                   replace_known)
from kinema.pipeline.models import Models
from kinema.pipeline.pipeline import Pipeline
from kinema.sampling.context import StepContext

PROMPT = "a red circle moving right"


# -- the pieces -------------------------------------------------------------------------------------
def test_extension_frames_and_checks():
    ext = parse_extension(32, 9, False, 17)
    assert (ext.clip_frames(), ext.latent_overlap()) == (41, 3)
    assert parse_extension(8, 5, True, 9).clip_frames() == 5 + 8 + 4
    for args, text in (((30, 9, False, 17), "multiple of 4"), ((32, 8, False, 17), "4k \\+ 1"),
                       ((32, 1, False, 17), "at least 5"), ((32, 21, False, 17), "more than the 17 frames"),
                       ((0, 9, False, 17), "whole number"), ((32, 9, "yes", 17), "True or False")):
        with pytest.raises(KinemaError, match=text):
            parse_extension(*args)


def test_known_frames_put_the_overlap_first_and_the_loop_last():
    video = torch.arange(10.0).view(1, 10, 1, 1).expand(3, 10, 2, 2)
    known = known_frames(Extension(8, 5), video)
    assert {i: int(f[0, 0, 0]) for i, f in known.items()} == {0: 5, 1: 6, 2: 7, 3: 8, 4: 9}
    known = known_frames(Extension(8, 5, loop=True), video)  # clip of 17: new frames 5..12, then frames 0..3
    assert {i: int(f[0, 0, 0]) for i, f in known.items()} == {0: 5, 1: 6, 2: 7, 3: 8, 4: 9, 13: 0, 14: 1, 15: 2, 16: 3}


def test_colour_match_shifts_the_new_frames_by_the_overlaps_offset():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(3, 5, 8, 8, generator=g) * 0.6 - 0.3
    offset = torch.tensor([0.1, -0.05, 0.02])[:, None, None, None]
    generated = (source - source.mean()) * 1.1 + source.mean() + offset  # the model's overlap: offset, more contrast
    out = colour_match(generated, generated, source)
    assert torch.allclose(out.mean((1, 2, 3)), source.mean((1, 2, 3)), atol=1e-6)  # the offset taken out
    # and nothing else: the spread is kept (a gain would move every colour away from the frame's mean)
    assert torch.allclose(out.flatten(1).std(1), generated.flatten(1).std(1), atol=1e-6)
    new = torch.rand(3, 2, 8, 8, generator=g) * 2 - 1
    shift = (source.mean((1, 2, 3)) - generated.mean((1, 2, 3)))[:, None, None, None]
    assert torch.allclose(colour_match(new, generated, source), (new + shift).clamp(-1, 1), atol=1e-6)


def test_histogram_match_gives_every_frame_the_overlaps_values():
    g = torch.Generator().manual_seed(1)
    reference = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    # a frame with the same values in another order comes back as those values in its own order
    order = torch.randperm(64, generator=g)
    shuffled = reference.flatten(2)[:, :, order].view(3, 1, 8, 8)
    assert torch.allclose(histogram_match(shuffled, reference), shuffled, atol=1e-6)
    # frames whose colour drifted (brighter, flatter, each by more) are put back on the reference's values, keeping
    # each frame's own order of pixels
    drifted = torch.cat([reference * (1 - 0.1 * i) + 0.05 * i for i in range(4)], dim=1)
    out = histogram_match(drifted, reference)
    assert torch.allclose(out, reference.expand(3, 4, 8, 8), atol=1e-6)
    # a frame of other values gets the reference's distribution (sorted values equal), ties kept equal
    other = torch.rand(3, 2, 8, 8, generator=g).round(decimals=1)
    out = histogram_match(other, reference)
    for f in range(2):
        mapped = out[:, f].flatten(1)
        assert (mapped.min(1).values >= reference.flatten(1).min(1).values - 1e-6).all()
        assert (mapped.max(1).values <= reference.flatten(1).max(1).values + 1e-6).all()
        flat = other[:, f].flatten(1)
        same = flat[:, :, None] == flat[:, None, :]
        assert torch.equal(same, mapped[:, :, None] == mapped[:, None, :])  # equal in, equal out; else the order kept
    # a pooled overlap of K frames: each new frame takes the pooled distribution's quantiles
    pooled = torch.rand(3, 3, 8, 8, generator=g)
    one = histogram_match(pooled[:, :1] + 0.3, pooled)[:, 0].flatten(1).sort(1).values
    want = pooled.flatten(1).sort(1).values
    assert torch.allclose(one, want[:, torch.linspace(0, want.shape[1] - 1, 64).round().long()], atol=0.02)


def test_join_colour_match_modes():
    g = torch.Generator().manual_seed(2)
    values = torch.rand(3, 64, generator=g) * 2 - 1  # every frame the same values, moved about (a moving scene)
    video = torch.stack([values[:, torch.randperm(64, generator=g)].view(3, 8, 8) for _ in range(9)], dim=1)
    clip = torch.cat([video[:, -5:], video[:, -5:] * 0.8 + 0.1], dim=1)  # the new frames: the overlap, drifted
    base = dict(frames=5, overlap=5)
    off = join(Extension(**base, colour="off"), video, clip)
    assert torch.equal(off[:, 9:], clip[:, 5:])
    hm = join(Extension(**base, colour="hm"), video, clip)
    assert torch.allclose(hm[:, 9:], video[:, -5:], atol=1e-6)  # the drift taken out, frame by frame
    overlap = join(Extension(**base, colour="overlap"), video, clip)
    assert torch.equal(overlap[:, 9:], colour_match(clip[:, 5:], clip[:, :5], video[:, -5:]))
    assert torch.equal(join(Extension(**base), video, clip), overlap)  # the default
    assert Extension(**base, colour="hm").record()["colour_match"] == "hm"
    with pytest.raises(KinemaError, match="colour_match 'mkl' is not one of overlap, hm, off"):
        parse_extension(8, 5, False, 9, colour="mkl")


def test_join_keeps_the_source_and_appends_the_new_frames():
    video = torch.rand(3, 12, 4, 4) * 2 - 1
    clip = torch.cat([video[:, -5:], torch.rand(3, 8, 4, 4) * 2 - 1], dim=1)  # a perfect overlap: no correction
    for how in OVERLAP_JOIN:
        out = join(Extension(8, 5, join=how), video, clip)
        assert out.shape == (3, 20, 4, 4) and torch.allclose(out[:, :12], video, atol=1e-6)
        assert torch.allclose(out[:, 12:], clip[:, 5:13], atol=1e-5)


def test_join_blend_cross_fades_the_overlap_into_the_clips_own():
    g = torch.Generator().manual_seed(3)
    video = torch.rand(3, 12, 4, 4, generator=g) * 1.6 - 0.8
    generated = video[:, -5:] + 0.05 * torch.randn(3, 5, 4, 4, generator=g)  # decoded again: a little off
    clip = torch.cat([generated, torch.rand(3, 8, 4, 4, generator=g) * 1.6 - 0.8], dim=1)
    cut = join(Extension(8, 5, colour="off", join="cut"), video, clip)
    assert torch.equal(cut[:, :12], video) and torch.equal(cut[:, 12:], clip[:, 5:])
    blend = join(Extension(8, 5, colour="off"), video, clip)  # the default
    assert torch.equal(blend[:, :7], video[:, :7]) and torch.equal(blend[:, 12:], clip[:, 5:])
    for i in range(5):  # frame i of the overlap: (i + 1) / 5 of the generated one; the last is all generated
        w = (i + 1) / 5
        assert torch.allclose(blend[:, 7 + i], video[:, 7 + i] * (1 - w) + generated[:, i] * w, atol=1e-6)
    # colour-matched like the new frames: the generated overlap shifted by the same offset
    shifted = join(Extension(8, 5), video, clip)
    offset = (video[:, -5:].mean((1, 2, 3)) - generated.mean((1, 2, 3)))[:, None, None]
    assert torch.allclose(shifted[:, 11], (generated[:, 4] + offset).clamp(-1, 1), atol=1e-6)
    assert Extension(8, 5).record()["overlap_join"] == "blend"
    with pytest.raises(KinemaError, match="overlap_join 'fade' is not one of blend, cut"):
        parse_extension(8, 5, False, 9, join="fade")


def test_replace_known_shows_the_model_the_known_frames_at_each_noise_level():
    z, noise = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 5, 3, 3)
    seen = []
    fn = replace_known(lambda x, t, step: seen.append(x) or torch.zeros_like(x), z, noise)
    x = torch.randn(1, 4, 5, 3, 3)
    fn(x, None, StepContext(step=3, steps=10, sigma=0.25, timestep=250))
    assert torch.allclose(seen[0][:, :, :2], 0.75 * z + 0.25 * noise[:, :, :2])
    assert torch.equal(seen[0][:, :, 2:], x[:, :, 2:])


# -- through the pipeline -------------------------------------------------------------------------------
def tiny_models(i2v: bool) -> Models:
    from kinema.encoders.image import ClipVisionEncoder
    from kinema.loading.dit import ModelInfo
    from kinema.models.clip import ClipVisionConfig, CLIPVisionTower
    from kinema.models.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval().requires_grad_(False)
    if not i2v:
        dit = WanDiT(DiTConfig("t2v", dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=2)).eval()
        return Models(dit, vae, StubTextEncoder(), None, ModelInfo())
    dit = WanDiT(DiTConfig("i2v", in_dim=36, dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=2,
                           image_dim=32)).eval()
    clip = ClipVisionEncoder(CLIPVisionTower(ClipVisionConfig(dim=32, mlp_dim=64, num_heads=2, num_layers=2)).eval())
    return Models(dit, vae, StubTextEncoder(), clip, ModelInfo(("t2v", "i2v", "flf2v")))


@pytest.fixture(scope="module")
def source():
    g = torch.Generator().manual_seed(5)
    return torch.rand(3, 13, 32, 32, generator=g) * 2 - 1  # [3, F, H, W] in [-1, 1]


@pytest.mark.parametrize("i2v", [False, True])
def test_pipeline_extends(source, i2v):
    pipe = Pipeline(tiny_models(i2v))
    out = pipe(PROMPT, task="extend", video=source, extend_frames=8, overlap_frames=5, steps=3, seed=1, progress=False)
    assert out.video.shape == (3, 21, 32, 32)
    assert torch.equal(out.video[:, :8], source[:, :8])  # the source's frames before the overlap kept as they were
    cut = pipe(PROMPT, task="extend", video=source, extend_frames=8, overlap_frames=5, steps=3, seed=1,
               overlap_join="cut", progress=False)
    assert torch.equal(cut.video[:, :13], source)  # every source frame kept as it was
    assert torch.equal(cut.video[:, 13:], out.video[:, 13:]) and cut.settings["overlap_join"] == "cut"
    assert out.latents.shape == (16, 4, 4, 4)  # the clip: 5 + 8 = 13 frames
    z = pipe.models.vae.encode(source[:, -5:][None])[0]
    assert torch.equal(out.latents[:, :2], z)  # the overlap's latents exactly
    rec = out.settings
    assert rec["task"] == "extend" and (rec["extend_frames"], rec["overlap_frames"], rec["loop"]) == (8, 5, False)
    assert "frame_num" not in rec and "size" not in rec
    other = pipe(PROMPT, task="extend", video=source, extend_frames=8, overlap_frames=5, steps=3, seed=2,
                 progress=False)
    assert (other.video[:, 13:] - out.video[:, 13:]).abs().max() > 1e-3  # the new frames are generated
    if i2v:
        looped = pipe(PROMPT, task="extend", video=source, extend_frames=8, overlap_frames=5, loop=True, steps=3,
                      seed=1, progress=False)
        assert looped.video.shape == (3, 21, 32, 32) and looped.latents.shape == (16, 5, 4, 4)


def test_extend_keeps_the_videos_own_size(source, caplog):
    """A video off the model's 16-pixel grid: the new clip is generated at the rounded size and resized to the
    video's, so the output has the video's size and, with a cut join, its frames exactly as given."""
    import logging

    pipe = Pipeline(tiny_models(False))
    odd = torch.nn.functional.interpolate(source.transpose(0, 1), size=(36, 28), mode="bilinear").transpose(0, 1)
    with caplog.at_level(logging.INFO, logger="kinema"):
        out = pipe(PROMPT, task="extend", video=odd, extend_frames=8, overlap_frames=5, steps=3, seed=1,
                   overlap_join="cut", progress=False)
    assert "generated at 32x32 and resized to the video's 28x36" in caplog.text
    assert out.video.shape == (3, 21, 36, 28) and torch.equal(out.video[:, :13], odd)
    assert out.latents.shape == (16, 4, 4, 4)  # sampled at 32x32
    again = pipe(PROMPT, task="extend", video=out.video, extend_frames=8, overlap_frames=5, steps=3, seed=2,
                 progress=False)  # and it chains
    assert again.video.shape == (3, 29, 36, 28) and torch.equal(again.video[:, :16], out.video[:, :16])
    # a working size asked for: the new clip made there (a large video extended at a small size), then resized
    small = pipe(PROMPT, task="extend", video=odd, extend_frames=8, overlap_frames=5, steps=3, seed=1, size="16*16",
                 overlap_join="cut", progress=False)
    assert small.latents.shape == (16, 4, 2, 2) and small.video.shape == (3, 21, 36, 28)
    assert torch.equal(small.video[:, :13], odd) and small.settings["size"] == "16*16"
    assert "size" not in out.settings  # the video's own: not repeated


def test_extend_errors(source):
    t2v, i2v = Pipeline(tiny_models(False)), Pipeline(tiny_models(True))
    cases = [(t2v, dict(extend_frames=8, loop=True), "needs a DiT that takes known frames"),
             (i2v, dict(extend_frames=8, frame_num=21), "drop frame_num"),
             (i2v, dict(), "needs extend_frames"),
             (i2v, dict(extend_frames=6), "multiple of 4")]
    for pipe, kw, text in cases:
        with pytest.raises(KinemaError, match=text):
            pipe.prepare(PROMPT, task="extend", video=source, progress=False, **kw)
    with pytest.raises(KinemaError, match="extend_frames is for task extend"):
        i2v.prepare(PROMPT, extend_frames=8, progress=False)
    with pytest.raises(KinemaError, match="colour_match is for task extend"):
        i2v.prepare(PROMPT, colour_match="hm", progress=False)
    with pytest.raises(KinemaError, match="colour_match 'x' is not one of"):
        i2v.prepare(PROMPT, task="extend", video=source, extend_frames=8, colour_match="x", progress=False)
    with pytest.raises(KinemaError, match="overlap_join is for task extend"):
        i2v.prepare(PROMPT, overlap_join="cut", progress=False)
    with pytest.raises(KinemaError, match="overlap_join 'x' is not one of"):
        i2v.prepare(PROMPT, task="extend", video=source, extend_frames=8, overlap_join="x", progress=False)
    with pytest.raises(KinemaError, match="needs video"):
        i2v.prepare(PROMPT, task="extend", extend_frames=8, progress=False)


def test_cli_extends_and_repeats(tmp_path, capsys):
    from kinema.cli.main import main
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_metadata, read_video

    ckpt = tmp_path / "Wan2.1-T2V-tiny"
    write_random_checkpoint(ckpt)
    base = ["generate", "--ckpt_dir", str(ckpt), "--sample_steps", "2", "--base_seed", "3", "--lossless"]
    first = tmp_path / "first.webp"
    assert main([*base, "--task", "t2v-1.3B", "--size", "32*32", "--frame_num", "9", "--prompt", PROMPT,
                 "--save_file", str(first)]) == 0
    longer = tmp_path / "longer.webp"
    assert main([*base, "--task", "extend", "--video", str(first), "--extend_frames", "8", "--overlap_frames", "5",
                 "--prompt", PROMPT, "--save_file", str(longer)]) == 0
    frames = read_video(longer).frames
    assert frames.shape == (17, 32, 32, 3) and torch.equal(frames[:4], read_video(first).frames[:4])
    meta = read_metadata(longer)
    assert (meta["task"], meta["extend_frames"], meta["overlap_frames"], meta["colour_match"],
            meta["overlap_join"]) == ("extend", 8, 5, "overlap", "blend")
    cut = tmp_path / "cut.webp"
    assert main([*base, "--task", "extend", "--video", str(first), "--extend_frames", "8", "--overlap_frames", "5",
                 "--overlap_join", "cut", "--prompt", PROMPT, "--save_file", str(cut)]) == 0
    assert torch.equal(read_video(cut).frames[:9], read_video(first).frames)  # every input frame as it was
    again = tmp_path / "again.webp"
    assert main([*base, "--from", str(longer), "--video", str(first), "--save_file", str(again)]) == 0
    assert np.array_equal(read_video(again).frames, frames)
    capsys.readouterr()
    assert main([*base, "--task", "extend", "--video", str(first), "--extend_frames", "7", "--prompt", PROMPT,
                 "--save_file", str(tmp_path / "x.webp")]) == 2
    assert "--extend_frames 7 must be a multiple of 4" in capsys.readouterr().err
