"""Streaming the DiT from disk: run a model larger than memory, one block's weights at a time.

`stream_dit(path, ...)` opens the checkpoint with the DiT loader (same formats, key
maps, shape checks and fp8 handling: `open_dit` / `read_tensor`) and reads
everything except the blocks' Linear weights, which are nearly all of the bytes
(embeddings, head, the blocks' norms, biases and modulation stay resident: a few
percent). Each block's Linear weights are read from the file just before the
block runs (cast to the run dtype, or to fp8 with `quantization`), used, and
freed after it, through the same window as block swap (kinema/memory/block_swap.py):
at most `prefetch_blocks` blocks' weights exist at a time, read ahead in run order.

Safetensors files are read with pread into memory of their own, never as views
of the mapped file, so the pages read are the kernel's page cache, not this
process's: the resident set stays at the resident weights plus the window,
whatever the file's size (tests/test_offload.py measures it). `.pth` / `.bin`
files are mapped by torch.load, so the pages touched count in the resident set
(they are clean and the kernel can drop them, but the numbers look larger).

The cost is reading the whole file once per DiT call (two per step with
guidance): as fast as the page cache when the file fits in RAM, disk speed
when it does not. On CUDA the reads happen on the CPU while the GPU runs the
blocks already queued, and the copies go on a side stream as for block swap.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kinema.errors import KinemaError
from kinema.loading.dit import DiTCheckpoint, LoadedDiT, dtype_policy, open_dit
from kinema.loading.files import SAFETENSORS_SUFFIXES
from kinema.loading.materialize import read_tensor
from kinema.memory.block_swap import BlockPlacement
from kinema.memory.offload import Slot, set_slot
from kinema.models.dit import WanDiT
from kinema.ops.fp8 import MODES, FP8Linear

log = logging.getLogger("kinema")


def streamed_keys(model: WanDiT) -> dict[int, list[str]]:
    """Block index -> the canonical names of its Linear weights (the bytes that are streamed)."""
    return {i: [f"blocks.{i}.{name}.weight" for name, m in block.named_modules() if isinstance(m, nn.Linear)]
            for i, block in enumerate(model.blocks)}


class FileBlock:
    """One block's Linear weights with their home in the checkpoint file: `send` reads them, `drop` frees them."""

    def __init__(self, model: WanDiT, keys: list[str], ckpt, dtype_for):
        self.model, self.keys, self.ckpt, self.dtype_for = model, keys, ckpt, dtype_for
        self.slots: list[Slot] = []
        self.placeholders: dict[str, torch.Tensor] = {}  # name -> meta tensor of the shape and dtype read
        for key in keys:
            owner, _, _ = key.rpartition(".")
            layer = model.get_submodule(owner)
            if isinstance(layer, FP8Linear):
                self._hold(f"{owner}.weight", layer.weight.shape, MODES[layer.mode].dtype)
                self._hold(f"{owner}.scale_weight", (), torch.float32)
            else:
                self._hold(key, layer.weight.shape, dtype_for(key))
        self.drop()

    def _hold(self, name: str, shape, dtype) -> None:
        owner, _, leaf = name.rpartition(".")
        self.slots.append((self.model.get_submodule(owner), leaf))
        self.placeholders[name] = torch.empty(shape, dtype=dtype, device="meta")

    def send(self, device: torch.device, non_blocking: bool = False) -> list[torch.Tensor]:
        copies = []
        for key in self.keys:
            for name, tensor in read_tensor(self.model, key, self.ckpt.plan, self.ckpt.source, self.dtype_for).items():
                if tensor.device != device:
                    tensor = tensor.to(device, non_blocking=non_blocking)
                owner, _, leaf = name.rpartition(".")
                set_slot((self.model.get_submodule(owner), leaf), tensor)
                copies.append(tensor)
        return copies

    def drop(self) -> None:
        for name, meta in self.placeholders.items():
            owner, _, leaf = name.rpartition(".")
            set_slot((self.model.get_submodule(owner), leaf), meta)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.placeholders.values())


def stream_dit(path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", num_heads: int | None = None,
               quantization: str | None = None, fp8_fast: bool = False, prefetch_blocks: int = 1,
               record: bool = False) -> tuple[LoadedDiT, BlockPlacement]:
    """A DiT whose blocks' Linear weights are read from `path` each time they run; the rest as `load_dit`.

    Takes `load_dit`'s arguments (`path` may also be a `DiTCheckpoint` from `open_dit`); `prefetch_blocks`
    blocks are read ahead (at least 1). Returns the loaded record and the placement that reads the blocks:
    `placement.stats` counts the reads (`record=True` logs them), `placement.remove()` ends streaming.
    """
    device = torch.device(device)
    ckpt = path if isinstance(path, DiTCheckpoint) else open_dit(path, num_heads)
    ckpt.source.use_views(False)  # pread copies: the file's pages stay in the page cache, not in this process
    keys = streamed_keys(ckpt.model)
    if not 1 <= prefetch_blocks <= len(keys):
        raise KinemaError(f"--prefetch_blocks {prefetch_blocks} must be between 1 and the DiT's {len(keys)} blocks when streaming.")
    every = {k for ks in keys.values() for k in ks}
    loaded = ckpt.load(dtype, device, quantization, fp8_fast, skip=every.__contains__)
    model, policy = loaded.model, dtype_policy(dtype)
    homes = {i: FileBlock(model, ks, ckpt, policy) for i, ks in keys.items()}
    if any(p.suffix not in SAFETENSORS_SUFFIXES for p in ckpt.source.paths):
        log.warning("Streaming %s: not a safetensors file, so torch.load maps it and the pages read count in this "
                    "process's memory (the kernel can drop them); convert it to .safetensors to stream it lean.", ckpt.source.name)
    placement = BlockPlacement(model, homes, prefetch_blocks, device, "cpu", record)
    per_block = homes[0].nbytes if homes else 0
    log.info("Streaming the DiT's block weights from %s: %.2f GiB per block read each time it runs, %d read ahead; "
             "%.2f GiB resident", ckpt.source.name, per_block / 2**30, prefetch_blocks,
             sum(t.numel() * t.element_size() for t in model.state_dict().values() if not t.is_meta) / 2**30)
    return loaded, placement
