"""Record the golden runs of the built-in model (tests/golden/builtin_cases.py) into builtin.npz.

    python tests/golden/record_builtin.py            # refuses to replace an existing record
    python tests/golden/record_builtin.py --force    # a new record, e.g. after the built-in model changed

The first record was made before kinema.Pipeline existed, by this script's first version (git
history), which assembled the models as `kinema generate` did then and called its `generate`; the
Pipeline reproduced it bit for bit (up to commit 56fbae1). When the built-in model was retrained
(session 10: a new VAE and DiT) the record was made anew with this script, through the Pipeline:
from then on the goldens hold the engine to its own numbers, case by case.
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


def run_case(case: Case, pipelines: dict | None = None):
    """(latents [16, T, h, w], frames uint8 [F, H, W, 3]) of one case, through kinema.Pipeline. `pipelines`
    caches one pipeline per set of loading options."""
    import kinema

    load = dict(case.load)
    if "lora_strength" in load:
        load["loras"] = [(str(LORA), load.pop("lora_strength"))]
    key = repr(sorted(load.items()))
    pipelines = {} if pipelines is None else pipelines
    if key not in pipelines:
        pipelines[key] = kinema.Pipeline.load(attention="sdpa", **load)
    given = inputs(case)
    prompt = given.pop("prompt")
    result = pipelines[key](prompt, task=case.task, seed=case.seed, progress=False, **given, **case.options)
    return result.latents, result.frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="replace an existing record")
    args = ap.parse_args()
    if DATA.exists() and not args.force:
        sys.exit(f"{DATA} exists; pass --force to record anew")
    if not LORA.exists():
        make_lora(LORA)
    torch.manual_seed(0)
    arrays, pipelines = {}, {}
    for case in CASES:
        latents, frames = run_case(case, pipelines)
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
