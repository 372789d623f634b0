"""Training smoke runs of each trainer (VAE, DiT, LoRA): the loss on a fixed batch goes down, an
interrupted run resumes bit for bit, the exports load through the public loaders, and bad input
fails before training starts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import kinema
from kinema.errors import KinemaError
from kinema.toy import world
from kinema.train import config as configs
from kinema.train.loop import TrainTask, checkpoints, step_generator, train

TINY_VAE = dict(dim=4, dim_mult=[1, 2, 2, 2], width=32, height=32, frames=5, train_frames=5, crop=16, batch_size=2,
                holdout_clips=2, stats_clips=4, lr=2e-3, warmup_steps=1, log_every=1, threads=1)
TINY_DIT = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_len=16, text_dim=16, text_ffn_dim=32, text_heads=2,
                text_layers=1, clip_image_size=32, clip_patch=16, clip_dim=16, clip_heads=1, clip_layers=2,
                pool_size=16, pool_frames=[5], pool_frame_shares=[1.0], width=32, height=32, frames=5, batch_size=4,
                lr=2e-3, warmup_steps=1, log_every=1, sample_steps=2, threads=1, ema=0.9, temporal_weight=1.0)


class Interrupt(Exception):
    pass


class StopAt(TrainTask):
    """Wraps a task and dies (without any saving) when asked for step `stop` - like a killed process."""

    def __init__(self, task, stop):
        self.task, self.stop, self.name = task, stop, task.name

    def modules(self):
        return self.task.modules()

    def trainable(self):
        return self.task.trainable()

    def loss(self, step, generator):
        if step == self.stop:
            raise Interrupt
        return self.task.loss(step, generator)


def _fixed_loss(task, step=10_000) -> float:
    with torch.no_grad():
        return float(task.loss(step, step_generator(1, step))[0])


def _states(task) -> dict:
    return {f"{n}.{k}": v.clone() for n, m in task.modules().items() for k, v in m.state_dict().items()}


def _check_trainer(make_task, cfg_cls, values, tmp_path, steps=8):
    straight = configs.build(cfg_cls, {**values, "output_dir": str(tmp_path / "a"), "steps": steps, "checkpoint_every": 3})
    task = make_task(straight)
    before = _fixed_loss(task)
    result = train(task, straight, progress=False)
    after = _fixed_loss(task)
    assert result["finished"] and after < before, (before, after)
    expected = _states(task)

    resumed = configs.build(cfg_cls, {**values, "output_dir": str(tmp_path / "b"), "steps": steps, "checkpoint_every": 3})
    with pytest.raises(Interrupt):
        train(StopAt(make_task(resumed), 5), resumed, progress=False)  # dies at step 5: the step-3 checkpoint is kept
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000003.pt"]
    task_b = make_task(resumed)
    train(task_b, resumed, progress=False)
    got = _states(task_b)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after resuming"
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, steps + 1))
    return tmp_path / "a" / "model"


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    from kinema.train.vae import VAEConfig, VAETask

    tmp = tmp_path_factory.mktemp("vae")
    return _check_trainer(lambda c: VAETask(c, torch.device("cpu")), VAEConfig, TINY_VAE, tmp)


@pytest.fixture(scope="module")
def dit_model(tmp_path_factory, vae_model):
    from kinema.train.dit import DiTTask, DiTTrainConfig

    tmp = tmp_path_factory.mktemp("dit")
    return _check_trainer(lambda c: DiTTask(c, torch.device("cpu")), DiTTrainConfig, {**TINY_DIT, "vae": str(vae_model)}, tmp)


def _final_checkpoint(model_folder):
    """The last checkpoint of the run that exported `model_folder` (saved at its final step)."""
    return torch.load(checkpoints(model_folder.parent)[-1], weights_only=False)


def test_vae_trainer_learns_resumes_and_exports(vae_model):
    from kinema.train.vae import VAEConfig, holdout

    vae = kinema.load_vae(vae_model)
    cfg = json.loads((vae_model / "vae" / "config.json").read_text())
    assert vae.latents_mean == pytest.approx(cfg["latents_mean"]) and len(vae.latents_std) == 16
    assert vae.latents_std == pytest.approx(cfg["latents_std"])
    out = vae.decode(vae.encode(torch.zeros(1, 3, 5, 32, 32)))
    assert out.shape == (1, 3, 5, 32, 32)
    # The export is the trained weights (no EMA here), in float32: those of the final checkpoint, bit for bit.
    final = _final_checkpoint(vae_model)
    assert final["step"] == 8
    got, want = vae.state_dict(), final["modules"]["vae"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # The exported statistics are this encoder's on the held-out stats clips: they normalise them to 0 / 1.
    run = configs.build(VAEConfig, {**TINY_VAE, "output_dir": str(vae_model.parent)})
    z = torch.cat([vae.encode(v[None]) for v in holdout(run, run.stats_clips)]).transpose(0, 1).flatten(1)  # [16, N]
    torch.testing.assert_close(z.mean(1), torch.zeros(16), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(1), torch.ones(16), rtol=0, atol=1e-4)


def test_dit_trainer_learns_resumes_and_exports(dit_model):
    from kinema.loading.dit import dtype_policy

    pipe = kinema.Pipeline.load(dit_model)
    dit = pipe.models.dit
    assert dit.config.model_type == "i2v" and dit.config.text_len == 16 and "t2v" in pipe.models.info.tasks
    # The export holds the EMA weights (ema = 0.9) of the final step, rounded to fp16 outside the fp32 islands.
    # The EMA shadow follows the trainable parameters, the DiT's first.
    final = _final_checkpoint(dit_model)
    stored = dtype_policy(torch.float16)
    names = [n for n, _ in dit.named_parameters()]
    ema = dict(zip(names, final["ema"]))
    params = dict(dit.named_parameters())
    for n in names:
        assert torch.equal(params[n], ema[n].to(stored(n)).float()), n
    raw = final["modules"]["dit"]
    assert any(not torch.equal(raw[n].to(stored(n)), ema[n].to(stored(n))) for n in names)  # EMA != raw weights

    te = pipe.models.text_encoder
    assert te.tokenizer.token_ids("a red circle moving right on a black background")[:-1] == te.tokenizer.token_ids(
        "A Red circle moving right on a black background")[:-1]  # word-level, case-folded
    for task, extra in (("t2v", {}), ("t2i", {}), ("i2v", {"image": torch.zeros(3, 32, 32)}),
                        ("flf2v", {"first_frame": torch.zeros(3, 32, 32), "last_frame": torch.zeros(3, 32, 32)})):
        out = pipe("a red circle moving right on a black background", task=task, steps=2, progress=False, **extra)
        assert out.video.shape == (3, 1 if task == "t2i" else 5, 32, 32), task
        assert out.settings["width"] == 32  # the model's own default size
    long = " ".join(["a red circle moving right on a black background"] * 3)  # more tokens than text_len = 16
    assert pipe(long, steps=1, progress=False).video.shape == (3, 5, 32, 32)


def test_vae_decoder_only_keeps_the_latents(vae_model, tmp_path):
    """train_encoder=False: the encoder (so every latent, and the exported latent statistics) stays as it was."""
    from kinema.train.vae import VAEConfig, VAETask

    cfg = configs.build(VAEConfig, {**TINY_VAE, "output_dir": str(tmp_path), "steps": 4, "init_from": str(vae_model),
                                    "train_encoder": False, "data_seed": 9, "temporal_weight": 1.0,
                                    "seed": 123})  # held-out clips other than the model's: stats measured anew would differ
    task = VAETask(cfg, torch.device("cpu"))
    assert "temporal" in task.loss(0, torch.Generator().manual_seed(0))[1]
    before = _states(task)
    train(task, cfg, progress=False)
    after = _states(task)
    enc = [k for k in before if k.startswith(("vae.encoder.", "vae.conv1."))]
    dec = [k for k in before if k.startswith("vae.decoder.")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    old, new = (json.loads((p / "vae" / "config.json").read_text()) for p in (vae_model, tmp_path / "model"))
    assert new["latents_mean"] == old["latents_mean"] and new["latents_std"] == old["latents_std"]
    # started from a training checkpoint (no stats in it): the run measures them and exports
    again = configs.build(VAEConfig, {**TINY_VAE, "output_dir": str(tmp_path / "again"), "steps": 1,
                                      "init_from": str(tmp_path), "train_encoder": False, "seed": 123})
    assert train(VAETask(again, torch.device("cpu")), again, progress=False)["finished"]
    assert len(json.loads((tmp_path / "again" / "model" / "vae" / "config.json").read_text())["latents_mean"]) == \
        len(old["latents_mean"])


def test_vae_temporal_term_costs_a_jump_between_frames():
    """edge_l1 along time (temporal_weight): a reconstruction that jumps where the clip moves smoothly costs the
    jump; one with the clip's own frame-to-frame change (whatever its constant offset) costs nothing."""
    from kinema.train.vae import edge_l1

    ramp = torch.linspace(-0.5, 0.5, 9)[None, None, :, None, None].expand(1, 3, 9, 4, 4)
    w = torch.ones_like(ramp[:, :1])
    assert edge_l1(ramp + 0.2, ramp, w, dims=(2,)).item() == pytest.approx(0.0, abs=1e-7)
    jumpy = ramp.clone()
    jumpy[:, :, 5:] += 0.3  # a step where a latent frame's pixel frames meet the next's
    assert edge_l1(jumpy, ramp, w, dims=(2,)).item() == pytest.approx(0.3 / 8, rel=1e-5)  # one of 8 differences
    assert edge_l1(jumpy, ramp, w).item() == pytest.approx(0.0, abs=1e-7)  # the spatial edges do not see it


@pytest.mark.parametrize("source", ["model", "run"])
def test_dit_init_from_starts_from_those_weights(dit_model, tmp_path, source):
    """init_from (an exported model folder or a run folder) sets the DiT, umT5 and CLIP and the tokenizer."""
    from kinema.train.dit import DiTTask, DiTTrainConfig

    path = dit_model if source == "model" else dit_model.parent
    cfg = configs.build(DiTTrainConfig, {**TINY_DIT, "vae": str(dit_model), "output_dir": str(tmp_path / "c"),
                                         "init_from": str(path)})
    task = DiTTask(cfg, torch.device("cpu"))
    want = {"dit": kinema.load_dit(dit_model), "t5": kinema.load_text_encoder(dit_model).model,
            "clip": kinema.load_clip_vision(dit_model).model}
    if source == "run":  # the run's latest checkpoint
        want = torch.load(sorted((path / "checkpoints").glob("*.pt"))[-1], weights_only=False)["modules"]
    for name, module in task.modules().items():
        ref = want[name] if source == "run" else want[name].state_dict()
        for k, v in module.state_dict().items():
            assert torch.equal(v.float(), ref[k].float()), f"{name}.{k}"
    assert (tmp_path / "c" / "tokenizer" / "spiece.model").read_bytes() == (dit_model / "tokenizer" / "spiece.model").read_bytes()
    bad = configs.build(DiTTrainConfig, {**TINY_DIT, "dim": 64, "vae": str(dit_model), "output_dir": str(tmp_path / "d"),
                                         "init_from": str(dit_model)})
    with pytest.raises(KinemaError, match="does not match this config"):
        DiTTask(bad, torch.device("cpu"))


def test_dit_init_from_keeps_the_models_declarations(dit_model, tmp_path):
    """A fine-tune keeps what its init model declares beyond the trainer's own defaults (the guidance extras'
    settings, its context windows: chosen for those weights), the windows only when the clip length is the same."""
    import json
    import shutil

    from kinema.train.dit import DiTTask, DiTTrainConfig

    model = shutil.copytree(dit_model, tmp_path / "init")
    config = model / "transformer" / "config.json"
    c = json.loads(config.read_text())
    extras = {"slg": {"blocks": [0]}, "feta": {"weight": 0.5}, "context": {"frames": 5, "overlap": 4}}
    c["sample_defaults"] = {**c["sample_defaults"], **extras, "steps": 99}
    config.write_text(json.dumps(c))
    for frames, want in ((5, extras), (9, {k: v for k, v in extras.items() if k != "context"})):
        cfg = configs.build(DiTTrainConfig, {**TINY_DIT, "frames": frames, "vae": str(dit_model),
                                             "output_dir": str(tmp_path / f"run{frames}"), "init_from": str(model)})
        got = DiTTask(cfg, torch.device("cpu")).info.sample_defaults
        assert {k: got[k] for k in extras if k in got} == want
        assert got["steps"] == cfg.sample_steps and got["frame_num"] == frames  # the run's own defaults win


def test_lora_trainer_learns_resumes_and_exports(dit_model, tmp_path):
    from kinema.lora import load_lora
    from kinema.train.lora import LoRATask, LoRATrainConfig

    values = {**TINY_DIT, "base": str(dit_model), "rank": 2, "alpha": 2.0, "pool_size": 8, "lr": 1e-2, "ema": 0.0}
    model = _check_trainer(lambda c: LoRATask(c, torch.device("cpu")), LoRATrainConfig, values, tmp_path, steps=6)
    weights = load_lora(model / "lora.safetensors", kinema.load_dit(dit_model))
    assert "blocks.0.self_attn.q" in weights and weights["blocks.0.self_attn.q"][0].shape[0] == 2
    # every adapter of the final step (no EMA), with its alpha
    adapters = _final_checkpoint(model)["modules"]["lora"]
    names = {k.rsplit(".", 1)[0] for k in adapters}
    assert set(weights) == {n.replace("__", ".") for n in names}
    for n in names:
        A, B, alpha = weights[n.replace("__", ".")]
        assert torch.equal(A, adapters[f"{n}.A"]) and torch.equal(B, adapters[f"{n}.B"]) and alpha == 2.0, n
    assert any(B.abs().max() > 0 for _, B, _ in weights.values())  # trained: B no longer its zero init


def _kinema(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kinema.cli.main", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("problem", ["unknown_key", "missing_video", "unreadable_video", "empty_folder", "bad_json"])
def test_train_bad_input_fails_before_training(tmp_path, problem):
    cfg = {"output_dir": str(tmp_path / "run"), "steps": 2}
    data = tmp_path / "data"
    data.mkdir()
    if problem == "unknown_key":
        cfg["learning_rate"] = 1e-4
    elif problem == "missing_video":
        (data / "captions.json").write_text(json.dumps([{"file": "nope.mp4", "text": "a clip"}]))
        cfg["data"] = str(data)
    elif problem == "unreadable_video":
        (data / "clip.mp4").write_bytes(b"not a video at all" * 100)
        (data / "captions.json").write_text(json.dumps([{"file": "clip.mp4", "text": "a clip"}]))
        cfg["data"] = str(data)
    elif problem == "empty_folder":
        cfg["data"] = str(data)
    path = tmp_path / "cfg.json"
    path.write_text("{not json" if problem == "bad_json" else json.dumps(cfg))
    r = _kinema("train", "vae", str(path))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("kinema: error:") and "Traceback" not in err
    expect = {"unknown_key": "learning_rate", "missing_video": "nope.mp4", "unreadable_video": "clip.mp4",
              "empty_folder": str(data.name), "bad_json": "not valid JSON"}[problem]
    assert expect in err, err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_config_type_errors():
    from kinema.train.vae import VAEConfig

    with pytest.raises(KinemaError, match="'steps' must be an integer"):
        configs.build(VAEConfig, {"steps": "many"})
    with pytest.raises(KinemaError, match="train_frames"):
        configs.build(VAEConfig, {"train_frames": 4})


def test_resume_refuses_a_different_config(tmp_path):
    from kinema.train.vae import VAEConfig, VAETask

    cfg = configs.build(VAEConfig, {**TINY_VAE, "output_dir": str(tmp_path), "steps": 2, "checkpoint_every": 1})
    train(VAETask(cfg, torch.device("cpu")), cfg, progress=False)
    other = configs.build(VAEConfig, {**TINY_VAE, "output_dir": str(tmp_path), "steps": 4, "lr": 1e-3})
    with pytest.raises(KinemaError, match="different config"):
        train(VAETask(other, torch.device("cpu")), other, progress=False)


class SlowLine(TrainTask):
    """A one-weight regression whose steps take about `seconds` each: a stand-in for a trainer of known speed."""

    name = "line"

    def __init__(self, seconds: float):
        torch.manual_seed(0)
        self.model, self.seconds = torch.nn.Linear(4, 1), seconds

    def modules(self):
        return {"line": self.model}

    def loss(self, step, generator):
        import time

        time.sleep(self.seconds)
        x = torch.randn(8, 4, generator=generator)
        return (self.model(x).squeeze(1) - x.sum(1)).pow(2).mean(), {}


def test_budget_fits_steps_to_the_time_and_resume_keeps_them(tmp_path):
    values = dict(output_dir=str(tmp_path), steps=100_000, warmup_steps=25, budget_minutes=0.03, checkpoint_every=5,
                  log_every=1)
    cfg = configs.build(configs.TrainConfig, values)
    with pytest.raises(Interrupt):  # killed after the fit (step 21), before the end
        train(StopAt(SlowLine(0.01), 40), cfg, progress=False)
    fitted = json.loads((tmp_path / "config.json").read_text())["steps"]
    # 1.8 s at ~0.01 s/step, less the 5% reserve and the steps already done: about 150 (sleep only ever overshoots)
    assert 40 < fitted < 175, fitted
    again = configs.build(configs.TrainConfig, {**values, "steps": 7})  # the config's steps no longer count
    result = train(SlowLine(0.01), again, progress=False)
    assert result["finished"] and result["step"] == fitted
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, fitted + 1))


def test_budget_needs_the_probe_inside_the_warmup(tmp_path):
    cfg = configs.build(configs.TrainConfig, dict(output_dir=str(tmp_path), warmup_steps=5, budget_minutes=1.0))
    with pytest.raises(KinemaError, match="warmup_steps >= 21"):
        train(SlowLine(0.0), cfg, progress=False)


def test_world_clips_render_alike_in_worker_processes_and_the_pool_crops_them():
    from kinema.train.world_data import ClipPool, clip_batch, render_clips

    serial, specs = render_clips(3, range(10, 74), 32, 32, 5, random_colors=0.3, workers=1)
    parallel, specs_p = render_clips(3, range(10, 74), 32, 32, 5, random_colors=0.3, workers=2)
    assert specs == specs_p and np.array_equal(serial, parallel)
    video, batch_specs = clip_batch(3, 5, 2, 32, 32, 5, random_colors=0.3)  # step 5 of batch 2 = clips 10 and 11
    assert batch_specs == specs[:2] and torch.equal(video, torch.stack([world.to_tensor(c) for c in serial[:2]]))

    pool = ClipPool(3, 16, 32, 32, 5, tuple(world.COLORS), 0.0)
    a, b = pool.batch(7, 4, 16), pool.batch(7, 4, 16)
    assert a.shape == (4, 3, 5, 16, 16) and torch.equal(a, b) and not torch.equal(a, pool.batch(8, 4, 16))
    full = torch.stack([world.to_tensor(c) for c in pool.clips])  # every crop is a window of one pool clip
    for crop in a:
        assert any(torch.equal(crop, c[:, :, y : y + 16, x : x + 16]) for c in full for y in range(17) for x in range(17))


def test_slow_clips_slow_some_objects_down_and_leave_the_rest_as_they_were():
    from kinema.train.world_data import ClipPool, render_clips

    plain, specs = render_clips(4, range(40), 32, 32, 5, random_colors=0.3, workers=1)
    slow, slow_specs = render_clips(4, range(40), 32, 32, 5, random_colors=0.3, workers=1, slow=0.5)
    changed = [i for i, (a, b) in enumerate(zip(specs, slow_specs)) if a != b]
    assert 8 <= len(changed) <= 32  # about half the clips
    for i, (a, b) in enumerate(zip(specs, slow_specs)):  # the same clip otherwise: only its travel is shorter
        assert (a.color, a.shape, a.direction, a.background, a.size, a.start) == \
            (b.color, b.shape, b.direction, b.background, b.size, b.start)
        assert b.travel <= a.travel and (b.travel < a.travel) == (i in changed)
        assert np.array_equal(plain[i, 0], slow[i, 0])  # the first frame is where the object starts either way
    i = changed[0]
    from kinema.toy.analyse import analyse

    assert analyse(slow[i]).moved < analyse(plain[i]).moved - 1  # pixels travelled over the clip
    assert np.array_equal(ClipPool(4, 40, 32, 32, 5, tuple(world.COLORS), 0.3, 0.5).clips, slow)
    with pytest.raises(KinemaError, match="slow_clips 1.5 is a share of the clips"):
        configs.build(__import__("kinema.train.vae", fromlist=["VAEConfig"]).VAEConfig, {**TINY_VAE, "slow_clips": 1.5})


def test_vae_trains_from_a_clip_pool(tmp_path):
    from kinema.train.vae import VAEConfig, VAETask

    cfg = configs.build(VAEConfig, {**TINY_VAE, "output_dir": str(tmp_path), "steps": 2, "pool_size": 8})
    task = VAETask(cfg, torch.device("cpu"))
    assert task.pool.clips.shape == (8, 5, 32, 32, 3) and task.batch(1).shape == (2, 3, 5, 16, 16)
    full = torch.stack([world.to_tensor(c) for c in task.pool.clips])  # every crop is a window of a pool clip
    for crop in task.batch(1):
        assert any(torch.equal(crop, c[:, :, y : y + 16, x : x + 16]) for c in full for y in range(17) for x in range(17))
    assert torch.equal(task.batch(1), VAETask(cfg, torch.device("cpu")).batch(1))  # a resumed run sees the same data
    assert train(task, cfg, progress=False)["finished"]


def test_dit_world_pool_is_the_same_rendered_in_parallel(monkeypatch):
    from kinema.train import dit

    cfg = configs.build(dit.DiTTrainConfig, {**TINY_DIT, "pool_size": 70})

    def pool():
        (key, count, batches), = dit._world_groups(cfg, tuple(world.COLORS))
        return [(v, c) for v, c in batches]

    serial = pool()
    monkeypatch.setattr(dit, "default_workers", lambda: 2)
    parallel = pool()
    assert [len(c) for _, c in serial] == [16, 16, 16, 16, 6] and [c for _, c in serial] == [c for _, c in parallel]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(serial, parallel))


def test_distill_trainer_learns_resumes_and_exports(dit_model, tmp_path):
    """kinema train distill: the teacher's trajectories are kept, the student LoRA learns, resumes, and its file
    says the sampling it is made for (which then becomes the model's default)."""
    from kinema.lora import lora_metadata
    from kinema.train.distill import DistillConfig, DistillTask

    values = {**TINY_DIT, "base": str(dit_model), "rank": 2, "alpha": 2.0, "trajectories": 8, "trajectory_batch": 4,
              "teacher_steps": 4, "student_steps": 2, "lr": 1e-2, "ema": 0.0, "object_weight": 0.0}
    model = _check_trainer(lambda c: DistillTask(c, torch.device("cpu")), DistillConfig, values, tmp_path, steps=6)
    meta = lora_metadata(model / "lora.safetensors")
    made = json.loads(meta["sampling"])
    assert made["solver"] == "flowmatch_distill" and made["steps"] == 2 and made["guide_scale"] == 1.0
    saved = torch.load(tmp_path / "a" / "trajectories.pt", weights_only=False)["data"]
    assert saved["states"].shape[:2] == (8, 3) and len(saved["captions"]) == 8  # x at the 2 student sigmas and x0
    pipe = kinema.Pipeline.load(str(dit_model), loras=[(str(model / "lora.safetensors"), 1.0)])
    assert (pipe.prepare("x").settings.solver, pipe.prepare("x").settings.steps) == ("flowmatch_distill", 2)
    with pytest.raises(KinemaError, match="multiple of student_steps"):
        configs.build(DistillConfig, {**values, "teacher_steps": 5})


def test_upscaler_trainer_learns_resumes_and_exports(vae_model, tmp_path):
    from kinema.train.upscaler import UpscalerTask, UpscalerTrainConfig
    from kinema.upscale import load_upscaler

    values = dict(low=16, crop=8, pool_size=4, batch_size=2, clip_frames=3, frames=5, dim=8, blocks=1,
                  feature_vae=str(vae_model), adversarial_weight=0.0, holdout_clips=1, lr=3e-3, warmup_steps=1,
                  log_every=1, threads=1, ema=0.0)
    model = _check_trainer(lambda c: UpscalerTask(c, torch.device("cpu")), UpscalerTrainConfig, values, tmp_path)
    up = load_upscaler(model / "stage.safetensors", 2)
    assert up.model(torch.zeros(1, 3, 2, 16, 16)).shape == (1, 3, 2, 32, 32)
    # with the adversarial term the discriminator trains too
    cfg = configs.build(UpscalerTrainConfig, {**values, "adversarial_weight": 0.01, "adversarial_start": 0, "steps": 2,
                                              "output_dir": str(tmp_path / "adv")})
    task = UpscalerTask(cfg, torch.device("cpu"))
    disc = {k: v.clone() for k, v in task.disc.state_dict().items()}
    train(task, cfg, progress=False)
    assert any(not torch.equal(v, task.disc.state_dict()[k]) for k, v in disc.items())


def test_known_weights_mark_the_latent_frames_of_known_frames():
    """flf2v on 17 frames: latent frames 0 and 4 hold its known frames (frame 16 ends the last causal chunk)."""
    from kinema.pipeline.conditioning import frame_mask
    from kinema.train.dit import known_weights

    def y(known):
        return torch.cat([frame_mask(17, known, 2, 2)[None], torch.randn(1, 16, 5, 2, 2)], dim=1)

    both = torch.cat([y([0, 16]), y([0]), y([5, 6]), y([])])
    w = known_weights(both, 3.0)
    assert w.shape == (4, 1, 5, 1, 1)
    assert w.flatten(1).tolist() == [[4, 1, 1, 1, 4], [4, 1, 1, 1, 1], [1, 1, 4, 1, 1], [1, 1, 1, 1, 1]]
    assert torch.equal(known_weights(both, 0.0), torch.ones(4, 1, 5, 1, 1))


def test_temporal_error_is_the_mean_square_of_the_frame_to_frame_change():
    """Against a direct computation; an error held over the frames costs 0, one flipping sign costs 4x its square."""
    from kinema.train.dit import temporal_error

    g = torch.Generator().manual_seed(0)
    err, w = torch.randn(2, 4, 5, 3, 3, generator=g), 1 + torch.rand(2, 1, 5, 3, 3, generator=g)
    direct = sum(((torch.maximum(w[:, :, t], w[:, :, t + 1]) * (err[:, :, t + 1] - err[:, :, t]) ** 2).sum()
                  for t in range(4)))
    norm = sum(torch.maximum(w[:, :, t], w[:, :, t + 1]).sum() * 4 for t in range(4))
    assert torch.allclose(temporal_error(err, w), direct / norm)
    held = torch.ones(1, 1, 5, 2, 2).mul(0.3)
    flips = held * torch.tensor([1.0, -1, 1, -1, 1]).view(1, 1, 5, 1, 1)
    ones = torch.ones(1, 1, 5, 2, 2)
    assert temporal_error(held, ones) == 0
    assert torch.allclose(temporal_error(flips, ones), torch.tensor(4 * 0.09))
