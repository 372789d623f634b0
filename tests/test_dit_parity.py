"""The DiT computes what diffusers' WanTransformer3DModel computes, loaded from every supported format."""

import json

import pytest
import torch
from conftest import rel_err
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

import kinema
from kinema.errors import CheckpointError

TEXT_DIM, CLIP_DIM = 40, 24
# t2v with head_dim 128 (heads inferable without a config); i2v / flf2v with widths not a multiple of 128.
VARIANTS = {
    "t2v": dict(num_attention_heads=2, attention_head_dim=128, in_channels=16),
    "i2v": dict(num_attention_heads=2, attention_head_dim=48, in_channels=36, image_dim=CLIP_DIM, added_kv_proj_dim=96),
    "flf2v": dict(
        num_attention_heads=3, attention_head_dim=36, in_channels=36, image_dim=CLIP_DIM, added_kv_proj_dim=108,
        pos_embed_seq_len=514,
    ),
}


def _reference(variant: str) -> WanTransformer3DModel:
    torch.manual_seed({"t2v": 1, "i2v": 2, "flf2v": 3}[variant])
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=136, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **VARIANTS[variant],
    )
    with torch.no_grad():  # the default init zeroes some projections: make every path matter
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return ref.eval()


def _inputs(variant: str, frames: int, h: int, w: int, batch: int):
    g = torch.Generator().manual_seed(frames * 100 + h)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    t = torch.tensor([999.0, 431.5][:batch])
    if variant == "t2v":
        return dict(x=x, t=t, context=torch.randn(batch, 9, TEXT_DIM, generator=g))
    tokens = 514 if variant == "flf2v" else 257
    # diffusers hard-codes 512 text tokens when image tokens are present.
    return dict(
        x=x, t=t, context=torch.randn(batch, 512, TEXT_DIM, generator=g),
        y=torch.randn(batch, 20, frames, h, w, generator=g), clip_fea=torch.randn(batch, tokens, CLIP_DIM, generator=g),
    )


def _ref_forward(ref, variant, inp):
    if variant == "t2v":
        return ref(inp["x"], inp["t"], inp["context"]).sample
    clip = inp["clip_fea"]
    if variant == "flf2v":  # diffusers takes the two images' tokens as a batch of 2 and folds them itself
        clip = clip.reshape(-1, 257, CLIP_DIM)
    return ref(torch.cat([inp["x"], inp["y"]], 1), inp["t"], inp["context"], encoder_hidden_states_image=clip).sample


def _kinema_forward(dit, inp):
    return dit(inp["x"], inp["t"], inp["context"], clip_fea=inp.get("clip_fea"), y=inp.get("y"))


def _to_diffusers(official: dict) -> dict:
    """Official names -> diffusers names with diffusers' own converter (independent of Kinema's key maps)."""
    converted = convert_wan_transformer_to_diffusers(dict(official))
    # diffusers' single-file converter lacks the flf2v image position table; its repo script names it so.
    if "img_emb.emb_pos" in converted:
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    return converted


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    """The reference model and its weights saved in every format Kinema reads."""
    variant = request.param
    ref = _reference(variant)
    root = tmp_path_factory.mktemp(variant)
    ref.save_pretrained(root / "diffusers")
    ref.save_pretrained(root / "diffusers_sharded", max_shard_size="100KB")
    (root / "pipeline").mkdir()
    ref.save_pretrained(root / "pipeline" / "transformer")
    official = {k: v.contiguous() for k, v in kinema.load_dit(root / "diffusers").state_dict().items()}
    heads = VARIANTS[variant]["num_attention_heads"]
    cfg = {"_class_name": "WanModel", "model_type": variant, "num_heads": heads, "dim": ref.config.num_attention_heads * ref.config.attention_head_dim}
    (root / "official").mkdir()
    save_file(official, root / "official" / "diffusion_pytorch_model.safetensors")
    (root / "official" / "config.json").write_text(json.dumps(cfg))
    # Official sharded layout: two shards behind an index.
    (root / "official_sharded").mkdir()
    keys = sorted(official)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2], "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: official[k] for k in ks}, root / "official_sharded" / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (root / "official_sharded" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (root / "official_sharded" / "config.json").write_text(json.dumps(cfg))
    save_file({f"model.diffusion_model.{k}": v for k, v in official.items()}, root / "comfy_prefixed.safetensors")
    save_file(official, root / "comfy_plain.safetensors")
    return variant, ref, root, official


FORMATS = ["diffusers", "diffusers_sharded", "pipeline", "official", "official_sharded", "comfy_prefixed.safetensors", "comfy_plain.safetensors"]


def test_official_names_are_what_diffusers_converts_from(saved):
    """Our canonical names are the official ones: diffusers' own converter maps them back to its weights."""
    variant, ref, _, official = saved
    converted = _to_diffusers(official)
    expected = ref.state_dict()
    assert sorted(converted) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(converted[k].reshape(v.shape), v), k


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_parity_every_format(saved, fmt):
    variant, ref, root, _ = saved
    heads = None if (fmt.startswith(("diffusers", "pipeline", "official")) or variant == "t2v") else VARIANTS[variant]["num_attention_heads"]
    dit = kinema.load_dit(root / fmt, num_heads=heads)
    assert dit.config.model_type == variant
    batch = 1 if variant == "flf2v" else 2
    for frames, h, w in [(1, 6, 10), (5, 4, 6)]:  # F=1 and F=5 latent frames, non-square
        inp = _inputs(variant, frames, h, w, batch)
        with torch.no_grad():
            want = _ref_forward(ref, variant, inp)
            got = _kinema_forward(dit, inp)
        assert got.shape == want.shape == inp["x"].shape
        assert got.dtype == torch.float32
        assert rel_err(got, want) <= 1e-4, (fmt, frames, rel_err(got, want))


def test_bf16_parity_keeps_fp32_islands(saved):
    variant, ref, root, _ = saved
    dit = kinema.load_dit(root / "official", dtype=torch.bfloat16)
    block = dit.blocks[0]
    assert block.ffn[0].weight.dtype == torch.bfloat16 and block.self_attn.q.weight.dtype == torch.bfloat16
    for p in (block.modulation, dit.head.head.weight, dit.head.modulation, dit.time_embedding[0].weight,
              dit.time_projection[1].weight, block.norm3.weight, block.self_attn.norm_q.weight):
        assert p.dtype == torch.float32
    batch = 1 if variant == "flf2v" else 2
    inp = _inputs(variant, 5, 4, 6, batch)
    with torch.no_grad():
        want = _ref_forward(ref, variant, inp)
        got = _kinema_forward(dit, inp)
    assert got.dtype == torch.float32
    err = rel_err(got, want)
    assert err <= 2e-2, err
    assert err > 0  # it really ran in reduced precision


def test_heads_need_config_for_odd_width(saved):
    variant, _, root, _ = saved
    if variant == "t2v":  # width 256, a multiple of 128: the heads (of 128, as in every Wan model) are inferred
        assert kinema.load_dit(root / "comfy_plain.safetensors").config.num_heads == VARIANTS["t2v"]["num_attention_heads"]
        return
    with pytest.raises(CheckpointError, match="num_heads"):
        kinema.load_dit(root / "comfy_plain.safetensors")


@pytest.mark.parametrize("scaled", [False, True])
def test_comfyui_fp8_files(saved, tmp_path, scaled):
    """ComfyUI fp8 DiT files (plain e4m3fn casts, or scaled fp8 with per-layer scale_weight) load dequantised."""
    variant, ref, _, official = saved
    state, dequant = {}, {}
    for k, v in official.items():
        if v.ndim == 2 and k.endswith(".weight"):  # Linear weights are what the peers store in fp8
            scale = (v.abs().max() / 448.0) if scaled else torch.tensor(1.0)
            q = (v / scale).to(torch.float8_e4m3fn)
            state[k] = q
            if scaled:
                state[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1).float()
            dequant[k] = q.float() * scale
        else:
            state[k] = v
            dequant[k] = v
    if scaled:
        state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, tmp_path / "fp8.safetensors")
    heads = VARIANTS[variant]["num_attention_heads"]
    dit = kinema.load_dit(tmp_path / "fp8.safetensors", num_heads=heads)
    reference = WanTransformer3DModel.from_config(ref.config)
    reference.load_state_dict(_to_diffusers(dequant))
    reference.eval()
    inp = _inputs(variant, 5, 4, 6, 1)
    with torch.no_grad():
        want = _ref_forward(reference, variant, inp)
        got = _kinema_forward(dit, inp)
        unquantised = _ref_forward(ref, variant, inp)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got, unquantised) > 1e-3  # the weights really went through fp8


def test_inference_path_slices_ffn_and_keeps_input(saved, monkeypatch):
    """Without autograd a block adds its residuals in place and runs the FFN on token slices: same
    numbers as the autograd path and as diffusers, and the block's input tensor is left as it was."""
    import kinema.models.dit as dit_module

    variant, ref, root, _ = saved
    dit = kinema.load_dit(root / "diffusers")
    inp = _inputs(variant, 3, 4, 6, 2)  # 18 tokens per sample
    monkeypatch.setattr(dit_module, "FFN_ROWS", 5)  # 4 slices, the last one short
    with torch.no_grad():
        tokens, grid = dit.embed(inp["x"], inp.get("y"))
        e, e0 = dit.time_embed(inp["t"], 2)
        context, image = dit.embed_context(inp["context"], inp.get("clip_fea"))
        rope = dit.rope(grid, tokens.device)
        before = tokens.clone()
        fast = dit.blocks[0](tokens, e0, rope, context, image)
        assert torch.equal(tokens, before)
        sliced = _kinema_forward(dit, inp)
        expected = _ref_forward(ref, variant, inp)
    with torch.enable_grad():
        plain = dit.blocks[0](tokens, e0, rope, context, image)
    assert rel_err(fast, plain.detach()) < 1e-6
    assert rel_err(sliced, expected) <= 1e-4  # the bound of the other parity tests
