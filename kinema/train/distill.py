"""`kinema train distill`: a step-distillation LoRA. The base model's guided many-step sampling (the teacher)
becomes a few unguided steps of the base model plus the LoRA (the student).

- The teacher runs its own solver (UniPC by default) with guidance on a sigma grid that passes through the
  student's grid (`solver`, `student_steps`, `student_shift`: e.g. flowmatch_distill's four sigmas), each
  student interval cut into `teacher_steps / student_steps` teacher steps; its latents at the student's sigmas
  are kept (the trajectory pool, `trajectories.pt` in the run folder).
- The student learns, for each interval k, the one Euler step that lands on the teacher's next point:
  v* = (x(s_k+1) - x(s_k)) / (s_k+1 - s_k), from x(s_k) at timestep 1000 s_k, with the prompt and no
  guidance. So sampling with `solver` at `student_steps` steps and guidance 1 follows the teacher's guided
  trajectory: step and guidance distillation in one, as LightX2V's 4-step LoRAs are used.
- The result is a LoRA file like `kinema train lora`'s, its sampling settings in its metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from kinema.errors import KinemaError
from kinema.lora import lora_state_dict, save_lora
from kinema.toy import world
from kinema.train.dit import encode_text, latent_weights
from kinema.train.lora import LoRATask, LoRATrainConfig

log = logging.getLogger("kinema")


@dataclasses.dataclass
class DistillConfig(LoRATrainConfig):
    output_dir: str = "runs/distill"
    # the student: what the LoRA is made for
    solver: str = "flowmatch_distill"
    student_steps: int = 4
    student_shift: float = 0.0  # 0: the base model's own shift
    # the teacher: the base model with its own defaults unless set
    teacher_solver: str = "unipc"
    teacher_steps: int = 20  # a multiple of student_steps
    teacher_guide_scale: float = 0.0  # 0: the base model's own
    trajectories: int = 1024  # teacher samples (t2v, random world captions)
    trajectory_batch: int = 32
    pool_frames: tuple[int, ...] = (17,)
    colors: tuple[str, ...] = tuple(world.COLORS)
    rank: int = 16
    alpha: float = 16.0
    steps: int = 800
    lr: float = 5e-4
    warmup_steps: int = 30
    object_weight: float = 2.0

    def check(self) -> None:
        from kinema.sampling.schedule import DISTILLED

        if self.solver not in DISTILLED:
            raise KinemaError(f"solver {self.solver!r}: a distillation LoRA is made for one of {', '.join(DISTILLED)}.")
        if self.student_steps < 1 or self.teacher_steps % self.student_steps:
            raise KinemaError(f"teacher_steps {self.teacher_steps} must be a multiple of student_steps "
                              f"{self.student_steps} (each student step is that many teacher steps).")
        if len(self.pool_frames) != 1 or (self.pool_frames[0] - 1) % 4:
            raise KinemaError(f"pool_frames {list(self.pool_frames)}: one frame count, 4n + 1 (e.g. [17]).")


class DistillTask(LoRATask):
    name = "distill"

    def __init__(self, cfg: DistillConfig, device: torch.device):
        super().__init__(cfg, device, pool=_NO_POOL)
        self.pool = self._trajectories(Path(cfg.output_dir))

    # -- the student's grid and the teacher's ------------------------------------------------------
    def student_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        from kinema.sampling import schedule

        d = self.info.sample_defaults
        return schedule(self.cfg.solver, self.cfg.student_steps, self.cfg.student_shift or float(d.get("shift", 5.0)))

    def teacher_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmas through the student's, each student interval cut evenly; timesteps truncated as Wan's."""
        sigmas = self.student_grid()[0].double()
        per = self.cfg.teacher_steps // self.cfg.student_steps
        fine = torch.cat([torch.linspace(float(a), float(b), per + 1)[:-1] for a, b in zip(sigmas[:-1], sigmas[1:])])
        fine = torch.cat([fine, torch.zeros(1, dtype=fine.dtype)])
        return fine.float(), (fine[:-1] * 1000).to(torch.int64)

    # -- the trajectory pool -----------------------------------------------------------------------
    def _trajectories(self, out: Path) -> dict:
        c = self.cfg
        d = self.info.sample_defaults
        recipe = json.loads(json.dumps({
            "base": c.base, "trajectories": c.trajectories, "frames": c.pool_frames[0], "colors": c.colors,
            "size": [c.width, c.height], "seed": c.seed, "teacher": [c.teacher_solver, c.teacher_steps,
                                                                       c.teacher_guide_scale or d.get("guide_scale")],
            "grid": self.student_grid()[0].tolist()}))
        path = out / "trajectories.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)
            if saved.get("recipe") == recipe:
                return saved["data"]
            log.info("the trajectory recipe changed; running the teacher again")
        if any(a.B.abs().sum() > 0 for a in self.adapters.values()):
            raise KinemaError(f"{path} is missing but the LoRA has trained: the teacher must be the base model alone; "
                              "start the run in a new output_dir.")
        data = self._run_teacher()
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"recipe": recipe, "data": data}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return data

    @torch.no_grad()
    def _run_teacher(self) -> dict:
        from tqdm import tqdm

        from kinema.pipeline.guidance import Sequential, guided_model
        from kinema.sampling import initial_noise, sample

        c, d = self.cfg, self.info.sample_defaults
        scale = c.teacher_guide_scale or float(d.get("guide_scale", 5.0))
        rng = np.random.default_rng([c.seed, 31])
        frames = c.pool_frames[0]
        sigmas, timesteps = self.teacher_grid()
        per = c.teacher_steps // c.student_steps
        keep = list(range(0, c.teacher_steps + 1, per))  # the teacher's x at the student's sigmas
        empty = self.empty_condition((frames, c.height, c.width))
        states, captions = [], []
        self.dit.eval()
        bar = tqdm(total=c.trajectories, desc="teacher trajectories", unit="clip")
        for start in range(0, c.trajectories, c.trajectory_batch):
            n = min(c.trajectory_batch, c.trajectories - start)
            caps = [world.random_spec(rng, c.width, c.height, colors=tuple(c.colors)).caption for _ in range(n)]
            cond = {"context": encode_text(self.t5, self.tokenizer, caps, self.dit.config.text_len, self.device),
                    "y": empty["y"].expand(n, -1, -1, -1, -1), "clip_fea": empty["clip_fea"].expand(n, -1, -1)}
            uncond = dict(cond, context=encode_text(self.t5, self.tokenizer, [d.get("negative_prompt", "")] * n,
                                                    self.dit.config.text_len, self.device))
            noise = initial_noise((n, self.dit.config.out_dim, (frames - 1) // 4 + 1, c.height // 8, c.width // 8),
                                  int(rng.integers(2**31))).to(self.device)
            seen = [noise.cpu()]
            model_fn = guided_model(self.dit, cond, uncond, scale, Sequential())
            sample(model_fn, noise, sigmas, timesteps, c.teacher_solver, progress=False,
                   callback=lambda info: seen.append(info.latents.cpu()) if info.step + 1 in keep else None)
            states.append(torch.stack(seen, dim=1))  # [n, student_steps + 1, z, T, h, w]
            captions += caps
            bar.update(n)
        bar.close()
        self.dit.train()
        return {"states": torch.cat(states), "captions": captions}

    # -- one step ------------------------------------------------------------------------------------
    def loss(self, step, generator):
        c = self.cfg
        rng = np.random.default_rng([c.seed, step, 9])
        states, captions = self.pool["states"], self.pool["captions"]
        idx = rng.integers(0, len(captions), c.batch_size)
        k = torch.from_numpy(rng.integers(0, c.student_steps, c.batch_size))
        sigmas, timesteps = self.student_grid()
        rows = torch.from_numpy(idx)
        x = states[rows, k].to(self.device)
        nxt = states[rows, k + 1].to(self.device)
        ds = (sigmas[k + 1] - sigmas[k]).to(self.device).view(-1, 1, 1, 1, 1)
        target = (nxt - x) / ds  # the Euler velocity that lands on the teacher's next point
        frames = x.shape[2] * 4 - 3
        empty = self.empty_condition((frames, c.height, c.width))
        n = len(idx)
        context = encode_text(self.t5, self.tokenizer, [captions[i] for i in idx.tolist()], self.dit.config.text_len,
                              self.device)
        pred = self.forward(x, timesteps[k].to(self.device), context, empty["clip_fea"].expand(n, -1, -1),
                            empty["y"].expand(n, -1, -1, -1, -1))
        w = latent_weights(states[rows, -1].to(self.device), c.object_weight)
        loss = (w * (pred - target) ** 2).mean() / w.mean()
        return loss, {"interval": float(k.float().mean())}

    # -- samples and export ----------------------------------------------------------------------------
    def sampling(self) -> dict:
        """The settings the LoRA is made for (written into its metadata)."""
        d = self.info.sample_defaults
        return {"solver": self.cfg.solver, "steps": self.cfg.student_steps, "guide_scale": 1.0,
                "shift": self.cfg.student_shift or float(d.get("shift", 5.0))}

    @torch.no_grad()
    def sample(self, folder: Path, step: int) -> None:
        from kinema.toy.analyse import analyse

        folder.mkdir(parents=True, exist_ok=True)
        self.dit.eval()
        rng, pipe, report = np.random.default_rng(12345), self.pipeline(), []
        for i in range(4):
            spec = world.random_spec(rng, self.cfg.width, self.cfg.height, colors=tuple(self.cfg.colors))
            s = self.sampling()
            video = pipe(spec.caption, seed=i, progress=False, solver=s["solver"], steps=s["steps"],
                         guide_scale=s["guide_scale"], shift=s["shift"]).video
            frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            report.append({"prompt": spec.caption, "analysis": analyse(frames).caption()})
        self.dit.train()
        (folder / f"distill-step{step:07d}.json").write_text(json.dumps(report, indent=1))
        log.info("distill step %d samples: %s", step, "; ".join(f"{r['prompt']} -> {r['analysis']}" for r in report))

    def export(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        save_lora(folder / "lora.safetensors", lora_state_dict(self.dit), alpha=cfg.alpha, rank=cfg.rank,
                  overwrite=True, metadata={
                      "base": cfg.base, "producer": "kinema train distill", "sampling": json.dumps(self.sampling()),
                      "config": json.dumps(dataclasses.asdict(cfg), default=list)})


_NO_POOL = object()  # the DiT trainer's latent pool is not built: the trajectories replace it
