"""ComfyUI-WanVideoWrapper's nodes, under its class names, input names, defaults and output types, so its
workflows load and run on Kinema's engine.

The input lists follow the wrapper as of late 2025 (nodes.py, nodes_model_loading.py, nodes_sampler.py,
cache_methods/nodes_cache.py; inputs added since keep their position at the end, as the wrapper does, so
older UI-format workflows map their widgets the same way). Every node is a thin adapter: loaders return
recipes the ModelCache loads, the encoders and the sampler call the engine's stages (prompts, conditioning,
latents, sample, decode). A wrapper option Kinema has no feature for yet is a KinemaError naming the node and
input when it is set or connected; combos list only values that work.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from kinema.errors import KinemaError
from kinema.workflow.folders import folders_of, listed
from kinema.workflow.types import BOOLEAN, CHOICE, FLOAT, INT, LINK, STRING, NodeOutput, node
from kinema.workflow.values import (ClipVisionOutput, ClipVisionRecipe, ContextOptions, DiTRecipe, ImageEmbeds,
                                    TextEmbeds, TextEncoderRecipe, VAERecipe)

log = logging.getLogger("kinema")

MODULE = "custom_nodes.ComfyUI-WanVideoWrapper"
CATEGORY = "WanVideoWrapper"
SEED_MAX = 0xFFFFFFFFFFFFFFFF  # the wrapper's widget range; Kinema's seeds stop at 2**63 - 1 (checked when run)

# The wrapper's names -> Kinema's. Lists hold only what runs; other wrapper values are refused by validation.
PRECISIONS = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
QUANTIZATIONS = {"disabled": "auto", "fp8_e4m3fn": "fp8_e4m3fn", "fp8_e4m3fn_fast": "fp8_e4m3fn",
                 "fp8_e4m3fn_scaled": "fp8_e4m3fn_scaled", "fp8_e4m3fn_scaled_fast": "fp8_e4m3fn_scaled",
                 "fp8_e5m2": "fp8_e5m2"}  # "disabled" is the wrapper's autoselect: fp8 files stay fp8, others as stored
ATTENTION = {"sdpa": "sdpa", "flash_attn_2": "flash_attn", "sageattn": "sageattn"}
SCHEDULERS = {"unipc": "unipc", "dpm++": "dpm++", "euler": "euler", "flowmatch_distill": "flowmatch_distill",
              "lcm": "lcm"}
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


def _path(ctx, kind: str, name: str, *more: str) -> str:
    """A listed name -> its path; `more`: further kinds to look in (the wrapper's CLIP loader also reads text_encoders)."""
    for k in more:
        try:
            return str(folders_of(ctx).path(kind, name))
        except KinemaError:
            kind = k
    return str(folders_of(ctx).path(kind, name))


def unsupported(node_name: str, input_name: str, what: str, fix: str) -> KinemaError:
    return KinemaError(f"{node_name}.{input_name}: {what} is not supported by Kinema yet; {fix}.")


def refuse_links(node_name: str, given: dict, names: dict[str, str]) -> None:
    """A connected input whose feature Kinema lacks: {input: what it does}."""
    for name, what in names.items():
        if given.get(name) is not None:
            raise unsupported(node_name, name, what, f"disconnect {name}")


# -- settings nodes --------------------------------------------------------------------------------
@node("WanVideoBlockSwap", module=MODULE, category=CATEGORY, outputs=("BLOCKSWAPARGS",), output_names=("block_swap_args",),
      display_name="WanVideo Block Swap",
      required={"blocks_to_swap": INT(20, 0, 48, tooltip="Number of transformer blocks to keep in CPU memory and swap in"),
                "offload_img_emb": BOOLEAN(False, tooltip="Offload img_emb to offload_device"),
                "offload_txt_emb": BOOLEAN(False, tooltip="Offload time_emb to offload_device")},
      optional={"use_non_blocking": BOOLEAN(False, tooltip="Non-blocking copies (Kinema's block swap always uses a "
                                                           "side stream and pinned memory on CUDA)"),
                "vace_blocks_to_swap": INT(0, 0, 15),
                "prefetch_blocks": INT(0, 0, 40, tooltip="Blocks copied ahead; 0 = Kinema's default (1)"),
                "block_swap_debug": BOOLEAN(False)})
def block_swap(ctx, blocks_to_swap, offload_img_emb=False, offload_txt_emb=False, use_non_blocking=False,
               vace_blocks_to_swap=0, prefetch_blocks=0, block_swap_debug=False):
    """Settings for block swapping: the DiT's last blocks stay in CPU memory and visit the GPU in turn."""
    for name, value in (("offload_img_emb", offload_img_emb), ("offload_txt_emb", offload_txt_emb)):
        if value:
            raise unsupported("WanVideoBlockSwap", name, "offloading the embeddings", f"set {name} to false "
                              "(Kinema swaps only the transformer blocks)")
    if vace_blocks_to_swap:
        raise unsupported("WanVideoBlockSwap", "vace_blocks_to_swap", "VACE", "set it to 0")
    return ({"blocks_to_swap": int(blocks_to_swap), "prefetch_blocks": int(prefetch_blocks or 0)},)


@node("WanVideoTorchCompileSettings", module=MODULE, category=CATEGORY, outputs=("WANCOMPILEARGS",),
      output_names=("torch_compile_args",), display_name="WanVideo Torch Compile Settings",
      required={"backend": CHOICE(["inductor"]),
                "fullgraph": BOOLEAN(False, tooltip="Enable full graph mode"),
                "mode": CHOICE(list(COMPILE_MODES)),
                "dynamic": BOOLEAN(False, tooltip="Enable dynamic mode"),
                "dynamo_cache_size_limit": INT(64, 0, 1024, tooltip="torch._dynamo.config.cache_size_limit"),
                "compile_transformer_blocks_only": BOOLEAN(True, tooltip="Compile only the transformer blocks")},
      optional={"dynamo_recompile_limit": INT(128, 0, 1024),
                "force_parameter_static_shapes": BOOLEAN(False),
                "allow_unmerged_lora_compile": BOOLEAN(False)})
def torch_compile_settings(ctx, backend, fullgraph, mode, dynamic, dynamo_cache_size_limit,
                           compile_transformer_blocks_only, dynamo_recompile_limit=128,
                           force_parameter_static_shapes=False, allow_unmerged_lora_compile=False):
    """torch.compile of the DiT's blocks (Kinema compiles each repeated block, fullgraph off, dynamic shapes auto)."""
    n = "WanVideoTorchCompileSettings"
    if fullgraph:
        raise unsupported(n, "fullgraph", "fullgraph compilation", "set fullgraph to false")
    if dynamic:
        raise unsupported(n, "dynamic", "forcing dynamic shapes", "set dynamic to false")
    if not compile_transformer_blocks_only:
        raise unsupported(n, "compile_transformer_blocks_only", "compiling the whole model",
                          "set it to true (Kinema compiles the transformer blocks)")
    if allow_unmerged_lora_compile:
        raise unsupported(n, "allow_unmerged_lora_compile", "unmerged LoRAs", "set it to false (LoRAs are merged)")
    return ({"backend": backend, "mode": mode},)


@node("WanVideoLoraSelect", module=MODULE, category=CATEGORY, outputs=("WANVIDLORA",), output_names=("lora",),
      display_name="WanVideo Lora Select", hidden={"unique_id": "UNIQUE_ID"},
      required={"lora": CHOICE(listed("loras"), tooltip="LORA models are expected to be in models/loras"),
                "strength": FLOAT(1.0, -1000.0, 1000.0, 0.0001, tooltip="LORA strength, 0.0 leaves the LoRA out")},
      optional={"prev_lora": LINK("WANVIDLORA", tooltip="For loading multiple LoRAs"),
                "blocks": LINK("SELECTEDBLOCKS"),
                "low_mem_load": BOOLEAN(False, tooltip="A memory option of the wrapper's loader; Kinema reads LoRAs "
                                                       "tensor by tensor anyway"),
                "merge_loras": BOOLEAN(True, tooltip="merge into the weights (no cost per step), or add the LoRA at run "
                                                     "time (the weights untouched: fp8 layers exact)")})
def lora_select(ctx, lora, strength, prev_lora=None, blocks=None, low_mem_load=False, merge_loras=True, unique_id=None):
    """A LoRA applied when WanVideoModelLoader loads the DiT: merged, or run unmerged (kinema/lora/runtime.py);
    chain several with prev_lora."""
    refuse_links("WanVideoLoraSelect", {"blocks": blocks}, {"blocks": "per-block LoRA selection"})
    loras = list(prev_lora or [])
    if round(float(strength), 4) != 0.0:
        loras.append({"path": _path(ctx, "loras", lora), "strength": round(float(strength), 4),
                      "name": Path(lora).stem, "merge": bool(merge_loras)})
    return (loras,)


def _cache_args_common(n, start_step, end_step):
    if start_step != 1:
        raise unsupported(n, "start_step", f"start_step {start_step}", "use 1: Kinema computes the first step(s) the "
                          "model's calibration says and may skip from then on")
    if end_step != -1:
        raise unsupported(n, "end_step", f"end_step {end_step}", "use -1 (until the end; the last step is always computed)")


@node("WanVideoTeaCache", module=MODULE, category=CATEGORY, outputs=("CACHEARGS",), output_names=("cache_args",),
      display_name="WanVideo TeaCache",
      required={"rel_l1_thresh": FLOAT(0.3, 0.0, 1.0, 0.001, tooltip="Higher skips more steps (TeaCache's rule, "
                                       "with the model's calibrated coefficients); 0 computes every step"),
                "start_step": INT(1, 0, 9999), "end_step": INT(-1, -1, 9999),
                "cache_device": CHOICE(["main_device", "offload_device"], "offload_device",
                                       tooltip="Where the cached residual lives (Kinema keeps it beside the DiT)"),
                "use_coefficients": BOOLEAN(True, tooltip="Kinema always rescales with the model's calibration")},
      optional={"mode": CHOICE(["e"], tooltip="The modulation input compared between steps (the calibration's)")})
def teacache(ctx, rel_l1_thresh, start_step=1, end_step=-1, cache_device="offload_device", use_coefficients=True,
             mode="e"):
    """TeaCache: skip the DiT's blocks on steps whose input barely changed (kinema.sampling.cache)."""
    from kinema.sampling.cache import CacheSpec

    _cache_args_common("WanVideoTeaCache", start_step, end_step)
    if not use_coefficients:
        raise unsupported("WanVideoTeaCache", "use_coefficients", "TeaCache without coefficients",
                          "set use_coefficients to true")
    return (CacheSpec("teacache", float(rel_l1_thresh)),)


@node("WanVideoMagCache", module=MODULE, category=CATEGORY, outputs=("CACHEARGS",), output_names=("cache_args",),
      display_name="WanVideo MagCache",
      required={"magcache_thresh": FLOAT(0.02, 0.0, 0.3, 0.001, tooltip="Accumulated skip error allowed"),
                "magcache_K": INT(4, 0, 6, tooltip="Most steps skipped in a row"),
                "start_step": INT(1, 0, 9999), "end_step": INT(-1, -1, 9999),
                "cache_device": CHOICE(["main_device", "offload_device"], "offload_device")})
def magcache(ctx, magcache_thresh, magcache_K, start_step=1, end_step=-1, cache_device="offload_device"):
    """MagCache: skip the DiT's blocks while the calibrated residual magnitudes say the output barely moves (the
    first 20% of the steps, MagCache's retention, are always computed)."""
    from kinema.sampling.cache import CacheSpec

    _cache_args_common("WanVideoMagCache", start_step, end_step)
    return (CacheSpec("magcache", float(magcache_thresh), int(magcache_K)),)


def _settings_node(class_type, output, output_name, required, what, display):
    """A settings node whose feature Kinema lacks: registered so workflows load, refused by the sampler."""

    def fn(ctx, **kw):
        return ({"unsupported": what, **kw},)

    fn.__doc__ = f"{what} settings (not supported by Kinema yet: the sampler refuses them)."
    node(class_type, module=MODULE, category=CATEGORY, outputs=(output,), output_names=(output_name,),
         display_name=display, required=required)(fn)


FETA_INPUTS = {"weight": FLOAT(2.0, 0, 100), "start_percent": FLOAT(0.0, 0.0, 1.0), "end_percent": FLOAT(1.0, 0.0, 1.0)}


@node("WanVideoEnhanceAVideo", module=MODULE, category=CATEGORY, outputs=("FETAARGS",), output_names=("feta_args",),
      display_name="WanVideo Enhance-A-Video", required=FETA_INPUTS)
def enhance_a_video(ctx, weight, start_percent, end_percent):
    """Enhance-A-Video (kinema/sampling/enhance.py) for the sampler's feta_args."""
    from kinema.sampling.enhance import EnhanceVideo

    return (EnhanceVideo(float(weight), float(start_percent), float(end_percent)),)


# The wrapper's own T2V example (March 2025) takes its feta_args from HunyuanVideoWrapper's node; its single /
# double block switches choose among Hunyuan's two kinds of blocks, and Wan has one kind: all of them.
@node("HyVideoEnhanceAVideo", module="custom_nodes.ComfyUI-HunyuanVideoWrapper", category="HunyuanVideoWrapper",
      outputs=("FETAARGS",), output_names=("feta_args",),
      required={"weight": FETA_INPUTS["weight"], "single_blocks": BOOLEAN(True), "double_blocks": BOOLEAN(True),
                "start_percent": FETA_INPUTS["start_percent"], "end_percent": FETA_INPUTS["end_percent"]})
def hy_enhance_a_video(ctx, weight, start_percent, end_percent, single_blocks=True, double_blocks=True):
    if not (single_blocks or double_blocks):
        return (None,)  # on no block: off
    return enhance_a_video(ctx, weight, start_percent, end_percent)


@node("WanVideoSLG", module=MODULE, category=CATEGORY, outputs=("SLGARGS",), output_names=("slg_args",),
      display_name="WanVideo SLG",
      required={"blocks": STRING("10", tooltip="Blocks to skip in the uncond pass, e.g. 9,10"),
                "start_percent": FLOAT(0.1, 0.0, 1.0), "end_percent": FLOAT(1.0, 0.0, 1.0)})
def skip_layer_guidance(ctx, blocks, start_percent, end_percent):
    """Skip-layer guidance, the wrapper's form (kinema/sampling/skip_layers.py): blocks left out of the uncond pass."""
    from kinema.sampling.skip_layers import SkipLayers, parse_blocks

    return (SkipLayers(parse_blocks(blocks, "WanVideoSLG.blocks"), float(start_percent), float(end_percent)),)

@node("WanVideoContextOptions", module=MODULE, category=CATEGORY, outputs=("WANVIDCONTEXT",),
      output_names=("context_options",), display_name="WanVideo Context Options",
      required={"context_schedule": CHOICE(["uniform_standard", "uniform_looped", "static_standard"]),
                "context_frames": INT(81, 2, 1000, tooltip="pixel frames per window (4n + 1)"),
                "context_stride": INT(4, 4, 100), "context_overlap": INT(16, 4, 100), "freenoise": BOOLEAN(True)},
      optional={"fuse_method": CHOICE(["linear", "pyramid"], "linear"),
                "reference_latent": LINK("LATENT", tooltip="i2v: the image latent that is the first frame of every "
                                                           "window not starting at the video's (several: one per "
                                                           "section of the video)")})
def context_options(ctx, context_schedule, context_frames, context_stride, context_overlap, freenoise=True,
                    fuse_method="linear", reference_latent=None):
    """Context windows (kinema/sampling/windows.py) for the sampler's context_options; every window keeps the
    video's first frame as its anchor, or with reference_latent (a LATENT of encoded images, [n, z, T, h, w]:
    each one's first latent frame) takes that as its first frame where it does not start at the video's."""
    from kinema.pipeline.extras import named
    from kinema.sampling.windows import ContextWindows

    n = "WanVideoContextOptions"
    windows = named(n, ContextWindows, int(context_frames), int(context_stride), int(context_overlap),
                    context_schedule, fuse_method, bool(freenoise))
    reference = None
    if reference_latent is not None:
        samples = reference_latent.get("samples") if isinstance(reference_latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 5:
            raise KinemaError(f"{n}.reference_latent must be a video LATENT [n, 16, T, h, w] (WanVideoEncode of an "
                              "image); got " + (f"shape {list(samples.shape)}" if isinstance(samples, torch.Tensor)
                                                else type(reference_latent).__name__) + ".")
        reference = samples[:, :, 0].float()
    return (ContextOptions(windows, reference),)

# The experimental options Kinema lacks, each with the value that turns it off.
EXPERIMENTAL_OFF = {"video_attention_split_steps": "", "use_fresca": False, "use_tcfg": False, "raag_alpha": 0.0,
                    "bidirectional_sampling": False, "temporal_score_rescaling": False}


@node("WanVideoExperimentalArgs", module=MODULE, category=CATEGORY, outputs=("EXPERIMENTALARGS",),
      output_names=("exp_args",), display_name="WanVideo Experimental Args",
      required={"video_attention_split_steps": STRING(""), "cfg_zero_star": BOOLEAN(False),
                "use_zero_init": BOOLEAN(False), "zero_star_steps": INT(0, 0),
                "use_fresca": BOOLEAN(False), "fresca_scale_low": FLOAT(1.0, 0.0, 10.0),
                "fresca_scale_high": FLOAT(1.25, 0.0, 10.0), "fresca_freq_cutoff": INT(20, 0, 10000),
                "use_tcfg": BOOLEAN(False), "raag_alpha": FLOAT(0.0, 0.0, 10.0),
                "bidirectional_sampling": BOOLEAN(False), "temporal_score_rescaling": BOOLEAN(False),
                "tsr_k": FLOAT(0.95, 0.0, 100.0), "tsr_sigma": FLOAT(1.0, 0.0, 1.0)})
def experimental_args(ctx, cfg_zero_star=False, use_zero_init=False, zero_star_steps=0, **options):
    """CFG-Zero* (kinema/sampling/cfg_zero.py); the wrapper zero-inits steps 0..zero_star_steps (use_zero_init, with
    cfg_zero_star only). The other options must be off."""
    from kinema.sampling.cfg_zero import CFGZeroStar

    n = "WanVideoExperimentalArgs"
    for name, off in EXPERIMENTAL_OFF.items():
        value = options.get(name, off)
        if value != off and not (isinstance(off, str) and not str(value).strip()):
            raise unsupported(n, name, f"{name} {value!r}", f"set it to {off!r}")
    return ({"cfg_zero_star": CFGZeroStar(int(zero_star_steps) + 1 if use_zero_init else 0) if cfg_zero_star else None},)


# -- loaders ---------------------------------------------------------------------------------------
@node("WanVideoModelLoader", module=MODULE, category=CATEGORY, outputs=("WANVIDEOMODEL",), output_names=("model",),
      display_name="WanVideo Model Loader",
      required={"model": CHOICE(listed("diffusion_models"), tooltip="Loaded from models/diffusion_models"),
                "base_precision": CHOICE(list(PRECISIONS), "bf16"),
                "quantization": CHOICE(list(QUANTIZATIONS), "disabled", tooltip="fp8 storage of the block weights; "
                                       "'disabled' keeps an fp8 file's own layout and leaves others as they are"),
                "load_device": CHOICE(["main_device", "offload_device"], "offload_device",
                                      tooltip="Kinema places the DiT itself: on the GPU for sampling, in CPU memory "
                                              "between stages when offloading")},
      optional={"attention_mode": CHOICE(list(ATTENTION), "sdpa"),
                "compile_args": LINK("WANCOMPILEARGS"),
                "block_swap_args": LINK("BLOCKSWAPARGS"),
                "lora": LINK("WANVIDLORA"),
                "vram_management_args": LINK("VRAM_MANAGEMENTARGS"),
                "extra_model": LINK("VACEPATH"),
                "fantasytalking_model": LINK("FANTASYTALKINGMODEL"),
                "multitalk_model": LINK("MULTITALKMODEL"),
                "fantasyportrait_model": LINK("FANTASYPORTRAITMODEL"),
                "rms_norm_function": CHOICE(["default"])})
def model_loader(ctx, model, base_precision="bf16", quantization="disabled", load_device="offload_device",
                 attention_mode="sdpa", compile_args=None, block_swap_args=None, lora=None, vram_management_args=None,
                 extra_model=None, fantasytalking_model=None, multitalk_model=None, fantasyportrait_model=None,
                 rms_norm_function="default"):
    """The DiT, as a recipe: loaded (with its LoRAs merged, fp8, block swap, compile) when a sampler needs it."""
    n = "WanVideoModelLoader"
    refuse_links(n, locals(), {"vram_management_args": "DiffSynth VRAM management (use block_swap_args)",
                               "extra_model": "extra models (VACE, MTV Crafter)", "fantasytalking_model": "FantasyTalking",
                               "multitalk_model": "MultiTalk", "fantasyportrait_model": "FantasyPortrait"})
    for name, value, table in (("base_precision", base_precision, PRECISIONS), ("quantization", quantization, QUANTIZATIONS),
                               ("attention_mode", attention_mode, ATTENTION)):
        if value not in table:
            raise KinemaError(f"{n}.{name} {value!r} is not supported by Kinema; use one of {', '.join(table)}.")
    swap = block_swap_args or {}
    return (DiTRecipe(_path(ctx, "diffusion_models", model), dtype=PRECISIONS[base_precision],
                      quantization=QUANTIZATIONS[quantization], fp8_fast=quantization.endswith("_fast"),
                      loras=tuple((l["path"], float(l["strength"]) if l.get("merge", True) else (float(l["strength"]),))
                                  for l in lora or ()),  # a strength list: unmerged
                      attention=ATTENTION[attention_mode], blocks_to_swap=int(swap.get("blocks_to_swap", 0)),
                      prefetch_blocks=swap.get("prefetch_blocks") or None,
                      compile=(compile_args or {}).get("mode")),)


@node("WanVideoVAELoader", module=MODULE, category=CATEGORY, outputs=("WANVAE",), output_names=("vae",),
      display_name="WanVideo VAE Loader",
      required={"model_name": CHOICE(listed("vae"), tooltip="Loaded from models/vae")},
      optional={"precision": CHOICE(["fp16", "fp32", "bf16"], "bf16"),
                "compile_args": LINK("WANCOMPILEARGS"),
                "use_cpu_cache": BOOLEAN(False, tooltip="A memory option; Kinema tiles the VAE when it would not fit"),
                "verbose": BOOLEAN(False)})
def vae_loader(ctx, model_name, precision="bf16", compile_args=None, use_cpu_cache=False, verbose=False):
    """The Wan2.1 VAE, as a recipe."""
    refuse_links("WanVideoVAELoader", {"compile_args": compile_args}, {"compile_args": "compiling the VAE"})
    return (VAERecipe(_path(ctx, "vae", model_name), dtype=precision),)


@node("LoadWanVideoT5TextEncoder", module=MODULE, category=CATEGORY, outputs=("WANTEXTENCODER",),
      output_names=("wan_t5_model",), display_name="WanVideo T5 Text Encoder Loader",
      required={"model_name": CHOICE(listed("text_encoders"), tooltip="Loaded from models/text_encoders"),
                "precision": CHOICE(["fp32", "bf16"], "bf16")},
      optional={"load_device": CHOICE(["main_device", "offload_device"], "offload_device"),
                "quantization": CHOICE(["disabled", "fp8_e4m3fn"], "disabled")})
def t5_loader(ctx, model_name, precision="bf16", load_device="offload_device", quantization="disabled"):
    """The umT5-XXL encoder (its tokenizer inside the file, or beside it), as a recipe."""
    return (TextEncoderRecipe(_path(ctx, "text_encoders", model_name), dtype=precision,
                              quantization=None if quantization == "disabled" else quantization),)


@node("LoadWanVideoClipTextEncoder", module=MODULE, category=CATEGORY, outputs=("CLIP_VISION",),
      output_names=("wan_clip_vision",), display_name="WanVideo CLIP Text Encoder Loader",
      required={"model_name": CHOICE(listed("clip_vision", "text_encoders"), tooltip="Loaded from models/clip_vision"),
                "precision": CHOICE(["fp16", "fp32", "bf16"], "fp16")},
      optional={"load_device": CHOICE(["main_device", "offload_device"], "offload_device")})
def clip_loader(ctx, model_name, precision="fp16", load_device="offload_device"):
    """The CLIP ViT-H/14 vision tower (open-clip-xlm-roberta-large-vit-huge-14), as a recipe."""
    return (ClipVisionRecipe(_path(ctx, "clip_vision", model_name, "text_encoders"), dtype=precision),)


# -- encoders --------------------------------------------------------------------------------------
@node("WanVideoTextEncode", module=MODULE, category=CATEGORY, outputs=("WANVIDEOTEXTEMBEDS",),
      output_names=("text_embeds",), display_name="WanVideo TextEncode",
      required={"positive_prompt": STRING("", multiline=True), "negative_prompt": STRING("", multiline=True)},
      optional={"t5": LINK("WANTEXTENCODER"),
                "force_offload": BOOLEAN(True),
                "model_to_offload": LINK("WANVIDEOMODEL", tooltip="Kinema moves models itself; accepted and unused"),
                "use_disk_cache": BOOLEAN(False, tooltip="Kinema keeps a node's outputs between prompts instead"),
                "device": CHOICE(["gpu", "cpu"], "gpu", tooltip="Where the text encoder runs")})
def text_encode(ctx, positive_prompt, negative_prompt, t5=None, force_offload=True, model_to_offload=None,
                use_disk_cache=False, device="gpu"):
    """umT5 embeddings of the prompt and the negative prompt, encoded in one batch (as kinema.Pipeline does)."""
    n = "WanVideoTextEncode"
    if t5 is None:
        raise KinemaError(f"{n}.t5 is not connected; connect a LoadWanVideoT5TextEncoder.")
    from kinema.pipeline.job import prompt_sections

    sections = prompt_sections(positive_prompt, True, f"{n}.positive_prompt")  # windows come at the sampler
    if "[1]" in positive_prompt:
        raise unsupported(n, "positive_prompt", "EchoShot multi-shot prompts ('[1]', '[2]', ...)", "write one prompt")
    import re

    if re.search(r"\((.*?):([\d.]+)\)", positive_prompt):
        raise unsupported(n, "positive_prompt", "prompt weights '(text:1.2)'", "write the text without weights")
    recipe = t5 if device == "gpu" else TextEncoderRecipe(t5.path, t5.tokenizer, t5.dtype, t5.quantization, "cpu")
    encoder = ctx.models.text_encoder(recipe)
    with torch.no_grad():  # one batch: the prompt (each '|' section: prompt travel) and the negative prompt
        *pos, neg = encoder.encode([*sections, negative_prompt])  # [L_i, text_dim] each, unpadded
    return (TextEmbeds(pos[0][None], neg[None], positive_prompt, negative_prompt, tuple(p[None] for p in pos[1:])),)


def _image_to_model(image: torch.Tensor, name: str) -> torch.Tensor:
    """IMAGE [B, H, W, C] in [0, 1] -> its first frame [3, H, W] in [-1, 1] (what the engine's stages take)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise KinemaError(f"{name} is not an IMAGE batch [B, H, W, 3]; connect an image output.")
    return image[0, ..., :3].permute(2, 0, 1).float() * 2 - 1


@node("WanVideoClipVisionEncode", module=MODULE, category=CATEGORY, outputs=("WANVIDIMAGE_CLIPEMBEDS",),
      output_names=("image_embeds",), display_name="WanVideo ClipVision Encode",
      required={"clip_vision": LINK("CLIP_VISION"),
                "image_1": LINK("IMAGE", tooltip="Image to encode"),
                "strength_1": FLOAT(1.0, 0.0, 10.0, 0.001, tooltip="Additional clip embed multiplier"),
                "strength_2": FLOAT(1.0, 0.0, 10.0, 0.001, tooltip="Additional clip embed multiplier"),
                "crop": CHOICE(["center", "disabled"], tooltip="center: crop to a square first; disabled: the "
                               "official preprocessing (the whole image resized to 224x224)"),
                "combine_embeds": CHOICE(["average", "sum", "concat", "batch"],
                                         tooltip="How image_1's and image_2's tokens join (concat: flf2v)"),
                "force_offload": BOOLEAN(True)},
      optional={"image_2": LINK("IMAGE"),
                "negative_image": LINK("IMAGE", tooltip="image to use for uncond"),
                "tiles": INT(0, 0, 16, 2),
                "ratio": FLOAT(0.5, 0.0, 1.0)})
def clip_vision_encode(ctx, clip_vision, image_1, strength_1, strength_2, crop, combine_embeds, force_offload=True,
                       image_2=None, negative_image=None, tiles=0, ratio=0.5):
    """CLIP tokens of one image (i2v) or two (flf2v), for WanVideoImageToVideoEncode."""
    n = "WanVideoClipVisionEncode"
    refuse_links(n, {"negative_image": negative_image}, {"negative_image": "a separate image for the uncond branch"})
    if tiles:
        raise unsupported(n, "tiles", "tiled CLIP encoding", "set tiles to 0")
    if combine_embeds == "batch" and image_2 is not None:
        raise unsupported(n, "combine_embeds", "'batch'", "use concat (flf2v), average or sum")
    clip = ctx.models.clip_vision(clip_vision)
    tokens = []
    for image, strength in ((image_1, strength_1), (image_2, strength_2)):
        if image is None:
            continue
        x = _image_to_model(image, f"{n}.image_1")
        if crop == "center":
            side = min(x.shape[1:])
            top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
            x = x[:, top : top + side, left : left + side]
        with torch.no_grad():
            tokens.append(clip.encode(x[None].to(clip.device)) * strength)  # [1, 257, 1280]
    if len(tokens) == 1:
        out = tokens[0]
    elif combine_embeds == "concat":
        out = torch.cat(tokens, dim=1)  # flf2v: both frames' tokens, sequence-wise, as make_condition joins them
    else:
        out = torch.stack(tokens).mean(0) if combine_embeds == "average" else torch.stack(tokens).sum(0)
    return (ClipVisionOutput(out),)


def _size(node_name: str, width: int, height: int, num_frames: int) -> tuple[int, int, int]:
    """The run's size and frame count as the engine rounds them (multiples of 16, 4n + 1), so a condition built
    here fits the latents the sampler draws."""
    from kinema.pipeline.settings import round_frames, round_size

    w, h = round_size(int(width), int(height))
    return w, h, round_frames(int(num_frames))


@node("WanVideoImageToVideoEncode", module=MODULE, category=CATEGORY, outputs=("WANVIDIMAGE_EMBEDS",),
      output_names=("image_embeds",), display_name="WanVideo ImageToVideo Encode",
      required={"width": INT(832, 64, 8096, 8), "height": INT(480, 64, 8096, 8), "num_frames": INT(81, 1, 10000, 4),
                "noise_aug_strength": FLOAT(0.0, 0.0, 10.0, 0.001),
                "start_latent_strength": FLOAT(1.0, 0.0, 10.0, 0.001, tooltip="Multiplier of the first frame's latent"),
                "end_latent_strength": FLOAT(1.0, 0.0, 10.0, 0.001, tooltip="Multiplier of the last frame's latent"),
                "force_offload": BOOLEAN(True)},
      optional={"vae": LINK("WANVAE"),
                "clip_embeds": LINK("WANVIDIMAGE_CLIPEMBEDS", tooltip="Clip vision encoded image"),
                "start_image": LINK("IMAGE"), "end_image": LINK("IMAGE", tooltip="end frame (flf2v)"),
                "control_embeds": LINK("WANVIDIMAGE_EMBEDS"),
                "fun_or_fl2v_model": BOOLEAN(True, tooltip="The official FLF2V / Fun frame layout (the only one Kinema has)"),
                "temporal_mask": LINK("MASK"), "extra_latents": LINK("LATENT"),
                "tiled_vae": BOOLEAN(False, tooltip="Kinema tiles the VAE whenever the untiled one would not fit"),
                "add_cond_latents": LINK("ADD_COND_LATENTS"),
                "augment_empty_frames": FLOAT(0.0, 0.0, 10.0),
                "empty_frame_pad_image": LINK("IMAGE")})
def image_to_video_encode(ctx, width, height, num_frames, noise_aug_strength=0.0, start_latent_strength=1.0,
                          end_latent_strength=1.0, force_offload=True, vae=None, clip_embeds=None, start_image=None,
                          end_image=None, control_embeds=None, fun_or_fl2v_model=True, temporal_mask=None,
                          extra_latents=None, tiled_vae=False, add_cond_latents=None, augment_empty_frames=0.0,
                          empty_frame_pad_image=None):
    """The i2v / flf2v condition: the known frames' VAE latents with their frame mask (kinema.pipeline.conditioning's
    build_condition) and the CLIP tokens. With no image, the empty condition an i2v-type model runs t2v from."""
    from kinema.memory.vae_tiling import TiledVAE
    from kinema.pipeline.conditioning import build_condition, fit_last_frame

    n = "WanVideoImageToVideoEncode"
    refuse_links(n, locals(), {"control_embeds": "Fun control", "temporal_mask": "temporal masks",
                               "extra_latents": "extra reference latents", "add_cond_latents": "additional cond latents",
                               "empty_frame_pad_image": "padding images"})
    if noise_aug_strength:
        raise unsupported(n, "noise_aug_strength", "noise augmentation", "set it to 0")
    if augment_empty_frames:
        raise unsupported(n, "augment_empty_frames", "augmenting empty frames", "set it to 0")
    if end_image is not None and not fun_or_fl2v_model:
        raise unsupported(n, "fun_or_fl2v_model", "the extra end-frame latent layout", "set it to true (official FLF2V)")
    if vae is None:
        raise KinemaError(f"{n}.vae is not connected; connect a WanVideoVAELoader.")
    w, h, frames = _size(n, width, height, num_frames)
    known = {}
    if start_image is not None:
        known[0] = _image_to_model(start_image, f"{n}.start_image")
    if end_image is not None:
        last = _image_to_model(end_image, f"{n}.end_image")
        known[frames - 1] = fit_last_frame(known[0], last) if 0 in known else last
    if len(known) == 2 and frames < 5:
        raise KinemaError(f"{n}.num_frames {frames}: a first and a last frame need at least 5 frames.")
    with torch.no_grad():
        y = build_condition(TiledVAE(ctx.models.vae(vae)), known, frames, h, w)  # [1, 4 + 16, T, h/8, w/8]
    if start_latent_strength != 1.0:
        y[:, 4:, :1] *= start_latent_strength
    if end_latent_strength != 1.0:
        y[:, 4:, -1:] *= end_latent_strength
    clip = clip_embeds.tokens if clip_embeds is not None else None
    return (ImageEmbeds(w, h, frames, y=y, clip_fea=clip, extra={"vae": vae}),)


@node("WanVideoImageClipEncode", module=MODULE, category=CATEGORY, outputs=("WANVIDIMAGE_EMBEDS",),
      output_names=("image_embeds",), display_name="WanVideo ImageClip Encode (Deprecated)",
      required={"image": LINK("IMAGE"), "vae": LINK("WANVAE"),
                "generation_width": INT(832, 64, 8096, 8), "generation_height": INT(480, 64, 8096, 8),
                "num_frames": INT(81, 1, 10000, 4)},
      optional={"clip_vision": LINK("CLIP_VISION"),
                "clip": LINK("CLIP_VISION", tooltip="The name this input had until 2025 (older workflows)"),
                "force_offload": BOOLEAN(True), "noise_aug_strength": FLOAT(0.0, 0.0, 10.0, 0.001),
                "latent_strength": FLOAT(1.0, 0.0, 10.0, 0.001), "clip_embed_strength": FLOAT(1.0, 0.0, 10.0, 0.001),
                "adjust_resolution": BOOLEAN(True, tooltip="The official i2v rule: the image's aspect ratio at about "
                                                          "width x height pixels")})
def image_clip_encode(ctx, image, vae, generation_width, generation_height, num_frames, clip_vision=None, clip=None,
                      force_offload=True, noise_aug_strength=0.0, latent_strength=1.0, clip_embed_strength=1.0,
                      adjust_resolution=True):
    """The wrapper's first i2v node (kept by the wrapper for old workflows): CLIP tokens and the i2v condition in
    one, as WanVideoClipVisionEncode (crop disabled) then WanVideoImageToVideoEncode."""
    from kinema.pipeline.conditioning import target_size

    n = "WanVideoImageClipEncode"
    recipe = clip_vision if clip_vision is not None else clip
    if recipe is None:
        raise KinemaError(f"{n}.clip_vision is not connected; connect a LoadWanVideoClipTextEncoder.")
    if latent_strength != 1.0:
        raise unsupported(n, "latent_strength", "scaling the condition video", "set it to 1")
    width, height = generation_width, generation_height
    if adjust_resolution:
        height, width = target_size(image.shape[1], image.shape[2], generation_width * generation_height)
    (tokens,) = clip_vision_encode(ctx, recipe, image, clip_embed_strength, 1.0, "disabled", "concat")
    (embeds,) = image_to_video_encode(ctx, width, height, num_frames, noise_aug_strength, vae=vae,
                                      clip_embeds=tokens, start_image=image)
    return (embeds,)


@node("WanVideoEmptyEmbeds", module=MODULE, category=CATEGORY, outputs=("WANVIDIMAGE_EMBEDS",),
      output_names=("image_embeds",), display_name="WanVideo Empty Embeds",
      required={"width": INT(832, 64, 8096, 8), "height": INT(480, 64, 8096, 8), "num_frames": INT(81, 1, 10000, 4)},
      optional={"control_embeds": LINK("WANVIDIMAGE_EMBEDS"), "extra_latents": LINK("LATENT")})
def empty_embeds(ctx, width, height, num_frames, control_embeds=None, extra_latents=None):
    """The size of a text-to-video run, with no image condition."""
    refuse_links("WanVideoEmptyEmbeds", locals(), {"control_embeds": "Fun control", "extra_latents": "extra latents"})
    w, h, frames = _size("WanVideoEmptyEmbeds", width, height, num_frames)
    return (ImageEmbeds(w, h, frames),)


# -- sampling --------------------------------------------------------------------------------------
def _visit(part, name: str = "dit"):
    """A context placing a cached DiT on its run device for the stage (it lives in CPU memory between stages when
    its runtime offloads), with its block swap parked and unparked."""
    from kinema.memory.offload import Offloader

    rt = part.runtime
    if not rt.offload:
        return nullcontext()
    models = SimpleNamespace(dit=part.model, vae=None, text_encoder=None, clip=None, placement=part.placement)
    return Offloader(models, rt.device).visit(name)


def _empty_condition_vae(ctx, recipe: DiTRecipe):
    """The VAE an i2v-type DiT's empty condition is encoded with when the graph gave none (WanVideoEmptyEmbeds):
    the one in the DiT's own checkpoint folder (the built-in model's), as kinema.Pipeline uses."""
    p = Path(recipe.path)
    for folder in (p.parent / "vae", p / "vae", p.parent.parent / "vae"):
        if folder.is_dir():
            return ctx.models.vae(VAERecipe(str(folder)))
    return None


def _extras(n: str, config, cfg: float, feta_args, slg_args, experimental_args, riflex_freq_index):
    """The sampler's feta_args / slg_args / experimental_args / riflex_freq_index as Kinema's guidance extras. As in
    the wrapper, skip-layer guidance does nothing without guidance (cfg 1): it is dropped with a warning."""
    from kinema.pipeline.extras import parse_extras
    from kinema.sampling.enhance import EnhanceVideo
    from kinema.sampling.skip_layers import SkipLayers

    for name, value, kind in (("feta_args", feta_args, EnhanceVideo), ("slg_args", slg_args, SkipLayers),
                              ("experimental_args", experimental_args, dict)):
        if value is not None and not isinstance(value, kind):
            raise KinemaError(f"{n}.{name} must come from its settings node, got {type(value).__name__}.")
    if slg_args is not None and cfg == 1.0:
        log.warning("%s: skip-layer guidance skips blocks of the uncond pass, and cfg 1 runs none: ignored", n)
        slg_args = None
    zero = (experimental_args or {}).get("cfg_zero_star")
    try:
        return parse_extras(skip_layers=slg_args, cfg_zero_star=zero, enhance=feta_args, riflex=int(riflex_freq_index),
                            guided=cfg != 1.0, dit_config=config)
    except KinemaError as e:
        where = "slg_args" if slg_args is not None and "skip-layer" in str(e) else "riflex_freq_index"
        raise KinemaError(f"{n}.{where}: {e}") from None


SAMPLER_UNSUPPORTED = {
    "flowedit_args": "FlowEdit", "loop_args": "latent-shift looping",
    "sigmas": "custom sigmas", "unianimate_poses": "UniAnimate", "fantasytalking_embeds": "FantasyTalking",
    "uni3c_embeds": "Uni3C", "multitalk_embeds": "MultiTalk", "freeinit_args": "FreeInit",
}


@node("WanVideoSampler", module=MODULE, category=CATEGORY, outputs=("LATENT", "LATENT"),
      output_names=("samples", "denoised_samples"), display_name="WanVideo Sampler",
      required={"model": LINK("WANVIDEOMODEL"), "image_embeds": LINK("WANVIDIMAGE_EMBEDS"),
                "steps": INT(30, 1, 1000), "cfg": FLOAT(6.0, 0.0, 30.0, 0.01), "shift": FLOAT(5.0, 0.0, 1000.0, 0.01),
                "seed": INT(0, 0, SEED_MAX, control_after_generate=True),
                "force_offload": BOOLEAN(True, tooltip="Kinema moves the DiT off the GPU after sampling when offloading"),
                "scheduler": CHOICE(list(SCHEDULERS), "unipc", tooltip="unipc and dpm++: the official Wan2.1 "
                                    "solvers and schedules; euler: Euler steps on Wan's default schedule; "
                                    "flowmatch_distill and lcm: for step-distilled models (4-8 steps, cfg 1)"),
                "riflex_freq_index": INT(0, 0, 1000, tooltip="RIFLEx frequency index for videos longer than "
                                         "trained; 0 = off (the wrapper suggests 6)")},
      optional={"text_embeds": LINK("WANVIDEOTEXTEMBEDS"),
                "samples": LINK("LATENT", tooltip="init latents for video2video"),
                "denoise_strength": FLOAT(1.0, 0.0, 1.0, 0.01),
                "feta_args": LINK("FETAARGS"), "context_options": LINK("WANVIDCONTEXT"), "cache_args": LINK("CACHEARGS"),
                "flowedit_args": LINK("FLOWEDITARGS"),
                "batched_cfg": BOOLEAN(False, tooltip="cond and uncond as one batch"),
                "slg_args": LINK("SLGARGS"),
                "rope_function": CHOICE(["default", "comfy", "comfy_chunked"], "comfy",
                                        tooltip="The wrapper's RoPE implementations; Kinema has one, equal to all"),
                "loop_args": LINK("LOOPARGS"), "experimental_args": LINK("EXPERIMENTALARGS"), "sigmas": LINK("SIGMAS"),
                "unianimate_poses": LINK("UNIANIMATE_POSE"), "fantasytalking_embeds": LINK("FANTASYTALKING_EMBEDS"),
                "uni3c_embeds": LINK("UNI3C_EMBEDS"), "multitalk_embeds": LINK("MULTITALK_EMBEDS"),
                "freeinit_args": LINK("FREEINITARGS"),
                "start_step": INT(0, 0, 10000), "end_step": INT(-1, -1, 10000),
                "add_noise_to_samples": BOOLEAN(False, tooltip="Kinema always noises input samples to the start step")})
def sampler(ctx, model, image_embeds, steps, cfg, shift, seed, force_offload=True, scheduler="unipc",
            riflex_freq_index=0, text_embeds=None, samples=None, denoise_strength=1.0, cache_args=None,
            batched_cfg=False, rope_function="comfy", start_step=0, end_step=-1, add_noise_to_samples=False,
            feta_args=None, slg_args=None, experimental_args=None, context_options=None, **links):
    """Denoise with the guided DiT through Kinema's sampler loop (the stages kinema.Pipeline runs: the same
    settings give the same latents)."""
    from kinema.memory.vae_tiling import TiledVAE
    from kinema.pipeline.conditioning import Condition, empty_condition
    from kinema.pipeline.extras import train_latent_frames
    from kinema.pipeline.guidance import guidance_for
    from kinema.pipeline.job import prompt_sections
    from kinema.pipeline.latents import prepare_latents
    from kinema.pipeline.prompts import Prompts, pad_context
    from kinema.pipeline.sample import sample_latents
    from kinema.pipeline.settings import Geometry, resolve_settings
    from kinema.sampling.cache import make_cache
    from kinema.sampling.windows import travel_warning

    n = "WanVideoSampler"
    for name, what in SAMPLER_UNSUPPORTED.items():
        if links.get(name) is not None:
            raise unsupported(n, name, what, f"disconnect {name}")
    unknown = set(links) - set(SAMPLER_UNSUPPORTED)
    if unknown:
        raise KinemaError(f"{n} has no input {sorted(unknown)[0]!r}.")
    if scheduler not in SCHEDULERS:
        raise KinemaError(f"{n}.scheduler {scheduler!r} is not supported by Kinema; use one of {', '.join(SCHEDULERS)}.")
    if start_step or end_step != -1:
        raise unsupported(n, "start_step" if start_step else "end_step", "sampling part of the schedule",
                          "leave start_step 0 and end_step -1 (use samples with denoise_strength for a part-way start)")
    if text_embeds is None:
        raise KinemaError(f"{n}.text_embeds is not connected; connect a WanVideoTextEncode.")
    if not isinstance(image_embeds, ImageEmbeds):
        raise KinemaError(f"{n}.image_embeds must come from WanVideoEmptyEmbeds or WanVideoImageToVideoEncode.")
    if samples is None and denoise_strength < 1.0:
        raise KinemaError(f"{n}.denoise_strength {denoise_strength} needs samples (the latents to start from); "
                          "connect samples or set denoise_strength to 1.")
    if seed > 2**63 - 1:
        raise KinemaError(f"{n}.seed {seed} is above Kinema's largest seed {2**63 - 1}; use a smaller one.")

    part = ctx.models.dit(model)
    extras = _extras(n, part.model.config, float(cfg), feta_args, slg_args, experimental_args, riflex_freq_index)
    dit, rt, cfg_dit = part.model, part.runtime, part.model.config
    e = image_embeds
    s = resolve_settings("t2v", {}, prompt=text_embeds.prompt, negative_prompt=text_embeds.negative_prompt,
                         size=(e.width, e.height), frame_num=e.num_frames, steps=int(steps), shift=float(shift),
                         guide_scale=float(cfg), seed=int(seed), solver=SCHEDULERS[scheduler],
                         denoise=float(denoise_strength) if samples is not None else 1.0)
    geometry = Geometry(patch=tuple(cfg_dit.patch_size), z_dim=cfg_dit.out_dim)
    device = rt.device
    if s.guided and text_embeds.negative is None:
        raise KinemaError(f"{n}: cfg {cfg} needs the negative prompt's embeddings; text_embeds has none.")
    uncond = pad_context([text_embeds.negative[0].to(device)], cfg_dit.text_len) if s.guided else None
    prompts = [Prompts(pad_context([p[0].to(device)], cfg_dit.text_len), uncond)
               for p in (text_embeds.positive, *text_embeds.travel)]  # one per prompt-travel section
    if len(prompts) > 1 and context_options is None:
        raise KinemaError(f"{n}: text_embeds holds {len(prompts)} '|'-separated prompts (prompt travel), which are "
                          "spread over context windows; connect context_options (WanVideoContextOptions) or write "
                          "one prompt.")

    image_dit = cfg_dit.in_dim > geometry.z_dim
    if e.y is not None and not image_dit:
        raise KinemaError(f"{n}: this DiT is a text-to-video model ({cfg_dit.in_dim} input channels); encoded images "
                          "need an image-to-video model. Use WanVideoEmptyEmbeds.")
    if e.y is not None:
        clip = e.clip_fea if e.clip_fea is not None else e.y.new_zeros(1, 1, cfg_dit.image_dim)
        condition = Condition(clip.to(device), e.y.to(device))
    elif image_dit:  # an i2v-type DiT running t2v (condition dropout: Wan-Fun, Kinema's built-in model)
        vae = _empty_condition_vae(ctx, model)
        if vae is None:
            raise KinemaError(f"{n}: this DiT is an image-to-video model and WanVideoEmptyEmbeds gives no image "
                              "condition; use WanVideoImageToVideoEncode (with a vae; no start_image for t2v).")
        with torch.no_grad():
            empty = empty_condition(cfg_dit, TiledVAE(vae), s.frame_num, s.height, s.width)
        condition = Condition(empty.clip_fea.to(device), empty.y.to(device))
    else:
        condition = Condition()

    preview = None
    if ctx.preview:
        from kinema.pipeline.preview import LatentPreview

        vae = ctx.models.vae(e.extra["vae"]) if e.extra.get("vae") else _empty_condition_vae(ctx, model)
        preview = LatentPreview(vae) if vae is not None else None
    latents = None
    if samples is not None:
        latents = samples["samples"]
        if latents.ndim == 5:
            latents = latents[0]
    if context_options is not None and not isinstance(context_options, ContextOptions):
        raise KinemaError(f"{n}.context_options must come from WanVideoContextOptions.")
    windows = None if context_options is None else context_options.windows
    if windows is not None and (warning := travel_warning(
            windows, s.latent_shape(geometry)[1], prompt_sections(text_embeds.prompt, True), s.steps,
            f"{n}: text_embeds' prompt")):
        log.warning("%s", warning)
    if windows is not None and context_options.reference is not None:
        ref = context_options.reference
        if e.y is None:  # as the wrapper: a reference replaces a known first frame, and there is none
            log.warning("%s: context_options' reference_latent is for an image condition (WanVideoImageToVideoEncode); "
                        "this run has none, so it is not used.", n)
        elif tuple(ref.shape[1:]) != (want := (e.y.shape[1] - 4, *e.y.shape[-2:])):
            raise KinemaError(f"{n}: context_options' reference_latent is {list(ref.shape[1:])} per image, but this "
                              f"run's latents are {list(want)}; encode the reference at {s.width}x{s.height}.")
        else:
            condition = Condition(condition.clip_fea, condition.y, ref.to(device))
    start = prepare_latents(s, geometry, device, latents=latents, windows=windows)
    cache = make_cache(cache_args, dit, s.width * s.height)
    total = s.steps - start.start_step

    def callback(info):
        ctx.progress(info.step - start.start_step + 1, total, info.preview()[0] if preview is not None else None)

    with _visit(part):
        x0 = sample_latents(dit, prompts, condition, start, s, guidance=guidance_for(bool(batched_cfg)), extras=extras,
                            windows=windows, hooks=part.lora_hooks,
                            train_frames=train_latent_frames(part.info.sample_defaults), cache=cache,
                            callback=callback, cancel=ctx.cancel, preview=preview, progress=False,
                            attention=rt.attention)
    out = {"samples": x0.cpu()}  # [1, 16, T, h, w]
    return (out, dict(out))


# -- VAE -------------------------------------------------------------------------------------------
def _tiled(node_name: str, vae, enable, tile_x, tile_y, tile_stride_x, tile_stride_y):
    """The VAE, tiled as asked: the wrapper's tile and stride in pixels -> Kinema's tile and overlap (latent pixels);
    untiled asks become Kinema's 'auto' (tiles only when the whole frame would not fit: the same numbers when it fits)."""
    from kinema.memory.vae_tiling import TiledVAE, parse_vae_tile

    if not enable:
        return TiledVAE(vae)
    if tile_x <= tile_stride_x or tile_y <= tile_stride_y:
        raise KinemaError(f"{node_name}: the tile ({tile_x}x{tile_y}) must be larger than its stride "
                          f"({tile_stride_x}x{tile_stride_y}).")
    ratio = vae.spatial_ratio
    overlap = max(1, min(tile_x - tile_stride_x, tile_y - tile_stride_y) // ratio)
    return TiledVAE(vae, parse_vae_tile((tile_x // ratio * ratio, tile_y // ratio * ratio), ratio), overlap=overlap)


TILE_INPUTS = {"enable_vae_tiling": BOOLEAN(False, tooltip="Decode in overlapping spatial tiles (less memory)"),
               "tile_x": INT(272, 40, 2048, 8, tooltip="Tile width in pixels"),
               "tile_y": INT(272, 40, 2048, 8, tooltip="Tile height in pixels"),
               "tile_stride_x": INT(144, 32, 2040, 8, tooltip="Tile stride in pixels (tile - stride = overlap)"),
               "tile_stride_y": INT(128, 32, 2040, 8, tooltip="Tile stride in pixels")}


@node("WanVideoDecode", module=MODULE, category=CATEGORY, outputs=("IMAGE",), output_names=("images",),
      display_name="WanVideo Decode",
      required={"vae": LINK("WANVAE"), "samples": LINK("LATENT"), **TILE_INPUTS},
      optional={"normalization": CHOICE(["default"], tooltip="default: clamp [-1, 1] to [0, 1]")})
def decode(ctx, vae, samples, enable_vae_tiling=False, tile_x=272, tile_y=272, tile_stride_x=144, tile_stride_y=128,
           normalization="default"):
    """Latents -> frames (IMAGE [F, H, W, 3] in [0, 1]) through the engine's decode stage."""
    from kinema.pipeline.sample import decode_latents

    latents = samples["samples"]
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise KinemaError(f"WanVideoDecode.samples has shape {list(latents.shape)}; it takes one video's latents "
                          "[1, 16, T, h, w].")
    tiled = _tiled("WanVideoDecode", ctx.models.vae(vae), enable_vae_tiling, tile_x, tile_y, tile_stride_x, tile_stride_y)
    with torch.no_grad():
        video = decode_latents(tiled, latents.float())  # [3, F, H, W] in [-1, 1]
    return (((video.float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).contiguous(),)


@node("WanVideoEncode", module=MODULE, category=CATEGORY, outputs=("LATENT",), output_names=("samples",),
      display_name="WanVideo Encode",
      required={"vae": LINK("WANVAE"), "image": LINK("IMAGE"), **TILE_INPUTS},
      optional={"noise_aug_strength": FLOAT(0.0, 0.0, 10.0, 0.001),
                "latent_strength": FLOAT(1.0, 0.0, 10.0, 0.001, tooltip="Additional latent multiplier"),
                "mask": LINK("MASK")})
def encode(ctx, vae, image, enable_vae_tiling=False, tile_x=272, tile_y=272, tile_stride_x=144, tile_stride_y=128,
           noise_aug_strength=0.0, latent_strength=1.0, mask=None):
    """Frames (IMAGE [F, H, W, 3]) -> latents {"samples": [1, 16, T, h, w]}, for video2video."""
    n = "WanVideoEncode"
    refuse_links(n, {"mask": mask}, {"mask": "latent noise masks"})
    if noise_aug_strength:
        raise unsupported(n, "noise_aug_strength", "noise augmentation", "set it to 0")
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise KinemaError(f"{n}.image is not an IMAGE batch [F, H, W, 3].")
    f, h, w = image.shape[:3]
    if h % 16 or w % 16:
        raise KinemaError(f"{n}.image is {w}x{h}; the VAE and DiT need multiples of 16: resize it first.")
    keep = 1 + (f - 1) // 4 * 4
    if keep != f:
        log.warning("%s: %d frames is not 4n+1; encoding the first %d", n, f, keep)
    video = image[:keep, ..., :3].permute(3, 0, 1, 2).float() * 2 - 1  # [3, F, H, W] in [-1, 1]
    tiled = _tiled(n, ctx.models.vae(vae), enable_vae_tiling, tile_x, tile_y, tile_stride_x, tile_stride_y)
    with torch.no_grad():
        latents = tiled.encode(video[None].to(tiled.device))  # [1, 16, T, h/8, w/8]
    if latent_strength != 1.0:
        latents = latents * latent_strength
    return ({"samples": latents.float().cpu()},)


# -- ComfyUI-KJNodes' GetImageSizeAndCount, which the wrapper's example workflows pass frames through --------
@node("GetImageSizeAndCount", module="custom_nodes.comfyui-kjnodes", category="KJNodes/image",
      outputs=("IMAGE", "INT", "INT", "INT"), output_names=("image", "width", "height", "count"),
      required={"image": LINK("IMAGE")})
def image_size_and_count(ctx, image):
    """The image batch unchanged, with its width, height and frame count."""
    return NodeOutput((image, int(image.shape[2]), int(image.shape[1]), int(image.shape[0])),
                      {"text": [f"{image.shape[0]}x{image.shape[2]}x{image.shape[1]}"]})

