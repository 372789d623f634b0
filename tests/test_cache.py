"""Step caching (TeaCache, MagCache): exactness at threshold 0, the skip rules, per-branch state, the CLI."""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import StubTextEncoder

from kinema.cli.main import main
from kinema.errors import KinemaError
from kinema.models.dit import WAN_DIT, DiTConfig, WanDiT
from kinema.models.hooks import BlockHook
from kinema.pipeline.models import Models
from kinema.pipeline.pipeline import Pipeline
from kinema.sampling import schedule
from kinema.sampling.context import StepContext
from kinema.sampling.cache import (
    CALIBRATION_FILE, CacheSpec, StepCache, load_calibration, parse_cache, rel_l1, write_calibrations,
)

STEPS = 10


@pytest.fixture(scope="module")
def models():
    from kinema.models.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval().requires_grad_(False)
    dit = WanDiT(DiTConfig("t2v", dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=2)).eval()
    return Models(dit, vae, StubTextEncoder())


def run(models, cache=None, batched=False, **kw):
    kw = dict(size=(32, 32), frame_num=5, steps=STEPS, seed=3, decode=False, progress=False, batched_cfg=batched,
              cache=cache) | kw
    return Pipeline(models)("a red circle moving right", **kw)


def teacache(threshold, coefficients=(0.1,), **extra):
    return StepCache("teacache", threshold, calibration={"input": "e", "coefficients": list(coefficients),
                                                         "first_steps": 1, "last_steps": 1} | extra)


def magcache(threshold, k, cond=None, uncond=None):
    ratios = {"cond": cond or [1.0] * STEPS, "uncond": uncond or cond or [1.0] * STEPS}
    return StepCache("magcache", threshold, k, calibration={"ratios": ratios, "retention": 0.2})


def pattern(flags) -> str:
    return "".join("x" if f else "." for f in flags)


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_threshold_zero_is_exactly_uncached(models, batched):
    plain = run(models, batched=batched).latents
    for cache in (teacache(0.0, coefficients=(1.0, -0.5)), magcache(0.0, 4)):  # the polynomial dips below 0: still no skip
        out = run(models, cache, batched=batched)
        assert out.cache.skipped == 0 and out.cache.computed == 2 * STEPS
        assert torch.equal(out.latents, plain)


# -- the rules ------------------------------------------------------------------------------------
def test_teacache_skips_by_the_rule(models):
    # A constant rescaled change of 0.1 a step against 0.25: compute, skip, skip, compute, ...; first and last computed.
    out = run(models, teacache(0.25))
    assert out.cache.decisions == {"cond": [True, False, False, True, False, False, True, False, False, True]} | {
        "uncond": [True, False, False, True, False, False, True, False, False, True]}
    assert (out.cache.computed, out.cache.skipped) == (8, 12)
    assert not torch.equal(out.latents, run(models).latents)
    assert out.settings["cache"] == "teacache:0.25"


def test_teacache_accumulates_the_relative_change_of_e(models):
    """With the identity polynomial the rule runs on rel-L1(e_t, e_t-1), replayed here by hand."""
    dit = models.dit
    _, timesteps = schedule("unipc", STEPS, 5.0)
    with torch.no_grad():
        e = [dit.time_embed(t[None].float(), 1)[0] for t in timesteps]
    changes = [rel_l1(e[i], e[i - 1]) for i in range(1, STEPS)]
    threshold = 2.5 * float(np.mean(changes))
    expected, acc = [True], 0.0
    for i, x in enumerate(changes, start=1):
        acc += x
        compute = i == STEPS - 1 or acc >= threshold
        acc = 0.0 if compute else acc
        expected.append(compute)
    out = run(models, teacache(threshold, coefficients=(1.0, 0.0)))
    assert out.cache.decisions["cond"] == expected and not all(expected)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_magcache_never_skips_more_than_k_in_a_row(models, k):
    out = run(models, magcache(100.0, k))  # ratios of 1: no error, only K limits the skips
    for flags in out.cache.decisions.values():
        runs = [len(r) for r in pattern(flags).split("x") if r]
        assert max(runs) == k
        assert pattern(flags[:2]) == "xx"  # retention: the first 20% always computed
    assert pattern(run(models, magcache(100.0, 2)).cache.decisions["cond"]) == "xx..x..x.."


def test_magcache_accumulated_error_stops_skipping(models):
    # ratio 0.9 a step: errors 0.1, then 0.1 + 0.19 = 0.29 -> with a threshold of 0.2 one skip, then compute.
    out = run(models, magcache(0.2, 5, cond=[1.0] + [0.9] * (STEPS - 1)))
    assert pattern(out.cache.decisions["cond"]) == "xx.x.x.x.x"


# -- cond and uncond ------------------------------------------------------------------------------
def test_branches_are_separate_and_batching_does_not_change_skips(models):
    # cond's ratios never add error, uncond's always exceed the threshold: cond skips, uncond computes every step.
    cache = lambda: magcache(0.5, 2, cond=[1.0] * STEPS, uncond=[1.0] + [0.2] * (STEPS - 1))  # noqa: E731
    two_pass, batched = run(models, cache()), run(models, cache(), batched=True)
    assert two_pass.cache.decisions == batched.cache.decisions
    assert pattern(two_pass.cache.decisions["cond"]) == "xx..x..x.." and all(two_pass.cache.decisions["uncond"])
    assert torch.allclose(two_pass.latents, batched.latents, atol=1e-5)
    for make in (lambda: teacache(0.25), lambda: magcache(100.0, 2)):
        a, b = run(models, make()), run(models, make(), batched=True)
        assert a.cache.decisions == b.cache.decisions
        assert torch.allclose(a.latents, b.latents, atol=1e-5)


def test_hook_reuses_each_branch_residual(models):
    """A skipped row is its own block input plus the residual its branch cached at its last computed step."""
    dit = models.dit
    cache = magcache(100.0, 1).begin(STEPS)
    x, ctx, t = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 5, 16), torch.tensor([999, 999])
    seen = {}

    class Spy(BlockHook):  # outside the cache (lower order): sees the stack's input and the cache's output
        order = 0

        def around_blocks(self, run, tokens, inputs, step):
            seen["tokens"], seen["out"] = tokens, run(tokens, inputs, step)
            return seen["out"]

    def step(i):
        return StepContext(step=i, steps=STEPS, sigma=0.999, timestep=999, branches=("cond", "uncond"))

    with torch.no_grad():
        dit(x, t, ctx, hooks=[cache, Spy()], step=step(0))
        dit(x, t, ctx, hooks=[cache, Spy()], step=step(1))  # step 1: still in MagCache's retention, computed
        cached = {b: s.residual.clone() for b, s in cache.branches.items()}
        dit(x * 0.5, t, ctx, hooks=[Spy(), cache], step=step(2))  # step 2: both rows skip (hooks in any order)
    assert cache.decisions == {"cond": [True, True, False], "uncond": [True, True, False]}
    assert not torch.allclose(cached["cond"], cached["uncond"])
    for i, b in enumerate(("cond", "uncond")):
        assert torch.equal(seen["out"][i : i + 1], seen["tokens"][i : i + 1] + cached[b])


def test_record_mode_records_every_step(models):
    out = run(models, StepCache("record"))
    rec = out.cache.records
    assert set(rec) == {"cond", "uncond"} and out.cache.skipped == 0
    for r in rec.values():
        assert all(len(v) == STEPS - 1 for v in r.values())
        assert all(v > 0 for v in r["e"] + r["out"] + r["mag"])
    assert rec["cond"]["e"] == rec["uncond"]["e"]  # e depends on the timestep alone


# -- settings and calibrations --------------------------------------------------------------------
def test_parse_cache():
    assert parse_cache(None) is None and parse_cache("off") is None
    assert parse_cache("teacache:0.2") == CacheSpec("teacache", 0.2)
    assert parse_cache("MagCache:0.12:3") == CacheSpec("magcache", 0.12, 3)
    assert parse_cache("magcache:0.12") == CacheSpec("magcache", 0.12, 2)
    assert str(parse_cache("magcache:0.12:3")) == "magcache:0.12:3"
    for bad in ["teacache", "teacache:", "teacache:x", "teacache:-1", "teacache:nan", "teacache:0.1:2", "magcache:0.1:x",
                "magcache:0.1:-1", "fastcache:0.1"]:
        with pytest.raises(KinemaError, match="teacache:THRESH"):
            parse_cache(bad)


def test_calibration_lookup(tmp_path, caplog):
    fake = lambda cfg: SimpleNamespace(config=cfg, head=SimpleNamespace(modulation=torch.zeros(2)), blocks=[])  # noqa: E731
    assert load_calibration(fake(WAN_DIT["i2v-14B"]), 832 * 480)[0] == "wan2.1-i2v-14B-480P"
    assert load_calibration(fake(WAN_DIT["i2v-14B"]), 1280 * 720)[0] == "wan2.1-i2v-14B-720P"
    assert load_calibration(fake(WAN_DIT["t2v-1.3B"]))[0] == "wan2.1-t2v-1.3B"
    with pytest.raises(KinemaError, match="calibrate_cache.py"):
        load_calibration(fake(WAN_DIT["flf2v-14B"]))
    path = tmp_path / CALIBRATION_FILE
    write_calibrations({"models": {"mine": {"match": {"dim": 1536}, "fingerprint": "0" * 16,
                                            "teacache": {"coefficients": [1.0]}}}}, path)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        assert load_calibration(fake(WAN_DIT["t2v-1.3B"]), path=path)[0] == "mine"
    assert "other weights" in caplog.text
    assert json.loads(path.read_text())["models"]["mine"]["teacache"]["coefficients"] == [1.0]


# -- command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["teacache", "teacache:fast", "magcache:0.1:x", "teacache:-0.1", "quickcache:1"])
def test_cli_bad_cache_exits_2(bad, capsys):
    code = main(["generate", "--prompt", "a red circle", "--cache", bad])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("kinema: error: --cache") and repr(bad) in err
    assert "teacache:THRESH" in err and "magcache:THRESH:K" in err


def test_cli_cache_end_to_end(tmp_path, caplog):
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_metadata

    ckpt = tmp_path / "ckpt"
    write_random_checkpoint(ckpt)
    args = ["generate", "--task", "t2i-14B", "--ckpt_dir", str(ckpt), "--size", "32*32", "--sample_steps", "6",
            "--prompt", "a red circle", "--base_seed", "1", "--cache", "magcache:1:2"]
    assert main([*args, "--save_file", str(tmp_path / "none.png")]) == 2  # no calibration for this model yet
    write_calibrations({"models": {"ckpt": {"match": {"dim": 128, "num_layers": 2},
                                            "magcache": {"ratios": {"cond": [1.0] * 6}}}}}, ckpt / CALIBRATION_FILE)
    with caplog.at_level(logging.INFO, logger="kinema"):
        assert main([*args, "--save_file", str(tmp_path / "out.png")]) == 0
    assert "computed 4 of 12 DiT block passes" in caplog.text and "skipped 8" in caplog.text  # x..x.. per branch
    assert read_metadata(tmp_path / "out.png")["cache"] == "magcache:1:2"
