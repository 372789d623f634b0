"""What a node sees when it runs: the model folders, the output / input folders, the loaded-model cache,
and the hooks that report progress and stop a run.

`ModelCache` turns recipes (kinema.workflow.values) into loaded models, once, and keeps them between
prompts while they fit a memory budget (least recently used dropped first); `free()` drops them all.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kinema.workflow.values import ClipVisionRecipe, DiTRecipe, TextEncoderRecipe, VAERecipe

log = logging.getLogger("kinema")


@dataclass
class LoadedDiTPart:
    """A DiT the cache holds: the module, what its checkpoint says, and how it is placed."""

    model: torch.nn.Module
    info: object  # kinema.loading.dit.ModelInfo
    runtime: object  # kinema.pipeline.models.Runtime
    placement: object | None = None
    fp16_guard: object | None = None
    compiled: str | None = None
    quantization: str | None = None
    lora_hooks: tuple = ()  # unmerged LoRAs: block hooks every sampling pass must run with


def _bytes_of(obj) -> int:
    mods = [obj.model] if isinstance(obj, LoadedDiTPart) else [getattr(obj, "model", obj)]
    if hasattr(obj, "models") and hasattr(obj, "runtime"):  # a whole kinema.Pipeline (Kinema's own nodes)
        mods = [getattr(getattr(obj.models, k, None), "model", getattr(obj.models, k, None))
                for k in ("dit", "text_encoder", "vae", "clip")]
    total = 0
    for m in mods:
        if isinstance(m, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values() if t.device.type != "meta")
    return total


class ModelCache:
    """Loaded models by recipe, kept between prompts within `budget` bytes (None: keep everything). `parallel`:
    Pipeline.load's parallel options (ulysses_size ...) for whole pipelines, on a multi-rank Ray worker
    (kinema/server/cluster.py)."""

    def __init__(self, budget: int | None = None, parallel: dict | None = None):
        self.budget = budget
        self.parallel = dict(parallel or {})
        self._items: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self._lock = threading.RLock()

    def _get(self, key: tuple, load: Callable[[], object]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            value = load()
            size = _bytes_of(value)
            self._items[key] = (value, size)
            self._trim(keep=key)
            return value

    def _trim(self, keep: tuple) -> None:
        if self.budget is None:
            return
        while sum(s for _, s in self._items.values()) > self.budget and len(self._items) > 1:
            key = next(k for k in self._items if k != keep)
            log.info("model cache: unloading %s (over the %d MiB budget)", key[1], self.budget >> 20)
            del self._items[key]

    def free(self) -> int:
        """Unload every model; returns how many were dropped."""
        with self._lock:
            n = len(self._items)
            self._items.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return n

    def __len__(self) -> int:
        return len(self._items)

    # -- the loaders -------------------------------------------------------------------------------
    def dit(self, r: DiTRecipe) -> LoadedDiTPart:
        return self._get(("dit", *r.load_key()), lambda: _load_dit(r))

    def text_encoder(self, r: TextEncoderRecipe):
        import kinema

        def load():
            device, dtype = _device_dtype(r.device, r.dtype, encoder=True)
            return kinema.load_text_encoder(r.path, tokenizer=r.tokenizer, device=device, dtype=dtype,
                                            quantization=r.quantization)

        return self._get(("t5", r.path, r.tokenizer, r.dtype, r.quantization, r.device), load)

    def vae(self, r: VAERecipe):
        import kinema

        def load():  # the VAE computes in fp32 or bf16: bf16 (and fp16, asked for) only on CUDA, fp32 on the CPU
            device, _ = _device_dtype(r.device, None)
            dtype = torch.bfloat16 if device.type == "cuda" and r.dtype in ("bf16", "fp16") else torch.float32
            return kinema.load_vae(r.path, dtype=dtype, device=device)

        return self._get(("vae", r.path, r.dtype, r.device), load)

    def clip_vision(self, r: ClipVisionRecipe):
        import kinema

        def load():
            device, dtype = _device_dtype(r.device, r.dtype, encoder=True)
            return kinema.load_clip_vision(r.path, dtype=dtype, device=device)

        return self._get(("clip", r.path, r.dtype, r.device), load)

    def pipeline(self, r):
        """A whole kinema.Pipeline for a frozen recipe with `load()` (kinema_nodes.PipelineRecipe)."""
        return self._get(("pipeline", r), lambda: r.load(**self.parallel))


def _device_dtype(device, dtype, encoder: bool = False):
    from kinema.pipeline.load import LoadOptions

    _, rt = LoadOptions(device=device, dtype=dtype).check(complete=False)
    return rt.device, (rt.encoder_dtype if encoder and dtype is None else rt.dtype)


def _load_dit(r: DiTRecipe) -> LoadedDiTPart:
    from kinema.loading.dit import open_dit
    from kinema.memory.block_swap import check_block_swap
    from kinema.pipeline.load import LoadOptions, load_dit_part

    fp8_fast = r.fp8_fast and r.quantization not in (None, "auto")
    if fp8_fast:
        from kinema.ops.fp8 import fp8_fast_unavailable

        reason = fp8_fast_unavailable(_device_dtype(r.device, r.dtype)[0])
        if reason:  # ComfyUI's `_fast` modes fall back the same way where fp8 matmuls are missing
            log.warning("fp8 fast matmuls are not available (%s): the fp8 weights are upcast per layer instead", reason)
            fp8_fast = False
    opts, runtime = LoadOptions(dit=r.path, loras=r.loras, dtype=r.dtype, device=r.device, quantization=r.quantization,
                                blocks_to_swap=r.blocks_to_swap, prefetch_blocks=r.prefetch_blocks,
                                attention=r.attention, compile=r.compile or False,
                                fp8_fast=fp8_fast).check(complete=False)
    ckpt = open_dit(r.path)
    prefetch = check_block_swap(ckpt.model.config.num_layers, r.blocks_to_swap, r.prefetch_blocks) if r.blocks_to_swap else 0
    loaded, placement, compiled, lora_hooks = load_dit_part(opts, runtime, ckpt, prefetch)
    return LoadedDiTPart(loaded.model, loaded.info, runtime, placement, loaded.fp16_guard, compiled, loaded.quantization,
                         lora_hooks)


@dataclass
class Progress:
    """How a running node reports: progress(value, max, preview=None) -> the executor's listeners."""

    report: Callable[[str, int, int, object], None] = lambda node, value, total, preview: None
    node: str = ""

    def __call__(self, value: int, total: int, preview=None) -> None:
        self.report(self.node, value, total, preview)


@dataclass
class ExecutionContext:
    """Given to every node function as its first argument."""

    folders: object  # kinema.workflow.folders.ModelFolders
    output_dir: Path
    input_dir: Path
    temp_dir: Path
    models: ModelCache = field(default_factory=ModelCache)
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Progress = field(default_factory=Progress)
    prompt_id: str = ""
    node_id: str = ""
    prompt: dict = field(default_factory=dict)  # the whole API-format prompt (saved into outputs' metadata)
    extra_pnginfo: dict | None = None  # the UI workflow, when the client sent one
    preview: bool = True  # step previews wanted (the server's websocket)
