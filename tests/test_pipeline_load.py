"""Pipeline.load: every option checked before a file is read, models read once and kept, records instead of patches."""

from __future__ import annotations

import pytest
import torch

import kinema
from kinema.demo import write_random_checkpoint
from kinema.errors import KinemaError
from kinema.loading import files
from kinema.models.dit import DiTConfig, WanDiT

PROMPT = "a red circle moving right on a black background"
KW = dict(size="48*32", frame_num=5, steps=2, progress=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load") / "Wan2.1-I2V-tiny"
    write_random_checkpoint(folder, model_type="i2v")
    return folder


@pytest.fixture
def reads(monkeypatch):
    """Every checkpoint file opened (TensorSource) and every .pth unpickled, in order."""
    seen = []
    real_init, real_load = files.TensorSource.__init__, torch.load

    def init(self, paths, *a, **k):
        seen.append(("open", [p.name for p in paths]))
        real_init(self, paths, *a, **k)

    def load(path, *a, **k):
        seen.append(("torch.load", str(path)))
        return real_load(path, *a, **k)

    monkeypatch.setattr(files.TensorSource, "__init__", init)
    monkeypatch.setattr(torch, "load", load)
    return seen


def test_loaded_models_stay_and_calls_read_nothing(ckpt, reads):
    pipe = kinema.Pipeline.load(ckpt)
    opened = list(reads)
    assert [r for r in opened if r[0] == "open" and "diffusion_pytorch_model.safetensors" in r[1]] == [
        ("open", ["diffusion_pytorch_model.safetensors"])]  # the DiT's header opened once
    image = torch.zeros(3, 32, 48)
    first = pipe(PROMPT, task="i2v", image=image, **KW)
    second = pipe(PROMPT, task="i2v", image=image, **KW)
    assert reads == opened  # no file opened again by either call
    assert torch.equal(first.latents, second.latents)
    m = pipe.models
    assert m.info.tasks == () and m.quantization is None and m.fp16_guard is None and m.placement is None
    assert not any(hasattr(m.dit, a) for a in ("tasks", "sample_defaults", "fp16_guard", "block_placement", "compiled"))
    assert pipe.runtime.device == torch.device("cpu") and pipe.runtime.dtype == torch.float32
    assert pipe.runtime.attention == "sdpa" and not pipe.runtime.offload


def test_the_records_hold_what_the_loader_learnt(ckpt):
    pipe = kinema.Pipeline.load(ckpt, dtype="fp16", quantization="fp8_e4m3fn_scaled", blocks_to_swap=1)
    m = pipe.models
    assert m.quantization == "fp8_e4m3fn_scaled" and m.fp16_guard is not None and m.fp16_guard.recomputed == 0
    assert m.placement is not None and m.placement.stats.fetches >= 1
    out = pipe(PROMPT, task="i2v", image=torch.zeros(3, 32, 48), decode=False, **KW)
    assert out.settings["quantization"] == "fp8_e4m3fn_scaled" and torch.isfinite(out.latents).all()


def _lora_for_another_model(path):
    from kinema.lora import inject_lora, lora_state_dict, save_lora

    other = WanDiT(DiTConfig("t2v", dim=64, ffn_dim=96, text_dim=64, num_heads=2, num_layers=2))
    inject_lora(other, rank=2)
    save_lora(path, lora_state_dict(other))
    return path


@pytest.mark.parametrize("kwargs, message", [
    ({"ckpt": "nowhere"}, "ckpt nowhere is not a folder"),
    ({"dit": "x.safetensors"}, "incomplete checkpoint: pass ckpt, or all of dit, vae, t5"),
    ({"dtype": "fp64"}, "dtype 'fp64' is not one of auto, fp32, bf16, fp16"),
    ({"device": "tpu"}, "device 'tpu'"),
    ({"quantization": "int4"}, "quantization 'int4' is not an fp8 mode"),
    ({"attention": "xformers"}, "attention backend 'xformers' is unknown"),
    ({"blocks_to_swap": -2}, "blocks_to_swap -2 must be a whole number >= 0"),
    ({"prefetch_blocks": 2}, "prefetch_blocks 2 needs blocks_to_swap N"),
    ({"stream_dit": True, "blocks_to_swap": 1}, "stream_dit and blocks_to_swap both place"),
    ({"fp8_fast": True}, "fp8_fast runs fp8 layers' matmuls in fp8; add quantization"),
    ({"compile": "turbo"}, "compile mode 'turbo' is unknown"),
    ({"loras": [("missing.safetensors", 1.0)]}, "LoRA file missing.safetensors not found"),
    ({"loras": [("x", float("inf"))]}, "must be a finite number"),
])
def test_bad_options_fail_before_any_file_is_read(reads, kwargs, message):
    with pytest.raises(KinemaError, match=None) as err:
        kinema.Pipeline.load(**kwargs)
    assert message in str(err.value) and reads == []


def test_checkpoint_errors_read_nothing_twice(ckpt, tmp_path, reads):
    lora = _lora_for_another_model(tmp_path / "other.safetensors")
    with pytest.raises(KinemaError, match="the LoRA was made for another model|trained for a different model size"):
        kinema.Pipeline.load(ckpt, loras=[(lora, 1.0)])
    dit_opens = [r for r in reads if r[0] == "open" and "diffusion_pytorch_model.safetensors" in r[1]]
    assert len(dit_opens) == 1
    assert not any(r[0] == "torch.load" for r in reads)  # refused before umT5 (a .pth here) or any weight was read
    with pytest.raises(KinemaError, match="blocks_to_swap 9 is out of range: this DiT has 2 blocks"):
        kinema.Pipeline.load(ckpt, blocks_to_swap=9)


def test_an_image_task_without_clip_is_refused_before_it_runs(tmp_path):
    write_random_checkpoint(tmp_path / "t2v")
    pipe = kinema.Pipeline.load(tmp_path / "t2v")
    assert pipe.models.clip is None
    with pytest.raises(KinemaError, match="task i2v needs a i2v DiT"):
        pipe(PROMPT, task="i2v", image=torch.zeros(3, 8, 8), **KW)
