"""bf16 / fp16 attention on the CPU: native or in float32, chosen per shape by measuring on this machine.

Which is faster depends on the CPU and the shape, and by a lot: on an Intel Xeon with AMX,
PyTorch's bf16 SDPA took 45 ms where its fp32 SDPA took 119 ms (8 heads x 3456 tokens x 64),
while on an AMD EPYC with AVX-512 BF16 but no AMX both took 164 ms at that size, and fp16 has
no fast CPU kernel on either (bench/cpu_attention.py prints the table for the machine it runs
on). Instruction sets come and go between machines, so no table written here can hold for all:
the first call of each shape class times both ways on its own inputs (twice each, the faster
of the two runs kept, so one-time set-up costs do not decide), and the winner is kept for the
process. A shape class is (dtype, head dim, batch x heads, query and key lengths rounded up to
a power of two): a sampling run meets two or three classes (self-attention, text and image
cross-attention) and pays for the race once, about four extra attention calls in all.

The two ways differ in the last bits, so two processes may round a bf16 run differently; setting
KINEMA_CPU_HALF_ATTENTION=native or =float32 skips the race and pins the way (bit-for-bit runs).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import torch
import torch.nn.functional as F

from kinema.errors import KinemaError

CPU_HEAD_GROUP_BYTES = 64 << 20  # float32 q of one group of heads at most this big (at least one head)
WAYS = ("native", "float32")
PIN_VARIABLE = "KINEMA_CPU_HALF_ATTENTION"


@dataclasses.dataclass
class CpuHalfChoices:
    """The way each shape class of half-precision CPU attention runs, found by timing (shape class -> way)."""

    ways: dict[tuple, str] = dataclasses.field(default_factory=dict)
    timings: dict[tuple, dict[str, float]] = dataclasses.field(default_factory=dict)  # seconds, for reports
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


CHOICES = CpuHalfChoices()  # one per process: the measurements describe this machine, like a kernel cache


def shape_class(q: torch.Tensor, k: torch.Tensor) -> tuple:
    b, lq, h, d = q.shape
    return (q.dtype, d, b * h, _pow2(lq), _pow2(k.shape[1]), torch.get_num_threads())


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """PyTorch's SDPA in Kinema's layout ([B, L, H, D] in and out)."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, H, Lq, D]
    return out.transpose(1, 2)


def in_float32(q, k, v, mask, scale) -> torch.Tensor:
    """The attention in float32, a group of heads at a time (so the float32 copies stay small), cast back."""
    B, Lq, H, D = q.shape
    group = max(1, min(H, CPU_HEAD_GROUP_BYTES // max(1, 4 * B * Lq * D)))
    per_head = mask is not None and mask.dim() == 4 and mask.shape[1] == H > 1  # e.g. umT5's position bias
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    out = torch.empty(B, Lq, H, D, dtype=v.dtype, device=v.device)
    for h in range(0, H, group):
        heads = slice(h, h + group)
        m = mask[:, heads] if per_head else mask
        out[:, :, heads] = sdpa(q[:, :, heads].float(), k[:, :, heads].float(), v[:, :, heads].float(), m, scale)
    return out


def native(q, k, v, mask, scale) -> torch.Tensor:
    """The attention in the inputs' own half precision, with PyTorch's CPU kernel (float32 accumulation)."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()  # the CPU kernel takes a float32 bias with half inputs: the bias is not rounded
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


RUN = {"native": native, "float32": in_float32}


def cpu_half_attention(q, k, v, mask, scale, choices: CpuHalfChoices = CHOICES) -> torch.Tensor:
    """bf16 / fp16 CPU attention the faster way for this shape on this machine ([B, L, H, D] in and out)."""
    pinned = os.environ.get(PIN_VARIABLE)
    if pinned:
        if pinned not in RUN:
            raise KinemaError(f"{PIN_VARIABLE}={pinned!r}: use one of {', '.join(WAYS)}, or unset it to measure.")
        return RUN[pinned](q, k, v, mask, scale)
    key = shape_class(q, k)
    way = choices.ways.get(key)
    if way is not None:
        return RUN[way](q, k, v, mask, scale)
    with choices.lock:  # one race per class, also when several threads meet it at once
        way = choices.ways.get(key)
        if way is not None:
            return RUN[way](q, k, v, mask, scale)
        best, outs = {}, {}
        for name in WAYS:
            t0 = time.perf_counter()
            outs[name] = RUN[name](q, k, v, mask, scale)
            best[name] = time.perf_counter() - t0
        for name in WAYS:  # the second run of each, unless it lost the first by more than 2x (fp16's can be slow)
            if best[name] <= 2 * min(best.values()):
                t0 = time.perf_counter()
                outs[name] = RUN[name](q, k, v, mask, scale)
                best[name] = min(best[name], time.perf_counter() - t0)
        way = min(WAYS, key=best.__getitem__)
        choices.timings[key], choices.ways[key] = best, way
    return outs[way]
