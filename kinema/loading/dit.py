"""Loading the Wan2.1 DiT from any checkpoint layout users have.

Formats (detected from key names):
- official Wan2.1 folder: `config.json` + `diffusion_pytorch_model*.safetensors` (sharded behind an index);
- ComfyUI single files: official names, with or without the `model.diffusion_model.` prefix,
  plain or scaled fp8;
- diffusers: a pipeline folder (`transformer/`) or a component folder, diffusers names.
The architecture (variant, widths, depth) is read off the shapes; the head count
comes from config.json when there is one, else dim / 128 as in every released model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from kinema.errors import CheckpointError
from kinema.loading.files import TensorSource, checkpoint_files, read_config
from kinema.loading.fp8 import resolve_quantization
from kinema.loading.identify import identify, wrong_component_message
from kinema.loading.keymap import KeyMap, Plan, identity_map
from kinema.loading.materialize import materialize
from kinema.ops.fp16_guard import FP16Guard, guard_fp16
from kinema.ops.fp8 import check_mode, quantize_fp8, set_fp8_fast
from kinema.models.dit import DiTConfig, WanDiT

OFFICIAL = identity_map("official Wan2.1 / ComfyUI DiT", strip_prefixes=("model.diffusion_model.", "diffusion_model."))

_B = r"blocks\.(\d+)\."
DIFFUSERS = KeyMap(
    "diffusers WanTransformer3DModel",
    (
        (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
        (r"condition_embedder\.time_embedder\.linear_1\.(weight|bias)", r"time_embedding.0.\1"),
        (r"condition_embedder\.time_embedder\.linear_2\.(weight|bias)", r"time_embedding.2.\1"),
        (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.1.\1"),
        (r"condition_embedder\.text_embedder\.linear_1\.(weight|bias)", r"text_embedding.0.\1"),
        (r"condition_embedder\.text_embedder\.linear_2\.(weight|bias)", r"text_embedding.2.\1"),
        (r"condition_embedder\.image_embedder\.norm1\.(weight|bias)", r"img_emb.proj.0.\1"),
        (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(weight|bias)", r"img_emb.proj.1.\1"),
        (r"condition_embedder\.image_embedder\.ff\.net\.2\.(weight|bias)", r"img_emb.proj.3.\1"),
        (r"condition_embedder\.image_embedder\.norm2\.(weight|bias)", r"img_emb.proj.4.\1"),
        (r"condition_embedder\.image_embedder\.pos_embed", r"img_emb.emb_pos"),
        (_B + r"attn1\.to_(q|k|v)\.(weight|bias)", r"blocks.\1.self_attn.\2.\3"),
        (_B + r"attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
        (_B + r"attn1\.norm_(q|k)\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
        (_B + r"attn2\.to_(q|k|v)\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
        (_B + r"attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
        (_B + r"attn2\.norm_(q|k)\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
        (_B + r"attn2\.add_(k|v)_proj\.(weight|bias)", r"blocks.\1.cross_attn.\2_img.\3"),
        (_B + r"attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
        # diffusers' norm2 is the affine cross-attention norm the reference calls norm3.
        (_B + r"norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
        (_B + r"ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
        (_B + r"ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
        (_B + r"scale_shift_table", r"blocks.\1.modulation"),
        (r"scale_shift_table", r"head.modulation"),
        (r"proj_out\.(weight|bias)", r"head.head.\1"),
    ),
    ignore=(_B + r"attn2\.norm_added_q\.weight",),
)

# Weights kept in float32 whatever the requested dtype (WanDiT declares them: the reference's fp32 islands).
_FP32_ISLANDS = re.compile("|".join(f"(?:{p})" for p in WanDiT._keep_in_fp32_modules))

_CANDIDATES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)


def dtype_policy(dtype: torch.dtype):
    return lambda key: torch.float32 if _FP32_ISLANDS.fullmatch(key) else dtype


def infer_config(shape, keys: set[str], folder_config: dict, num_heads: int | None) -> DiTConfig:
    """The architecture from canonical key names and shapes (`shape(key)` gives a tensor's shape)."""
    patch = shape("patch_embedding.weight")  # [dim, in_dim, pt, ph, pw]
    dim, in_dim = patch[0], patch[1]
    layers = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    if "img_emb.emb_pos" in keys:
        model_type = "flf2v"
    elif "img_emb.proj.1.weight" in keys:
        model_type = "i2v"
    else:
        model_type = "t2v"
    heads = num_heads or folder_config.get("num_heads") or folder_config.get("num_attention_heads")
    if not heads:
        if dim % 128:
            raise CheckpointError(
                f"cannot tell the number of attention heads of a DiT with width {dim} (not a multiple of 128) "
                "without a config.json; pass num_heads=... to load_dit."
            )
        heads = dim // 128
    if dim % heads:
        raise CheckpointError(f"DiT width {dim} is not divisible by num_heads={heads}; check config.json / num_heads.")
    return DiTConfig(
        model_type=model_type,
        patch_size=tuple(patch[2:]),
        in_dim=in_dim,
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        freq_dim=shape("time_embedding.0.weight")[1],
        text_dim=shape("text_embedding.0.weight")[1],
        out_dim=shape("head.head.weight")[0] // (patch[2] * patch[3] * patch[4]),
        num_heads=int(heads),
        num_layers=layers,
        qk_norm="blocks.0.self_attn.norm_q.weight" in keys,
        cross_attn_norm="blocks.0.norm3.weight" in keys,
        eps=float(folder_config.get("eps", 1e-6)),
        image_dim=shape("img_emb.proj.0.weight")[0] if model_type != "t2v" else 1280,
        text_len=int(folder_config.get("text_len", 512)),
        flf2v_tokens=shape("img_emb.emb_pos")[1] if model_type == "flf2v" else 514,
    )


def load_dit(
    path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_heads: int | None = None,
    quantization: str | None = None,
    fp8_fast: bool = False,
) -> WanDiT:
    """Load a Wan2.1 DiT from a file, a folder or a sharded folder in any supported format.

    `dtype` is the dtype of the big matrices; norms, modulation, time embedding and
    head stay float32 (the reference's fp32 islands, `WanDiT._keep_in_fp32_modules`).
    In float16 a part whose output overflows is recomputed in float32
    (kinema.ops.fp16_guard; `open_dit(path).load(...)` returns the guard in its record).

    `quantization` ('fp8_e4m3fn', 'fp8_e5m2', 'fp8_e4m3fn_scaled') stores the blocks'
    Linear weights in fp8 and computes in `dtype` (kinema.ops.fp8); a file already
    in that fp8 format is kept as stored. 'auto' keeps a file's own fp8 layout and
    leaves a bf16 / fp32 file as it is. `fp8_fast` uses the fp8 matmul on GPUs that have it.
    """
    if quantization is not None:
        check_mode(quantization, allow_auto=True)  # before any file is opened
    return open_dit(path, num_heads).load(dtype, device, quantization, fp8_fast).model


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about its own use. Kinema-trained models write both in their config.json:
    the tasks they were trained for and their sampling defaults (size, frame_num, steps, shift,
    guide_scale, negative_prompt, fps). Official checkpoints have neither."""

    tasks: tuple[str, ...] = ()
    sample_defaults: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict) -> ModelInfo:
        return cls(tuple(config.get("tasks", ())), dict(config.get("sample_defaults", {})))


@dataclass
class LoadedDiT:
    """A loaded DiT and what its loader learnt about it."""

    model: WanDiT
    info: ModelInfo
    quantization: str | None  # the fp8 mode its block Linear weights are in; None: --dtype throughout
    fp16_guard: FP16Guard | None  # fp16 only (kinema.ops.fp16_guard)
    source: str  # the checkpoint, for messages and metadata


@dataclass
class DiTCheckpoint:
    """A DiT checkpoint opened and checked (headers only), its model built on the meta device, not yet
    read. The memory plan reads its shapes, `load` materialises all of it, streaming
    (kinema/memory/streaming.py) all but the blocks' Linear weights. One checkpoint loads once."""

    model: WanDiT
    plan: Plan
    source: TensorSource
    folder_config: dict
    loaded: bool = False

    @property
    def info(self) -> ModelInfo:
        return ModelInfo.from_config(self.folder_config)

    def quantize(self, quantization: str | None, dtype: torch.dtype) -> str | None:
        """Swap the meta model's Linear layers for fp8 ones when asked; returns the mode used ('auto' resolved)."""
        if self.loaded:
            raise RuntimeError(f"{self.source.name} was already loaded; open it again to load it another time")
        mode = resolve_quantization(quantization, self.model, self.plan, self.source)
        if mode is not None:
            quantize_fp8(self.model, mode, compute_dtype=dtype)
        return mode

    def load(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             quantization: str | None = None, fp8_fast: bool = False, skip=None) -> LoadedDiT:
        """Read the weights (all of them, or all but those `skip(key)` names) into the model on `device`."""
        mode = self.quantize(quantization, dtype)
        self.loaded = True
        materialize(self.model, self.plan, self.source, dtype_policy(dtype), device,
                    what=f"Wan2.1 {self.model.config.model_type} DiT", skip=skip)
        if fp8_fast:
            set_fp8_fast(self.model)
        guard = guard_fp16(self.model)  # fp16 only: overflowing blocks are recomputed in float32
        return LoadedDiT(self.model, self.info, mode, guard, self.source.name)


def open_dit(path, num_heads: int | None = None, mapped: bool = True) -> DiTCheckpoint:
    """Open a DiT checkpoint: its files, format and architecture, from the headers; no weight is read.
    `mapped=False` reads every tensor with a copy (pread) instead of a view of the memory-mapped file."""
    files = checkpoint_files(path, "DiT", _CANDIDATES, subfolder="transformer", kind="dit")
    source = TensorSource(files, mapped=mapped)
    found = identify(source.keys())
    if found != "dit":
        raise CheckpointError(wrong_component_message(source.name, found, "dit"))
    keymap = DIFFUSERS if any(k.startswith("condition_embedder.") for k in source.keys()) else OFFICIAL
    plan = keymap.plan(source)
    if "patch_embedding.weight" not in plan.sources:
        raise CheckpointError(f"{source.name}: no patch_embedding.weight; the DiT checkpoint is incomplete.")

    def shape(key: str):
        if key not in plan.sources:
            raise CheckpointError(f"{source.name}: missing '{key}', needed to tell the DiT architecture; the file is incomplete.")
        return source.shape(plan.sources[key][0])

    folder_config = read_config(files[0].parent)
    cfg = infer_config(shape, set(plan.keys()), folder_config, num_heads)
    with torch.device("meta"):
        model = WanDiT(cfg)
    return DiTCheckpoint(model, plan, source, folder_config)
