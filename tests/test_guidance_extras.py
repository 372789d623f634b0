"""Guidance extras: skip-layer guidance, CFG-Zero*, Enhance-A-Video (FETA), RIFLEx.

Each against a direct computation of its formula on a small random DiT (a block really left out,
the FETA gain by a loop over positions and heads, the RoPE angles written out), each changing
the output, and each through the Python API, the command line (recorded, repeated by --from)
and the wrapper's nodes.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import StubTextEncoder

from kinema.errors import KinemaError
from kinema.models.dit import DiTConfig, WanDiT
from kinema.models.hooks import BlockHook
from kinema.ops.feta import feta_gain
from kinema.ops.rope import rope_split, rope_table
from kinema.pipeline.extras import Extras, parse_extras
from kinema.pipeline.guidance import Batched, Sequential, guided_model
from kinema.pipeline.models import Models
from kinema.pipeline.pipeline import Pipeline
from kinema.sampling.cache import StepCache
from kinema.sampling.cfg_zero import CFGZeroStar, cfg_zero_star, optimized_scale
from kinema.sampling.context import StepContext
from kinema.sampling.enhance import EnhanceVideo
from kinema.sampling.riflex import Riflex, RiflexHook, intrinsic_index, parse_riflex
from kinema.sampling.skip_layers import SkipLayers, SkipLayersHook

PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return WanDiT(DiTConfig("t2v", dim=64, ffn_dim=96, text_dim=16, num_heads=2, num_layers=4)).eval()


@pytest.fixture(scope="module")
def models(dit):
    from kinema.models.vae import WanVAE

    torch.manual_seed(1)
    return Models(dit, WanVAE(dim=8, dim_mult=(1, 2, 2, 2)).eval().requires_grad_(False), StubTextEncoder())


def inputs(seed=0, frames=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, 4, 4, generator=g)
    cond = {"context": torch.randn(1, 8, 16, generator=g)}
    uncond = {"context": torch.randn(1, 8, 16, generator=g)}
    return x, torch.tensor([700]), cond, uncond


def ctx(step, steps=10):
    return StepContext(step=step, steps=steps, sigma=1 - step / steps, timestep=1000 - 100 * step)


def without_blocks(dit, blocks):
    """The same DiT with `blocks` removed: what skipping them must equal."""
    other = copy.deepcopy(dit)
    other.blocks = torch.nn.ModuleList(b for i, b in enumerate(other.blocks) if i not in blocks)
    return other


def run(models, **kw):
    kw = dict(size=(32, 32), frame_num=9, steps=6, seed=3, guide_scale=4.0, decode=False, progress=False) | kw
    return Pipeline(models)(PROMPT, **kw).latents


# -- CFG-Zero* ------------------------------------------------------------------------------------
def test_cfg_zero_star_formula():
    g = torch.Generator().manual_seed(0)
    vc, vu = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    for b in range(2):  # per sample: s* = <c, u> / (|u|^2 + eps), v = s* u + w (c - s* u)
        c, u = vc[b].double().flatten(), vu[b].double().flatten()
        s = float(c @ u / (u @ u + 1e-8))
        assert optimized_scale(vc, vu)[b].item() == pytest.approx(s, rel=1e-5)
        want = s * u + 5.0 * (c - s * u)
        assert torch.allclose(cfg_zero_star(vc, vu, 5.0)[b].double().flatten(), want, atol=1e-5)
    assert torch.allclose(cfg_zero_star(vc, vu, 1.0), vc, atol=1e-6)  # w = 1: the cond prediction
    assert torch.allclose(cfg_zero_star(vc, 2 * vc, 3.0), vc, atol=1e-5)  # u parallel to c: s* u = c


@pytest.mark.parametrize("strategy", [Sequential(), Batched()])
def test_cfg_zero_star_in_the_model_function(dit, strategy):
    x, t, cond, uncond = inputs()
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return dit(*a, **k)

    fn = guided_model(counting, cond, uncond, 5.0, strategy, zero_star=CFGZeroStar(zero_init_steps=2))
    for step in (0, 1):  # zero-init: a zero velocity, and the model is not called
        assert torch.equal(fn(x, t, ctx(step)), torch.zeros_like(x)) and not calls
    with torch.no_grad():
        got = fn(x, t, ctx(2))
        vc, vu = dit(x, t, **cond), dit(x, t, **uncond)
    s = float((vc.double() * vu.double()).sum() / (vu.double().square().sum() + 1e-8))
    want = s * vu.double() + 5.0 * (vc.double() - s * vu.double())
    assert (got.double() - want).abs().max().item() < 1e-4
    plain = guided_model(dit, cond, uncond, 5.0, strategy)(x, t, ctx(2))
    assert (plain - got).abs().max().item() > 1e-3  # it changes the prediction


# -- skip-layer guidance --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", [Sequential(), Batched()])
def test_skip_layers_uncond_mode_leaves_the_blocks_out(dit, strategy):
    x, t, cond, uncond = inputs()
    spec = SkipLayers(blocks=(1, 2), start=0.2, end=0.8)
    fn = guided_model(dit, cond, uncond, 4.0, strategy, hooks=(SkipLayersHook(spec, 4),), skip_layers=spec)
    skipped = without_blocks(dit, {1, 2})
    with torch.no_grad():
        vc, vu, vu_skip = dit(x, t, **cond), dit(x, t, **uncond), skipped(x, t, **uncond)
    for step, u in ((0, vu), (1, vu), (2, vu_skip), (8, vu_skip), (9, vu)):  # active for progress 0.2..0.8
        with torch.no_grad():
            got = fn(x, t, ctx(step))
        assert (got - (u + 4.0 * (vc - u))).abs().max().item() < 1e-5, step
    assert (vu_skip - vu).abs().max().item() > 1e-2


@pytest.mark.parametrize("strategy", [Sequential(), Batched()])
def test_skip_layers_sd3_mode_adds_the_skip_term(dit, strategy):
    x, t, cond, uncond = inputs(1)
    spec = SkipLayers(blocks=(2,), start=0.0, end=1.0, mode="sd3", scale=2.5)
    fn = guided_model(dit, cond, uncond, 4.0, strategy, hooks=(SkipLayersHook(spec, 4),), skip_layers=spec)
    with torch.no_grad():
        vc, vu, vc_skip = dit(x, t, **cond), dit(x, t, **uncond), without_blocks(dit, {2})(x, t, **cond)
        got = fn(x, t, ctx(3))
    want = vu + 4.0 * (vc - vu) + 2.5 * (vc - vc_skip)
    assert (got - want).abs().max().item() < 1e-5
    # unguided: the sd3 form still works (cond + the skip term)
    fn1 = guided_model(dit, cond, None, 1.0, strategy, hooks=(SkipLayersHook(spec, 4),), skip_layers=spec)
    with torch.no_grad():
        assert (fn1(x, t, ctx(3)) - (vc + 2.5 * (vc - vc_skip))).abs().max().item() < 1e-5


def test_skip_layers_under_the_step_cache_is_exact(models):
    """A threshold-0 cache computes every step: with SLG it must equal SLG without the cache (the cache runs
    branch rows, and the skip hook inside it must still see which row is which)."""
    spec = dict(blocks=[1], start=0.0, end=1.0)
    tea = StepCache("teacache", 0.0, calibration={"input": "e", "coefficients": [0.1], "first_steps": 1,
                                                  "last_steps": 1})
    for batched in (False, True):
        plain = run(models, skip_layers=spec, batched_cfg=batched)
        cached = run(models, skip_layers=spec, batched_cfg=batched, cache=tea)
        assert (plain - cached).abs().max().item() < 1e-5


# -- Enhance-A-Video ------------------------------------------------------------------------------
def naive_gain(q, k, frames, weight):
    """The FETA gain by loops: per position and head, softmax(q k^T / sqrt(D)) over frames, off-diagonal mean."""
    b, length, heads, d = q.shape
    s = length // frames
    out = []
    for i in range(b):
        total, count = 0.0, 0
        for p in range(s):
            for h in range(heads):
                qf = q[i, p::s, h].double()  # frame-major: frame f of position p is token f * S + p
                kf = k[i, p::s, h].double()
                attn = (qf @ kf.T / math.sqrt(d)).softmax(-1)
                total += (attn.sum() - attn.diagonal().sum()).item()
                count += frames * frames - frames
        out.append(max(1.0, total / count * (frames + weight)))
    return torch.tensor(out, dtype=torch.float64)


def test_feta_gain_equals_the_loop():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5 * 6, 3, 8, generator=g), torch.randn(2, 5 * 6, 3, 8, generator=g)
    for weight in (0.0, 2.0, 7.5):
        assert torch.allclose(feta_gain(q, k, 5, weight).double(), naive_gain(q, k, 5, weight), atol=1e-5)
    assert torch.equal(feta_gain(q, k, 1, 2.0), torch.ones(2))  # one frame: nothing across frames
    big = feta_gain(q * 0, k * 0, 5, 4.0)  # uniform maps: mean 1/F, gain (F + w)/F
    assert torch.allclose(big, torch.full((2,), 9 / 5))


def test_feta_scales_each_self_attention(dit):
    """The DiT with Enhance-A-Video equals the DiT whose self-attention outputs are multiplied by the gain of
    its own q / k (before RoPE), computed outside."""
    x, t, cond, _ = inputs(2, frames=4)
    fn = guided_model(dit, cond, None, 1.0, Sequential(), hooks=Extras(enhance=EnhanceVideo(3.0)).hooks(dit, 21))
    gains = []

    def gain_of(module, args):  # from the self-attention's own input: q / k after their norms, before RoPE
        x_in, heads = args[0], module.num_heads
        q = module.norm_q(module.q(x_in)).unflatten(-1, (heads, -1))
        k = module.norm_k(module.k(x_in)).unflatten(-1, (heads, -1))
        gains.append(naive_gain(q, k, 4, 3.0).float())

    def scale(module, args):  # the attention output times the gain, before the output projection (the wrapper's)
        return (args[0] * gains[-1][:, None, None],)

    handles = [h for b in dit.blocks for h in (b.self_attn.register_forward_pre_hook(gain_of),
                                               b.self_attn.o.register_forward_pre_hook(scale))]
    try:
        with torch.no_grad():
            want = dit(x, t, **cond)
    finally:
        for h in handles:
            h.remove()
    gains = [g.item() for g in gains]
    with torch.no_grad():
        got = fn(x, t, ctx(0))
        plain = dit(x, t, **cond)
    assert max(gains) > 1.0  # the gain acts on this model (not clamped to 1 everywhere)
    assert (got - want).abs().max().item() < 1e-4
    assert (got - plain).abs().max().item() > 1e-3


# -- RIFLEx ---------------------------------------------------------------------------------------
def test_riflex_table_and_index():
    head_dim, grid = 64, (7, 2, 3)
    dt = rope_split(head_dim)[0]
    table = rope_table(grid, head_dim, riflex=(2, 7))
    inv = 1.0 / 10000 ** (np.arange(0, dt, 2) / dt)
    inv[1] = 0.9 * 2 * np.pi / 7
    want = np.outer(np.arange(7), inv)  # the time channels of the first token of each frame
    got = torch.angle(table.reshape(7, 6, -1)[:, 0, : dt // 2]).double().numpy()
    assert np.allclose(np.angle(np.exp(1j * want)), got, atol=1e-6)
    plain = rope_table(grid, head_dim)
    assert torch.equal(plain[:, dt // 2:], table[:, dt // 2:])  # height / width untouched
    assert intrinsic_index(128, 21) == 4  # Wan2.1 (head 128, 81 frames): the period nearest 21 latent frames
    periods = 2 * np.pi / (1.0 / 10000 ** (np.arange(0, 44, 2) / 44))
    assert np.argmin(abs(periods - 21)) + 1 == 4
    with pytest.raises(ValueError):
        rope_table(grid, head_dim, riflex=(99, 7))


def test_riflex_hook_applies_when_longer_than_trained(dit, models):
    x, t, cond, _ = inputs(3, frames=6)
    auto = RiflexHook(Riflex(), dit.config.head_dim, train_frames=4)
    seen = []

    class Spy(BlockHook):
        order = 20

        def around_blocks(self, run, tokens, inp, step):
            seen.append(inp.rope)
            return run(tokens, inp, step)

    spy = Spy()
    with torch.no_grad():
        dit(x, t, **cond, hooks=(auto, spy), step=ctx(0))
        dit(x, t, **cond, hooks=(RiflexHook(Riflex(), dit.config.head_dim, train_frames=6), spy), step=ctx(0))
        dit(x, t, **cond, hooks=(RiflexHook(Riflex(3), dit.config.head_dim, train_frames=6), spy), step=ctx(0))
    grid = (6, 2, 2)
    assert torch.equal(seen[0], rope_table(grid, dit.config.head_dim, riflex=(auto.k, 6)))  # 6 > 4: applied
    assert torch.equal(seen[1], rope_table(grid, dit.config.head_dim))  # 6 frames, trained on 6: left alone
    assert torch.equal(seen[2], rope_table(grid, dit.config.head_dim, riflex=(3, 6)))  # an explicit k always
    assert not torch.equal(seen[0], seen[1])
    assert parse_riflex("off") is None and parse_riflex(0) is None and parse_riflex("auto") == Riflex()
    assert parse_riflex("6") == Riflex(6)
    with pytest.raises(KinemaError, match="riflex 'sometimes'"):
        parse_riflex("sometimes")


# -- the Python API -------------------------------------------------------------------------------
def test_each_extra_changes_the_output_and_is_recorded(models):
    base = run(models)
    cases = {"skip_layers": "1,2", "cfg_zero_star": True, "enhance": 2.0, "riflex": 2}
    for name, value in cases.items():
        got = run(models, **{name: value})
        assert (got - base).abs().max().item() > 1e-3, name
    pipe = Pipeline(models)
    job = pipe.prepare(PROMPT, size=(32, 32), frame_num=9, steps=6, skip_layers=[1, 2], cfg_zero_star={"zero_init_steps": 2},
                       enhance=EnhanceVideo(2.0, 0.1, 0.9), riflex="auto", progress=False)
    rec = pipe.record(job, False)
    assert rec["slg"] == "1,2" and rec["slg_start"] == 0.1 and rec["slg_mode"] == "uncond"
    assert rec["cfg_zero_star"] is True and rec["zero_init_steps"] == 2
    assert rec["feta"] == 2.0 and rec["feta_start"] == 0.1 and rec["feta_end"] == 0.9 and rec["riflex"] == "auto"
    assert "slg" not in pipe.record(pipe.prepare(PROMPT, progress=False), False)


def test_extras_errors_name_the_value(models):
    pipe = Pipeline(models)
    cases = [(dict(skip_layers="9"), "do not exist: this DiT has 4 blocks"),
             (dict(skip_layers="a,b"), "'a,b' is not a list of block indices"),
             (dict(skip_layers="1", guide_scale=1.0), "raise the guide scale or use the sd3 mode"),
             (dict(skip_layers={"blocks": "1", "start": 0.9, "end": 0.2}), "0 <= start <= end <= 1"),
             (dict(skip_layers={"blocks": "1", "mode": "sd35"}), "mode 'sd35'"),
             (dict(skip_layers={"blocks": "1", "when": 1}), "no field 'when'"),
             (dict(cfg_zero_star={"zero_init_steps": -1}), "zero_init_steps -1"),
             (dict(enhance=-1.0), "weight -1.0"),
             (dict(enhance="strong"), "enhance 'strong'"),
             (dict(riflex=99), "RIFLEx index 99 does not exist"),
             (dict(riflex=-2), "RIFLEx index -2")]
    for kw, text in cases:
        with pytest.raises(KinemaError, match=None) as e:
            pipe.prepare(PROMPT, progress=False, **kw)
        assert text in str(e.value), (kw, str(e.value))
    assert parse_extras(skip_layers=None) == Extras()


def test_extras_take_the_models_defaults(models):
    """A model may declare its skip-layer guidance and Enhance-A-Video (sample_defaults.slg / .feta: what suits its
    depth and length); fields not given come from it, then from the wrapper's defaults (block 10, steps 10-100%;
    weight 2 over every step)."""
    from dataclasses import replace

    from kinema.loading.dit import ModelInfo

    own = replace(models, info=ModelInfo(models.info.tasks, {"slg": {"blocks": [2], "start": 0.0, "end": 0.5},
                                                            "feta": {"weight": 1.0, "end": 0.8}}))
    pipe = Pipeline(own)
    for value in (True, "default", {}):
        assert pipe.prepare(PROMPT, skip_layers=value, progress=False).extras.skip_layers == SkipLayers((2,), 0.0, 0.5)
    assert pipe.prepare(PROMPT, skip_layers="1", progress=False).extras.skip_layers == SkipLayers((1,), 0.0, 0.5)
    assert pipe.prepare(PROMPT, skip_layers={"end": 1.0}, progress=False).extras.skip_layers == SkipLayers((2,), 0.0, 1.0)
    assert pipe.prepare(PROMPT, skip_layers={"blocks": "default", "mode": "sd3"},  # the command line's --slg default
                        progress=False).extras.skip_layers == SkipLayers((2,), 0.0, 0.5, "sd3")
    explicit = SkipLayers((3,), 0.2, 0.4)
    assert pipe.prepare(PROMPT, skip_layers=explicit, progress=False).extras.skip_layers == explicit
    assert run(own, skip_layers=True).equal(run(models, skip_layers={"blocks": "2", "start": 0.0, "end": 0.5}))
    # a model without its own: the wrapper's defaults (block 10, which this 4-block DiT lacks)
    with pytest.raises(KinemaError, match="blocks 10 do not exist: this DiT has 4 blocks"):
        Pipeline(models).prepare(PROMPT, skip_layers=True, progress=False)
    assert Pipeline(models).prepare(PROMPT, skip_layers="1", progress=False).extras.skip_layers == SkipLayers((1,), 0.1, 1.0)
    for value, want in ((True, EnhanceVideo(1.0, 0.0, 0.8)), ("default", EnhanceVideo(1.0, 0.0, 0.8)),
                        (3.0, EnhanceVideo(3.0, 0.0, 0.8)), ({"weight": "default", "start": 0.2}, EnhanceVideo(1.0, 0.2, 0.8)),
                        (EnhanceVideo(2.0), EnhanceVideo(2.0))):
        assert pipe.prepare(PROMPT, enhance=value, progress=False).extras.enhance == want, value
    assert Pipeline(models).prepare(PROMPT, enhance=True, progress=False).extras.enhance == EnhanceVideo(2.0, 0.0, 1.0)
    assert run(own, enhance="default").equal(run(models, enhance={"weight": 1.0, "end": 0.8}))


# -- the command line and the wrapper's nodes --------------------------------------------------------
def test_cli_flags_record_and_repeat(tmp_path, capsys):
    from kinema.cli.main import main
    from kinema.demo import write_random_checkpoint
    from kinema.media import read_metadata, read_video

    ckpt = tmp_path / "Wan2.1-T2V-tiny"
    write_random_checkpoint(ckpt)
    gen = ["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(ckpt), "--size", "32*32", "--frame_num", "9",
           "--sample_steps", "3", "--prompt", PROMPT, "--base_seed", "5"]
    out = tmp_path / "a.webp"  # lossless webp: exact frames (libx264's are not reproducible run to run)
    assert main([*gen, "--save_file", str(out), "--lossless", "--slg", "1", "--slg_start", "0.0", "--cfg_zero_star", "--feta", "2",
                 "--riflex", "3"]) == 0
    meta = read_metadata(out)
    assert meta["slg"] == "1" and meta["slg_start"] == 0.0 and meta["cfg_zero_star"] is True
    assert meta["feta"] == 2.0 and meta["riflex"] == "3"
    again = tmp_path / "b.webp"
    assert main(["generate", "--from", str(out), "--ckpt_dir", str(ckpt), "--save_file", str(again), "--lossless"]) == 0
    assert np.array_equal(read_video(out)[0], read_video(again)[0])
    plain = tmp_path / "c.webp"
    assert main([*gen, "--save_file", str(plain), "--lossless"]) == 0
    assert not np.array_equal(read_video(out)[0], read_video(plain)[0])
    capsys.readouterr()
    for flags, text in ((["--slg_start", "0.2"], "--slg_start tunes --slg"), (["--slg", "7"], "blocks 7 do not exist"),
                        (["--zero_init_steps", "2"], "--zero_init_steps tunes --cfg_zero_star"),
                        (["--riflex", "x"], "--riflex 'x'")):
        assert main([*gen, "--save_file", str(tmp_path / "d.mp4"), *flags]) == 2
        assert text in capsys.readouterr().err


def test_wrapper_nodes_equal_the_pipeline(tmp_path):
    import kinema
    import kinema.workflow.nodes  # noqa: F401
    from kinema.workflow.context import ExecutionContext, ModelCache
    from kinema.workflow.folders import ModelFolders
    from kinema.workflow.types import NODES

    for d in ("output", "input", "temp"):
        (tmp_path / d).mkdir()
    c = ExecutionContext(ModelFolders(), tmp_path / "output", tmp_path / "input", tmp_path / "temp", models=ModelCache())

    def call(class_type, **kw):
        return NODES[class_type].fn(c, **kw)

    (model,) = call("WanVideoModelLoader", model="kinema_builtin_dit.safetensors", base_precision="fp32",
                    quantization="disabled", load_device="main_device", attention_mode="sdpa")
    (t5,) = call("LoadWanVideoT5TextEncoder", model_name="kinema_builtin_umt5.safetensors", precision="fp32")
    (embeds,) = call("WanVideoEmptyEmbeds", width=64, height=64, num_frames=9)
    (text,) = call("WanVideoTextEncode", positive_prompt=PROMPT, negative_prompt="", t5=t5)
    (feta,) = call("WanVideoEnhanceAVideo", weight=2.0, start_percent=0.0, end_percent=0.5)
    (slg,) = call("WanVideoSLG", blocks="2,3", start_percent=0.25, end_percent=1.0)
    (exp,) = call("WanVideoExperimentalArgs", video_attention_split_steps="", cfg_zero_star=True, use_zero_init=True,
                  zero_star_steps=0)
    samples, _ = call("WanVideoSampler", model=model, image_embeds=embeds, text_embeds=text, steps=4, cfg=4.0, shift=3.0,
                      seed=42, scheduler="unipc", riflex_freq_index=2, feta_args=feta, slg_args=slg,
                      experimental_args=exp)
    pipe = kinema.Pipeline.load()
    ref = pipe(PROMPT, size="64*64", frame_num=9, steps=4, shift=3.0, guide_scale=4.0, seed=42, negative_prompt="",
               enhance=EnhanceVideo(2.0, 0.0, 0.5), skip_layers=SkipLayers((2, 3), 0.25, 1.0),
               cfg_zero_star=CFGZeroStar(1), riflex=2, decode=False, progress=False)
    assert (samples["samples"][0] - ref.latents.cpu()).abs().max().item() <= 1e-6
    with pytest.raises(KinemaError, match="WanVideoExperimentalArgs.use_fresca"):
        call("WanVideoExperimentalArgs", use_fresca=True)
