"""`kinema train vae`: the Wan2.1 VAE architecture trained on reconstruction + KL.

The clip goes through the same causal chunking as inference (first frame alone,
then 4 at a time with the frame cache), so the causal first frame is trained
exactly as it is used. Loss: L1 + MSE on pixels in [-1, 1] plus a small KL
term on the posterior; held-out PSNR is measured at every sample point. The
export writes `vae/` with the per-channel latent mean / std measured on
held-out clips, so the DiT sees normalised latents as with the official VAE.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from kinema.models.vae import FrameCache, WanVAE
from kinema.toy import world
from kinema.train import config as configs
from kinema.train.loop import TrainTask, init_state
from kinema.train.world_data import ClipPool, clip_batch

log = logging.getLogger("kinema")
HOLDOUT_SEED_OFFSET = 1_000_003  # held-out clips come from a different world seed


@dataclasses.dataclass
class VAEConfig(configs.TrainConfig):
    output_dir: str = "runs/vae"
    dim: int = 12
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    z_dim: int = 16
    num_res_blocks: int = 2
    train_frames: int = 5  # frames per training clip (1 + 4k); the causal path is the same at any length
    crop: int = 32  # random square crops of this size (0 = whole frames)
    crop_around_object: bool = False  # with a pool: every crop holds part of the object's path
    image_batch: int = 0  # > 0 (with a pool): this many whole single frames per step beside the clips
    image_weight: float = 1.0  # their loss's weight
    kl_weight: float = 1e-6
    init_logvar: float = -6.0
    init_mu_scale: float = 10.0
    init: str = "kaiming"  # conv weight init: "kaiming" (fan-in, gain sqrt 2, zero bias) or "default" (PyTorch's)
    l1_weight: float = 1.0
    object_weight: float = 0.0  # extra loss weight on pixels away from the clip's median colour (its background)
    mse_weight: float = 1.0
    grad_weight: float = 0.0  # L1 on the horizontal and vertical pixel differences (edges), object-weighted as well
    # L1 on the frame-to-frame differences, object-weighted: a causal VAE decodes each latent frame into 4 pixel
    # frames, and plain L1 / MSE leave a jump (in the object's colour and place) where one latent frame's frames
    # meet the next's; this term costs the whole jump
    temporal_weight: float = 0.0
    # "identity": every causal conv's past taps zero and the temporal resamplers pass their latest frame, applied
    # after init_from, so a VAE trained on single frames (train_frames 1, which only reaches the last taps) starts
    # its video stage as that image VAE run frame by frame; "" leaves the weights as they are.
    temporal_init: str = ""
    random_colors: float = 0.3  # share of clips with arbitrary colours, so the VAE is not tied to the palette
    # share of training clips whose object travels a random fraction of the world's distance, down to standing still:
    # the world's objects always move 35-60% of the frame in 17 frames, and a VAE that never saw slower motion decodes
    # a still or slow object (a long video's, an image's) with twice the colour error, worst in one of the 4 frames
    # of each latent frame (docs/training.md, VAE stage 11)
    slow_clips: float = 0.0
    train_encoder: bool = True  # False: only the decoder learns, so the latents (and a DiT trained on them) stay valid
    data_seed: int = -1  # seed of the training clips (-1 = seed); the held-out clips always follow seed
    pool_size: int = 0  # > 0: render this many clips once (in parallel) and crop each batch from them; for GPUs,
    # which outrun the renderer. 0: fresh clips every step (on a CPU rendering is ~3% of a step)
    holdout_clips: int = 16
    stats_clips: int = 64  # held-out clips the exported latent mean / std are measured on
    lr: float = 1.2e-4
    batch_size: int = 8
    warmup_steps: int = 200

    def check(self) -> None:
        if not 0.0 <= self.slow_clips <= 1.0:
            raise configs.KinemaError(f"slow_clips {self.slow_clips} is a share of the clips: give one in 0..1.")
        if (self.train_frames - 1) % 4 or (self.frames - 1) % 4:
            raise configs.KinemaError("train_frames and frames must be 1 + 4k (1, 5, 9, 13, 17, ...).")
        if self.crop and (self.crop % 8 or self.crop > min(self.width, self.height)):
            raise configs.KinemaError(f"crop={self.crop} must be a multiple of 8 and fit in {self.width}x{self.height}.")
        if self.image_batch and not self.pool_size:
            raise configs.KinemaError("image_batch draws single frames from a pool: set pool_size too.")
        if self.crop_around_object and not (self.pool_size and self.crop):
            raise configs.KinemaError("crop_around_object crops clips of a pool: set pool_size and crop too.")
        if self.temporal_init not in ("", "identity"):
            raise configs.KinemaError(f"temporal_init={self.temporal_init!r}: use 'identity' or leave it empty.")
        if self.init not in ("kaiming", "default"):
            raise configs.KinemaError(f"init={self.init!r}: use 'kaiming' or 'default'.")


def moments(vae: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw posterior mean and log-variance of a video, along the inference chunking (differentiable)."""
    cache = FrameCache()
    parts = [vae.moments_chunk(video[:, :, c], cache) for c in vae.temporal_chunks(video.shape[2])]
    return torch.cat([m for m, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)


def reconstruct(vae: WanVAE, video: torch.Tensor, generator: torch.Generator | None = None, posterior=None):
    """Differentiable encode -> sample -> decode along the inference chunking. Returns (recon, mu, logvar).
    `posterior`: (mu, logvar) already computed (e.g. without gradients, when only the decoder trains)."""
    mu, logvar = posterior if posterior is not None else moments(vae, video)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mu
    if generator is not None:
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, device=mu.device)
    cache = FrameCache()
    x = vae.conv2(z)
    frames = [vae.decoder(x[:, :, i : i + 1], cache) for i in range(x.shape[2])]
    return torch.cat(frames, dim=2), mu, logvar


def pixel_weights(video: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Loss weights [B, 1, T, H, W]: 1 + object_weight where a pixel is > 0.1 away from its clip's median colour.

    Small objects on a plain background are a few % of the pixels, and an autoencoder first learns a grey blur
    of them; weighting them breaks that plateau (measured, images at 64x64 after 200 steps: colourless blobs
    unweighted, the right colours with object_weight 20).
    """
    if not object_weight:
        return torch.ones_like(video[:, :1])
    median = video.flatten(2).median(dim=2).values[:, :, None, None, None]
    return 1.0 + object_weight * ((video - median).abs().amax(1, keepdim=True) > 0.1).to(video.dtype)


def edge_l1(recon: torch.Tensor, video: torch.Tensor, w: torch.Tensor, dims: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    """Weighted L1 between the pixel differences of two videos [B, C, T, H, W] along `dims` (3, 4: horizontal and
    vertical, edges; 2: frame to frame, flicker): a blurred edge (or a jump between frames) costs its whole step
    here, where in plain L1 it costs only the pixels it misses."""
    total = recon.new_zeros(())
    for dim in dims:
        d = (recon.diff(dim=dim) - video.diff(dim=dim)).abs()
        wd = torch.maximum(w.narrow(dim, 0, w.shape[dim] - 1), w.narrow(dim, 1, w.shape[dim] - 1))
        total = total + (d * wd).mean() / wd.mean()
    return total


@torch.no_grad()
def identity_in_time(vae: WanVAE) -> None:
    """Make the VAE act frame by frame: the past taps of every 3-tap causal conv zero; the encoder's stride-2 time
    convs pass the later frame of each pair, the decoder's frame-doubling convs give the current frame twice."""
    from kinema.models.vae import CausalConv3d, Resample

    time_convs = set()
    for m in vae.modules():
        if isinstance(m, Resample) and hasattr(m, "time_conv"):
            conv = m.time_conv
            time_convs.add(conv)
            conv.weight.zero_()
            conv.bias.zero_()
            c = conv.weight.shape[1]
            eye = torch.eye(c, dtype=conv.weight.dtype, device=conv.weight.device)
            for half in range(conv.weight.shape[0] // c):  # 1 (downsample) or 2 (upsample) output halves
                conv.weight[half * c : (half + 1) * c, :, -1, 0, 0] = eye
    for m in vae.modules():
        if isinstance(m, CausalConv3d) and m not in time_convs and m.kernel_size[0] > 1:
            m.weight[:, :, :-1].zero_()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1], measured on 8-bit pixels."""
    from kinema.toy.analyse import psnr as psnr_uint8

    return psnr_uint8(*(((t.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy() for t in (a, b)))


def holdout(cfg: VAEConfig, n: int, frames: int | None = None) -> torch.Tensor:
    video, _ = clip_batch(cfg.seed + HOLDOUT_SEED_OFFSET, 0, n, cfg.width, cfg.height, frames or cfg.frames,
                          colors=tuple(world.COLORS) + tuple(world.EXTRA_COLORS))
    return video


class VAETask(TrainTask):
    name = "vae"
    colors = tuple(world.COLORS) + tuple(world.EXTRA_COLORS)  # orange too: the VAE must not be tied to the palette

    def __init__(self, cfg: VAEConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        self.vae = WanVAE(dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=cfg.dim_mult, num_res_blocks=cfg.num_res_blocks).to(device)
        with torch.no_grad():
            if cfg.init == "kaiming":
                # PyTorch's default conv init shrinks the signal by ~0.58 per layer; with the channel RMS norms this
                # small network then learns only a grey blur (measured, images at 64x64 after 200 steps: 14.4 dB
                # with the default init, 22.7 dB with this one).
                for m in self.vae.modules():
                    if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                        torch.nn.init.normal_(m.weight, 0.0, (2.0 / m.weight[0].numel()) ** 0.5)
                        torch.nn.init.zeros_(m.bias)
            # Start with a narrow posterior, or the decoder first learns to ignore its noisy input; and with
            # latents large enough to outweigh the biases after the decoder's channel RMS norms, or training
            # stalls at a constant output (measured: 12 dB after 150 steps with the default init, 20 dB with this).
            self.vae.conv1.bias[cfg.z_dim :].fill_(cfg.init_logvar)
            self.vae.conv1.weight[: cfg.z_dim] *= cfg.init_mu_scale
        self.start_stats = None  # (latents_mean, latents_std) of an exported VAE this run starts from
        if cfg.init_from:
            from kinema.loading.vae import load_vae

            def load(path):
                start = load_vae(path)
                self.start_stats = (list(start.latents_mean), list(start.latents_std))
                return start

            self.vae.load_state_dict(init_state(cfg.init_from, "vae", load))
        if cfg.temporal_init == "identity":
            identity_in_time(self.vae)
        self.vae.train()
        self.data = None if cfg.data == "world" else _folder_batches(cfg)
        self.pool = None
        if cfg.data == "world" and cfg.pool_size:
            log.info("vae: rendering a pool of %d clips", cfg.pool_size)
            # Clips as long as the held-out ones; a batch takes a random run of train_frames of each (single frames
            # from anywhere in the motion for an image stage).
            self.pool = ClipPool(self._data_seed(), cfg.pool_size, cfg.width, cfg.height,
                                 max(cfg.train_frames, cfg.frames), self.colors, cfg.random_colors, cfg.slow_clips)

    def _data_seed(self) -> int:
        return self.cfg.seed if self.cfg.data_seed < 0 else self.cfg.data_seed

    def modules(self):
        return {"vae": self.vae}

    def trainable(self):
        if not self.cfg.train_encoder:
            for m in (self.vae.encoder, self.vae.conv1):
                m.requires_grad_(False)
        return [p for p in self.vae.parameters() if p.requires_grad]

    def batch(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        if self.data is not None:
            return self.data(step).to(self.device)
        if self.pool is not None:
            return self.pool.batch(step, cfg.batch_size, cfg.crop, cfg.train_frames,
                                   cfg.crop_around_object).to(self.device)
        video, _ = clip_batch(self._data_seed(), step, cfg.batch_size, cfg.width, cfg.height, cfg.train_frames,
                              colors=self.colors, random_colors=cfg.random_colors, crop=cfg.crop, slow=cfg.slow_clips)
        return video.to(self.device)

    def loss(self, step, generator):
        cfg = self.cfg
        loss, terms = self._reconstruction_loss(self.batch(step), generator)
        if cfg.image_batch:  # whole single frames beside the clips, so the spatial path stays sharp
            images = self.pool.batch(step + (1 << 40), cfg.image_batch, 0, 1).to(self.device)
            image_loss, image_terms = self._reconstruction_loss(images, generator)
            loss = loss + cfg.image_weight * image_loss
            terms.update({f"image_{k}": v for k, v in image_terms.items()})
        return loss, terms

    def _reconstruction_loss(self, video: torch.Tensor, generator):
        cfg = self.cfg
        with torch.set_grad_enabled(cfg.train_encoder):
            mu, logvar = moments(self.vae, video)
        recon, mu, logvar = reconstruct(self.vae, video, generator, (mu, logvar))
        w = pixel_weights(video, cfg.object_weight)
        l1 = ((recon - video).abs() * w).mean() / w.mean()
        mse = ((recon - video).pow(2) * w).mean() / w.mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        terms = {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
        if cfg.grad_weight:
            edges = edge_l1(recon, video, w)
            loss = loss + cfg.grad_weight * edges
            terms["edge"] = edges.item()
        if cfg.temporal_weight and video.shape[2] > 1:
            flicker = edge_l1(recon, video, w, dims=(2,))
            loss = loss + cfg.temporal_weight * flicker
            terms["temporal"] = flicker.item()
        return loss, terms

    @torch.no_grad()
    def evaluate(self, n: int | None = None) -> float:
        self.vae.eval()
        video = holdout(self.cfg, n or self.cfg.holdout_clips).to(self.device)
        if self.cfg.train_frames == 1:  # an image stage: every 4th frame of the held-out clips, as single images
            video = video[:, :, ::4].transpose(1, 2).flatten(0, 1)[:, :, None]  # [N*T', 3, 1, H, W]
        out = torch.cat([self.vae.decode(self.vae.encode(v[None])) for v in video])
        self.vae.train()
        return psnr(out, video)

    def sample(self, folder: Path, step: int) -> None:
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        value = self.evaluate()
        log.info("vae step %d: held-out PSNR %.2f dB", step, value)
        with torch.no_grad():
            self.vae.eval()
            video = holdout(self.cfg, 4).to(self.device)
            out = self.vae.decode(self.vae.encode(video))
            self.vae.train()
        rows = [torch.cat([v[:, ::4], o[:, ::4]], dim=2) for v, o in zip(video, out)]  # [3, 5, 2H, W] per clip
        grid = torch.cat([r.permute(0, 2, 1, 3).flatten(2) for r in rows], dim=1)  # [3, 4*2H, 5W]
        Image.fromarray(((grid.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()).save(
            folder / f"vae-step{step:07d}.png")
        (folder / f"vae-step{step:07d}.json").write_text(json.dumps({"step": step, "holdout_psnr": value}))

    @torch.no_grad()
    def latent_stats(self, n: int = 64) -> tuple[list[float], list[float]]:
        self.vae.eval()
        video = holdout(self.cfg, n).to(self.device)
        mu = torch.cat([moments(self.vae, v[None])[0] for v in video]).transpose(0, 1).flatten(1)  # [z, N]
        self.vae.train()
        return mu.mean(1).tolist(), mu.std(1).clamp_min(1e-3).tolist()

    def export(self, folder: Path) -> None:
        from kinema.train.export import save_component

        cfg = self.cfg
        if self.start_stats is not None and not cfg.train_encoder:
            # the encoder is the one it started from, and a DiT trained on its latents normalised them by its stats:
            # keep those (measured again on other held-out clips they would differ, and shift every DiT input); a
            # training checkpoint carries no stats, so a run started from one measures them as any other
            mean, std = self.start_stats
        else:
            mean, std = self.latent_stats(cfg.stats_clips)
        save_component(folder / "vae", "diffusion_pytorch_model.safetensors", self.vae.state_dict(), {
            "_class_name": "AutoencoderKLWan", "base_dim": cfg.dim, "z_dim": cfg.z_dim, "dim_mult": list(cfg.dim_mult),
            "num_res_blocks": cfg.num_res_blocks, "latents_mean": mean, "latents_std": std,
        })


def _folder_batches(cfg: VAEConfig):
    from kinema.train.data import folder_batches

    return folder_batches(cfg, frames=cfg.train_frames)
