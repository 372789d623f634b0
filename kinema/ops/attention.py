"""The one attention entry point every Kinema model calls, and the choice of kernel behind it.

Tensors are batch-first and head-split: q [B, Lq, H, D], k and v [B, Lk, H, D].
`mask` is an optional boolean [B, Lk] (True = attend) or an additive float bias
broadcastable to [B, H, Lq, Lk]. `scale=None` means 1/sqrt(D); T5 passes 1.0.

Backends (`kinema generate --attention`, `Pipeline.load(attention=...)`): `sdpa` (PyTorch's
scaled_dot_product_attention, the default), `flash_attn` (FlashAttention-2's `flash_attn_func`)
and `sageattn` (SageAttention's INT8-QK `sageattn`: faster, approximate), plus `auto`, the best
one installed (`resolve_backend`). The backend is an argument of the call, not a process
global: the DiT takes it in its forward (`attention=`) and hands it to its blocks, so two
pipelines with different backends run side by side, and torch.compile guards on it like any
other constant. A sequence-parallel run passes a backend object instead of a name
(kinema/parallel/sequence.py), which the DiT's self-attention calls through `sequence_attention`;
every other call runs on the object's `local` name. Only the DiT's attention takes a backend; umT5, CLIP and the VAE use sdpa, as
the kernels could not run most of their calls anyway.
The kernels take Kinema's layout as it is ([B, L, H, D]), so no transpose is made.
A call a kernel cannot take runs on sdpa instead, silently: a mask (umT5), float32
(the VAE, float32 models), tensors off CUDA, a head_dim beyond the kernel's
(flash_attn 256, sageattn 128), or, for sageattn, which has no backward, inputs
that need gradients. On the CPU, bf16 / fp16 inputs run either in their own precision or in
float32 (cast back), whichever this machine runs faster for the shape (kinema/ops/cpu_half.py).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch

from kinema.errors import KinemaError
from kinema.ops.cpu_half import cpu_half_attention, sdpa

log = logging.getLogger("kinema")

BACKENDS = ("sdpa", "flash_attn", "sageattn")
CHOICES = (*BACKENDS, "auto")
# backend -> (module, function, how to install it)
KERNELS = {
    "flash_attn": ("flash_attn", "flash_attn_func", "pip install flash-attn --no-build-isolation"),
    "sageattn": ("sageattention", "sageattn", "pip install sageattention"),
}
MAX_HEAD_DIM = {"flash_attn": 256, "sageattn": 128}
AUTO_ORDER = ("sageattn", "flash_attn")  # fastest first
KERNEL_DEVICES = ("cuda",)  # device types the kernels run on

_LOADED: dict[str, Callable] = {}  # the kernels imported so far, by backend (an import cache; resolve_backend fills it)


def _import_kernel(name: str) -> Callable | str:
    """The backend's function, or why it cannot be imported (a message naming the package to install)."""
    module, func, install = KERNELS[name]
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError, OSError) as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == module
        why = "which is not installed" if missing else f"which failed to import ({' '.join(str(exc).split())})"
        return f"attention backend {name!r} needs the {module} package, {why}: {install}, or use sdpa (or auto)."


def available_backends() -> list[str]:
    """The backends this Python can run (sdpa always)."""
    return ["sdpa", *(name for name in KERNELS if callable(_import_kernel(name)))]


def resolve_backend(name: str, announce: bool = False) -> str:
    """A backend name ('auto' becomes the best one installed), its kernel imported; a KinemaError for an unknown
    or missing one. `announce` logs the choice (and that the kernels need CUDA, when there is none)."""
    if name not in CHOICES:
        raise KinemaError(f"attention backend {name!r} is unknown; use one of {', '.join(CHOICES)}.")
    if name == "auto":
        chosen = "sdpa" if not torch.cuda.is_available() else next(
            (n for n in AUTO_ORDER if callable(_import_kernel(n))), "sdpa")  # the kernels are CUDA-only
    else:
        chosen = name
    if chosen in KERNELS and chosen not in _LOADED:
        kernel = _import_kernel(chosen)
        if not callable(kernel):
            raise KinemaError(kernel)
        _LOADED[chosen] = kernel
    if announce:
        log.info("Attention backend: %s%s", chosen, " (auto)" if name == "auto" else "")
        if chosen in KERNELS and not torch.cuda.is_available():
            log.warning("%s runs on CUDA only: without a GPU every attention call uses sdpa", chosen)
    return chosen


def kernel_may_run(backend: str, device: torch.device) -> bool:
    """Whether a kernel backend (not sdpa) may take calls on `device`: the DiT then leaves its text context
    unfolded, as the kernels take no attention bias (kinema/models/text_padding.py)."""
    return backend != "sdpa" and torch.device(device).type in KERNEL_DEVICES


def _kernel_takes(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    if mask is not None or q.device.type not in KERNEL_DEVICES:
        return False
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    if q.shape[-1] > MAX_HEAD_DIM[backend]:
        return False
    if backend == "sageattn" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return True


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Softmax attention; returns [B, Lq, H, D] in the dtype of v. `backend`: a name `resolve_backend` gave, or a
    split-sequence backend (see `sequence_attention`), whose own calls here run on its `local` one."""
    if not isinstance(backend, str):
        backend = backend.local
    if backend != "sdpa" and _kernel_takes(backend, q, k, v, mask):
        kernel = _LOADED.get(backend) or _LOADED.setdefault(backend, _import_kernel(backend))
        if backend == "flash_attn":
            return kernel(q, k, v, softmax_scale=scale)  # [B, Lq, H, D]
        return kernel(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)  # [B, Lq, H, D]
    if mask is not None and mask.dtype == torch.bool and mask.dim() == 2:
        mask = mask[:, None, None, :]  # [B, 1, 1, Lk]
    if q.device.type == "cpu" and v.dtype in (torch.bfloat16, torch.float16):
        return cpu_half_attention(q, k, v, mask, scale)
    return sdpa(q, k, v, mask, scale)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend="sdpa") -> torch.Tensor:
    """Self-attention over a model's token sequence ([B, L, H, D], no mask, 1/sqrt(D)). `backend` is a name, as for
    `attention`, or a callable backend for a sequence split across processes (kinema/parallel/sequence.py:
    each rank holds a chunk of the tokens, and the backend exchanges what attention needs)."""
    if isinstance(backend, str):
        return attention(q, k, v, backend=backend)
    return backend(q, k, v)
