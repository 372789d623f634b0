"""Kinema's own nodes (the web page's graphs) on the built-in model: they give exactly the frames of a direct
kinema.Pipeline call, report per-step progress with previews, stop on cancel, keep the loaded pipeline in the
model cache, save decodable files with the settings embedded, and name the node and input in their errors."""

import json
import threading

import numpy as np
import pytest
import torch

from kinema.errors import Cancelled, KinemaError
from kinema.media import read_metadata, read_video, save_video
from kinema.builtin import builtin_path
from kinema.workflow.context import ExecutionContext, ModelCache, Progress
from kinema.workflow.folders import ModelFolders
from kinema.workflow.nodes import kinema_nodes as kn
from kinema.workflow.types import NODES, NodeOutput

PROMPT = "a red circle moving right on a black background"
SMALL = dict(task="t2v", prompt=PROMPT, negative_prompt="", width=64, height=64, frame_num=9, steps=3, seed=7,
             guide_scale=-1.0, shift=0.0, solver="unipc", cache="off", vae_tile="auto")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    for d in ("models/diffusion_models", "models/vae", "models/text_encoders", "output", "input", "temp"):
        (root / d).mkdir(parents=True)
    (root / "models/diffusion_models/lone_dit.safetensors").write_bytes(b"")
    (root / "models/diffusion_models/mini").symlink_to(builtin_path() / "transformer")  # a DiT folder (config.json)
    return root, ModelCache()


def make_ctx(world, **kw):
    root, cache = world
    return ExecutionContext(ModelFolders(root / "models"), root / "output", root / "input", root / "temp", models=cache,
                            **kw)


def run(name, ctx, **inputs):
    out = NODES[name].fn(ctx, **inputs)
    return out


def builtin_recipe(ctx):
    (recipe,) = run("KinemaPipelineLoader", ctx, ckpt="builtin", dtype="default", quantization="disabled",
                    attention="auto", blocks_to_swap=0)
    return recipe


def test_generate_equals_the_pipeline_and_reports_steps(world):
    events = []
    ctx = make_ctx(world, progress=Progress(lambda node, v, t, prev: events.append((node, v, t, prev)), node="4"))
    recipe = builtin_recipe(ctx)
    assert recipe == kn.PipelineRecipe()  # builtin: no paths, default options
    frames, fps, settings = run("KinemaGenerate", ctx, pipeline=recipe, **SMALL)
    pipe = ctx.models.pipeline(recipe)
    direct = pipe(PROMPT, size=(64, 64), frame_num=9, steps=3, seed=7, progress=False)
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == torch.float32
    assert torch.equal((frames * 255).round().to(torch.uint8), torch.from_numpy(direct.frames))
    assert fps == 8.0  # the built-in model's frame rate
    s = json.loads(settings)
    defaults = pipe.models.info.sample_defaults  # the built-in model's own guidance and shift
    assert s == direct.settings and s["steps"] == 3
    assert s["guide_scale"] == defaults["guide_scale"] == 2.5 and s["shift"] == defaults["shift"] == 3.0
    assert [(n, v, t) for n, v, t, _ in events] == [("4", 1, 3), ("4", 2, 3), ("4", 3, 3)]
    for *_, prev in events:  # the middle latent frame through the linear preview: [h, w, 3] uint8
        assert prev.dtype == np.uint8 and prev.shape == (8, 8, 3)
    assert not np.array_equal(events[0][3], events[-1][3])  # the estimate changes between steps

    # The cached pipeline is reused: a second recipe equal to the first loads nothing more.
    n = len(ctx.models)
    frames2, _, s2 = run("KinemaGenerate", ctx, pipeline=builtin_recipe(ctx), **{**SMALL, "seed": 8})
    assert len(ctx.models) == n and ctx.models.pipeline(builtin_recipe(ctx)) is pipe
    assert json.loads(s2)["seed"] == 8 and not torch.equal(frames, frames2)


def test_previews_off_and_cancel(world):
    seen = []
    ctx = make_ctx(world, progress=Progress(lambda node, v, t, prev: seen.append(prev)), preview=False)
    run("KinemaGenerate", ctx, pipeline=builtin_recipe(ctx), **{**SMALL, "steps": 2})
    assert seen == [None, None]

    cancel = threading.Event()
    calls = []

    def report(node, v, t, prev):
        calls.append(v)
        cancel.set()  # as POST /interrupt does, during the first step's report

    ctx = make_ctx(world, progress=Progress(report), cancel=cancel)
    with pytest.raises(Cancelled):
        run("KinemaGenerate", ctx, pipeline=builtin_recipe(ctx), **{**SMALL, "steps": 4})
    assert calls == [1]


def test_i2v_and_v2v_inputs_match_the_pipeline(world):
    ctx = make_ctx(world)
    recipe = builtin_recipe(ctx)
    pipe = ctx.models.pipeline(recipe)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = torch.from_numpy(img).float()[None] / 255  # IMAGE [1, H, W, 3], as LoadImage gives it
    frames, _, s = run("KinemaGenerate", ctx, pipeline=recipe, image=image, **{**SMALL, "task": "i2v"})
    direct = pipe(PROMPT, task="i2v", image=img, size=(64, 64), frame_num=9, steps=3, seed=7, progress=False)
    assert torch.equal((frames * 255).round().to(torch.uint8), torch.from_numpy(direct.frames))
    assert json.loads(s)["task"] == "i2v"

    # v2v through KinemaLoadVideo: a lossless clip in the input folder, read back as IMAGE frames.
    src = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    path = save_video(src, ctx.input_dir / "source.webp", format="webp", frame_rate=8, lossless=True)
    assert NODES["KinemaLoadVideo"].required["video"].choices(ctx) == ["source.webp"]
    video, vfps = run("KinemaLoadVideo", ctx, video=path.name)
    assert video.shape == (9, 64, 64, 3) and vfps == 8.0  # trimmed to 4n + 1
    assert torch.equal((video * 255).round().to(torch.uint8), torch.from_numpy(src[:9]))
    frames, _, s = run("KinemaGenerate", ctx, pipeline=recipe, video=video, denoise=0.5, **{**SMALL, "task": "v2v"})
    direct = pipe(PROMPT, task="v2v", video=src[:9], denoise=0.5, size=(64, 64), frame_num=9, steps=3, seed=7,
                  progress=False)
    assert torch.equal((frames * 255).round().to(torch.uint8), torch.from_numpy(direct.frames))
    assert json.loads(s)["denoise"] == 0.5
    with pytest.raises(KinemaError, match=r"KinemaLoadVideo.video '\.\./x.mp4'"):
        run("KinemaLoadVideo", ctx, video="../x.mp4")


def test_save_writes_decodable_files_with_settings(world):
    ctx = make_ctx(world)
    frames, fps, settings = run("KinemaGenerate", ctx, pipeline=builtin_recipe(ctx), **SMALL)
    out = run("KinemaSaveVideo", ctx, images=frames, fps=fps, format="h264-mp4", filename_prefix="video/page",
              settings=settings)
    assert isinstance(out, NodeOutput)
    (entry,) = out.ui["gifs"]
    assert entry["filename"] == "page_00001.mp4" and entry["subfolder"] == "video" and entry["type"] == "output"
    path = ctx.output_dir / "video" / entry["filename"]
    clip = read_video(path)
    assert clip.frames.shape == (9, 64, 64, 3) and clip.fps == 8
    err = (clip.frames.float() - frames * 255).abs().mean()
    assert err < 6, err  # h264 at crf 19 on 64x64: a few levels
    meta = read_metadata(path)
    assert meta["seed"] == 7 and meta["prompt"] == PROMPT and meta["format"] == "h264-mp4"
    assert out.ui["settings"][0]["steps"] == 3

    # t2i -> png under "images"; lossless, so bit-exact.
    one, _, s1 = run("KinemaGenerate", ctx, pipeline=builtin_recipe(ctx), **{**SMALL, "task": "t2i", "frame_num": 0})
    out = run("KinemaSaveVideo", ctx, images=one, fps=8.0, format="png", filename_prefix="still", settings=s1)
    (entry,) = out.ui["images"]
    got = read_video(ctx.output_dir / entry["filename"]).frames
    assert got.shape == (1, 64, 64, 3) and torch.equal(got, (one * 255).round().to(torch.uint8))
    assert read_metadata(ctx.output_dir / entry["filename"])["task"] == "t2i"

    for bad in ("../escape", "/abs/x", "a/../../b"):
        with pytest.raises(KinemaError, match="KinemaSaveVideo.filename_prefix"):
            run("KinemaSaveVideo", ctx, images=one, fps=8.0, format="png", filename_prefix=bad)
    with pytest.raises(KinemaError, match="KinemaSaveVideo.settings is not JSON"):
        run("KinemaSaveVideo", ctx, images=one, fps=8.0, format="png", filename_prefix="x", settings="{oops")
    with pytest.raises(KinemaError, match="KinemaSaveVideo.format png holds one frame, got 9"):
        run("KinemaSaveVideo", ctx, images=frames, fps=8.0, format="png", filename_prefix="x")


def test_extend_matches_the_pipeline(world):
    """Task extend through the node: the video (IMAGE frames, as KinemaLoadVideo gives them) continued, the whole
    video back, as a direct call; the extend inputs are read for it only (ComfyUI sends every widget's value)."""
    ctx = make_ctx(world)
    recipe = builtin_recipe(ctx)
    pipe = ctx.models.pipeline(recipe)
    first, _, _ = run("KinemaGenerate", ctx, pipeline=recipe, **SMALL)  # 9 frames
    src = (first * 255).round().to(torch.uint8)
    extend = {**SMALL, "task": "extend", "width": 0, "height": 0, "frame_num": 0, "extend_frames": 8,
              "overlap_frames": 5, "colour_match": "hm", "overlap_join": "cut"}
    frames, _, s = run("KinemaGenerate", ctx, pipeline=recipe, video=src.float() / 255, **extend)
    direct = pipe(PROMPT, task="extend", video=src.numpy(), extend_frames=8, overlap_frames=5, colour_match="hm",
                  overlap_join="cut", steps=3, seed=7, progress=False)
    assert frames.shape == (17, 64, 64, 3)
    assert torch.equal((frames * 255).round().to(torch.uint8), torch.from_numpy(direct.frames))
    assert torch.equal((frames[:9] * 255).round().to(torch.uint8), src)  # cut: every input frame kept
    rec = json.loads(s)
    assert (rec["task"], rec["extend_frames"], rec["overlap_frames"], rec["colour_match"], rec["overlap_join"]) == \
        ("extend", 8, 5, "hm", "cut")
    # t2v with the extend widgets at other values: not read
    plain, _, _ = run("KinemaGenerate", ctx, pipeline=recipe, **{**SMALL, "extend_frames": 12, "loop": True})
    assert torch.equal(plain, first)
    with pytest.raises(KinemaError, match="KinemaGenerate.extend_frames 6 must be a multiple of 4"):
        run("KinemaGenerate", ctx, pipeline=recipe, video=src.float() / 255, **{**extend, "extend_frames": 6})
    small, _, s = run("KinemaGenerate", ctx, pipeline=recipe, video=src.float() / 255,
                      **{**extend, "width": 32, "height": 32})  # a working size: the video's size kept
    assert small.shape == (17, 64, 64, 3) and json.loads(s)["size"] == "32*32"
    with pytest.raises(KinemaError, match="drop KinemaGenerate.frame_num"):
        run("KinemaGenerate", ctx, pipeline=recipe, video=src.float() / 255, **{**extend, "frame_num": 17})
    with pytest.raises(KinemaError, match="KinemaGenerate's video input"):
        run("KinemaGenerate", ctx, pipeline=recipe, **extend)


def test_guidance_extras_and_upscale_match_the_pipeline(world):
    """slg / feta / cfg_zero_star / upscale on the node: kinema generate's flags of the same names, off by default."""
    ctx = make_ctx(world)
    recipe = builtin_recipe(ctx)
    pipe = ctx.models.pipeline(recipe)
    frames, _, s = run("KinemaGenerate", ctx, pipeline=recipe, **SMALL, slg="default", feta=-1.0, cfg_zero_star=True,
                       upscale="2")
    direct = pipe(PROMPT, size=(64, 64), frame_num=9, steps=3, seed=7, skip_layers="default", enhance="default",
                  cfg_zero_star=True, upscale=2, progress=False)
    assert frames.shape == (9, 128, 128, 3)
    assert torch.equal((frames * 255).round().to(torch.uint8), torch.from_numpy(direct.frames))
    rec = json.loads(s)
    assert rec["slg"] == "3" and rec["feta"] == 0.5 and rec["cfg_zero_star"] is True and rec["upscale"] == 2
    plain, _, s = run("KinemaGenerate", ctx, pipeline=recipe, **SMALL, slg="off", feta=0.0, cfg_zero_star=False,
                      upscale="off")
    assert not {"slg", "feta", "cfg_zero_star", "upscale"} & set(json.loads(s))
    own, _, _ = run("KinemaGenerate", ctx, pipeline=recipe, **SMALL, slg="2", feta=1.5)
    assert torch.equal(own, run("KinemaGenerate", ctx, pipeline=recipe, **SMALL, slg=" 2 ", feta=1.5)[0])
    for kw, text in ((dict(slg="99"), "KinemaGenerate.slg"), (dict(feta=-0.5), "KinemaGenerate.feta")):
        with pytest.raises(KinemaError, match=text):
            run("KinemaGenerate", ctx, pipeline=recipe, **SMALL, **kw)


def test_errors_name_the_node_and_input(world):
    ctx = make_ctx(world)
    recipe = builtin_recipe(ctx)
    with pytest.raises(KinemaError, match="task i2v needs KinemaGenerate's image input"):
        run("KinemaGenerate", ctx, pipeline=recipe, **{**SMALL, "task": "i2v"})
    with pytest.raises(KinemaError, match="KinemaGenerate: width 64 and height 0"):
        run("KinemaGenerate", ctx, pipeline=recipe, **{**SMALL, "height": 0})
    with pytest.raises(KinemaError, match="KinemaGenerate.steps"):
        run("KinemaGenerate", ctx, pipeline=recipe, **{**SMALL, "steps": 5000})
    with pytest.raises(KinemaError, match="lone_dit.safetensors' is a DiT alone; choose its text_encoder and vae"):
        run("KinemaPipelineLoader", ctx, ckpt="lone_dit.safetensors", dtype="default", quantization="disabled",
            attention="auto", blocks_to_swap=0)
    with pytest.raises(KinemaError, match="KinemaPipelineLoader.blocks_to_swap"):
        run("KinemaPipelineLoader", ctx, ckpt="builtin", dtype="default", quantization="disabled", attention="auto",
            blocks_to_swap=-1)


def test_object_info(world):
    ctx = make_ctx(world)
    info = NODES["KinemaPipelineLoader"].object_info(ctx)
    assert info["input"]["required"]["ckpt"][0] == ["builtin", "lone_dit.safetensors", "mini"]
    assert info["input"]["optional"]["vae"][0] == ["auto", "kinema_builtin_vae.safetensors"]
    assert info["output"] == ["KINEMA_PIPELINE"]
    gen = NODES["KinemaGenerate"].object_info(ctx)
    assert gen["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert gen["input"]["required"]["task"][0] == ["t2v", "i2v", "flf2v", "t2i", "v2v", "extend"]
    assert gen["input"]["optional"]["colour_match"][0] == ["overlap", "hm", "off"]
    assert gen["input"]["optional"]["extend_frames"][1]["step"] == 4
    assert gen["output"] == ["IMAGE", "FLOAT", "STRING"]
    save = NODES["KinemaSaveVideo"].object_info(ctx)
    assert save["output_node"] is True and "h264-mp4" in save["input"]["required"]["format"][0]
    assert NODES["KinemaLoadVideo"].object_info(ctx)["input"]["required"]["video"][1]["video_upload"] is True


def test_a_dit_folder_with_parts_from_the_folders(world):
    """ckpt from diffusion_models/ plus text_encoder and vae from their folders: the same model set as builtin,
    so the same frames; a LoRA name that is not in loras/ is refused naming the folder."""
    ctx = make_ctx(world)
    (recipe,) = run("KinemaPipelineLoader", ctx, ckpt="mini", dtype="default", quantization="disabled",
                    attention="auto", blocks_to_swap=0, text_encoder="kinema_builtin_umt5.safetensors",
                    vae="kinema_builtin_vae.safetensors")
    assert recipe.dit.endswith("mini") and recipe.ckpt is None and recipe.vae.endswith("vae")
    frames, _, s = run("KinemaGenerate", ctx, pipeline=recipe, **SMALL)
    same, _, _ = run("KinemaGenerate", ctx, pipeline=builtin_recipe(ctx), **SMALL)
    assert torch.equal(frames, same) and json.loads(s)["model"].endswith("transformer")  # the link resolved
    with pytest.raises(KinemaError, match="ckpt builtin uses its own parts; set vae to auto"):
        run("KinemaPipelineLoader", ctx, ckpt="builtin", dtype="default", quantization="disabled", attention="auto",
            blocks_to_swap=0, vae="kinema_builtin_vae.safetensors")
    with pytest.raises(KinemaError, match="loras file 'missing.safetensors' not found"):
        run("KinemaPipelineLoader", ctx, ckpt="builtin", dtype="default", quantization="disabled", attention="auto",
            blocks_to_swap=0, lora_1="missing.safetensors")
