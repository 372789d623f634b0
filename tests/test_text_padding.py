"""The zero padding of the text context folded into one cross-attention key: the same result as attending to
every padding row, for one prompt, for a batch of prompts of different lengths, and through the whole DiT."""

from __future__ import annotations

import math

import pytest
import torch

from kinema.models import dit as dit_module
from kinema.models.dit import DiTConfig, WanDiT
from kinema.models.text_padding import fold_padding


def padded(lengths, total=64, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(len(lengths), total, dim)
    for i, n in enumerate(lengths):
        ctx[i, :n] = torch.randn(n, dim, generator=g)
    return ctx


def test_fold_keeps_the_longest_prompt_and_one_row_with_its_log_count():
    ctx = padded([5, 9])
    folded, bias = fold_padding(ctx)
    assert folded.shape == (2, 10, 16) and torch.equal(folded, ctx[:, :10])
    assert bias.shape == (2, 1, 1, 10) and bias.dtype == torch.float32
    assert torch.all(bias[0, 0, 0, :5] == 0) and torch.allclose(bias[0, 0, 0, 5:], torch.full((5,), math.log(59 / 5)))
    assert torch.all(bias[1, 0, 0, :9] == 0) and bias[1, 0, 0, 9].item() == pytest.approx(math.log(55))


def test_nothing_to_fold():
    ctx = padded([63, 64])
    folded, bias = fold_padding(ctx)
    assert folded is ctx and bias is None


@pytest.mark.parametrize("lengths", [[7], [3, 20], [64, 2], [0, 5]])
def test_folded_cross_attention_equals_the_padded_one(lengths):
    torch.manual_seed(0)
    cfg = DiTConfig("t2v", dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=16, text_len=64)
    model = WanDiT(cfg).eval()
    ctx = padded(lengths)
    x = torch.randn(len(lengths), 40, 32)
    with torch.no_grad():
        emb = model.text_embedding(ctx)
        want = model.blocks[0].cross_attn(x, emb, None)
        folded, bias = fold_padding(ctx)
        got = model.blocks[0].cross_attn(x, model.text_embedding(folded), None, context_bias=bias)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item() + 1e-6


def test_the_dit_folds_its_context_exactly(monkeypatch):
    """A whole forward (guided batch: two prompts of different lengths) with and without the fold."""
    torch.manual_seed(0)
    cfg = DiTConfig("t2v", dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=24, text_len=128)
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 16, 2, 8, 8)
    ctx = padded([11, 30], total=128, dim=24)
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        folded = model(x, t, ctx)
        monkeypatch.setattr(dit_module, "fold_padding", lambda c: (c, None))
        full = model(x, t, ctx)
    assert (folded - full).abs().max().item() < 1e-5 * full.abs().max().item()
    assert not torch.equal(folded, full)  # the fold ran (else this test would not test it)
