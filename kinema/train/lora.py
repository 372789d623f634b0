"""`kinema train lora`: a LoRA on a trained Wan2.1 DiT (any checkpoint the loaders read), with the
DiT trainer's data, conditioning modes and flow-matching loss; only the adapters learn.

The result is one safetensors file in the key format other Wan tools load
(`diffusion_model.blocks.N.self_attn.q.lora_A.weight` / `lora_B` / `alpha`),
used with `kinema generate --lora FILE[:STRENGTH]`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from kinema.loading.dit import open_dit
from kinema.lora import inject_lora, lora_state_dict, save_lora
from kinema.train.dit import DiTTask, DiTTrainConfig


@dataclasses.dataclass
class LoRATrainConfig(DiTTrainConfig):
    output_dir: str = "runs/lora"
    base: str = "builtin"  # the model folder to adapt ("builtin": the model shipped with Kinema)
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("attn", "ffn")
    colors: tuple[str, ...] = ("orange",)
    pool_size: int = 400
    pool_frames: tuple[int, ...] = (17,)
    pool_frame_shares: tuple[float, ...] = (1.0,)
    lr: float = 1e-3
    ema: float = 0.0
    steps: int = 300
    warmup_steps: int = 20
    weight_decay: float = 0.0


def resolve_base(base: str) -> str:
    if base == "builtin":
        from kinema.builtin import builtin_path

        return str(builtin_path())
    return base


class LoRATask(DiTTask):
    name = "lora"

    def build_models(self, out: Path) -> None:
        import kinema

        cfg, device = self.cfg, self.device
        base = self.vae_source()
        self.vae = kinema.load_vae(base, device=device)
        te = kinema.load_text_encoder(base, device=device)
        self.t5, self.tokenizer = te.model, te.tokenizer
        self.clip = kinema.load_clip_vision(base, device=device).model
        loaded = open_dit(base).load(device=device)
        self.dit, self.info = loaded.model, loaded.info  # samples use the base model's own tasks and defaults
        for m in (self.vae, self.t5, self.clip, self.dit):
            m.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.adapters = nn.ModuleDict({name.replace(".", "__"): a for name, a in
                                       inject_lora(self.dit, cfg.rank, cfg.alpha, cfg.targets).items()})

    def vae_source(self) -> str:
        return resolve_base(self.cfg.base)  # the LoRA trains on the base model's own latents

    def sample_defaults(self) -> dict:
        return dict(self.info.sample_defaults)

    def modules(self):
        return {"lora": self.adapters}

    def trainable(self):
        return list(self.adapters.parameters())

    def export(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        save_lora(folder / "lora.safetensors", lora_state_dict(self.dit), alpha=cfg.alpha, rank=cfg.rank, overwrite=True,
                  metadata={"base": cfg.base, "producer": "kinema train lora",
                            "config": json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()}, default=list)})
