"""The Wan2.1 diffusion transformer (DiT), one module for t2v, i2v and flf2v.

Variants are data (`DiTConfig` and the `WAN_DIT` registry). Parameter names
follow the official `WanModel`, so official checkpoints load one to one and the
other formats are key maps onto these names (kinema/loading/dit.py).

The forward pass is split into parts a sampler can drive on its own:
`embed` (patchify + optional i2v condition), `time_embed`, `embed_context`,
`rope`, the `blocks` (each a plain call, so they can be skipped, swapped in and
out or run on a slice of the sequence; block hooks compose around them,
kinema/models/hooks.py), and `head` + `unpatchify`.

What is about the architecture, not about a run, is declared on the class as data
(as diffusers does): which weights stay float32, which Linear layers fp8 leaves
alone, which parts the fp16 guard watches, and where the repeated blocks are.
Loaders, fp8, the fp16 guard, compile and block swap read these declarations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kinema.models.hooks import BlockInputs, run_hooked
from kinema.models.layers import LayerNorm32, Linear, RMSNorm32, modulate
from kinema.models.text_padding import fold_padding
from kinema.ops.attention import attention, kernel_may_run, sequence_attention
from kinema.ops.feta import Enhance, feta_gain
from kinema.ops.rope import apply_rope, rope_table


@dataclass(frozen=True)
class DiTConfig:
    model_type: str = "t2v"  # t2v | i2v | flf2v
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16  # 36 for i2v / flf2v: 16 noise + 4 mask + 16 condition latent
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int = 1280  # CLIP token width (i2v / flf2v)
    text_len: int = 512  # the text context is zero-padded to this many tokens (the official `text_len`)
    flf2v_tokens: int = 514  # CLIP tokens of the two frames flf2v's position embedding covers (2 x 257)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


WAN_DIT = {
    "t2v-1.3B": DiTConfig("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "t2v-14B": DiTConfig("t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-14B": DiTConfig("i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "flf2v-14B": DiTConfig("flf2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos, sin] embedding of timesteps t [B] -> [B, dim] float32 (angles in float64 as the reference)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = torch.outer(t.to(torch.float64), freqs)  # [B, half]
    return torch.cat([args.cos(), args.sin()], dim=1).float()


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (Linear(cfg.dim, cfg.dim) for _ in range(4))
        norm = (lambda: RMSNorm32(cfg.dim, cfg.eps)) if cfg.qk_norm else nn.Identity
        self.norm_q, self.norm_k = norm(), norm()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, backend: str = "sdpa",
                enhance: Enhance | None = None) -> torch.Tensor:
        """enhance: apply Enhance-A-Video's gain (kinema/ops/feta.py) to the attention output, or None."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # [B, L, H, D]
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        gain = None if enhance is None else feta_gain(q, k, enhance.frames, enhance.weight)  # before RoPE
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        out = sequence_attention(q.to(v.dtype), k.to(v.dtype), v, backend)  # the whole sequence, split or not
        if gain is not None:
            out = out * gain.to(out.dtype)[:, None, None, None]
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to text tokens, plus (i2v / flf2v) separate k/v for CLIP tokens."""

    def __init__(self, cfg: DiTConfig, image: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (Linear(cfg.dim, cfg.dim) for _ in range(4))
        norm = (lambda: RMSNorm32(cfg.dim, cfg.eps)) if cfg.qk_norm else nn.Identity
        self.norm_q, self.norm_k = norm(), norm()
        if image:
            self.k_img, self.v_img = Linear(cfg.dim, cfg.dim), Linear(cfg.dim, cfg.dim)
            self.norm_k_img = norm()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.v.compute_dtype).unflatten(-1, (self.num_heads, -1))  # [B, L, H, D]

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_context: torch.Tensor | None,
                backend: str = "sdpa", context_bias: torch.Tensor | None = None) -> torch.Tensor:
        """context_bias: [B, 1, 1, L_text] added to the text logits (the folded padding's log-count) or None."""
        q = self._heads(self.norm_q(self.q(x)))
        k, v = self._heads(self.norm_k(self.k(context))), self._heads(self.v(context))
        out = attention(q, k, v, mask=context_bias, backend=backend)
        if image_context is not None:
            k_img = self._heads(self.norm_k_img(self.k_img(image_context)))
            out = out + attention(q, k_img, self._heads(self.v_img(image_context)), backend=backend)
        return self.o(out.flatten(2))


FFN_ROWS = 4096  # tokens per FFN slice at inference (fp32 hidden of a 1.3B block: 147 MB instead of 1.2 GB at 480p)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm32(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg, image=cfg.model_type != "t2v")
        self.norm2 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, rope, context, image_context=None, attention="sdpa", context_bias=None, enhance=None):
        """x [B, L, dim] float32 residual stream; e [B, 6, dim] time modulation; attention: the backend's name;
        context_bias: the cross-attention's bias of a folded text context (BlockInputs.context_bias) or None;
        enhance: Enhance-A-Video on the self-attention (BlockInputs.enhance) or None. x itself is not modified.

        Without autograd (sampling) the second and third residual adds run in place and the FFN runs
        on slices of FFN_ROWS tokens with its GELU in place, so its [L, ffn_dim] hidden never exists
        whole; each token's result is the same as the one-piece computation."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e).unbind(1)
        x = torch.addcmul(x, self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa), rope, attention, enhance),
                          gate_sa[:, None])
        if torch.is_grad_enabled():
            x = x + self.cross_attn(self.norm3(x), context, image_context, attention, context_bias)
            return torch.addcmul(x, self.ffn(modulate(self.norm2(x), shift_ff, scale_ff)), gate_ff[:, None])
        x.add_(self.cross_attn(self.norm3(x), context, image_context, attention, context_bias))
        fc1, act, fc2 = self.ffn
        for rows in x.split(FFN_ROWS, dim=1):  # views: updated in place
            h = fc1(modulate(self.norm2(rows), shift_ff, scale_ff))
            h = torch.ops.aten.gelu_(h, approximate=act.approximate) if type(act) is nn.GELU else act(h)
            rows.addcmul_(fc2(h), gate_ff[:, None])
        return x


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e[:, None]).unbind(1)
        return self.head(modulate(self.norm(x), shift, scale)).float()


class ImageEmbedding(nn.Module):
    """CLIP tokens -> DiT width. flf2v adds a learned position for each of its 2 x 257 tokens."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.image_dim
        self.proj = nn.Sequential(LayerNorm32(d), Linear(d, d), nn.GELU(), Linear(d, cfg.dim), LayerNorm32(cfg.dim))
        if cfg.model_type == "flf2v":
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.flf2v_tokens, d))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):
            clip_fea = clip_fea.float() + self.emb_pos.float()
        return self.proj(clip_fea)


class WanDiT(nn.Module):
    # Parameters kept in float32 whatever dtype the rest loads in: the reference runs them under fp32 autocast.
    _keep_in_fp32_modules = (r"(time_embedding|time_projection|head)\..*", r".*modulation", r".*norm.*",
                             r"img_emb\.(emb_pos|proj\.[04]\..*)")
    # Linear layers fp8 quantisation leaves in their loaded precision (the peers keep the same ones).
    _skip_fp8_modules = (r"(patch_embedding|text_embedding|time_embedding|time_projection|head|img_emb)(\..*)?",
                         r".*norm.*", r".*modulation.*")
    _repeated_blocks = "blocks"  # the attribute holding the identical transformer blocks (compile, block swap)
    _fp16_guarded_modules = ("text_embedding", "img_emb")  # watched by the fp16 guard, besides every block

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.model_type != "t2v":
            self.img_emb = ImageEmbedding(cfg)

    # -- the parts of the forward pass -------------------------------------------------------------
    def embed(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Noisy latents x [B, 16, F, H, W] (+ condition y [B, 20, F, H, W]) -> tokens [B, L, dim], grid."""
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != self.config.in_dim:
            raise ValueError(
                f"the DiT takes {self.config.in_dim} input channels ({self.config.model_type}), got {x.shape[1]}"
                + (" (i2v / flf2v need the 20-channel condition y)" if y is None and self.config.in_dim > x.shape[1] else "")
            )
        pt, ph, pw = self.config.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch size {self.config.patch_size}")
        w = self.patch_embedding.weight
        tokens = self.patch_embedding(x.to(w.dtype))  # [B, dim, f, h, w]
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2).float(), grid  # [B, L, dim]

    def time_embed(self, t: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B] in [0, 1000] -> e [B, dim] (head), e0 [B, 6, dim] (blocks), float32."""
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)
        e = self.time_embedding(sinusoidal_embedding(t, self.config.freq_dim)).float()
        return e, self.time_projection(e).float().unflatten(1, (6, self.config.dim))

    def embed_context(self, context: torch.Tensor, clip_fea: torch.Tensor | None = None):
        """Text [B, L, text_dim] -> [B, L, dim]; CLIP tokens [B, N, image_dim] -> [B, N, dim] or None.

        i2v takes any number of CLIP tokens (257 per image for ViT-H/14); flf2v exactly
        `flf2v_tokens`, the length of its position embedding."""
        image_context = None
        cfg = self.config
        if cfg.model_type != "t2v":
            if clip_fea is None:
                raise ValueError(f"a {cfg.model_type} DiT needs clip_fea [B, N, {cfg.image_dim}] (CLIP image tokens)")
            if cfg.model_type == "flf2v" and clip_fea.shape[1] != cfg.flf2v_tokens:
                raise ValueError(f"a flf2v DiT takes {cfg.flf2v_tokens} CLIP tokens, got {clip_fea.shape[1]}")
            image_context = self.img_emb(clip_fea)
        return self.text_embedding(context), image_context

    def rope(self, grid: tuple[int, int, int], device, offset=(0, 0, 0)):
        return rope_table(grid, self.config.head_dim, device, offset)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pt*ph*pw*C] -> [B, C, F, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, f, pt, h, ph, w, pw]
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    # -- the whole pass -----------------------------------------------------------------------------
    def block_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea=None, y=None,
                     attention: str = "sdpa", frame_offset: int = 0):
        """Embedded tokens [B, L, dim] and what every block sees (BlockInputs), for the forward's arguments;
        frame_offset: the RoPE position of the first latent frame (a context window placed in its video)."""
        tokens, grid = self.embed(x, y)
        e, e0 = self.time_embed(t, x.shape[0])
        bias = None
        if not kernel_may_run(attention, x.device):  # the zero padding as one key (exact; text_padding.py)
            context, bias = fold_padding(context)
        context, image_context = self.embed_context(context, clip_fea)
        rope = self.rope(grid, tokens.device, (frame_offset, 0, 0))
        return tokens, BlockInputs(e, e0, rope, context, image_context, grid, attention, bias)

    def run_blocks(self, tokens: torch.Tensor, inputs: BlockInputs, hooks=(), step=None) -> torch.Tensor:
        """The transformer blocks alone, with `hooks` composed around them: [B, L, dim] -> [B, L, dim] float32."""
        return run_hooked(self.blocks, tokens, inputs, hooks, step)

    def forward(self, x, t, context, clip_fea=None, y=None, hooks=(), step=None, attention="sdpa") -> torch.Tensor:
        """Flow prediction [B, 16, F, H, W] float32 for noisy latents x at timesteps t given the text context.

        hooks: BlockHooks (kinema/models/hooks.py: step caching, skip-layer guidance, ...) composed around
        the blocks, their state kept outside the model; step: the sampler's StepContext they read, or None.
        attention: the self- and cross-attention backend (kinema.ops.attention.resolve_backend's name).
        """
        offset = step.frame_offset if step is not None else 0
        tokens, inputs = self.block_inputs(x, t, context, clip_fea, y, attention, offset)
        tokens = self.run_blocks(tokens, inputs, hooks, step)
        return self.unpatchify(self.head(tokens, inputs.e), inputs.grid)

    @torch.no_grad()
    def init_weights(self) -> "WanDiT":
        """The reference initialisation, for training from scratch."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        # A zero head makes the untrained model predict zero velocity rather than noise.
        nn.init.zeros_(self.head.head.weight)
        return self
