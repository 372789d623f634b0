"""The CLIP vision tower Wan2.1 uses to condition i2v / flf2v on images.

Wan feeds the DiT the *penultimate* hidden states of open-clip's
xlm-roberta-large-ViT-H/14 vision tower ([B, 257, 1280] at 224 px): the output
after all blocks but the last, without `post_norm` and without the head. The
last block, `post_norm` and `head` therefore never change Wan's output, so this
module does not hold them at all: a checkpoint with `num_layers` blocks builds
`num_layers - 1` blocks here, and the loaders list the dropped weights as
deliberately ignored. That saves one ViT-H block (~20M parameters) of memory
and its compute.

Parameter names follow the official `wan/modules/clip.py` `VisionTransformer`
(without the `visual.` prefix), so official checkpoints map one to one.

The residual stream is kept in float32 whatever the weights' dtype, and the
LayerNorms compute in float32 (the reference does the same under autocast);
the matrix multiplies run in the weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kinema.models.layers import LayerNorm32 as LayerNorm
from kinema.models.layers import Linear  # runs in the weight's dtype: a bf16 model takes the float32 stream as is
from kinema.ops.attention import attention

# Activation names as Hugging Face configs spell them -> Kinema's modules.
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_pytorch_tanh", "gelu_new")


@dataclass(frozen=True)
class ClipVisionConfig:
    """Architecture of a CLIP ViT vision tower; the defaults are Wan2.1's ViT-H/14."""

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32  # blocks in the checkpoint; the module holds num_layers - 1
    activation: str = "gelu"
    norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU (used by its ViT-B/L, not by ViT-H)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unsupported CLIP activation '{name}'; expected one of {', '.join(ACTIVATIONS)}")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = Linear(dim, dim * 3)  # rows: [q; k; v], each head-major
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, c // self.num_heads).unbind(2)  # [B, L, H, Dh]
        return self.proj(attention(q, k, v).reshape(b, s, c))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block (ViT-H/14 has pre_norm=True, post_norm=False)."""

    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        # Index layout matches the reference's Sequential(Linear, act, Linear, Dropout): keys mlp.0 / mlp.2.
        self.mlp = nn.Sequential(Linear(cfg.dim, cfg.mlp_dim), _activation(cfg.activation), Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)).float()  # float32 residual stream
        return x + self.mlp(self.norm2(x)).float()


class CLIPVisionTower(nn.Module):
    """CLIP ViT vision tower up to its penultimate block (what Wan2.1 conditions on).

    forward(pixel_values [B, 3, S, S], already resized to `image_size` and
    normalised with the CLIP mean/std) -> [B, 1 + (S / patch)^2, dim] in the
    weights' dtype.
    """

    def __init__(self, config: ClipVisionConfig | None = None):
        super().__init__()
        cfg = config or ClipVisionConfig()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"CLIP dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        if cfg.num_layers < 2:
            raise ValueError(f"CLIP needs at least 2 blocks to have a penultimate output, got {cfg.num_layers}")
        self.config = cfg
        # No bias: the reference drops it whenever pre_norm is used.
        self.patch_embedding = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        # The last block, post_norm and head never reach Wan's output (see module docstring).
        self.transformer = nn.Sequential(*[AttentionBlock(cfg) for _ in range(cfg.num_layers - 1)])

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        s = self.config.image_size
        if (h, w) != (s, s):
            raise ValueError(f"CLIP vision tower expects {s}x{s} pixels, got {h}x{w}; resize first (see ClipVisionEncoder)")
        x = self.patch_embedding(pixel_values.to(self.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.cls_embedding.expand(b, -1, -1).to(x.dtype), x], dim=1)  # [B, 1 + N, D]
        x = self.pre_norm(x.float() + self.pos_embedding.float())
        x = self.transformer(x)
        return x.to(self.dtype)
