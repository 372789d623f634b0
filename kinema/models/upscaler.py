"""A learned x2 video upscaler: the residual over a bicubic upscale, predicted from the frames and their neighbours.

Each stage takes video [B, 3, F, H, W] in [-1, 1] and returns [B, 3, F, 2H, 2W]: b + r(b), b = bicubic(x), where
r is a small temporal network on the bicubic frames (3D convolutions see the frames before and after, so edges
move consistently from frame to frame). A cascade of stages raises the resolution x2 at a time (the second
brief's progressive super-resolution).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UpscalerConfig:
    dim: int = 16  # channels of the trunk (at the high resolution)
    blocks: int = 3  # residual blocks of the trunk
    frames: int = 3  # temporal kernel size of the trunk's convolutions (1: frame by frame)

    def to_dict(self) -> dict:
        return asdict(self)


TAIL_INIT = 0.1  # a new stage starts near plain bicubic (a zero tail would pass no gradient back)
SLOPE = 0.1  # leaky ReLU: no unit can die (with SiLU, a loss spike drove stages back to plain bicubic for good)


def _conv(cin: int, cout: int, t: int, k: int = 3) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, (t, k, k), padding=(t // 2, k // 2, k // 2))


class _Block(nn.Module):
    def __init__(self, dim: int, t: int):
        super().__init__()
        self.conv1, self.conv2 = _conv(dim, dim, t), _conv(dim, dim, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), SLOPE))


class Upscaler2x(nn.Module):
    """One x2 stage: bicubic, plus a residual the trunk predicts from the bicubic frames and their neighbours
    (at the high resolution, so the residual at a pixel is a function of the same neighbourhood wherever the
    pixel falls between the low-resolution ones)."""

    def __init__(self, config: UpscalerConfig = UpscalerConfig()):
        super().__init__()
        c = self.config = config
        self.head = _conv(3, c.dim, c.frames)
        self.blocks = nn.Sequential(*[_Block(c.dim, c.frames) for _ in range(c.blocks)])
        self.tail = _conv(c.dim, 3, 1)
        with torch.no_grad():
            self.tail.weight.mul_(TAIL_INIT)
            self.tail.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, F, H, W] -> [B, 3, F, 2H, 2W]
        b, _, f, h, w = x.shape
        base = F.interpolate(x.transpose(1, 2).reshape(b * f, 3, h, w), scale_factor=2, mode="bicubic",
                             align_corners=False).view(b, f, 3, 2 * h, 2 * w).transpose(1, 2)
        return base + self.tail(F.leaky_relu(self.blocks(F.leaky_relu(self.head(base), SLOPE)), SLOPE))

    @property
    def receptive(self) -> tuple[int, int]:
        """(frames, low-resolution pixels) an output sees on each side: a tile margin that makes a tiled run
        exact. Temporal: the head and the blocks' convolutions; spatial: every convolution's pixel at the high
        resolution (half a low-resolution one each, rounded up) and bicubic's two low-resolution pixels."""
        c = self.config
        layers = 2 + 2 * c.blocks
        return (layers - 1) * (c.frames // 2), -(-layers // 2) + 2


class UpscalerCascade(nn.Module):
    """x2 stages run in order: len(stages) = log2 of the factor."""

    def __init__(self, stages: list[Upscaler2x]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    @property
    def factor(self) -> int:
        return 2 ** len(self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x
