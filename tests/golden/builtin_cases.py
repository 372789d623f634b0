"""The golden runs of the built-in model: what each case asks for, independent of the engine's API.

`record_builtin.py` runs every case and stores its final latents and decoded frames in
`builtin.npz`; tests/test_golden.py runs them again and compares. Inputs are rendered from the
synthetic world (kinema.toy.world), so no media file is needed.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "builtin.npz"
LORA = HERE / "lora.safetensors"  # a fixed random rank-4 LoRA on the built-in DiT (record_builtin.make_lora)

PROMPT = "a red circle moving right on a black background"


@dataclass(frozen=True)
class Case:
    name: str
    task: str = "t2v"
    prompt: str = PROMPT
    seed: int = 1
    options: dict = field(default_factory=dict)  # engine options: cache, vae_tile, batched_cfg, denoise
    load: dict = field(default_factory=dict)  # loading options: quantization, blocks_to_swap, loras (strength)


CASES = [
    Case("t2v"),
    Case("t2i", "t2i", "a yellow triangle moving down on a black background", seed=2),
    Case("i2v", "i2v", seed=3),
    Case("flf2v", "flf2v", seed=4),
    Case("v2v", "v2v", seed=5, options={"denoise": 0.7}),
    Case("t2v-teacache", options={"cache": "teacache:0.1"}),
    Case("t2v-magcache", options={"cache": "magcache:0.1:2"}),
    Case("t2v-lora", load={"lora_strength": 0.8}),
    Case("t2v-vae-tile", options={"vae_tile": "32x32"}),
    Case("t2v-block-swap", load={"blocks_to_swap": 2}),
    Case("t2v-fp8", load={"quantization": "fp8_e4m3fn_scaled"}),
    Case("t2v-batched-cfg", options={"batched_cfg": True}),
]


def world_clip(index: int, width: int = 64, height: int = 64) -> tuple[str, np.ndarray]:
    """(caption, uint8 frames [17, H, W, 3]) of a clip of the evaluation-free golden world."""
    from kinema.toy import world

    spec = world.random_spec(world.clip_rng(7001, index))
    return spec.caption, world.render(spec, width, height)


def inputs(case: Case) -> dict:
    """The case's prompt and media as uint8 numpy arrays: image / first_frame / last_frame [H, W, 3], video [F, H, W, 3].
    The flf2v last frame is 80x72, so the official fit (scale to cover, centre-crop) is exercised."""
    if case.task == "i2v":
        caption, clip = world_clip(0)
        return {"prompt": caption, "image": clip[0]}
    if case.task == "flf2v":
        caption, clip = world_clip(1)
        _, other = world_clip(1, 80, 72)
        return {"prompt": caption, "first_frame": clip[0], "last_frame": other[-1]}
    if case.task == "v2v":
        caption, clip = world_clip(2)
        return {"prompt": caption, "video": clip}
    return {"prompt": case.prompt}


def machine() -> str:
    """What decides the last bits of a CPU run: PyTorch, its kernels' instruction set, the CPU and the threads."""
    import torch

    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        flags = ",".join(sorted(f for f in found if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "f16c")))
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return (f"torch {torch.__version__}; {torch.backends.cpu.get_cpu_capability()}; {model}; {flags}; "
            f"threads {torch.get_num_threads()}")
