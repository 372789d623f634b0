"""The Wan2.1 3D causal video VAE.

Video is compressed 8x in space and 4x in time (1 + 4k frames <-> 1 + k latent
frames) by convolutions that are causal in time: an output frame depends only
on the current and earlier input frames. That is what lets a video of any
length be processed in short temporal chunks (encode: the first frame alone,
then 4 frames at a time; decode: one latent frame at a time) with each causal
layer remembering the last frames it saw in a `FrameCache`, so memory does not
grow with the number of frames. `encode_chunk`/`decode_chunk` are the per-chunk
steps. Each is split at the latent-resolution middle (whose attention sees the
whole frame) from the full-resolution convolutional stages, so a spatial tiler
(kinema/memory/vae_tiling.py) can run the middle on whole frames and only the
local stages on tiles, each tile with its own cache.

Parameter names are those of the official code (wan/modules/vae.py), so
official checkpoints load one to one; the model does no file I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinema.errors import KinemaError
from kinema.ops.attention import attention

# A 3-frame causal kernel needs the 2 frames before the chunk.
CACHE_T = 2

# Per-channel statistics of the official Wan2.1 latent space; the DiT works on (mu - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


class FrameCache:
    """The frames each causal layer saw at the end of the previous chunk.

    Keyed by layer rather than by call order, so the temporal resamplers, which
    do no time convolution on the first chunk, cannot shift what other layers
    read. One cache serves one stream of chunks (one video, or one spatial tile).
    """

    def __init__(self):
        self._frames: dict[nn.Module, torch.Tensor] = {}

    def get(self, layer: nn.Module) -> torch.Tensor | None:
        return self._frames.get(layer)

    def put(self, layer: nn.Module, frames: torch.Tensor) -> None:
        self._frames[layer] = frames


class CausalConv3d(nn.Conv3d):
    """Conv3d padded on the past side only in time; with a cache, the past is the previous chunk's frames."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self._causal_padding = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:  # x [B, C, T, H, W]
        pw, _, ph, _, pt, _ = self._causal_padding
        past = None
        if cache is not None and pt > 0:
            past = cache.get(self)
            tail = x if past is None or x.shape[2] >= CACHE_T else torch.cat([past, x], dim=2)
            # A clone, because a view would keep the whole chunk's activation alive.
            cache.put(self, tail[:, :, -CACHE_T:].clone())
        if past is None and x.shape[2] == 1 and pt == self.kernel_size[0] - 1 and self.stride[0] == 1:
            # One frame with nothing before it (a video's first frame, an image): every earlier tap sees the zero
            # border, so only the last one acts, and the 3D convolution is this 2D one exactly, at a third of the
            # work for 3-tap kernels (the VAE's image training stage runs on it).
            y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (ph, pw), self.dilation[1:])
            return y.unsqueeze(2)
        if not (pt or ph or pw):
            return super().forward(x)
        # One buffer holds the zero border, the previous chunk's frames and this chunk: the numbers of
        # F.pad(torch.cat([past, x])) without the concatenated copy in between, which at full resolution
        # is the largest activation of the decoder.
        b, c, t, h, w = x.shape
        tp = 0 if past is None else past.shape[2]
        t0 = max(pt - tp, 0)  # zero frames still needed in front
        # On the CPU the buffer is channels-last (NDHWC), the layout oneDNN's 3D convolution reads without a reorder of
        # its own: 10% faster for a 96-channel 3x3x3 convolution at 832x480 on an AVX2 CPU, the transposing copy
        # included (PyTorch returns the output in NCDHW whatever the input's layout).
        layout = torch.channels_last_3d if x.device.type == "cpu" else torch.contiguous_format
        buf = torch.empty(b, c, t0 + tp + t, h + 2 * ph, w + 2 * pw, dtype=x.dtype, device=x.device,
                          memory_format=layout)  # [B, C, T', H + 2ph, W + 2pw]
        if ph:
            buf[:, :, :, :ph].zero_()
            buf[:, :, :, -ph:].zero_()
        if pw:
            buf[..., :pw].zero_()
            buf[..., -pw:].zero_()
        if t0:
            buf[:, :, :t0].zero_()
        if past is not None:
            buf[:, :, t0 : t0 + tp, ph : ph + h, pw : pw + w].copy_(past)
        buf[:, :, t0 + tp :, ph : ph + h, pw : pw + w].copy_(x)
        return super().forward(buf)


class RMSNorm(nn.Module):
    """L2-normalise over channels, rescale by sqrt(dim) * gamma (the official RMS_norm, without bias)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 and rounded once: bf16 loses precision in the sum of squares and in each rescale. The rescale is
        # in place on normalize's fresh output (its backward does not need it): one activation-sized temporary less.
        return F.normalize(x.float(), dim=1).mul_(self.scale * self.gamma.float()).to(x.dtype)


class Upsample2x(nn.Module):
    """Nearest-exact 2x spatial upsampling, computed in fp32 because bf16 nearest is unsupported on some backends."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """Spatial 2x up/downsampling per frame, plus 2x in time for the '3d' modes."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:  # x [B, C, T, H, W]
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        b, t = x.shape[0], x.shape[2]
        y = self.resample(x.transpose(1, 2).flatten(0, 1))  # [B*T, C', H', W']
        x = y.unflatten(0, (b, t)).transpose(1, 2)  # [B, C', T, H', W']
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """Each frame becomes two (time_conv's two output halves, interleaved), except the video's first frame."""
        if cache.get(self.time_conv) is None:
            # The first frame stays one frame, and it is not history for the next chunk
            # either: the official model starts that one from zeros (its 'Rep' marker).
            cache.put(self.time_conv, x[:, :, :0])
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache).view(b, 2, c, t, h, w)  # [B, 2, C, T, H, W]
        return y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frames t0a, t0b, t1a, ...

    def _halve_frames(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """Stride-2 time conv over (previous chunk's last frame, this chunk); the video's first frame passes alone."""
        past = cache.get(self.time_conv)
        cache.put(self.time_conv, x[:, :, -1:].clone())
        if past is None:
            return x
        return self.time_conv(torch.cat([past, x], dim=2))  # [B, C, T/2, H, W]


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a norm's fresh output: in place without autograd (one activation less at the peak), where the
    backward would need its input. The nn.SiLU modules stay in the Sequentials, which keep the official indices."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, dropout, conv2 = self.residual
        h = conv1(_silu(norm1(x)), cache)
        h = conv2(dropout(_silu(norm2(h))), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FrameCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # [B*T, C, H, W]
        qkv = self.to_qkv(y).flatten(2).transpose(1, 2).unsqueeze(2)  # [B*T, H*W, 1, 3C]
        q, k, v = qkv.chunk(3, dim=-1)  # each [B*T, H*W, 1, C]
        y = attention(q, k, v).squeeze(2).transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]
        y = self.proj(y).view(b, t, c, h, w).transpose(1, 2)  # [B, C, T, H, W]
        return x + y


def _middle(dim: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout)])


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
    norm, _, conv = head
    return conv(_silu(norm(x)), cache)


class Encoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample, dropout=0.0):
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(out_dim, dropout)
        self.head = _head(out_dim, z_dim)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        return self.bottleneck(self.features(x, cache), cache)

    def features(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """conv1 and the downsampling stages; without attn_scales (Wan2.1) only convolutions, so each output is local."""
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        return x

    def bottleneck(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """The middle blocks and head at latent resolution; the middle attention sees the whole frame."""
        for block in self.middle:
            x = block(x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_upsample, dropout=0.0):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampling conv halved the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(out_dim, 3)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        return self.upsample(self.bottleneck(x, cache), cache)

    def bottleneck(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """conv1 and the middle blocks at latent resolution; the middle attention sees the whole frame."""
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        return x

    def upsample(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """The upsampling stages and head; without attn_scales (Wan2.1) only convolutions, so each pixel is local."""
        for block in self.upsamples:
            x = block(x, cache)
        return _run_head(self.head, x, cache)


class WanVAE(nn.Module):
    """Wan2.1 video VAE: pixels [B, 3, 1+4k, H, W] in [-1, 1] <-> normalised latents [B, z, 1+k, H/8, W/8]."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult=(1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales=(),
        temporal_downsample=(False, True, True),
        latents_mean=None,
        latents_std=None,
        dropout: float = 0.0,
    ):
        super().__init__()
        dim_mult, attn_scales, temporal_downsample = list(dim_mult), list(attn_scales), list(temporal_downsample)
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(dim_mult) - 1} entries, got {temporal_downsample}")
        self.z_dim = z_dim
        self.dim_mult, self.num_res_blocks = dim_mult, num_res_blocks
        self.attn_scales, self.temporal_downsample = attn_scales, temporal_downsample
        self.spatial_ratio = 2 ** (len(dim_mult) - 1)
        self.temporal_ratio = 2 ** sum(map(bool, temporal_downsample))
        # Plain Python constants, not buffers: checkpoints do not hold them.
        if latents_mean is None:
            latents_mean = WAN21_LATENTS_MEAN if z_dim == 16 else (0.0,) * z_dim
        if latents_std is None:
            latents_std = WAN21_LATENTS_STD if z_dim == 16 else (1.0,) * z_dim
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean/std need {z_dim} values, got {len(latents_mean)}/{len(latents_std)}")
        self.latents_mean = tuple(float(v) for v in latents_mean)
        self.latents_std = tuple(float(v) for v in latents_std)

        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales, temporal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample[::-1], dropout)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=like.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=like.device).view(1, -1, 1, 1, 1)
        return mean, std  # each [1, z, 1, 1, 1]

    def temporal_chunks(self, num_frames: int) -> list[slice]:
        """The pixel-frame ranges encoded together: the first frame alone, then `temporal_ratio` at a time."""
        r = self.temporal_ratio
        return [slice(0, 1)] + [slice(s, s + r) for s in range(1, num_frames, r)]

    def moments_chunk(self, frames: torch.Tensor, cache: FrameCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One temporal chunk [B, 3, t, H, W] -> raw (un-normalised) latent mean and log-variance [B, z, t', h, w]."""
        return self.moments_from_features(self.encoder.features(frames.to(self.device, self.dtype), cache), cache)

    def moments_from_features(self, features: torch.Tensor, cache: FrameCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's latent-resolution end: its full-resolution features [B, C, t', h, w] -> raw mean, log-variance."""
        mu, logvar = self.conv1(self.encoder.bottleneck(features, cache)).chunk(2, dim=1)
        return mu, logvar

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the DiT's latent space (mu - mean) / std, fp32."""
        mean, std = self._stats(mu)
        return (mu.float() - mean) / std

    def encode_chunk(self, frames: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """One temporal chunk [B, 3, t, H, W] -> its normalised latent mean [B, z, t', H/8, W/8] (fp32)."""
        return self.normalize(self.moments_chunk(frames, cache)[0])

    def decode_chunk(self, z: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """One latent frame [B, z, 1, h, w] (normalised) -> its pixel frames [B, 3, t, 8h, 8w], not clamped (fp32)."""
        return self.decoder.upsample(self.decode_bottleneck(z, cache), cache).float()

    def decode_bottleneck(self, z: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """The decoder's latent-resolution start: one latent frame (normalised) -> middle features [B, C, 1, h, w]."""
        z = z.to(self.device, torch.float32)
        mean, std = self._stats(z)
        return self.decoder.bottleneck(self.conv2((z * std + mean).to(self.dtype)), cache)

    def check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise KinemaError(f"the VAE encodes video shaped [B, 3, F, H, W]; got {list(video.shape)}.")
        f, h, w = video.shape[2:]
        r, s = self.temporal_ratio, self.spatial_ratio
        if f < 1 or (f - 1) % r:
            lower = 1 + max(f - 1, 0) // r * r
            raise KinemaError(
                f"the VAE encodes 1 + {r}k frames (1, {1 + r}, {1 + 2 * r}, ...); got {f}. "
                f"Use {lower} or {lower + r} frames."
            )
        if h % s or w % s:
            raise KinemaError(f"the VAE needs height and width that are multiples of {s}; got {h}x{w}.")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent mean [B, z, 1+k, H/8, W/8] (fp32)."""
        self.check_video(video)
        cache = FrameCache()
        chunks = [self.encode_chunk(video[:, :, c], cache) for c in self.temporal_chunks(video.shape[2])]
        return torch.cat(chunks, dim=2)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, T, h, w] -> video [B, 3, 1+4(T-1), 8h, 8w] in [-1, 1] (fp32)."""
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise KinemaError(f"the VAE decodes latents shaped [B, {self.z_dim}, T, h, w]; got {list(z.shape)}.")
        cache = FrameCache()
        frames = [self.decode_chunk(z[:, :, i : i + 1], cache) for i in range(z.shape[2])]
        return torch.cat(frames, dim=2).clamp_(-1.0, 1.0)
