"""The values that travel along a workflow's links, as typed records.

Loader nodes return *recipes* (what to load and how), not weights: the executor's model cache
(kinema.workflow.context.ModelCache) loads a recipe the first time a node needs it and keeps it
between prompts within a memory budget, so a LoRA or a shift changed on a model never touches the
cached base model, and `POST /free` can drop every weight.

Image and latent values keep ComfyUI's conventions so its workflows mean the same here:
IMAGE float [B, H, W, 3] in [0, 1] (a video is its frames as the batch), LATENT {"samples":
[B, 16, T, h, w]} (plus "noise_mask" / "batch_index" where ComfyUI puts them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DiTRecipe:
    """MODEL / WANVIDEOMODEL: a DiT file and how to load and run it."""

    path: str
    dtype: str | None = None  # None: the Pipeline's default for the device; "fp32" / "bf16" / "fp16"
    quantization: str | None = None  # an fp8 mode (kinema.ops.fp8)
    loras: tuple[tuple[str, float], ...] = ()  # merged at load, in order
    shift: float | None = None  # ModelSamplingSD3; None: the model's own default
    attention: str = "auto"
    blocks_to_swap: int = 0
    prefetch_blocks: int | None = None
    compile: str | None = None
    device: str | None = None
    fp8_fast: bool = False  # fp8 matmuls (ComfyUI's `fp8_e4m3fn_fast`); upcast per layer where the device has none

    def load_key(self) -> tuple:
        """What decides the loaded weights (shift does not)."""
        return (self.path, self.dtype, self.quantization, self.loras, self.attention, self.blocks_to_swap,
                self.prefetch_blocks, self.compile, self.device, self.fp8_fast)


@dataclass(frozen=True)
class TextEncoderRecipe:
    """CLIP (type wan) / WANTEXTENCODER: a umT5 file (its tokenizer inside as `spiece_model`, or beside it)."""

    path: str
    tokenizer: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class VAERecipe:
    path: str
    dtype: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class ClipVisionRecipe:
    path: str
    dtype: str | None = None
    device: str | None = None


@dataclass
class Conditioning:
    """CONDITIONING: one prompt's umT5 embeddings [1, L, 4096] (unpadded) and what image-to-video nodes add."""

    context: torch.Tensor
    y: torch.Tensor | None = None  # [1, 4 + 16, T, h, w] the i2v / flf2v mask + known-frame latents
    clip_fea: torch.Tensor | None = None  # [1, N, 1280] CLIP tokens
    prompt: str = ""

    def with_image(self, y: torch.Tensor | None, clip_fea: torch.Tensor | None) -> Conditioning:
        return Conditioning(self.context, y if y is not None else self.y,
                            clip_fea if clip_fea is not None else self.clip_fea, self.prompt)


@dataclass
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: the tokens the Wan i2v DiT takes from CLIP [1, 257, 1280]."""

    tokens: torch.Tensor


@dataclass
class TextEmbeds:
    """WANVIDEOTEXTEMBEDS: the wrapper's positive and negative prompt embeddings."""

    positive: torch.Tensor  # [1, L, 4096]
    negative: torch.Tensor | None
    prompt: str = ""
    negative_prompt: str = ""
    travel: tuple[torch.Tensor, ...] = ()  # prompt travel ('a | b | c'): the later sections' embeddings [1, L_i, 4096]


@dataclass
class ImageEmbeds:
    """WANVIDIMAGE_EMBEDS: what the wrapper's sampler takes besides text: the target latent size, and for
    i2v / flf2v the condition."""

    width: int
    height: int
    num_frames: int
    y: torch.Tensor | None = None
    clip_fea: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ContextOptions:
    """WANVIDCONTEXT: the sampler's context windows (kinema.sampling.windows.ContextWindows) and, optionally, the
    reference latents [n, z, h, w] that become the first frame of every window not starting at the video's (the
    wrapper's reference_latent)."""

    windows: object
    reference: torch.Tensor | None = None


@dataclass
class VideoValue:
    """VIDEO (ComfyUI's CreateVideo / SaveVideo): frames IMAGE [F, H, W, 3] in [0, 1] and a frame rate."""

    frames: torch.Tensor
    fps: float
    audio: object | None = None
