"""LoRA: adapters for training, merging for inference, the file layouts other tools write, and `--lora`."""

import copy
import re

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

from kinema.errors import CheckpointError, KinemaError
from kinema.lora import (
    apply_loras, inject_lora, load_lora, lora_metadata, lora_parameters, lora_state_dict, merge_lora,
    parse_lora_spec, remove_lora, save_lora,
)
from kinema.models.dit import DiTConfig, WanDiT


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is fastest, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dit(model_type="t2v", dim=128, seed=0):
    torch.manual_seed(seed)
    cfg = DiTConfig(model_type, in_dim=16 if model_type == "t2v" else 36, dim=dim, ffn_dim=256, text_dim=64,
                    num_heads=2, num_layers=2, image_dim=64)
    return WanDiT(cfg).eval()


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    inp = dict(x=torch.randn(1, 16, 2, 4, 4, generator=g), t=torch.tensor([500.0]),
               context=torch.randn(1, 5, 64, generator=g))
    if model.config.model_type != "t2v":
        inp["y"] = torch.randn(1, 20, 2, 4, 4, generator=g)
        inp["clip_fea"] = torch.randn(1, 257, 64, generator=g)
    return inp


def _randomize(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _trained(model_type="t2v", targets=("attn", "ffn"), rank=4, alpha=8.0):
    """(base model, copy with random LoRA adapters injected)."""
    base = _dit(model_type)
    injected = copy.deepcopy(base)
    inject_lora(injected, rank, alpha, targets)
    _randomize(injected)
    return base, injected


def _run(model):
    with torch.no_grad():
        return model(**_inputs(model))


def test_fresh_adapter_changes_nothing_and_keeps_state_dict():
    base = _dit()
    model = copy.deepcopy(base)
    keys = list(model.state_dict())
    adapters = inject_lora(model, rank=4)
    assert len(adapters) == 2 * 10 and "blocks.1.ffn.2" in adapters
    assert torch.equal(_run(model), _run(base))
    assert list(model.state_dict()) == keys  # no LoRA keys, official names kept
    model.load_state_dict(base.state_dict())  # strict: adapters are not expected
    assert remove_lora(model) and list(model.state_dict()) == keys and not lora_parameters(model)


def test_injected_forward_equals_merged_weights():
    base, injected = _trained()
    assert not torch.equal(_run(injected), _run(base))
    changed = merge_lora(base, lora_state_dict(injected), 1.0)
    assert len(changed) == 20
    assert rel_err(_run(base), _run(injected)) < 1e-5


def test_save_load_merge_round_trip(tmp_path):
    base, injected = _trained(rank=4, alpha=8.0)
    path = save_lora(tmp_path / "style.safetensors", lora_state_dict(injected), alpha=8.0, rank=4,
                     metadata={"base_model": "tiny t2v", "training": {"lr": 1e-4, "steps": 10}})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("diffusion_model.blocks.0.self_attn.q.lora_A.weight").shape) == (4, 128)
        assert tuple(f.get_tensor("diffusion_model.blocks.0.ffn.0.lora_B.weight").shape) == (256, 4)
        assert f.get_tensor("diffusion_model.blocks.0.ffn.0.alpha").item() == 8.0
    assert len(keys) == 20 * 3
    meta = lora_metadata(path)
    assert meta["rank"] == "4" and meta["alpha"] == "8" and meta["base_model"] == "tiny t2v"
    assert meta["training"] == '{"lr": 0.0001, "steps": 10}'
    merge_lora(base, load_lora(path, base), 1.0)
    assert rel_err(_run(base), _run(injected)) < 1e-5


_DIFFUSERS = [("self_attn.o", "attn1.to_out.0"), ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.k_img", "attn2.add_k_proj"),
              ("cross_attn.v_img", "attn2.add_v_proj"), ("self_attn.", "attn1.to_"), ("cross_attn.", "attn2.to_"),
              ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]


def _diffusers_name(name):
    for ours, theirs in _DIFFUSERS:
        if ours in name:
            return name.replace(ours, theirs)
    raise AssertionError(name)


def test_every_key_layout_merges_alike(tmp_path):
    base, injected = _trained("i2v", targets=("all",), rank=4, alpha=2.0)
    state = lora_state_dict(injected)
    assert "blocks.1.cross_attn.v_img" in state
    layouts = {
        "ours": {f"diffusion_model.{n}.lora_{s}.weight": t for n, (a, b, _) in state.items() for s, t in (("A", a), ("B", b))}
        | {f"diffusion_model.{n}.alpha": torch.tensor(al) for n, (_, _, al) in state.items()},
        "bare_down_up": {f"{n}.lora_{s}.weight": t for n, (a, b, _) in state.items() for s, t in (("down", a), ("up", b))}
        | {f"{n}.alpha": torch.tensor(al) for n, (_, _, al) in state.items()},
        # diffusers files carry no alpha (alpha = rank): fold alpha / rank into B.
        "diffusers": {f"transformer.{_diffusers_name(n)}.lora_{s}.weight": t
                      for n, (a, b, al) in state.items() for s, t in (("A", a), ("B", b * al / a.shape[0]))},
        "kohya": {f"lora_unet_{n.replace('.', '_')}.lora_{s}.weight": t for n, (a, b, _) in state.items()
                  for s, t in (("down", a), ("up", b))} | {f"lora_unet_{n.replace('.', '_')}.alpha": torch.tensor(al)
                                                            for n, (_, _, al) in state.items()},
    }
    expected = copy.deepcopy(base)
    merge_lora(expected, state, 1.0)
    for layout, tensors in layouts.items():
        path = tmp_path / f"{layout}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        loaded = load_lora(path, base)
        assert sorted(loaded) == sorted(state), layout
        if layout == "kohya":  # without a model, names are matched against a Wan2.1 DiT's
            assert sorted(load_lora(path)) == sorted(state)
        model = copy.deepcopy(base)
        merge_lora(model, loaded, 1.0)
        for k, v in expected.state_dict().items():
            assert torch.allclose(model.state_dict()[k], v, atol=1e-6), (layout, k)


def test_strength_scales_the_delta():
    base, injected = _trained()
    state = lora_state_dict(injected)
    w0 = base.blocks[0].self_attn.q.weight.clone()
    assert merge_lora(base, state, 0.0) == [] and torch.equal(base.blocks[0].self_attn.q.weight, w0)
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    merge_lora(one, state, 1.0)
    merge_lora(two, state, 2.0)
    d1, d2 = one.blocks[0].self_attn.q.weight - w0, two.blocks[0].self_attn.q.weight - w0
    assert d1.abs().max() > 1e-4 and torch.allclose(d2, 2 * d1, atol=1e-6)


def test_merge_keeps_weight_dtype():
    base, injected = _trained()
    base.to(torch.bfloat16)
    merge_lora(base, lora_state_dict(injected), 1.0)
    assert base.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert rel_err(_run(base), _run(injected)) < 0.05  # bf16 weights: close, not equal


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert re.search(match, str(info.value)), str(info.value)
    return str(info.value)


def test_errors_name_the_key_and_change_nothing(tmp_path):
    t2v = _dit()
    before = {k: v.clone() for k, v in t2v.state_dict().items()}
    _, i2v = _trained("i2v", targets=("cross_attn",))
    save_lora(tmp_path / "i2v.safetensors", lora_state_dict(i2v))
    _, t2v_lora = _trained()
    save_lora(tmp_path / "good.safetensors", lora_state_dict(t2v_lora))
    # A good LoRA then a bad one: nothing is applied.
    _raises(CheckpointError, r"'diffusion_model\.blocks\.0\.cross_attn\.k_img\.lora_A\.weight'.*does not exist",
            apply_loras, t2v, [(tmp_path / "good.safetensors", 1.0), (tmp_path / "i2v.safetensors", 1.0)])
    small = _dit(dim=64)
    inject_lora(small, 4)
    save_lora(tmp_path / "small.safetensors", lora_state_dict(small))
    _raises(CheckpointError, r"key 'diffusion_model\.blocks\.0\.\w+\.\w+\.lora_A\.weight' makes a \[64, 64\] update but the model's "
                  r"'blocks\.0\.\w+\.\w+\.weight' is \[128, 128\]: the LoRA was trained for a different model size",
                  apply_loras, t2v, [(tmp_path / "small.safetensors", 1.0)])
    save_file({k: v.contiguous() for k, v in t2v.state_dict().items()}, str(tmp_path / "full.safetensors"))
    _raises(CheckpointError, "holds no LoRA weights", load_lora, tmp_path / "full.safetensors")
    _raises(CheckpointError, "not found.*nope.safetensors", load_lora, tmp_path / "nope.safetensors")
    (tmp_path / "text.safetensors").write_text("not a safetensors file at all")
    _raises(CheckpointError, "text.safetensors is not a readable safetensors file", load_lora, tmp_path / "text.safetensors")
    half = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 128)}
    save_file(half, str(tmp_path / "half.safetensors"))
    _raises(CheckpointError, "self_attn.q.lora_A.weight' has no matching lora_B", load_lora, tmp_path / "half.safetensors")
    for k, v in t2v.state_dict().items():
        assert torch.equal(v, before[k]), k
    (tmp_path / "keep.safetensors").write_bytes(b"keep me")
    _raises(KinemaError, "keep.safetensors already exists", save_lora, tmp_path / "keep.safetensors", lora_state_dict(small))
    assert (tmp_path / "keep.safetensors").read_bytes() == b"keep me"
    save_lora(tmp_path / "keep.safetensors", lora_state_dict(small), overwrite=True)
    assert len(load_lora(tmp_path / "keep.safetensors")) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    _raises(KinemaError, "'ffn.9' matches no Linear", inject_lora, _dit(), 4, targets=("attn", "ffn.9"))


def test_training_updates_only_lora_weights():
    model = _dit()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, rank=4, alpha=4, dropout=0.1)
    params = lora_parameters(model)
    assert all(p.requires_grad for p in params)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    for _ in range(2):  # B starts at zero, so A only gets a gradient from the second step on
        opt.zero_grad()
        model(**_inputs(model)).pow(2).mean().backward()
        opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora." not in n)
    assert all(not torch.equal(p, s) for p, s in zip(params, start))
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_parse_lora_spec(tmp_path):
    plain = tmp_path / "style.safetensors"
    plain.write_bytes(b"x")
    odd = tmp_path / "C:odd.safetensors"  # a ':' in the path itself
    odd.write_bytes(b"x")
    assert parse_lora_spec(str(plain)) == (str(plain), 1.0)
    assert parse_lora_spec(f"{plain}:0.5") == (str(plain), 0.5)
    assert parse_lora_spec(f"{plain}:-1") == (str(plain), -1.0)
    assert parse_lora_spec(str(odd)) == (str(odd), 1.0)
    assert parse_lora_spec(f"{odd}:2") == (str(odd), 2.0)
    _raises(KinemaError, "strength 'strong' is not a number", parse_lora_spec, f"{plain}:strong")
    _raises(KinemaError, "finite", parse_lora_spec, f"{plain}:nan")
    _raises(KinemaError, "missing.safetensors not found", parse_lora_spec, str(tmp_path / "missing.safetensors:0.5"))


def test_cli_lora(tmp_path, capsys, caplog):
    import kinema
    from kinema.cli.main import main
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_metadata

    ckpt = tmp_path / "ckpt"
    write_random_checkpoint(ckpt)
    dit = kinema.load_dit(ckpt)
    inject_lora(dit, rank=2, targets=("self_attn",))
    _randomize(dit)
    with torch.no_grad():  # an update large enough to show in 8-bit pixels of this random model
        for p in lora_parameters(dit):
            p.mul_(4)
    lora = save_lora(tmp_path / "my lora.safetensors", lora_state_dict(dit), metadata={"base_model": "random"})
    gen = ["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--size", "32*32", "--frame_num", "1",
           "--sample_steps", "1", "--prompt", "a red circle", "--base_seed", "3"]
    out = tmp_path / "out.png"
    with caplog.at_level("INFO", logger="kinema"):
        assert main([*gen, "--lora", f"{lora}:0.5", "--save_file", str(out)]) == 0
    assert read_metadata(out)["loras"] == [[str(lora.resolve()), 0.5]]
    assert "Applied LoRA my lora.safetensors at strength 0.5: 8 layers" in caplog.text
    # The picture is the base model's with the LoRA merged at 0.5: the same as from a checkpoint holding those
    # weights, and not the base model's own.
    import shutil

    import numpy as np
    from PIL import Image

    merged = tmp_path / "merged"
    shutil.copytree(ckpt, merged)
    base = kinema.load_dit(ckpt)
    merge_lora(base, load_lora(lora, base), 0.5)
    dit_file = merged / "diffusion_pytorch_model.safetensors"
    stored = load_file(str(dit_file))  # kept in the file's own dtypes
    save_file({k: v.to(stored[k].dtype).contiguous() for k, v in base.state_dict().items()}, str(dit_file))
    assert main([*gen[:4], str(merged), *gen[5:], "--save_file", str(tmp_path / "merged.png")]) == 0
    assert main([*gen, "--save_file", str(tmp_path / "plain.png")]) == 0
    pixels = {n: np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("out", "merged", "plain")}
    assert np.array_equal(pixels["out"], pixels["merged"])
    assert (pixels["out"] != pixels["plain"]).mean() > 0.1
    capsys.readouterr()
    for spec, message in [(str(tmp_path / "gone.safetensors"), "gone.safetensors not found"),
                          (f"{lora}:half", "strength 'half' is not a number")]:
        code = main([*gen, "--lora", spec, "--save_file", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("kinema: error: --lora") and message in err[0], err
    assert not (tmp_path / "bad.png").exists()
