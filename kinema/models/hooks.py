"""Block hooks: what a sampler adds around a transformer's blocks, composed in a defined order.

Step caching (reuse the blocks' last residual), skip-layer guidance (skip chosen blocks
in one guidance branch), Enhance-A-Video and RIFLEx all change what happens between a
model's embedding and its head, one sampling step at a time. Instead of one slot owned
by one feature, a forward takes any number of `BlockHook`s:

- `around_blocks(run, tokens, inputs, step)` wraps the whole stack of blocks: it may run
  it (`run(tokens, inputs, step)`), run it on some batch rows (`run(tokens[i], inputs.rows(i),
  step.rows(i))`, so the hooks inside see those rows' branches), or not at all (a cache hit);
- `around_block(index, run, tokens, inputs, step)` wraps each block the same way.

Hooks are sorted by `order` (lower is outer: it sees the call first and the result
last); ties keep the order given. `step` is the sampler's step context
(kinema.sampling.context.StepContext) or None outside sampling. Weight placement
(block swap, streaming) and the fp16 guard are torch forward hooks on the block modules
themselves, so they act inside every one of these, whatever calls a block.
The model stays stateless: the hooks own their state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kinema.ops.feta import Enhance


@dataclass
class BlockInputs:
    """What every block of a Wan DiT call sees besides the token stream."""

    e: torch.Tensor  # [B, dim] time embedding (the head's modulation input)
    e0: torch.Tensor  # [B, 6, dim] the blocks' modulation input
    rope: torch.Tensor  # RoPE table for the token grid
    context: torch.Tensor  # [B, L_text, dim] embedded text
    image_context: torch.Tensor | None  # [B, N_clip, dim] embedded CLIP tokens (i2v / flf2v) or None
    grid: tuple[int, int, int]  # latent token grid (frames, height, width)
    attention: object = "sdpa"  # the attention backend the blocks use: a name, or a split sequence's (kinema/parallel)
    # [B, 1, 1, L_text] float32 added to the cross-attention logits: the log-count of the folded padding rows
    # (kinema/models/text_padding.py), or None when the context is not folded
    context_bias: torch.Tensor | None = None
    enhance: Enhance | None = None  # Enhance-A-Video on the self-attention of this call (a hook sets it) or None

    def rows(self, index: torch.Tensor) -> BlockInputs:
        """The same inputs for the batch rows `index` (int64 [k])."""
        image = None if self.image_context is None else self.image_context[index]
        bias = None if self.context_bias is None else self.context_bias[index]
        return replace(self, e=self.e[index], e0=self.e0[index], context=self.context[index], image_context=image,
                       context_bias=bias)


class BlockHook:
    """Base class: override `around_blocks`, `around_block` or both; `order` places the hook (lower is outer)."""

    order: int = 0

    def around_blocks(self, run, tokens: torch.Tensor, inputs: BlockInputs, step) -> torch.Tensor:
        return run(tokens, inputs, step)

    def around_block(self, index: int, run, tokens: torch.Tensor, inputs: BlockInputs, step) -> torch.Tensor:
        return run(tokens, inputs, step)


def _overrides(hook: BlockHook, name: str) -> bool:
    return getattr(type(hook), name) is not getattr(BlockHook, name)


def _call(block, x: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
    if inp.enhance is None:  # the seven arguments every block wrapper (block swap, compile, parallel) knows
        return block(x, inp.e0, inp.rope, inp.context, inp.image_context, inp.attention, inp.context_bias)
    return block(x, inp.e0, inp.rope, inp.context, inp.image_context, inp.attention, inp.context_bias, inp.enhance)


def run_hooked(blocks, tokens: torch.Tensor, inputs: BlockInputs, hooks=(), step=None) -> torch.Tensor:
    """Run `blocks` (each called as block(tokens, e0, rope, context, image_context, attention, context_bias
    [, enhance])) with `hooks` composed. Each hook's `run` takes (tokens, inputs, step): a hook that runs some
    batch rows hands on the step of those rows."""
    hooks = sorted(hooks, key=lambda h: h.order)
    per_block = [h for h in hooks if _overrides(h, "around_block")]

    def one(index: int, block):
        def run(x, inp, st):
            return _call(block, x, inp)

        for h in reversed(per_block):  # the first (outermost) hook wraps the others
            run = (lambda h, inner: lambda x, inp, st: h.around_block(index, inner, x, inp, st))(h, run)
        return run

    def stack(x, inp, st):
        for index, block in enumerate(blocks):
            x = one(index, block)(x, inp, st) if per_block else _call(block, x, inp)
        return x

    run = stack
    for h in reversed([h for h in hooks if _overrides(h, "around_blocks")]):
        run = (lambda h, inner: lambda x, inp, st: h.around_blocks(inner, x, inp, st))(h, run)
    return run(tokens, inputs, step)
