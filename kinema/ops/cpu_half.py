"""bf16 / fp16 on the CPU: attention and matrix multiplies run native or in float32, chosen per shape by
measuring on this machine.

Which is faster depends on the CPU and the shape, and by a lot: on an Intel Xeon with AMX,
PyTorch's bf16 SDPA took 45 ms where its fp32 SDPA took 119 ms (8 heads x 3456 tokens x 64),
while on an AMD EPYC with AVX-512 BF16 but no AMX both took 164 ms at that size, and fp16 has
no fast CPU kernel on either (bench/cpu_attention.py prints the table for the machine it runs
on). Matrix multiplies differ more: on an AVX2-only AMD EPYC (no AVX-512), a bf16 `F.linear` of
1024 x 1536 by 1536 x 8960 took 1351 ms and the same in float32, both operands cast up and the
result cast back, 227 ms (6x), where an AVX-512 BF16 or AMX machine runs bf16 faster than float32.
Instruction sets come and go between machines, so no table written here can hold for all: the first
call of each shape class times both ways on its own inputs (twice each, the faster of the two runs
kept, so one-time set-up costs do not decide; a way that lost the first run by more than 2x is not
run again), and the winner is kept for the process.

- Attention: a shape class is (dtype, head dim, batch x heads, query and key lengths rounded up to a
  power of two); a sampling run meets two or three classes (self-attention, text and image
  cross-attention) and pays for the race once, about four extra attention calls in all.
- Linear layers (`linear`, which Kinema's models call for every weight matrix): a class is (dtype,
  weight shape, bias or not, rows rounded up to a power of two, at most RACE_ROWS); the race runs on
  the first RACE_ROWS rows of the input only, so a slow way costs a bounded time whatever the token
  count. The float32 way casts the weight for each call (the model keeps its half-precision weights:
  no second copy is held).

The two ways differ in the last bits, so two processes may round a bf16 run differently; setting
KINEMA_CPU_HALF=native or =float32 skips the races and pins the way of both (bit-for-bit runs).
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
PIN_VARIABLE = "KINEMA_CPU_HALF"
RACE_ROWS = 512  # a linear layer's race runs on at most this many rows of its input
HALF = (torch.bfloat16, torch.float16)


@dataclasses.dataclass
class CpuHalfChoices:
    """The way each shape class of half-precision CPU attention and linear layers runs, found by timing (shape
    class -> way)."""

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


def pinned_way() -> str | None:
    """The way KINEMA_CPU_HALF pins, or None to measure."""
    pinned = os.environ.get(PIN_VARIABLE)
    if pinned and pinned not in WAYS:
        raise KinemaError(f"{PIN_VARIABLE}={pinned!r}: use one of {', '.join(WAYS)}, or unset it to measure.")
    return pinned or None


def race(key: tuple, ways: dict, choices: CpuHalfChoices) -> tuple[str, object]:
    """The kept way of a shape class, or (the first time) the faster of `ways` (name -> a call with no
    arguments) by timing each, and the winner's output of its race (None when the class was known)."""
    way = choices.ways.get(key)
    if way is not None:
        return way, None
    with choices.lock:  # one race per class, also when several threads meet it at once
        way = choices.ways.get(key)
        if way is not None:
            return way, None
        best, outs = {}, {}
        for name, run in ways.items():
            t0 = time.perf_counter()
            outs[name] = run()
            best[name] = time.perf_counter() - t0
        for name, run in ways.items():  # the second run of each, unless it lost the first by more than 2x
            if best[name] <= 2 * min(best.values()):
                t0 = time.perf_counter()
                outs[name] = run()
                best[name] = min(best[name], time.perf_counter() - t0)
        way = min(ways, key=best.__getitem__)
        choices.timings[key], choices.ways[key] = best, way
    return way, outs[way]


def cpu_half_attention(q, k, v, mask, scale, choices: CpuHalfChoices = CHOICES) -> torch.Tensor:
    """bf16 / fp16 CPU attention the faster way for this shape on this machine ([B, L, H, D] in and out)."""
    way = pinned_way()
    if way is None:
        way, out = race(shape_class(q, k), {name: (lambda f=RUN[name]: f(q, k, v, mask, scale)) for name in WAYS}, choices)
        if out is not None:
            return out
    return RUN[way](q, k, v, mask, scale)


def linear_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in float32 (input, weight and bias cast up), the result cast back to the weight's dtype."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(weight.dtype)


LINEAR = {"native": F.linear, "float32": linear_float32}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           choices: CpuHalfChoices = CHOICES) -> torch.Tensor:
    """`F.linear(x, weight, bias)` (x in the weight's dtype), the faster way on this machine for a bf16 / fp16
    weight on the CPU: native or in float32 (see the module's note); every other call is F.linear itself."""
    if weight.dtype not in HALF or weight.device.type != "cpu" or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    way = pinned_way()
    if way is None:
        rows = x.numel() // max(1, x.shape[-1])
        key = ("linear", weight.dtype, tuple(weight.shape), bias is not None, min(_pow2(rows), RACE_ROWS),
               torch.get_num_threads())
        way = choices.ways.get(key)
        if way is None:  # the first call of the class: race on its first RACE_ROWS rows
            head = x.reshape(-1, x.shape[-1])[:RACE_ROWS].detach()
            with torch.no_grad():
                way, out = race(key, {name: (lambda f=LINEAR[name]: f(head, weight, bias)) for name in WAYS}, choices)
            if out is not None and rows <= RACE_ROWS and not torch.is_grad_enabled():
                return out.reshape(*x.shape[:-1], weight.shape[0])
    return LINEAR[way](x, weight, bias)
