"""Parity of Kinema's CLIP vision tower with transformers' CLIPVisionModel, in every checkpoint format.

Small random towers with odd widths stand in for ViT-H/14; the reference is
`hidden_states[-2]` (the penultimate block's output, which Wan2.1 uses). The
other formats are written from the same weights by inverse mappings defined
here, so a wrong rule in any key map breaks parity.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from conftest import rel_err
from kinema.errors import CheckpointError
from kinema.loading.clip import WAN_CLIP_FILE, load_clip_vision

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
TOL = 1e-4


def make_hf(hidden, inter, heads, image, patch, act="gelu", seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image, patch_size=patch, hidden_act=act, layer_norm_eps=1e-5,
    )
    model = CLIPVisionModel._from_config(cfg, attn_implementation="eager").eval()
    # Random weights of O(1) effect everywhere, so every tensor's mapping matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.3)
    return model


def hf_state(model) -> dict[str, torch.Tensor]:
    """transformers 5 saves CLIPVisionModel without 'vision_model.'; normalise to the bare names."""
    return {k.removeprefix("vision_model."): v.clone().contiguous() for k, v in model.state_dict().items()}


def to_comfy(sd):
    """ComfyUI / transformers 4.x CLIP file: 'vision_model.*' plus the extras of a full CLIPModel."""
    out = {f"vision_model.{k}": v for k, v in sd.items()}
    d = sd["pre_layrnorm.weight"].shape[0]
    out.update({
        "visual_projection.weight": torch.randn(16, d),
        "text_projection.weight": torch.randn(16, 24),
        "logit_scale": torch.tensor(2.6),
        "text_model.embeddings.token_embedding.weight": torch.randn(50, 24),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(24, 24),
        "text_model.final_layer_norm.weight": torch.ones(24),
    })
    return out


def to_wan(sd, layers=3):
    d = sd["pre_layrnorm.weight"].shape[0]
    out = {
        "visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": sd["embeddings.class_embedding"].view(1, 1, d),
        "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],
        "visual.pre_norm.weight": sd["pre_layrnorm.weight"],
        "visual.pre_norm.bias": sd["pre_layrnorm.bias"],
        "visual.post_norm.weight": sd["post_layernorm.weight"],
        "visual.post_norm.bias": sd["post_layernorm.bias"],
        "visual.head": torch.randn(d, 16),
        "textual.token_embedding.weight": torch.randn(50, 24),
        "textual.blocks.0.attn.q.weight": torch.randn(24, 24),
        "textual.head.0.weight": torch.randn(20, 24),
        "log_scale": torch.tensor(2.6),
    }
    for i in range(layers):
        h, w = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for t in ("weight", "bias"):
            out[w + f"norm1.{t}"] = sd[h + f"layer_norm1.{t}"]
            out[w + f"norm2.{t}"] = sd[h + f"layer_norm2.{t}"]
            out[w + f"attn.to_qkv.{t}"] = torch.cat([sd[h + f"self_attn.{p}_proj.{t}"] for p in "qkv"])
            out[w + f"attn.proj.{t}"] = sd[h + f"self_attn.out_proj.{t}"]
            out[w + f"mlp.0.{t}"] = sd[h + f"mlp.fc1.{t}"]
            out[w + f"mlp.2.{t}"] = sd[h + f"mlp.fc2.{t}"]
    return out


def to_open_clip(sd, layers=3):
    d = sd["pre_layrnorm.weight"].shape[0]
    out = {
        "visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["embeddings.class_embedding"],
        "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["post_layernorm.weight"],
        "visual.ln_post.bias": sd["post_layernorm.bias"],
        "visual.proj": torch.randn(d, 16),
        # OpenAI-style text tower of a full open-clip model
        "token_embedding.weight": torch.randn(50, 24),
        "positional_embedding": torch.randn(8, 24),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(72, 24),
        "ln_final.weight": torch.ones(24),
        "text_projection": torch.randn(24, 16),
        "logit_scale": torch.tensor(2.6),
    }
    for i in range(layers):
        h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        out[o + "attn.in_proj_weight"] = torch.cat([sd[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[o + "attn.in_proj_bias"] = torch.cat([sd[h + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        for t in ("weight", "bias"):
            out[o + f"ln_1.{t}"] = sd[h + f"layer_norm1.{t}"]
            out[o + f"ln_2.{t}"] = sd[h + f"layer_norm2.{t}"]
            out[o + f"attn.out_proj.{t}"] = sd[h + f"self_attn.out_proj.{t}"]
            out[o + f"mlp.c_fc.{t}"] = sd[h + f"mlp.fc1.{t}"]
            out[o + f"mlp.c_proj.{t}"] = sd[h + f"mlp.fc2.{t}"]
    return out


@torch.no_grad()
def reference(hf, pixels):
    return hf(pixels, output_hidden_states=True).hidden_states[-2]


def pixels_for(hf, batch=2):
    s = hf.config.image_size
    return torch.randn(batch, 3, s, s)


# Model A: width 72 (6 heads of 12), mlp 200, 28 px in 7 px patches -> 17 tokens.
@pytest.fixture(scope="module")
def model_a():
    return make_hf(72, 200, 6, 28, 7, seed=1)


@pytest.fixture(scope="module")
def comfy_file(model_a, tmp_path_factory):
    path = tmp_path_factory.mktemp("comfy") / "clip_vision_h.safetensors"
    sd = to_comfy(hf_state(model_a))
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(sd, str(path))
    return path


def check_parity(clip, hf, record):
    x = pixels_for(hf)
    with torch.no_grad():
        out = clip.model(x)
    ref = reference(hf, x)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    record(err)
    assert err <= TOL, err
    return err


@pytest.fixture
def record(request):
    def _record(err):
        request.node.user_properties.append(("rel_err", err))
        print(f"{request.node.name}: rel err {err:.2e}")
    return _record


def test_hf_names_comfy_file(model_a, comfy_file, record):
    clip = load_clip_vision(comfy_file, num_heads=6)
    check_parity(clip, model_a, record)
    # The last block, post_norm and head are deliberately not held.
    assert len(clip.model.transformer) == 2
    assert not any("post" in k or "head" in k for k in clip.model.state_dict())
    assert clip.model.config.image_size == 28 and clip.model.config.mlp_dim == 200


@pytest.mark.parametrize("where", ["pipeline", "component"])
def test_diffusers_folder_reads_config(where, tmp_path, record):
    # Width 96 (4 heads of 24) is not a multiple of 64: the heads can only come from config.json,
    # and quick_gelu only from its hidden_act.
    hf = make_hf(96, 160, 4, 42, 14, act="quick_gelu", seed=2)
    hf.save_pretrained(tmp_path / "image_encoder")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    clip = load_clip_vision(tmp_path if where == "pipeline" else tmp_path / "image_encoder")
    assert clip.model.config.num_heads == 4 and clip.model.config.activation == "quick_gelu"
    check_parity(clip, hf, record)


def test_official_wan_pth(model_a, tmp_path, record):
    path = tmp_path / WAN_CLIP_FILE
    torch.save(to_wan(hf_state(model_a)), path)
    check_parity(load_clip_vision(path, num_heads=6), model_a, record)


def test_official_wan_folder_default_heads(tmp_path, record):
    # Width 192 -> default 3 heads of 64; the DiT's config.json beside the file must not be taken for CLIP's.
    hf = make_hf(192, 250, 3, 21, 7, seed=3)
    torch.save(to_wan(hf_state(hf)), tmp_path / WAN_CLIP_FILE)
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, tmp_path / "Wan2.1_VAE.pth")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 1536, "num_heads": 12}))
    clip = load_clip_vision(tmp_path)
    assert clip.model.config.num_heads == 3
    check_parity(clip, hf, record)


def test_open_clip_names(model_a, tmp_path, record):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(to_open_clip(hf_state(model_a)), path)
    check_parity(load_clip_vision(path, num_heads=6), model_a, record)


def test_encode_matches_reference_preprocessing(model_a, comfy_file, record):
    clip = load_clip_vision(comfy_file, num_heads=6)
    images = torch.rand(2, 3, 37, 53) * 2 - 1  # non-square, odd size, in [-1, 1]

    def prep(antialias=False):
        x = F.interpolate(images, size=(28, 28), mode="bicubic", align_corners=False, antialias=antialias)
        return (x * 0.5 + 0.5 - MEAN) / STD

    out = clip.encode(images)
    err = rel_err(out, reference(model_a, prep()))
    record(err)
    assert out.shape == (2, 17, 72)
    assert err <= TOL, err
    # The comparison is sensitive to the resize details: antialiasing alone moves the output.
    assert rel_err(out, reference(model_a, prep(antialias=True))) > 1e-3


def test_bf16_close_to_fp32(model_a, comfy_file, record):
    clip = load_clip_vision(comfy_file, dtype=torch.bfloat16, num_heads=6)
    sd = clip.model.state_dict()
    assert sd["transformer.0.attn.to_qkv.weight"].dtype == torch.bfloat16
    assert sd["transformer.0.norm1.weight"].dtype == torch.float32  # LayerNorms stay float32
    x = pixels_for(model_a)
    with torch.no_grad():
        out = clip.model(x)
    assert out.dtype == torch.bfloat16
    err = rel_err(out, reference(model_a, x))
    record(err)
    assert err <= 2e-2, err


# ----- errors: clear CheckpointErrors, nothing loaded -----


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_clip_vision(tmp_path / "nope.safetensors")


def test_truncated_safetensors(comfy_file, tmp_path):
    data = comfy_file.read_bytes()
    bad = tmp_path / "clip.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_clip_vision(bad, num_heads=6)


def test_wrong_component(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3), "decoder.conv1.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="VAE.*load_vae"):
        load_clip_vision(path)


def test_unknown_key(model_a, tmp_path):
    sd = to_comfy(hf_state(model_a))
    sd["vision_model.encoder.layers.0.self_attn.rope.weight"] = torch.zeros(4)
    path = tmp_path / "clip.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="unknown keys.*self_attn.rope.weight"):
        load_clip_vision(path, num_heads=6)


def test_wrong_shape_names_key_and_expected_shape(model_a, tmp_path):
    sd = to_comfy(hf_state(model_a))
    sd["vision_model.encoder.layers.1.mlp.fc2.weight"] = torch.zeros(72, 199)
    path = tmp_path / "clip.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.fc2\.weight.*\[72, 199\].*\[72, 200\]"):
        load_clip_vision(path, num_heads=6)


def test_missing_weight(model_a, tmp_path):
    sd = to_comfy(hf_state(model_a))
    del sd["vision_model.encoder.layers.0.layer_norm2.bias"]
    path = tmp_path / "clip.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"missing.*transformer\.0\.norm2\.bias"):
        load_clip_vision(path, num_heads=6)


def test_non_square_positions(model_a, tmp_path):
    sd = to_wan(hf_state(model_a))
    sd["visual.pos_embedding"] = torch.zeros(1, 16, 72)
    path = tmp_path / WAN_CLIP_FILE
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="pos_embedding.*square grid"):
        load_clip_vision(path, num_heads=6)


def test_heads_unknown_without_config(comfy_file):
    # Width 72 without config.json or num_heads: refuse rather than guess.
    with pytest.raises(CheckpointError, match="num_heads"):
        load_clip_vision(comfy_file)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no CLIP vision encoder checkpoint"):
        load_clip_vision(tmp_path)
