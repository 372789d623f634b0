"""Memory and speed: precision, fp8 weights, offload, block swap, tiled VAE, caching, compile (one file per idea)."""
