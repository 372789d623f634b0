import math

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (max abs value)."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def randomise_vae(model: torch.nn.Module, gen: torch.Generator, out_conv: torch.nn.Module) -> None:
    """Every weight of a Wan VAE (Kinema's or diffusers') random and O(1)-scaled, so each path (shortcuts,
    attention, time convs) shows in the output; `out_conv`, the decoder's last conv, is scaled down so decoded
    pixels stay mostly inside [-1, 1] and the final clamp hides no differences."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
        out_conv.weight.mul_(0.3)


class StubTextEncoder:
    """A deterministic stand-in for umT5 (the text path is covered by its own parity tests)."""

    def encode(self, prompts):
        return [torch.randn(3 + len(p) % 5, 16, generator=torch.Generator().manual_seed(len(p))) for p in prompts]
