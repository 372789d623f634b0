"""Writing trained components in the layout the loaders read (a diffusers-style pipeline folder:
`transformer/`, `vae/`, `text_encoder/` + `tokenizer/`, `image_encoder/`), in fp16 or bf16 safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_component(folder: Path, filename: str, state: dict, config: dict | None = None,
                   dtype: torch.dtype = torch.float32, keep_fp32=lambda key: False) -> Path:
    """Save one component's weights (atomically) and its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if keep_fp32(k) or not v.is_floating_point() else v.to(dtype)).detach().cpu().contiguous()
               for k, v in state.items()}
    path = folder / filename
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", "producer": "kinema.train"})
    os.replace(tmp, path)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return path
