"""Telling which Wan2.1 component a checkpoint holds, from its key names alone.

Used by every loader to refuse a file of the wrong kind (a VAE passed as the
DiT) with a message that says which loader the file belongs to.
"""

from __future__ import annotations

# Key fragments that only one component's checkpoints contain, in any supported format.
_SIGNATURES = {
    "dit": ("patch_embedding.weight", "condition_embedder.time_embedder", "time_embedding.0.weight"),
    "vae": ("decoder.conv1.weight", "decoder.conv_in.weight", "encoder.conv1.weight", "encoder.conv_in.weight"),
    "t5": ("token_embedding.weight", "shared.weight", "encoder.block.0.layer.0.SelfAttention", "blocks.0.attn.q.weight"),
    "clip": ("visual.transformer", "vision_model.encoder", "visual.conv1.weight"),
}

NAMES = {
    "dit": ("diffusion transformer (DiT)", "kinema.load_dit / --dit"),
    "vae": ("VAE", "kinema.load_vae / --vae"),
    "t5": ("umT5 text encoder", "kinema.load_text_encoder / --t5"),
    "clip": ("CLIP vision encoder", "kinema.load_clip_vision / --clip"),
}


def identify(keys) -> str | None:
    """'dit', 'vae', 't5', 'clip', or None when the keys match no component."""
    keys = list(keys)
    scores = {}
    for component, fragments in _SIGNATURES.items():
        scores[component] = sum(1 for k in keys if any(f in k for f in fragments))
    # The CLIP files of the official release also hold a text tower; the vision keys decide.
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def wrong_component_message(path: str, found: str | None, wanted: str) -> str:
    want_name, _ = NAMES[wanted]
    if found is None:
        return (
            f"{path} does not look like a {want_name} checkpoint (no key matches any Wan2.1 component). "
            "Check that the path points to the right file."
        )
    found_name, found_loader = NAMES[found]
    return (
        f"{path} holds a {found_name}, not a {want_name}. Load it with {found_loader}, "
        f"and pass a {want_name} checkpoint here."
    )
