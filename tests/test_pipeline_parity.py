"""Whole pipelines against diffusers' Wan pipelines: the code that joins the components.

The components match one by one (test_dit / vae / t5 / clip / sampling_parity); checked here is
what joins them: guidance, the text context zero-padded to 512 tokens, the negative prompt, the
i2v / flf2v condition y = [mask, VAE latent of the known frames], the CLIP tokens of one or two
frames, the flf2v last-frame fit. Tiny random components in diffusers' and transformers' classes
are saved as diffusers pipeline folders (WanPipeline; WanImageToVideoPipeline, with `last_image`
for flf2v) and Kinema loads the same folders; both start from the same noise and sample the
official UniPC schedule, so the final latents must agree to float32 rounding.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_vae

import kinema
from kinema.sampling import initial_noise

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

TOL = 1e-4  # max |kinema - diffusers| on the final latents, fp32

# Where diffusers departs from the official Wan2.1 code (which Kinema follows), it is given its input
# in the official form, and the departure is asserted in test_diffusers_departures:
# - CLIP preprocessing: official `CLIPModel.visual` squashes the whole frame to 224x224 (bicubic on the
#   tensor, no crop); diffusers' CLIPImageProcessor resizes the shortest side and centre-crops. Diffusers
#   gets `image_embeds` of the official preprocessing (its check_inputs refuses `image` beside
#   `image_embeds`, though its __call__ uses both: ImageToVideoWithEmbeds lifts that one check).
# - the frame resize: official bicubic (F.interpolate), diffusers' VideoProcessor nearest. Diffusers gets
#   frames already resized the official way, which its resize leaves as they are.
# - the negative prompt: official (and Kinema) default to the config's `sample_neg_prompt`, diffusers to
#   "". Diffusers gets the official string (OFFICIAL_NEG_*, restated from wan/configs).
# - flf2v's last frame of another size: diffusers squashes it to the output size. It gets the last frame
#   already fitted (scale to cover, centre-crop: `reference_fit`, checked against Kinema's fit in
#   test_last_frame_fit). The official code's own fit does not do what it says: official_fit_as_written.
# - the schedule: diffusers' flow UniPC starts at sigma 1 - 1e-6, the official one at 0.999
#   (kinema/sampling/schedule.py); its scheduler here is handed the official sigmas (OfficialUniPC).
# - guidance below 1: diffusers runs no uncond pass unless guidance_scale > 1, official always runs both.
#   Only g = 1 (no uncond pass in either) and g > 1 are compared.
# The same in both, as the parity shows: prompt cleaning (ftfy, HTML unescaped twice, whitespace runs),
# 512 text tokens with zero padding (diffusers' `encode_prompt` defaults to 226, its `__call__` passes
# 512), integer timesteps, the mask layout (first frame 4 times), y = [mask, latent], the latent
# normalisation (mu - mean) / std, and 2 x N CLIP tokens for flf2v.


# -- the one place this file calls Kinema ------------------------------------------------------------
@functools.cache
def _pipeline(folder: str):
    return kinema.Pipeline.load(folder, device="cpu", dtype=torch.float32)


def kinema_latents(folder, task: str, **kw) -> torch.Tensor:
    """Kinema's final latents [16, T, h, w] for one call on the pipeline folder `folder` (CPU, fp32).

    kw: prompt, negative_prompt, size, frame_num, steps, shift, guide_scale, seed, image,
    first_frame, last_frame, as `kinema.Pipeline.__call__` takes them."""
    return _pipeline(str(folder))(task=task, decode=False, progress=False, **kw).latents


# -- the official Wan2.1 code, restated ---------------------------------------------------------------
# wan/configs/shared_config.py sample_neg_prompt; wan_i2v_14B.py prefixes "镜头晃动，" (camera shake),
# configs/__init__.py gives flf2v_14B "镜头切换，" (camera cut) on top of i2v's.
OFFICIAL_NEG = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
OFFICIAL_NEG_I2V = "镜头晃动，" + OFFICIAL_NEG
OFFICIAL_NEG_FLF2V = "镜头切换，" + OFFICIAL_NEG_I2V
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def official_unshifted(steps: int) -> np.ndarray:
    """FlowUniPCMultistepScheduler(shift=1).set_timesteps before its shift: linspace from float32(0.999)."""
    train = torch.from_numpy(1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()).to(torch.float32)
    return np.linspace(train[0].item(), train[-1].item(), steps + 1)[:-1]


def official_size(h: int, w: int, max_area: int) -> tuple[int, int]:
    """image2video.py: the output keeps the image's aspect at about max_area, in whole latent patches."""
    lat_h = round(np.sqrt(max_area * h / w) // 8 // 2 * 2)
    lat_w = round(np.sqrt(max_area / (h / w)) // 8 // 2 * 2)
    return lat_h * 8, lat_w * 8


def official_resize(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """image2video.py / first_last_frame2video.py: a frame [3, H, W] in [-1, 1] as the VAE gets it."""
    return F.interpolate(image[None], size=(h, w), mode="bicubic")[0]


def official_clip_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """wan/modules/clip.py CLIPModel.visual: squash to size x size (bicubic, no crop), to [0, 1], normalise."""
    x = F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)
    return (x * 0.5 + 0.5 - CLIP_MEAN) / CLIP_STD


def center_crop(img: torch.Tensor, size) -> torch.Tensor:
    """torchvision.transforms.functional.center_crop on a tensor [C, H, W] (what the official code calls):
    zero-pads a side shorter than the crop, and puts the crop at int(round(excess / 2))."""
    (th, tw), (ih, iw) = size, img.shape[1:]
    if th > ih or tw > iw:
        px, py = max(tw - iw, 0), max(th - ih, 0)
        img = F.pad(img, (px // 2, (px + 1) // 2, py // 2, (py + 1) // 2))
        ih, iw = img.shape[1:]
    top, left = round((ih - th) / 2.0), round((iw - tw) / 2.0)  # Python's round: half to even
    return img[:, top : top + th, left : left + tw]


def official_fit_as_written(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """first_last_frame2video.py as written: the ratio from the PIL sizes (w, h), then "# 1. resize" computes
    a size and never resizes, and "# 2. center crop" passes that (w, h) size to TF.center_crop, which reads
    it as (h, w): the last frame is zero-padded (or cropped) unscaled, to the first frame's size transposed."""
    (w1, h1), (w2, h2) = first.shape[:0:-1], last.shape[:0:-1]  # PIL .size order
    ratio = max(w1 / w2, h1 / h2)
    return center_crop(last, [round(w2 * ratio), round(h2 * ratio)])


def reference_fit(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """What the official docstring says ("last_frame will be cropped & resized to match first_frame") with
    its own ratio: scale the last frame to cover the first (TF.resize's tensor defaults: bilinear,
    antialiased), then torchvision's centre crop to the first frame's size."""
    (w1, h1), (w2, h2) = first.shape[:0:-1], last.shape[:0:-1]
    ratio = max(w1 / w2, h1 / h2)
    scaled = F.interpolate(last[None], size=(round(h2 * ratio), round(w2 * ratio)), mode="bilinear", antialias=True)[0]
    return center_crop(scaled, (h1, w1))


class OfficialUniPC(UniPCMultistepScheduler):
    """diffusers' flow UniPC on the official Wan2.1 sigmas (the pipelines call set_timesteps(steps) only)."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        unshifted = official_unshifted(num_inference_steps)
        super().set_timesteps(sigmas=unshifted, device=device)  # shifted by its flow_shift
        # the official integer timesteps, which both hand the DiT: int64(sigma * 1000) of the float64 sigmas
        s = self.config.flow_shift
        official = torch.from_numpy(s * unshifted / (1 + (s - 1) * unshifted) * 1000).to(torch.int64)
        assert torch.equal(self.timesteps.cpu(), official)


def official_scheduler(shift: float) -> OfficialUniPC:
    return OfficialUniPC(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=2,
                         solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")


# -- tiny random components in diffusers' / transformers' classes --------------------------------------
TEXT_DIM, CLIP_DIM, CLIP_SIZE, CLIP_PATCH = 32, 40, 28, 7
CLIP_TOKENS = (CLIP_SIZE // CLIP_PATCH) ** 2 + 1  # 17; ViT-H/14 at 224 has 257
FRAMES, STEPS = 5, 4
PROMPT = "a red  ball &amp;amp; a blue\tbox\n rolling left"  # cleaning matters: the tokenizer keeps runs of spaces
NEGATIVE = "blurry, static, grey"
SYMBOLS = sorted(set(PROMPT + NEGATIVE + OFFICIAL_NEG_FLF2V + "abcdefghijklmnopqrstuvwxyz,.&;") - set(" \t\n"))


def _tokenizer():
    """A character-level unigram tokenizer (T5 layout <pad> 0, </s> 1, <unk> 2) in which spaces are tokens,
    as a transformers tokenizer: diffusers uses it as such, Kinema reads its tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in SYMBOLS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every weight random at an O(1) effect (the default inits zero some projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "scale_shift_table" in name or "pos_embed" in name:
                p.copy_(0.3 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def _umt5(vocab: int):
    cfg = transformers.UMT5Config(vocab_size=vocab, d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                  feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = transformers.UMT5EncoderModel(cfg).eval()
    _randomise(model, 1)
    with torch.no_grad():  # T5 has no 1/sqrt(d) in attention: fold it into q, as its own init does
        for block in model.encoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(1 / math.sqrt(8))
        model.shared.weight.normal_(generator=torch.Generator().manual_seed(2))
    model.encoder.embed_tokens = model.shared
    return model


def _dit(variant: str) -> WanTransformer3DModel:
    image = {} if variant == "t2v" else {"image_dim": CLIP_DIM, "added_kv_proj_dim": 48}
    if variant == "flf2v":
        image["pos_embed_seq_len"] = 2 * CLIP_TOKENS  # the two frames' tokens, each with its own position
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16 if variant == "t2v" else 36,
        out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=96, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, **image,
    ).eval()
    _randomise(model, {"t2v": 3, "i2v": 4, "flf2v": 5}[variant])
    return model


def _vae() -> AutoencoderKLWan:
    model = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                             temperal_downsample=[False, True, True]).eval()
    randomise_vae(model, torch.Generator().manual_seed(6), model.decoder.conv_out)
    return model


def _clip():
    cfg = transformers.CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=56, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=CLIP_SIZE, patch_size=CLIP_PATCH,
                                        hidden_act="gelu", layer_norm_eps=1e-5)
    model = transformers.CLIPVisionModel(cfg).eval()
    _randomise(model, 7)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"t2v" | "i2v" | "flf2v": a saved diffusers pipeline folder}, sharing the text encoder and the VAE."""
    root = tmp_path_factory.mktemp("pipelines")
    tokenizer = _tokenizer()
    scheduler = UniPCMultistepScheduler.from_config(official_scheduler(5.0).config)  # saved as diffusers' own class
    parts = {"tokenizer": tokenizer, "text_encoder": _umt5(len(tokenizer)), "vae": _vae(), "scheduler": scheduler}
    WanPipeline(transformer=_dit("t2v"), **parts).save_pretrained(root / "t2v")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size=CLIP_SIZE,
                                                image_mean=CLIP_MEAN.flatten().tolist(),
                                                image_std=CLIP_STD.flatten().tolist())
    clip = _clip()
    for variant in ("i2v", "flf2v"):
        WanImageToVideoPipeline(transformer=_dit(variant), image_encoder=clip, image_processor=processor,
                                **parts).save_pretrained(root / variant)
    return {v: root / v for v in ("t2v", "i2v", "flf2v")}


class ImageToVideoWithEmbeds(WanImageToVideoPipeline):
    """diffusers' i2v pipeline taking `image` (for the VAE condition) together with `image_embeds` (for the
    DiT): its __call__ uses both, only its check_inputs refuses the pair. Lifts that one check."""

    def check_inputs(self, prompt, negative_prompt, image, *args, **kwargs):
        return super().check_inputs(prompt, negative_prompt, None, *args, **kwargs)


@functools.cache
def _diffusers_pipe(folder: str):
    cls = WanPipeline if folder.endswith("t2v") else ImageToVideoWithEmbeds
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_latents(folder, shift: float, **call) -> torch.Tensor:
    """diffusers' final latents [16, T, h, w] from the same folder, on the official schedule."""
    pipe = _diffusers_pipe(str(folder))
    pipe.scheduler = official_scheduler(shift)
    with torch.no_grad():
        out = pipe(num_inference_steps=STEPS, num_frames=FRAMES, max_sequence_length=512, output_type="latent",
                   return_dict=False, **call)[0]
    return out[0]


def clip_tokens(folder, *frames: torch.Tensor) -> torch.Tensor:
    """CLIP penultimate-layer tokens of each frame [3, H, W] in [-1, 1] by the official preprocessing,
    from the folder's transformers CLIPVisionModel: diffusers' `image_embeds` [n, N, dim]."""
    pixels = torch.cat([official_clip_pixels(f, CLIP_SIZE) for f in frames])
    with torch.no_grad():
        return _diffusers_pipe(str(folder)).image_encoder(pixels, output_hidden_states=True).hidden_states[-2]


def as_diffusers_frame(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [-1, 1] -> [1, 3, H, W] in [0, 1], the range diffusers' VideoProcessor maps back by 2x - 1."""
    x = (image[None] + 1) / 2
    assert 0 <= x.min() and x.max() <= 1  # else diffusers would take it for [-1, 1] already and skip the mapping
    return x


def smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth random image [3, h, w] inside [-0.7, 0.7], so bicubic resizes stay inside [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 5, 7, generator=g) * 1.4 - 0.7
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]


def _report(request, name: str, diff: float) -> None:
    request.node.user_properties.append((name, diff))
    print(f"{request.node.name}: max |kinema - diffusers| = {diff:.2e}")


# -- parity -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide_scale", [5.0, 1.0], ids=["guided", "unguided"])
def test_t2v(folders, guide_scale, request):
    seed, shift, (w, h) = 11, 5.0, (48, 32)
    ours = kinema_latents(folders["t2v"], "t2v", prompt=PROMPT, negative_prompt=NEGATIVE, size=(w, h),
                          frame_num=FRAMES, steps=STEPS, shift=shift, guide_scale=guide_scale, seed=seed)
    noise = initial_noise((1, 16, (FRAMES - 1) // 4 + 1, h // 8, w // 8), seed)
    ref = diffusers_latents(folders["t2v"], shift, prompt=PROMPT, negative_prompt=NEGATIVE, height=h, width=w,
                            guidance_scale=guide_scale, latents=noise.clone())
    assert ours.shape == ref.shape == noise.shape[1:]
    diff = (ours - ref).abs().max().item()
    _report(request, "max_diff", diff)
    assert diff < TOL
    assert (ours - noise[0]).abs().max() > 0.1  # it really sampled


def test_i2v_default_negative_prompt(folders, request):
    """i2v with Kinema's default negative prompt, against diffusers given the official i2v one."""
    seed, shift, area = 12, 3.0, (48, 32)
    image = smooth_image(40, 60, seed=1)  # not the output size: Kinema resizes it the official way
    h, w = official_size(40, 60, area[0] * area[1])
    assert (h, w) == (32, 48)
    ours = kinema_latents(folders["i2v"], "i2v", prompt=PROMPT, image=image, size=area, frame_num=FRAMES,
                          steps=STEPS, shift=shift, guide_scale=5.0, seed=seed)
    noise = initial_noise((1, 16, (FRAMES - 1) // 4 + 1, h // 8, w // 8), seed)
    ref = diffusers_latents(folders["i2v"], shift, prompt=PROMPT, negative_prompt=OFFICIAL_NEG_I2V,
                            image=as_diffusers_frame(official_resize(image, h, w)),
                            image_embeds=clip_tokens(folders["i2v"], image), height=h, width=w, guidance_scale=5.0,
                            latents=noise.clone())
    diff = (ours - ref).abs().max().item()
    _report(request, "max_diff", diff)
    assert diff < TOL


def test_flf2v_last_frame_of_another_size(folders, request):
    seed, shift, area = 13, 16.0, (48, 32)
    first, last = smooth_image(40, 60, seed=2), smooth_image(60, 150, seed=3)  # aspects 1.5 and 2.5
    h, w = official_size(40, 60, area[0] * area[1])
    fitted = reference_fit(first, last)  # [3, 40, 60]: scaled by 2/3 to 40 x 100, the middle 60 columns
    ours = kinema_latents(folders["flf2v"], "flf2v", prompt=PROMPT, negative_prompt=NEGATIVE, first_frame=first,
                          last_frame=last, size=area, frame_num=FRAMES, steps=STEPS, shift=shift, guide_scale=4.0,
                          seed=seed)
    noise = initial_noise((1, 16, (FRAMES - 1) // 4 + 1, h // 8, w // 8), seed)
    tokens = clip_tokens(folders["flf2v"], first, fitted)  # [2, 17, dim]: diffusers joins them to 34 itself
    ref = diffusers_latents(folders["flf2v"], shift, prompt=PROMPT, negative_prompt=NEGATIVE,
                            image=as_diffusers_frame(official_resize(first, h, w)),
                            last_image=as_diffusers_frame(official_resize(fitted, h, w)), image_embeds=tokens,
                            height=h, width=w, guidance_scale=4.0, latents=noise.clone())
    diff = (ours - ref).abs().max().item()
    _report(request, "max_diff", diff)
    assert diff < TOL


# -- what the parity runs rest on ------------------------------------------------------------------------
def test_tokenizers_agree(folders):
    """Kinema's tokenizer (cleaning + tokenizer.json + </s>) gives the ids diffusers' gets from transformers."""
    ours = kinema.load_text_encoder(folders["t2v"]).tokenizer
    pipe = _diffusers_pipe(str(folders["t2v"]))
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for text in (PROMPT, NEGATIVE, OFFICIAL_NEG_FLF2V):
        ref = pipe.tokenizer(prompt_clean(text), add_special_tokens=True).input_ids
        assert ours.token_ids(text) == ref
        assert 2 not in ref  # no unknown token: every character counts
    assert ours.token_ids(PROMPT) != pipe.tokenizer(PROMPT).input_ids  # uncleaned, the prompt would differ


def test_official_negative_prompts():
    from kinema.pipeline.tasks import get_task

    assert get_task("t2v").negative_prompt == OFFICIAL_NEG
    assert get_task("i2v").negative_prompt == OFFICIAL_NEG_I2V
    assert get_task("flf2v").negative_prompt == OFFICIAL_NEG_FLF2V


def _fit(first, last):
    from kinema.pipeline.conditioning import fit_last_frame

    return fit_last_frame(first, last)


@pytest.mark.parametrize("last_hw", [(60, 150), (50, 50), (30, 76), (80, 90), (41, 59), (40, 60)])
def test_last_frame_fit(last_hw):
    """Kinema's flf2v fit is the scale-to-cover + centre-crop of `reference_fit`, written independently."""
    first, last = smooth_image(40, 60, 4), smooth_image(*last_hw, 5)
    ours, ref = _fit(first, last), reference_fit(first, last)
    assert ours.shape == ref.shape == first.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_last_frame_fit_crop_offset_is_floor():
    """A deliberate difference (kinema.pipeline.conditioning.fit_last_frame): Kinema puts the crop at
    floor(excess / 2); torchvision's center_crop, which the official code calls, at round-half-even(excess / 2).
    They are one pixel apart when the excess is 3 mod 4: kept, so the numbers stay those of the golden runs."""
    first, last = smooth_image(40, 60, 4), smooth_image(30, 80, 5)  # scaled to 40 x 107: excess 47 columns
    scaled = F.interpolate(last[None], size=(40, 107), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(_fit(first, last), scaled[:, :, 23:83], rtol=0, atol=1e-6)  # floor(47 / 2) = 23
    assert not torch.allclose(_fit(first, last), reference_fit(first, last), atol=1e-3)  # torchvision: 24


def test_diffusers_departures(folders):
    """The departures of diffusers from the official code that the parity tests feed around."""
    pipe = _diffusers_pipe(str(folders["i2v"]))
    image = smooth_image(40, 60, 6)
    # CLIP: diffusers' processor (shortest side, then centre crop) is not the official squash.
    from PIL import Image

    pil = Image.fromarray(((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    theirs = pipe.image_processor(images=pil, return_tensors="pt").pixel_values
    official = official_clip_pixels(torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 127.5 - 1, CLIP_SIZE)
    assert theirs.shape == official.shape and (theirs - official).abs().max() > 0.1
    # The frame resize: diffusers' VideoProcessor resizes a tensor by nearest, official by bicubic ...
    x01 = as_diffusers_frame(image)
    theirs = pipe.video_processor.preprocess(x01, height=32, width=48)
    assert (theirs[0] - official_resize(image, 32, 48)).abs().max() > 1e-2
    # ... and leaves a frame of the output size as it is (up to 2x - 1 rounding), which the parity tests use.
    sized = official_resize(image, 32, 48)
    torch.testing.assert_close(pipe.video_processor.preprocess(as_diffusers_frame(sized), 32, 48)[0], sized,
                               rtol=0, atol=1e-6)
    # The negative prompt: diffusers' default is "", the official one sample_neg_prompt.
    empty = pipe.encode_prompt("x", None, do_classifier_free_guidance=True, max_sequence_length=512)[1]
    assert torch.equal(empty, pipe.encode_prompt("x", "", do_classifier_free_guidance=True,
                                                 max_sequence_length=512)[1])
    # Guidance: diffusers runs the uncond pass only for guidance_scale > 1; official always runs both.
    pipe._guidance_scale = 0.5
    assert not pipe.do_classifier_free_guidance
    # flf2v as the official code is written: the last frame is never scaled, only padded to a transposed size.
    first, last = smooth_image(40, 60, 7), smooth_image(50, 50, 8)
    as_written = official_fit_as_written(first, last)
    assert as_written.shape == (3, 60, 60) != _fit(first, last).shape  # ratio 1.2: 60 x 60, not 40 x 60
    assert torch.equal(as_written[:, 5:55, 5:55], last) and as_written[:, :5].abs().max() == 0


def test_padding_and_guidance_matter(folders):
    """Guards the parity tests against a model blind to what they check: the tiny DiT's output moves with
    the zero padding of the context, and cond and uncond differ."""
    dit = kinema.load_dit(folders["t2v"])
    te = kinema.load_text_encoder(folders["t2v"])
    cond, uncond = te.encode([PROMPT, NEGATIVE])
    x, t = initial_noise((1, 16, 2, 4, 6), 0), torch.tensor([900])
    padded = torch.cat([cond, cond.new_zeros(512 - cond.shape[0], TEXT_DIM)])[None]
    with torch.no_grad():
        v_pad, v_short = dit(x, t, padded), dit(x, t, cond[None])
        v_uncond = dit(x, t, torch.cat([uncond, uncond.new_zeros(512 - uncond.shape[0], TEXT_DIM)])[None])
    assert (v_pad - v_short).abs().max() > 1e-2
    assert (v_pad - v_uncond).abs().max() > 1e-2
