"""Assembling a model set: the loading options checked up front, the checkpoints found and opened, the models loaded.

The one place models are put together, in the order that keeps memory lowest: umT5, the DiT
(loaded, or streamed from disk), its LoRAs, block swap, compile, the VAE, CLIP. Every
option is checked before any file is read (`LoadOptions.check`); the DiT's header is opened
once (`open_checkpoints`) and serves the memory plan, the block-swap depth check and the load.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kinema.errors import CheckpointError, KinemaError
from kinema.loading.dit import DiTCheckpoint, open_dit
from kinema.parallel.mesh import ParallelOptions
from kinema.pipeline.models import Models, Runtime

log = logging.getLogger("kinema")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LoadOptions:
    """`Pipeline.load`'s arguments (see there)."""

    ckpt: str | os.PathLike | None = None
    dit: str | os.PathLike | None = None
    vae: str | os.PathLike | None = None
    t5: str | os.PathLike | None = None
    tokenizer: object = None
    clip: str | os.PathLike | None = None
    loras: tuple = ()
    dtype: object = None
    device: object = None
    quantization: str | None = None
    t5_quantization: str | None = None
    offload: bool | None = None
    t5_cpu: bool = False
    blocks_to_swap: int = 0
    prefetch_blocks: int | None = None
    stream_dit: bool = False
    attention: str = "auto"
    compile: object = False
    fp8_fast: bool = False
    lora_ignore_unmatched: bool = False  # LoRA keys that match no layer: left out with a warning, not an error
    lora_runtime: bool = False  # every LoRA unmerged (kinema/lora/runtime.py); per-step strengths always are
    parallel: ParallelOptions = ParallelOptions()  # sequence / CFG parallel, FSDP, parallel VAE (kinema/parallel)
    names: dict = field(default_factory=dict, compare=False, repr=False)  # how messages name options (CLI: flags)

    def name(self, key: str) -> str:
        return self.names.get(key, key)

    def check(self, complete: bool = True) -> tuple[LoadOptions, Runtime]:
        """The options with defaults filled in and checked, and the runtime they give; a KinemaError naming the
        option for anything that cannot work. Reads no weights (LoRA files are found, not read).
        complete=False: the options of single parts (a workflow's loader nodes), not of a whole model set."""
        device = _device(self.device, self.name("device"))
        dtype = _dtype(self.dtype, device, self.name("dtype"))
        split = self.parallel.check(self.names).active
        opts = replace(self, quantization=_fp8_mode(self.quantization, self.name("quantization")),
                       t5_quantization=_fp8_mode(self.t5_quantization, self.name("t5_quantization")),
                       loras=_loras(self.loras, self.name("loras")),
                       offload=device.type == "cuda" and not split if self.offload is None else bool(self.offload),
                       compile=self._compile_mode(device))
        opts._check_memory_flags()
        opts._check_parallel(dtype)
        opts._check_fp8_fast(device)
        opts._check_paths(complete)
        from kinema.ops.attention import resolve_backend
        from kinema.memory.plan import encoder_dtype
        from kinema.parallel.mesh import start

        backend = resolve_backend(self.attention, announce=True)  # unknown or not installed: the error names the package
        mesh, device = start(opts.parallel, device, self.names)  # joins torchrun's process group: the last check
        return opts, Runtime(device, dtype, encoder_dtype(device.type), backend, opts.offload, bool(self.t5_cpu), mesh)

    def _compile_mode(self, device: torch.device) -> str | None:
        if self.compile in (None, False, "", "off"):
            return None
        from kinema.memory.compile import check_compile

        return check_compile("default" if self.compile is True else self.compile, device)  # mode and compiler

    def _check_memory_flags(self) -> None:
        """block swap / prefetch / streaming values that cannot work (the depth is checked once the DiT is open)."""
        n, k, swap, pre, stream = (self.blocks_to_swap, self.prefetch_blocks, self.name("blocks_to_swap"),
                                   self.name("prefetch_blocks"), self.name("stream_dit"))
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise KinemaError(f"{swap} {n!r} must be a whole number >= 0: the DiT blocks kept on the CPU (0 swaps none).")
        if k is not None and not (n or self.stream_dit):
            raise KinemaError(f"{pre} {k} needs {swap} N (or {stream}): it says how many swapped blocks are copied ahead.")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise KinemaError(f"{pre} {k!r} must be a whole number of at least 1.")
        if self.stream_dit and n:
            raise KinemaError(f"{stream} and {swap} both place the DiT's blocks; use one ({stream} reads them from "
                              f"disk, {swap} keeps them in CPU memory).")
        if self.stream_dit and any(not unmerged(s, self.lora_runtime) for _, s in self.loras):
            raise KinemaError(f"{self.name('loras')} cannot be merged into a streamed DiT (its block weights are re-read "
                              f"from the file on every call); run it unmerged (lora_runtime, --lora_runtime), merge it into "
                              f"a checkpoint first, or leave out {stream}.")

    def _check_parallel(self, dtype: torch.dtype) -> None:
        """Memory options that cannot work with the parallel ones (README, "Many GPUs")."""
        par, n = self.parallel, self.name
        fsdp = [n(k) for k in ("dit_fsdp", "t5_fsdp") if getattr(par, k)]
        if par.dit_fsdp and (self.blocks_to_swap or self.stream_dit):
            place = n("blocks_to_swap") if self.blocks_to_swap else n("stream_dit")
            raise KinemaError(f"{n('dit_fsdp')} and {place} both place the DiT's block weights; use one ({n('dit_fsdp')} "
                              f"keeps 1/N of them on each of N GPUs).")
        if fsdp and self.offload:
            raise KinemaError(f"{n('offload')} moves whole models between the CPU and the GPU, but with "
                              f"{' and '.join(fsdp)} each GPU holds only shards; leave out {n('offload')} (it is off by "
                              "default in parallel runs).")
        if par.t5_fsdp and self.t5_cpu:
            raise KinemaError(f"{n('t5_fsdp')} shards umT5 over the GPUs and {n('t5_cpu')} keeps it on the CPU; use one.")
        if par.dit_fsdp and dtype == torch.float16:
            raise KinemaError(f"{n('dit_fsdp')} with {n('dtype')} fp16: the fp16 overflow guard does not run on sharded "
                              f"blocks; use {n('dtype')} bf16.")
        if self.compile not in (None, False, "", "off") and (par.sequence_size > 1 or par.dit_fsdp):
            raise KinemaError(f"{n('compile')} with {n('ulysses_size')} / {n('ring_size')} / {n('dit_fsdp')}: compiled "
                              f"blocks are not tested across processes yet; leave out {n('compile')}.")

    def _check_fp8_fast(self, device: torch.device) -> None:
        if not self.fp8_fast:
            return
        from kinema.ops.fp8 import fp8_fast_unavailable

        fast = self.name("fp8_fast")
        if self.quantization is None and self.t5_quantization is None:
            raise KinemaError(f"{fast} runs fp8 layers' matmuls in fp8; add {self.name('quantization')} and/or "
                              f"{self.name('t5_quantization')}.")
        reason = fp8_fast_unavailable(device)
        if reason:
            raise KinemaError(f"{fast}: {reason}. Leave it out: the fp8 weights are then upcast per layer.")

    def _check_paths(self, complete: bool = True) -> None:
        parts = [self.name(k) for k in ("dit", "vae", "t5")]
        given = [self.dit, self.vae, self.t5]
        if complete and self.ckpt is None and any(given) and not all(given):
            raise KinemaError(f"incomplete checkpoint: pass {self.name('ckpt')}, or all of {', '.join(parts)} "
                              "(or none of them to use the built-in model).")
        if self.ckpt is not None and not Path(self.ckpt).expanduser().is_dir():
            raise KinemaError(f"{self.name('ckpt')} {self.ckpt} is not a folder; pass a checkpoint folder, or the "
                              f"parts as {', '.join(parts)}.")
        for key in ("dit", "vae", "t5", "clip", "tokenizer"):
            value = getattr(self, key)
            if isinstance(value, (str, os.PathLike)) and not Path(value).expanduser().exists():
                raise KinemaError(f"{self.name(key)} {value} does not exist; check the path.")


def _device(value, name: str) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise KinemaError(f"{name} {value!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KinemaError(f"{name} {value!r}: this PyTorch cannot use CUDA here; use 'cpu' (or None for the best).")
    if device.type not in ("cpu", "cuda"):
        raise KinemaError(f"{name} {value!r}: Kinema runs on 'cpu' or 'cuda'.")
    return device


def _dtype(value, device: torch.device, name: str) -> torch.dtype:
    if value is None or value == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if value in DTYPES:
        return DTYPES[value]
    raise KinemaError(f"{name} {value!r} is not one of auto, fp32, bf16, fp16 (or torch.float32 / bfloat16 / float16).")


def _fp8_mode(value, name: str) -> str | None:
    if value in (None, "none"):
        return None
    from kinema.ops.fp8 import check_mode

    return check_mode(value, True, name)


def _loras(specs, name: str) -> tuple[tuple[str, float], ...]:
    """[(path, strength)] or ["FILE[:STRENGTH]"] -> ((path, strength), ...), every file found."""
    from kinema.lora import parse_lora_spec

    if isinstance(specs, (str, os.PathLike)) or (isinstance(specs, tuple) and len(specs) == 2 and
                                                  isinstance(specs[0], (str, os.PathLike)) and
                                                  isinstance(specs[1], (int, float, tuple, list))):
        specs = [specs]
    out = []
    for spec in specs or ():
        if isinstance(spec, (str, os.PathLike)):
            out.append(parse_lora_spec(str(spec)))
            continue
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
            raise KinemaError(f"{name}: {spec!r} is not (path, strength) or 'FILE[:STRENGTH]'.")
        path, strength = spec
        values = tuple(strength) if isinstance(strength, (tuple, list)) else (strength,)
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                             for v in values):
            raise KinemaError(f"{name}: strength {strength!r} of {path} must be a finite number, e.g. 0.8 (or a list "
                              "of them, one per step).")
        if not Path(path).expanduser().is_file():
            raise KinemaError(f"{name}: LoRA file {path} not found. Check the path.")
        out.append((str(path), float(values[0]) if len(values) == 1 and not isinstance(strength, (tuple, list))
                    else tuple(float(v) for v in values)))
    return tuple(out)


def unmerged(strength, runtime: bool) -> bool:
    """Whether a LoRA runs unmerged: per-step strengths, or every LoRA when `runtime` (lora_runtime)."""
    return runtime or isinstance(strength, tuple)


@dataclass
class Checkpoints:
    """Where each part is, with the DiT opened (headers only, its model on the meta device)."""

    dit: str
    vae: str
    t5: str
    clip: str | None  # None: no CLIP (a t2v DiT, or none found beside an i2v one)
    dit_checkpoint: DiTCheckpoint
    builtin: bool = False

    @property
    def source(self) -> str:
        """The checkpoint the outputs name as their model."""
        return str(Path(self.dit).expanduser().resolve())


def open_checkpoints(opts: LoadOptions) -> Checkpoints:
    """Find every part (the built-in model when nothing is given) and open the DiT's header."""
    builtin = opts.ckpt is None and opts.dit is None
    if builtin:
        from kinema.builtin import builtin_path

        root = str(builtin_path())
        log.info("No checkpoint given: using the built-in model (%s)", root)
    else:
        root = opts.ckpt
    dit_path = str(opts.dit or root)
    ckpt = open_dit(dit_path)
    made_for = lora_sampling(opts.loras)  # a distillation LoRA's sampling becomes the model's default
    if made_for:
        ckpt.folder_config = {**ckpt.folder_config, "sample_defaults": {**ckpt.info.sample_defaults, **made_for}}
    clip = opts.clip or (root if ckpt.model.config.model_type != "t2v" and root is not None and _has_clip(root) else None)
    return Checkpoints(dit_path, str(opts.vae or root), str(opts.t5 or root), clip and str(clip), ckpt, builtin)


def lora_sampling(loras) -> dict:
    """The sampling settings the LoRAs in use are made for (a `sampling` entry in a LoRA file's metadata, which
    `kinema train distill` writes: solver, steps, shift, guide_scale), later ones winning; {} when none says."""
    import json

    from kinema.lora import lora_metadata

    out = {}
    for path, strength in loras:
        entry = lora_metadata(path).get("sampling") if strength else None
        if entry:
            try:
                made = {k: v for k, v in json.loads(entry).items() if k in ("solver", "steps", "shift", "guide_scale")}
            except (json.JSONDecodeError, AttributeError):
                continue
            log.info("LoRA %s is made for %s; these are the defaults now (flags still win)", Path(path).name,
                     ", ".join(f"{k} {v}" for k, v in made.items()))
            out.update(made)
    return out


def _has_clip(folder) -> bool:
    """Whether a checkpoint folder holds a CLIP vision encoder (found as the loader would find it)."""
    from kinema.loading.clip import CANDIDATES, COMPONENT
    from kinema.loading.files import checkpoint_files

    try:
        checkpoint_files(folder, COMPONENT, CANDIDATES, subfolder="image_encoder", kind="clip")
        return True
    except CheckpointError:
        return False


def swap_prefetch(opts: LoadOptions, ckpts: Checkpoints) -> int:
    """The blocks block swap copies ahead (0: no block swap), checked against the DiT's depth."""
    if not opts.blocks_to_swap:
        return 0
    from kinema.memory.block_swap import check_block_swap

    layers = ckpts.dit_checkpoint.model.config.num_layers
    return check_block_swap(layers, opts.blocks_to_swap, opts.prefetch_blocks)


def load_models(opts: LoadOptions, runtime: Runtime, ckpts: Checkpoints) -> Models:
    """Load every part onto the devices `runtime` says, in the order that keeps the peak lowest."""
    import kinema
    from kinema.lora import read_loras

    t0 = time.perf_counter()
    prefetch = swap_prefetch(opts, ckpts)
    mesh = runtime.parallel
    if mesh is not None:
        from kinema.parallel.ulysses import check_heads

        cfg = ckpts.dit_checkpoint.model.config
        check_heads(cfg.num_heads, mesh.options.ulysses_size, mesh.options.ring_size, opts.name("ulysses_size"))
    loras = read_loras(list(opts.loras), ckpts.dit_checkpoint.model, opts.lora_ignore_unmatched)  # checked on the meta DiT: before any weight is read
    home = runtime.home  # where each model is loaded; an offloaded one visits `runtime.device` to run
    log.info("Loading models from %s", "the built-in model" if ckpts.builtin else opts.ckpt or "the given files")
    if mesh is not None and mesh.options.t5_fsdp:
        from kinema.loading.t5 import open_text_encoder
        from kinema.parallel.fsdp import shard_text_encoder

        te = shard_text_encoder(open_text_encoder(ckpts.t5, opts.tokenizer, runtime.encoder_dtype, opts.t5_quantization),
                                mesh.world, home, opts.fp8_fast)
    else:
        te = kinema.load_text_encoder(ckpts.t5, tokenizer=opts.tokenizer, device="cpu" if runtime.t5_cpu else home,
                                      dtype=runtime.encoder_dtype, quantization=opts.t5_quantization,
                                      fp8_fast=opts.fp8_fast)
    loaded, placement, compiled, lora_hooks = load_dit_part(opts, runtime, ckpts.dit_checkpoint, prefetch, loras)
    dit = loaded.model
    vae = kinema.load_vae(ckpts.vae, device=home)
    clip = kinema.load_clip_vision(ckpts.clip, dtype=runtime.encoder_dtype, device=home) if ckpts.clip else None
    log.info("Models loaded in %.1fs: %s DiT, %d layers, width %d", time.perf_counter() - t0, dit.config.model_type,
             dit.config.num_layers, dit.config.dim)
    return Models(dit, vae, te, clip, loaded.info, placement, loaded.fp16_guard, compiled, loaded.quantization,
                  opts.t5_quantization, tuple((str(Path(p).resolve()), s) for p, s in opts.loras), ckpts.source,
                  lora_hooks)


def load_dit_part(opts: LoadOptions, runtime: Runtime, checkpoint: DiTCheckpoint, prefetch: int, loras=None):
    """The DiT of checked options: loaded (or streamed from disk), its LoRAs merged (`loras`: read_loras' result
    for the merged ones) or hooked on unmerged (per-step strengths, or lora_runtime), block swap set up
    (`prefetch` > 0), its blocks compiled. Returns (LoadedDiT, placement or None, compile mode or None, the
    unmerged LoRAs' block hooks)."""
    placement = None
    mesh = runtime.parallel
    if opts.loras and loras is None:
        from kinema.lora import read_loras

        loras = read_loras(list(opts.loras), checkpoint.model, opts.lora_ignore_unmatched)  # shapes only: meta is enough
    loras = loras or []
    merged = [entry for entry in loras if not unmerged(entry[1], opts.lora_runtime)]
    if mesh is not None and mesh.options.dit_fsdp and mesh.shard_group.size > 1:
        from kinema.parallel.fsdp import shard_dit

        loaded = shard_dit(checkpoint, mesh.shard_group, runtime.dtype, runtime.home, opts.quantization, opts.fp8_fast,
                           merged)  # merged into each unit before it is sharded
        return loaded, None, None, _hook_unmerged(loaded.model, loras, opts)
    if opts.stream_dit:
        from kinema.memory.streaming import stream_dit

        loaded, placement = stream_dit(checkpoint, dtype=runtime.dtype, device=runtime.device,
                                       quantization=opts.quantization, fp8_fast=opts.fp8_fast,
                                       prefetch_blocks=opts.prefetch_blocks or 1)
    else:
        loaded = checkpoint.load(runtime.dtype, "cpu" if prefetch else runtime.home, opts.quantization, opts.fp8_fast)
    if merged:
        from kinema.lora import apply_loras

        apply_loras(loaded.model, [(p, s) for p, s, _ in merged], merged)
    lora_hooks = _hook_unmerged(loaded.model, loras, opts)
    if prefetch:
        from kinema.memory.block_swap import BlockSwap

        placement = BlockSwap(loaded.model, opts.blocks_to_swap, prefetch, device=runtime.device)
    compiled = None
    if opts.compile:
        from kinema.memory.compile import compile_blocks

        compiled = compile_blocks(loaded.model, opts.compile, device=runtime.device)  # where it runs, not where offload keeps it
    return loaded, placement, compiled, lora_hooks


def _hook_unmerged(model, loras, opts: LoadOptions) -> tuple:
    """Forward hooks for the LoRAs that run unmerged (per-step strengths, or lora_runtime); their block hooks."""
    from kinema.lora.runtime import LoRASchedule, attach_lora

    hooks = []
    for path, strength, weights in loras:
        if unmerged(strength, opts.lora_runtime):
            schedule = LoRASchedule(strength if isinstance(strength, tuple) else (strength,))
            hooks.append(attach_lora(model, weights, schedule, path.name))
            log.info("LoRA %s unmerged, strength per step %s", path.name, schedule.describe())
    return tuple(hooks)
