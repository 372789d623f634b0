"""Record the golden runs of the built-in model (tests/golden/builtin_cases.py) into builtin.npz.

    python tests/golden/record_builtin.py            # refuses to replace an existing record
    python tests/golden/record_builtin.py --force    # a new record, e.g. after the built-in model changed

This first version drives the engine as `kinema generate` did before the Pipeline existed
(models assembled as cmd_generate assembled them, then `generate`), so the record is the
numbers of the code before the refactor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from builtin_cases import CASES, DATA, LORA, Case, inputs, machine  # noqa: E402


def make_lora(path: Path) -> None:
    """A rank-4 LoRA with random A and B on every default target of the built-in DiT (fixed seed)."""
    import kinema
    from kinema.builtin import builtin_path
    from kinema.lora import inject_lora, lora_state_dict, save_lora

    dit = kinema.load_dit(builtin_path())
    g = torch.Generator().manual_seed(1234)
    adapters = inject_lora(dit, rank=4, alpha=4.0)
    with torch.no_grad():
        for a in adapters.values():
            a.A.copy_(torch.randn(a.A.shape, generator=g) * 0.05)
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.05)
    save_lora(path, lora_state_dict(dit), metadata={"what": "Kinema golden-test LoRA (random)"})


def run_case(case: Case) -> tuple[torch.Tensor, np.ndarray]:
    import kinema
    from kinema.builtin import builtin_path
    from kinema.lora import apply_loras
    from kinema.media import to_model_range, to_uint8_frames
    from kinema.memory.block_swap import BlockSwap
    from kinema.pipeline.generate import Models, generate
    from kinema.sampling.cache import parse_cache

    path = builtin_path()
    dit = kinema.load_dit(path, quantization=case.load.get("quantization"))
    if "lora_strength" in case.load:
        apply_loras(dit, [(str(LORA), case.load["lora_strength"])])
    if case.load.get("blocks_to_swap"):
        BlockSwap(dit, case.load["blocks_to_swap"], 1, device="cpu")
    models = Models(dit, kinema.load_vae(path), kinema.load_text_encoder(path), kinema.load_clip_vision(path))
    given = inputs(case)
    media = {k: to_model_range(torch.from_numpy(np.ascontiguousarray(v))) for k, v in given.items() if k != "prompt"}
    media = {k: (v if k == "video" else v[:, 0]) for k, v in media.items()}
    opts = dict(case.options)
    if "cache" in opts:
        opts["cache"] = parse_cache(opts["cache"])
    out = generate(models, case.task, prompt=given["prompt"], seed=case.seed, attention="sdpa", progress=False,
                   **media, **opts)
    return out["latents"], to_uint8_frames(out["video"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="replace an existing record")
    args = ap.parse_args()
    if DATA.exists() and not args.force:
        sys.exit(f"{DATA} exists; pass --force to record anew")
    if not LORA.exists():
        make_lora(LORA)
    torch.manual_seed(0)
    arrays = {}
    for case in CASES:
        latents, frames = run_case(case)
        arrays[f"{case.name}/latents"] = latents.numpy()
        arrays[f"{case.name}/frames"] = frames
        print(f"{case.name}: latents {tuple(latents.shape)}, frames {frames.shape}")
    arrays["machine"] = np.array(json.dumps({"machine": machine()}))
    tmp = DATA.with_name(".builtin.partial.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(DATA)
    print(f"wrote {DATA} ({DATA.stat().st_size / 1024:.0f} KiB) on {machine()}")


if __name__ == "__main__":
    main()
