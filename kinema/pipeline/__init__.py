"""The engine: `Pipeline` (load once, generate many) and the stages it composes (settings, prompts, condition, latents, sample, decode)."""
