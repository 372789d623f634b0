"""The records a pipeline holds: its loaded models and what was learnt loading them, and its runtime.

State that used to be patched onto modules (a DiT's tasks and sampling defaults, its fp16 guard,
block placement and compile mode) or kept in module globals (the attention backend, the device)
lives in these typed records instead; the modules stay plain nn.Modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kinema.loading.dit import ModelInfo
from kinema.pipeline.settings import Geometry


@dataclass(frozen=True)
class Target:
    """What a call is checked against (kinema.pipeline.job): the model set's declared tasks and defaults,
    its DiT variant, its latent geometry, whether it has CLIP. The command line builds one from the
    checkpoints' headers, to check a call before loading a weight."""

    info: ModelInfo
    model_type: str  # t2v | i2v | flf2v
    geometry: Geometry
    has_clip: bool
    dit_config: object | None = None  # the DiT's DiTConfig (its depth and head size check the guidance extras)


@dataclass
class Models:
    """One loaded model set: the DiT, the VAE, the umT5 text encoder and (i2v / flf2v) the CLIP vision encoder."""

    dit: torch.nn.Module
    vae: torch.nn.Module  # WanVAE (or a TiledVAE around one)
    text_encoder: object  # kinema.encoders.text.TextEncoder
    clip: object | None = None  # kinema.encoders.image.ClipVisionEncoder
    info: ModelInfo = field(default_factory=ModelInfo)  # what the checkpoint says: its tasks, sampling defaults
    placement: object | None = None  # the DiT's block placement (BlockSwap / streaming), parked by offload
    fp16_guard: object | None = None  # kinema.ops.fp16_guard.FP16Guard of an fp16 DiT
    compiled: str | None = None  # torch.compile mode of the DiT's blocks
    quantization: str | None = None  # the DiT's fp8 mode
    t5_quantization: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # merged LoRAs (path, strength), in order
    source: str | None = None  # the checkpoint (folder or DiT file), for metadata
    lora_hooks: tuple = ()  # unmerged LoRAs (kinema.lora.runtime.RuntimeLoRA): block hooks for every DiT call
    # t2v on an i2v-type DiT: the empty condition per size (kinema.pipeline.conditioning.make_condition's `blanks`)
    blank_conditions: dict = field(default_factory=dict, repr=False)

    @property
    def geometry(self) -> Geometry:
        vae = self.vae
        return Geometry(vae.spatial_ratio, vae.temporal_ratio, tuple(self.dit.config.patch_size), vae.z_dim)

    @property
    def target(self) -> Target:
        return Target(self.info, self.dit.config.model_type, self.geometry, self.clip is not None, self.dit.config)


@dataclass(frozen=True)
class Runtime:
    """Where and how a pipeline runs."""

    device: torch.device  # where the DiT computes
    dtype: torch.dtype  # the DiT's weights
    encoder_dtype: torch.dtype  # umT5 and CLIP
    attention: str = "sdpa"  # the attention backend, resolved (kinema/ops/attention.py)
    offload: bool = False  # each model on the device only for its stage (the official offload_model)
    t5_cpu: bool = False  # umT5 stays on the CPU
    parallel: object = None  # kinema.parallel.mesh.Mesh of a run spread over processes, or None

    @property
    def home(self) -> torch.device:
        """Where models are loaded: the host when offloading (each visits `device` to run), else `device`."""
        return torch.device("cpu") if self.offload else self.device
