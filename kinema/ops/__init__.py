"""Ops the models are made of: the one attention entry point and its backends, RoPE, fp8 Linear layers, the fp16 overflow guard."""
