"""Encoders around the models: prompts -> umT5 embeddings (`text`), images -> CLIP tokens with the reference preprocessing (`image`)."""
