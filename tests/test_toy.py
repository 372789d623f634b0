"""The toy-world analyser recovers captions from rendered clips (clean, other sizes, noisy, degenerate)."""

import math

import numpy as np
import pytest

from kinema.toy.analyse import analyse, label, parse_caption, psnr
from kinema.toy.world import (BACKGROUNDS, COLORS, EXTRA_COLORS, ClipSpec, all_captions, caption, clip_rng,
                              random_spec, render)


def _check(spec: ClipSpec, frames: np.ndarray):
    a = analyse(frames)
    assert a.matches(spec) == {"background": True, "color": True, "shape": True, "direction": True}, \
        (spec, a.caption(), a.fill_ratio, a.skew)
    assert a.caption() == spec.caption
    assert all(a.present) and all(a.single), (spec, a.present, a.single)
    assert a.monotonic
    h, w = frames.shape[1:3]
    assert a.moved == pytest.approx(spec.travel * min(w, h), rel=0.1)  # centroids follow the object's centre
    assert a.background_dist < 1.0
    return a


def test_recovers_every_caption_64():
    for i in range(300):
        spec = random_spec(clip_rng(0, i))
        _check(spec, render(spec, 64, 64, 17))


@pytest.mark.parametrize("width,height,frames", [(96, 64, 17), (64, 96, 17), (128, 128, 17), (64, 64, 9),
                                                 (64, 64, 33)])
def test_recovers_captions_other_sizes(width, height, frames):
    for i in range(12):
        spec = random_spec(clip_rng(1, i), width, height)
        _check(spec, render(spec, width, height, frames))


def test_orange_is_orange():
    for i in range(30):
        spec = random_spec(clip_rng(2, i), color="orange")
        a = _check(spec, render(spec))
        assert a.color == "orange"
    # with a caller's candidate set lacking orange, the nearest base colour is reported instead
    a = analyse(render(random_spec(clip_rng(2, 0), color="orange", background="black")), colors=COLORS)
    assert a.color in ("red", "yellow")


def test_robust_to_noise():
    noise = np.random.default_rng(0)
    n, ok = 100, 0
    for i in range(n):
        spec = random_spec(clip_rng(3, i), colors=tuple(COLORS) + tuple(EXTRA_COLORS))
        x = render(spec).astype(np.float64) + noise.normal(0.0, 6.0, (17, 64, 64, 3))
        a = analyse(np.round(x).clip(0, 255).astype(np.uint8))
        ok += all(a.matches(spec).values()) and all(a.single)
    assert ok >= 0.98 * n


def test_empty_clip_has_no_object():
    for bg in BACKGROUNDS:
        frames = np.broadcast_to(np.array(BACKGROUNDS[bg], dtype=np.uint8), (17, 64, 64, 3)).copy()
        a = analyse(frames)
        assert a.background == bg and a.background_dist == 0.0
        assert not any(a.present) and not any(a.single) and a.track == [None] * 17
        assert a.color is None and a.shape is None and a.direction is None
        assert a.matches(caption("red", "circle", "left", bg)) == {
            "background": True, "color": False, "shape": False, "direction": False}


def test_two_objects_are_not_single():
    top = ClipSpec("red", "circle", "right", "gray", 0.25, 0.4, (0.25, 0.2))
    bottom = ClipSpec("blue", "square", "left", "gray", 0.25, 0.4, (0.75, 0.8))
    a, b = render(top), render(bottom)
    bg = np.array(BACKGROUNDS["gray"], dtype=np.uint8)
    frames = np.where((b != bg).any(axis=-1, keepdims=True), b, a)
    res = analyse(frames)
    assert all(res.present) and not any(res.single)
    assert res.background == "gray"


def test_label_components():
    m = np.zeros((1, 6, 8), dtype=bool)
    m[0, 0, :3] = True  # a bar
    m[0, 2:5, 5] = True  # a column
    m[0, 4, 6:] = True  # joined to the column at its foot
    m[0, 5, 0] = True  # a lone pixel; diagonal neighbours don't connect
    m[0, 4, 1] = True
    lab = label(m)[0]
    assert (lab[~m[0]] == 0).all()
    groups = {frozenset(zip(*np.nonzero(lab == v))) for v in np.unique(lab[m[0]])}
    assert sorted(len(g) for g in groups) == [1, 1, 3, 5]


def test_parse_caption_round_trip():
    for text in all_captions(tuple(COLORS) + tuple(EXTRA_COLORS)):
        p = parse_caption(text)
        assert caption(p["color"], p["shape"], p["direction"], p["background"]) == text
    assert parse_caption("a red circle moving left on a black background") == {
        "color": "red", "shape": "circle", "direction": "left", "background": "black"}
    for bad in ("", "a red circle", "a red hexagon moving left on a black background",
                "a red circle moving sideways on a black background", "a red circle moving left on a pink background",
                "a red circle moving left on a black background.", "the red circle moving left on a black background"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_psnr():
    a = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf
    z = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    assert psnr(z, z + 5) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(z, z + 255) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        psnr(z, z[:2])
