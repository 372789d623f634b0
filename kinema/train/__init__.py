"""Training: data (the synthetic world or captioned videos), the trainers (VAE, DiT + umT5 + CLIP, LoRA), the loop and export."""
