"""Checkpoints -> models: every file layout (official, ComfyUI, diffusers, sharded, fp8) read tensor by tensor onto meta-built models."""
