"""`make demo`: a video from the built-in model (kinema/builtin), through kinema.Pipeline, the engine
the CLI uses.

`write_random_checkpoint` writes a tiny random-weight Wan2.1 set in the official
folder layout (DiT, umT5 + sentencepiece tokenizer, VAE, CLIP for i2v / flf2v);
the tests and the README's Python example use it.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch

PROMPT = "a red circle moving right on a black background"


def write_random_checkpoint(folder: Path, seed: int = 0, model_type: str = "t2v", num_heads: int = 2) -> None:
    """A tiny random Wan2.1 set in the official layout: t2v, or i2v / flf2v with a CLIP file; `num_heads` DiT heads
    (the sequence-parallel tests need 4, to split them 4 ways)."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    from kinema.models.dit import DiTConfig, WanDiT
    from kinema.models.t5 import UMT5Encoder
    from kinema.models.vae import WanVAE

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = "a an the red green blue yellow white purple circle square triangle moving left right up down on black gray background"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([words] * 50), model_writer=buf, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    (folder / "google" / "umt5-xxl").mkdir(parents=True, exist_ok=True)
    (folder / "google" / "umt5-xxl" / "spiece.model").write_bytes(buf.getvalue())

    t5 = UMT5Encoder(vocab_size=64, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
    torch.save(t5.state_dict(), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    image = model_type != "t2v"
    cfg = DiTConfig(model_type, in_dim=36 if image else 16, dim=128, ffn_dim=256, text_dim=64, num_heads=num_heads, num_layers=2, image_dim=64)
    save_file({k: v.contiguous() for k, v in WanDiT(cfg).state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": model_type, "dim": cfg.dim, "num_heads": cfg.num_heads}))
    if image:
        from kinema.loading.clip import WAN_CLIP_FILE
        from kinema.models.clip import ClipVisionConfig, CLIPVisionTower

        layers = 3
        tower = CLIPVisionTower(ClipVisionConfig(dim=64, mlp_dim=128, num_heads=1, num_layers=layers))
        state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
        # The module omits the last block (Wan uses the penultimate output); a real file has it.
        state.update({k.replace("visual.transformer.0.", f"visual.transformer.{layers - 1}."): v.clone()
                      for k, v in state.items() if k.startswith("visual.transformer.0.")})
        torch.save(state, folder / WAN_CLIP_FILE)
    torch.save(WanVAE(dim=16, dim_mult=(1, 2, 2, 2)).state_dict(), folder / "Wan2.1_VAE.pth")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="make demo: a video from the built-in model")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--output_dir", default="outputs/demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import kinema

    start = time.perf_counter()
    pipe = kinema.Pipeline.load()  # the built-in model
    m = pipe.models
    print(f"loaded the built-in model: DiT {sum(p.numel() for p in m.dit.parameters()):,} params, "
          f"VAE {sum(p.numel() for p in m.vae.parameters()):,}, umT5 {sum(p.numel() for p in m.text_encoder.model.parameters()):,} "
          f"in {time.perf_counter() - start:.1f}s")
    t0 = time.perf_counter()
    result = pipe(args.prompt, seed=args.seed)
    s = result.settings
    print(f"generated {s['frame_num']} frames of {s['width']}x{s['height']} ({s['steps']} steps) in {time.perf_counter() - t0:.1f}s")
    for fmt in ("h264-mp4", "gif"):
        print(f"saved {result.save(Path(args.output_dir), format=fmt, filename_prefix='demo')}")
    print(f"prompt: {args.prompt!r}; try your own: .venv/bin/kinema generate --prompt \"a blue square moving up on a white background\"")


if __name__ == "__main__":
    main()
