"""ComfyUI-WanVideoWrapper's nodes and VHS_VideoCombine on the built-in model.

The node chain must give what kinema.Pipeline gives for the same settings (latents equal), the wrapper's own
example workflows must run (adapted only by --set-style overrides) and write VHS-named files that decode to the
asked frame count, size and rate, and options Kinema lacks must be a KinemaError naming the node and input.
"""

from __future__ import annotations

import logging
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kinema
import kinema.workflow.nodes  # noqa: F401  (registration)
from kinema.errors import KinemaError
from kinema.media import read_video
from kinema.workflow.context import ExecutionContext, ModelCache
from kinema.workflow.types import NODES, NodeOutput

WORKFLOWS = Path(__file__).parent / "workflows"
DIT, T5, VAE, CLIP = ("kinema_builtin_dit.safetensors", "kinema_builtin_umt5.safetensors",
                      "kinema_builtin_vae.safetensors", "kinema_builtin_clip_vision.safetensors")
PROMPT = "a red circle moving right on a black background"
STEPS = 4


def folders():
    from kinema.workflow.folders import ModelFolders

    return ModelFolders()


@pytest.fixture(scope="module")
def models():
    return ModelCache()


@pytest.fixture
def ctx(tmp_path, models):
    for d in ("output", "input", "temp"):
        (tmp_path / d).mkdir()
    return ExecutionContext(folders(), tmp_path / "output", tmp_path / "input", tmp_path / "temp", models=models)


@pytest.fixture(scope="module")
def pipe():
    return kinema.Pipeline.load()


def call(class_type, ctx, **inputs):
    out = NODES[class_type].fn(ctx, **inputs)
    return out.outputs if isinstance(out, NodeOutput) else out


def run_prompt(prompt: dict, ctx, outputs=None) -> dict:
    """Execute an API-format prompt by pulling from its output nodes (the executor's job, here in miniature so the
    nodes are tested on their own); returns {node_id: NodeOutput or tuple}."""
    done: dict[str, object] = {}

    def run(nid):
        if nid in done:
            return done[nid]
        spec = prompt[nid]
        kw = {k: run(v[0])[v[1]] if isinstance(v, list) else v for k, v in spec["inputs"].items()}
        out = NODES[spec["class_type"]].fn(ctx, **kw)
        done[nid] = out.outputs if isinstance(out, NodeOutput) else out
        ui[nid] = out.ui if isinstance(out, NodeOutput) else None
        return done[nid]

    ui: dict[str, object] = {}
    for nid in outputs or [k for k, v in prompt.items() if NODES[v["class_type"]].output_node]:
        run(nid)
    return ui


def loaders(ctx, precision="fp32"):
    (model,) = call("WanVideoModelLoader", ctx, model=DIT, base_precision=precision, quantization="disabled",
                    load_device="main_device", attention_mode="sdpa")
    (t5,) = call("LoadWanVideoT5TextEncoder", ctx, model_name=T5, precision="fp32")
    (vae,) = call("WanVideoVAELoader", ctx, model_name=VAE, precision="fp32")
    return model, t5, vae


def sample(ctx, model, t5, embeds, negative="", **kw):
    (text,) = call("WanVideoTextEncode", ctx, positive_prompt=PROMPT, negative_prompt=negative, t5=t5)
    args = dict(steps=STEPS, cfg=4.0, shift=3.0, seed=42, force_offload=True, scheduler="unipc", riflex_freq_index=0)
    args.update(kw)
    samples, denoised = call("WanVideoSampler", ctx, model=model, image_embeds=embeds, text_embeds=text, **args)
    return samples["samples"]


# -- the same numbers as kinema.Pipeline ------------------------------------------------------------
@pytest.mark.parametrize("scheduler,solver", [("unipc", "unipc"), ("dpm++", "dpm++"), ("euler", "euler")])
def test_t2v_sampler_equals_pipeline(ctx, pipe, scheduler, solver):
    model, t5, vae = loaders(ctx)
    (embeds,) = call("WanVideoEmptyEmbeds", ctx, width=64, height=64, num_frames=17)
    got = sample(ctx, model, t5, embeds, scheduler=scheduler)
    ref = pipe(PROMPT, size="64*64", frame_num=17, steps=STEPS, shift=3.0, guide_scale=4.0, seed=42, solver=solver,
               negative_prompt="", decode=scheduler == "unipc", progress=False)
    assert got.shape == (1, 16, 5, 8, 8)
    assert (got[0] - ref.latents.cpu()).abs().max().item() <= 1e-6
    if scheduler == "unipc":  # the decode stage too: frames equal to the Pipeline's video
        (images,) = call("WanVideoDecode", ctx, vae=vae, samples={"samples": got}, enable_vae_tiling=False, tile_x=272,
                         tile_y=272, tile_stride_x=144, tile_stride_y=128)
        assert images.shape == (17, 64, 64, 3)
        expect = ((ref.video.cpu().float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)
        assert (images - expect).abs().max().item() <= 1e-6
        other = sample(ctx, model, t5, embeds, seed=43)  # and the seed matters
        assert (other - got).abs().max().item() > 1e-2
        # an i2v-type model's t2v through WanVideoImageToVideoEncode with no image: the same empty condition
        (empty,) = call("WanVideoImageToVideoEncode", ctx, width=64, height=64, num_frames=17, noise_aug_strength=0.0,
                        start_latent_strength=1.0, end_latent_strength=1.0, vae=vae)
        assert (sample(ctx, model, t5, empty) - got).abs().max().item() <= 1e-6


def i2v_embeds(ctx, vae, clip, first, num_frames):
    """WanVideoClipVisionEncode -> WanVideoImageToVideoEncode of a first frame: (its CLIP tokens, the embeds)."""
    (tokens,) = call("WanVideoClipVisionEncode", ctx, clip_vision=clip, image_1=first, strength_1=1.0, strength_2=1.0,
                     crop="disabled", combine_embeds="average")
    (embeds,) = call("WanVideoImageToVideoEncode", ctx, width=64, height=64, num_frames=num_frames,
                     noise_aug_strength=0.0, start_latent_strength=1.0, end_latent_strength=1.0, vae=vae,
                     clip_embeds=tokens, start_image=first)
    return tokens, embeds


def as_model(image):
    """IMAGE [1, H, W, 3] in [0, 1] -> the float [3, H, W] in [-1, 1] Pipeline takes (the same image for both)."""
    return image[0].permute(2, 0, 1) * 2 - 1


def test_i2v_and_flf2v_equal_pipeline(ctx, pipe):
    model, t5, vae = loaders(ctx)
    (clip,) = call("LoadWanVideoClipTextEncoder", ctx, model_name=CLIP, precision="fp32")
    g = torch.Generator().manual_seed(0)
    first, last = torch.rand(1, 64, 64, 3, generator=g), torch.rand(1, 64, 64, 3, generator=g)

    tokens, embeds = i2v_embeds(ctx, vae, clip, first, 9)
    single = tokens.tokens.shape[1]
    got = sample(ctx, model, t5, embeds)
    ref = pipe(PROMPT, task="i2v", image=as_model(first), size="64*64", frame_num=9, steps=STEPS, shift=3.0,
               guide_scale=4.0, seed=42, negative_prompt="", decode=False, progress=False)
    assert (got[0] - ref.latents.cpu()).abs().max().item() <= 1e-6

    (tokens,) = call("WanVideoClipVisionEncode", ctx, clip_vision=clip, image_1=first, image_2=last, strength_1=1.0,
                     strength_2=1.0, crop="disabled", combine_embeds="concat")
    (embeds,) = call("WanVideoImageToVideoEncode", ctx, width=64, height=64, num_frames=9, noise_aug_strength=0.0,
                     start_latent_strength=1.0, end_latent_strength=1.0, vae=vae, clip_embeds=tokens, start_image=first,
                     end_image=last)
    assert embeds.clip_fea.shape[1] == 2 * single  # both frames' tokens, sequence-wise
    got = sample(ctx, model, t5, embeds)
    ref = pipe(PROMPT, task="flf2v", first_frame=as_model(first), last_frame=as_model(last), size="64*64",
               frame_num=9, steps=STEPS, shift=3.0, guide_scale=4.0, seed=42, negative_prompt="", decode=False,
               progress=False)
    assert (got[0] - ref.latents.cpu()).abs().max().item() <= 1e-6


def test_context_reference_latent_equals_pipeline(ctx, pipe, caplog):
    """WanVideoContextOptions' reference_latent (an image through WanVideoEncode) anchors the windows after the
    first, as Pipeline's context_reference does."""
    model, t5, vae = loaders(ctx)
    (clip,) = call("LoadWanVideoClipTextEncoder", ctx, model_name=CLIP, precision="fp32")
    g = torch.Generator().manual_seed(1)
    first, ref_image = torch.rand(1, 64, 64, 3, generator=g), torch.rand(1, 64, 64, 3, generator=g)
    _, embeds = i2v_embeds(ctx, vae, clip, first, 33)
    (reference,) = call("WanVideoEncode", ctx, vae=vae, image=ref_image, enable_vae_tiling=False, tile_x=272,
                        tile_y=272, tile_stride_x=144, tile_stride_y=128)
    (context,) = call("WanVideoContextOptions", ctx, context_schedule="static_standard", context_frames=17,
                      context_stride=4, context_overlap=8, freenoise=False, reference_latent=reference)
    got = sample(ctx, model, t5, embeds, context_options=context)
    win = dict(frames=17, overlap=8, schedule="static_standard", freenoise=False)
    ref = pipe(PROMPT, task="i2v", image=as_model(first), size="64*64", frame_num=33, steps=STEPS, shift=3.0,
               guide_scale=4.0, seed=42, negative_prompt="", context_windows=win, context_reference=as_model(ref_image),
               decode=False, progress=False)
    assert (got[0] - ref.latents.cpu()).abs().max().item() <= 1e-5
    plain = pipe(PROMPT, task="i2v", image=as_model(first), size="64*64", frame_num=33, steps=STEPS, shift=3.0,
                 guide_scale=4.0, seed=42, negative_prompt="", context_windows=win, decode=False, progress=False)
    assert (ref.latents - plain.latents).abs().max().item() > 1e-3  # the reference did change the windows
    # without an image condition the reference has nothing to replace: unused, and said so (the wrapper ignores it)
    (empty,) = call("WanVideoEmptyEmbeds", ctx, width=64, height=64, num_frames=33)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        sample(ctx, model, t5, empty, context_options=context, steps=1)
    assert "reference_latent is for an image condition" in caplog.text
    with pytest.raises(KinemaError, match=r"WanVideoContextOptions.reference_latent must be a video LATENT"):
        call("WanVideoContextOptions", ctx, context_schedule="static_standard", context_frames=17, context_stride=4,
             context_overlap=8, freenoise=False, reference_latent={"samples": torch.zeros(1, 16, 8, 8)})


def test_cache_and_v2v_equal_pipeline(ctx, pipe):
    model, t5, vae = loaders(ctx)
    (embeds,) = call("WanVideoEmptyEmbeds", ctx, width=64, height=64, num_frames=17)
    (tea,) = call("WanVideoTeaCache", ctx, rel_l1_thresh=0.3, start_step=1, end_step=-1, cache_device="offload_device",
                  use_coefficients=True)
    got = sample(ctx, model, t5, embeds, steps=8, cache_args=tea)
    ref = pipe(PROMPT, size="64*64", frame_num=17, steps=8, shift=3.0, guide_scale=4.0, seed=42, negative_prompt="",
               cache="teacache:0.3", decode=False, progress=False)
    assert ref.cache.skipped > 0  # the cache did skip steps, and the node's run skipped the same ones
    assert (got[0] - ref.latents.cpu()).abs().max().item() <= 1e-6

    (mag,) = call("WanVideoMagCache", ctx, magcache_thresh=0.1, magcache_K=2, start_step=1, end_step=-1,
                  cache_device="offload_device")
    got = sample(ctx, model, t5, embeds, steps=8, cache_args=mag)
    ref = pipe(PROMPT, size="64*64", frame_num=17, steps=8, shift=3.0, guide_scale=4.0, seed=42, negative_prompt="",
               cache="magcache:0.1:2", decode=False, progress=False)
    assert (got[0] - ref.latents.cpu()).abs().max().item() <= 1e-6

    # video2video: WanVideoEncode -> samples + denoise_strength == Pipeline(latents=..., denoise=...)
    frames = ((ref.latents.new_zeros(17, 64, 64, 3) + torch.linspace(0, 1, 64)[None, None, :, None])).cpu()
    (latent,) = call("WanVideoEncode", ctx, vae=vae, image=frames, enable_vae_tiling=False, tile_x=272, tile_y=272,
                     tile_stride_x=144, tile_stride_y=128)
    assert latent["samples"].shape == (1, 16, 5, 8, 8)
    got = sample(ctx, model, t5, embeds, samples=latent, denoise_strength=0.5)
    ref = pipe(PROMPT, size="64*64", frame_num=17, steps=STEPS, shift=3.0, guide_scale=4.0, seed=42, negative_prompt="",
               latents=latent["samples"][0], denoise=0.5, decode=False, progress=False)
    assert (got[0] - ref.latents.cpu()).abs().max().item() <= 1e-6


def test_lora_select_chains_into_the_model_recipe(tmp_path):
    from kinema.workflow.folders import ModelFolders

    (tmp_path / "loras" / "style").mkdir(parents=True)
    for name in ("a.safetensors", "style/b.safetensors"):
        (tmp_path / "loras" / name).write_bytes(b"")
    ctx = ExecutionContext(ModelFolders(tmp_path), tmp_path, tmp_path, tmp_path)
    assert NODES["WanVideoLoraSelect"].inputs["lora"].choices(ctx) == ["a.safetensors", "style/b.safetensors"]
    (one,) = call("WanVideoLoraSelect", ctx, lora="a.safetensors", strength=0.75)
    (two,) = call("WanVideoLoraSelect", ctx, lora="style/b.safetensors", strength=0.0, prev_lora=one)  # 0: left out
    (three,) = call("WanVideoLoraSelect", ctx, lora="style/b.safetensors", strength=-0.5, prev_lora=two)
    (swap,) = call("WanVideoBlockSwap", ctx, blocks_to_swap=3, offload_img_emb=False, offload_txt_emb=False,
                   prefetch_blocks=2)
    (model,) = call("WanVideoModelLoader", ctx, model=DIT, base_precision="bf16", quantization="fp8_e4m3fn",
                    load_device="offload_device", attention_mode="sdpa", lora=three, block_swap_args=swap)
    assert model.loras == ((str(tmp_path / "loras" / "a.safetensors"), 0.75),
                           (str(tmp_path / "loras" / "style" / "b.safetensors"), -0.5))
    assert (model.dtype, model.quantization, model.blocks_to_swap, model.prefetch_blocks) == ("bf16", "fp8_e4m3fn", 3, 2)
    (runtime,) = call("WanVideoLoraSelect", ctx, lora="a.safetensors", strength=0.5, merge_loras=False)
    (model,) = call("WanVideoModelLoader", ctx, model=DIT, base_precision="bf16", quantization="disabled",
                    load_device="offload_device", attention_mode="sdpa", lora=runtime)
    assert model.loras == ((str(tmp_path / "loras" / "a.safetensors"), (0.5,)),)  # a strength list: run unmerged


# -- what Kinema does not have yet is an error naming the node and input ---------------------------
def test_unsupported_options_are_clear_errors(ctx):
    model, t5, vae = loaders(ctx)
    (embeds,) = call("WanVideoEmptyEmbeds", ctx, width=64, height=64, num_frames=5)
    (slg,) = call("WanVideoSLG", ctx, blocks="10", start_percent=0.1, end_percent=1.0)  # the built-in DiT has 6
    cases = [({"slg_args": slg}, "WanVideoSampler.slg_args", "blocks 10 do not exist"),
             ({"experimental_args": "cfg_zero_star"}, "WanVideoSampler.experimental_args", "its settings node"),
             ({"riflex_freq_index": 60}, "WanVideoSampler.riflex_freq_index", "RIFLEx index 60 does not exist"),
             ({"end_step": 2}, "WanVideoSampler.end_step", "part of the schedule"),
             ({"scheduler": "res_multistep"}, "WanVideoSampler.scheduler", "'res_multistep'")]
    for extra, where, what in cases:
        with pytest.raises(KinemaError) as e:
            sample(ctx, model, t5, embeds, steps=1, **extra)
        assert where in str(e.value) and what in str(e.value), str(e.value)

    for class_type, kw, where in [
        ("WanVideoBlockSwap", dict(blocks_to_swap=2, offload_img_emb=True, offload_txt_emb=False),
         "WanVideoBlockSwap.offload_img_emb"),
        ("WanVideoTorchCompileSettings", dict(backend="inductor", fullgraph=True, mode="default", dynamic=False,
                                              dynamo_cache_size_limit=64, compile_transformer_blocks_only=True),
         "WanVideoTorchCompileSettings.fullgraph"),
        ("WanVideoModelLoader", dict(model=DIT, vram_management_args={"offload_percent": 1.0}),
         "WanVideoModelLoader.vram_management_args"),
        ("WanVideoModelLoader", dict(model=DIT, base_precision="fp16_fast"), "WanVideoModelLoader.base_precision"),
        ("WanVideoTeaCache", dict(rel_l1_thresh=0.1, use_coefficients=False), "WanVideoTeaCache.use_coefficients"),
        ("WanVideoExperimentalArgs", dict(cfg_zero_star=True, use_tcfg=True), "WanVideoExperimentalArgs.use_tcfg"),
        ("WanVideoTextEncode", dict(positive_prompt="a || b", negative_prompt="", t5=t5), "WanVideoTextEncode.positive_prompt"),
        ("WanVideoImageToVideoEncode", dict(width=64, height=64, num_frames=5, noise_aug_strength=0.1, vae=vae),
         "WanVideoImageToVideoEncode.noise_aug_strength"),
        ("VHS_VideoCombine", dict(images=torch.zeros(1, 16, 16, 3), frame_rate=8, loop_count=0, format="video/h264-mp4",
                                  audio={"waveform": None}), "VHS_VideoCombine.audio"),
        ("VHS_VideoCombine", dict(images=torch.zeros(1, 16, 16, 3), frame_rate=8, loop_count=0,
                                  filename_prefix="../escape", format="image/gif"), "outside the output folder"),
    ]:
        with pytest.raises(KinemaError) as e:
            call(class_type, ctx, **kw)
        assert where in str(e.value), str(e.value)


# -- the node definitions are the wrapper's ------------------------------------------------------------
def test_object_info_matches_the_wrapper(ctx):
    mine = ("custom_nodes.ComfyUI-WanVideoWrapper", "custom_nodes.ComfyUI-VideoHelperSuite")
    info = {k: v.object_info(ctx) for k, v in NODES.items() if v.module in mine}
    assert json.loads(json.dumps(info)) == info  # plain JSON, as /object_info serves it
    sampler = info["WanVideoSampler"]
    assert sampler["input_order"]["required"] == ["model", "image_embeds", "steps", "cfg", "shift", "seed",
                                                  "force_offload", "scheduler", "riflex_freq_index"]
    assert sampler["input_order"]["optional"][:6] == ["text_embeds", "samples", "denoise_strength", "feta_args",
                                                      "context_options", "cache_args"]
    assert sampler["output"] == ["LATENT", "LATENT"] and sampler["output_name"] == ["samples", "denoised_samples"]
    assert sampler["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert sampler["input"]["required"]["scheduler"][0] == ["unipc", "dpm++", "euler", "flowmatch_distill", "lcm"]
    assert sampler["python_module"] == "custom_nodes.ComfyUI-WanVideoWrapper"
    loader = info["WanVideoModelLoader"]
    assert loader["input_order"]["required"] == ["model", "base_precision", "quantization", "load_device"]
    assert loader["input"]["required"]["model"][0][0] == DIT
    assert loader["input"]["optional"]["block_swap_args"] == ["BLOCKSWAPARGS"]
    expected_outputs = {"WanVideoVAELoader": ["WANVAE"], "LoadWanVideoT5TextEncoder": ["WANTEXTENCODER"],
                        "LoadWanVideoClipTextEncoder": ["CLIP_VISION"], "WanVideoTextEncode": ["WANVIDEOTEXTEMBEDS"],
                        "WanVideoClipVisionEncode": ["WANVIDIMAGE_CLIPEMBEDS"],
                        "WanVideoImageToVideoEncode": ["WANVIDIMAGE_EMBEDS"], "WanVideoEmptyEmbeds": ["WANVIDIMAGE_EMBEDS"],
                        "WanVideoDecode": ["IMAGE"], "WanVideoEncode": ["LATENT"], "WanVideoBlockSwap": ["BLOCKSWAPARGS"],
                        "WanVideoTorchCompileSettings": ["WANCOMPILEARGS"], "WanVideoLoraSelect": ["WANVIDLORA"],
                        "WanVideoTeaCache": ["CACHEARGS"], "WanVideoMagCache": ["CACHEARGS"],
                        "VHS_VideoCombine": ["VHS_FILENAMES"]}
    for k, out in expected_outputs.items():
        assert info[k]["output"] == out, k
    assert info["WanVideoDecode"]["input_order"]["required"] == ["vae", "samples", "enable_vae_tiling", "tile_x", "tile_y",
                                                                 "tile_stride_x", "tile_stride_y"]
    vhs = info["VHS_VideoCombine"]
    assert vhs["output_node"] and vhs["input_order"]["required"] == ["images", "frame_rate", "loop_count",
                                                                     "filename_prefix", "format", "pingpong", "save_output"]
    formats = vhs["input"]["required"]["format"]
    assert formats[0][:2] == ["image/gif", "image/webp"] and "video/h264-mp4" in formats[0]
    assert formats[1]["formats"]["video/h264-mp4"][1][0] == "crf"


# -- VHS_VideoCombine ------------------------------------------------------------------------------
def test_video_combine_formats_and_naming(ctx):
    t, y, x = torch.meshgrid(torch.linspace(0, 1, 9), torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing="ij")
    frames = torch.stack([x, y, (x + t) % 1], dim=-1)  # [9, 32, 48, 3]: smooth, moving, so codecs keep it close
    bounds = {"mp4": 3, "webm": 3, "webp": 0.01, "gif": 6}
    for fmt, ext in [("video/h264-mp4", "mp4"), ("video/webm", "webm"), ("image/webp", "webp"), ("image/gif", "gif")]:
        for counter in (1, 2):
            out = NODES["VHS_VideoCombine"].fn(ctx, images=frames, frame_rate=12, loop_count=0, filename_prefix=f"clip_{ext}",
                                               format=fmt, pingpong=False, save_output=True)
            (save_output, files), = out.outputs
            rec = out.ui["gifs"][0]
            assert save_output is True and rec["type"] == "output" and rec["format"] == fmt and rec["subfolder"] == ""
            assert rec["filename"] == f"clip_{ext}_{counter:05d}.{ext}" and rec["workflow"] == f"clip_{ext}_{counter:05d}.png"
            assert [Path(f).name for f in files] == [rec["workflow"], rec["filename"]]
            assert rec["fullpath"] == files[-1] and Path(files[0]).is_file()
            video = read_video(files[-1])
            assert video.frames.shape == (9, 32, 48, 3), (fmt, video.frames.shape)
            # gif / webp store whole milliseconds (webp: 83 ms) or centiseconds (gif: 8 cs) per frame
            assert abs(video.fps - 12) < {"mp4": 1e-3, "webm": 1e-3, "webp": 0.05, "gif": 0.6}[ext], (fmt, video.fps)
            expect = np.clip(frames.numpy() * 255 + 0.5, 0, 255).astype(np.uint8).astype(int)
            err = np.abs(video.frames.numpy().astype(int) - expect).mean()
            assert err < bounds[ext], (fmt, err)  # the frames written are these frames, in this order

    # pingpong and a video's loop_count add frames as VHS does; a subfolder prefix and save_output=False (temp)
    out = NODES["VHS_VideoCombine"].fn(ctx, images=frames, frame_rate=8, loop_count=1, filename_prefix="sub/dir/pp",
                                       format="video/h264-mp4", pingpong=True, save_output=False, crf=10)
    rec = out.ui["gifs"][0]
    assert rec["type"] == "temp" and rec["subfolder"] == "sub/dir" and rec["filename"] == "pp_00001.mp4"
    assert Path(rec["fullpath"]).parent == ctx.temp_dir.resolve() / "sub" / "dir"
    assert read_video(rec["fullpath"]).frames.shape[0] == (2 * 9 - 2) * 2


# -- the wrapper's example workflows ------------------------------------------------------------------
def with_sets(prompt: dict, sets: dict) -> dict:
    """`kinema run --set NODE.INPUT=VALUE` overrides."""
    p = copy.deepcopy(prompt)
    for key, value in sets.items():
        nid, name = key.split(".")
        p[nid]["inputs"][name] = value
    return p


def test_t2v_example_workflow_runs(ctx):
    prompt = json.loads((WORKFLOWS / "wanvideo_T2V_example_01_api.json").read_text())
    prompt = with_sets(prompt, {"22.model": DIT, "22.base_precision": "fp32", "22.quantization": "disabled",
                                "11.model_name": T5, "11.precision": "fp32", "38.model_name": VAE, "38.precision": "fp32",
                                "39.blocks_to_swap": 2, "37.width": 64, "37.height": 64, "37.num_frames": 5,
                                "27.steps": 3, "16.positive_prompt": PROMPT})
    ui = run_prompt(prompt, ctx)  # with the example's Enhance-A-Video (HyVideoEnhanceAVideo, weight 2)
    with_feta = read_video(ui["30"]["gifs"][0]["fullpath"]).frames.float()
    del prompt["43"], prompt["27"]["inputs"]["feta_args"]  # the HyVideoEnhanceAVideo node muted
    ui = run_prompt(prompt, ctx)
    rec = ui["30"]["gifs"][0]
    assert rec["filename"] == "WanVideo2_1_T2V_00002.mp4" and rec["format"] == "video/h264-mp4"
    video = read_video(rec["fullpath"])
    assert video.frames.shape == (5, 64, 64, 3) and abs(video.fps - 16) < 1e-3
    assert video.frames.float().std() > 1  # not a blank clip
    assert (video.frames.float() - with_feta).abs().max() > 0  # Enhance-A-Video acted
    ui = run_prompt(prompt, ctx)
    assert ui["30"]["gifs"][0]["filename"] == "WanVideo2_1_T2V_00003.mp4"


def test_i2v_example_workflow_runs(tmp_path, models):
    """The wrapper's I2V example, UI format, through the Executor (its first i2v node, WanVideoImageClipEncode,
    still with the input name `clip` it had in March 2025)."""
    from PIL import Image

    from kinema.workflow.convert import to_api
    from kinema.workflow.executor import Executor

    ex = Executor(folders(), tmp_path / "output", tmp_path / "input", tmp_path / "temp", models=models)
    ex.input_dir.mkdir(parents=True)
    image = np.stack([*np.meshgrid(np.linspace(0, 255, 128), np.linspace(0, 255, 96)), np.full((96, 128), 40.0)], -1)
    Image.fromarray(image.astype(np.uint8)).save(ex.input_dir / "oldman_upscaled.png")
    ui_workflow = json.loads((WORKFLOWS / "wanvideo_480p_I2V_example_01.json").read_text())
    prompt = with_sets(to_api(ui_workflow), {
        "22.model": DIT, "22.base_precision": "fp32", "22.quantization": "disabled", "11.model_name": T5,
        "11.precision": "fp32", "21.model_name": VAE, "21.precision": "fp32", "13.model_name": CLIP,
        "13.precision": "fp32", "32.blocks_to_swap": 0, "17.generation_width": 64, "17.generation_height": 64,
        "17.num_frames": 5, "27.steps": 2})
    ui = ex.execute(prompt, "i2v")
    rec = ui["30"]["gifs"][0]
    assert rec["filename"] == "WanVideo2_1_00001.mp4"
    video = read_video(rec["fullpath"])
    # the official i2v size rule at about 64x64 pixels for a 4:3 image: 48 rows x 64 columns
    assert video.frames.shape == (5, 48, 64, 3) and abs(video.fps - 16) < 1e-3
    assert ui["38"]["text"] == ["5x64x48"]  # GetImageSizeAndCount saw the decoded frames


# -- the same examples as files: UI format -> the Executor ------------------------------------------------
T2V_SETS = {"22.model": DIT, "22.base_precision": "fp32", "22.quantization": "disabled", "11.model_name": T5,
            "11.precision": "fp32", "38.model_name": VAE, "38.precision": "fp32", "39.blocks_to_swap": 2,
            "37.width": 64, "37.height": 64, "37.num_frames": 5, "27.steps": 3, "16.positive_prompt": PROMPT}
# The March 2025 block swap node had one widget: the ones added since take their defaults in to_api, as ComfyUI's
# frontend gives them when it loads such a workflow (offload_img_emb / offload_txt_emb False, in the stored API copy).


def test_ui_examples_convert_and_run_through_the_executor(tmp_path, models):
    from kinema.workflow.convert import to_api
    from kinema.workflow.executor import Executor

    for name in ("wanvideo_T2V_example_01", "wanvideo_480p_I2V_example_01"):
        api = to_api(json.loads((WORKFLOWS / f"{name}.json").read_text()))
        stored = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
        assert {k: (v["class_type"], v["inputs"]) for k, v in api.items()} == \
               {k: (v["class_type"], v["inputs"]) for k, v in stored.items()}, name

    ex = Executor(folders(), tmp_path / "output", tmp_path / "input", tmp_path / "temp", models=models)
    ui_workflow = json.loads((WORKFLOWS / "wanvideo_T2V_example_01.json").read_text())
    events = []
    ui = ex.execute(with_sets(to_api(ui_workflow), T2V_SETS), "p1", listener=lambda e, d: events.append((e, d)))
    assert ui["30"]["gifs"][0]["filename"] == "WanVideo2_1_T2V_00001.mp4"  # with its Enhance-A-Video
    assert not [d for e, d in events if e == "execution_error"]

    for n in ui_workflow["nodes"]:
        if n["type"] == "HyVideoEnhanceAVideo":
            n["mode"] = 2  # muted in the editor
    prompt = with_sets(to_api(ui_workflow), T2V_SETS)
    events.clear()
    ui = ex.execute(prompt, "p2", listener=lambda e, d: events.append((e, d)),
                    extra_data={"extra_pnginfo": {"workflow": ui_workflow}})
    rec = ui["30"]["gifs"][0]
    assert rec["filename"] == "WanVideo2_1_T2V_00002.mp4" and rec["type"] == "output"
    video = read_video(rec["fullpath"])
    assert video.frames.shape == (5, 64, 64, 3) and abs(video.fps - 16) < 1e-3
    steps = [d for e, d in events if e == "progress" and d["node"] == "27"]
    assert [d["value"] for d in steps] == [1, 2, 3] and steps[-1]["max"] == 3
    assert any(e == "preview" and d["node"] == "27" for e, d in events)  # step previews from the sampler
    from kinema.media import read_metadata

    assert read_metadata(rec["fullpath"])["workflow"]["nodes"]  # the UI workflow embedded, as VHS does

    events.clear()
    prompt["27"]["inputs"]["seed"] = 7  # only the sampler and what follows run again
    ui = ex.execute(prompt, "p3", listener=lambda e, d: events.append((e, d)))
    cached = next(d["nodes"] for e, d in events if e == "execution_cached")
    assert {"11", "16", "22", "37", "38", "39"} <= set(cached) and not {"27", "28", "30"} & set(cached)
    assert ui["30"]["gifs"][0]["filename"] == "WanVideo2_1_T2V_00003.mp4"
    other = read_video(ui["30"]["gifs"][0]["fullpath"]).frames.float()
    assert (other - video.frames.float()).abs().mean() > 1  # a different seed, a different clip


def test_windows_prompt_travel_and_distilled_schedulers_equal_pipeline(ctx, pipe, caplog):
    model, t5, vae = loaders(ctx)
    (embeds,) = call("WanVideoEmptyEmbeds", ctx, width=64, height=64, num_frames=33)
    (context,) = call("WanVideoContextOptions", ctx, context_schedule="static_standard", context_frames=17,
                      context_stride=4, context_overlap=8, freenoise=False)
    travel = PROMPT + " | a blue square moving up on a white background"
    (text,) = call("WanVideoTextEncode", ctx, positive_prompt=travel, negative_prompt="", t5=t5)
    args = dict(model=model, image_embeds=embeds, text_embeds=text, steps=STEPS, cfg=4.0, shift=3.0, seed=42,
                force_offload=True, scheduler="unipc", riflex_freq_index=0)
    samples, _ = call("WanVideoSampler", ctx, context_options=context, **args)
    ref = pipe(travel, size="64*64", frame_num=33, steps=STEPS, shift=3.0, guide_scale=4.0, seed=42, negative_prompt="",
               context_windows=dict(frames=17, overlap=8, schedule="static_standard", freenoise=False), decode=False,
               progress=False)
    assert (samples["samples"][0] - ref.latents.cpu()).abs().max().item() <= 1e-6
    with pytest.raises(KinemaError, match="connect context_options"):
        call("WanVideoSampler", ctx, **args)
    # more sections than the windows can take: the ones no window takes are named, as kinema generate does
    (many,) = call("WanVideoTextEncode", ctx, positive_prompt=" | ".join(f"{PROMPT} {i}" for i in range(8)),
                   negative_prompt="", t5=t5)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        call("WanVideoSampler", ctx, context_options=context, **{**args, "text_embeds": many, "steps": 1})
    assert "WanVideoSampler: text_embeds' prompt: 5 of its 8 '|' sections fall on no window" in caplog.text
    with pytest.raises(KinemaError, match=r"WanVideoTextEncode.positive_prompt .* has an empty '\|' section"):
        call("WanVideoTextEncode", ctx, positive_prompt=PROMPT + " | ", negative_prompt="", t5=t5)

    (embeds,) = call("WanVideoEmptyEmbeds", ctx, width=64, height=64, num_frames=17)
    for scheduler in ("flowmatch_distill", "lcm"):
        got = sample(ctx, model, t5, embeds, scheduler=scheduler, cfg=1.0, steps=4)
        ref = pipe(PROMPT, size="64*64", frame_num=17, steps=4, shift=3.0, guide_scale=1.0, seed=42, solver=scheduler,
                   negative_prompt="", decode=False, progress=False)
        # cfg 1: the Pipeline encodes the prompt alone, the node with its negative in one batch (cfg is known only
        # at the sampler); the same sums, but some CPUs' kernels round a batch of 2 apart from one of 1 (AVX-512:
        # 4.3e-6 after the 4 steps; AVX2: exact)
        assert (got[0] - ref.latents.cpu()).abs().max().item() <= 2e-5, scheduler
