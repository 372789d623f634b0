"""Block swap: run a DiT whose blocks do not all fit on the GPU, copying some in just before their turn.

`BlockSwap(dit, blocks_to_swap=N, prefetch_blocks=K)` keeps the first N blocks in
(pinned) host memory and everything else on the compute device. The blocks run
in order, so while one block computes, the next swapped ones are already being
copied on a side CUDA stream; an event per copy makes the compute stream wait
for exactly the copy it needs, and a block's device copy is released as soon as
it has run (its memory is reused once the compute stream is past it). The first
N blocks are the swapped ones so that their copies for the next step overlap
the last, resident blocks of this one.

At most K swapped blocks are on the device at once (the window): after a block
runs and is released, the next swapped block in run order (cyclically, into the
next step) is fetched. So at most `num_layers - N + K` blocks are on the device;
with K = 1 each copy overlaps the compute of the block before it (the CPU queues
the copy as soon as that block's kernels are queued). More K helps when a block
computes faster than it copies. The copies are exact, so the output is
bit-identical to the resident model's.

The scheduling (`BlockWindow`) knows nothing about where the weights come from:
`Parked` host copies here, the checkpoint file for streaming
(kinema/memory/streaming.py). It runs as forward hooks on the blocks, so the
model stays a plain module and everything that calls its blocks (`run_blocks`,
step caching's hook) goes through it. With the compute device and the storage
device both "cpu" every move, release and count still happens (no stream, no
pinning), which is how the tests check it without a GPU. Inference only: the
released weights are not there for a backward pass.
"""

from __future__ import annotations

import bisect
import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from kinema.errors import KinemaError
from kinema.memory.offload import Parked, get_slot, set_slot, tensor_slots

log = logging.getLogger("kinema")


def check_block_swap(num_layers: int, blocks_to_swap: int, prefetch_blocks: int | None) -> int:
    """The prefetch count to use (1 by default when swapping); a KinemaError for values that cannot work."""
    if blocks_to_swap < 0 or blocks_to_swap > num_layers:
        raise KinemaError(f"--blocks_to_swap {blocks_to_swap} is out of range: this DiT has {num_layers} blocks, "
                          f"so swap 0 to {num_layers} of them.")
    if blocks_to_swap == 0:
        if prefetch_blocks:
            raise KinemaError(f"--prefetch_blocks {prefetch_blocks} needs --blocks_to_swap N > 0 (the blocks to prefetch).")
        return 0
    k = 1 if prefetch_blocks is None else prefetch_blocks
    if not 1 <= k <= blocks_to_swap:
        raise KinemaError(f"--prefetch_blocks {k} must be between 1 and --blocks_to_swap ({blocks_to_swap}): "
                          "it is how many swapped blocks are copied ahead.")
    return k


@dataclass
class WindowStats:
    fetches: int = 0
    releases: int = 0
    peak_resident: int = 0  # most blocks on the compute device when a block started
    log: list[tuple[str, int]] = field(default_factory=list)  # ("fetch" | "release", block), when `record`


class BlockWindow:
    """Runs `blocks` with the `managed` ones on the compute device only in a window of `prefetch` blocks.

    `homes[i]` puts block i's weights on the device (`send(device, non_blocking)`) and takes them
    away (`drop()`); the other blocks are left alone. Fetches go on a side stream on CUDA.
    """

    def __init__(self, blocks: nn.ModuleList, homes: dict, prefetch: int, device: torch.device | str, record: bool = False):
        self.blocks, self.homes, self.prefetch = blocks, homes, prefetch
        self.managed = sorted(homes)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ready: dict[int, torch.cuda.Event | None] = {}  # managed blocks on the device (or on their way), fetch order
        self.stats = WindowStats()
        self.record = record
        self.handles = []
        for i in self.managed:
            self.handles.append(blocks[i].register_forward_pre_hook(functools.partial(self._before, i)))
            self.handles.append(blocks[i].register_forward_hook(functools.partial(self._after, i)))
        self.fill(after=-1)

    @property
    def resident(self) -> int:
        return len(self.blocks) - len(self.managed) + len(self.ready)

    def _fetch(self, i: int) -> None:
        if self.stream is None:
            self.homes[i].send(self.device)
            self.ready[i] = None
        else:
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.stream):
                copies = self.homes[i].send(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            for t in copies:  # allocated on the side stream, used on the compute stream: not reused before it is done
                t.record_stream(compute)
            self.ready[i] = event
        self.stats.fetches += 1
        if self.record:
            self.stats.log.append(("fetch", i))

    def _release(self, i: int) -> None:
        self.homes[i].drop()
        del self.ready[i]
        self.stats.releases += 1
        if self.record:
            self.stats.log.append(("release", i))

    def fill(self, after: int) -> None:
        """Fetch the managed blocks that run after block `after` (wrapping into the next pass) until the window is full."""
        start = bisect.bisect_right(self.managed, after)
        for k in range(len(self.managed)):
            if len(self.ready) >= self.prefetch:
                break
            j = self.managed[(start + k) % len(self.managed)]
            if j not in self.ready:
                self._fetch(j)

    def _before(self, i: int, module, args) -> None:
        if i not in self.ready:  # blocks run out of order (or after `empty`): make room, fetch now
            for j in [j for j in self.ready if j != i][: max(0, len(self.ready) + 1 - self.prefetch)]:
                self._release(j)
            self._fetch(i)
        event = self.ready[i]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        self.stats.peak_resident = max(self.stats.peak_resident, self.resident)

    def _after(self, i: int, module, args, output) -> None:
        self._release(i)
        self.fill(after=i)

    def empty(self) -> None:
        """Release every managed block now on the device."""
        for j in list(self.ready):
            self._release(j)

    def remove(self, to_device: bool = True) -> None:
        """Take the hooks off. With `to_device` every managed block is then put on the compute device, so the
        model is whole there again (as before the swap); without, they stay in their homes (host memory)."""
        self.empty()
        for h in self.handles:
            h.remove()
        self.handles = []
        if to_device:
            for i in self.managed:
                self.homes[i].send(self.device)


class _Resident:
    """The tensors of a module outside its managed blocks: moved to the device once, parked on request
    (by an Offloader), keeping a host copy from the first park on."""

    def __init__(self, module: nn.Module, managed_slots: set, device: torch.device, storage: torch.device):
        self.slots = [s for s in tensor_slots(module) if (id(s[0]), s[1]) not in managed_slots]
        self.device, self.storage, self.parked = device, storage, None
        for s in self.slots:
            t = get_slot(s)
            if t.device != device:
                set_slot(s, t.detach().to(device))

    def park(self) -> None:
        if self.parked is None:
            self.parked = Parked(self.slots, self.storage)  # copies to the host once; later parks only drop
        else:
            self.parked.drop()

    def unpark(self) -> None:
        if self.parked is not None:
            self.parked.send(self.device)


def _check_unplaced(dit: nn.Module) -> None:
    """Refuse a second placement over blocks a BlockWindow already manages (its hooks are on them)."""
    for block in dit.blocks:
        if any(isinstance(h, functools.partial) and isinstance(getattr(h.func, "__self__", None), BlockWindow)
               for h in block._forward_pre_hooks.values()):
            raise KinemaError("this DiT's blocks are already swapped or streamed; call remove() on that placement first.")


class BlockPlacement:
    """A BlockWindow over some of a DiT's blocks plus its resident rest, as one placement an Offloader can park."""

    def __init__(self, dit: nn.Module, homes: dict, prefetch: int, device, storage, record: bool = False):
        _check_unplaced(dit)
        self.dit = dit
        self.device, self.storage = torch.device(device), torch.device(storage)
        managed = {(id(m), n) for home in homes.values() for m, n in home.slots}
        self.rest = _Resident(dit, managed, self.device, self.storage)
        self.window = BlockWindow(dit.blocks, homes, prefetch, self.device, record)

    @property
    def stats(self) -> WindowStats:
        return self.window.stats

    def park(self) -> None:
        self.window.empty()
        self.rest.park()

    def unpark(self) -> None:
        self.rest.unpark()
        self.window.fill(after=-1)

    def remove(self, to_device: bool = True) -> None:
        """Undo the placement: hooks off, and (`to_device`) every block on the compute device with the rest,
        a plain resident module again; `to_device=False` leaves the managed blocks in host memory."""
        self.window.remove(to_device)


class BlockSwap(BlockPlacement):
    """The first `blocks_to_swap` blocks of `dit` in host memory (pinned when the device is CUDA), the rest
    of the model on `device`; see the module docstring. `record=True` keeps a log of fetches and releases."""

    def __init__(self, dit: nn.Module, blocks_to_swap: int, prefetch_blocks: int | None = None,
                 device: torch.device | str = "cuda", storage: torch.device | str = "cpu", pin: bool | None = None,
                 record: bool = False):
        _check_unplaced(dit)  # before any block moves
        device = torch.device(device)
        self.blocks_to_swap = blocks_to_swap
        self.prefetch_blocks = check_block_swap(len(dit.blocks), blocks_to_swap, prefetch_blocks)
        pin = device.type == "cuda" if pin is None else pin
        homes = {i: Parked(tensor_slots(dit.blocks[i]), storage, pin) for i in range(blocks_to_swap)}
        super().__init__(dit, homes, max(1, self.prefetch_blocks), device, storage, record)
        if blocks_to_swap:
            per_block = homes[0].nbytes
            log.info("Block swap: %d of %d DiT blocks in %s host memory (%.2f GiB), %d copied ahead; "
                     "at most %d blocks (%.2f GiB of blocks) on %s", blocks_to_swap, len(dit.blocks),
                     "pinned" if pin else "pageable", per_block * blocks_to_swap / 2**30, self.prefetch_blocks,
                     len(dit.blocks) - blocks_to_swap + self.prefetch_blocks,
                     per_block * (len(dit.blocks) - blocks_to_swap + self.prefetch_blocks) / 2**30, device)
