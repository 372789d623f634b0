"""How much memory a run will need, per device and per phase, worked out before anything loads.

`kinema generate --plan` prints it; a normal run compares it with the memory free
now and refuses up front, naming flags that would fit (`check_fits`), instead of
failing with an out-of-memory error minutes in.

Weights: each model is built on the meta device from its checkpoint's headers
(safetensors headers, the pickle of a .pth file, config.json; no weight is read)
and every tensor is counted at the bytes its loader gives it: the DiT's matrices
in --dtype with the float32 islands (kinema.loading.dit.dtype_policy), the Linear
layers fp8 quantisation converts at 1 byte (+ a float32 scale), umT5 and CLIP in
the dtype `kinema generate` loads them in (bf16 with a GPU, float32 on the CPU) and
the VAE in float32.

Activations, at each model's busiest moment (factors measured on CPU as RSS with
glibc's mmap threshold lowered, so that a freed tensor leaves the count at once,
as the large tensors of full-size models do):
- DiT, per token: the float32 residual stream is alive three times (the embedded
  tokens the forward keeps, a block's input, its running sum); self-attention
  adds the modulated input, q and k (float32 after RoPE), v, the attention output
  and its projection: 33.5 bytes per channel in float32, 31 in bf16 (`DIT_ATTN`).
  The FFN holds 20 bytes per channel plus its two [L, ffn_dim] tensors in the
  compute dtype (`DIT_FFN`). Plus the RoPE tables (4 x head_dim bytes). This is 0-8%
  above the per-token peaks measured at widths 256-768, float32 and bf16, fp8 or not.
  No L x L term: CUDA's SDPA kernels (flash / memory-efficient), FlashAttention
  and SageAttention never hold the scores, and on CPU this PyTorch's SDPA runs its
  flash kernel too (measured: 7 MiB extra at 8,192 tokens, where the scores
  would be 512 MiB). With --fp8_fast, each fp8 matmul's input is also held as
  three float32 copies and one fp8 copy while it is quantised (from the code; GPU only).
- umT5: its relative-position bias [1, H, L, L] and the masked copy [B, H, L, L]
  are the big ones, alive through the block; the FFN holds three [B, L, ffn]
  tensors (measured 12.2 bytes per ffn channel in float32). L is counted at the
  512 tokens the tokenizer allows, an upper bound (prompts are batched to the longest).
- CLIP: one 224 px image at a time, tens of MB.
- VAE encode / decode: kinema.memory.vae_tiling's estimate, the one --vae_tile
  auto decides with, tiled as auto will tile given the memory left then. It is
  calibrated on videos; for one frame (t2i) it counts about twice what is used.

Phases, in the order `generate` runs them: load, text encode, image encode (CLIP),
VAE encode (the condition of i2v / flf2v, v2v's input), sampling, decode, save.
A model's weights count on a device in every phase it is resident there: all the
time without offload; with --offload_model, on the host all the time (its home
copy, kinema/memory/offload.py) and on the GPU in its own phase only;
--blocks_to_swap N keeps N DiT blocks on the host and at most
`num_layers - N + prefetch_blocks` on the GPU; --stream_dit reads the blocks
from the file. Figures are what the run adds to the process as it is before
loading (Python and PyTorch hold ~0.2 GiB of RSS by then).

Checked against the peak RSS of real CPU runs, phase by phase
(bench/memory_plan.py, tests/test_memory_plan.py). Not modelled: torch.compile's
buffers, the fp16 guard's float32 recomputation, LoRA merging (one layer at a time).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from kinema.errors import CheckpointError, KinemaError
from kinema.loading import clip as clip_loading
from kinema.loading import t5 as t5_loading
from kinema.loading import vae as vae_loading
from kinema.loading.dit import DiTCheckpoint, dtype_policy, open_dit
from kinema.loading.files import TensorSource, checkpoint_files
from kinema.loading.fp8 import resolve_quantization
from kinema.loading.identify import identify, wrong_component_message
from kinema.ops.fp8 import FP8_DTYPES, fp8_targets
from kinema.memory.vae_tiling import (
    FIXED_BYTES, budget_from_free, choose_tile, decode_bytes, encode_bytes, free_memory, parse_vae_tile,
)
from kinema.models.clip import ClipVisionConfig, CLIPVisionTower
from kinema.models.dit import WAN_DIT, WanDiT
from kinema.models.t5 import UMT5Encoder
from kinema.models.vae import WanVAE

GiB = 2**30
# Bytes per token per DiT channel (module docstring).
DIT_ATTN = 34
DIT_FFN = 20
# Latent-sized float32 tensors alive while sampling: noise, the sample, the solver's history, both guidance
# branches' predictions and their combination.
LATENT_COPIES = 12
# Slack, workspaces and first-call buffers that scale with nothing, per phase. Host: 85-100 MiB measured in
# the text-encode and sampling phases of bench/memory_plan.py's runs (the VAE phases count vae_tiling's own
# FIXED_BYTES instead). CUDA: cuBLAS workspaces and the caching allocator's rounding, the margin
# kinema.memory.vae_tiling keeps too (not measured: no GPU here).
FIXED = {"cpu": 128 * 2**20, "cuda": 512 * 2**20}
TEXT_TOKENS = 512  # the most umT5 tokens a prompt gets


# ---- the models, without weights ----------------------------------------------------------------


@dataclass
class MetaModels:
    """The run's models on the meta device: shapes, no memory."""

    dit: WanDiT
    t5: UMT5Encoder
    vae: WanVAE
    clip: CLIPVisionTower | None = None
    dit_fp8: str | None = None  # the fp8 mode the files store the Linear weights in (what "auto" keeps), else None
    t5_fp8: str | None = None
    sample_defaults: dict = field(default_factory=dict)  # a Kinema-trained DiT's own defaults (size, frames, ...)


def read_models(dit, t5, vae, clip=None) -> MetaModels:
    """The architectures of the checkpoints at these paths (files or folders, in any format the loaders
    read), from their headers alone, with the loaders' own format detection. `dit` may be a DiTCheckpoint
    already opened (kinema.loading.dit.open_dit; its meta model is used as it is). `clip`: i2v / flf2v only."""
    found = dit if isinstance(dit, DiTCheckpoint) else open_dit(dit)
    dit_fp8 = _stored_fp8(found.model, found.plan, found.source)

    files = checkpoint_files(Path(t5).expanduser(), t5_loading.WHAT, t5_loading.CANDIDATES, subfolder="text_encoder", kind="t5")
    source = TensorSource(files)
    plan = t5_loading._detect_format(source).plan(source)
    with torch.device("meta"):
        t5_model = UMT5Encoder(**t5_loading._infer_config(plan, source))
    t5_fp8 = _stored_fp8(t5_model, plan, source)

    source = TensorSource(checkpoint_files(vae, "VAE", vae_loading.CANDIDATES, subfolder="vae", kind="vae"))
    plan = vae_loading._keymap_for(source.keys()).plan(source)
    with torch.device("meta"):
        vae_model = WanVAE(**vae_loading.infer_config({k: source.shape(s[0]) for k, s in plan.sources.items()}, source.name))

    clip_model = None
    if clip is not None:
        files = checkpoint_files(clip, clip_loading.COMPONENT, clip_loading.CANDIDATES, subfolder="image_encoder", kind="clip")
        source = TensorSource(files)
        fmt = clip_loading.detect_format(source.keys())
        if fmt is None:
            raise CheckpointError(wrong_component_message(source.name, identify(source.keys()), "clip"))
        config = clip_loading._infer_config(clip_loading._FORMATS[fmt](None).plan(source), source, None, None, files[0].parent)
        with torch.device("meta"):
            clip_model = CLIPVisionTower(config)
    return MetaModels(found.model, t5_model, vae_model, clip_model, dit_fp8, t5_fp8, dict(found.info.sample_defaults))


def _stored_fp8(model: nn.Module, plan, source: TensorSource) -> str | None:
    """The fp8 mode of the file's Linear weights (what quantization "auto" keeps); None for a file in higher
    precision, or one the loader will refuse (mixed formats) with its own message."""
    try:
        return resolve_quantization("auto", model, plan, source)
    except CheckpointError:
        return None


def wan21_models(name: str) -> MetaModels:
    """The released Wan2.1 shapes, without files: 't2v-1.3B', 't2v-14B', 'i2v-14B' or 'flf2v-14B'
    (with umT5-XXL, the ViT-H/14 CLIP tower for i2v / flf2v and the Wan2.1 VAE)."""
    with torch.device("meta"):
        cfg = WAN_DIT[name]
        clip = CLIPVisionTower(ClipVisionConfig()) if cfg.model_type != "t2v" else None
        return MetaModels(WanDiT(cfg), UMT5Encoder(), WanVAE(), clip)


@functools.cache
def _tensors(model: nn.Module) -> tuple[tuple[str, int, bool], ...]:
    """(name, elements, converted by fp8 quantisation) for each tensor of a meta model."""
    quantisable = {f"{name}.weight" for name in fp8_targets(model)}
    return tuple((k, t.numel(), k in quantisable or t.dtype in FP8_DTYPES) for k, t in model.state_dict().items())


def _weights(model: nn.Module, dtype_for, fp8: bool, prefix: str = "") -> int:
    """Bytes of the model's tensors under `prefix` as a loader holds them: each at `dtype_for(name)`, and with
    `fp8` the Linear weights quantisation converts at 1 byte plus a float32 scale."""
    return sum(n + 4 if fp8 and q else n * _bytes(dtype_for(k)) for k, n, q in _tensors(model) if k.startswith(prefix))


def _largest(model: nn.Module, quantised: bool = False) -> int:
    """Elements of the model's largest tensor (of its largest fp8-quantised Linear weight)."""
    return max((n for _, n, q in _tensors(model) if q or not quantised), default=0)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# ---- activations --------------------------------------------------------------------------------


def dit_activations(dit: WanDiT, tokens: int, batch: int, dtype: torch.dtype, fp8: bool = False, fast: bool = False) -> int:
    """Peak bytes of one DiT forward over `batch` x `tokens` tokens, beyond its weights."""
    cfg, c = dit.config, _bytes(dtype)
    quantising = 13 if fp8 and fast else 0  # --fp8_fast: three float32 copies and an fp8 one of a matmul's input
    per_token = 4 * cfg.head_dim + max((DIT_ATTN + quantising) * cfg.dim,
                                       DIT_FFN * cfg.dim + (2 * c + quantising) * cfg.ffn_dim)
    context = cfg.text_len * (4 * cfg.text_dim + c * cfg.dim)  # the padded umT5 output and its projection
    image = 2 * 257 * (4 * cfg.image_dim + c * cfg.dim) if cfg.model_type != "t2v" else 0  # CLIP tokens, flf2v's two
    upcast = _largest(dit, quantised=True) * c if fp8 and not fast else 0  # one fp8 layer's weight, upcast to run
    return batch * (tokens * per_token + context + image) + upcast


def t5_activations(t5: UMT5Encoder, batch: int, length: int, dtype: torch.dtype, fp8: bool = False) -> int:
    """Peak bytes of one umT5 pass over `batch` prompts of `length` tokens."""
    c = _bytes(dtype)
    bias = t5.num_heads * length * length * c  # [1, H, L, L]; the masked copy is [B, H, L, L]
    attention = (1 + batch) * bias + batch * length * 6 * t5.dim * c
    ffn = batch * bias + batch * length * (5 * t5.dim + 3 * t5.dim_ffn) * c
    return max(attention, ffn) + (_largest(t5, quantised=True) * c if fp8 else 0)


def clip_activations(clip: CLIPVisionTower) -> int:
    cfg = clip.config
    return (1 + cfg.num_patches) * (16 * cfg.dim + 2 * cfg.mlp_dim) * 4


# ---- the run and its plan -------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What decides a run's memory: the output's shape and the flags of `kinema generate`."""

    task: str = "t2v"  # t2v | t2i | i2v | flf2v | v2v
    width: int = 832  # pixels, as generate() rounds them (multiples of 16; i2v: the image's aspect)
    height: int = 480
    frame_num: int = 81
    device: str = "cuda"  # where the DiT runs
    dtype: torch.dtype = torch.bfloat16  # the DiT's
    encoder_dtype: torch.dtype | None = None  # umT5 and CLIP; None: what `kinema generate` loads them in (encoder_dtype)
    vae_dtype: torch.dtype = torch.float32
    quantization: str | None = None  # the DiT's fp8 mode ("auto": the files' own), None: none
    t5_quantization: str | None = None
    fp8_fast: bool = False
    guided: bool = True  # guidance scale != 1: a negative prompt and a second DiT pass
    batched_cfg: bool = False
    t5_cpu: bool = False
    offload: bool = False
    blocks_to_swap: int = 0
    prefetch_blocks: int = 1
    stream: bool = False  # --stream_dit: the blocks' weights read from the file as they run
    vae_tile: object = "auto"  # "auto" | "off" | (width, height) pixels | "WxH"
    cache: bool = False  # step caching (--cache)
    text_tokens: int = TEXT_TOKENS
    window_frames: int | None = None  # pixel frames of a context window: the DiT sees one at a time
    sequence_ranks: int = 1  # processes the DiT's tokens are split over (--ulysses_size x --ring_size)
    dit_shards: int = 1  # processes the DiT's weights are sharded over (--dit_fsdp), umT5's (--t5_fsdp)
    t5_shards: int = 1

    def __post_init__(self):
        if self.encoder_dtype is None:
            object.__setattr__(self, "encoder_dtype", encoder_dtype(self.device))


def encoder_dtype(device: str) -> torch.dtype:
    """umT5's and CLIP's dtype in `kinema generate`: bf16 with a GPU (the official code runs umT5 in bf16,
    even with --t5_cpu), float32 on a CPU-only machine (bf16 matmuls are slow on many CPUs)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


@dataclass
class Use:
    """Bytes one model (or "load", "video", "save") holds on one device in one phase."""

    component: str
    device: str
    weights: int = 0
    activations: int = 0
    running: bool = False  # the model this phase runs

    @property
    def total(self) -> int:
        return self.weights + self.activations


@dataclass
class Phase:
    name: str
    uses: list[Use]
    fixed: dict[str, int] = field(default_factory=lambda: dict(FIXED))

    def total(self, device: str) -> int:
        return self.fixed[device] + sum(u.total for u in self.uses if u.device == device)


@dataclass
class Plan:
    run: Run
    tokens: int  # DiT tokens per batch row
    phases: list[Phase]
    labels: dict[str, str]  # component -> what it is ("DiT t2v 30x1536 bf16", ...)
    tiles: dict[str, tuple[int, int] | None]  # "encode" / "decode" -> the VAE's (h, w) latent tile; None: untiled
    vae_ratio: int = 8
    available: dict[str, int] | None = None

    @property
    def devices(self) -> list[str]:
        return sorted({u.device for p in self.phases for u in p.uses}, key=lambda d: d == "cpu")

    def peak(self, device: str) -> tuple[int, str]:
        """(bytes, phase) of the device's busiest phase."""
        return max((p.total(device), p.name) for p in self.phases)

    def short(self, available: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
        """{device: (needed, free)} for each device whose peak exceeds the free memory."""
        available = self.available if available is None else available
        need = {d: self.peak(d)[0] for d in self.devices}
        return {d: (n, available[d]) for d, n in need.items() if available and d in available and n > available[d]}

    def table(self) -> str:
        """Each model on each device in the phase it runs, the copies held where it never runs, the total per phase."""
        r = self.run
        flags = [f for f, on in (("--t5_cpu", r.t5_cpu), ("--offload_model", r.offload), ("--fp8_fast", r.fp8_fast),
                                 ("--batched_cfg", r.batched_cfg and r.guided), ("--cache", r.cache)) if on]
        frames = f"{r.frame_num} frames" + ("" if r.window_frames is None else f" in windows of {r.window_frames}")
        lines = [f"Memory plan: {r.task} {r.width}x{r.height}, {frames} = {self.tokens:,} DiT tokens, "
                 f"{'with' if r.guided else 'no'} guidance, DiT on {r.device}" + (f" ({' '.join(flags)})" if flags else ""),
                 "", f"{'component':<38} {'device':<6} {'weights':>9} {'activ.':>9}   {'phase':<12} {'phase peak':>10}"]
        for p in self.phases:
            lines += [f"{self.labels.get(u.component, u.component):<38} {u.device:<6} {human_bytes(u.weights):>9} "
                      f"{human_bytes(u.activations):>9}   {p.name:<12} {human_bytes(p.total(u.device)):>10}" for u in p.uses if u.running]
        runs = {(u.component, u.device) for p in self.phases for u in p.uses if u.running}
        held: dict[tuple[str, str], int] = {}  # host copies of offloaded models, swapped blocks, ...
        for u in (u for p in self.phases for u in p.uses):
            if not u.running and u.weights and (u.component, u.device) not in runs:
                held[u.component, u.device] = max(held.get((u.component, u.device), 0), u.weights)
        lines += [f"{self.labels.get(c, c) + ', held':<38} {d:<6} {human_bytes(n):>9} {'':>9}   {'(others run)':<12}"
                  for (c, d), n in held.items()]
        devices = self.devices
        lines += ["", f"{'phase':<14}" + "".join(f"{d:>11}" for d in devices)]
        lines += [f"{p.name:<14}" + "".join(f"{human_bytes(p.total(d)):>11}" for d in devices) for p in self.phases]
        lines += ["", "Expected peak: " + ", ".join(f"{d} {human_bytes(self.peak(d)[0])} ({self.peak(d)[1]})" for d in devices)
                  + ". Phase totals include " + ", ".join(f"{human_bytes(FIXED[d])} on {d}" for d in devices)
                  + " of workspace and slack, and count what the run adds to this process (cpu: host RAM)."]
        if self.available:
            short = self.short()
            lines.append("Free now: " + ", ".join(f"{d} {human_bytes(self.available[d])}" for d in devices if d in self.available)
                         + (f": does not fit on {', '.join(short)}." if short else ": fits."))
        lines += [f"VAE {op} on tiles of {t[1] * self.vae_ratio}x{t[0] * self.vae_ratio} pixels."
                  for op, t in self.tiles.items() if t is not None]
        return "\n".join(lines)


def human_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _vae_tile(vae: WanVAE, run: Run, need, h: int, w: int, free: int | None) -> tuple[int, int] | None:
    """The latent tile TiledVAE will use, `free` bytes being free when the VAE starts (None: unknown, untiled)."""
    tile = parse_vae_tile(run.vae_tile, vae.spatial_ratio)
    if tile == "off" or (tile == "auto" and free is None):
        return None
    if tile == "auto":  # with no tile fitting, the smallest: the plan shows by how much it is short
        return choose_tile(need, h, w, budget_from_free(free, run.device), warn=False)
    th, tw = tile[1] // vae.spatial_ratio, tile[0] // vae.spatial_ratio
    return None if th >= h and tw >= w else (min(th, h), min(tw, w))


class _Placement:
    """Where each model's weights are in a phase, given which model runs in it."""

    def __init__(self, models: MetaModels, run: Run):
        cfg, enc = models.dit.config, run.encoder_dtype
        self.run, self.host = run, "cpu"
        self.dit_fp8 = (models.dit_fp8 if run.quantization == "auto" else run.quantization) is not None
        self.t5_fp8 = (models.t5_fp8 if run.t5_quantization == "auto" else run.t5_quantization) is not None
        policy = dtype_policy(run.dtype)
        self.dit, self.block = _weights(models.dit, policy, self.dit_fp8), _weights(models.dit, policy, self.dit_fp8, "blocks.0.")
        if run.dit_shards > 1:  # FSDP: its shards, and the one block gathered whole to run
            self.dit = -(-self.dit // run.dit_shards) + self.block
        self.swapped = cfg.num_layers if run.stream else min(run.blocks_to_swap, cfg.num_layers)
        self.window = min(self.swapped, max(1, run.prefetch_blocks)) if self.swapped else 0
        self.weights = {"t5": _weights(models.t5, lambda _: enc, self.t5_fp8), "vae": _weights(models.vae, lambda _: run.vae_dtype, False)}
        if run.t5_shards > 1:  # its shards, and its largest unit (the token embedding) gathered whole
            self.weights["t5"] = (-(-self.weights["t5"] // run.t5_shards)
                                  + _weights(models.t5, lambda _: enc, False, "token_embedding."))
        if models.clip is not None and run.task in ("i2v", "flf2v"):
            self.weights["clip"] = _weights(models.clip, lambda k: torch.float32 if "norm" in k else enc, False)

    def device_of(self, name: str) -> str:
        return self.host if name == "t5" and self.run.t5_cpu else self.run.device

    def uses(self, running: str | None) -> list[Use]:
        """Offloaded models keep their home copy on the host and visit the compute device in their own phase (on
        the CPU too, where the visit is a second copy); the others stay on their device. The DiT keeps its
        swapped blocks on the host and a window of them on the device while it runs."""
        run, host, dev = self.run, self.host, self.run.device
        uses = []
        for name, w in self.weights.items():
            on = running == name
            if run.offload and not (name == "t5" and run.t5_cpu):
                uses += [Use(name, host, w)] + ([Use(name, dev, w, running=True)] if on else [])
            else:
                uses.append(Use(name, self.device_of(name), w, running=on))
        on = running == "dit"
        resident = self.dit - self.swapped * self.block
        if run.offload:
            uses.append(Use("dit", host, resident if run.stream else self.dit))
            if on:
                uses.append(Use("dit", dev, resident + self.window * self.block, running=True))
        else:
            uses.append(Use("dit", dev, resident + (self.window * self.block if on else 0), running=on))
            if self.swapped and not run.stream:
                uses.append(Use("dit", host, self.swapped * self.block))
        if run.stream and on and dev != host:
            uses.append(Use("dit", host, 0, self.window * self.block))  # blocks read from the file, on their way
        return uses

    def phase(self, name: str, running: str | None, activations: int = 0, extra=()) -> Phase:
        uses = self.uses(running)
        if running is not None:
            mine = next(u for u in uses if u.component == running and u.running)
            mine.activations += activations
        phase = Phase(name, uses + list(extra))
        if running == "vae":  # vae_tiling's estimates hold their own fixed part
            phase.fixed[self.run.device] = max(0, FIXED[self.run.device] - FIXED_BYTES)
        return phase

    def free_when(self, running: str, available: dict[str, int] | None) -> int | None:
        """What will be free on the compute device when `running` starts, `available` being free now."""
        dev = self.run.device
        if available is None or dev not in available:
            return None
        return available[dev] - FIXED[dev] - sum(u.total for u in self.uses(running) if u.device == dev)


def estimate(models: MetaModels, run: Run, available: dict[str, int] | None = None) -> Plan:
    """The memory plan of `run`. `available` ({"cuda": bytes, "cpu": bytes} free now) decides how
    --vae_tile auto will tile; without it the VAE counts untiled."""
    dit, t5, vae, clip, cfg = models.dit, models.t5, models.vae, models.clip, models.dit.config
    at = _Placement(models, run)
    host, gpu = "cpu", run.device != "cpu"
    t, h, w = (run.frame_num - 1) // vae.temporal_ratio + 1, run.height // vae.spatial_ratio, run.width // vae.spatial_ratio
    t_dit = t if run.window_frames is None else min(t, (run.window_frames - 1) // vae.temporal_ratio + 1)
    tokens = (t_dit // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    tokens = -(-tokens // run.sequence_ranks)  # this process's chunk of a split sequence
    video = 3 * run.frame_num * run.height * run.width * 4  # float32 pixels

    # Loading: tensors are read one at a time on the host: a float32 copy of the largest on its way to the GPU,
    # three of the largest Linear weight while it is quantised to fp8.
    def reading(model: nn.Module, fp8: bool, to_host: bool) -> int:
        return 4 * max(0 if to_host else _largest(model), 3 * _largest(model, quantised=True) if fp8 else 0)

    buffers = max(reading(dit, at.dit_fp8, not gpu or run.offload or at.swapped > 0),
                  reading(t5, at.t5_fp8, not gpu or run.offload or run.t5_cpu))
    phases = [at.phase("load", None, extra=[Use("load", host, 0, buffers, running=True)])]
    phases.append(at.phase("text encode", "t5", t5_activations(t5, 2 if run.guided else 1, run.text_tokens,
                                                               run.encoder_dtype, at.t5_fp8)))
    tiles: dict[str, tuple[int, int] | None] = {}
    if "clip" in at.weights:
        phases.append(at.phase("image encode", "clip", clip_activations(clip)))
    if run.task in ("i2v", "flf2v", "v2v") or cfg.in_dim > vae.z_dim:
        shape = (1, 3, run.frame_num, run.height, run.width)
        tiles["encode"] = _vae_tile(vae, run, lambda tile: encode_bytes(vae, shape, tile), h, w, at.free_when("vae", available))
        phases.append(at.phase("VAE encode", "vae", encode_bytes(vae, shape, tiles["encode"]),
                               extra=[Use("video", host, 0, video)]))  # the video to encode, on the host
    rows = 2 if run.guided and run.batched_cfg else 1
    sampling = dit_activations(dit, tokens, rows, run.dtype, at.dit_fp8, run.fp8_fast)
    sampling += LATENT_COPIES * vae.z_dim * t * h * w * 4
    if run.cache:  # each guidance branch's residual and last input, and the blocks' input
        sampling += (2 * (2 if run.guided else 1) + 1) * tokens * cfg.dim * 4
    phases.append(at.phase("sampling", "dit", sampling))
    latents = (1, vae.z_dim, t, h, w)
    tiles["decode"] = _vae_tile(vae, run, lambda tile: decode_bytes(vae, latents, tile), h, w, at.free_when("vae", available))
    phases.append(at.phase("decode", "vae", decode_bytes(vae, latents, tiles["decode"])))
    # Saving: the video on the host (a copy of it when decoded on the GPU), clamped and scaled (two float32
    # temporaries), then as uint8.
    save = [Use("save", host, 0, (3 if gpu else 2) * video + video // 4, running=True)]
    phases.append(at.phase("save", None, extra=save + ([Use("video", run.device, 0, video)] if gpu else [])))

    labels = {
        "t5": f"umT5 {t5.num_layers}x{t5.dim} {'fp8' if at.t5_fp8 else _name(run.encoder_dtype)}",
        "dit": f"DiT {cfg.model_type} {cfg.num_layers}x{cfg.dim} {'fp8' if at.dit_fp8 else _name(run.dtype)}"
               + (", streamed" if run.stream else f", {at.swapped} swapped" if at.swapped else ""),
        "vae": f"VAE {_name(run.vae_dtype)}",
        "load": "loading (conversion buffers)",
        "save": "saving (float32 + uint8 video)",
        "video": "video (float32)",
    }
    if clip is not None:
        labels["clip"] = f"CLIP {clip.config.num_layers - 1}x{clip.config.dim} {_name(run.encoder_dtype)}"
    return Plan(run, tokens, phases, labels, tiles, vae.spatial_ratio, available)


# ---- the memory free now, and what would fit -------------------------------------------------------

FP8 = "fp8_e4m3fn_scaled"


def available_memory(device: str) -> dict[str, int]:
    """Bytes free now: {"cpu": available RAM} and, on a GPU run, "cuda": free GPU memory."""
    out = {"cpu": free_memory("cpu")}
    if device == "cuda":
        out["cuda"] = free_memory("cuda")
    return out


def _options(models: MetaModels, run: Run) -> list[tuple[str, dict]]:
    """Flag changes that lower a run's memory, cheapest first: (flags, Run fields)."""
    gpu = run.device == "cuda"
    dit_fp8 = models.dit_fp8 if run.quantization == "auto" else run.quantization
    t5_fp8 = models.t5_fp8 if run.t5_quantization == "auto" else run.t5_quantization
    options = [
        ("--vae_tile auto", {"vae_tile": "auto"}, parse_vae_tile(run.vae_tile) != "auto"),
        ("--t5_cpu", {"t5_cpu": True}, gpu and not run.t5_cpu),
        ("--offload_model True", {"offload": True}, gpu and not run.offload),
        ("without --batched_cfg", {"batched_cfg": False}, run.batched_cfg and run.guided),
        (f"--quantization {FP8}", {"quantization": FP8}, dit_fp8 is None),
        (f"--t5_quantization {FP8}", {"t5_quantization": FP8}, t5_fp8 is None),
        ("--dtype bf16", {"dtype": torch.bfloat16}, not gpu and run.dtype == torch.float32),
    ]
    return [(flags, fields) for flags, fields, useful in options if useful]


def _fits(models: MetaModels, run: Run, available: dict[str, int]) -> bool:
    return not estimate(models, run, available).short(available)


def _fewest_swapped(models: MetaModels, run: Run, available: dict[str, int]) -> int | None:
    """The fewest DiT blocks to swap for `run` to fit (more never needs more memory); None when all are not enough."""
    low, high = run.blocks_to_swap, models.dit.config.num_layers
    if run.device != "cuda" or run.stream or not _fits(models, replace(run, blocks_to_swap=high), available):
        return None
    while high - low > 1:  # fits at `high`, not at `low`
        mid = (low + high) // 2
        low, high = (low, mid) if _fits(models, replace(run, blocks_to_swap=mid), available) else (mid, high)
    return high


def suggest(models: MetaModels, run: Run, available: dict[str, int], most: int = 3) -> list[str]:
    """Up to `most` sets of flags that make `run` fit in `available`: the fewest and cheapest changes first;
    failing those, the fewest changes plus the fewest DiT blocks to swap; failing that, a smaller size."""
    options = _options(models, run)

    def changed(base: Run, combo) -> Run:
        return replace(base, **{key: value for _, fields in combo for key, value in fields.items()})

    def flags(combo, *more: str) -> str:
        return " ".join([*(f for f, _ in combo), *more])

    combos = [combo for k in range(len(options) + 1) for combo in itertools.combinations(options, k)]
    for k in range(1, len(options) + 1):
        found = [flags(c) for c in combos if len(c) == k and _fits(models, changed(run, c), available)]
        if found:
            return found[:most]
    for k in range(len(options) + 1):
        swaps = [(n, flags(c, f"--blocks_to_swap {n}")) for c in combos if len(c) == k
                 for n in [_fewest_swapped(models, changed(run, c), available)] if n is not None]
        if swaps:
            return [f for _, f in sorted(swaps)[:most]]
    everything = changed(run, options)
    if everything.device == "cuda" and not everything.stream:
        everything = replace(everything, blocks_to_swap=models.dit.config.num_layers)
    for scale in (0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2):
        w, h = (max(16, 16 * round(v * scale / 16)) for v in (run.width, run.height))
        if _fits(models, replace(everything, width=w, height=h), available):
            swap = [f"--blocks_to_swap {everything.blocks_to_swap}"] if everything.blocks_to_swap > run.blocks_to_swap else []
            return [flags(options, f"--size {w}*{h}", *swap)]
    return []


def check_fits(models: MetaModels, run: Run, available: dict[str, int] | None = None) -> Plan:
    """The plan when the run fits in the memory free now, else a KinemaError naming the estimate, the free
    memory and flags that would make it fit."""
    available = available_memory(run.device) if available is None else available
    plan = estimate(models, run, available)
    short = plan.short(available)
    if not short:
        return plan
    what = {"cuda": "GPU memory", "cpu": "RAM"}
    needs = " and ".join(f"{human_bytes(n)} of {what[d]} (peak in {plan.peak(d)[1]}; {human_bytes(a)} free)" for d, (n, a) in short.items())
    ways = suggest(models, run, available)
    fix = f"It would fit with {', or '.join(ways)}." if ways else "No combination of Kinema's memory flags fits it."
    raise KinemaError(f"this run needs about {needs}, by the memory plan. {fix} "
                      "`--plan` shows the breakdown; --no_memory_check runs it anyway.")
