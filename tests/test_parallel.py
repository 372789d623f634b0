"""One job on many processes (kinema/parallel): gloo ranks on the CPU give the single-process latents and frames.

Every split (Ulysses, ring, both, CFG parallel, FSDP of the DiT and umT5, the VAE decode by tiles) runs
t2v, i2v and flf2v on tiny random checkpoints, in float32, on a token grid no rank count divides (the
padding masked and dropped), and is compared with the same call in this process: within 1e-5, and the
same on every rank. The step cache, LoRA, fp8 and context windows run across ranks too.
"""

from __future__ import annotations

import json

import pytest
import torch
from parallel_ranks import generate, spawn

from kinema.errors import KinemaError
from kinema.parallel.mesh import ParallelOptions, check_world
from kinema.parallel.ring import attention_lse, merge, segment_lengths
from kinema.parallel.ulysses import check_heads
from kinema.parallel.vae import split_tile

TOL = 1e-5
TASKS = ("t2v", "i2v", "flf2v")
STEPS = 6
MAG = {"cond": [1.0, 1.0, 0.97, 0.97, 0.98, 1.0], "uncond": [1.0, 0.9, 0.99, 0.9, 1.0, 1.0]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from kinema.demo import write_random_checkpoint
    from kinema.lora.files import save_lora
    from kinema.sampling.cache import CALIBRATION_FILE, write_calibrations

    root = tmp_path_factory.mktemp("parallel")
    for task in TASKS:
        write_random_checkpoint(root / task, model_type=task, num_heads=4)
    write_random_checkpoint(root / "two_heads", num_heads=2)
    write_calibrations({"models": {"tiny": {"match": {"dim": 128, "num_layers": 2},
                                            "magcache": {"ratios": MAG, "retention": 0.2}}}},
                       root / "t2v" / CALIBRATION_FILE)
    g = torch.Generator().manual_seed(5)
    pair = lambda o, i: (torch.randn(4, i, generator=g) * 0.1, torch.randn(o, 4, generator=g) * 0.1)  # noqa: E731
    save_lora(root / "lora.safetensors", {"blocks.0.self_attn.q": pair(128, 128), "blocks.1.ffn.0": pair(256, 128),
                                          "head.head": pair(64, 128)})
    return root


def close(got: dict, want: dict, what: str) -> dict:
    assert "error" not in got, f"{what}: {got['error']}"
    out = {"latents": (got["latents"] - want["latents"]).abs().max().item()}
    if want.get("video") is not None:
        out["video"] = (got["video"] - want["video"]).abs().max().item()
    assert max(out.values()) <= TOL, f"{what}: {out}"
    for branch, decisions in (got["decisions"] or {}).items():  # a CFG group's cache holds its own branch
        assert decisions == want["decisions"][branch], f"{what}: {branch}"
    return out


def check(ranks: list[dict], specs: list, references: dict) -> dict:
    """Every rank's result of every spec against its single-process reference; the worst differences, by name."""
    worst = {}
    for spec in specs:
        name, reference = spec[0], references[spec[0]]
        for r, res in enumerate(ranks):
            diff = close(res[name], reference, f"{name} on rank {r}")
            worst[name] = max(worst.get(name, 0.0), *diff.values())
        branches = {b for res in ranks for b in (res[name]["decisions"] or {})}
        assert branches == set(reference["decisions"] or {}), name  # every branch ran somewhere
    return worst


def reference_of(root, spec) -> dict:
    """The spec in this process: the same call (and the same VAE tiles), no parallel options."""
    name, ckpt, task, _, call = spec
    return generate(root, (name, ckpt, task, {}, call))


def run_and_compare(world, root, specs, tmp_path, also=()):
    """`specs` on `world` ranks against this process; `also`: more specs run there, not compared here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' own setting: the same kernels' blocking on both sides
    try:
        references = {spec[0]: reference_of(root, spec) for spec in specs}
    finally:
        torch.set_num_threads(threads)
    ranks = spawn(world, root, [*specs, *also], tmp_path / "out")
    worst = check(ranks, specs, references)
    print(json.dumps({k: f"{v:.2e}" for k, v in worst.items()}, indent=0))
    return ranks, references


# -- the pieces, in this process --------------------------------------------------------------------------
def test_heads_that_rule_ulysses_out():
    with pytest.raises(KinemaError, match=r"12 attention heads, which do not divide by 8.*--ulysses_size 4 --ring_size 2"):
        check_heads(12, 8)
    check_heads(40, 8)


def test_world_and_options_are_checked():
    with pytest.raises(KinemaError, match="torchrun --nproc_per_node=4"):
        check_world(ParallelOptions(ulysses_size=2, cfg_parallel=True), 1)
    with pytest.raises(KinemaError, match=r"= 4, but 8 processes"):
        check_world(ParallelOptions(ulysses_size=2, ring_size=2), 8)
    with pytest.raises(KinemaError, match="ring_size 0"):
        ParallelOptions(ring_size=0).check()
    opts = ParallelOptions(ulysses_size=2, cfg_parallel=True, vae_parallel=True)
    with pytest.raises(KinemaError, match="not guided"):
        opts.check_call(guided=False)
    with pytest.raises(KinemaError, match="use one"):
        opts.check_call(guided=True, batched=True)
    with pytest.raises(KinemaError, match="Enhance-A-Video"):
        opts.check_call(guided=True, enhance=True)
    with pytest.raises(KinemaError, match="off"):
        opts.check_call(guided=True, vae_tile="off")


def test_load_options_that_conflict(root):
    import kinema

    for kw, match in ((dict(dit_fsdp=True, blocks_to_swap=1), "both place the DiT's block weights"),
                      (dict(t5_fsdp=True, offload=True), "holds only shards"),
                      (dict(t5_fsdp=True, t5_cpu=True), "use one"),
                      (dict(dit_fsdp=True, dtype="fp16"), "bf16"),
                      (dict(ulysses_size=2, compile=True), "compile")):
        with pytest.raises(KinemaError, match=match):
            kinema.Pipeline.load(root / "t2v", **kw)


def test_cli_without_torchrun(root, capsys):
    from kinema.cli.main import main

    args = ["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(root / "t2v"), "--prompt", "x", "--size", "80*48"]
    assert main([*args, "--ulysses_size", "2", "--ring_size", "2"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node=4" in err and "Traceback" not in err


def test_ring_merge_is_softmax_over_all_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 16, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = lse = None
    for part in (slice(0, 3), slice(3, 4), slice(4, 7)):
        out, lse = merge(out, lse, *attention_lse(q, k[:, part], v[:, part]))
    assert (out - want).abs().max() < 1e-6
    assert segment_lengths(45, 12, 4) == [12, 12, 12, 9] and segment_lengths(5, 4, 3) == [4, 1, 0]
    assert split_tile(90, 160, 8) == (90, 34)


# -- many ranks -------------------------------------------------------------------------------------------
SPLITS = {
    2: {"u2": dict(ulysses_size=2), "r2": dict(ring_size=2), "cfg": dict(cfg_parallel=True),
        "fsdp": dict(dit_fsdp=True, t5_fsdp=True), "vae": dict(vae_parallel=True)},
    4: {"u4": dict(ulysses_size=4), "r4": dict(ring_size=4), "u2r2": dict(ulysses_size=2, ring_size=2),
        "u2cfg_fsdp_vae": dict(ulysses_size=2, cfg_parallel=True, dit_fsdp=True, t5_fsdp=True, vae_parallel=True)},
}
BIG = dict(size="416*240", frame_num=17, steps=2, decode=False)  # a 5 x 15 x 26 token grid: 1950 tokens


def specs_for(world: int, tasks) -> list:
    return [(f"{task}/{name}", task, task, par, {"vae_tile": "32x32"} if par.get("vae_parallel") else {})
            for task in tasks for name, par in SPLITS[world].items()]


def test_two_ranks(root, tmp_path):
    """Every split of 2 ranks on t2v, and the step cache, fp8, LoRA, context windows, batched guidance, skip-layer
    guidance and RIFLEx across ranks."""
    mag = dict(cache="magcache:0.1:2", steps=STEPS)
    extras = [
        ("cache/u2", "t2v", "t2v", dict(ulysses_size=2), mag),
        ("cache/cfg", "t2v", "t2v", dict(cfg_parallel=True), mag),
        ("windows/r2", "t2v", "t2v", dict(ring_size=2), dict(frame_num=17, context_windows=dict(frames=9, overlap=4))),
        ("lora_fp8/fsdp", "t2v", "t2v", dict(dit_fsdp=True, t5_fsdp=True),
         dict(loras=[(str(root / "lora.safetensors"), 0.8)], quantization="fp8_e4m3fn_scaled")),
        ("fp8/u2", "t2v", "t2v", dict(ulysses_size=2), dict(quantization="fp8_e4m3fn")),
        ("batched/u2", "t2v", "t2v", dict(ulysses_size=2), dict(batched_cfg=True)),
        ("slg_riflex/r2", "t2v", "t2v", dict(ring_size=2), dict(skip_layers=dict(blocks=[1], start=0.0), riflex=2)),
    ]
    ranks, refs = run_and_compare(2, root, specs_for(2, ["t2v"]) + extras, tmp_path)
    decisions = refs["cache/u2"]["decisions"]
    assert decisions is not None and not all(decisions["cond"]) and decisions["cond"] != decisions["uncond"]


def test_four_ranks(root, tmp_path):
    """Every split of 4 ranks on t2v, a 5 x 15 x 26 grid, and heads that rule Ulysses out (the clear error)."""
    specs = specs_for(4, ["t2v"]) + [("grid/u2r2", "t2v", "t2v", dict(ulysses_size=2, ring_size=2), BIG)]
    heads = ("heads", "two_heads", "t2v", dict(ulysses_size=4), {})
    ranks, _ = run_and_compare(4, root, specs, tmp_path, also=[heads])
    for res in ranks:
        assert "2 attention heads, which do not divide by 4" in res["heads"]["error"]
        assert "--ulysses_size 2 --ring_size 2" in res["heads"]["error"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_image_tasks(root, tmp_path, world):
    """i2v and flf2v (CLIP tokens, the 20-channel condition) under every split, and more combinations."""
    extras = [] if world == 2 else [
        ("grid/r4_fsdp", "t2v", "t2v", dict(ring_size=4, dit_fsdp=True), BIG),
        ("lora/u2r2_fsdp", "t2v", "t2v", dict(ulysses_size=2, ring_size=2, dit_fsdp=True),
         dict(loras=[(str(root / "lora.safetensors"), 0.8)])),
    ]
    run_and_compare(world, root, specs_for(world, ["i2v", "flf2v"]) + extras, tmp_path)


def test_memory_plan_counts_one_rank(root):
    """The memory check before a parallel run counts this rank's chunk of the tokens and its shards."""
    from dataclasses import replace

    from kinema.cli.plan import read_target
    from kinema.memory.plan import Run, estimate
    from kinema.pipeline.load import LoadOptions, open_checkpoints

    opts, _ = LoadOptions(ckpt=root / "t2v").check()
    meta, _ = read_target(open_checkpoints(opts))
    run = Run(task="t2v", width=80, height=48, frame_num=9, device="cpu", dtype=torch.float32)
    one, split = estimate(meta, run), estimate(meta, replace(run, sequence_ranks=4, dit_shards=4, t5_shards=4))
    assert one.tokens == 45 and split.tokens == 12

    def weights(plan, name):
        return max(u.weights for p in plan.phases for u in p.uses if u.component == name)

    assert weights(split, "dit") < 0.8 * weights(one, "dit") and weights(split, "t5") < weights(one, "t5")
