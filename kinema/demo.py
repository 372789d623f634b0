"""`make demo`: the whole Wan2.1 stack end to end, on a tiny random-weight checkpoint.

Until the built-in trained model ships, this is the smallest honest end-to-end
run: it writes a small Wan2.1-architecture checkpoint set with random weights
in the official folder layout (DiT, umT5, VAE and a sentencepiece tokenizer),
loads every part back through the public loaders and generates a short clip with
the t2v pipeline (prompt encoding, classifier-free guidance, UniPC sampling, VAE decode). The
weights are untrained, so the frames are structured noise; what the demo shows
is that every component loads and runs, with shapes and timings.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch

PROMPT = "a red circle moving right on a black background"


def write_random_checkpoint(folder: Path, seed: int = 0, model_type: str = "t2v") -> None:
    """A tiny random Wan2.1 set in the official layout: t2v, or i2v / flf2v with a CLIP file."""
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
    cfg = DiTConfig(model_type, in_dim=36 if image else 16, dim=128, ffn_dim=256, text_dim=64, num_heads=2, num_layers=2, image_dim=64)
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--output_dir", default="outputs/demo")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import kinema
    from PIL import Image

    out = Path(args.output_dir)
    ckpt = out / "random-wan2.1"
    start = time.perf_counter()
    if not (ckpt / "Wan2.1_VAE.pth").exists():
        print(f"writing a tiny random-weight Wan2.1 checkpoint set to {ckpt}")
        write_random_checkpoint(ckpt, args.seed)
    te = kinema.load_text_encoder(ckpt)
    dit = kinema.load_dit(ckpt)
    vae = kinema.load_vae(ckpt)
    print(f"loaded umT5 {sum(p.numel() for p in te.model.parameters()):,} params, "
          f"DiT {sum(p.numel() for p in dit.parameters()):,} params ({dit.config.model_type}), "
          f"VAE {sum(p.numel() for p in vae.parameters()):,} params in {time.perf_counter() - start:.1f}s")

    from kinema.pipeline.generate import Models, generate

    t0 = time.perf_counter()
    result = generate(Models(dit, vae, te), "t2v", prompt=args.prompt, size=(64, 64), frame_num=17,
                   steps=args.steps, seed=args.seed, progress=True)
    video = result["video"]  # [3, F, H, W] in [-1, 1]
    print(f"sampled {args.steps} steps and decoded {video.shape[1]} frames of 64x64 in {time.perf_counter() - t0:.1f}s")

    pixels = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    images = [Image.fromarray(f) for f in pixels]
    path = out / "demo.gif"
    images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)
    print(f"saved {path} ({len(images)} frames). The weights are random: expect noise until the built-in model ships.")


if __name__ == "__main__":
    main()
