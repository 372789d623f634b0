"""Ulysses (DeepSpeed-Ulysses): trade the sequence split for a head split around attention, by all-to-all.

Each of the U ranks of a Ulysses group holds a chunk of the tokens with every head. Attention
needs every token, but each head is independent: one all-to-all gives every rank all the group's
tokens for H / U of the heads, attention runs on that, and the inverse all-to-all gives each rank
its own tokens back with every head. Two all-to-alls of q, k, v and one of the output per
self-attention, each moving (U - 1) / U of the data; nothing else of the model changes. The heads
must divide by U (the 1.3B model's 12 heads rule out U = 8: ring attention covers the rest).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kinema.errors import KinemaError
from kinema.parallel.mesh import Group


def check_heads(heads: int, ulysses: int, ring: int = 1, name: str = "--ulysses_size") -> None:
    """Ulysses splits the heads: a degree that does not divide them is an error suggesting ring attention."""
    if heads % ulysses == 0:
        return
    total = ulysses * ring
    ok = [d for d in range(1, heads + 1) if heads % d == 0 and total % d == 0]
    u = max(ok)
    raise KinemaError(
        f"{name} {ulysses}: the DiT has {heads} attention heads, which do not divide by {ulysses} (Ulysses gives each "
        f"rank heads / U of them). Use a Ulysses degree that divides {heads} and make up the rest with ring attention, "
        f"e.g. --ulysses_size {u} --ring_size {total // u} for the same {total} processes.")


def _all_to_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    """x [U, ...]: slice i goes to member i; returns [U, ...] with slice i from member i."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group.handle)
    return out


def heads_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[B, c, H, D] (this rank's chunk, every head) -> [B, U * c, H / U, D] (the group's chunks, in order, this
    rank's share of the heads)."""
    u = group.size
    b, c, h, d = x.shape
    parts = x.reshape(b, c, u, h // u, d).permute(2, 0, 1, 3, 4)  # [U (head group), B, c, H/U, D]
    got = _all_to_all(parts, group)  # [U (source rank = chunk), B, c, H/U, D]
    return got.permute(1, 0, 2, 3, 4).reshape(b, u * c, h // u, d)


def sequence_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The inverse: [B, U * c, H / U, D] -> [B, c, H, D]."""
    u = group.size
    b, n, hu, d = x.shape
    c = n // u
    parts = x.reshape(b, u, c, hu, d).permute(1, 0, 2, 3, 4)  # [U (chunk), B, c, H/U, D]
    got = _all_to_all(parts, group)  # [U (head group), B, c, H/U, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, c, u * hu, d)
