"""A cheap latent -> RGB projection for step previews: one linear map per VAE, no decode.

ComfyUI and the wrapper preview Wan latents with a fixed 16 x 3 matrix fitted to the official
VAE's latent space; Kinema runs other VAEs too (the built-in one has a latent space of its own),
so the matrix is fitted to the VAE at hand, once, on first use: a test card of flat colour
patches is encoded (one frame, a few hundred latent pixels) and the least-squares map from each
latent pixel (plus a bias) to its patch's colour is kept. A preview is then one small matmul.
"""

from __future__ import annotations

import numpy as np
import torch

PATCHES = 6  # the test card is PATCHES x PATCHES flat colours
PATCH_LATENT = 4  # latent pixels a side per patch; only the inner 2 x 2 (least touched by neighbours) are fitted


class LatentPreview:
    def __init__(self, vae):
        self.vae = vae
        self.weights: torch.Tensor | None = None  # [z + 1, 3]

    @torch.no_grad()
    def fit(self) -> torch.Tensor:
        vae, r = self.vae, self.vae.spatial_ratio
        rng = np.random.default_rng(0)
        colours = rng.uniform(-1, 1, (PATCHES * PATCHES, 3)).astype(np.float32)
        colours[:8] = [[-1, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [0, 0, 0], [-1, 1, 1]]
        side = PATCHES * PATCH_LATENT * r
        card = torch.from_numpy(colours).view(PATCHES, PATCHES, 3)  # [P, P, 3]
        card = card.repeat_interleave(PATCH_LATENT * r, 0).repeat_interleave(PATCH_LATENT * r, 1)  # [side, side, 3]
        z = vae.encode(card.permute(2, 0, 1)[None, :, None].to(vae.device))[0, :, 0].float().cpu()  # [z, h, w]
        z = z.view(z.shape[0], PATCHES, PATCH_LATENT, PATCHES, PATCH_LATENT)[:, :, 1:3, :, 1:3]  # inner pixels
        x = z.permute(1, 3, 2, 4, 0).reshape(-1, z.shape[0])  # [P*P*4, z], patch-major
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = torch.from_numpy(colours).repeat_interleave(4, 0)  # [P*P*4, 3]
        assert side == card.shape[0]
        self.weights = torch.linalg.lstsq(x, y).solution  # [z + 1, 3]
        return self.weights

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """latents [z, T, h, w] -> uint8 [T, h, w, 3]."""
        w = self.weights if self.weights is not None else self.fit()
        x = latents.detach().float().cpu().permute(1, 2, 3, 0)  # [T, h, w, z]
        rgb = x @ w[:-1] + w[-1]
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
