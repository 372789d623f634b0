"""Every way a user can hand the loaders a bad checkpoint ends in one clear CheckpointError."""

import json

import pytest
import torch
from safetensors.torch import save_file

import kinema
from kinema.errors import CheckpointError
from kinema.models.dit import DiTConfig, WanDiT

CFG = DiTConfig("t2v", dim=128, ffn_dim=64, text_dim=16, freq_dim=32, num_heads=1, num_layers=2)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    state = {k: v.contiguous() for k, v in WanDiT(CFG).state_dict().items()}
    save_file(state, root / "dit.safetensors")
    return root, state


def test_good_file_loads(good):
    root, state = good
    dit = kinema.load_dit(root / "dit.safetensors")
    assert dit.config == CFG
    assert torch.equal(dit.blocks[1].ffn[2].weight, state["blocks.1.ffn.2.weight"])


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere\.safetensors"):
        kinema.load_dit(tmp_path / "nowhere.safetensors")


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no DiT checkpoint file in folder"):
        kinema.load_dit(tmp_path)


def test_truncated_safetensors(good, tmp_path):
    data = (good[0] / "dit.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt"):
        kinema.load_dit(bad)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pth could not be read"):
        kinema.load_dit(bad)


def test_wrong_component(tmp_path):
    vae_like = {"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3)}
    save_file(vae_like, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a VAE, not a diffusion transformer.*load_vae"):
        kinema.load_dit(tmp_path / "vae.safetensors")


def test_unknown_key(good, tmp_path):
    state = dict(good[1])
    state["blocks.0.adapter.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.adapter\.weight.*nothing was loaded"):
        kinema.load_dit(tmp_path / "extra.safetensors")


def test_unknown_key_diffusers_format(tmp_path):
    state = {"condition_embedder.time_embedder.linear_1.weight": torch.zeros(2, 2), "blocks.0.attn1.mystery.weight": torch.zeros(2)}
    save_file(state, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown keys for the diffusers .*mystery"):
        kinema.load_dit(tmp_path / "d.safetensors")


def test_shape_mismatch(good, tmp_path):
    state = dict(good[1])
    state["blocks.1.ffn.0.weight"] = torch.zeros(65, 128)
    save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.ffn\.0\.weight' has shape \[65, 128\] .*expects \[64, 128\]"):
        kinema.load_dit(tmp_path / "shape.safetensors")


def test_missing_key(good, tmp_path):
    state = dict(good[1])
    del state["blocks.1.cross_attn.o.bias"]
    save_file(state, tmp_path / "hole.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 weight.*blocks\.1\.cross_attn\.o\.bias"):
        kinema.load_dit(tmp_path / "hole.safetensors")


def test_missing_shard(good, tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"patch_embedding.weight": "part-1.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"missing: .*part-1\.safetensors"):
        kinema.load_dit(tmp_path)


def test_bad_config_json(good, tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes((good[0] / "dit.safetensors").read_bytes())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        kinema.load_dit(tmp_path)


def test_folder_of_single_files_picks_each_component(tmp_path):
    """ComfyUI keeps one file per component in one folder; each loader picks its own by its keys."""
    import kinema.demo
    from kinema.loading.files import TensorSource

    src = tmp_path / "official"
    kinema.demo.write_random_checkpoint(src, model_type="i2v")
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    names = {
        "diffusion_pytorch_model.safetensors": "wan2.1_i2v_tiny.safetensors",
        "Wan2.1_VAE.pth": "wan_vae_custom.safetensors",
        "models_t5_umt5-xxl-enc-bf16.pth": "umt5_tiny.safetensors",
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth": "clip_vision_tiny.safetensors",
    }
    for official, comfy_name in names.items():
        source = TensorSource([src / official])
        save_file({k: source.get(k).contiguous() for k in source.keys()}, comfy / comfy_name)
    dit = kinema.load_dit(comfy, num_heads=2)
    assert dit.config.model_type == "i2v"
    assert kinema.load_vae(comfy).z_dim == 16
    assert kinema.load_clip_vision(comfy).model is not None
    assert kinema.load_text_encoder(comfy, tokenizer=src / "google" / "umt5-xxl").model is not None
    # each picked the file of its own component: the weights are those of the official file it came from
    tokenizer = src / "google" / "umt5-xxl"
    pairs = [
        (dit, kinema.load_dit(src / "diffusion_pytorch_model.safetensors", num_heads=2)),
        (kinema.load_vae(comfy), kinema.load_vae(src / "Wan2.1_VAE.pth")),
        (kinema.load_clip_vision(comfy).model,
         kinema.load_clip_vision(src / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").model),
        (kinema.load_text_encoder(comfy, tokenizer=tokenizer).model,
         kinema.load_text_encoder(src / "models_t5_umt5-xxl-enc-bf16.pth", tokenizer=tokenizer).model),
    ]
    for got, want in pairs:
        got, want = got.state_dict(), want.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    save_file({"unrelated.weight": torch.zeros(2)}, comfy / "other.safetensors")
    assert kinema.load_vae(comfy).z_dim == 16  # a file of no component does not confuse the choice
    # Two DiTs in one folder: which one is meant cannot be told, so the user must name the file.
    (comfy / "wan2.1_i2v_copy.safetensors").write_bytes((comfy / "wan2.1_i2v_tiny.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"several checkpoint files .*pass the file itself"):
        kinema.load_dit(comfy, num_heads=2)
