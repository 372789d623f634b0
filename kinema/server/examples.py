"""A ComfyUI core-node t2v prompt (API format) on the built-in model: what the README's client example,
the server test and bench/server.py post."""

from __future__ import annotations


def t2v_prompt(text: str = "a red circle moving right on a black background", negative: str = "", *, width: int = 64,
               height: int = 64, length: int = 9, steps: int = 4, seed: int = 0, cfg: float = 4.0, shift: float = 3.0,
               sampler: str = "euler", fps: float = 8.0, prefix: str = "kinema_t2v") -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "kinema_builtin_dit.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "kinema_builtin_umt5.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "kinema_builtin_vae.safetensors"}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": shift}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["2", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["2", 0]}},
        "7": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": width, "height": height, "length": length,
                                                                  "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": sampler, "scheduler": "simple", "positive": ["5", 0],
                                                   "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["9", 0], "filename_prefix": prefix, "fps": fps,
                                                            "lossless": True, "quality": 90, "method": "default"}},
    }
