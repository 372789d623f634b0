"""`kinema train upscaler`: one x2 stage of the learned video upscaler (kinema/models/upscaler.py).

The synthetic world is rendered natively at both sizes (its geometry is relative to the frame, so the same
clip at 64 and at 128 pixels is the ground truth pair; a second stage trains 128 -> 256). Loss: L1 on the
pixels, an edge term (the pixel differences), a feature term (L1 between the frozen built-in VAE encoder's
features of the output and of the truth: the "perceptual" term, from a network we trained ourselves) and,
after `adversarial_start` steps, an adversarial term from a small patch discriminator (hinge loss) trained
alongside: what keeps edges sharp where L1 alone settles for a blur.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kinema.errors import KinemaError
from kinema.models.upscaler import Upscaler2x, UpscalerConfig
from kinema.toy import world
from kinema.train import config as configs
from kinema.train.loop import TrainTask, init_state
from kinema.train.world_data import object_mask, random_rgb_spec

log = logging.getLogger("kinema")
HOLDOUT_SEED_OFFSET = 2_000_003


@dataclasses.dataclass
class UpscalerTrainConfig(configs.TrainConfig):
    output_dir: str = "runs/upscaler"
    low: int = 64  # input size (square frames of the world)
    dim: int = 16
    blocks: int = 3
    kernel_frames: int = 3
    clip_frames: int = 9  # frames per training clip (runs of the pool's 17-frame clips)
    crop: int = 32  # low-resolution crop side (around the object)
    pool_size: int = 400
    random_colors: float = 0.3
    l1_weight: float = 1.0
    mse_weight: float = 0.0
    edge_weight: float = 1.0
    # extra weight where bicubic misses the truth by more than 2% (edges): most pixels are flat and bicubic gets
    # them right, so unweighted, the loss hardly sees what the stage is for
    detail_weight: float = 10.0
    feature_weight: float = 0.002  # its gradient is ~200x the L1's at equal weight (measured): 0.002 makes them alike
    # steps of pixels alone before the feature term joins: from a near-zero residual, the feature term (and a
    # squared loss) kept stages at plain bicubic in several runs here; L1 and the edge term get them away from it
    feature_start: int = 600
    feature_vae: str = "builtin"  # whose encoder gives the feature term ("builtin": the shipped VAE)
    adversarial_weight: float = 0.01
    adversarial_start: int = 300  # steps of reconstruction alone before the discriminator joins
    disc_dim: int = 32
    holdout_clips: int = 16
    lr: float = 1e-3
    batch_size: int = 8
    warmup_steps: int = 50
    ema: float = 0.99

    def check(self) -> None:
        if self.low % 8 or self.crop % 4 or self.crop > self.low:
            raise KinemaError(f"low {self.low} must be a multiple of 8 and crop {self.crop} a multiple of 4 within it.")
        if self.clip_frames < 1 or self.clip_frames > self.frames:
            raise KinemaError(f"clip_frames {self.clip_frames} must be from 1 to frames ({self.frames}).")


def render_pairs(seed: int, indices, low: int, frames: int, colors, random_colors: float):
    """Clips of the world `seed` rendered at low x low and at 2low x 2low: (uint8 [N, F, low, low, 3],
    uint8 [N, F, 2low, 2low, 3])."""
    lows, highs = [], []
    for i in indices:
        rng = world.clip_rng(seed, int(i))
        spec = (random_rgb_spec(rng, low, low) if rng.random() < random_colors
                else world.random_spec(rng, low, low, colors=colors))
        lows.append(world.render(spec, low, low, frames))
        highs.append(world.render(spec, 2 * low, 2 * low, frames))
    return np.stack(lows), np.stack(highs)


class PatchDiscriminator(nn.Module):
    """Real / fake scores per patch of a frame [N, 3, H, W] (each score sees about 22 pixels)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, dim, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(dim, 2 * dim, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * dim, 2 * dim, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * dim, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _frames(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] -> [B * F, 3, H, W]."""
    return video.transpose(1, 2).flatten(0, 1)


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum((a.diff(dim=d) - b.diff(dim=d)).abs().mean() for d in (-1, -2))


class UpscalerTask(TrainTask):
    name = "upscaler"

    def __init__(self, cfg: UpscalerTrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        self.model = Upscaler2x(UpscalerConfig(cfg.dim, cfg.blocks, cfg.kernel_frames)).to(device)
        self.disc = PatchDiscriminator(cfg.disc_dim).to(device)
        if cfg.init_from:
            self.model.load_state_dict(init_state(cfg.init_from, "upscaler", _load_stage))
        self.features = _feature_taps(cfg.feature_vae, device) if cfg.feature_weight else None
        colors = tuple(world.COLORS) + tuple(world.EXTRA_COLORS)
        log.info("upscaler: rendering %d clips at %d and %d pixels", cfg.pool_size, cfg.low, 2 * cfg.low)
        self.low, self.high = render_pairs(cfg.seed, range(cfg.pool_size), cfg.low, cfg.frames, colors, cfg.random_colors)

    def modules(self):
        return {"upscaler": self.model, "disc": self.disc}

    def clip_groups(self):
        return [list(self.model.parameters()), list(self.disc.parameters())]  # the discriminator's never limit the upscaler's

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        rng = world.clip_rng(c.seed + 1, step)
        lows, highs = [], []
        for i in rng.integers(0, len(self.low), c.batch_size):
            t = int(rng.integers(0, c.frames - c.clip_frames + 1))
            lo, hi = self.low[i, t : t + c.clip_frames], self.high[i, t : t + c.clip_frames]
            ys, xs = np.nonzero(object_mask(lo))
            y, x = rng.integers(0, c.low - c.crop + 1), rng.integers(0, c.low - c.crop + 1)
            if len(ys):  # a crop holding part of the object's path
                k = rng.integers(len(ys))
                y = rng.integers(max(0, ys[k] - c.crop + 1), min(c.low - c.crop, ys[k]) + 1)
                x = rng.integers(max(0, xs[k] - c.crop + 1), min(c.low - c.crop, xs[k]) + 1)
            lows.append(world.to_tensor(lo[:, y : y + c.crop, x : x + c.crop]))
            highs.append(world.to_tensor(hi[:, 2 * y : 2 * (y + c.crop), 2 * x : 2 * (x + c.crop)]))
        return torch.stack(lows).to(self.device), torch.stack(highs).to(self.device)

    def loss(self, step, generator):
        c = self.cfg
        low, high = self.batch(step)
        out = self.model(low)
        f_out, f_true = _frames(out), _frames(high)
        with torch.no_grad():
            b, _, f, h, w = low.shape
            bic = F.interpolate(_frames(low), scale_factor=2, mode="bicubic", align_corners=False)
            wt = 1 + c.detail_weight * ((bic - f_true).abs().amax(1, keepdim=True) > 0.04).float()  # [B*F, 1, H, W]
        l1 = ((f_out - f_true).abs() * wt).mean() / wt.mean()
        mse = ((f_out - f_true).pow(2) * wt).mean() / wt.mean()
        edges = edge_l1(f_out, f_true)
        loss = c.l1_weight * l1 + c.mse_weight * mse + c.edge_weight * edges
        terms = {"l1": l1.item(), "mse": mse.item(), "edge": edges.item()}
        if self.features is not None and step >= c.feature_start:  # on each clip's middle frame (the feature network costs more than the upscaler)
            mid = out.shape[2] // 2
            feat = sum((a - b).abs().mean() for a, b in zip(self.features(out[:, :, mid]), self.features(high[:, :, mid])))
            loss = loss + c.feature_weight * feat
            terms["feature"] = feat.item()
        if c.adversarial_weight and step >= c.adversarial_start:
            self.disc.requires_grad_(False)  # the generator's term: gradients reach the upscaler only
            g_adv = -self.disc(f_out).mean()
            self.disc.requires_grad_(True)
            d_loss = F.relu(1 - self.disc(f_true)).mean() + F.relu(1 + self.disc(f_out.detach())).mean()
            loss = loss + c.adversarial_weight * g_adv + d_loss
            terms.update(adv=g_adv.item(), disc=d_loss.item())
        return loss, terms

    # -- held-out figures, samples, export ---------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> dict:
        c = self.cfg
        colors = tuple(world.COLORS) + tuple(world.EXTRA_COLORS)
        low, high = render_pairs(c.seed + HOLDOUT_SEED_OFFSET, range(n or c.holdout_clips), c.low, c.frames, colors, 0.0)
        self.model.eval()
        rows = [upscale_metrics(self.model, world.to_tensor(lo), world.to_tensor(hi)) for lo, hi in zip(low, high)]
        self.model.train()
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

    def sample(self, folder: Path, step: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        m = self.evaluate()
        log.info("upscaler step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
        (folder / f"upscaler-step{step:07d}.json").write_text(json.dumps({"step": step, **m}))

    def export(self, folder: Path) -> None:
        from kinema.upscale.load import save_upscaler

        save_upscaler(folder / "stage.safetensors", self.model, {
            "producer": "kinema train upscaler", "low": str(self.cfg.low),
            "config": json.dumps(self.model.config.to_dict())})


def upscale_metrics(model, low: torch.Tensor, high: torch.Tensor) -> dict:
    """A stage's figures on one clip (low [3, F, h, w], truth [3, F, 2h, 2w] in [-1, 1]) against bicubic:
    PSNR (dB, 8-bit), edge sharpness (mean gradient magnitude where the truth has an edge, over the truth's) and
    temporal error (mean |frame-to-frame change - the truth's|, 8-bit levels; lower is steadier)."""
    from kinema.upscale.run import resize_video

    out = model(low[None])[0].clamp(-1, 1)
    bic = resize_video(low, high.shape[3], high.shape[2], "bicubic")
    res = {}
    for name, v in (("learned", out), ("bicubic", bic)):
        res[f"{name}_psnr"] = _psnr(v, high)
        res[f"{name}_sharpness"] = _sharpness(v, high)
        res[f"{name}_temporal"] = float(((v.diff(dim=1) - high.diff(dim=1)).abs() * 127.5).mean())
    return res


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    q = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = float(((q(a) - q(b)) ** 2).mean())
    return 10 * np.log10(255**2 / max(mse, 1e-10))


def _gradient(v: torch.Tensor) -> torch.Tensor:
    gx = F.pad(v.diff(dim=-1), (0, 1))
    gy = F.pad(v.diff(dim=-2), (0, 0, 0, 1))
    return (gx**2 + gy**2).sum(0).sqrt()  # [F, H, W]


def _sharpness(v: torch.Tensor, truth: torch.Tensor) -> float:
    g, gt = _gradient(v), _gradient(truth)
    edges = gt > 0.25 * gt.amax()
    return float(g[edges].mean() / gt[edges].mean().clamp_min(1e-6))


def _load_stage(path):
    from kinema.upscale.load import load_upscaler

    return load_upscaler(path, 2).model.stages[0]


def _feature_taps(source: str, device):
    """frames [N, 3, H, W] -> [features after each of the VAE encoder's first two downsampling stages]."""
    from kinema.models.vae import FrameCache, Resample

    import kinema
    from kinema.builtin import builtin_path

    vae = kinema.load_vae(str(builtin_path()) if source == "builtin" else source, device=device)
    vae.requires_grad_(False)
    enc = vae.encoder

    def taps(frames: torch.Tensor) -> list[torch.Tensor]:
        cache, out = FrameCache(), []
        x = enc.conv1(frames[:, :, None], cache)
        for block in enc.downsamples:
            x = block(x, cache)
            if isinstance(block, Resample):
                out.append(x)
                if len(out) == 2:
                    break
        return out

    return taps
