"""Model offload: each model visits the compute device only while it runs (the official `offload_model`).

The official Wan2.1 pipelines keep every model in host memory and move each one
to the GPU for its turn: umT5 encodes the prompts and goes back, CLIP encodes
the image and goes back, the VAE encodes the condition, the DiT samples and goes
back *before* the VAE decodes. `Offloader.visit(name)` is that rule as a context
manager; `generate(..., offload=True)` wraps each stage in one, in that order.

A visit copies the model's tensors to the compute device and, on the way back,
points them at the host copies they came from again: the weights do not change
during inference, so nothing is copied back and no host memory is reallocated
per visit (the official `.cpu()` copies the DiT back each time). The host copies
live as long as the Offloader, so host RAM holds every model, as in the official
code; the compute device holds one model at a time.

The same "home on the host" bookkeeping (`Parked`) moves single DiT blocks for
block swap (kinema/memory/block_swap.py). A DiT run by block swap or streaming
already places its own weights; the Offloader asks that placement (the models
record's `placement`) to park and unpark instead of moving the DiT itself.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger("kinema")

Slot = tuple[nn.Module, str]  # (module, name) of one parameter or buffer


# -- tensors with a home on the storage device --------------------------------------------------------
def tensor_slots(module: nn.Module) -> list[Slot]:
    """Every parameter and buffer of `module` and its children, as (owner, name)."""
    slots = []
    for m in module.modules():
        slots += [(m, n) for n, t in m._parameters.items() if t is not None]
        slots += [(m, n) for n, t in m._buffers.items() if t is not None]
    return slots


def get_slot(slot: Slot) -> torch.Tensor:
    m, n = slot
    return m._parameters[n] if n in m._parameters else m._buffers[n]


def set_slot(slot: Slot, tensor: torch.Tensor) -> None:
    """Put `tensor` in the slot. Parameters are replaced, not `.data`-assigned: `.data` cannot cross from meta."""
    m, n = slot
    if n in m._parameters:
        m._parameters[n] = nn.Parameter(tensor, requires_grad=m._parameters[n].requires_grad)
    else:
        m._buffers[n] = tensor


def copy_to(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """A fresh copy on `device`, even when the tensor is already there (so CPU-only runs move for real)."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    return out.copy_(tensor, non_blocking=non_blocking)


class Parked:
    """Tensors whose home is a copy on the storage device (pinned when `pin`); `send` puts copies on a
    compute device in their place, `drop` points them at the home copies again (nothing is copied back)."""

    def __init__(self, slots: list[Slot], storage: torch.device | str = "cpu", pin: bool = False):
        self.slots = slots
        self.storage = torch.device(storage)
        self.home = []
        for slot in slots:
            t = get_slot(slot).detach()
            if t.device != self.storage:
                t = t.to(self.storage)
            if pin and not t.is_pinned():
                t = t.pin_memory()
            self.home.append(t)
            set_slot(slot, t)  # a tensor that was elsewhere is freed there now
        self.sent = False

    def send(self, device: torch.device, non_blocking: bool = False) -> list[torch.Tensor]:
        """Copies on `device` in the slots (on the current CUDA stream); returns them."""
        copies = [copy_to(t, device, non_blocking) for t in self.home]
        for slot, t in zip(self.slots, copies):
            set_slot(slot, t)
        self.sent = True
        return copies

    def drop(self) -> None:
        for slot, t in zip(self.slots, self.home):
            set_slot(slot, t)
        self.sent = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.home)


# -- placements that manage their own module (block swap, streaming) ------------------------------------
# A DiT run by block swap or streaming places its own weights (a BlockPlacement, kinema/memory/block_swap.py):
# the Offloader is given it (`Models.placement`) and asks it to park and unpark instead of moving the DiT.


class _Whole:
    """A plain module as one Parked group: the Offloader's default placement."""

    def __init__(self, module: nn.Module, device: torch.device, storage: torch.device):
        self.parked, self.device = Parked(tensor_slots(module), storage), device

    def unpark(self) -> None:
        self.parked.send(self.device)

    def park(self) -> None:
        self.parked.drop()


# -- the Offloader -------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _module(component) -> nn.Module | None:
    """The nn.Module behind a pipeline component: TextEncoder / ClipVisionEncoder `.model`, TiledVAE `.vae`."""
    for attr in ("model", "vae"):
        inner = getattr(component, attr, None) if not isinstance(component, nn.Module) else None
        if isinstance(inner, nn.Module):
            return inner
    return component if isinstance(component, nn.Module) else None


class Offloader:
    """Moves the models of a `Models` record (kinema.pipeline.models) to `device` one at a time.

    Components: "t5", "clip", "dit", "vae". `t5_cpu` keeps the text encoder where it is (on the CPU:
    the official `--t5_cpu`). A DiT with a block placement (`models.placement`: block swap, streaming)
    is parked and unparked by it. `enabled=False` gives an Offloader that moves nothing and whose
    `device` is the DiT's, so the pipeline has one code path. `moves` records (component, "compute" |
    "storage") for each move, in order.
    """

    def __init__(self, models, device: torch.device | str | None = None, storage: torch.device | str = "cpu",
                 t5_cpu: bool = False, enabled: bool = True):
        self.enabled = enabled
        self.moves: list[tuple[str, str]] = []
        self.placements: dict[str, object] = {}
        if not enabled:
            self.device = next(models.dit.parameters()).device
            return
        self.device = torch.device(device) if device is not None else default_device()
        self.storage = torch.device(storage)
        parts = {"t5": models.text_encoder, "clip": models.clip, "dit": models.dit, "vae": models.vae}
        for name, component in parts.items():
            module = _module(component)
            if module is None or (name == "t5" and t5_cpu):
                continue
            placement = models.placement if name == "dit" else None
            if placement is not None:
                placement.park()  # everything starts on the storage device
            self.placements[name] = placement or _Whole(module, self.device, self.storage)
        log.info("Offloading %s: each visits %s only while it runs", ", ".join(self.placements), self.device)

    @contextlib.contextmanager
    def visit(self, name: str):
        """`name` on the compute device for the `with` body, back on the storage device after."""
        placement = self.placements.get(name)
        if placement is None:
            yield
            return
        placement.unpark()
        self.moves.append((name, "compute"))
        try:
            yield
        finally:
            placement.park()
            self.moves.append((name, "storage"))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the freed blocks back before the next model arrives, as the official code does


