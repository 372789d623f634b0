"""Memory and speed around unchanged models: offload, block swap, streaming, tiled VAE, compile, the memory plan (one file per idea)."""
