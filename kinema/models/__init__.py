"""The models as pure nn.Modules (DiT, VAE, umT5, CLIP), their layers and the block hooks a sampler composes around them."""
