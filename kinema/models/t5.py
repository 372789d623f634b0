"""The umT5 encoder that turns Wan2.1 prompts into text embeddings.

Numerically this is the encoder of the official Wan2.1 `wan/modules/t5.py`
(`umt5_xxl(encoder_only=True)`), and so also Hugging Face's `UMT5EncoderModel`:
pre-norm blocks with T5's RMS norm, attention without 1/sqrt(d) scaling, a
gated-GELU feed-forward and, umT5's difference from T5 v1.1, one relative
position bias table per layer. Parameter names are the official ones, so an
official checkpoint loads one to one; other formats are renamed by the loader.
This module does no I/O.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kinema.models.layers import Linear
from kinema.ops.attention import attention


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # fp16 activations of T5 overflow in the residual stream; the reference clamps them back.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; the statistic is taken in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5RelativeEmbedding(nn.Module):
    """Bidirectional bucketed relative position bias: [num_buckets, heads] -> [1, H, Lq, Lk]."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int = 128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def buckets(self, rel: torch.Tensor) -> torch.Tensor:
        """Bucket index of each relative position rel = key_pos - query_pos."""
        half = self.num_buckets // 2  # one half for keys after the query, one for keys before
        bucket = (rel > 0).long() * half
        rel = rel.abs()
        max_exact = half // 2
        # Beyond max_exact, buckets grow logarithmically up to max_distance; further is the last bucket.
        # (rel = 0 gives log(0) = -inf here, but that branch is not taken for it.)
        large = max_exact + (
            torch.log(rel.float() / max_exact) / math.log(self.max_distance / max_exact) * (half - max_exact)
        ).long()
        large = large.clamp(max=half - 1)
        return bucket + torch.where(rel < max_exact, rel, large)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]  # [Lq, Lk]
        bias = self.embedding(self.buckets(rel))  # [Lq, Lk, H]
        return bias.permute(2, 0, 1).unsqueeze(0)  # [1, H, Lq, Lk]


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = Linear(dim, dim_attn, bias=False)
        self.k = Linear(dim, dim_attn, bias=False)
        self.v = Linear(dim, dim_attn, bias=False)
        self.o = Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q, k, v = self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)  # [B, L, H, D]
        # T5 folds the scale into its weights: logits are plain dot products plus the bias.
        out = attention(q, k, v, mask=bias, scale=1.0)  # [B, L, H, D]
        return self.o(out.reshape(b, length, -1))


class T5FeedForward(nn.Module):
    """Gated GELU (tanh approximation): fc2(fc1(x) * gelu(gate(x)))."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        # A Sequential so the checkpoint name is the official `ffn.gate.0.weight`.
        self.gate = nn.Sequential(Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = Linear(dim, dim_ffn, bias=False)
        self.fc2 = Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, dim, dim_attn, dim_ffn, num_heads, num_buckets, max_distance, eps):
        super().__init__()
        self.norm1 = T5LayerNorm(dim, eps)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5LayerNorm(dim, eps)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads, max_distance)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        bias = self.pos_embedding(length, length).to(x.dtype)  # [1, H, L, L]
        # Padded keys get the most negative finite logit, as in the reference (not -inf,
        # which would turn a fully padded row into NaN).
        bias = bias.masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)  # [B, H, L, L]
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder stack; the defaults are umT5-XXL as used by every Wan2.1 model."""

    def __init__(
        self,
        vocab_size: int = 256384,
        dim: int = 4096,
        dim_attn: int = 4096,
        dim_ffn: int = 10240,
        num_heads: int = 64,
        num_layers: int = 24,
        num_buckets: int = 32,
        max_distance: int = 128,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.vocab_size, self.dim, self.dim_attn, self.dim_ffn = vocab_size, dim, dim_attn, dim_ffn
        self.num_heads, self.num_layers, self.num_buckets = num_heads, num_layers, num_buckets
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            T5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets, max_distance, eps) for _ in range(num_layers)
        )
        self.norm = T5LayerNorm(dim, eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L], attention_mask [B, L] (nonzero = real token) -> last hidden state [B, L, dim]."""
        if attention_mask is None:
            keep = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            keep = attention_mask.to(input_ids.device) != 0  # [B, L]
        x = self.token_embedding(input_ids)  # [B, L, dim]
        for block in self.blocks:
            x = block(x, keep)
        return self.norm(x)
