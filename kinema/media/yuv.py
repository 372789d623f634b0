"""RGB <-> Y'CbCr for the video codecs, both directions, with the matrix done here.

Writing: planar `yuv420p` / `yuv422p` / `yuv444p` at 8, 10 or 12 bits (every
default and every pix_fmt the README names) are converted here in numpy, BT.709
limited range, chroma averaged over each 2x2 (4:2:0) or 2x1 (4:2:2) block, and
the planes copied into the frame. FFmpeg 8's swscale is not used for these: its
rgb24 -> yuv444p10le path was seen to write 8 pixels of a row as mid-grey
(Y = Cb = Cr = 512) in 68 of 150 encodes of a 34x18 clip under load (the same
frame converted differently run to run), so a "lossless" encode came back
wrong. Other formats the encoders take (nv12, gray, gbrp, yuva, yuvj) are left
to swscale. The numpy path costs ~22 ms a 832x480 4:2:0 frame on this 2-core
machine (swscale: ~2; a few seconds on a long video, against a wrong one).

Reading: swscale only upsamples the chroma (to yuv444p16le, a shift for 4:4:4);
the matrix and the range are applied here, because its direct YUV -> rgb24
path scales limited-range levels as if 8 bits mapped to 16 by *257 rather than
<<8 and darkens every frame by ~1-2 levels.
"""

from __future__ import annotations

import re

import numpy as np

# Luma weights (Kr, Kb) by the frame's colorspace tag; untagged video is taken as BT.601, as FFmpeg does.
MATRIX = {1: (0.2126, 0.0722), 5: (0.299, 0.114), 6: (0.299, 0.114), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
BT709 = 1

_PLANAR = re.compile(r"yuv(420|422|444)p(?:(10|12)le)?")


def rgb_to_yuv_planes(rgb: np.ndarray, pix_fmt: str) -> list[np.ndarray] | None:
    """[H, W, 3] uint8 RGB -> the Y, Cb, Cr planes of `pix_fmt` (BT.709, limited range), uint8 for
    8 bits and uint16 above; None for a format not converted here. H and W must be even for 4:2:x."""
    m = _PLANAR.fullmatch(pix_fmt)
    if m is None:
        return None
    sub, bits = m.group(1), int(m.group(2) or 8)
    kr, kb = MATRIX[BT709]
    x = rgb.astype(np.float64) / 255.0
    y = kr * x[..., 0] + (1 - kr - kb) * x[..., 1] + kb * x[..., 2]
    cb = (x[..., 2] - y) / (2 * (1 - kb))  # -0.5..0.5
    cr = (x[..., 0] - y) / (2 * (1 - kr))
    if sub == "422":  # average each block of chroma samples (centre-sited)
        cb, cr = ((c[:, 0::2] + c[:, 1::2]) / 2 for c in (cb, cr))
    elif sub == "420":  # summed in pairs: the same values as a 2x2 mean, in a quarter of its time
        cb, cr = (((c[0::2, 0::2] + c[0::2, 1::2]) + (c[1::2, 0::2] + c[1::2, 1::2])) / 4 for c in (cb, cr))
    scale = 1 << (bits - 8)
    dtype = np.uint8 if bits == 8 else np.uint16
    top = (1 << bits) - 1
    planes = [(16 + 219 * y) * scale, (128 + 224 * cb) * scale, (128 + 224 * cr) * scale]
    return [np.clip(np.round(p), 0, top).astype(dtype) for p in planes]


def rgb_to_frame(rgb: np.ndarray, pix_fmt: str):
    """[H, W, 3] uint8 RGB -> an av.VideoFrame in `pix_fmt`, tagged BT.709 limited range."""
    import av

    planes = rgb_to_yuv_planes(rgb, pix_fmt)
    if planes is None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame = frame.reformat(format=pix_fmt, dst_colorspace="ITU709")
    else:
        frame = av.VideoFrame(rgb.shape[1], rgb.shape[0], pix_fmt)
        for plane, values in zip(frame.planes, planes):
            row = plane.line_size // values.itemsize
            padded = np.zeros((plane.height, row), values.dtype)  # each row padded to the frame's line size
            padded[:, : values.shape[1]] = values
            plane.update(padded.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
    frame.colorspace = frame.color_primaries = frame.color_trc = BT709
    frame.color_range = 1  # limited ("tv")
    return frame


def _yuv_to_rgb(frame) -> np.ndarray:
    """A decoded YUV frame -> [H, W, 3] uint8, with the matrix and range it is tagged with."""
    kr, kb = MATRIX.get(frame.colorspace, MATRIX[5])
    yuv = frame.reformat(format="yuv444p16le", interpolation="BILINEAR").to_ndarray()  # [H, W, 3] uint16
    yuv = yuv.astype(np.float32) / 256.0  # 8-bit scale (swscale widens by shifting)
    y, u, v = yuv[..., 0], yuv[..., 1] - 128.0, yuv[..., 2] - 128.0
    if frame.color_range != 2:  # limited ("tv") range: Y in 16..235, C in 16..240
        y, u, v = (y - 16.0) * (255 / 219), u * (255 / 224), v * (255 / 224)
    r = y + 2 * (1 - kr) * v
    b = y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)


def frame_to_rgb(frame) -> np.ndarray:
    """A decoded av.VideoFrame -> [H, W, 3] uint8 RGB."""
    name = frame.format.name
    if name.startswith("yuv") and not name.startswith("yuvj") and "a" not in name[3:6]:
        return _yuv_to_rgb(frame)
    return frame.to_ndarray(format="rgb24")  # RGB, palette, full-range yuvj: swscale is exact enough
