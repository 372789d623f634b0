"""LoRA key layouts: every way shared Wan2.1 LoRAs name their tensors, read into one record per layer.

A file's key is <prefix><module><suffix>. Prefixes, removed: `diffusion_model.` (ComfyUI, musubi-tuner,
Kinema), `model.diffusion_model.`, `transformer.` (diffusers), `base_model.model.` (PEFT),
`pipe.dit.` (DiffSynth-Studio); `lora_unet_` / `lora_transformer_` / `lycoris_` (kohya and LyCORIS:
the module path with `_` for `.`, matched back against the model's names). The module part is an
official Wan2.1 name or a diffusers one (`blocks.0.attn1.to_q`; finetrainers writes these), mapped to
the official one. Suffixes, by kind of update:

- low rank: `.lora_A.weight` / `.lora_down.weight` (A [rank, in]), `.lora_B.weight` / `.lora_up.weight`
  (B [out, rank]), PEFT's `.lora_A.default.weight` / `.lora_B.default.weight`, `.alpha` (missing: rank);
  the update is alpha / rank * B @ A;
- full (LightX2V and other "diff" files): `.diff` (the weight's delta itself) and `.diff_b` (the bias's),
  on any layer, norms and modulation tables included;
- LyCORIS LoKr: `.lokr_w1` or `.lokr_w1_a` @ `.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a` @ `.lokr_w2_b`;
  the update is kron(w1, w2), times alpha / dim when a factor is low-rank (dim its rank), as ComfyUI;
- LyCORIS LoHa: (`.hada_w1_a` @ `.hada_w1_b`) * (`.hada_w2_a` @ `.hada_w2_b`) times alpha / rank.

Tucker cores (`lokr_t2`, `hada_t1/t2`) and DoRA (`dora_scale`) are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "pipe.dit.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# suffix -> (kind, role); the longest suffix is tried first
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": ("lora", "A"), ".lora_down.weight": ("lora", "A"), ".lora_A.default.weight": ("lora", "A"),
    ".lora_B.weight": ("lora", "B"), ".lora_up.weight": ("lora", "B"), ".lora_B.default.weight": ("lora", "B"),
    ".alpha": ("any", "alpha"),
    ".diff": ("full", "diff"), ".diff_b": ("full", "diff_b"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w2": ("lokr", "w2"), ".lokr_w1_a": ("lokr", "w1_a"),
    ".lokr_w1_b": ("lokr", "w1_b"), ".lokr_w2_a": ("lokr", "w2_a"), ".lokr_w2_b": ("lokr", "w2_b"),
    ".lokr_t2": ("lokr", "t2"),
    ".hada_w1_a": ("loha", "w1_a"), ".hada_w1_b": ("loha", "w1_b"), ".hada_w2_a": ("loha", "w2_a"),
    ".hada_w2_b": ("loha", "w2_b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".dora_scale": ("dora", "scale"),
}
_ORDERED = sorted(SUFFIXES, key=len, reverse=True)
REFUSED = {("lokr", "t2"): "LoKr with a Tucker core (lokr_t2)", ("loha", "t1"): "LoHa with Tucker cores (hada_t1)",
           ("loha", "t2"): "LoHa with Tucker cores (hada_t2)", ("dora", "scale"): "DoRA (dora_scale)"}
NEEDED = {"lokr": (("w1", "w1_a"), ("w2", "w2_a")), "loha": (("w1_a",), ("w1_b",), ("w2_a",), ("w2_b",))}


def split_key(key: str) -> tuple[str, str, str] | None:
    """key -> (module part, kind, role), or None for a key no layout uses."""
    for suffix in _ORDERED:
        if key.endswith(suffix):
            kind, role = SUFFIXES[suffix]
            return key[: -len(suffix)], kind, role
    return None


@dataclass(frozen=True)
class Delta:
    """One layer's update that is not a plain low-rank pair: `full`, `lokr` or `loha` (see the module doc).
    `parts` holds the file's tensors by role (diff, diff_b, w1, w1_a, ...)."""

    kind: str
    parts: dict
    alpha: float | None = None

    def weight_shape(self) -> tuple[int, ...] | None:
        """The shape of the weight update (None: a bias-only full delta), from the factors' shapes alone."""
        p = self.parts
        if self.kind == "full":
            return tuple(p["diff"].shape) if "diff" in p else None

        def rows_cols(one, a, b):
            return tuple(p[one].shape[:2]) if one in p else (p[a].shape[0], p[b].shape[1])

        if self.kind == "lokr":
            (r1, c1), (r2, c2) = rows_cols("w1", "w1_a", "w1_b"), rows_cols("w2", "w2_a", "w2_b")
            return r1 * r2, c1 * c2
        return p["w1_a"].shape[0], p["w1_b"].shape[1]

    def weight(self) -> torch.Tensor | None:
        """The weight's update, float32, the file's scale folded in (strength not applied)."""
        p = {k: v.float() for k, v in self.parts.items()}
        if self.kind == "full":
            return p.get("diff")
        if self.kind == "lokr":
            dim = None
            w1 = p.get("w1")
            if w1 is None:
                dim, w1 = p["w1_b"].shape[0], p["w1_a"] @ p["w1_b"]
            w2 = p.get("w2")
            if w2 is None:
                dim, w2 = p["w2_b"].shape[0], p["w2_a"] @ p["w2_b"]
            scale = self.alpha / dim if self.alpha is not None and dim is not None else 1.0
            return torch.kron(w1, w2) * scale
        scale = self.alpha / p["w1_b"].shape[0] if self.alpha is not None else 1.0
        return (p["w1_a"] @ p["w1_b"]) * (p["w2_a"] @ p["w2_b"]) * scale

    def bias(self) -> torch.Tensor | None:
        b = self.parts.get("diff_b")
        return None if b is None else b.float()

    def describe(self) -> str:
        return {"full": "full delta", "lokr": "LoKr", "loha": "LoHa"}[self.kind]


def low_rank_delta(A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha / rank * B @ A, float32."""
    return (B.float() @ A.float()) * (float(alpha) / A.shape[0])


def alpha_of(tensor: torch.Tensor) -> float:
    value = float(tensor.float().reshape(-1)[0])
    if not math.isfinite(value):
        raise ValueError(f"alpha {value}")
    return value
