"""Ring attention: each rank keeps its queries and passes its keys and values around a ring of R ranks.

At each of the R steps a rank attends its queries to the K/V segment it holds, while sending that
segment on to the next rank and receiving the previous rank's (the transfer overlaps the compute).
Each step's partial output o_i comes with the log-sum-exp l_i of its logits per query and head;
softmax over the whole sequence is their merge, in float32:

    l = log(sum_i exp(l_i)),    o = sum_i exp(l_i - l) o_i

Padding keys (the sequence is padded to a multiple of the ranks) are cut off each segment before
its step, so they take no weight and no kernel needs a mask; a segment of padding only is skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kinema.parallel.mesh import Group


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention q [B, Lq, H, D], k / v [B, Lk, H, D] -> (out [B, Lq, H, D] float32, lse [B, Lq, H] float32),
    with PyTorch's kernels that return the log-sum-exp (flash / memory-efficient on CUDA, flash on the CPU)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    elif q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
    else:
        return _math_lse(q, k, v)
    lse = lse[..., : q.shape[1]]  # the memory-efficient kernel pads its lse to a multiple of 32 queries
    return out.transpose(1, 2).float(), lse.transpose(1, 2).float()


def _math_lse(q, k, v):
    """The same in plain operations (any device; [B, H, Lq, Lk] logits in memory)."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = logits.logsumexp(-1)  # [B, H, Lq]
    out = torch.einsum("bhqk,bkhd->bqhd", (logits - lse[..., None]).exp(), v.float())
    return out, lse.transpose(1, 2)


def merge(out: torch.Tensor | None, lse: torch.Tensor | None, part: torch.Tensor, part_lse: torch.Tensor):
    """Two partial attentions over disjoint keys -> their attention over both (float32)."""
    if out is None:
        return part, part_lse
    total = torch.logaddexp(lse, part_lse)  # [B, L, H]
    return out * (lse - total).exp()[..., None] + part * (part_lse - total).exp()[..., None], total


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: list[int], group: Group) -> torch.Tensor:
    """q, k, v [B, S, H, D]: this rank's segment of the sequence; valid[i]: the real (unpadded) tokens of member
    i's segment. Returns the attention of q over every member's real keys, [B, S, H, D] in v's dtype."""
    n, me = group.size, group.index
    kv = torch.stack([k, v]).contiguous()  # [2, B, S, H, D]: one message per step
    out = lse = None
    for i in range(n):
        holder = (me - i) % n  # whose segment `kv` is at this step
        if i + 1 < n:
            incoming = torch.empty_like(kv)
            ops = [dist.P2POp(dist.isend, kv, group.peer(me + 1), group.handle),
                   dist.P2POp(dist.irecv, incoming, group.peer(me - 1), group.handle)]
            pending = dist.batch_isend_irecv(ops)
        keep = valid[holder]
        if keep > 0:
            part, part_lse = attention_lse(q, kv[0][:, :keep], kv[1][:, :keep])
            out, lse = merge(out, lse, part, part_lse)
        if i + 1 < n:
            for request in pending:
                request.wait()
            kv = incoming
    return out.to(v.dtype)


def segment_lengths(length: int, segment: int, n: int) -> list[int]:
    """The real tokens in each of n segments of `segment` tokens of a sequence of `length` real tokens padded."""
    return [max(0, min(segment, length - i * segment)) for i in range(n)]

