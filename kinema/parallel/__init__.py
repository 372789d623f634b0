"""One job on many processes: sequence parallel (Ulysses, ring), CFG parallel, FSDP, a parallel VAE decode.

mesh.py lays out the ranks and their process groups; ulysses.py and ring.py are the two ways to
attend over a split sequence; sequence.py splits the DiT's tokens from outside (a block hook and an
attention backend); cfg.py is a guidance strategy across rank groups; fsdp.py shards umT5 and the
DiT while loading them; vae.py shares the decode's tiles. README, "Many GPUs and many machines".
"""
