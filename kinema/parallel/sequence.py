"""Sequence parallel: the DiT's video tokens split over the ranks of a sequence group, wrapped from outside.

`SequenceSplit` is a block hook (kinema/models/hooks.py) around the DiT's stack of blocks: it
pads the tokens [B, L, dim] with zero rows to a multiple of the n ranks, gives each rank its
chunk of L' / n tokens and the matching rows of the RoPE table (each token keeps its global
position), runs the blocks on the chunk with `SequenceAttention` as their attention backend, and
gathers the chunks back, the padding dropped, before the head. Everything per token (norms,
modulation, FFN, cross-attention to the whole text, which every rank holds) runs on the chunk
unchanged; only self-attention needs the other ranks' tokens, and gets them through Ulysses
(heads <-> sequence all-to-all) and / or ring attention (K/V around a ring), U x R = n.

Hooks see the chunk: RIFLEx (order 10) sets the whole grid's RoPE table before the split (order
50) cuts it; a step cache (order 100) decides from the time embedding, the same on every rank,
and keeps each rank's residual of its own chunk; skip-layer guidance leaves out the same blocks on
every rank. A context window's tokens are split the same way as a whole video's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from kinema.models.hooks import BlockHook
from kinema.ops.attention import attention
from kinema.parallel.mesh import Group, Mesh
from kinema.parallel.ring import ring_attention, segment_lengths
from kinema.parallel.ulysses import heads_to_sequence, sequence_to_heads


@dataclass(frozen=True, eq=False)
class SequenceAttention:
    """The self-attention backend of a sequence split over a sequence group (kinema.ops.attention's
    `sequence_attention` calls it; cross-attention runs on `local`, its keys being whole on every rank)."""

    local: str  # the backend of this rank's own attention calls
    mesh: Mesh
    length: int  # real tokens in the whole sequence
    chunk: int  # tokens each rank holds (the sequence padded to a multiple of the ranks, split)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, chunk, H, D] -> this rank's rows of the attention over the whole sequence [B, chunk, H, D]."""
        ulysses, ring = self.mesh.ulysses, self.mesh.ring
        if ulysses.size > 1:
            q, k, v = (heads_to_sequence(t, ulysses) for t in (q, k, v))  # [B, U * chunk, H / U, D]
        valid = segment_lengths(self.length, ulysses.size * self.chunk, ring.size)  # real keys per ring segment
        if ring.size > 1:
            out = ring_attention(q, k, v, valid, ring)
        else:
            out = attention(q, k[:, : valid[0]], v[:, : valid[0]], backend=self.local)  # padding keys cut off
        return sequence_to_heads(out, ulysses) if ulysses.size > 1 else out


def _pad_rows(x: torch.Tensor, rows: int, dim: int, fill: float | complex = 0.0) -> torch.Tensor:
    missing = rows - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, torch.full(shape, fill, dtype=x.dtype, device=x.device)], dim=dim)


def gather_chunks(chunk: torch.Tensor, group: Group, dim: int = 1) -> torch.Tensor:
    """Every member's chunk, concatenated along `dim` in member order."""
    parts = [torch.empty_like(chunk) for _ in range(group.size)]
    dist.all_gather(parts, chunk.contiguous(), group=group.handle)
    return torch.cat(parts, dim=dim)


class SequenceSplit(BlockHook):
    """The block hook that runs the DiT's blocks on this rank's chunk of the tokens (see the module doc)."""

    order = 50  # inside RIFLEx (10: its table is cut here), outside Enhance-A-Video (60) and the step cache (100)

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def around_blocks(self, run, tokens, inputs, step):
        group = self.mesh.sequence
        n, me = group.size, group.index
        length = tokens.shape[1]
        chunk = -(-length // n)
        rows = slice(me * chunk, (me + 1) * chunk)
        local = _pad_rows(tokens, n * chunk, 1)[:, rows]  # [B, chunk, dim]
        rope = _pad_rows(inputs.rope, n * chunk, 0, complex(1.0, 0.0))[rows]  # [chunk, D/2]: global positions
        backend = SequenceAttention(inputs.attention, self.mesh, length, chunk)
        if step is not None:
            step = replace(step, rank=me, world_size=n)
        out = run(local, replace(inputs, rope=rope, attention=backend), step)  # [B, chunk, dim]
        return gather_chunks(out, group)[:, :length]  # [B, L, dim], the padding dropped


def sequence_hooks(mesh: Mesh | None) -> tuple[BlockHook, ...]:
    """The hooks a run adds to split its tokens: none without a sequence group."""
    return (SequenceSplit(mesh),) if mesh is not None and mesh.sequence.size > 1 else ()
