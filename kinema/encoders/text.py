"""Prompts in, per-prompt umT5 embeddings out: the text conditioning of every Wan2.1 model.

Like the reference `T5EncoderModel.__call__`, each prompt's embedding is cut
to its real length (its tokens plus </s>); the DiT pads them again itself.
Prompts are batched to the longest one, not to 512 tokens: with the attention
mask the real positions come out the same.
"""

from __future__ import annotations

import torch

from kinema.models.t5 import UMT5Encoder
from kinema.text.tokenizer import UMT5Tokenizer


class TextEncoder:
    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    @torch.no_grad()
    def encode(self, texts: str | list[str]) -> list[torch.Tensor]:
        """One [L_i, dim] tensor per prompt, L_i = its token count including </s> (at most 512)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        ids, mask = self.tokenizer(texts)  # [B, L]
        out = self.model(ids.to(self.device), mask.to(self.device))  # [B, L, dim]
        return [u[:n] for u, n in zip(out, mask.sum(dim=1).tolist())]

    def __repr__(self) -> str:
        m = self.model
        return (
            f"TextEncoder(umT5 dim={m.dim}, layers={m.num_layers}, heads={m.num_heads}, "
            f"dtype={self.dtype}, device={self.device}, tokenizer={self.tokenizer.source!r})"
        )
