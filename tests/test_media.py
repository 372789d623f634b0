"""kinema.media: every format is written, decoded back and compared with what was written."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kinema.errors import KinemaError
from kinema.media import (
    FORMATS,
    first_frame,
    last_frame,
    read_image,
    read_metadata,
    read_video,
    save_video,
    to_model_range,
    to_uint8_frames,
)

SIZES = [(32, 48), (17, 33)]  # (H, W): even, and odd (padded by the writer, cropped by the reader)
META = {"prompt": "a red fox in snow, 雪", "negative_prompt": "blur", "seed": 42, "steps": 30,
        "shift": 5.0, "guidance": 5.0, "solver": "unipc", "task": "t2v-1.3B", "loras": [{"name": "x", "w": 0.8}]}


def rich_clip(f=9, h=32, w=48) -> np.ndarray:
    """Gradients plus a moving soft yellow blob: thousands of colours, edges like real
    footage rather than pixel art (which 4:2:0 chroma cannot hold). uint8 [F, H, W, 3]."""
    y, x = np.mgrid[:h, :w].astype(np.float64)
    frames = np.zeros((f, h, w, 3))
    for t in range(f):
        frames[t, ..., 0] = x * 255 / w
        frames[t, ..., 1] = y * 255 / h
        frames[t, ..., 2] = 40 + t * 20
        blob = np.exp(-((x - 4 - 3 * t) ** 2 + (y - h / 2) ** 2) / 18)[..., None]
        frames[t] = frames[t] * (1 - blob) + np.array([255, 255, 0]) * blob
    return frames.round().astype(np.uint8)


def detail_clip(f=9, h=32, w=48) -> np.ndarray:
    """Texture with a 6-8 pixel period, drifting one column a frame, over slow colour ramps: a
    one-pixel misalignment costs ~25 levels, ten times what the lossy codecs lose. uint8 [F, H, W, 3]."""
    y, x = np.mgrid[:h, :w].astype(np.float64)
    frames = np.zeros((f, h, w, 3))
    for t in range(f):
        texture = 55 * np.sin(2 * np.pi * (x + t) / 6) * np.cos(2 * np.pi * y / 8) + 30 * np.sin(2 * np.pi * (x + 2 * y) / 11)
        frames[t, ..., 0] = 128 + texture + 30 * (x / w - 0.5)
        frames[t, ..., 1] = 128 + texture + 30 * (y / h - 0.5)
        frames[t, ..., 2] = 110 + texture + 4 * t
    return frames.clip(0, 255).round().astype(np.uint8)


def palette_clip(f=9, h=32, w=48) -> np.ndarray:
    """A few flat colours with moving shapes: fits a GIF palette exactly. uint8 [F, H, W, 3]."""
    y, x = np.mgrid[:h, :w]
    frames = np.zeros((f, h, w, 3), np.uint8)
    for t in range(f):
        frames[t] = (20, 30, 90)
        frames[t][(abs(x - 3 - 4 * t) < 4) & (abs(y - h // 3) < 4)] = (250, 40, 40)
        frames[t][(x - w // 2) ** 2 + (y - 2 - t) ** 2 < 25] = (40, 220, 90)
    return frames


def mae(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


# (format, kwargs, bound on the mean abs error over 0..255 for detail_clip). Measured (48x32 / 33x17):
# h264 2.73 / 3.08, 10-bit 2.56 / 2.99; h265 1.77 / 2.08, 10-bit 1.67 / 2.00; webm 1.39 / 1.69;
# prores 0.35 / 0.40; webp 1.78 / 2.14; gif 1.98 / 1.59. Read back one pixel column or row off,
# every one of them is 24.6-26.1: the bounds sit near twice the measured error, far below that.
LOSSY = [
    ("h264-mp4", {}, 5),
    ("h264-mp4", {"pix_fmt": "yuv420p10le"}, 5),
    ("h265-mp4", {}, 4),
    ("h265-mp4", {"pix_fmt": "yuv420p10le"}, 4),
    ("webm", {}, 3.5),
    ("prores-mov", {}, 1),
    ("webp", {}, 4),
    ("gif", {}, 4),  # > 256 colours: Pillow's adaptive palette per frame
]


@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
@pytest.mark.parametrize("fmt,kwargs,bound", LOSSY, ids=[f + "".join(f"-{v}" for v in kw.values()) for f, kw, _ in LOSSY])
def test_lossy_round_trip(tmp_path, fmt, kwargs, bound, hw):
    clip = detail_clip(9, *hw)
    path = save_video(clip, tmp_path, format=fmt, frame_rate=16, **kwargs)
    frames, fps = read_video(path)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == clip.shape
    assert mae(frames, clip) < bound
    # The bound must catch a reader (or a crop after padding) that is one pixel off in either direction.
    for axis in (1, 2):  # rows, columns
        for step in (1, -1):
            shifted = np.roll(frames.numpy(), step, axis=axis)
            assert mae(shifted, clip) > 3 * bound, f"a reader shifted by {step} along axis {axis} passes the bound"
    expected_fps = {"gif": 1000 / 60, "webp": 1000 / 62}.get(fmt, 16.0)  # gif: 10 ms ticks, webp: 1 ms
    assert fps == pytest.approx(expected_fps, rel=0.02)


@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
@pytest.mark.parametrize("fmt,kwargs", [("webp", {"lossless": True}), ("gif", {}), ("png-sequence", {})])
def test_lossless_round_trip(tmp_path, fmt, kwargs, hw):
    clip = palette_clip(9, *hw) if fmt == "gif" else rich_clip(9, *hw)
    path = save_video(clip, tmp_path, format=fmt, **kwargs)
    frames, _ = read_video(path)
    np.testing.assert_array_equal(frames.numpy(), clip)


def test_png_still_round_trip(tmp_path):
    image = rich_clip(1, 17, 33)
    path = save_video(image, tmp_path, format="png", metadata=META)
    assert path.name == "kinema_00001.png"
    np.testing.assert_array_equal(read_image(path).numpy(), image[0])
    np.testing.assert_array_equal(read_video(path).frames.numpy(), image)
    assert read_metadata(path) == META
    with pytest.raises(KinemaError, match="png-sequence"):
        save_video(rich_clip(3), tmp_path, format="png")


def test_video_lossless_444_10bit_is_exact(tmp_path):
    clip = rich_clip(5)
    path = save_video(clip, tmp_path, pix_fmt="yuv444p10le", lossless=True)
    np.testing.assert_array_equal(read_video(path).frames.numpy(), clip)


def test_rgb_to_yuv_planes_bt709_limited_range():
    """Known colours against the BT.709 formula: Y' = 16 + 219 (Kr R + Kg G + Kb B), C = 128 + 224 (X - Y') / 2(1 - Kx)."""
    from kinema.media.yuv import rgb_to_yuv_planes

    rgb = np.array([[[255, 0, 0], [255, 255, 255], [0, 0, 0], [0, 255, 0]]] * 2, np.uint8)  # [2, 4, 3]
    y, cb, cr = rgb_to_yuv_planes(rgb, "yuv444p")
    np.testing.assert_array_equal(y[0], [63, 235, 16, 173])
    np.testing.assert_array_equal(cb[0], [102, 128, 128, 42])
    np.testing.assert_array_equal(cr[0], [240, 128, 128, 26])
    y10, cb10, cr10 = rgb_to_yuv_planes(rgb, "yuv420p10le")  # 4x the levels, chroma the mean of each 2x2 block
    assert y10.dtype == np.uint16 and cb10.shape == (1, 2)
    np.testing.assert_array_equal(y10[0], [250, 940, 64, 691])
    cb_red, cb_green = 128 - 224 * 0.2126 / 1.8556, 128 - 224 * 0.7152 / 1.8556  # 102.34, 41.66; white, black 128
    np.testing.assert_array_equal(cb10[0], [round(4 * (cb_red + 128) / 2), round(4 * (128 + cb_green) / 2)])
    assert rgb_to_yuv_planes(rgb, "nv12") is None  # left to swscale


@pytest.mark.parametrize("fmt,padded", [("h264-mp4", (18, 34)), ("h265-mp4", (64, 64))])
def test_odd_size_pads_with_the_edge_and_crops_back_exactly(tmp_path, fmt, padded):
    """4:4:4 10-bit lossless is exact here, so any error in padding, tagging or cropping shows as a wrong pixel."""
    import av

    from kinema.media.yuv import frame_to_rgb

    clip = detail_clip(5, 17, 33)
    for _ in range(4):  # FFmpeg 8's swscale greyed 8 pixels of a row in ~1 encode in 2 of this clip: never again
        path = save_video(clip, tmp_path, format=fmt, pix_fmt="yuv444p10le", lossless=True)
        frames = read_video(path).frames.numpy()
        assert frames.shape == (5, 17, 33, 3)
        np.testing.assert_array_equal(frames, clip)
    with av.open(str(path)) as container:
        assert container.metadata["kinema_frame_size"] == "33x17"
        stored = np.stack([frame_to_rgb(f) for f in container.decode(video=0)])  # [5, H', W', 3] as encoded
    assert stored.shape[1:3] == padded
    np.testing.assert_array_equal(stored[:, :17, :33], clip)
    np.testing.assert_array_equal(stored[:, :17, 33:], np.repeat(clip[:, :, -1:], padded[1] - 33, axis=2))
    np.testing.assert_array_equal(stored[:, 17:, :33], np.repeat(clip[:, -1:], padded[0] - 17, axis=1))


def test_fractional_frame_rate(tmp_path):
    _, fps = read_video(save_video(rich_clip(5), tmp_path, frame_rate=24000 / 1001))
    assert fps == pytest.approx(23.976, abs=1e-3)


def test_float_vae_output_and_model_range(tmp_path):
    clip = rich_clip(5)
    video = to_model_range(torch.from_numpy(clip))  # [3, F, H, W] in [-1, 1]
    assert video.shape == (3, 5, 32, 48) and video.min() >= -1 and video.max() <= 1
    np.testing.assert_array_equal(to_uint8_frames(video), clip)
    np.testing.assert_array_equal(to_uint8_frames(video[None]), clip)
    path = save_video(video[None], tmp_path, format="png-sequence")
    np.testing.assert_array_equal(read_video(path).frames.numpy(), clip)
    with pytest.raises(KinemaError, match="batch 2"):
        to_uint8_frames(torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(KinemaError, match=r"\[3, F, H, W\]"):
        to_uint8_frames(torch.zeros(5, 4, 4, 3))


def test_pingpong(tmp_path):
    clip = rich_clip(6)
    path = save_video(clip, tmp_path, format="png-sequence", pingpong=True)
    frames = read_video(path).frames.numpy()
    assert len(frames) == 2 * 6 - 2
    np.testing.assert_array_equal(frames, np.concatenate([clip, clip[4:0:-1]]))
    assert len(read_video(save_video(clip, tmp_path, pingpong=True)).frames) == 10


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_loop_count(tmp_path, fmt):
    clip = palette_clip(4)
    with Image.open(save_video(clip, tmp_path, format=fmt)) as im:
        assert im.info["loop"] == 0  # forever
    with Image.open(save_video(clip, tmp_path, format=fmt, loop_count=3)) as im:
        assert im.info["loop"] == 3


def test_counter_naming_and_no_overwrite(tmp_path):
    clip = rich_clip(3)
    names = [save_video(clip, tmp_path, filename_prefix="fox").name for _ in range(3)]
    assert names == ["fox_00001.mp4", "fox_00002.mp4", "fox_00003.mp4"]
    # The counter is shared across extensions and skips past gaps.
    (tmp_path / "fox_00007.gif").write_bytes(b"x")
    assert save_video(clip, tmp_path, format="png-sequence", filename_prefix="fox").name == "fox_00008"
    assert save_video(clip, tmp_path / "new" / "dir").name == "kinema_00001.mp4"

    existing = tmp_path / "mine.mp4"
    existing.write_bytes(b"precious")
    with pytest.raises(KinemaError, match=f"{existing}.*already exists"):
        save_video(clip, existing)
    assert existing.read_bytes() == b"precious"
    assert save_video(clip, existing, overwrite=True) == existing
    assert len(read_video(existing).frames) == 3
    with pytest.raises(KinemaError, match=r"\.mp4"):
        save_video(clip, tmp_path / "clip.mov")
    assert not [p for p in Path(tmp_path).rglob(".*partial*")]


def test_crash_leaves_no_partial_file(tmp_path, monkeypatch):
    from kinema.media import write

    calls = {"n": 0}
    original = write.rgb_to_frame

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash mid-encode")
        return original(*args, **kwargs)

    monkeypatch.setattr(write, "rgb_to_frame", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        save_video(rich_clip(5), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["h264-mp4", "h265-mp4", "webm", "prores-mov", "png", "gif", "webp", "png-sequence"])
def test_metadata_round_trip(tmp_path, fmt):
    clip = rich_clip(1 if fmt == "png" else 3, 17, 33)
    path = save_video(clip, tmp_path, format=fmt, metadata=META)
    got = read_metadata(path)
    assert {k: got[k] for k in META} == META
    if fmt in ("gif", "webp"):
        assert path.with_name(path.name + ".json").is_file()


def test_metadata_absent_or_invalid(tmp_path):
    assert read_metadata(save_video(rich_clip(2), tmp_path)) == {}
    assert read_metadata(save_video(rich_clip(2), tmp_path, format="gif")) == {}
    with pytest.raises(KinemaError, match="seed"):
        save_video(rich_clip(2), tmp_path, metadata={"seed": object()})


def test_missing_codec_and_bad_pix_fmt(tmp_path, monkeypatch):
    import av

    with pytest.raises(KinemaError, match="yuv420p10le.*libvpx-vp9|libvpx-vp9.*yuv420p10le"):
        save_video(rich_clip(2), tmp_path, format="webm", pix_fmt="yuv420p10le")
    monkeypatch.setattr(av, "codecs_available", set(av.codecs_available) - {"libx264"})
    with pytest.raises(KinemaError, match="libx264"):
        save_video(rich_clip(2), tmp_path)
    with pytest.raises(KinemaError, match="unknown format"):
        save_video(rich_clip(2), tmp_path, format="avi")
    assert list(tmp_path.iterdir()) == []


def test_first_last_and_max_frames(tmp_path):
    clip = rich_clip(7)
    path = save_video(clip, tmp_path, format="webp", lossless=True)
    np.testing.assert_array_equal(first_frame(path).numpy(), clip[0])
    np.testing.assert_array_equal(last_frame(path).numpy(), clip[-1])
    assert len(read_video(save_video(clip, tmp_path), max_frames=4).frames) == 4


def test_read_image_alpha_and_grayscale(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red, bottom fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png").numpy()
    assert (img[:2] == (200, 0, 0)).all() and (img[2:] == 255).all()  # transparent -> white
    Image.fromarray(np.full((3, 3), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").shape == (3, 3, 3) and (read_image(tmp_path / "g.png") == 77).all()


def test_reader_errors(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    empty = tmp_path / "empty.mp4"
    empty.touch()
    folder = tmp_path / "folder"
    folder.mkdir()
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cases = [
        (read_video, tmp_path / "missing.mp4", "does not exist"),
        (read_video, text, "not|no video"),
        (read_video, empty, "empty"),
        (read_video, folder, "directory"),
        (read_image, folder, "directory"),
        (read_image, bad_png, "not a readable image"),
        (read_metadata, tmp_path / "missing.png", "does not exist"),
    ]
    for fn, path, why in cases:
        with pytest.raises(KinemaError, match=why) as info:
            fn(path)
        assert str(path) in str(info.value)


def test_every_format_is_covered():
    assert set(FORMATS) == {"h264-mp4", "h265-mp4", "webm", "prores-mov", "gif", "webp", "png", "png-sequence"}


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv420p10le"])
def test_reader_has_no_brightness_bias(tmp_path, pix_fmt):
    """swscale's own YUV -> rgb24 darkens by ~1-2 levels; the reader's BT.709 conversion must not."""
    clip = torch.from_numpy(rich_clip(3)).permute(0, 3, 1, 2).float()
    clip = torch.nn.functional.interpolate(clip, scale_factor=4, mode="bilinear")  # smooth, [3, 3, 128, 192]
    clip = clip.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    frames = read_video(save_video(clip, tmp_path, pix_fmt=pix_fmt)).frames.numpy()
    assert abs(float((frames.astype(np.float64) - clip).mean())) < 0.4
    assert mae(frames, clip) < 1.5
