"""Loading the umT5-XXL text encoder and its tokenizer from any common layout.

Accepted: the official Wan2.1 folder (`models_t5_umt5-xxl-enc-bf16.pth`, with
the tokenizer in `google/umt5-xxl/`), a diffusers pipeline folder
(`text_encoder/` plus `tokenizer/`), a component folder, or a single file:
official names, or Hugging Face T5 names as written by transformers, diffusers
and ComfyUI (ComfyUI's scaled fp8 included: dequantised, or kept in fp8 with
`quantization`). The format is told from the key names and the architecture
from the tensor shapes, so nothing is configured by hand; every shape is checked
before any weight is read, so a load either succeeds whole or fails with a
message naming the file and the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kinema.encoders.text import TextEncoder
from kinema.errors import CheckpointError, KinemaError
from kinema.loading.files import TensorSource, checkpoint_files
from kinema.loading.fp8 import resolve_quantization
from kinema.loading.identify import identify, wrong_component_message
from kinema.loading.keymap import KeyMap, Plan, identity_map
from kinema.loading.materialize import materialize
from kinema.ops.fp8 import check_mode, quantize_fp8, set_fp8_fast
from kinema.models.t5 import UMT5Encoder
from kinema.text.tokenizer import UMT5Tokenizer, find_tokenizer_file

WHAT = "umT5 text encoder"
OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
# File names that hold the encoder inside a folder, official first, then diffusers/transformers names.
CANDIDATES = (
    OFFICIAL_FILE,
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# ComfyUI's text encoder files may carry their SentencePiece tokenizer as a uint8 tensor under this key.
EMBEDDED_TOKENIZER_KEY = "spiece_model"

OFFICIAL = identity_map("official Wan2.1 umT5")

_HF = r"(?:encoder\.)?"  # transformers writes 'encoder.'; some single-file exports drop it
HUGGINGFACE_RULES = (
    (_HF + r"block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    (
        _HF + r"block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (_HF + r"block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    # wi_0 is the branch under the GELU (official: gate.0), wi_1 the linear one (fc1).
    (_HF + r"block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (_HF + r"block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (_HF + r"block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    (_HF + r"block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (_HF + r"final_layer_norm\.weight", r"norm.weight"),
    (r"shared\.weight|" + _HF + r"embed_tokens\.weight", r"token_embedding.weight"),
)
# A full encoder-decoder checkpoint also loads: its decoder and LM head are not the encoder's business.
HUGGINGFACE_IGNORE = (EMBEDDED_TOKENIZER_KEY, r"decoder\..*", r"lm_head\..*")


def _huggingface_map(keys: set[str]) -> KeyMap:
    ignore = HUGGINGFACE_IGNORE
    if "shared.weight" in keys:
        # encoder.embed_tokens is tied to shared; read the one copy.
        ignore = ignore + (_HF + r"embed_tokens\.weight",)
    return KeyMap("Hugging Face T5", HUGGINGFACE_RULES, ignore)


def _detect_format(source: TensorSource) -> KeyMap:
    keys = set(source.keys())
    found = identify(keys)
    if found not in (None, "t5"):
        raise CheckpointError(wrong_component_message(source.name, found, "t5"))
    if "token_embedding.weight" in keys or any(re.match(r"blocks\.\d+\.attn\.", k) for k in keys):
        return OFFICIAL
    if "shared.weight" in keys or any(re.match(_HF + r"block\.\d+\.layer\.", k) for k in keys):
        return _huggingface_map(keys)
    if found is None:
        raise CheckpointError(wrong_component_message(source.name, None, "t5"))
    shown = ", ".join(repr(k) for k in sorted(keys)[:5])
    raise CheckpointError(
        f"{source.name}: the key names ({shown}, ...) match no supported {WHAT} format "
        "(official Wan2.1 names, or Hugging Face T5 names such as 'encoder.block.0.layer.0.SelfAttention.q.weight'). "
        "Nothing was loaded."
    )


def _infer_config(plan: Plan, source: TensorSource) -> dict:
    def shape(name: str) -> tuple[int, int]:
        if name not in plan.sources:
            raise CheckpointError(
                f"{source.name}: no weight for '{name}', which every {WHAT} has; the checkpoint is incomplete "
                "or is not a umT5 encoder. Nothing was loaded."
            )
        key = plan.sources[name][0]
        found = source.shape(key)
        if len(found) != 2:
            raise CheckpointError(
                f"{source.origin[key]}: key '{key}' has shape {list(found)} but the {WHAT} expects a matrix "
                f"for '{name}'. Nothing was loaded."
            )
        return found

    vocab_size, dim = shape("token_embedding.weight")
    layers = sorted({int(m.group(1)) for k in plan.sources if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError(f"{source.name}: no encoder blocks found; the checkpoint is incomplete. Nothing was loaded.")
    num_layers = layers[-1] + 1
    bias_layers = [i for i in layers if f"blocks.{i}.pos_embedding.embedding.weight" in plan.sources]
    if bias_layers == [0] and num_layers > 1:
        raise CheckpointError(
            f"{source.name}: only the first block has a relative position bias table, as in T5 v1.1. "
            f"Wan2.1 needs umT5 (one table per block, e.g. umT5-XXL); nothing was loaded."
        )
    num_buckets, num_heads = shape("blocks.0.pos_embedding.embedding.weight")
    dim_attn = shape("blocks.0.attn.q.weight")[0]
    if dim_attn % num_heads:
        raise CheckpointError(
            f"{source.name}: attention width {dim_attn} is not a multiple of the {num_heads} heads given by "
            "the relative position bias table; the checkpoint is inconsistent. Nothing was loaded."
        )
    return dict(
        vocab_size=vocab_size,
        dim=dim,
        dim_attn=dim_attn,
        dim_ffn=shape("blocks.0.ffn.fc1.weight")[0],
        num_heads=num_heads,
        num_layers=num_layers,
        num_buckets=num_buckets,
    )


def _tokenizer_places(user_path: Path, files: list[Path]) -> list[Path]:
    """Where the standard layouts keep the tokenizer, relative to the checkpoint."""
    base = files[0].parent
    places = [
        base / "google" / "umt5-xxl",  # official Wan2.1 folder
        base.parent / "tokenizer",  # diffusers: text_encoder/ and tokenizer/ side by side
        base / "tokenizer",
        user_path / "tokenizer" if user_path.is_dir() else None,
        base,  # a component folder holding weights and tokenizer together
    ]
    unique = []
    for p in places:
        if p is not None and p not in unique:
            unique.append(p)
    return unique


def _resolve_tokenizer(tokenizer, user_path: Path, files: list[Path], source: TensorSource) -> UMT5Tokenizer:
    if isinstance(tokenizer, UMT5Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return UMT5Tokenizer.from_path(tokenizer)
    if EMBEDDED_TOKENIZER_KEY in source:
        # Saved with the weights, so it is certainly the one they were trained with.
        data = source.get(EMBEDDED_TOKENIZER_KEY).to(torch.uint8).numpy().tobytes()
        return UMT5Tokenizer.from_sentencepiece(data, f"{source.name}:{EMBEDDED_TOKENIZER_KEY}")
    places = _tokenizer_places(user_path, files)
    for place in places:
        if place.is_dir() and find_tokenizer_file(place) is not None:
            return UMT5Tokenizer.from_path(place)
    raise KinemaError(
        f"no umT5 tokenizer found next to {source.name}; looked in: {', '.join(str(p) for p in places)} "
        "(for tokenizer.json or spiece.model). Pass tokenizer=... with the folder or file "
        "(e.g. the google/umt5-xxl/ folder of the Wan2.1 release)."
    )


@dataclass
class T5Checkpoint:
    """An umT5 checkpoint opened and checked (headers only), its model on the meta device (fp8 layers in place when
    asked), its tokenizer resolved: what `load_text_encoder` materialises whole and FSDP
    (kinema/parallel/fsdp.py) a block at a time."""

    model: UMT5Encoder
    plan: Plan
    source: TensorSource
    tokenizer: UMT5Tokenizer
    dtype: torch.dtype


def open_text_encoder(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | UMT5Tokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
) -> T5Checkpoint:
    """Find, check and open the umT5 encoder at `path` and its tokenizer (`load_text_encoder`'s arguments); no weight
    is read."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KinemaError(f"unsupported dtype {dtype} for the {WHAT}; use torch.float32, torch.bfloat16 or torch.float16.")
    if quantization is not None:
        check_mode(quantization, allow_auto=True)  # before any file is opened
    user_path = Path(path).expanduser()
    files = checkpoint_files(user_path, WHAT, CANDIDATES, subfolder="text_encoder", kind="t5")
    source = TensorSource(files)
    keymap = _detect_format(source)
    plan = keymap.plan(source)
    config = _infer_config(plan, source)
    # The tokenizer is resolved before any weight is read, so a missing one fails fast.
    tok = _resolve_tokenizer(tokenizer, user_path, files, source)
    if tok.vocab_size > config["vocab_size"]:
        raise KinemaError(
            f"the tokenizer {tok.source} has {tok.vocab_size} tokens but the {WHAT} in {source.name} only "
            f"{config['vocab_size']} embeddings; they do not belong together."
        )
    with torch.device("meta"):
        model = UMT5Encoder(**config)
    mode = resolve_quantization(quantization, model, plan, source)
    if mode is not None:
        quantize_fp8(model, mode, compute_dtype=dtype)
    return T5Checkpoint(model, plan, source, tok, dtype)


def load_text_encoder(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | UMT5Tokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: str | None = None,
    fp8_fast: bool = False,
) -> TextEncoder:
    """Load the umT5 encoder at `path` (folder or file) and its tokenizer into a `TextEncoder`.

    `tokenizer=None` looks in the standard places next to the checkpoint (and in
    the checkpoint itself for ComfyUI files); otherwise pass a folder, a
    tokenizer.json / spiece.model file, or a `UMT5Tokenizer`.
    `quantization` / `fp8_fast` are those of `load_dit`: every Linear layer goes to
    fp8 (the embeddings and norms stay in `dtype`), a file already in fp8 is kept.
    """
    ckpt = open_text_encoder(path, tokenizer, dtype, quantization)
    materialize(ckpt.model, ckpt.plan, ckpt.source, lambda _: dtype, device, WHAT)
    if fp8_fast:
        set_fp8_fast(ckpt.model)
    return TextEncoder(ckpt.model, ckpt.tokenizer)
