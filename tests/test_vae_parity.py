"""Kinema's Wan2.1 VAE against diffusers' AutoencoderKLWan, through every checkpoint format the loader reads.

The reference is a small random diffusers VAE with odd widths and every weight
randomised (so no path is silently zero). Its weights are written in the
official layout (named by diffusers' own official->diffusers converter, not by
Kinema's map), as a diffusers pipeline folder and as a sharded component
folder; each is loaded with `load_vae` and run on the same inputs.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import randomise_vae
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from kinema.errors import CheckpointError, KinemaError
from kinema.loading.vae import load_vae
from kinema.models.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAE

CONFIG = dict(base_dim=20, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
H, W = 32, 48  # non-square; latents 4 x 6
FRAMES = (1, 17)  # 1 and 5 latent frames
FP32_TOL = 1e-4
BF16_REL_TOL = 2e-2


def _stats(mean, std):
    return torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)


def _official_state(model: AutoencoderKLWan, dim: int) -> dict[str, torch.Tensor]:
    """The diffusers weights under official names, using diffusers' converter run on Kinema's canonical names."""
    with torch.device("meta"):
        names = list(WanVAE(dim=dim).state_dict())
    to_official = convert_wan_vae_to_diffusers({n: n for n in names})  # diffusers name -> official name
    state = model.state_dict()
    assert set(to_official) == set(state), "Kinema's parameter names do not match the official layout"
    return {to_official[k]: v.contiguous() for k, v in state.items()}


def _max_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return (got.float() - ref.float()).abs().max().item()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return _max_diff(got, ref) / ref.abs().max().item()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    gen = torch.Generator().manual_seed(1234)
    model = AutoencoderKLWan(**CONFIG).eval()
    randomise_vae(model, gen, model.decoder.conv_out)
    root = tmp_path_factory.mktemp("vae")
    official = _official_state(model, CONFIG["base_dim"])

    paths = {"official_safetensors": root / "wan_2.1_vae.safetensors"}
    save_file(official, paths["official_safetensors"])
    # An official release folder: the .pth beside the DiT's config.json, which the loader must not mistake for its own.
    (root / "Wan2.1-T2V").mkdir()
    torch.save(official, root / "Wan2.1-T2V" / "Wan2.1_VAE.pth")
    (root / "Wan2.1-T2V" / "config.json").write_text(json.dumps({"model_type": "t2v", "dim": 1536}))
    paths["official_pth_folder"] = root / "Wan2.1-T2V"
    model.save_pretrained(root / "pipeline" / "vae")
    paths["diffusers_pipeline"] = root / "pipeline"
    model.save_pretrained(root / "sharded", max_shard_size="300KB")
    assert (root / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    paths["diffusers_sharded"] = root / "sharded"

    mean, std = _stats(WAN21_LATENTS_MEAN, WAN21_LATENTS_STD)
    cases = {}
    with torch.no_grad():
        for f in FRAMES:
            video = torch.rand(1, 3, f, H, W, generator=gen) * 2 - 1
            enc = (model.encode(video).latent_dist.mean - mean) / std
            z = torch.randn(enc.shape, generator=gen)
            dec = model.decode(z * std + mean).sample
            cases[f] = SimpleNamespace(video=video, enc=enc, z=z, dec=dec)
    return SimpleNamespace(model=model, official=official, paths=paths, cases=cases, root=root)


@pytest.fixture(scope="module")
def fp32_vae(ref):
    return load_vae(ref.paths["official_safetensors"])


FORMATS = ["official_safetensors", "official_pth_folder", "diffusers_pipeline", "diffusers_sharded"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_parity(ref, fp32_vae, fmt):
    vae = fp32_vae if fmt == "official_safetensors" else load_vae(ref.paths[fmt])
    assert isinstance(vae, WanVAE) and vae.dtype == torch.float32
    assert (vae.dim_mult, vae.num_res_blocks, vae.temporal_downsample) == ([1, 2, 4, 4], 2, [False, True, True])
    for f, case in ref.cases.items():
        enc = vae.encode(case.video)
        dec = vae.decode(case.z)
        assert enc.shape == (1, 16, 1 + (f - 1) // 4, H // 8, W // 8)
        assert dec.shape == (1, 3, f, H, W)
        assert _max_diff(enc, case.enc) <= FP32_TOL, f"{fmt} encode F={f}: {_max_diff(enc, case.enc):.3g}"
        assert _max_diff(dec, case.dec) <= FP32_TOL, f"{fmt} decode F={f}: {_max_diff(dec, case.dec):.3g}"


def test_bf16_close_to_fp32_reference(ref):
    # bf16 rounding over ~40 layers alone costs about 1.5% here (diffusers' own bf16 path on these weights
    # measures the same), so the bound has little slack; a real bf16 bug (a wrong cast, a lost cache) is far above it.
    vae = load_vae(ref.paths["official_safetensors"], dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in vae.parameters())
    for f, case in ref.cases.items():
        assert _rel(vae.encode(case.video), case.enc) <= BF16_REL_TOL, f"bf16 encode F={f}"
        assert _rel(vae.decode(case.z), case.dec) <= BF16_REL_TOL, f"bf16 decode F={f}"


def test_prefixed_official_keys_load_the_same_weights(ref, fp32_vae, tmp_path):
    path = tmp_path / "prefixed.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in ref.official.items()}, path)
    vae = load_vae(path)
    for key, value in fp32_vae.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key


def test_small_diffusers_file_infers_architecture(tmp_path):
    """Another shape of VAE (3 stages, 1 res block, 2x in time, z_dim 4) from a single diffusers-named file."""
    gen = torch.Generator().manual_seed(1234)
    config = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 3], num_res_blocks=1, temperal_downsample=[False, True])
    model = AutoencoderKLWan(**config).eval()
    randomise_vae(model, gen, model.decoder.conv_out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "small_vae.safetensors")
    vae = load_vae(tmp_path / "small_vae.safetensors")
    assert (vae.z_dim, vae.dim_mult, vae.num_res_blocks, vae.temporal_downsample) == (4, [1, 2, 3], 1, [False, True])
    assert vae.latents_mean == (0.0,) * 4 and vae.latents_std == (1.0,) * 4  # not the 16-channel Wan2.1 statistics
    video = torch.rand(1, 3, 9, 8, 12, generator=gen) * 2 - 1  # 9 frames -> 5 latent frames at 2x in time
    with torch.no_grad():
        mu = model.encode(video).latent_dist.mean
        z = torch.randn(mu.shape, generator=gen)
        dec = model.decode(z).sample
    assert _max_diff(vae.encode(video), mu) <= FP32_TOL
    assert _max_diff(vae.decode(z), dec) <= FP32_TOL


def test_latent_stats_come_from_diffusers_config(ref, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(ref.paths["diffusers_pipeline"] / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    config["latents_mean"] = [0.1 * i for i in range(16)]
    config["latents_std"] = [1.0 + 0.5 * i for i in range(16)]
    (folder / "config.json").write_text(json.dumps(config))
    vae = load_vae(folder)
    assert vae.latents_mean == tuple(config["latents_mean"])
    case = ref.cases[1]
    with torch.no_grad():
        mu = ref.model.encode(case.video).latent_dist.mean
    mean, std = _stats(config["latents_mean"], config["latents_std"])
    assert _max_diff(vae.encode(case.video), (mu - mean) / std) <= FP32_TOL
    assert vae.latents_std == tuple(config["latents_std"])
    with torch.no_grad():  # decode un-normalises with the same statistics
        dec = ref.model.decode(case.z * std + mean).sample
    assert _max_diff(vae.decode(case.z), dec) <= FP32_TOL


# ---- errors: each one a CheckpointError that names the file, the key and the shapes; nothing half-loaded


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "Wan2.1_VAE.pth")


def test_truncated_safetensors(ref, tmp_path):
    data = ref.paths["official_safetensors"].read_bytes()
    path = tmp_path / "wan_2.1_vae.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae(path)


def test_dit_passed_as_vae(tmp_path):
    path = tmp_path / "dit.safetensors"
    dit = {"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}
    save_file(dit, path)
    with pytest.raises(CheckpointError, match=r"diffusion transformer.*load_dit"):
        load_vae(path)


def test_unknown_extra_key(ref, tmp_path):
    path = tmp_path / "extra.safetensors"
    save_file({**ref.official, "encoder.extra.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="encoder.extra.weight"):
        load_vae(path)
    diffusers_names = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    path = tmp_path / "extra_diffusers.safetensors"
    save_file({**diffusers_names, "decoder.up_blocks.0.mystery.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"unknown keys.*decoder\.up_blocks\.0\.mystery\.weight"):
        load_vae(path)


def test_missing_key(ref, tmp_path):
    path = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in ref.official.items() if k != "decoder.head.2.bias"}, path)
    with pytest.raises(CheckpointError, match=r"missing 1 weight.*'decoder\.head\.2\.bias' \[3\]"):
        load_vae(path)


def test_wrong_shape(ref, tmp_path):
    path = tmp_path / "wrong_shape.safetensors"
    save_file({**ref.official, "decoder.middle.1.proj.weight": torch.zeros(80, 81, 1, 1)}, path)
    expected = r"'decoder\.middle\.1\.proj\.weight' has shape \[80, 81, 1, 1\].*expects \[80, 80, 1, 1\]"
    with pytest.raises(CheckpointError, match=expected):
        load_vae(path)


def test_video_shape_errors(fp32_vae):
    with pytest.raises(KinemaError, match=r"1 \+ 4k frames.*got 4"):
        fp32_vae.encode(torch.zeros(1, 3, 4, H, W))
    with pytest.raises(KinemaError, match="multiples of 8"):
        fp32_vae.encode(torch.zeros(1, 3, 1, 12, W))
    with pytest.raises(KinemaError, match=r"latents shaped \[B, 16"):
        fp32_vae.decode(torch.zeros(1, 4, 1, 2, 2))


def test_cpu_causal_convolutions_read_channels_last(ref, fp32_vae, monkeypatch):
    """On the CPU every padded 3D convolution of the VAE reads a channels-last (NDHWC) buffer, as oneDNN takes it without
    reordering; the video equals (to float rounding) the one of NCDHW buffers, and comes back contiguous."""
    from kinema.models import vae as vae_module

    layouts, cl3d = [], torch.channels_last_3d
    real = torch.nn.Conv3d._conv_forward

    def spy(self, x, weight, bias):
        if x.shape[2] > 1:  # (a first frame alone runs as a 2D convolution)
            padded = any(getattr(self, "_causal_padding", ()))  # a CausalConv3d with a border: it builds a buffer
            layouts.append((padded, x.is_contiguous(memory_format=cl3d)))
        return real(self, x, weight, bias)

    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", spy)
    z, video = ref.cases[17].z, ref.cases[17].video
    fast, enc = fp32_vae.decode(z), fp32_vae.encode(video)
    padded = [cl for is_padded, cl in layouts if is_padded]
    assert padded and all(padded), f"{padded.count(False)} of {len(padded)} padded convolutions read NCDHW"
    assert fast.is_contiguous()
    monkeypatch.setattr(vae_module.torch, "channels_last_3d", torch.contiguous_format)  # the buffers in NCDHW
    layouts.clear()
    plain, plain_enc = fp32_vae.decode(z), fp32_vae.encode(video)
    assert not any(cl for is_padded, cl in layouts if is_padded)
    assert _max_diff(fast, plain) <= 1e-5 and _max_diff(enc, plain_enc) <= 1e-5
