"""Tiled VAE encode and decode, chosen automatically when the untiled one would not fit in memory.

Untiled, decoding an 832x480 Wan2.1 video holds every causal layer's two cached
frames at full resolution plus one chunk's activations (4 frames, up to 192
channels): several GB, whatever the video's length. Both scale with the frame
area, so running the full-resolution stages on overlapping spatial tiles, one
tile at a time, cuts them to the tile's area.

How the tiles are run:
- Tile-major: each tile runs the whole temporal chunk sequence (the first frame
  alone, then 4 at a time) with its own `FrameCache`, exactly as the untiled
  path does, and its cache is dropped before the next tile; only one tile's
  caches are ever alive.
- Only the full-resolution convolutional stages are tiled (decoder: the
  upsampling stages; encoder: the downsampling ones). The latent-resolution
  middle, whose attention sees the whole frame, runs on whole frames, as
  untiled; its activations are small. diffusers' AutoencoderKLWan (256-pixel
  tiles, 64-pixel overlap) and ComfyUI's VAEDecodeTiled (512 / 64, plus
  overlapping 64-frame temporal tiles) run the whole VAE per tile, so their
  attention sees one tile and every pixel changes a little. Here the only
  difference from untiled is the zero padding at inner tile edges.
- That padding perturbs a tile's output up to the decoder's receptive field
  (13 latent pixels for Wan2.1), decaying fast: measured on one tile against
  untiled, the error falls below 1e-3 of the output range 6 latent pixels in
  for a random-weight VAE, 4 for the trained built-in one. So neighbours share
  `overlap` = 16 latent pixels (128 output pixels) and the blend takes nothing
  from the outer third of each tile's overlap, ramps linearly across the middle
  third and takes the tile alone on the inner third; weights are normalised by
  their sum. On random weights that stays within 1e-3 of untiled
  (tests/test_vae_tiling.py: 5e-4, 95 dB PSNR); on the same VAE and tiles,
  running the middle per tile with a linear ramp across the whole overlap, as
  diffusers does, gives 1.1e-1 and 48 dB.

Tile sizes are given in output pixels (width x height) and work in latent
pixels (pixels / vae.spatial_ratio); tile starts fall on the latent grid, so the
encoder's stride-2 downsampling sees the same pixel grid as untiled.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from kinema.errors import KinemaError
from kinema.models.vae import AttentionBlock, CausalConv3d, FrameCache, Resample, ResidualBlock, WanVAE

log = logging.getLogger("kinema")

# Latent pixels shared by neighbouring tiles (x8 = 128 output pixels for Wan2.1).
OVERLAP = 16
MIN_TILE = 4  # the smallest tile side asked for, in latent pixels (an overlap of 2)


# ---- tile layout and blend weights --------------------------------------------------------------


def spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `tile` covering [0, length), neighbours sharing at least `overlap`, spread evenly."""
    if length <= tile:
        return [(0, length)]
    if tile <= overlap:
        raise ValueError(f"a tile of {tile} latent pixels cannot overlap its neighbour by {overlap}")
    n = math.ceil((length - overlap) / (tile - overlap))
    return [(s, s + tile) for s in (round(i * (length - tile) / (n - 1)) for i in range(n))]


def _edge(o: int) -> torch.Tensor:
    """Weights across an overlap of `o`, from a tile's edge inwards: 0 on the outer third (the pixels that saw
    the zero padding at the tile's edge), a linear ramp across the middle third, 1 on the inner third. The
    neighbour's weights mirror these, so the two sum to 1 across the overlap."""
    trim = o // 3
    width = o - 2 * trim
    return ((torch.arange(o) - trim + 0.5) / width).clamp_(0.0, 1.0)


def ramp(parts: list[tuple[int, int]], i: int, scale: int = 1) -> torch.Tensor:
    """Blend weights along one axis for tile `i` of `parts`: 1 inside, `_edge` across each overlap with a neighbour.

    `scale` converts latent spans to output pixels (the decoder blends at full resolution).
    """
    start, end = parts[i]
    w = torch.ones((end - start) * scale)
    if i > 0:
        o = (parts[i - 1][1] - start) * scale
        w[:o] *= _edge(o)
    if i < len(parts) - 1:
        o = (end - parts[i + 1][0]) * scale
        w[w.shape[0] - o :] *= _edge(o).flip(0)
    return w


def _tiles(h: int, w: int, tile: tuple[int, int], overlap: int):
    """(rows, cols, i, j) for every tile of an h x w latent grid, row by row."""
    rows, cols = spans(h, tile[0], overlap), spans(w, tile[1], overlap)
    for i in range(len(rows)):
        for j in range(len(cols)):
            yield rows, cols, i, j


# ---- tiled decode and encode --------------------------------------------------------------------


@torch.no_grad()
def tiled_decode(vae: WanVAE, z: torch.Tensor, tile: tuple[int, int], overlap: int = OVERLAP) -> torch.Tensor:
    """`vae.decode` with the upsampling stages run on (height, width) latent tiles; same shapes and range."""
    out, norm = decode_tiles(vae, decode_middle(vae, z), tile, overlap)
    return out.div_(norm).clamp_(-1.0, 1.0)


@torch.no_grad()
def decode_middle(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """The latent-resolution middle of a decode on whole frames with one cache, chunk by chunk as untiled:
    z [B, z, T, h, w] -> features [B, C, T, h, w]."""
    if z.dim() != 5 or z.shape[1] != vae.z_dim:
        raise KinemaError(f"the VAE decodes latents shaped [B, {vae.z_dim}, T, h, w]; got {list(z.shape)}.")
    cache = FrameCache()
    return torch.cat([vae.decode_bottleneck(z[:, :, k : k + 1], cache) for k in range(z.shape[2])], dim=2)


def tile_count(h: int, w: int, tile: tuple[int, int], overlap: int = OVERLAP) -> int:
    return len(spans(h, tile[0], overlap)) * len(spans(w, tile[1], overlap))


@torch.no_grad()
def decode_tiles(vae: WanVAE, middle: torch.Tensor, tile: tuple[int, int], overlap: int = OVERLAP,
                 which=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The upsampling stages on the tiles numbered in `which` (row by row; None: all of them), blended:
    (the weighted sum of their pixels [B, 3, F, H, W] float32, the sum of their weights [H, W]). The decode is
    the first divided by the second; tiles decoded apart (kinema/parallel/vae.py) add up to the same sums."""
    b, _, t, h, w = middle.shape
    r = vae.spatial_ratio
    out = torch.zeros(b, 3, 1 + (t - 1) * vae.temporal_ratio, h * r, w * r, device=vae.device)  # [B, 3, F, H, W]
    norm = torch.zeros(h * r, w * r, device=vae.device)  # summed blend weights
    for index, (rows, cols, i, j) in enumerate(_tiles(h, w, tile, overlap)):
        if which is not None and index not in which:
            continue
        (y0, y1), (x0, x1) = rows[i], cols[j]
        weight = (ramp(rows, i, r)[:, None] * ramp(cols, j, r)[None]).to(vae.device)  # [th*r, tw*r]
        norm[y0 * r : y1 * r, x0 * r : x1 * r] += weight
        cache, f = FrameCache(), 0
        for k in range(t):
            pixels = vae.decoder.upsample(middle[:, :, k : k + 1, y0:y1, x0:x1], cache).float()  # [B, 3, t_k, th*r, tw*r]
            out[:, :, f : f + pixels.shape[2], y0 * r : y1 * r, x0 * r : x1 * r] += pixels * weight
            f += pixels.shape[2]
        del cache
    return out, norm


@torch.no_grad()
def tiled_encode(vae: WanVAE, video: torch.Tensor, tile: tuple[int, int], overlap: int = OVERLAP) -> torch.Tensor:
    """`vae.encode` with the downsampling stages run on (height, width) latent tiles; same shapes."""
    vae.check_video(video)
    b, _, _, height, width = video.shape
    r = vae.spatial_ratio
    h, w = height // r, width // r
    chunks = vae.temporal_chunks(video.shape[2])
    features = norm = None
    for rows, cols, i, j in _tiles(h, w, tile, overlap):
        (y0, y1), (x0, x1) = rows[i], cols[j]
        pixels = video[..., y0 * r : y1 * r, x0 * r : x1 * r]  # [B, 3, F, th*r, tw*r]
        cache = FrameCache()
        part = torch.cat([vae.encoder.features(pixels[:, :, c].to(vae.device, vae.dtype), cache) for c in chunks], dim=2)
        del cache  # part: [B, C, T, th, tw]
        if features is None:
            features = torch.zeros(b, part.shape[1], part.shape[2], h, w, device=vae.device)  # [B, C, T, h, w]
            norm = torch.zeros(h, w, device=vae.device)
        weight = (ramp(rows, i)[:, None] * ramp(cols, j)[None]).to(vae.device)  # [th, tw]
        features[..., y0:y1, x0:x1] += part.float() * weight
        norm[y0:y1, x0:x1] += weight
    features = features.div_(norm).to(vae.dtype)
    # The latent-resolution middle on whole frames with one cache, one latent frame at a time as untiled.
    cache = FrameCache()
    mu = [vae.moments_from_features(features[:, :, k : k + 1], cache)[0] for k in range(features.shape[2])]
    return vae.normalize(torch.cat(mu, dim=2))


# ---- memory estimate ----------------------------------------------------------------------------

# Live elements in a block's busiest moment relative to (input + output channels) x (chunk frames + 2 cached):
# the input kept for the shortcut, the norm and SiLU outputs, the cache-extended and padded conv input,
# the backend's reordered copies, the output. Calibrated on CPU (oneDNN) at widths 32: untiled decode and
# encode peaks measured within 6% of the estimate, plus the fixed amount below. Over-estimating only tiles early.
LIVE_FACTOR = 3.0
# Workspaces and allocator slack that do not scale with the frame (measured 100-200 MB on CPU).
FIXED_BYTES = 256 * 2**20


def _profile(blocks, f: float, t: int) -> tuple[float, float, float, int]:
    """Walk a chain of VAE blocks at steady state (a full temporal chunk).

    f is the spatial scale relative to the latent grid, t the frames in the chunk. Returns (cached,
    transient, f, t): cached elements per latent pixel (two frames per causal 3x3x3 conv, what a
    FrameCache holds between chunks), the largest block's live elements per latent pixel, and the
    scale and frames after the chain.
    """
    cached = transient = 0.0
    for block in blocks:
        if isinstance(block, ResidualBlock):
            c_in, c_out = block.residual[2].in_channels, block.residual[2].out_channels
            cached += 2 * (c_in + c_out) * f * f
            transient = max(transient, (c_in + c_out) * (t + 2) * f * f)
        elif isinstance(block, AttentionBlock):
            c = block.proj.in_channels
            transient = max(transient, 6 * c * t * f * f)  # norm, q, k, v, attention output, projection
        elif isinstance(block, Resample):
            c = block.resample[1].in_channels
            if block.mode == "upsample3d":
                cached += 2 * c * f * f
                transient = max(transient, 6 * c * t * f * f)  # the time conv's doubled output and its reshape
                t *= 2
            if block.mode.startswith("up"):
                transient = max(transient, (c + c // 2) * t * 4 * f * f)  # nearest 2x (fp32), then the conv
                f *= 2
            else:
                transient = max(transient, 3 * c * t * f * f)  # transposed input, padded, strided conv output
                f /= 2
                if block.mode == "downsample3d":
                    cached += c * f * f  # one frame
                    t = max(1, t // 2)
        elif isinstance(block, nn.Sequential):  # a head: RMSNorm, SiLU, 3x3x3 conv
            c_in, c_out = block[2].in_channels, block[2].out_channels
            cached += 2 * c_in * f * f
            transient = max(transient, (c_in + c_out) * (t + 2) * f * f)
        elif isinstance(block, CausalConv3d):  # a stem conv
            if block.kernel_size[0] > 1:
                cached += 2 * block.in_channels * f * f
            transient = max(transient, (block.in_channels + block.out_channels) * (t + 2) * f * f)
    return cached, transient, f, t


def _elem(vae: WanVAE) -> int:
    return torch.finfo(vae.dtype).bits // 8


def decode_bytes(vae: WanVAE, latent_shape: tuple[int, ...], tile: tuple[int, int] | None = None) -> int:
    """Estimated peak bytes of decoding latents [B, z, T, h, w], untiled (tile=None) or on (th, tw) tiles."""
    b, _, t, h, w = latent_shape
    r, elem = vae.spatial_ratio, _elem(vae)
    dec = vae.decoder
    mid_cached, mid_live, _, _ = _profile([dec.conv1, *dec.middle], 1.0, 1)
    up_cached, up_live, _, t_chunk = _profile([*dec.upsamples, dec.head], 1.0, 1)
    frames = 1 + (t - 1) * vae.temporal_ratio
    video = 3 * frames * h * w * r * r * 4  # fp32 output
    th, tw = tile or (h, w)
    tile_px = b * th * tw
    work = (up_cached + LIVE_FACTOR * up_live) * tile_px * elem
    middle = (mid_cached + LIVE_FACTOR * mid_live) * b * h * w * elem
    if tile is None:
        return int(FIXED_BYTES + work + middle + 2 * b * video)  # the chunks and their concatenation
    chunk_out = 2 * 3 * t_chunk * tile_px * r * r * 4  # a tile's chunk and its weighted copy
    features = dec.conv1.out_channels * t * b * h * w * elem  # the middle's output for every frame
    return int(FIXED_BYTES + work + middle + features + b * video + chunk_out)


def encode_bytes(vae: WanVAE, video_shape: tuple[int, ...], tile: tuple[int, int] | None = None) -> int:
    """Estimated peak bytes of encoding video [B, 3, F, H, W] (not counting the video), untiled or on (th, tw) latent tiles."""
    b, _, frames, height, width = video_shape
    r, elem = vae.spatial_ratio, _elem(vae)
    h, w, t = height // r, width // r, 1 + (frames - 1) // vae.temporal_ratio
    enc = vae.encoder
    down_cached, down_live, _, _ = _profile([enc.conv1, *enc.downsamples], float(r), vae.temporal_ratio)
    mid_cached, mid_live, _, _ = _profile([*enc.middle, enc.head], 1.0, 1)
    th, tw = tile or (h, w)
    tile_px = b * th * tw
    chunk_in = 3 * vae.temporal_ratio * tile_px * r * r * elem  # a chunk's frames cast to the VAE's dtype
    work = (down_cached + LIVE_FACTOR * down_live) * tile_px * elem + chunk_in
    middle = (mid_cached + LIVE_FACTOR * mid_live) * b * h * w * elem
    latents = 2 * 2 * vae.z_dim * t * b * h * w * 4  # mean and log-variance per chunk, then concatenated
    if tile is None:
        return int(FIXED_BYTES + work + middle + latents)
    c = enc.middle[0].residual[2].in_channels
    features = c * t * b * (h * w * (4 + elem) + 2 * th * tw * elem)  # the fp32 sum, its cast, one tile's part
    return int(FIXED_BYTES + work + middle + latents + features)


# ---- choosing tiles -----------------------------------------------------------------------------


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_memory(device: torch.device | str) -> int:
    """Bytes free on `device` now: CUDA free memory plus what PyTorch's allocator holds unused; else available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return _available_ram()


def budget_from_free(free: int, device_type: str) -> int:
    """What a VAE pass may use out of `free` bytes, with a margin for fragmentation and what the estimate
    misses: CUDA less 10% and 512 MiB, otherwise less 20%. (The memory plan, kinema/memory/plan.py,
    applies the same rule to the memory it expects to be free when the VAE runs.)"""
    if device_type == "cuda":
        return max(0, int(free * 0.9) - 512 * 2**20)
    return int(free * 0.8)


def memory_budget(device: torch.device | str) -> int:
    """Bytes a VAE pass may use now on `device` (`budget_from_free` of `free_memory`)."""
    device = torch.device(device)
    return budget_from_free(free_memory(device), device.type)


def _fit(length: int, n: int, overlap: int) -> int:
    """The smallest tile that covers `length` in `n` tiles sharing `overlap`."""
    return length if n == 1 else math.ceil((length + (n - 1) * overlap) / n)


def choose_tile(need, h: int, w: int, budget: int, overlap: int = OVERLAP, warn: bool = True) -> tuple[int, int] | None:
    """None (untiled) if need(None) <= budget, else the (th, tw) latent tile of the fewest tiles with need(tile) <= budget.

    Fewest tiles means least recomputed overlap; among layouts with as many tiles, the squarest wins.
    With no layout fitting, the smallest tiles, and a warning (unless `warn` is False: the memory plan asks
    what would happen, kinema/memory/plan.py, and reports it itself).
    """
    if need(None) <= budget:
        return None
    least = 2 * overlap

    def counts(length: int) -> list[int]:  # tile counts along one axis whose tiles stay >= least (tiles shrink as n grows)
        out = [1]
        for n in range(2, length + 1):
            if _fit(length, n, overlap) < least:
                break
            out.append(n)
        return out

    grids = [
        (ny * nx, abs(_fit(h, ny, overlap) - _fit(w, nx, overlap)), (_fit(h, ny, overlap), _fit(w, nx, overlap)))
        for ny in counts(h)
        for nx in counts(w)
    ]
    grids.sort()
    for _, _, tile in grids:
        if need(tile) <= budget:
            return tile
    tile = min((g[2] for g in grids), key=need)
    if warn:
        log.warning("the VAE may not fit in memory even on %dx%d-latent-pixel tiles: about %.1f GiB needed, %.1f GiB free",
                    tile[1], tile[0], need(tile) / 2**30, budget / 2**30)
    return tile


def parse_vae_tile(value, ratio: int = 8, overlap: int = OVERLAP) -> str | tuple[int, int]:
    """'auto', 'off', or a (width, height) tile in pixels, from 'WxH', 'W*H' or a pair; checked against the VAE's grid."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "off"):
            return text
        m = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", text)
        if m is None:
            raise KinemaError(f"--vae_tile {value!r} is not auto, off or WxH in pixels; use e.g. --vae_tile 512x512.")
        value = (int(m[1]), int(m[2]))
    w, h = value
    least = MIN_TILE * ratio
    if w % ratio or h % ratio:
        raise KinemaError(f"--vae_tile {w}x{h}: width and height must be multiples of {ratio} (pixels per latent pixel); "
                          f"use e.g. {max(least, w // ratio * ratio)}x{max(least, h // ratio * ratio)}.")
    if w < least or h < least:
        raise KinemaError(f"--vae_tile {w}x{h} is too small: tiles need at least {least}x{least} pixels "
                          f"({MIN_TILE} latent pixels); use a larger tile or --vae_tile auto.")
    return w, h


def tile_overlap(tile: tuple[int, int], overlap: int = OVERLAP) -> int:
    """The overlap (latent pixels) for a (height, width) latent tile: `overlap`, or half the tile's shorter side
    when the tile is smaller than twice that (its seams then show more: a warning says so)."""
    fitted = min(overlap, min(tile) // 2)
    if fitted < overlap:
        log.warning("VAE tiles of %dx%d latent pixels are smaller than twice the %d-pixel overlap; overlapping by %d "
                    "latent pixels instead, so seams may show. Use tiles of at least %d latent pixels to avoid it.",
                    tile[1], tile[0], overlap, fitted, 2 * overlap)
    return fitted


class TiledVAE:
    """A WanVAE whose `encode` and `decode` run on tiles when `tile` says so; every other attribute is the VAE's.

    tile: "auto" (tiles only when the estimated peak exceeds `budget` bytes; by default `memory_budget`
    of the VAE's device, read at each call), "off", or (width, height) / "WxH" in output pixels.
    """

    def __init__(self, vae: WanVAE, tile="auto", overlap: int = OVERLAP, budget: int | None = None):
        self.vae, self.overlap, self.budget = vae, overlap, budget
        self.tile = parse_vae_tile(tile, vae.spatial_ratio, overlap)

    def __getattr__(self, name: str):
        if name == "vae":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.vae, name)

    def plan(self, op: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The (height, width) latent tile for `op` ("encode" or "decode") of a tensor of `shape`; None = untiled."""
        r = self.vae.spatial_ratio
        h, w = (shape[-2], shape[-1]) if op == "decode" else (shape[-2] // r, shape[-1] // r)
        if self.tile == "off":
            return None
        if self.tile == "auto":
            estimate = decode_bytes if op == "decode" else encode_bytes
            budget = memory_budget(self.vae.device) if self.budget is None else self.budget
            tile = choose_tile(lambda t: estimate(self.vae, tuple(shape), t), h, w, budget, self.overlap)
            if tile is not None:
                log.info("VAE %s: about %.1f GiB untiled, %.1f GiB free; tiling %dx%d pixels (%.1f GiB)", op,
                         estimate(self.vae, tuple(shape)) / 2**30, budget / 2**30, tile[1] * r, tile[0] * r,
                         estimate(self.vae, tuple(shape), tile) / 2**30)
            return tile
        th, tw = self.tile[1] // r, self.tile[0] // r
        return None if th >= h and tw >= w else (min(th, h), min(tw, w))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        tile = self.plan("decode", z.shape)
        return self.vae.decode(z) if tile is None else tiled_decode(self.vae, z, tile, tile_overlap(tile, self.overlap))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.vae.check_video(video)
        tile = self.plan("encode", video.shape)
        return self.vae.encode(video) if tile is None else tiled_encode(self.vae, video, tile, tile_overlap(tile, self.overlap))
