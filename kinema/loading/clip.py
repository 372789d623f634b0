"""Loading Wan2.1's CLIP vision tower from any of the formats it is shipped in.

Formats, told apart by key names (one `KeyMap` each):
  - "wan": the official `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`
    (`visual.*` with Kinema's names, plus a text tower `textual.*` and `log_scale`);
  - "open_clip": open-clip's names (`visual.conv1`, `visual.transformer.resblocks.N.*`);
  - "hf": Hugging Face `CLIPVisionModel` names, with or without the `vision_model.`
    prefix (ComfyUI's `clip_vision_h.safetensors`, diffusers' `image_encoder/`).

Everything a full CLIP file holds beyond the vision tower's penultimate output
(text tower, the last block, post_norm, head / projection) is listed as ignored
on purpose; any other key is an error, so a file of another model is never
half-loaded.

The architecture is read off the tensor shapes. The head count is not in the
shapes: it comes from `num_heads=`, else from a Hugging Face `config.json`
beside the file, else from a default rule (`default_num_heads`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from kinema.encoders.image import ClipVisionEncoder
from kinema.errors import CheckpointError
from kinema.loading.files import TensorSource, checkpoint_files, read_config
from kinema.loading.identify import identify, wrong_component_message
from kinema.loading.keymap import KeyMap
from kinema.loading.materialize import materialize
from kinema.models.clip import ACTIVATIONS, ClipVisionConfig, CLIPVisionTower

COMPONENT = "CLIP vision encoder"
WAN_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
# Folder layouts, most specific first: official Wan2.1 folder, diffusers pipeline, component folders.
CANDIDATES = (
    WAN_CLIP_FILE,
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "clip_vision_h.safetensors",
    "open_clip_pytorch_model.bin",
)

_BLOCK = r"(\d+)"


def _wan_map(last: int | None) -> KeyMap:
    rules = (
        (r"patch_embedding\.weight", "patch_embedding.weight"),
        (r"cls_embedding", "cls_embedding"),
        (r"pos_embedding", "pos_embedding"),
        (r"pre_norm\.(weight|bias)", r"pre_norm.\1"),
        (rf"transformer\.{_BLOCK}\.(norm1|norm2)\.(weight|bias)", r"transformer.\1.\2.\3"),
        (rf"transformer\.{_BLOCK}\.attn\.(to_qkv|proj)\.(weight|bias)", r"transformer.\1.attn.\2.\3"),
        (rf"transformer\.{_BLOCK}\.mlp\.(0|2)\.(weight|bias)", r"transformer.\1.mlp.\2.\3"),
    )
    ignore = (r"textual\..*", r"log_scale", r"post_norm\..*", r"head(\..*)?")
    if last is not None:
        ignore += (rf"transformer\.{last}\..*",)
    # Official files prefix the tower with "visual."; a bare extracted tower works too.
    return KeyMap("official Wan2.1 CLIP", rules, ignore, strip_prefixes=("visual.",))


def _open_clip_map(last: int | None) -> KeyMap:
    rb = rf"visual\.transformer\.resblocks\.{_BLOCK}"
    rules = (
        (r"visual\.conv1\.weight", "patch_embedding.weight"),
        (r"visual\.class_embedding", "cls_embedding"),  # [D] -> [1, 1, D]
        (r"visual\.positional_embedding", "pos_embedding"),  # [L, D] -> [1, L, D]
        (r"visual\.ln_pre\.(weight|bias)", r"pre_norm.\1"),
        (rf"{rb}\.ln_1\.(weight|bias)", r"transformer.\1.norm1.\2"),
        (rf"{rb}\.ln_2\.(weight|bias)", r"transformer.\1.norm2.\2"),
        (rf"{rb}\.attn\.in_proj_(weight|bias)", r"transformer.\1.attn.to_qkv.\2"),
        (rf"{rb}\.attn\.out_proj\.(weight|bias)", r"transformer.\1.attn.proj.\2"),
        (rf"{rb}\.mlp\.c_fc\.(weight|bias)", r"transformer.\1.mlp.0.\2"),
        (rf"{rb}\.mlp\.c_proj\.(weight|bias)", r"transformer.\1.mlp.2.\2"),
    )
    ignore = (
        r"visual\.ln_post\..*", r"visual\.proj",
        # text tower of a full open-clip model (OpenAI-style or HF-text "text.*")
        r"transformer\..*", r"token_embedding\..*", r"positional_embedding", r"ln_final\..*",
        r"text_projection", r"logit_scale", r"logit_bias", r"attn_mask", r"text\..*",
    )
    if last is not None:
        ignore += (rf"visual\.transformer\.resblocks\.{last}\..*",)
    return KeyMap("open-clip", rules, ignore)


def _hf_map(last: int | None) -> KeyMap:
    layer = rf"encoder\.layers\.{_BLOCK}"
    rules = (
        (r"embeddings\.patch_embedding\.weight", "patch_embedding.weight"),
        (r"embeddings\.class_embedding", "cls_embedding"),  # [D] -> [1, 1, D]
        (r"embeddings\.position_embedding\.weight", "pos_embedding"),  # [L, D] -> [1, L, D]
        (r"pre_layrnorm\.(weight|bias)", r"pre_norm.\1"),  # sic: HF's spelling
        (rf"{layer}\.layer_norm1\.(weight|bias)", r"transformer.\1.norm1.\2"),
        (rf"{layer}\.layer_norm2\.(weight|bias)", r"transformer.\1.norm2.\2"),
        # Separate q/k/v are concatenated (in this order) into the fused to_qkv.
        (rf"{layer}\.self_attn\.q_proj\.(weight|bias)", r"transformer.\1.attn.to_qkv.\2#0/3"),
        (rf"{layer}\.self_attn\.k_proj\.(weight|bias)", r"transformer.\1.attn.to_qkv.\2#1/3"),
        (rf"{layer}\.self_attn\.v_proj\.(weight|bias)", r"transformer.\1.attn.to_qkv.\2#2/3"),
        (rf"{layer}\.self_attn\.out_proj\.(weight|bias)", r"transformer.\1.attn.proj.\2"),
        (rf"{layer}\.mlp\.fc1\.(weight|bias)", r"transformer.\1.mlp.0.\2"),
        (rf"{layer}\.mlp\.fc2\.(weight|bias)", r"transformer.\1.mlp.2.\2"),
    )
    ignore = (
        r"post_layernorm\..*", r"embeddings\.position_ids",
        # projection and text tower of a full CLIPModel file
        r"visual_projection\.weight", r"text_projection\.weight", r"logit_scale", r"text_model\..*",
    )
    if last is not None:
        ignore += (rf"encoder\.layers\.{last}\..*",)
    # transformers 4.x (and ComfyUI) save "vision_model.*"; transformers 5 saves the bare names.
    return KeyMap("Hugging Face CLIP", rules, ignore, strip_prefixes=("vision_model.",))


_FORMATS = {"wan": _wan_map, "open_clip": _open_clip_map, "hf": _hf_map}
_DETECT = {
    "hf": re.compile(r"(vision_model\.)?encoder\.layers\.\d+\.self_attn\.q_proj\.weight"),
    "open_clip": re.compile(r"visual\.transformer\.resblocks\.\d+\.attn\.in_proj_weight"),
    "wan": re.compile(r"(visual\.)?transformer\.\d+\.attn\.to_qkv\.weight"),
}


def detect_format(keys) -> str | None:
    """'wan', 'open_clip' or 'hf' from the key names; None if no CLIP vision block is found."""
    keys = list(keys)
    for fmt, pattern in _DETECT.items():
        if any(pattern.fullmatch(k) for k in keys):
            return fmt
    return None


def default_num_heads(dim: int) -> int:
    """Heads when no config says: open-clip's widths (ViT-H/14 1280 -> 16, head_dim 80), else head_dim 64."""
    known = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}  # ViT-B, L, H, g, bigG
    if dim in known:
        return known[dim]
    if dim % 64 == 0:
        return dim // 64
    raise CheckpointError(
        f"cannot tell the number of attention heads of a CLIP vision tower of width {dim}: there is no "
        "config.json beside the checkpoint and the width is not a multiple of 64. Pass num_heads=."
    )


def _hf_config(folder: Path, dim: int) -> dict | None:
    """The vision part of a Hugging Face CLIP config.json in `folder`, if there is one for this model."""
    path = folder / "config.json"
    cfg = read_config(folder)
    if cfg.get("model_type") == "clip" and isinstance(cfg.get("vision_config"), dict):
        cfg = cfg["vision_config"]
    # An official Wan2.1 folder holds the DiT's config.json beside the CLIP file; it is not ours.
    if cfg.get("model_type") != "clip_vision_model" or "num_attention_heads" not in cfg:
        return None
    if cfg.get("hidden_size", dim) != dim:
        raise CheckpointError(
            f"{path} describes a CLIP vision model of hidden_size {cfg['hidden_size']}, but the checkpoint "
            f"beside it has width {dim}. The config belongs to another model; remove it or pass num_heads=."
        )
    return cfg


def _infer_config(plan, source: TensorSource, num_heads, activation, folder: Path) -> ClipVisionConfig:
    def shape(target: str) -> tuple[int, ...]:
        if target not in plan.sources:
            raise CheckpointError(f"{source.name}: the {COMPONENT} weight '{target}' is missing; the file is incomplete.")
        shapes = [source.shape(s) for s in plan.sources[target]]
        return (sum(s[0] for s in shapes),) + shapes[0][1:]

    def bad(target: str, have, want: str) -> CheckpointError:
        key = plan.sources[target][0]
        return CheckpointError(
            f"{source.origin[key]}: key '{key}' has shape {list(have)}, expected {want}; "
            "this is not a CLIP ViT vision tower Kinema supports. Nothing was loaded."
        )

    pe = shape("patch_embedding.weight")
    if len(pe) != 4 or pe[1] != 3 or pe[2] != pe[3]:
        raise bad("patch_embedding.weight", pe, "[dim, 3, patch, patch]")
    dim, patch = pe[0], pe[2]
    ps = shape("pos_embedding")  # [L, D] or [1, L, D]
    n = ps[-2] if len(ps) >= 2 and all(s == 1 for s in ps[:-2]) and ps[-1] == dim else 0
    grid = math.isqrt(n - 1) if n > 1 else 0
    if grid == 0 or grid * grid != n - 1:
        raise bad("pos_embedding", ps, f"[1 + n*n, {dim}] (a class token plus a square grid of patches)")
    mlp = shape("transformer.0.mlp.0.weight")
    if len(mlp) != 2 or mlp[1] != dim:
        raise bad("transformer.0.mlp.0.weight", mlp, f"[mlp_dim, {dim}]")
    blocks = {int(m.group(1)) for t in plan.sources if (m := re.match(r"transformer\.(\d+)\.", t))}
    num_layers = max(blocks) + 1
    if num_layers < 2:
        raise CheckpointError(f"{source.name}: only {num_layers} transformer block; Wan needs the penultimate one.")

    hf = _hf_config(folder, dim)
    heads = num_heads or (hf["num_attention_heads"] if hf else default_num_heads(dim))
    if dim % heads:
        raise CheckpointError(f"{source.name}: width {dim} is not divisible by {heads} attention heads; pass a valid num_heads=.")
    act = activation or (hf or {}).get("hidden_act") or "gelu"
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{source.name}: unsupported CLIP activation '{act}'; expected one of {', '.join(ACTIVATIONS)}.")
    eps = float((hf or {}).get("layer_norm_eps", 1e-5))
    return ClipVisionConfig(
        image_size=grid * patch, patch_size=patch, dim=dim, mlp_dim=mlp[0], num_heads=int(heads),
        num_layers=num_layers, activation=act, norm_eps=eps,
    )


def load_clip_vision(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_heads: int | None = None,
    activation: str | None = None,
) -> ClipVisionEncoder:
    """Load Wan2.1's CLIP vision encoder (up to its penultimate block) from a file or folder.

    `path`: the official Wan2.1 folder or its CLIP .pth, a diffusers pipeline
    folder (uses `image_encoder/`), a component folder, or a checkpoint file.
    `dtype`: float32 (default), bfloat16 or float16; LayerNorm weights stay float32.
    `num_heads` / `activation` ('gelu', 'quick_gelu', ...) override what the
    config.json beside the file (or the default for the width) says.
    """
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads <= 0):
        raise CheckpointError(f"num_heads must be a positive integer, got {num_heads!r}.")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointError(f"unsupported dtype {dtype} for the {COMPONENT}; use torch.float32, bfloat16 or float16.")
    files = checkpoint_files(path, COMPONENT, CANDIDATES, subfolder="image_encoder", kind="clip")
    source = TensorSource(files)
    keys = source.keys()
    fmt = detect_format(keys)
    if fmt is None:
        raise CheckpointError(wrong_component_message(source.name, identify(keys), "clip"))

    # First pass maps every block, to read the architecture off the shapes; the
    # second ignores the last block, which the model does not hold.
    config = _infer_config(_FORMATS[fmt](None).plan(source), source, num_heads, activation, files[0].parent)
    plan = _FORMATS[fmt](config.num_layers - 1).plan(source)

    with torch.device("meta"):
        model = CLIPVisionTower(config)
    # LayerNorms run in float32 anyway; keeping their few weights in float32 avoids rounding them.
    dtype_for = lambda key: torch.float32 if "norm" in key else dtype  # noqa: E731
    materialize(model, plan, source, dtype_for, device, what=f"{COMPONENT} ({fmt} format)")
    return ClipVisionEncoder(model)
