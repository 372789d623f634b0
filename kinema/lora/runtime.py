"""LoRAs left unmerged: each adapted layer adds strength * scale * B(A(x)) to its output at run time, the
strength read from a per-step schedule (e.g. a step-distillation LoRA at full strength early, less late).

A `RuntimeLoRA` is a block hook (kinema/models/hooks.py): around each DiT call it sets its `LoRAState.strength`
from the sampler's step context, and forward hooks on the adapted Linear layers read that record. Nothing is
written into the weights, so fp8 layers, block swap and streaming see them unchanged, and taking the hooks off
(`remove()`) restores the model exactly. Only low-rank pairs run this way; full deltas (LightX2V diff, LoKr,
LoHa) are merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kinema.errors import KinemaError
from kinema.models.hooks import BlockHook


@dataclass(frozen=True)
class LoRASchedule:
    """Strengths over the sampling steps: one value for every step, or one per step (the last repeated for
    steps past the list, as ComfyUI-WanVideoWrapper's strength lists)."""

    strengths: tuple[float, ...]

    def __post_init__(self):
        if not self.strengths or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in self.strengths):
            raise KinemaError(f"LoRA strengths {list(self.strengths)} must be finite numbers (one, or one per step).")

    def at(self, step: int | None) -> float:
        if step is None:  # outside sampling: the first strength
            return float(self.strengths[0])
        return float(self.strengths[min(step, len(self.strengths) - 1)])

    def describe(self) -> str:
        s = self.strengths
        return f"{s[0]:g}" if len(s) == 1 else ",".join(f"{v:g}" for v in s)


@dataclass
class LoRAState:
    """The strength the adapted layers apply now (set by the hook for each DiT call)."""

    strength: float = 0.0


@dataclass
class RuntimeLoRA(BlockHook):
    """An unmerged LoRA on a model: its layers' forward hooks, and the schedule its block hook applies."""

    name: str
    schedule: LoRASchedule
    state: LoRAState = field(default_factory=LoRAState)
    handles: list = field(default_factory=list, repr=False)
    order: int = -10  # outside every other hook: the strength is set before anything runs the blocks

    def around_blocks(self, run, tokens, inputs, step):
        self.state.strength = self.schedule.at(None if step is None else step.step)
        return run(tokens, inputs, step)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach_lora(model: nn.Module, weights, schedule: LoRASchedule, name: str = "LoRA") -> RuntimeLoRA:
    """Hook the low-rank pairs of `weights` ({module: (A, B, alpha)}, checked against the model) onto `model`'s
    Linear layers, unmerged; returns the RuntimeLoRA whose block hook drives the strength."""
    from kinema.lora.network import check_lora

    full = [n for n, u in weights.items() if not isinstance(u, tuple)]
    if full:
        raise KinemaError(f"{name}: layer '{full[0]}' holds a full update ({weights[full[0]].describe()}), which only "
                          "merges; merge this LoRA (one strength) instead of running it unmerged.")
    check_lora(model, weights, name)
    hook = RuntimeLoRA(name, schedule)
    for module_name, (A, B, alpha) in weights.items():
        linear = model.get_submodule(module_name)
        hook.handles.append(linear.register_forward_hook(_adder(A, B, float(alpha) / A.shape[0], hook.state)))
    return hook


def _adder(A: torch.Tensor, B: torch.Tensor, scale: float, state: LoRAState):
    placed: dict = {}

    def add(module, args, output):
        if state.strength == 0:
            return output
        x = args[0]
        key = x.device
        if key not in placed:  # A and B follow the activations (block swap moves the layer, not the adapter)
            placed[key] = (A.to(x.device, torch.float32), B.to(x.device, torch.float32))
        a, b = placed[key]
        update = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b)
        return output + (update * (scale * state.strength)).to(output.dtype)

    return add
