"""A procedurally generated video world: one object moving in a straight line on a plain background.

Every clip is described by a `ClipSpec` and rendered deterministically from it;
`random_spec(rng)` draws one from a seeded numpy generator. Captions read
`a {color} {shape} moving {direction} on a {background} background`.

Geometry (in units of the frame's shorter side S): the object is 22-30% of S
across, travels 35-60% of S along its direction over the whole clip (whatever
the frame count) and stays fully inside the frame. Shapes are filled and
anti-aliased by 4x4 supersampling: a circle, an axis-aligned square and an
upward isosceles triangle (base = height), whose fill ratios in their bounding
boxes (pi/4, 1, 1/2) are what the analyser tells them apart by.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "purple": (150, 70, 200),
}
EXTRA_COLORS = {"orange": (245, 140, 30)}  # never in the base training set: the LoRA test colour
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}

SIZE_RANGE = (0.22, 0.30)
TRAVEL_RANGE = (0.35, 0.60)
FPS = 8
FRAMES = 17
SUPERSAMPLE = 4


def palette(name: str) -> tuple[int, int, int]:
    """The sRGB colour of an object colour or background name (or any '#rrggbb')."""
    if name.startswith("#") and len(name) == 7:
        return tuple(int(name[i : i + 2], 16) for i in (1, 3, 5))
    for table in (COLORS, EXTRA_COLORS, BACKGROUNDS):
        if name in table:
            return table[name]
    raise KeyError(name)


@dataclass(frozen=True)
class ClipSpec:
    color: str
    shape: str
    direction: str
    background: str
    size: float  # object width / shorter frame side
    travel: float  # distance travelled / shorter frame side
    start: tuple[float, float]  # object centre at the first frame, in fractions of (width, height)

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.direction, self.background)

    def to_dict(self) -> dict:
        return asdict(self)

    def centre(self, t: float, width: int, height: int) -> tuple[float, float]:
        """Object centre in pixels at clip time t in [0, 1]."""
        s = min(width, height)
        dx, dy = DIRECTIONS[self.direction]
        return self.start[0] * width + dx * self.travel * s * t, self.start[1] * height + dy * self.travel * s * t


def caption(color: str, shape: str, direction: str, background: str) -> str:
    return f"a {color} {shape} moving {direction} on a {background} background"


def all_captions(colors=tuple(COLORS)) -> list[str]:
    """Every valid caption (the object never has the background's colour)."""
    return [caption(c, s, d, b) for c in colors for s in SHAPES for d in DIRECTIONS for b in BACKGROUNDS
            if palette(c) != BACKGROUNDS[b]]


def random_spec(rng: np.random.Generator, width: int = 64, height: int = 64, colors=tuple(COLORS),
                color: str | None = None, shape: str | None = None, direction: str | None = None,
                background: str | None = None) -> ClipSpec:
    """A random clip; any of colour / shape / direction / background can be fixed."""
    color = color or colors[rng.integers(len(colors))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    direction = direction or tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    if background is None:
        allowed = [b for b, rgb in BACKGROUNDS.items() if rgb != palette(color)] or list(BACKGROUNDS)
        background = allowed[rng.integers(len(allowed))]
    size = float(rng.uniform(*SIZE_RANGE))
    travel = float(rng.uniform(*TRAVEL_RANGE))
    s = min(width, height)
    half = size * s / 2 + 1.0  # keep a pixel of margin for the anti-aliased edge
    dx, dy = DIRECTIONS[direction]
    start = []
    for extent, d in ((width, dx), (height, dy)):
        lo, hi = half, extent - half
        if d > 0:
            hi -= travel * s
        elif d < 0:
            lo += travel * s
        start.append(float(rng.uniform(lo, hi)) / extent)
    return ClipSpec(color, shape, direction, background, size, travel, (start[0], start[1]))


def _coverage(shape: str, cx: float, cy: float, side: float, width: int, height: int) -> np.ndarray:
    """Fraction [H, W] of each pixel covered by the shape (4x4 supersampling)."""
    n = SUPERSAMPLE
    offs = (np.arange(n) + 0.5) / n
    ys = (np.arange(height)[:, None] + offs[None, :]).reshape(-1)  # sample centres in pixel units
    xs = (np.arange(width)[:, None] + offs[None, :]).reshape(-1)
    X, Y = xs[None, :] - cx, ys[:, None] - cy
    r = side / 2
    if shape == "circle":
        inside = X**2 + Y**2 <= r**2
    elif shape == "square":
        inside = (np.abs(X) <= r) & (np.abs(Y) <= r)
    elif shape == "triangle":
        # apex at the top centre, base at the bottom: |x| <= r * (y + r) / (2r)
        inside = (Y >= -r) & (Y <= r) & (np.abs(X) <= (Y + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(height, n, width, n).mean(axis=(1, 3))


def render(spec: ClipSpec, width: int = 64, height: int = 64, frames: int = FRAMES) -> np.ndarray:
    """The clip as uint8 frames [F, H, W, 3]."""
    bg = np.array(palette(spec.background), dtype=np.float64)
    fg = np.array(palette(spec.color), dtype=np.float64)
    side = spec.size * min(width, height)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        t = i / (frames - 1) if frames > 1 else 0.0
        cx, cy = spec.centre(t, width, height)
        a = _coverage(spec.shape, cx, cy, side, width, height)[..., None]
        out[i] = np.round(bg * (1 - a) + fg * a).clip(0, 255).astype(np.uint8)
    return out


def to_tensor(frames: np.ndarray):
    """uint8 [F, H, W, 3] -> float tensor [3, F, H, W] in [-1, 1] (the pipeline's video range)."""
    import torch

    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for clip `index` of the world with `seed` (independent of every other clip)."""
    return np.random.default_rng([seed, index])
