"""The VAE decode split by spatial tiles over the ranks (`--vae_parallel`), instead of one rank decoding alone.

The tiled decode (kinema/memory/vae_tiling.py) runs the latent-resolution middle on whole frames,
then the upsampling stages tile by tile, and blends the tiles by weights normalised by their sum.
Here every rank runs the middle (small), then the upsampling of every n-th tile, and one all-reduce
adds up the blended pixels and the weights: the same sums as one process decoding every tile, so
the frames equal a single process's decode with the same tiles (up to the order of the float
additions). The tiles are the run's own (`--vae_tile WxH`, or auto's choice); when the video would
decode untiled, it is cut into about one tile per rank along its longer side.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from kinema.memory.vae_tiling import OVERLAP, TiledVAE, decode_middle, decode_tiles, tile_count, tile_overlap
from kinema.parallel.mesh import Mesh


def split_tile(h: int, w: int, n: int, overlap: int = OVERLAP) -> tuple[int, int]:
    """A (height, width) latent tile cutting the longer side of an h x w latent into about n overlapping tiles."""
    if w >= h:
        return h, min(w, math.ceil((w + (n - 1) * overlap) / n))
    return min(h, math.ceil((h + (n - 1) * overlap) / n)), w


class ParallelVAE:
    """A TiledVAE whose `decode` is shared out by tiles over `mesh`'s ranks; everything else is the VAE's."""

    def __init__(self, vae: TiledVAE, mesh: Mesh):
        self.tiled, self.mesh = vae, mesh

    def __getattr__(self, name: str):
        if name in ("tiled", "mesh"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tiled, name)

    def tile_for(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The (height, width) latent tile of a decode of latents `shape`."""
        h, w = shape[-2], shape[-1]
        return self.tiled.plan("decode", shape) or split_tile(h, w, self.mesh.world_size, self.tiled.overlap)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        world = self.mesh.world
        vae, tile = self.tiled.vae, self.tile_for(tuple(z.shape))
        overlap = tile_overlap(tile, self.tiled.overlap)
        total = tile_count(z.shape[-2], z.shape[-1], tile, overlap)
        mine = set(range(world.index, total, world.size))
        out, norm = decode_tiles(vae, decode_middle(vae, z), tile, overlap, mine)
        if world.size > 1:
            dist.all_reduce(out, group=world.handle)
            dist.all_reduce(norm, group=world.handle)
        return out.div_(norm).clamp_(-1.0, 1.0)
