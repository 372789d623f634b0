"""Image conditioning for Wan2.1 i2v / flf2v: pixels in [-1, 1] -> CLIP features.

The preprocessing copies the reference (`wan/modules/clip.py`
`CLIPModel.visual`) exactly, because the DiT was trained on its output: the
whole frame is resized to the model's square input with bicubic
interpolation (no crop, no antialias, so the aspect ratio is squashed), mapped
to [0, 1], and normalised with OpenAI CLIP's mean and std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kinema.models.clip import CLIPVisionTower

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipVisionEncoder:
    """A loaded `CLIPVisionTower` plus the reference preprocessing."""

    def __init__(self, model: CLIPVisionTower):
        self.model = model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.patch_embedding.weight.device

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> normalised pixels [B, 3, S, S] in float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {list(images.shape)}")
        s = self.image_size
        # float32 resize as the reference does it; bicubic may overshoot [-1, 1] slightly, kept as is.
        x = F.interpolate(images.to(self.device, torch.float32), size=(s, s), mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] (any size) -> penultimate features [B, 257, dim] for ViT-H/14."""
        return self.model(self.preprocess(images))
