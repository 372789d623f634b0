"""ComfyUI's core Wan nodes: the published Wan2.1 t2v / i2v / flf2v templates run on tiny random checkpoints
under ComfyUI's file names and on the built-in model, outputs decoded; ComfyUI's umT5 files with their
tokenizer inside; the sampler against kinema.Pipeline; schedules, saving, loading images."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import kinema
from kinema.errors import Cancelled, KinemaError
from kinema.workflow.context import ExecutionContext, ModelCache, Progress
from kinema.workflow.folders import ModelFolders
from kinema.workflow.nodes import comfy
from kinema.workflow.values import Conditioning

TEMPLATES = Path(__import__("comfyui_workflow_templates_json").__file__).parent / "templates"
WORDS = "a an the red green blue yellow white purple circle square triangle moving left right up down on black gray background"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a tiny random Wan2.1 set under ComfyUI's names -------------------------------------------------------------
def spiece_bytes() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([WORDS] * 50), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def umt5_comfy_state(model, spiece: bytes | None, fp8: bool = True) -> dict:
    """Kinema's umT5 weights in ComfyUI's (Hugging Face T5) key layout, Linear weights in scaled fp8 as in
    umt5_xxl_fp8_e4m3fn_scaled.safetensors, the tokenizer inside as `spiece_model`."""
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if k == "token_embedding.weight":
            name = "shared.weight"
        elif k == "norm.weight":
            name = "encoder.final_layer_norm.weight"
        else:
            i, rest = parts[1], ".".join(parts[2:])
            b = f"encoder.block.{i}.layer"
            name = {"norm1.weight": f"{b}.0.layer_norm.weight", "norm2.weight": f"{b}.1.layer_norm.weight",
                    "pos_embedding.embedding.weight": f"{b}.0.SelfAttention.relative_attention_bias.weight",
                    "ffn.gate.0.weight": f"{b}.1.DenseReluDense.wi_0.weight",
                    "ffn.fc1.weight": f"{b}.1.DenseReluDense.wi_1.weight",
                    "ffn.fc2.weight": f"{b}.1.DenseReluDense.wo.weight",
                    **{f"attn.{p}.weight": f"{b}.0.SelfAttention.{p}.weight" for p in "qkvo"}}[rest]
        if fp8 and ("SelfAttention." in name and "relative" not in name or "DenseReluDense" in name):
            scale = v.abs().max() / 448.0
            out[name] = (v / scale).to(torch.float8_e4m3fn)
            out[name.removesuffix("weight") + "scale_weight"] = scale.reshape(1).float()
        else:
            out[name] = v.contiguous()
    if fp8:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    if spiece is not None:
        out["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    return out


def clip_hf_state(tower, layers: int) -> dict:
    """A CLIP vision tower in the Hugging Face layout of clip_vision_h.safetensors (last block included)."""
    sd = tower.state_dict()
    d = sd["pre_norm.weight"].shape[0]
    out = {"vision_model.embeddings.patch_embedding.weight": sd["patch_embedding.weight"],
           "vision_model.embeddings.class_embedding": sd["cls_embedding"].view(d),
           "vision_model.embeddings.position_embedding.weight": sd["pos_embedding"][0],
           "vision_model.pre_layrnorm.weight": sd["pre_norm.weight"], "vision_model.pre_layrnorm.bias": sd["pre_norm.bias"],
           "vision_model.post_layernorm.weight": torch.ones(d), "vision_model.post_layernorm.bias": torch.zeros(d),
           "visual_projection.weight": torch.randn(32, d)}
    for i in range(layers):
        j = min(i, layers - 2)  # the module omits the last block (Wan uses the penultimate output); a file has it
        L, t = f"vision_model.encoder.layers.{i}", f"transformer.{j}"
        q, k, v = sd[f"{t}.attn.to_qkv.weight"].chunk(3)
        qb, kb, vb = sd[f"{t}.attn.to_qkv.bias"].chunk(3)
        out.update({f"{L}.self_attn.q_proj.weight": q, f"{L}.self_attn.k_proj.weight": k, f"{L}.self_attn.v_proj.weight": v,
                    f"{L}.self_attn.q_proj.bias": qb, f"{L}.self_attn.k_proj.bias": kb, f"{L}.self_attn.v_proj.bias": vb,
                    f"{L}.self_attn.out_proj.weight": sd[f"{t}.attn.proj.weight"],
                    f"{L}.self_attn.out_proj.bias": sd[f"{t}.attn.proj.bias"],
                    f"{L}.layer_norm1.weight": sd[f"{t}.norm1.weight"], f"{L}.layer_norm1.bias": sd[f"{t}.norm1.bias"],
                    f"{L}.layer_norm2.weight": sd[f"{t}.norm2.weight"], f"{L}.layer_norm2.bias": sd[f"{t}.norm2.bias"],
                    f"{L}.mlp.fc1.weight": sd[f"{t}.mlp.0.weight"], f"{L}.mlp.fc1.bias": sd[f"{t}.mlp.0.bias"],
                    f"{L}.mlp.fc2.weight": sd[f"{t}.mlp.2.weight"], f"{L}.mlp.fc2.bias": sd[f"{t}.mlp.2.bias"]})
    return {k: v.clone().contiguous() for k, v in out.items()}


DIT_NAMES = {"t2v": "wan2.1_t2v_1.3B_fp16.safetensors", "i2v": "wan2.1_i2v_480p_14B_fp16.safetensors",
             "flf2v": "wan2.1_flf2v_720p_14B_fp16.safetensors"}
T5_NAME, VAE_NAME, CLIP_NAME = "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors", "clip_vision_h.safetensors"


def write_comfy_models(root: Path, seed: int = 0) -> dict:
    """Tiny random t2v / i2v / flf2v DiTs, umT5 (scaled fp8, tokenizer inside), VAE and CLIP vision under the
    names of Comfy-Org's Wan_2.1_ComfyUI_repackaged files. The t2v DiT has the official key names, the i2v and
    flf2v ones the `model.diffusion_model.` prefix. Returns the modules written (for comparisons)."""
    from kinema.models.clip import ClipVisionConfig, CLIPVisionTower
    from kinema.models.dit import DiTConfig, WanDiT
    from kinema.models.t5 import UMT5Encoder
    from kinema.models.vae import WanVAE

    torch.manual_seed(seed)
    for d in ("diffusion_models", "text_encoders", "vae", "clip_vision", "loras"):
        (root / d).mkdir(parents=True, exist_ok=True)
    written = {}
    for model_type, name in DIT_NAMES.items():
        image = model_type != "t2v"
        cfg = DiTConfig(model_type, in_dim=36 if image else 16, dim=128, ffn_dim=256, text_dim=64, num_heads=1,
                        num_layers=2, image_dim=64)
        dit = WanDiT(cfg)
        prefix = "model.diffusion_model." if image else ""
        save_file({prefix + k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in dit.state_dict().items()}, root / "diffusion_models" / name)
        written[model_type] = dit
    t5 = UMT5Encoder(vocab_size=64, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
    save_file(umt5_comfy_state(t5, spiece_bytes()), root / "text_encoders" / T5_NAME)
    written["t5"] = t5
    vae = WanVAE(dim=16, dim_mult=(1, 2, 2, 2))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, root / "vae" / VAE_NAME)
    written["vae"] = vae
    tower = CLIPVisionTower(ClipVisionConfig(dim=64, mlp_dim=128, num_heads=1, num_layers=3))
    save_file(clip_hf_state(tower, 3), root / "clip_vision" / CLIP_NAME)
    written["clip"] = tower
    return written


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy") / "models"
    return root, write_comfy_models(root)


def make_ctx(tmp_path, folders, models=None, **kw):
    for d in ("output", "input", "temp"):
        (tmp_path / d).mkdir(exist_ok=True)
    return ExecutionContext(folders, tmp_path / "output", tmp_path / "input", tmp_path / "temp",
                            models or ModelCache(), **kw)


def test_comfy_files_load_as_written(comfy_models):
    root, written = comfy_models
    for model_type, name in DIT_NAMES.items():
        dit = kinema.load_dit(root / "diffusion_models" / name)
        assert dit.config.model_type == model_type
        want = written[model_type].state_dict()
        got = dit.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k].half().float()) for k in want), model_type
    vae = kinema.load_vae(root / "vae" / VAE_NAME)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in written["vae"].state_dict().items())
    clip = kinema.load_clip_vision(root / "clip_vision" / CLIP_NAME)
    assert all(torch.equal(clip.model.state_dict()[k], v) for k, v in written["clip"].state_dict().items())
    te = kinema.load_text_encoder(root / "text_encoders" / T5_NAME)
    for k, v in written["t5"].state_dict().items():
        err = (te.model.state_dict()[k] - v).abs().max() / v.abs().max()
        assert err < 0.07, k  # fp8 e4m3 keeps 3 mantissa bits: <= 1/16 relative to the layer's max


def test_umt5_tokenizer_inside_the_file(tmp_path):
    """ComfyUI's umT5 files carry their SentencePiece model as a uint8 `spiece_model` tensor: it is read from
    there, and without it from a tokenizer file beside the file."""
    from kinema.models.t5 import UMT5Encoder
    from kinema.text.tokenizer import UMT5Tokenizer

    torch.manual_seed(0)
    sp = spiece_bytes()
    t5 = UMT5Encoder(vocab_size=64, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2)
    inside = tmp_path / "inside" / "umt5.safetensors"
    inside.parent.mkdir()
    save_file(umt5_comfy_state(t5, sp, fp8=False), inside)
    te = kinema.load_text_encoder(inside)
    assert te.tokenizer.source.endswith("umt5.safetensors:spiece_model")
    (tmp_path / "spiece.model").write_bytes(sp)
    ref = UMT5Tokenizer.from_path(tmp_path / "spiece.model")
    prompt = "a red circle moving left on a gray background"
    assert te.tokenizer.token_ids(prompt) == ref.token_ids(prompt) and len(ref.token_ids(prompt)) > 5
    ids, mask = ref([prompt])
    with torch.no_grad():
        assert torch.allclose(te.encode([prompt])[0], t5(ids, mask)[0, : int(mask.sum())], atol=1e-5)

    beside = tmp_path / "beside"
    beside.mkdir()
    save_file(umt5_comfy_state(t5, None, fp8=False), beside / "umt5.safetensors")
    with pytest.raises(KinemaError, match="no umT5 tokenizer found next to"):
        kinema.load_text_encoder(beside / "umt5.safetensors")
    (beside / "spiece.model").write_bytes(sp)
    te2 = kinema.load_text_encoder(beside / "umt5.safetensors")
    assert te2.tokenizer.source == str(beside / "spiece.model")
    assert torch.equal(te2.encode([prompt])[0], te.encode([prompt])[0])
    bad = tmp_path / "bad.safetensors"
    save_file({**umt5_comfy_state(t5, None, fp8=False), "spiece_model": torch.arange(40, dtype=torch.uint8)}, bad)
    with pytest.raises(KinemaError, match="spiece_model is not a readable SentencePiece model"):
        kinema.load_text_encoder(bad)


# -- schedules ---------------------------------------------------------------------------------------------------
def test_sigmas_as_comfyui_computes_them():
    s = comfy.scheduler_sigmas("simple", 4, 1.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # uni_pc: steps + 1 sigmas, the penultimate dropped
    assert torch.allclose(comfy.ksampler_sigmas("uni_pc", "simple", 4, 1.0), torch.tensor([1.0, 0.8, 0.6, 0.4, 0.0]))
    shifted = comfy.scheduler_sigmas("simple", 3, 8.0)
    t = torch.tensor([1.0, 2 / 3, 1 / 3])
    assert torch.allclose(shifted[:-1], 8 * t / (1 + 7 * t), atol=2e-3) and shifted[0] == 1.0  # table at t = k/1000
    # denoise < 1: the tail of int(steps / denoise) steps
    assert torch.equal(comfy.ksampler_sigmas("euler", "simple", 4, 3.0, 0.5), comfy.scheduler_sigmas("simple", 8, 3.0)[-5:])
    assert len(comfy.ksampler_sigmas("euler", "simple", 4, 3.0, 0.0)) == 0
    normal = comfy.scheduler_sigmas("normal", 5, 1.0)
    assert normal[0] == 1.0 and normal[-1] == 0 and abs(normal[-2] - 0.001) < 1e-6 and len(normal) == 6
    assert len(comfy.scheduler_sigmas("sgm_uniform", 5, 1.0)) == 6


def test_bh1_and_dpmpp_2m_steps():
    """The ComfyUI-named solvers: UniPC bh1 differs from Wan's bh2 only past the first order; k-diffusion's
    DPM++ 2M is Euler at first order. Wan's solvers keep their numbers (tests/test_sampling_parity.py)."""
    from kinema.sampling import sample

    torch.manual_seed(0)
    target = torch.randn(1, 4, 1, 2, 2)
    model_fn = lambda x, t, step: (x - target * (1 - step.sigma)) / max(step.sigma, 1e-3) * 0.9  # noqa: E731
    sigmas = comfy.ksampler_sigmas("uni_pc", "simple", 6, 3.0)
    noise = torch.randn(1, 4, 1, 2, 2)
    ts = sigmas[:-1] * 1000
    out = {s: sample(model_fn, noise, sigmas, ts, s, progress=False) for s in ("unipc", "unipc_bh1", "dpmpp_2m", "euler")}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert not torch.allclose(out["unipc"], out["unipc_bh1"]) and (out["unipc"] - out["unipc_bh1"]).abs().max() < 0.2
    two = sigmas[:2].tolist() + [0.0]
    one = {s: sample(model_fn, noise, torch.tensor(two), ts[:2], s, progress=False) for s in ("unipc_bh1", "dpmpp_2m", "euler")}
    assert torch.allclose(one["dpmpp_2m"], one["euler"], atol=1e-6)


# -- nodes driven directly ---------------------------------------------------------------------------------------
def _frames(path) -> tuple[int, int, int]:
    f = kinema.media.read_video(path).frames
    return f.shape[0], f.shape[1], f.shape[2]


def test_loader_nodes_and_errors(comfy_models, tmp_path):
    root, _ = comfy_models
    ctx = make_ctx(tmp_path, ModelFolders(root))
    (m,) = comfy.unet_loader(ctx, DIT_NAMES["t2v"], "fp8_e4m3fn")
    assert m.quantization == "fp8_e4m3fn" and m.path.endswith(DIT_NAMES["t2v"])
    assert comfy.unet_loader(ctx, DIT_NAMES["t2v"], "default")[0].quantization == "auto"
    with pytest.raises(KinemaError, match=r"UNETLoader.unet_name: diffusion_models file 'x.safetensors' not found"):
        comfy.unet_loader(ctx, "x.safetensors", "default")
    with pytest.raises(KinemaError, match=r"CLIPLoader.type: 'sd3' is not supported.*'wan'"):
        comfy.clip_loader(ctx, T5_NAME, "sd3")
    assert comfy.clip_loader(ctx, T5_NAME, "wan", "cpu")[0].device == "cpu"
    (shifted,) = comfy.model_sampling_sd3(ctx, m, 5.0)
    assert shifted.shift == 5.0 and shifted.load_key() == m.load_key()
    from kinema.workflow.types import NODES

    info = NODES["CLIPLoader"].object_info(ctx)
    assert info["input"]["required"]["clip_name"][0] == ["kinema_builtin_umt5.safetensors", T5_NAME]
    assert "wan" in info["input"]["required"]["type"][0] and info["input"]["optional"]["device"][0] == ["default", "cpu"]
    e = NODES["EmptyHunyuanLatentVideo"].object_info(ctx)["input"]["required"]
    assert [e[k][1]["default"] for k in ("width", "height", "length", "batch_size")] == [848, 480, 25, 1]
    assert e["length"][1]["step"] == 4 and e["width"][1]["step"] == 16
    assert NODES["ModelSamplingSD3"].object_info()["input"]["required"]["shift"][1]["default"] == 3.0
    k = NODES["KSampler"].object_info()["input"]["required"]
    assert {"euler", "dpmpp_2m", "uni_pc", "uni_pc_bh2"} <= set(k["sampler_name"][0]) and "simple" in k["scheduler"][0]
    assert k["seed"][1]["control_after_generate"] and k["denoise"][1] == {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}
    assert NODES["SaveVideo"].object_info()["output_node"]
    assert NODES["LoadImage"].object_info(ctx)["input"]["required"]["image"][1]["image_upload"]


def test_load_image_mask_fingerprint_and_escape(tmp_path):
    from PIL import Image

    ctx = make_ctx(tmp_path, ModelFolders())
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:2, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "input" / "a.png")
    image, mask = comfy.load_image(ctx, "a.png")
    assert image.shape == (1, 6, 8, 3) and mask.shape == (1, 6, 8)
    assert torch.allclose(image[0, 3, 3], torch.tensor([200 / 255, 0, 0]))
    assert mask[0, :2].eq(1).all() and mask[0, 2:].eq(0).all()
    Image.fromarray(rgba[..., :3]).save(tmp_path / "input" / "b.jpg")
    assert comfy.load_image(ctx, "b.jpg")[1].shape == (1, 64, 64)
    (tmp_path / "input" / "sub").mkdir()
    Image.fromarray(rgba).save(tmp_path / "input" / "sub" / "c.png")
    (tmp_path / "input" / "notes.txt").write_text("x")
    assert comfy._input_files(ctx) == ["a.png", "b.jpg", "sub/c.png"]
    assert comfy.load_image(ctx, "sub/c.png")[0].shape == (1, 6, 8, 3)
    before = comfy._image_fingerprint(ctx, image="a.png")
    Image.fromarray(255 - rgba, "RGBA").save(tmp_path / "input" / "a.png")
    assert comfy._image_fingerprint(ctx, image="a.png") != before
    for bad in ("../secret.png", "/etc/passwd"):
        with pytest.raises(KinemaError, match="LoadImage.image: .* outside the input folder"):
            comfy.load_image(ctx, bad)
    with pytest.raises(KinemaError, match="LoadImage.image: 'none.png' is not in"):
        comfy.load_image(ctx, "none.png")


def test_save_nodes_names_ui_and_metadata(tmp_path):
    ctx = make_ctx(tmp_path, ModelFolders(), prompt={"1": {"class_type": "SaveImage", "inputs": {}}},
                   extra_pnginfo={"workflow": {"nodes": []}})
    frames = torch.rand(5, 16, 24, 3)
    out = comfy.save_image(ctx, frames[:2], "shots/ComfyUI")
    assert out.ui == {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "shots", "type": "output"},
                                 {"filename": "ComfyUI_00002_.png", "subfolder": "shots", "type": "output"}]}
    png = tmp_path / "output" / "shots" / "ComfyUI_00002_.png"
    assert np.array_equal(kinema.media.read_image(png).numpy(), (frames[1] * 255).round().to(torch.uint8).numpy())
    meta = kinema.media.read_metadata(png)
    assert meta["prompt"]["1"]["class_type"] == "SaveImage" and meta["workflow"] == {"nodes": []}
    assert comfy.save_image(ctx, frames[:1], "shots/ComfyUI").ui["images"][0]["filename"] == "ComfyUI_00003_.png"
    webp = comfy.save_animated_webp(ctx, frames, "ComfyUI", 8.0, True, 80, "default").ui
    assert webp["animated"] == [True] and webp["images"][0]["filename"] == "ComfyUI_00001_.webp"
    got = kinema.media.read_video(tmp_path / "output" / "ComfyUI_00001_.webp").frames
    assert np.array_equal(got.numpy(), (frames * 255).round().to(torch.uint8).numpy())  # lossless
    webm = comfy.save_webm(ctx, frames, "ComfyUI", "vp9", 8.0, 20).ui
    assert _frames(tmp_path / "output" / webm["images"][0]["filename"]) == (5, 16, 24)
    (video,) = comfy.create_video(ctx, frames, 16.0)
    ui = comfy.save_video_node(ctx, video, "video/ComfyUI", "auto", "auto").ui
    assert ui == {"images": [{"filename": "ComfyUI_00001_.mp4", "subfolder": "video", "type": "output"}], "animated": [True]}
    mp4 = tmp_path / "output" / "video" / "ComfyUI_00001_.mp4"
    assert _frames(mp4) == (5, 16, 24) and kinema.media.read_video(mp4).fps == 16
    assert kinema.media.read_metadata(mp4)["workflow"] == {"nodes": []}
    assert comfy.save_video_node(ctx, video, "video/ComfyUI", "mp4", "h264").ui["images"][0]["filename"] == "ComfyUI_00002_.mp4"
    for bad in ("../up", "/abs/x", "a/../../b"):
        with pytest.raises(KinemaError, match="filename_prefix: .* leaves the output folder"):
            comfy.save_image(ctx, frames[:1], bad)
    assert not list(tmp_path.rglob("*.partial*"))


def test_i2v_condition_is_build_condition_of_the_resized_image(comfy_models, tmp_path):
    """WanImageToVideo resizes as ComfyUI (bilinear, centre crop) and builds y with the engine's builder;
    the CLIP tokens pass through; the latent is zeros of the video's latent shape."""
    from kinema.pipeline.conditioning import build_condition

    root, _ = comfy_models
    ctx = make_ctx(tmp_path, ModelFolders(root))
    (vae,) = comfy.vae_loader(ctx, VAE_NAME)
    torch.manual_seed(1)
    image = torch.rand(1, 40, 64, 3)
    pos, neg = Conditioning(torch.randn(1, 3, 64)), Conditioning(torch.randn(1, 2, 64))
    clip_out = comfy.ClipVisionOutput(torch.randn(1, 257, 64))
    p, n, latent = comfy.wan_image_to_video(ctx, pos, neg, vae, 32, 32, 5, 2, clip_out, image)
    assert latent["samples"].shape == (2, 16, 2, 4, 4) and not latent["samples"].any()
    resized = torch.nn.functional.interpolate(image.movedim(-1, 1)[:, :, :, 12:52], size=(32, 32), mode="bilinear")
    want = build_condition(ctx.models.vae(vae), {0: resized[0] * 2 - 1}, 5, 32, 32)
    assert torch.equal(p.y, want) and torch.equal(n.y, want) and p.clip_fea is clip_out.tokens
    assert p.y[0, :4, 0].eq(1).all() and not p.y[0, :4, 1:].any()
    assert torch.equal(p.context, pos.context)
    p2, _, _ = comfy.wan_first_last_frame_to_video(ctx, pos, neg, vae, 32, 32, 5, 1, clip_out, clip_out, image, image)
    assert p2.clip_fea.shape == (1, 514, 64)
    assert p2.y[0, :4, 0].eq(1).all() and p2.y[0, 3, 1].eq(1).all() and not p2.y[0, :3, 1].any()
    with pytest.raises(KinemaError, match="WanImageToVideo.length: 6 frames"):
        comfy.wan_image_to_video(ctx, pos, neg, vae, 32, 32, 6, 1, clip_out, image)


def _ksampler_args(model, pos, neg, latent, **kw):
    args = dict(model=model, seed=7, steps=3, cfg=4.0, sampler_name="euler", scheduler="simple", positive=pos,
                negative=neg, latent_image=latent, denoise=1.0)
    return {**args, **kw}


def test_ksampler_progress_cancel_and_advanced_split(comfy_models, tmp_path):
    root, _ = comfy_models
    calls = []
    ctx = make_ctx(tmp_path, ModelFolders(root), progress=Progress(lambda node, v, t, p: calls.append((v, t, p))))
    (model,) = comfy.model_sampling_sd3(ctx, comfy.unet_loader(ctx, DIT_NAMES["t2v"], "default")[0], 5.0)
    (clip,) = comfy.clip_loader(ctx, T5_NAME, "wan")
    (pos,), (neg,) = comfy.clip_text_encode(ctx, "a red circle", clip), comfy.clip_text_encode(ctx, "", clip)
    (latent,) = comfy.empty_hunyuan_latent_video(ctx, 32, 32, 5, 1)
    (full,) = comfy.ksampler(ctx, **_ksampler_args(model, pos, neg, latent, steps=4))
    assert full["samples"].shape == (1, 16, 2, 4, 4) and torch.isfinite(full["samples"]).all()
    assert [(v, t) for v, t, _ in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(p.shape == (4, 4, 3) and p.dtype == np.uint8 for _, _, p in calls)  # previews
    # the same seed repeats; another differs
    assert torch.equal(comfy.ksampler(ctx, **_ksampler_args(model, pos, neg, latent, steps=4))[0]["samples"], full["samples"])
    assert not torch.allclose(comfy.ksampler(ctx, **_ksampler_args(model, pos, neg, latent, steps=4, seed=8))[0]["samples"],
                              full["samples"])
    # KSamplerAdvanced: 2 steps with leftover noise, then 2 more without new noise = the 4-step run
    adv = dict(model=model, noise_seed=7, steps=4, cfg=4.0, sampler_name="euler", scheduler="simple", positive=pos, negative=neg)
    (half,) = comfy.ksampler_advanced(ctx, add_noise="enable", latent_image=latent, start_at_step=0, end_at_step=2,
                                      return_with_leftover_noise="enable", **adv)
    (rest,) = comfy.ksampler_advanced(ctx, add_noise="disable", latent_image=half, start_at_step=2, end_at_step=10000,
                                      return_with_leftover_noise="disable", **adv)
    d = (rest["samples"] - full["samples"]).abs().max().item()
    assert d < 1e-4, d
    # denoise 0 returns the input; a step past the end too
    assert torch.equal(comfy.ksampler(ctx, **_ksampler_args(model, pos, neg, half, denoise=0.0))[0]["samples"], half["samples"])
    cancel_ctx = make_ctx(tmp_path, ModelFolders(root), models=ctx.models)
    cancel_ctx.progress = Progress(lambda *a: cancel_ctx.cancel.set())
    with pytest.raises(Cancelled, match="after step 1 of 3"):
        comfy.ksampler(cancel_ctx, **_ksampler_args(model, pos, neg, latent))
    with pytest.raises(KinemaError, match="KSampler.sampler_name: 'lms' is not one Kinema runs"):
        comfy.ksampler(ctx, **_ksampler_args(model, pos, neg, latent, sampler_name="lms"))


def test_lora_loader_merges_into_a_copy(comfy_models, tmp_path):
    root, written = comfy_models
    ctx = make_ctx(tmp_path, ModelFolders(root))
    torch.manual_seed(3)
    a, b = torch.randn(4, 128), torch.randn(128, 4)
    save_file({"blocks.0.self_attn.q.lora_down.weight": a, "blocks.0.self_attn.q.lora_up.weight": b,
               "blocks.0.self_attn.q.alpha": torch.tensor(2.0)}, root / "loras" / "tiny_lora.safetensors")
    (base,) = comfy.unet_loader(ctx, DIT_NAMES["t2v"], "default")
    (lora,) = comfy.lora_loader_model_only(ctx, base, "tiny_lora.safetensors", 0.5)
    assert comfy.lora_loader_model_only(ctx, base, "tiny_lora.safetensors", 0.0)[0] is base
    w0 = ctx.models.dit(base).model.blocks[0].self_attn.q.weight
    w1 = ctx.models.dit(lora).model.blocks[0].self_attn.q.weight
    assert torch.allclose(w1 - w0, 0.5 * (2.0 / 4) * b @ a, atol=1e-4)
    assert torch.equal(ctx.models.dit(base).model.blocks[0].self_attn.q.weight, w0)  # the cached base untouched


# -- the published templates through the executor ----------------------------------------------------------------
def _template(name: str) -> dict:
    return json.loads((TEMPLATES / name).read_text())


def override(prompt: dict, values: dict) -> dict:
    """`kinema run --set NODE.INPUT=VALUE`-style changes: {"37.unet_name": "..."}."""
    for key, value in values.items():
        nid, name = key.split(".", 1)
        assert name in prompt[nid]["inputs"], (key, prompt[nid]["inputs"])
        prompt[nid]["inputs"][name] = value
    return prompt


def _image_file(path: Path, w: int, h: int, i: int) -> None:
    """A red square on black (the built-in model's world): left for the first image, right for the second."""
    from PIL import Image

    a = np.zeros((h, w, 3), np.uint8)
    a[20:44, 10 + 40 * i : 34 + 40 * i] = (220, 30, 30)
    Image.fromarray(a).save(path)


def _run(tmp_path, folders, workflow, values, models=None):
    from kinema.workflow.convert import to_api
    from kinema.workflow.executor import Executor

    prompt = override(to_api(workflow), values)
    events = []
    ex = Executor(folders, tmp_path / "output", tmp_path / "input", tmp_path / "temp", models)
    ui = ex.execute(prompt, "p1", listener=lambda t, d: events.append(t), extra_data={"extra_pnginfo": {"workflow": workflow}})
    return ui, events


TINY = {  # model names under ComfyUI's names, and small sizes / steps: node id -> input -> value
    "text_to_video_wan.json": {"40.width": 32, "40.height": 32, "40.length": 5, "3.steps": 2},
    "image_to_video_wan.json": {"50.width": 32, "50.height": 32, "50.length": 5, "3.steps": 2},
    "wan2.1_flf2v_720_f16.json": {"83.width": 32, "83.height": 48, "83.length": 5, "90.steps": 2},
}
IMAGES = {"image_to_video_wan.json": ["image_to_video_wan_start_image.png"],
          "wan2.1_flf2v_720_f16.json": ["wan2.1_flf2v_720_f16_start_image.png", "wan2.1_flf2v_720_f16_end_image.png"]}


@pytest.mark.parametrize("name", list(TINY))
def test_published_template_on_tiny_comfy_files(comfy_models, tmp_path, name):
    pytest.importorskip("kinema.workflow.executor")
    root, _ = comfy_models
    (tmp_path / "input").mkdir()
    for i, img in enumerate(IMAGES.get(name, [])):
        _image_file(tmp_path / "input" / img, 60, 40 + 8 * i, i)
    workflow = _template(name)
    ui, events = _run(tmp_path, ModelFolders(root), workflow, TINY[name])
    (saved,) = [v for v in ui.values()]
    assert saved["animated"] == [True]
    path = tmp_path / "output" / saved["images"][0]["subfolder"] / saved["images"][0]["filename"]
    assert path.name == "ComfyUI_00001_.mp4" and path.parent.name == "video"
    w, h = TINY[name].get("83.width", 32), TINY[name].get("83.height", 32)
    assert _frames(path) == (5, h, w)
    assert kinema.media.read_metadata(path)["workflow"]["nodes"] == workflow["nodes"]
    assert "execution_success" in events and events.count("progress") >= 2


@pytest.mark.parametrize("name", ["text_to_video_wan.json", "image_to_video_wan.json", "wan2.1_flf2v_720_f16.json"])
def test_published_template_on_the_builtin_model(tmp_path, name):
    pytest.importorskip("kinema.workflow.executor")
    from kinema.workflow.folders import BUILTIN

    (tmp_path / "input").mkdir()
    for i, img in enumerate(IMAGES.get(name, [])):
        _image_file(tmp_path / "input" / img, 80, 64, i)
    workflow = _template(name)
    ids = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    size = ids.get("WanImageToVideo") or ids.get("WanFirstLastFrameToVideo") or ids["EmptyHunyuanLatentVideo"]
    values = {f"{ids['UNETLoader']}.unet_name": BUILTIN["diffusion_models"][0],
              f"{ids['CLIPLoader']}.clip_name": BUILTIN["text_encoders"][0],
              f"{ids['VAELoader']}.vae_name": BUILTIN["vae"][0],
              f"{size}.width": 64, f"{size}.height": 64, f"{size}.length": 9, f"{ids['KSampler']}.steps": 3,
              f"{ids['ModelSamplingSD3']}.shift": 3.0}
    if "CLIPVisionLoader" in ids:
        values[f"{ids['CLIPVisionLoader']}.clip_name"] = BUILTIN["clip_vision"][0]
    ui, _ = _run(tmp_path, ModelFolders(), workflow, values)
    (saved,) = ui.values()
    path = tmp_path / "output" / "video" / saved["images"][0]["filename"]
    assert _frames(path) == (9, 64, 64)
    frames = kinema.media.read_video(path).frames.float()
    assert frames.std() > 5  # a picture, not a flat field
    red = lambda f, x: f[32, x, 0] > 150 and f[32, x, 0] - f[32, x, 1] > 80  # noqa: E731  (80x64 cropped: x - 8)
    if "WanImageToVideo" in ids or "WanFirstLastFrameToVideo" in ids:  # the known first frame comes back
        assert red(frames[0], 20) and frames[0, 32, 56].max() < 60
    if "WanFirstLastFrameToVideo" in ids:  # and the last
        assert red(frames[-1], 60) and frames[-1, 32, 20].max() < 60


# -- against kinema.Pipeline -------------------------------------------------------------------------------------
def test_ksampler_graph_against_the_pipeline(tmp_path):
    """KSampler + EmptyHunyuanLatentVideo + CLIPTextEncode + VAEDecode on the built-in model against
    kinema.Pipeline (t2v, euler, same shift, seed, guidance, prompts): driven with the Pipeline's schedule the
    node's sampler gives the Pipeline's latents (measured max |diff| ~1e-6); with ComfyUI's `simple` schedule
    (sigma from 1.0, unrounded timesteps) the video differs slightly, as documented in nodes/comfy.py."""
    from kinema.sampling import schedule

    f = ModelFolders()
    ctx = make_ctx(tmp_path, f)
    (model,) = comfy.model_sampling_sd3(ctx, comfy.unet_loader(ctx, "kinema_builtin_dit.safetensors", "default")[0], 3.0)
    (clip,) = comfy.clip_loader(ctx, "kinema_builtin_umt5.safetensors", "wan")
    (vae,) = comfy.vae_loader(ctx, "kinema_builtin_vae.safetensors")
    prompt, negative = "a red circle moving right on a black background", "blue"
    (pos,), (neg,) = comfy.clip_text_encode(ctx, prompt, clip), comfy.clip_text_encode(ctx, negative, clip)
    (latent,) = comfy.empty_hunyuan_latent_video(ctx, 64, 64, 9, 1)
    steps, seed, cfg = 4, 11, 4.0

    pipe = kinema.Pipeline.load(device="cpu")
    result = pipe(prompt, negative_prompt=negative, size="64*64", frame_num=9, steps=steps, shift=3.0, guide_scale=cfg,
                  seed=seed, solver="euler", progress=False)
    # same maths: the node's sampler on the Pipeline's sigmas, integer timesteps and noise
    sigmas, timesteps = schedule("euler", steps, 3.0)
    noise = kinema.sampling.initial_noise(latent["samples"].shape, seed)
    x0 = comfy.run_sampler(ctx, model, noise, sigmas, timesteps, "euler", pos, neg, cfg)
    same = (x0[0] - result.latents.float().cpu()).abs().max().item()
    assert same < 1e-4, same  # measured 1.9e-5: prompt and negative encoded apart, not in one batch
    # ComfyUI's schedule: the documented departure, small but not nothing
    (out,) = comfy.ksampler(ctx, **_ksampler_args(model, pos, neg, latent, seed=seed, steps=steps, cfg=cfg))
    (frames,) = comfy.vae_decode(ctx, out, vae)
    assert frames.shape == (9, 64, 64, 3)
    ours = (frames * 255).round()
    theirs = torch.as_tensor(result.frames).float()
    diff = (ours - theirs).abs().mean().item()
    departure = (out["samples"][0] - result.latents).abs().max().item()
    assert 0.05 < diff < 2 and departure > 1e-2, (diff, departure)  # measured 0.44 levels, latents 0.23 apart
    first = comfy.ksampler_sigmas("euler", "simple", steps, 3.0)
    assert first[0] == 1.0 and abs(sigmas[0].item() - 0.999 * 3 / (1 + 2 * 0.999)) < 1e-6


def test_vae_nodes(comfy_models, tmp_path):
    """VAEEncode crops to the VAE's stride (centred) and to 4n + 1 frames; VAEDecode gives the frames as one
    batch; VAEDecodeTiled (Kinema's tiles) stays close to the untiled decode; CLIPVisionEncode crops square."""
    root, _ = comfy_models
    ctx = make_ctx(tmp_path, ModelFolders(root))
    (vae,) = comfy.vae_loader(ctx, VAE_NAME)
    torch.manual_seed(2)
    pixels = torch.rand(7, 70, 131, 3)
    (latent,) = comfy.vae_encode(ctx, pixels, vae)
    assert latent["samples"].shape == (1, 16, 2, 8, 16)  # 5 frames of 64x128 (70 -> 64 rows, 131 -> 128 columns)
    v = ctx.models.vae(vae)
    want = v.encode(pixels[None, :5, 3:67, 1:129].permute(0, 4, 1, 2, 3) * 2 - 1)
    assert torch.allclose(latent["samples"], want, atol=1e-5)
    (frames,) = comfy.vae_decode(ctx, latent, vae)
    assert frames.shape == (5, 64, 128, 3) and 0 <= frames.min() and frames.max() <= 1
    two = {"samples": torch.cat([latent["samples"], latent["samples"]])}
    assert comfy.vae_decode(ctx, two, vae)[0].shape == (10, 64, 128, 3)
    from kinema.memory.vae_tiling import TiledVAE

    big = {"samples": torch.randn(1, 16, 1, 16, 40)}
    (untiled,) = comfy.vae_decode(ctx, big, vae)
    (tiled,) = comfy.vae_decode_tiled(ctx, big, vae, 128, 64, 64, 8)  # 3 x 1 tiles of 16 latent pixels
    assert torch.equal(tiled, comfy._to_image(TiledVAE(v, (128, 128), overlap=16).decode(big["samples"])))
    err = (tiled - untiled).abs()
    assert tiled.shape == untiled.shape and 0 < err.mean() < 5e-3 and err.max() < 0.1, (err.mean(), err.max())
    (cv,) = comfy.clip_vision_loader(ctx, CLIP_NAME)
    clip = ctx.models.clip_vision(cv)
    image = torch.rand(1, 40, 60, 3)
    none = comfy.clip_vision_encode(ctx, cv, image, "none")[0].tokens
    center = comfy.clip_vision_encode(ctx, cv, image, "center")[0].tokens
    assert none.shape == center.shape == (1, 257, 64)
    assert torch.allclose(none, clip.encode(image.movedim(-1, 1) * 2 - 1), atol=1e-5)
    assert torch.allclose(center, clip.encode(image[:, :, 10:50].movedim(-1, 1) * 2 - 1), atol=1e-5)


def test_ui_format_given_to_the_executor_as_it_is(comfy_models, tmp_path):
    """The t2v template's model names are the fixture's files: only its size and steps are changed (in the UI
    format's widget values) and the workflow goes to the executor unconverted; seed control 'randomize' stays."""
    pytest.importorskip("kinema.workflow.executor")
    from kinema.workflow.executor import Executor

    root, _ = comfy_models
    workflow = _template("text_to_video_wan.json")
    nodes = {n["type"]: n for n in workflow["nodes"]}
    nodes["EmptyHunyuanLatentVideo"]["widgets_values"] = [48, 32, 9, 1]
    nodes["KSampler"]["widgets_values"][2] = 2  # steps
    ex = Executor(ModelFolders(root, builtin=False), tmp_path / "output", tmp_path / "input", tmp_path / "temp")
    ui = ex.execute(workflow, "p1")
    (saved,) = ui.values()
    assert _frames(tmp_path / "output" / "video" / saved["images"][0]["filename"]) == (9, 32, 48)
