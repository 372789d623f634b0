"""Tiled VAE encode/decode (kinema/memory/vae_tiling.py) against the untiled VAE.

The VAE is small and random (width 8, one residual block per stage, 4x spatial
and 4x temporal compression, so 17 frames run the full causal chunk sequence)
with every weight O(1), so edge effects are not hidden by small weights. Tiling
is not exact: a tile's convolutions see zeros past its edge, and with random
weights that perturbs the output up to ~6 latent pixels inward (measured in the
module's notes). The blend weights take nothing from a tile's outer third of
the overlap, so a 12-latent-pixel overlap here (one residual block per stage;
the default 16 is for Wan2.1's two) keeps the result within 1e-3 of the
output range. The middle attention runs on whole frames, so it adds no error.
"""

from __future__ import annotations

import pytest
import torch
from conftest import StubTextEncoder, randomise_vae

from kinema.cli.main import main
from kinema.errors import KinemaError
from kinema.memory import vae_tiling as vt
from kinema.models.vae import WanVAE

TOL = 1e-3  # max abs difference / output range
OVERLAP = 12
TILE = (24, 24)  # latent pixels


def _vae() -> WanVAE:
    vae = WanVAE(dim=8, num_res_blocks=1, dim_mult=(1, 2, 2), temporal_downsample=(True, True)).eval()
    randomise_vae(vae, torch.Generator().manual_seed(1), vae.decoder.head[2])
    return vae


@pytest.fixture(scope="module")
def vae():
    return _vae()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return ((got - ref).abs().max() / (ref.max() - ref.min())).item()


def test_layout_covers_and_weights_sum_to_one():
    for length in range(1, 70):
        for tile in range(24, 40):
            for overlap in (8, 12):
                parts = vt.spans(length, tile, overlap)
                assert parts[0][0] == 0 and parts[-1][1] == length
                assert all(a[1] - b[0] >= overlap for a, b in zip(parts, parts[1:]))
                total = torch.zeros(length)
                for i, (a, b) in enumerate(parts):
                    total[a:b] += vt.ramp(parts, i)
                assert total.min() > 0
                if all(2 * (a[1] - b[0]) <= tile for a, b in zip(parts, parts[1:])):  # no pixel in three tiles
                    torch.testing.assert_close(total, torch.ones(length))


def test_one_tile_is_the_untiled_path(vae):
    z = torch.randn(1, 16, 3, 6, 10)
    torch.testing.assert_close(vt.tiled_decode(vae, z, (6, 10)), vae.decode(z), atol=1e-6, rtol=0)
    video = torch.rand(1, 3, 9, 24, 40) * 2 - 1
    torch.testing.assert_close(vt.tiled_encode(vae, video, (6, 10)), vae.encode(video), atol=1e-6, rtol=0)


def test_tiled_decode_matches_untiled(vae):
    z = torch.randn(1, 16, 5, 36, 48)  # 17 frames of 144x192; 2 x 3 tiles
    assert (len(vt.spans(36, TILE[0], OVERLAP)), len(vt.spans(48, TILE[1], OVERLAP))) == (2, 3)
    ref = vae.decode(z)
    out = vt.tiled_decode(vae, z, TILE, OVERLAP)
    assert _rel(out, ref) <= TOL


def test_tiled_encode_matches_untiled(vae):
    torch.manual_seed(3)
    coarse = torch.rand(1, 3, 5, 9, 12) * 2 - 1
    video = torch.nn.functional.interpolate(coarse, size=(17, 144, 192), mode="trilinear")  # 3 x 3 tiles below
    assert (len(vt.spans(36, 20, 8)), len(vt.spans(48, 24, OVERLAP))) == (3, 3)
    ref = vae.encode(video)
    assert _rel(vt.tiled_encode(vae, video, (20, 24), OVERLAP), ref) <= TOL * 2  # 8-pixel overlap across rows
    assert _rel(vt.tiled_encode(vae, video, (24, 24), OVERLAP), ref) <= TOL


def test_auto_tiles_only_over_budget(vae, monkeypatch):
    def half(need: int) -> int:  # half of what scales with the frame
        return vt.FIXED_BYTES + (need - vt.FIXED_BYTES) // 2

    shape = (1, 16, 5, 36, 48)
    untiled = vt.decode_bytes(vae, shape)
    assert vt.decode_bytes(vae, shape, TILE) < untiled
    assert vt.TiledVAE(vae, "auto", overlap=OVERLAP, budget=untiled).plan("decode", shape) is None
    th, tw = vt.TiledVAE(vae, "auto", overlap=OVERLAP, budget=half(untiled)).plan("decode", shape)
    assert th * tw < 36 * 48 and vt.decode_bytes(vae, shape, (th, tw)) <= half(untiled)
    video = (1, 3, 17, 144, 192)
    untiled = vt.encode_bytes(vae, video)
    assert vt.TiledVAE(vae, "auto", overlap=OVERLAP, budget=untiled).plan("encode", video) is None
    th, tw = vt.TiledVAE(vae, "auto", overlap=OVERLAP, budget=half(untiled)).plan("encode", video)
    assert th * tw < 36 * 48 and vt.encode_bytes(vae, video, (th, tw)) <= half(untiled)

    calls = []
    monkeypatch.setattr(vt, "tiled_decode", lambda *a: calls.append(a[2]) or vae.decode(a[1]))
    z = torch.randn(1, 16, 2, 6, 8)
    small = vt.TiledVAE(vae, "auto", overlap=2, budget=vt.decode_bytes(vae, z.shape) - 1)
    assert small.decode(z).shape == (1, 3, 5, 24, 32) and len(calls) == 1
    vt.TiledVAE(vae, "auto", overlap=2, budget=10**12).decode(z)
    vt.TiledVAE(vae, "off", budget=0).decode(z)
    assert len(calls) == 1
    # With no budget given it is read from the device: a CPU has far more than this needs.
    assert vt.TiledVAE(vae).plan("decode", z.shape) is None and vt.memory_budget("cpu") > 2**20


def test_fixed_tile_in_pixels(vae):
    r = vae.spatial_ratio
    tiled = vt.TiledVAE(vae, "96x128", overlap=OVERLAP)  # width x height in pixels
    assert tiled.plan("decode", (1, 16, 5, 36, 48)) == (128 // r, 96 // r)
    assert tiled.plan("encode", (1, 3, 17, 144, 192)) == (128 // r, 96 // r)
    assert tiled.plan("decode", (1, 16, 5, 30, 20)) is None  # one tile covers it
    assert tiled.z_dim == vae.z_dim and tiled.spatial_ratio == r  # everything else is the VAE's


@pytest.mark.parametrize(
    "value, message",
    [("big", "is not auto, off or WxH"), ("512x", "is not auto, off or WxH"), ("500x512", "multiples of 8"),
     ("24x128", "too small"), ("0x512", "too small")],
)
def test_bad_values(value, message):
    with pytest.raises(KinemaError, match=message) as err:
        vt.parse_vae_tile(value)
    assert value in str(err.value)
    assert vt.parse_vae_tile(" Auto ") == "auto" and vt.parse_vae_tile("off") == "off"
    assert vt.parse_vae_tile("512*256") == (512, 256) and vt.parse_vae_tile((256, 384)) == (256, 384)


def test_small_tiles_overlap_by_half_their_side(vae, caplog):
    """A tile below twice the overlap is allowed (the built-in 64x64 model tiles at 32x32): the overlap shrinks
    to half the tile's side, with a warning, and the result stays close to untiled."""
    assert vt.parse_vae_tile("32x32") == (32, 32)
    assert vt.tile_overlap((32, 40)) == vt.OVERLAP and vt.tile_overlap((4, 6)) == 2
    r = vae.spatial_ratio
    z = torch.randn(1, 16, 2, 8, 8)
    with caplog.at_level("WARNING", logger="kinema"):
        tiled = vt.TiledVAE(vae, f"{4 * r}x{4 * r}").decode(z)  # 4 latent pixels a side: 3 x 3 tiles
    assert "overlapping by 2 latent pixels" in caplog.text
    assert tiled.shape == (1, 3, 5, 8 * r, 8 * r) and _rel(tiled, vae.decode(z)) < 0.25  # measured 0.18: seams, not a wrong layout


@pytest.mark.parametrize("value", ["huge", "100x256", "16x16"])
def test_cli_rejects_bad_vae_tile(value, capsys):
    assert main(["generate", "--prompt", "a red circle", "--vae_tile", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kinema: error: --vae_tile") and value in err[0]


def test_pipeline_decodes_through_tiles(vae, monkeypatch):
    from kinema.models.dit import DiTConfig, WanDiT
    from kinema.pipeline.models import Models
    from kinema.pipeline.pipeline import Pipeline

    torch.manual_seed(0)
    dit = WanDiT(DiTConfig("t2v", dim=32, ffn_dim=32, text_dim=16, num_heads=2, num_layers=1)).eval()
    calls = []
    real = vt.tiled_decode
    monkeypatch.setattr(vt, "tiled_decode", lambda *a: calls.append(a[2]) or real(*a))
    kw = dict(size=(160, 128), frame_num=5, steps=2, progress=False)
    plain = Pipeline(Models(dit, vae, StubTextEncoder()))("a red circle", vae_tile="off", **kw)
    tiled = Pipeline(Models(dit, vt.TiledVAE(vae, "64x64", overlap=4), StubTextEncoder()))("a red circle", **kw)
    assert calls == [(16, 16)] and torch.equal(plain.latents, tiled.latents)
    assert _rel(tiled.video, plain.video) < 0.1  # a 4-latent-pixel overlap: wiring, not accuracy
    again = Pipeline(Models(dit, vae, StubTextEncoder()))("a red circle", vae_tile="64x64", **kw)
    assert len(calls) == 2 and again.settings["vae_tile"] == "64x64"


def test_cli_passes_vae_tile(tmp_path, monkeypatch):
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_metadata

    seen = []
    real = vt.TiledVAE.plan
    monkeypatch.setattr(vt.TiledVAE, "plan", lambda self, op, shape: (seen.append(self.tile), real(self, op, shape))[1])
    write_random_checkpoint(tmp_path / "ckpt")
    args = ["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(tmp_path / "ckpt"), "--size", "64*48", "--frame_num", "5",
            "--sample_steps", "2", "--prompt", "a red circle", "--save_file", str(tmp_path / "out.mp4")]
    assert main([*args, "--vae_tile", "512x256"]) == 0 and read_metadata(tmp_path / "out.mp4")["vae_tile"] == "512x256"
    assert seen == [(512, 256)]  # the decode's tile (a t2v DiT has no condition to encode)
