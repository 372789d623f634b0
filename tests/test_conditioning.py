"""The i2v / flf2v condition matches the reference rule (written out here as the official code has it)."""

import math

import numpy as np
import pytest
import torch

from kinema.models.vae import WanVAE
from kinema.pipeline.conditioning import build_condition, frame_mask, target_size


def _reference_mask(num_frames, lat_h, lat_w, last=False):
    # wan/image2video.py and wan/first_last_frame2video.py, with their hard-coded 81 replaced by F.
    msk = torch.ones(1, num_frames, lat_h, lat_w)
    if last:
        msk[:, 1:-1] = 0
    else:
        msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


@pytest.mark.parametrize("frames", [5, 17, 81])
@pytest.mark.parametrize("last", [False, True])
def test_mask_matches_reference(frames, last):
    known = [0, frames - 1] if last else [0]
    got = frame_mask(frames, known, 6, 10)
    want = _reference_mask(frames, 6, 10, last)
    assert got.shape == want.shape == (4, (frames - 1) // 4 + 1, 6, 10)
    assert torch.equal(got, want)


def test_mask_rejects_bad_frame_count():
    with pytest.raises(ValueError, match="4k \\+ 1"):
        frame_mask(16, [0], 2, 2)


@pytest.mark.parametrize("hw", [(480, 832), (720, 1280), (1080, 1920), (600, 600), (833, 479)])
@pytest.mark.parametrize("area", [480 * 832, 720 * 1280])
def test_target_size_official_rule(hw, area):
    h, w = hw
    aspect = h / w
    lat_h = round(np.sqrt(area * aspect) // 8 // 2 * 2)
    lat_w = round(np.sqrt(area / aspect) // 8 // 2 * 2)
    assert target_size(h, w, area) == (lat_h * 8, lat_w * 8)
    th, tw = target_size(h, w, area)
    assert th % 16 == 0 and tw % 16 == 0 and th * tw <= area


@pytest.mark.parametrize("hw, area, want", [
    ((1080, 1920), 720 * 1280, (720, 1280)),  # exactly 720p: sqrt(921600 * 0.5625) = 720
    ((600, 600), 480 * 832, (624, 624)),  # sqrt(399360) = 631.9 -> 78 latents -> 78 (even) -> 624
    ((833, 479), 720 * 1280, (1264, 720)),  # 1265.98 -> 158 latents -> 1264; 727.98 -> 90 -> 720
    # 480 / 832 * 399360 is 230399.99999999997 in floating point, so the official rule gives 464 rows, not 480
    ((480, 832), 480 * 832, (464, 832)),
])
def test_target_size_known_values(hw, area, want):
    assert target_size(*hw, area) == want


@pytest.mark.parametrize("frames", [5, 17])
def test_condition_layout(frames):
    torch.manual_seed(0)
    vae = WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval()
    first, last = torch.rand(3, 20, 28) * 2 - 1, torch.rand(3, 20, 28) * 2 - 1
    y = build_condition(vae, {0: first, frames - 1: last}, frames, 32, 48)
    t_lat = (frames - 1) // 4 + 1
    assert y.shape == (1, 20, t_lat, 4, 6)
    assert torch.equal(y[0, :4], _reference_mask(frames, 4, 6, last=True))
    # The latent part is the VAE encoding of [first, zeros..., last] at the target size.
    video = torch.zeros(1, 3, frames, 32, 48)
    video[0, :, 0] = torch.nn.functional.interpolate(first[None], size=(32, 48), mode="bicubic")[0]
    video[0, :, -1] = torch.nn.functional.interpolate(last[None], size=(32, 48), mode="bicubic")[0]
    assert torch.allclose(y[:, 4:], vae.encode(video), atol=1e-6)
    assert math.isfinite(y.abs().sum().item())
