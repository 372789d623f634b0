"""Recover a toy-world clip's caption from its frames (rendered, decoded or generated).

The method, for uint8 frames [F, H, W, 3] of any size and frame count:

- background: the median colour of every frame's one-pixel border (the object
  stays inside the frame, so the border is almost all background), named after
  the nearest `BACKGROUNDS` entry (Euclidean RGB distance, reported too);
- object mask: pixels further than `MASK_DIST` (RGB distance) from their
  frame's background, split into 4-connected components (a small label
  propagation in numpy); components under `MIN_AREA` of S^2 (S = the shorter
  frame side) are specks and ignored. A frame has the object `present` when any
  component is left and `single` when exactly one is;
- object colour: the median of the largest component's interior (the mask
  eroded by a pixel, so anti-aliased edges don't bias it, and by up to three
  while a fifth of it is left, so blurred edges don't either) over all frames,
  named after the nearest candidate colour (`COLORS` and `EXTRA_COLORS` by default);
- shape: each pixel's coverage alpha is its colour projected on the
  background -> object colour segment. The fill ratio is the soft area (sum of
  alpha) over the soft bounding box (sum over columns of the column's largest
  alpha, less a noise floor, times the same over rows): clean renders give
  0.78-0.80 for the circle, 1.0 for the square and 0.53-0.56 for the triangle
  (`FILL_RATIO`: pi/4, 1, 1/2), and the noise floor keeps them there under
  pixel noise. Blur, though, rounds the triangle's apex and base corners and
  drags its ratio up towards the circle's (0.65-0.8 after a 5x5 box blur), so
  the triangle is told by the other thing that sets it apart: its width grows
  linearly from apex to base, so its mass along y is skewed (skewness
  -2*sqrt(2)/5 = -0.57, still below -0.37 after that blur; circle and square 0).
  The shape is the triangle when the median |skewness| over frames exceeds
  half of that, else whichever of circle and square is nearer in fill ratio;
- motion: the centroid track of the largest component; the displacement is a
  least-squares line through the present frames' centroids, the direction its
  larger axis and sign (image y grows downward, so 'up' is negative dy), and
  the track is `monotonic` when no step goes back along that axis by more than
  a pixel (scaled with S / 64).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .world import BACKGROUNDS, COLORS, DIRECTIONS, EXTRA_COLORS, FILL_RATIO, SHAPES, ClipSpec, caption

MASK_DIST = 60.0  # RGB distance from the background above which a pixel is object (lowest contrast: purple on gray, 95)
MIN_AREA = 0.01  # smallest component kept, as a fraction of S^2 (the smallest triangle covers 2.4%)
ERODE_MAX, INTERIOR_KEEP = 3, 0.2  # erosions of the object mask before taking its colour
NOISE_FLOOR = 2.5  # background alpha standard deviations removed before measuring the bounding box
TRIANGLE_SKEW = -2 * np.sqrt(2) / 5  # skewness of a ramp profile (width growing linearly from apex to base)
STEP_TOL = 1.0  # pixels (at S = 64) a monotonic track may step backwards


@dataclass
class Analysis:
    background: str
    background_dist: float
    color: str | None  # None when the object is never present
    color_rgb: tuple[float, float, float] | None
    shape: str | None
    fill_ratio: float | None
    skew: float | None  # skewness of the object's mass along y: -0.57 for the triangle, 0 for circle and square
    direction: str | None  # None with fewer than two present frames
    displacement: tuple[float, float] | None  # (dx, dy) pixels over the present frames (line fit)
    track: list[tuple[float, float] | None]  # centroid (x, y) per frame, None where absent
    present: list[bool]
    single: list[bool]
    monotonic: bool
    moved: float = 0.0  # |displacement| in pixels
    background_rgb: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))
    # per frame: the background (border median) and the object's colour (its interior's median; None where absent)
    frame_backgrounds: list[tuple[float, float, float]] = field(default_factory=list)
    frame_colors: list[tuple[float, float, float] | None] = field(default_factory=list)

    def caption(self) -> str:
        """The recovered caption; an attribute that could not be recovered reads 'unknown'."""
        return caption(self.color or "unknown", self.shape or "unknown", self.direction or "unknown",
                       self.background)

    def matches(self, spec_or_caption: ClipSpec | str | dict) -> dict[str, bool]:
        """Which of background / color / shape / direction agree with a spec, caption or parsed dict."""
        if isinstance(spec_or_caption, ClipSpec):
            want = {k: getattr(spec_or_caption, k) for k in ("background", "color", "shape", "direction")}
        elif isinstance(spec_or_caption, str):
            want = parse_caption(spec_or_caption)
        else:
            want = dict(spec_or_caption)
        return {k: getattr(self, k) == want[k] for k in ("background", "color", "shape", "direction")}


_CAPTION = re.compile(r"a (\S+) (\S+) moving (\S+) on a (\S+) background")


def parse_caption(text: str) -> dict[str, str]:
    """{'color', 'shape', 'direction', 'background'} of a toy-world caption; ValueError if it isn't one."""
    m = _CAPTION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a toy-world caption: {text!r}")
    out = dict(zip(("color", "shape", "direction", "background"), m.groups()))
    for key, vocab in (("color", {**COLORS, **EXTRA_COLORS}), ("shape", SHAPES), ("direction", DIRECTIONS),
                       ("background", BACKGROUNDS)):
        if out[key] not in vocab:
            raise ValueError(f"unknown {key} {out[key]!r} in caption {text!r}")
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays (peak 255); inf when identical."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _nearest(rgb: np.ndarray, table: dict) -> tuple[str, float]:
    names = list(table)
    d = np.linalg.norm(np.array([table[n] for n in names], dtype=np.float64) - rgb, axis=1)
    i = int(np.argmin(d))
    return names[i], float(d[i])


def _shift(m: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """m [..., H, W] moved by (dy, dx), the uncovered edge set to `fill`."""
    out = np.full_like(m, fill)
    h, w = m.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        m[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


_N4 = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _erode(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    for dy, dx in _N4:
        out &= _shift(m, dy, dx, False)
    return out


def _dilate(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    for dy, dx in _N4:
        out |= _shift(m, dy, dx, False)
    return out


def _interior(obj: np.ndarray) -> np.ndarray:
    """obj eroded by one pixel, and by up to ERODE_MAX while INTERIOR_KEEP of it is left (blurred edges)."""
    inner = obj
    for k in range(ERODE_MAX):
        e = _erode(inner)
        if k > 0 and e.sum() < INTERIOR_KEEP * obj.sum() or not e.any():
            break
        inner = e
    return inner


def label(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a bool mask [..., H, W] (0 = background, else a pixel index + 1).

    Each pixel starts with its own flat index + 1 and takes its neighbours'
    maximum until nothing changes; pointer jumping (a label is the index of a
    pixel in the same component, so a pixel can take the larger of its label and
    that pixel's label) makes it converge in few sweeps.
    """
    shape = mask.shape
    flat = mask.reshape(-1, *shape[-2:])
    idx = np.arange(1, flat.size + 1, dtype=np.int64).reshape(flat.shape)
    lab = np.where(flat, idx, 0)
    while True:
        new = lab
        for dy, dx in _N4:
            new = np.maximum(new, _shift(lab, dy, dx, 0))
        new = np.where(flat, new, 0)
        ravel = np.concatenate([[0], new.reshape(-1)])
        for _ in range(4):
            new = np.maximum(new, ravel[new])
            ravel = np.concatenate([[0], new.reshape(-1)])
        if np.array_equal(new, lab):
            break
        lab = new
    return lab.reshape(shape)


def _components(lab: np.ndarray, min_area: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, areas) of one frame's components of at least min_area pixels, largest first."""
    ids, areas = np.unique(lab[lab > 0], return_counts=True)
    keep = areas >= min_area
    order = np.argsort(-areas[keep], kind="stable")
    return ids[keep][order], areas[keep][order]


def _shape_features(alpha: np.ndarray, obj: np.ndarray) -> tuple[float, float] | None:
    """(fill ratio, row-profile skewness) of one frame's coverage estimate alpha [H, W] around component obj.

    The area sums the unclipped alpha (zero-mean noise doesn't bias it); the box
    sums each column's (row's) largest alpha after removing a noise floor of
    NOISE_FLOOR robust standard deviations of the background pixels' alpha,
    which would otherwise widen the box by the noise maxima around it. The
    skewness is that of the row sums of alpha (the object's mass along y).
    """
    region = _dilate(_dilate(obj))
    alpha_bg = alpha[~_dilate(region)]
    sigma = 1.4826 * float(np.median(np.abs(alpha_bg - np.median(alpha_bg)))) if alpha_bg.size else 0.0
    floor = min(NOISE_FLOOR * sigma, 0.5)
    alpha = np.where(region, alpha, 0.0)
    clean = ((alpha - floor) / (1.0 - floor)).clip(0.0, 1.0)
    box = clean.max(axis=0).sum() * clean.max(axis=1).sum()
    rows = alpha.sum(axis=1)
    mass = rows.sum()
    if box <= 0 or mass <= 0:
        return None
    y = np.arange(rows.size) - (rows * np.arange(rows.size)).sum() / mass
    var = (rows * y**2).sum() / mass
    skew = (rows * y**3).sum() / mass / var**1.5 if var > 0 else 0.0
    return float(mass / box), float(skew)


def coverage_alpha(frame: np.ndarray, background: np.ndarray, color: np.ndarray) -> np.ndarray | None:
    """Each pixel's coverage estimate [H, W] in one frame [H, W, 3]: its colour projected on the segment from the
    frame's background colour (0) to the object's colour (1), unclipped (zero-mean noise stays zero-mean); None when
    the two colours coincide."""
    seg = color - background
    den = float(seg @ seg)
    if den < 1e-6:
        return None
    return ((frame - background) @ seg) / den


def analyse(frames: np.ndarray, colors: dict | None = None) -> Analysis:
    """Recover background, object colour, shape and direction from uint8 frames [F, H, W, 3] (or one [H, W, 3])."""
    colors = {**COLORS, **EXTRA_COLORS} if colors is None else colors
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got {x.shape}")
    x = x.astype(np.float32)
    f, h, w, _ = x.shape
    s = min(h, w)

    # background: per-frame border medians (robust to drift in generated clips), named by their median
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # [F, 2W+2H-4, 3]
    bg_frame = np.median(border, axis=1)  # [F, 3]
    bg = np.median(bg_frame, axis=0)
    background, background_dist = _nearest(bg, BACKGROUNDS)

    diff = x - bg_frame[:, None, None, :]
    mask = np.einsum("fhwc,fhwc->fhw", diff, diff) > MASK_DIST**2
    lab = label(mask)
    min_area = MIN_AREA * s * s

    present, single, track, objs = [], [], [], []
    ys, xs = np.mgrid[0:h, 0:w]
    for i in range(f):
        ids, _ = _components(lab[i], min_area)
        present.append(len(ids) > 0)
        single.append(len(ids) == 1)
        if len(ids) == 0:
            track.append(None)
            objs.append(None)
            continue
        obj = lab[i] == ids[0]
        objs.append(obj)
        track.append((float(xs[obj].mean()) + 0.5, float(ys[obj].mean()) + 0.5))

    color = color_rgb = shape = fill_ratio = skew = direction = displacement = frame_colors = None
    moved, monotonic = 0.0, False
    have = [i for i in range(f) if present[i]]
    if have:
        # object colour: median of the eroded interiors (the whole component for a very thin one)
        pix = []
        for i in have:
            pix.append(x[i][_interior(objs[i])])
        frame_colors = [None] * f
        for i, p in zip(have, pix):
            frame_colors[i] = tuple(float(v) for v in np.median(p, axis=0))
        rgb = np.median(np.concatenate(pix), axis=0)
        color_rgb = tuple(float(v) for v in rgb)
        color, _ = _nearest(rgb, colors)

        # shape: median fill ratio and skewness over frames (see the module docstring)
        feats = []
        for i in have:
            alpha = coverage_alpha(x[i], bg_frame[i], rgb)
            if alpha is None:
                continue
            feat = _shape_features(alpha, objs[i])
            if feat is not None:
                feats.append(feat)
        if feats:
            fill_ratio, skew = (float(v) for v in np.median(np.array(feats), axis=0))
            if abs(skew) > abs(TRIANGLE_SKEW) / 2:
                shape = "triangle"
            else:
                shape = min(("circle", "square"), key=lambda k: abs(FILL_RATIO[k] - fill_ratio))

        # motion: least-squares line through the present centroids
        if len(have) >= 2:
            t = np.array(have, dtype=np.float64)
            pts = np.array([track[i] for i in have])
            tc = t - t.mean()
            slope = (tc[:, None] * (pts - pts.mean(axis=0))).sum(axis=0) / (tc @ tc)
            dx, dy = (float(v) for v in slope * (t[-1] - t[0]))
            displacement = (dx, dy)
            moved = float(np.hypot(dx, dy))
            axis = 0 if abs(dx) >= abs(dy) else 1
            sign = 1 if (dx, dy)[axis] >= 0 else -1
            direction = {(0, 1): "right", (0, -1): "left", (1, 1): "down", (1, -1): "up"}[(axis, sign)]
            steps = np.diff(pts[:, axis]) * sign
            monotonic = bool(np.all(steps >= -STEP_TOL * s / 64))

    return Analysis(background=background, background_dist=background_dist, color=color, color_rgb=color_rgb,
                    shape=shape, fill_ratio=fill_ratio, skew=skew, direction=direction, displacement=displacement,
                    track=track, present=present, single=single, monotonic=monotonic, moved=moved,
                    background_rgb=tuple(float(v) for v in bg),
                    frame_backgrounds=[tuple(float(v) for v in b) for b in bg_frame],
                    frame_colors=frame_colors if have else [None] * f)
