"""Loading the Wan2.1 VAE from official, ComfyUI or diffusers checkpoints.

The format is told from the key names and the architecture (width, latent
channels, stages, temporal downsampling) is read off the encoder's weights, so
small or retrained VAEs load without a config file. Every key and shape is
checked before any weight is read; a checkpoint either loads whole or not at all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from kinema.errors import CheckpointError
from kinema.loading.files import TensorSource, checkpoint_files, read_config
from kinema.loading.identify import identify, wrong_component_message
from kinema.loading.keymap import KeyMap, identity_map
from kinema.loading.materialize import materialize
from kinema.models.vae import WanVAE

__all__ = ["load_vae", "WanVAE", "OFFICIAL_MAP", "diffusers_map", "infer_config"]

# Tried in order inside a folder: official release, ComfyUI, diffusers component (a pipeline's vae/).
CANDIDATES = (
    "Wan2.1_VAE.pth",
    "wan_2.1_vae.safetensors",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
# Wrappers that training tools and single-file pipeline checkpoints put around the VAE's keys.
PREFIXES = ("first_stage_model.", "vae.")

OFFICIAL_MAP = identity_map("official Wan2.1 VAE", strip_prefixes=PREFIXES)

# (diffusers suffix pattern, official suffix) for a residual block, and for modules whose names agree.
_WB = r"(?P<p>weight|bias)"
_RESNET = (
    (r"norm1\.gamma", "residual.0.gamma"),
    (rf"conv1\.{_WB}", r"residual.2.\g<p>"),
    (r"norm2\.gamma", "residual.3.gamma"),
    (rf"conv2\.{_WB}", r"residual.6.\g<p>"),
    (rf"conv_shortcut\.{_WB}", r"shortcut.\g<p>"),
)
_SAME = ((r"(?P<rest>(resample\.1|time_conv|to_qkv|proj)\.(weight|bias)|norm\.gamma)", r"\g<rest>"),)


def _under(src_prefix: str, dst_prefix: str, suffixes) -> list[tuple[str, str]]:
    return [(src_prefix + s, dst_prefix + d) for s, d in suffixes]


def diffusers_map(num_stages: int, num_res_blocks: int) -> KeyMap:
    """diffusers AutoencoderKLWan names -> official names.

    The encoder's `down_blocks` are flat like the official `downsamples`; the
    decoder's `up_blocks.I.resnets.J` / `up_blocks.I.upsamplers.0` are nested,
    and stage I starts at official index I * (num_res_blocks + 2).
    """
    side = r"(?P<side>encoder|decoder)"
    rules = [
        (rf"{side}\.conv_in\.{_WB}", r"\g<side>.conv1.\g<p>"),
        *_under(r"encoder\.down_blocks\.(?P<n>\d+)\.", r"encoder.downsamples.\g<n>.", _RESNET + _SAME),
        *_under(rf"{side}\.mid_block\.resnets\.0\.", r"\g<side>.middle.0.", _RESNET),
        *_under(rf"{side}\.mid_block\.attentions\.0\.", r"\g<side>.middle.1.", _SAME),
        *_under(rf"{side}\.mid_block\.resnets\.1\.", r"\g<side>.middle.2.", _RESNET),
        (rf"{side}\.norm_out\.gamma", r"\g<side>.head.0.gamma"),
        (rf"{side}\.conv_out\.{_WB}", r"\g<side>.head.2.\g<p>"),
        (rf"quant_conv\.{_WB}", r"conv1.\g<p>"),
        (rf"post_quant_conv\.{_WB}", r"conv2.\g<p>"),
    ]
    for i in range(num_stages):
        first = i * (num_res_blocks + 2)  # each stage: num_res_blocks + 1 res blocks, then the upsampler
        for j in range(num_res_blocks + 1):
            rules += _under(rf"decoder\.up_blocks\.{i}\.resnets\.{j}\.", f"decoder.upsamples.{first + j}.", _RESNET)
        upsampler = f"decoder.upsamples.{first + num_res_blocks + 1}."
        rules += _under(rf"decoder\.up_blocks\.{i}\.upsamplers\.0\.", upsampler, _SAME)
    return KeyMap("diffusers AutoencoderKLWan", tuple(rules), strip_prefixes=PREFIXES)


def _keymap_for(keys: list[str]) -> KeyMap:
    bare = [OFFICIAL_MAP.strip(k) for k in keys]
    if not any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "quant_conv.", "post_quant_conv.")) for k in bare):
        return OFFICIAL_MAP
    # The decoder's nesting is read off the keys: up_blocks.I.resnets.J for I < stages, J <= num_res_blocks.
    found = [re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", k) for k in bare]
    found = [(int(m[1]), int(m[2])) for m in found if m]
    stages = 1 + max((i for i, _ in found), default=0)
    return diffusers_map(stages, max((j for _, j in found), default=0))


def infer_config(shapes: dict[str, tuple[int, ...]], name: str) -> dict:
    """The WanVAE constructor arguments, read off the official-named weights of the encoder.

    The encoder's `downsamples` are walked in order: residual blocks (their
    output width gives the stage's multiplier), attention blocks (the scale they
    sit at), and a resampler closing every stage but the last (3d when it has a
    time_conv). The decoder mirrors the encoder; its shapes are checked later.
    """
    for key in ("encoder.conv1.weight", "conv2.weight"):
        if key not in shapes:
            raise CheckpointError(f"{name}: the VAE weight '{key}' is missing, so its architecture cannot be read.")
    dim, z_dim = shapes["encoder.conv1.weight"][0], shapes["conv2.weight"][0]
    stages: list[list[int]] = [[]]
    temporal, attn_scales, scale = [], [], 1.0
    i = 0
    while True:
        block = f"encoder.downsamples.{i}."
        if block + "residual.2.weight" in shapes:
            stages[-1].append(shapes[block + "residual.2.weight"][0])
        elif block + "to_qkv.weight" in shapes:
            attn_scales.append(scale)
        elif block + "resample.1.weight" in shapes:
            temporal.append(block + "time_conv.weight" in shapes)
            stages.append([])
            scale /= 2.0
        else:
            break
        i += 1
    widths = [s[-1] if s else 0 for s in stages]
    if not stages[0] or any(len(s) != len(stages[0]) for s in stages) or any(w % dim for w in widths):
        raise CheckpointError(
            f"{name}: the encoder's blocks (encoder.downsamples.0..{i - 1}) do not form Wan2.1 VAE stages of "
            f"equal depth with widths a multiple of {dim}; found stages of widths {widths}. "
            "This is not a Wan2.1 VAE checkpoint or it is incomplete; nothing was loaded."
        )
    return dict(
        dim=dim,
        z_dim=z_dim,
        dim_mult=[w // dim for w in widths],
        num_res_blocks=len(stages[0]),
        attn_scales=sorted(set(attn_scales)),
        temporal_downsample=temporal,
    )


def _latent_stats(folder: Path, z_dim: int) -> tuple[list | None, list | None]:
    """`latents_mean`/`latents_std` from a diffusers config.json beside the weights, if there is one."""
    config_path = folder / "config.json"
    try:
        config = read_config(folder)
    except CheckpointError:
        return None, None  # not ours to judge: in official folders config.json belongs to the DiT
    if config.get("latents_mean") is None or config.get("latents_std") is None:
        return None, None
    mean, std = config["latents_mean"], config["latents_std"]
    if len(mean) != z_dim or len(std) != z_dim:
        raise CheckpointError(
            f"{config_path}: latents_mean/latents_std have {len(mean)}/{len(std)} values but the VAE has "
            f"{z_dim} latent channels. Fix or remove them from the config."
        )
    return mean, std


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> WanVAE:
    """Load a Wan2.1 VAE from a file, an official Wan2.1 folder, or a diffusers pipeline/component folder.

    Weights are cast to `dtype` and the model computes in it (fp32 or bf16).
    """
    files = checkpoint_files(path, "VAE", CANDIDATES, subfolder="vae", kind="vae")
    source = TensorSource(files)
    keys = source.keys()
    found = identify(keys)
    if found != "vae":
        raise CheckpointError(wrong_component_message(source.name, found, "vae"))
    plan = _keymap_for(keys).plan(source)
    shapes = {name: source.shape(srcs[0]) for name, srcs in plan.sources.items()}
    config = infer_config(shapes, source.name)
    mean, std = _latent_stats(files[0].parent, config["z_dim"])
    with torch.device("meta"):
        model = WanVAE(**config, latents_mean=mean, latents_std=std)
    return materialize(model, plan, source, lambda _key: dtype, device, what="Wan2.1 VAE")
