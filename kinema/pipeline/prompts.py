"""Stage: encode the prompts. Prompt (and negative prompt) -> padded umT5 context for the DiT."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kinema.pipeline.tasks import TEXT_LEN


@dataclass
class Prompts:
    """The text context of each guidance branch."""

    cond: torch.Tensor  # [1, text_len, text_dim]
    uncond: torch.Tensor | None  # [1, text_len, text_dim]; None without guidance (guide_scale 1)


def pad_context(embs: list[torch.Tensor], length: int = TEXT_LEN) -> torch.Tensor:
    """Text embeddings [L_i, D] -> [B, length, D], zero-padded as the reference pads before the DiT,
    and cut to `length` tokens (the reference's tokenizer never gives more than text_len)."""
    return torch.stack([torch.cat([e[:length], e.new_zeros(max(0, length - e.shape[0]), e.shape[1])]) for e in embs])


@torch.no_grad()
def encode_prompts(text_encoder, prompt: str, negative_prompt: str | None, text_len: int = TEXT_LEN,
                   device: torch.device | str = "cpu") -> Prompts:
    """umT5 embeddings of the prompt and, when given (guided runs), the negative prompt, padded to `text_len`
    tokens on `device`. The two are encoded in one batch, as the reference does."""
    embs = text_encoder.encode([prompt] + ([negative_prompt] if negative_prompt is not None else []))
    context = pad_context([e.to(device) for e in embs], text_len)  # [1 or 2, text_len, text_dim]
    return Prompts(context[:1], context[1:] if negative_prompt is not None else None)
