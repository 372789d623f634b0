"""Refine and upscale: the learned x2 cascade (tiled exactly), pixel upscalers frame by frame, the refine pass
at a larger size; through the Python API and kinema generate."""

from __future__ import annotations

import pytest
import torch
from conftest import StubTextEncoder

from kinema.errors import KinemaError
from kinema.models.upscaler import Upscaler2x, UpscalerConfig
from kinema.upscale import Upscaler, load_upscaler, resize_video, save_upscaler, upscale_video

PROMPT = "a red circle moving right"


def random_stage(seed: int, **kw) -> Upscaler2x:
    torch.manual_seed(seed)
    stage = Upscaler2x(UpscalerConfig(dim=8, blocks=2, **kw)).eval()
    with torch.no_grad():
        stage.tail.weight.normal_(0, 0.3)  # a trained stage's residual is not zero
    return stage


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscaler")
    for i in (1, 2):
        save_upscaler(folder / f"stage{i}.safetensors", random_stage(i))
    return folder


def test_a_stage_is_bicubic_plus_its_residual():
    stage = Upscaler2x(UpscalerConfig(dim=8, blocks=1))
    x = torch.rand(1, 3, 3, 8, 8) * 2 - 1
    want = resize_video(x[0], 16, 16, "bicubic")
    assert (stage(x)[0].clamp(-1, 1) - want).abs().max() < 0.1  # a fresh stage starts near bicubic
    with torch.no_grad():
        stage.tail.weight.zero_()
    assert torch.allclose(stage(x)[0].clamp(-1, 1), want, atol=1e-6)


def test_files_load_as_a_cascade(stages, tmp_path):
    up = load_upscaler(stages, 4)
    assert up.kind == "kinema" and up.scale == 4 and len(up.model.stages) == 2
    x = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    want = random_stage(2)(random_stage(1)(x))
    assert torch.allclose(up.model(x), want, atol=1e-6)
    assert load_upscaler(stages / "stage1.safetensors", 2).scale == 2
    with pytest.raises(KinemaError, match="x8 needs 3"):
        load_upscaler(stages, 8)
    with pytest.raises(KinemaError, match="does not exist"):
        load_upscaler(tmp_path / "none", 2)
    (tmp_path / "other.pth").write_bytes(b"not a model")
    with pytest.raises(KinemaError, match="spandrel"):
        load_upscaler(tmp_path / "other.pth", 2)


@pytest.mark.parametrize("tile,frames", [(4, 2), (5, 3), (64, 0)])
def test_tiled_upscaling_equals_one_pass(stages, tile, frames):
    up = load_upscaler(stages, 4)
    video = torch.rand(3, 7, 12, 10) * 1.6 - 0.8
    whole = up.model(video[None])[0].clamp(-1, 1)
    got = upscale_video(up, video, tile=tile, frames=frames)
    assert got.shape == (3, 7, 48, 40)
    assert (got - whole).abs().max() < 1e-5


def test_frame_by_frame_upscalers_take_images_in_0_1():
    class PixelShuffle2x(torch.nn.Module):  # an image model in spandrel's convention: [N, 3, H, W] in [0, 1]
        def forward(self, x):
            assert x.min() >= 0 and x.max() <= 1 and x.dim() == 4
            return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    up = Upscaler(PixelShuffle2x(), 2, "spandrel", "test")
    video = torch.rand(3, 4, 20, 12) * 2 - 1
    got = upscale_video(up, video, tile=8)
    assert torch.allclose(got, video.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1e-6)


@pytest.fixture(scope="module")
def esrgan_files(tmp_path_factory):
    """Random-weight ESRGAN files as users hold them (the original key layout, `model.0.weight`, ...), written with
    spandrel's own architecture: x2, x4, and Real-ESRGAN x2plus's form (pixel-unshuffle by 2 into an x4 net)."""
    from kinema.upscale.load import import_spandrel

    try:
        import_spandrel()
    except KinemaError:
        pytest.skip("spandrel is not installed (an optional extra, not in the test extras: PyPI's torchvision for "
                    "torch 2.13 is a CUDA build, and installed beside the CPU torch it breaks transformers' and "
                    "diffusers' imports); pip install spandrel torchvision==0.28.0 to run these")
    from spandrel.architectures.ESRGAN import ESRGAN

    folder, nets = tmp_path_factory.mktemp("esrgan"), {}
    for name, kw in (("x2", dict(scale=2)), ("x4", dict(scale=4)), ("x2plus", dict(in_nc=12, scale=4, shuffle_factor=2))):
        torch.manual_seed(len(nets))
        net = ESRGAN(num_filters=8, num_blocks=1, **kw).eval()
        torch.save(net.state_dict(), folder / f"{name}.pth")
        nets[name] = net
    return folder, nets


@pytest.mark.parametrize("name,scale", [("x2", 2), ("x4", 4), ("x2plus", 2)])
def test_real_esrgan_files_through_spandrel(esrgan_files, name, scale):
    folder, nets = esrgan_files
    up = load_upscaler(folder / f"{name}.pth", scale)
    assert up.kind == "spandrel" and up.scale == scale
    video = torch.rand(3, 2, 16, 12) * 2 - 1  # sides a multiple of 4: x2plus needs no padding
    got = upscale_video(up, video, tile=0)
    with torch.no_grad():  # the network itself, frame by frame, in [0, 1]
        want = nets[name](((video.transpose(0, 1) + 1) / 2)).clamp(0, 1).transpose(0, 1) * 2 - 1
    assert got.shape == (3, 2, 16 * scale, 12 * scale)
    assert (got - want).abs().max() < 1e-5
    odd = upscale_video(up, video[:, :, :13, :9], tile=0)  # spandrel pads to the model's size requirements
    assert odd.shape == (3, 2, 13 * scale, 9 * scale)
    with pytest.raises(KinemaError, match=f"upscales x{scale}; ask for --upscale {scale}"):
        load_upscaler(folder / f"{name}.pth", 8 // scale)


def test_cli_upscales_with_a_spandrel_file(esrgan_files, tmp_path):
    from kinema.cli.main import main
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_video

    folder, _ = esrgan_files
    write_random_checkpoint(tmp_path / "tiny")
    out = tmp_path / "up.mp4"  # (an animated webp folds identical frames, which a random model can give)
    assert main(["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(tmp_path / "tiny"), "--size", "32*32",
                 "--frame_num", "5", "--sample_steps", "2", "--prompt", PROMPT, "--upscale", "2", "--upscaler",
                 str(folder / "x2plus.pth"), "--save_file", str(out)]) == 0
    assert read_video(out).frames.shape == (5, 64, 64, 3)


# -- through the pipeline -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    from kinema.loading.dit import ModelInfo
    from kinema.models.dit import DiTConfig, WanDiT
    from kinema.models.vae import WanVAE
    from kinema.pipeline.models import Models
    from kinema.pipeline.pipeline import Pipeline

    torch.manual_seed(0)
    vae = WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval().requires_grad_(False)
    dit = WanDiT(DiTConfig("t2v", dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=2)).eval()
    return Pipeline(Models(dit, vae, StubTextEncoder(), None, ModelInfo()))


def test_refine_and_upscale_in_the_pipeline(pipe, stages):
    kw = dict(size=(32, 32), frame_num=5, steps=4, seed=2, progress=False)
    first = pipe(PROMPT, **kw)
    for method in ("bicubic", "lanczos", "latent"):
        out = pipe(PROMPT, refine=dict(size="64*48", denoise=0.5, method=method), **kw)
        assert out.video.shape == (3, 5, 48, 64) and out.latents.shape == (16, 2, 6, 8)
        assert out.settings["refine_size"] == "64*48" and out.settings["refine_method"] == method
    # the refine pass is v2v at the new size on the first pass's result, resized
    refined = pipe(PROMPT, refine=dict(size="64*48", denoise=0.25, steps=8), **kw)
    v2v = pipe(PROMPT, task="v2v", video=resize_video(first.video, 64, 48), denoise=0.25,
               **{**kw, "size": (64, 48), "steps": 8})
    assert (refined.latents - v2v.latents).abs().max() < 1e-5
    big = pipe(PROMPT, upscale=4, upscaler=str(stages), **kw)
    assert big.video.shape == (3, 5, 128, 128) and big.settings["upscale"] == 4
    want = upscale_video(load_upscaler(stages, 4), first.video)
    assert (big.video - want).abs().max() < 1e-5
    for bad, text in ((dict(refine=dict(size="64*64", denoise=0)), "refine denoise 0"),
                      (dict(refine=dict(size="64*64", method="nearest")), "'nearest'"),
                      (dict(refine=dict(denoise=0.3)), "at least a size"),
                      (dict(upscale=3), "upscale 3"), (dict(upscaler=str(stages)), "upscaler is used by upscale")):
        with pytest.raises(KinemaError, match=text):
            pipe.prepare(PROMPT, **kw, **bad)


def test_cli_refine_and_upscale(stages, tmp_path, capsys):
    from kinema.cli.main import main
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_metadata, read_video

    ckpt = tmp_path / "tiny"
    write_random_checkpoint(ckpt)
    out = tmp_path / "big.webp"
    gen = ["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--size", "32*32", "--frame_num", "5",
           "--sample_steps", "3", "--prompt", PROMPT, "--base_seed", "1", "--lossless"]
    assert main([*gen, "--refine_size", "48*48", "--refine_denoise", "0.4", "--upscale", "2", "--upscaler",
                 str(stages), "--save_file", str(out)]) == 0
    assert read_video(out).frames.shape == (5, 96, 96, 3)
    meta = read_metadata(out)
    assert (meta["refine_size"], meta["refine_denoise"], meta["upscale"]) == ("48*48", 0.4, 2)
    capsys.readouterr()
    assert main([*gen, "--refine_denoise", "0.4", "--save_file", str(tmp_path / "x.webp")]) == 2
    assert "--refine_denoise tunes the refine pass, which is off; add --refine_size" in capsys.readouterr().err


def test_comfy_upscale_nodes(stages, tmp_path):
    import shutil

    import kinema.workflow.nodes  # noqa: F401  (registration)
    from kinema.workflow.context import ExecutionContext
    from kinema.workflow.folders import ModelFolders
    from kinema.workflow.types import NODES

    (tmp_path / "upscale_models" / "mine").mkdir(parents=True)
    shutil.copy(stages / "stage1.safetensors", tmp_path / "upscale_models" / "mine" / "stage1.safetensors")
    ctx = ExecutionContext(ModelFolders(tmp_path), tmp_path, tmp_path, tmp_path)
    names = NODES["UpscaleModelLoader"].inputs["model_name"].choices(ctx)
    assert names == ["kinema_builtin_upscaler", "mine/stage1.safetensors"]
    (model,) = NODES["UpscaleModelLoader"].fn(ctx, model_name="mine/stage1.safetensors")
    frames = torch.rand(3, 8, 12, 3)  # IMAGE [F, H, W, 3] in [0, 1]
    (big,) = NODES["ImageUpscaleWithModel"].fn(ctx, upscale_model=model, image=frames)
    assert big.shape == (3, 16, 24, 3)
    want = random_stage(1)(frames.permute(3, 0, 1, 2)[None] * 2 - 1)[0].clamp(-1, 1)
    assert torch.allclose(big, ((want + 1) / 2).permute(1, 2, 3, 0), atol=1e-5)
    with pytest.raises(KinemaError, match="UpscaleModelLoader"):
        NODES["UpscaleModelLoader"].fn(ctx, model_name="../escape.pth")
