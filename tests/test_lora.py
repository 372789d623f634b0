"""LoRA: adapters for training, merging for inference, the file layouts other tools write, and `--lora`."""

import copy
import re

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

from kinema.errors import CheckpointError, KinemaError
from kinema.lora import (
    apply_loras, inject_lora, load_lora, lora_metadata, lora_parameters, lora_state_dict, merge_lora, merge_loras,
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
    assert parse_lora_spec(f"{plain}:1,0.5,0") == (str(plain), (1.0, 0.5, 0.0))  # per step: unmerged
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


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_every_format_users_hold_merges_to_identical_weights(tmp_path):
    """One update written in every key layout and kind of update in use: each merges to the same DiT weights
    (within float32 rounding); LoKr and LoHa files whose factors multiply out to the same update included."""
    base, injected = _trained("i2v", targets=("all",), rank=4, alpha=2.0)
    state = lora_state_dict(injected)
    deltas = {n: (b @ a) * (al / a.shape[0]) for n, (a, b, al) in state.items()}
    low_rank = lambda prefix, name, a_key, b_key, alpha=True: (  # noqa: E731
        {f"{prefix}{name(n)}.{a_key}": a for n, (a, _, _) in state.items()}
        | {f"{prefix}{name(n)}.{b_key}": b for n, (_, b, _) in state.items()}
        | ({f"{prefix}{name(n)}.alpha": torch.tensor(al) for n, (_, _, al) in state.items()} if alpha else {}))
    same = lambda n: n  # noqa: E731
    kohya = lambda n: n.replace(".", "_")  # noqa: E731
    folded = {n: (a, b * al / a.shape[0], al) for n, (a, b, al) in state.items()}  # alpha = rank, folded into B
    layouts = {
        "comfyui_musubi": low_rank("diffusion_model.", same, "lora_A.weight", "lora_B.weight"),
        "comfyui_model_prefix": low_rank("model.diffusion_model.", same, "lora_down.weight", "lora_up.weight"),
        "peft_default": {f"base_model.model.{_diffusers_name(n)}.lora_{s}.default.weight": t
                         for n, (a, b, _) in folded.items() for s, t in (("A", a), ("B", b))},
        "diffusers_no_prefix": {f"{_diffusers_name(n)}.lora_{s}.weight": t
                                for n, (a, b, _) in folded.items() for s, t in (("A", a), ("B", b))},
        "finetrainers": {f"transformer.{_diffusers_name(n)}.lora_{s}.weight": t
                         for n, (a, b, _) in folded.items() for s, t in (("A", a), ("B", b))},
        "kohya": low_rank("lora_unet_", kohya, "lora_down.weight", "lora_up.weight"),
        "diffsynth": {f"pipe.dit.{n}.lora_{s}.default.weight": t for n, (a, b, _) in folded.items()
                      for s, t in (("A", a), ("B", b))},
        "lightx2v_diff": {f"diffusion_model.{n}.diff": d for n, d in deltas.items()},
        # kron([[1]], delta) = delta; a 1x1 w1 and a full w2
        "lokr_full": {f"lycoris_{kohya(n)}.lokr_w1": torch.ones(1, 1) for n in deltas}
        | {f"lycoris_{kohya(n)}.lokr_w2": d for n, d in deltas.items()},
        # w1 full, w2 = w2_a @ w2_b of rank 4 with alpha 4: scale 1
        "lokr_factored": {f"lora_unet_{kohya(n)}.lokr_w1": torch.ones(1, 1) for n in deltas}
        | {f"lora_unet_{kohya(n)}.lokr_w2_a": b * al / a.shape[0] for n, (a, b, al) in state.items()}
        | {f"lora_unet_{kohya(n)}.lokr_w2_b": a for n, (a, _, _) in state.items()}
        | {f"lora_unet_{kohya(n)}.alpha": torch.tensor(4.0) for n in deltas},
        # (ones(out, 1) @ ones(1, in)) * (B' @ A) with alpha = rank of w1 (1): scale 1
        "loha": {f"diffusion_model.{n}.hada_w1_a": torch.ones(d.shape[0], 1) for n, d in deltas.items()}
        | {f"diffusion_model.{n}.hada_w1_b": torch.ones(1, d.shape[1]) for n, d in deltas.items()}
        | {f"diffusion_model.{n}.hada_w2_a": b * al / a.shape[0] for n, (a, b, al) in state.items()}
        | {f"diffusion_model.{n}.hada_w2_b": a for n, (a, _, _) in state.items()}
        | {f"diffusion_model.{n}.alpha": torch.tensor(1.0) for n in deltas},
    }
    expected = copy.deepcopy(base)
    merge_lora(expected, state, 0.7)
    changed = {k for k, v in expected.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert len(changed) == len(state)
    for layout, tensors in layouts.items():
        loaded = load_lora(_save(tmp_path / f"{layout}.safetensors", tensors), base)
        assert sorted(loaded) == sorted(state), layout
        model = copy.deepcopy(base)
        merge_lora(model, loaded, 0.7)
        for k, v in expected.state_dict().items():
            assert torch.allclose(model.state_dict()[k], v, atol=2e-6), (layout, k)


def test_lokr_loha_and_full_deltas_follow_their_formulas(tmp_path):
    """Genuine factors (no identity tricks): kron(w1, w2) * alpha / dim, (w1a w1b) * (w2a w2b) * alpha / rank, and
    diff / diff_b on a Linear's bias, a norm's weight and the modulation table."""
    base = _dit()
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    w1, w2a, w2b = r(8, 4), r(16, 2), r(2, 32)  # q: [128, 128] = kron([8, 4], [16, 32])
    h1a, h1b, h2a, h2b = r(256, 3), r(3, 128), r(256, 3), r(3, 128)  # ffn.0: [256, 128]
    dq, db, dn, dm = r(128, 128), r(128), r(128), r(1, 6, 128)
    tensors = {"lora_unet_blocks_0_self_attn_q.lokr_w1": w1, "lora_unet_blocks_0_self_attn_q.lokr_w2_a": w2a,
               "lora_unet_blocks_0_self_attn_q.lokr_w2_b": w2b, "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(1.0),
               "diffusion_model.blocks.1.ffn.0.hada_w1_a": h1a,
               "diffusion_model.blocks.1.ffn.0.hada_w1_b": h1b, "diffusion_model.blocks.1.ffn.0.hada_w2_a": h2a,
               "diffusion_model.blocks.1.ffn.0.hada_w2_b": h2b, "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(6.0),
               "diffusion_model.blocks.0.self_attn.k.diff": dq, "diffusion_model.blocks.0.self_attn.k.diff_b": db,
               "diffusion_model.blocks.1.norm3.diff": dn, "diffusion_model.blocks.1.modulation.diff": dm}
    loaded = load_lora(_save(tmp_path / "mixed.safetensors", tensors), base)
    model = copy.deepcopy(base)
    merge_lora(model, loaded, 0.5)
    sd0, sd = base.state_dict(), model.state_dict()
    want = {"blocks.0.self_attn.q.weight": torch.kron(w1, w2a @ w2b) * (1.0 / 2),
            "blocks.1.ffn.0.weight": (h1a @ h1b) * (h2a @ h2b) * (6.0 / 3),
            "blocks.0.self_attn.k.weight": dq, "blocks.0.self_attn.k.bias": db, "blocks.1.norm3.weight": dn,
            "blocks.1.modulation": dm}
    for k, d in want.items():
        assert torch.allclose(sd[k] - sd0[k], 0.5 * d, atol=1e-6), k
    assert all(torch.equal(sd[k], sd0[k]) for k in sd if k not in want)


def test_unmatched_keys_are_named_or_left_out(tmp_path, caplog):
    base, injected = _trained()
    good = {f"diffusion_model.{n}.lora_{s}.weight": t for n, (a, b, _) in lora_state_dict(injected).items()
            for s, t in (("A", a), ("B", b))}
    path = _save(tmp_path / "extra.safetensors", good | {"diffusion_model.blocks.0.self_attn.q.lora_magnitude": torch.ones(3),
                                                         "diffusion_model.vace_blocks.0.proj.lora_A.weight": torch.ones(4, 128),
                                                         "diffusion_model.vace_blocks.0.proj.lora_B.weight": torch.ones(128, 4)})
    _raises(CheckpointError, r"keys 'diffusion_model\.blocks\.0\.self_attn\.q\.lora_magnitude' are not LoRA weights.*"
            r"--lora_ignore_unmatched", load_lora, path, base)
    kept = load_lora(path, base, ignore_unmatched=True)
    assert sorted(kept) == sorted(lora_state_dict(injected))
    assert "3 keys match nothing and were left out" in caplog.text and "vace_blocks.0.proj" in caplog.text
    only_bad = _save(tmp_path / "bad.safetensors", {"diffusion_model.vace_blocks.0.proj.lora_A.weight": torch.ones(4, 128),
                                                    "diffusion_model.vace_blocks.0.proj.lora_B.weight": torch.ones(128, 4)})
    _raises(CheckpointError, r"'diffusion_model\.vace_blocks\.0\.proj\.lora_A\.weight'.*does not exist", load_lora,
            only_bad, base)
    _raises(CheckpointError, "no key matches a layer", load_lora, only_bad, base, ignore_unmatched=True)
    tucker = _save(tmp_path / "tucker.safetensors", {"lora_unet_blocks_0_self_attn_q.lokr_w1": torch.ones(1, 1),
                                                      "lora_unet_blocks_0_self_attn_q.lokr_t2": torch.ones(2, 2, 1, 1)})
    _raises(CheckpointError, r"'lora_unet_blocks_0_self_attn_q\.lokr_t2' is LoKr with a Tucker core", load_lora, tucker)
    wrong = _save(tmp_path / "wrong.safetensors", {"diffusion_model.blocks.0.self_attn.q.diff": torch.ones(64, 64)})
    _raises(CheckpointError, r"makes a \[64, 64\] full delta but the model's 'blocks\.0\.self_attn\.q\.weight' is "
            r"\[128, 128\]", load_lora, wrong, base)


def test_several_loras_quantise_an_fp8_layer_once():
    """Two LoRAs into an fp8 DiT: the sum added in one re-quantisation equals merging their sum as one LoRA."""
    from kinema.ops.fp8 import quantize_fp8

    base, one = _trained()
    s1, s2 = lora_state_dict(one), {n: (a, b * -0.5, al) for n, (a, b, al) in lora_state_dict(one).items()}
    model = quantize_fp8(copy.deepcopy(base), "fp8_e4m3fn")
    both = quantize_fp8(copy.deepcopy(base), "fp8_e4m3fn")
    merge_loras(model, [(s1, 1.0), (s2, 1.0)])  # = s1 at strength 0.5, in one re-quantisation
    merge_lora(both, s1, 0.5)
    q = lambda m: m.blocks[0].self_attn.q  # noqa: E731
    assert torch.equal(q(model).weight.float(), q(both).weight.float())
    assert torch.equal(q(model).scale_weight, q(both).scale_weight)


def test_unmerged_lora_follows_its_step_schedule(tmp_path):
    """A LoRA left unmerged gives, at each step, what merging it at that step's strength gives; the model's weights
    never change; removing it restores the model exactly; full deltas refuse to run unmerged."""
    from kinema.lora.runtime import LoRASchedule, attach_lora
    from kinema.sampling.context import StepContext

    base, injected = _trained()
    weights = lora_state_dict(injected)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = attach_lora(model, weights, LoRASchedule((1.0, 0.5, 0.0)))
    for step, strength in ((0, 1.0), (1, 0.5), (2, 0.0), (7, 0.0)):
        merged = copy.deepcopy(base)
        merge_lora(merged, weights, strength)
        ctx = StepContext(step=step, steps=8, sigma=0.5, timestep=500)
        with torch.no_grad():
            got = model(**_inputs(model), hooks=(hook,), step=ctx)
        assert rel_err(got, _run(merged)) < 1e-5, step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    hook.remove()
    assert torch.equal(_run(model), _run(base))
    from kinema.lora.formats import Delta

    full = {"blocks.0.ffn.0": Delta("full", (torch.zeros(256, 128),))}
    _raises(KinemaError, "only merges", attach_lora, copy.deepcopy(base), full, LoRASchedule((1.0,)))


def test_pipeline_and_cli_run_loras_unmerged(tmp_path):
    import kinema
    from kinema.cli.main import main
    from kinema.demo import write_random_checkpoint
    from kinema.loading.dit import open_dit
    from kinema.media import read_video

    ckpt = tmp_path / "tiny"
    write_random_checkpoint(ckpt)
    dit = open_dit(str(ckpt)).load().model
    inject_lora(dit, 2, 2.0, ("self_attn", "ffn"))
    _randomize(dit, seed=5)
    path = save_lora(tmp_path / "l.safetensors", lora_state_dict(dit))
    kw = dict(size="32*32", frame_num=5, steps=3, seed=1, decode=False, progress=False)
    merged = kinema.Pipeline.load(str(ckpt), loras=[(str(path), 0.7)])("a cat", **kw).latents
    runtime = kinema.Pipeline.load(str(ckpt), loras=[(str(path), 0.7)], lora_runtime=True)
    assert runtime.models.loras[0][1] == 0.7 and len(runtime.models.lora_hooks) == 1
    assert rel_err(runtime("a cat", **kw).latents, merged) < 1e-4
    scheduled = kinema.Pipeline.load(str(ckpt), loras=[(str(path), (0.7, 0.7, 0.0))])("a cat", **kw).latents
    assert (scheduled - merged).abs().max() > 1e-4  # the last step ran without it
    out = tmp_path / "a.webp"
    assert main(["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--size", "32*32", "--frame_num", "5",
                 "--sample_steps", "3", "--prompt", "a cat", "--base_seed", "1", "--lora", f"{path}:1,0.5",
                 "--save_file", str(out)]) == 0
    assert read_video(out).frames.shape == (5, 32, 32, 3)
