"""`kinema train dit`: the Wan2.1 DiT trained by flow matching, jointly with a small umT5 text
encoder and a small CLIP vision tower, the Wan-Fun / EasyAnimate way.

- Loss: flow matching, x_t = (1 - s) x0 + s eps, target v = eps - x0, with s drawn
  logit-normal (sigmoid of a normal); the DiT sees t = 1000 s as in Wan2.1.
- One set of weights for t2v, t2i, i2v and flf2v: the DiT takes the i2v input (noise +
  4-channel frame mask + the latent of the masked video, and CLIP tokens of the known
  frames). Each step trains one mode: first frame known (i2v), first and last (flf2v),
  a random span of frames, or none at all (the condition dropped: t2v, and t2i on
  single frames). Known frames are noised with sigma = exp(N(-3, 0.5)) before encoding.
- Captions are dropped for a share of samples so classifier-free guidance works.
- The VAE is frozen and loaded through `kinema.load_vae`, like any checkpoint. Clips
  are encoded once into a latent pool (`pool.pt` in the run folder), which the steps
  sample from; the pool is rebuilt only when its recipe changes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from kinema.encoders.image import ClipVisionEncoder
from kinema.encoders.text import TextEncoder
from kinema.errors import KinemaError
from kinema.loading.dit import ModelInfo
from kinema.models.clip import ClipVisionConfig, CLIPVisionTower
from kinema.models.dit import DiTConfig, WanDiT
from kinema.models.t5 import UMT5Encoder
from kinema.pipeline.conditioning import frame_mask
from kinema.text.tokenizer import UMT5Tokenizer
from kinema.toy import world
from kinema.train import config as configs
from kinema.train.loop import TrainTask, init_state
from kinema.train.world_data import default_workers, render_clips

log = logging.getLogger("kinema")

MODES = ("t2v", "i2v", "flf2v", "span")  # what is known: nothing, the first frame, first + last, a span
TASKS = ("t2v", "t2i", "i2v", "flf2v", "v2v")


@dataclasses.dataclass
class DiTTrainConfig(configs.TrainConfig):
    output_dir: str = "runs/dit"
    vae: str = "runs/vae/model"  # a VAE checkpoint (any format load_vae reads)
    # DiT
    dim: int = 256
    ffn_dim: int = 1024
    num_heads: int = 4
    num_layers: int = 8
    text_len: int = 32
    # umT5
    text_dim: int = 128
    text_ffn_dim: int = 256
    text_heads: int = 4
    text_layers: int = 2
    text_buckets: int = 32
    tokenizer_vocab: int = 64
    text_lr_scale: float = 1.0  # lr multiplier for the text encoder (0 = frozen after init)
    # CLIP
    clip_image_size: int = 64
    clip_patch: int = 16
    clip_dim: int = 64
    clip_heads: int = 2
    clip_layers: int = 3
    # data
    pool_size: int = 4000
    pool_frames: tuple[int, ...] = (17, 33, 9)
    pool_frame_shares: tuple[float, ...] = (0.8, 0.1, 0.1)
    mode_shares: tuple[float, ...] = (0.35, 0.3, 0.25, 0.1)  # t2v / i2v / flf2v / span steps
    image_share: float = 0.05  # t2i steps (single frames, no condition)
    caption_dropout: float = 0.1
    ref_noise_mean: float = -3.0  # log sigma of the noise added to known frames
    ref_noise_std: float = 0.5
    logit_mean: float = 0.0
    logit_std: float = 1.0
    object_weight: float = 0.0  # extra loss weight on latent pixels that hold the object (see latent_weights)
    known_weight: float = 0.0  # extra loss weight on latent frames that hold a known frame (i2v / flf2v / span steps)
    # weight of the frame-to-frame term (see temporal_error): a velocity error that changes from one latent frame to
    # the next (a frame whose colour or place jumps) costs more than the same error held over the frames
    temporal_weight: float = 0.0
    pool_seed: int = -1  # seed of the latent pool's clips (-1 = seed), so a run can reuse another run's pool
    colors: tuple[str, ...] = tuple(world.COLORS)
    # sampling defaults written into the exported model
    sample_steps: int = 20
    sample_shift: float = 3.0
    sample_guide_scale: float = 4.0
    lr: float = 3e-4
    ema: float = 0.998
    batch_size: int = 32

    def check(self) -> None:
        if len(self.pool_frames) != len(self.pool_frame_shares) or len(self.mode_shares) != len(MODES):
            raise KinemaError("pool_frame_shares needs one value per pool_frames entry, and mode_shares one per mode "
                              f"({', '.join(MODES)}).")
        for f in self.pool_frames:
            if (f - 1) % 4:
                raise KinemaError(f"pool_frames: {f} is not 1 + 4k.")
        unknown = [c for c in self.colors if c not in world.COLORS and c not in world.EXTRA_COLORS]
        if unknown:
            raise KinemaError(f"colors: unknown {unknown}; choose from {', '.join([*world.COLORS, *world.EXTRA_COLORS])}.")


def train_tokenizer(folder: Path, vocab_size: int) -> UMT5Tokenizer:
    """A sentencepiece model for the world's words (orange included, so a LoRA can teach it), written
    as `tokenizer/spiece.model`, the place the loaders look for it."""
    import sentencepiece as spm

    captions = world.all_captions(tuple(world.COLORS) + tuple(world.EXTRA_COLORS))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(  # a word-level model: one token per word, case-folded
        sentence_iterator=iter(captions), model_writer=buf, vocab_size=vocab_size, model_type="word",
        normalization_rule_name="nmt_nfkc_cf", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return UMT5Tokenizer.from_path(folder)


def encode_text(t5: UMT5Encoder, tokenizer: UMT5Tokenizer, captions: list[str], text_len: int, device) -> torch.Tensor:
    """The pipeline's prompt encoding (TextEncoder.encode + pad_context), with gradients: [B, text_len, dim]."""
    from kinema.pipeline.prompts import pad_context

    ids, mask = tokenizer(captions)
    out = t5(ids.to(device), mask.to(device))
    return pad_context([u[:n] for u, n in zip(out, mask.sum(dim=1).tolist())], text_len)


class LatentPool:
    """Clips encoded once: latents, condition inputs and the known frames for CLIP, per bucket
    key (frames, width, height)."""

    def __init__(self, data: dict):
        self.data = data  # {(frames, w, h): {"x0", "y", "images", "mode", "captions"}}

    @classmethod
    @torch.no_grad()
    def build(cls, cfg: DiTTrainConfig, vae, colors, progress: bool = True) -> "LatentPool":
        from tqdm import tqdm

        rng = np.random.default_rng([pool_seed(cfg), 77])
        groups = _world_groups(cfg, colors) if cfg.data == "world" else _folder_groups(cfg)
        total = sum(n for _, n, _ in groups)
        data = {}
        bar = tqdm(total=total, desc="encoding the latent pool", disable=not progress, unit="clip")
        for key, _count, batches in groups:
            entry = {k: [] for k in ("x0", "y", "images", "mode", "captions")}
            for video, captions in batches:
                _encode(cfg, vae, video, captions, rng, entry)
                bar.update(len(captions))
            data[key] = {k: (torch.cat(v) if k in ("x0", "y", "images") else v) for k, v in entry.items()}
            data[key]["mode"] = torch.tensor(data[key]["mode"])
        bar.close()
        return cls(data)


def pool_seed(cfg: DiTTrainConfig) -> int:
    return cfg.seed if cfg.pool_seed < 0 else cfg.pool_seed


def latent_weights(x0: torch.Tensor, object_weight: float, threshold: float = 0.4) -> torch.Tensor:
    """Loss weights [B, 1, T, h, w]: 1 + object_weight on latent pixels that hold the object.

    A latent pixel holds the object when its distance (over channels) from its frame's median latent
    (the plain background) exceeds `threshold` times the frame's largest such distance. The object is
    a few of the 64 latent pixels of a 64x64 frame, so unweighted, the loss is mostly background, and
    what tells the prompts apart (the object's colour, shape, and where it is in each frame: the
    direction) gets little of the gradient. Computed from the latents, so any latent pool works.
    """
    if not object_weight:
        return torch.ones_like(x0[:, :1])
    dev = (x0 - x0.flatten(3).median(dim=3).values[..., None, None]).norm(dim=1, keepdim=True)
    peak = dev.flatten(3).amax(dim=3)[..., None, None]
    return 1.0 + object_weight * (dev > threshold * peak).to(x0.dtype)


def temporal_error(err: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The weighted mean square of the error's change from one latent frame to the next (err, w [B, C|1, T, h, w]).

    err[t+1] - err[t] = (pred[t+1] - pred[t]) - (target[t+1] - target[t]): the velocity's frame-to-frame change
    against the truth's. An error held over the frames costs nothing here; one on a single frame (a frame whose
    object colour or place jumps: the flicker) costs twice its square, one flipping sign every frame four times.
    Each pair weighs the larger of its two frames' weights."""
    pair = torch.maximum(w[:, :, 1:], w[:, :, :-1]).expand_as(err[:, :, 1:])
    return (pair * err.diff(dim=2) ** 2).mean() / pair.mean()


def known_weights(y: torch.Tensor, known_weight: float, temporal: int = 4) -> torch.Tensor:
    """Loss weights [B, 1, T, 1, 1]: 1 + known_weight on latent frames that hold a known pixel frame.

    `y` is the i2v input (its first `temporal` channels the frame mask). A known frame's latent frame is
    the one the output must reproduce: flf2v's last frame shares its latent frame with three generated
    ones (the end of a causal chunk), and unweighted it came back about 10 dB below the VAE's own round
    trip of it (docs/training.md).
    """
    known = y[:, :temporal].amax(dim=(1, 3, 4), keepdim=True) > 0
    return 1.0 + known_weight * known.to(y.dtype)


def _world_groups(cfg: DiTTrainConfig, colors):
    counts = np.round(np.array(cfg.pool_frame_shares) / sum(cfg.pool_frame_shares) * cfg.pool_size).astype(int)
    groups = []
    for frames, count in zip(cfg.pool_frames, counts):
        def batches(frames=frames, count=int(count), n=16):
            seed = pool_seed(cfg) + 1000 * frames
            # batch k, of size b, holds clips k*b .. k*b + b - 1 (those clip_batch(seed, k, b) renders)
            spans = [range(k * b, (k + 1) * b) for k, b in enumerate(min(n, count - s) for s in range(0, count, n))]
            every, workers = None, default_workers()
            if workers > 1:  # a many-core host (a GPU's): render the whole group at once, in parallel
                every = render_clips(seed, [i for r in spans for i in r], cfg.width, cfg.height, frames, colors,
                                     workers=workers)
            at = 0
            for span in spans:
                clips, specs = ((every[0][at : at + len(span)], every[1][at : at + len(span)]) if every else
                                render_clips(seed, span, cfg.width, cfg.height, frames, colors, workers=1))
                at += len(span)
                yield torch.stack([world.to_tensor(c) for c in clips]), [s.caption for s in specs]
        groups.append(((frames, cfg.width, cfg.height), int(count), batches()))
    return groups


def _folder_groups(cfg: DiTTrainConfig):
    from kinema.train.data import folder_dataset

    dataset, _ = folder_dataset(cfg, cfg.frames)
    by_key: dict = {}
    for i, key in enumerate(dataset.bucket_keys()):
        by_key.setdefault(key, []).append(i)

    def batches(indices, n=16):
        for start in range(0, len(indices), n):
            items = [dataset[i] for i in indices[start : start + n]]
            yield torch.stack([it["video"] for it in items]), [it["caption"] for it in items]

    return [(key, len(idx), batches(idx)) for key, idx in by_key.items()]


def _encode(cfg: DiTTrainConfig, vae, video: torch.Tensor, captions: list[str], rng: np.random.Generator, entry: dict) -> None:
    """Encode a batch of clips and one random conditioning (i2v / flf2v / span) of each into `entry`."""
    n, frames = video.shape[0], video.shape[2]
    shares = np.array(cfg.mode_shares[1:]) / sum(cfg.mode_shares[1:])
    mode = [1 + int(rng.choice(3, p=shares)) for _ in range(n)]
    known = [_known_frames(MODES[m], frames, rng) for m in mode]
    sigma = np.exp(rng.normal(cfg.ref_noise_mean, cfg.ref_noise_std, n))
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    masked = torch.zeros_like(video)
    for i, ks in enumerate(known):
        for k in ks:
            masked[i, :, k] = video[i, :, k] + sigma[i] * torch.randn(video[i, :, k].shape, generator=gen)
    both = vae.encode(torch.cat([video, masked]).to(vae.device)).cpu()  # one batch: clips and masked clips
    lat = both[n:]
    h, w = lat.shape[-2:]
    masks = torch.stack([frame_mask(frames, ks, h, w, vae.temporal_ratio) for ks in known])
    ends = torch.stack([torch.stack([video[i, :, ks[0]], video[i, :, ks[-1]]]) for i, ks in enumerate(known)])
    entry["x0"].append(both[:n])
    entry["y"].append(torch.cat([masks, lat], dim=1).half())
    entry["images"].append(((ends.clamp(-1, 1) + 1) * 127.5).round().byte())  # [n, 2, 3, H, W]: first and last known
    entry["mode"] += mode
    entry["captions"] += captions


def _beside_init(path: Path, relative: str) -> Path | None:
    """The file `relative` that goes with init_from weights (a model folder, a run folder or a checkpoint in one):
    next to them, or in the run's exported model/; None when there is none."""
    for folder in (path, path / "model", path.parent, path.parent / "model", path.parent.parent,
                   path.parent.parent / "model"):
        if (folder / relative).is_file():
            return folder / relative
    return None


def _init_tokenizer(path: Path) -> Path:
    """The tokenizer file that goes with init_from weights."""
    if (found := _beside_init(path, "tokenizer/spiece.model")) is not None:
        return found
    raise KinemaError(f"init_from {path}: no tokenizer/spiece.model next to it; the weights need the tokenizer they "
                      "were trained with.")


def init_declarations(path: Path) -> dict:
    """The sampling defaults the init_from model declares (its transformer/config.json); {} when none is found (a
    checkpoint of a run never exported)."""
    config = _beside_init(path, "transformer/config.json")
    return {} if config is None else ModelInfo.from_config(json.loads(config.read_text())).sample_defaults


def _known_frames(mode: str, frames: int, rng: np.random.Generator) -> list[int]:
    if mode == "i2v":
        return [0]
    if mode == "flf2v":
        return [0, frames - 1]
    length = int(rng.integers(1, max(2, frames // 2)))
    start = int(rng.integers(0, frames - length + 1))
    return list(range(start, start + length))


class DiTTask(TrainTask):
    name = "dit"

    def __init__(self, cfg: DiTTrainConfig, device: torch.device, pool: LatentPool | None = None):
        self.cfg, self.device = cfg, device
        out = Path(cfg.output_dir)
        self.build_models(out)
        self.pool = pool or self._pool(out)
        self._empty = {}

    # -- setup ------------------------------------------------------------------------------------
    def build_models(self, out: Path) -> None:
        """A fresh DiT, umT5 and CLIP tower (the VAE is loaded, frozen)."""
        import kinema

        cfg, device = self.cfg, self.device
        self.vae = kinema.load_vae(self.vae_source(), device=device)
        self.vae.requires_grad_(False)
        tok_dir = out / "tokenizer"
        if not (tok_dir / "spiece.model").exists() and cfg.init_from:  # the token ids must be those the weights learnt
            source = _init_tokenizer(Path(cfg.init_from))
            tok_dir.mkdir(parents=True, exist_ok=True)
            (tok_dir / "spiece.model").write_bytes(source.read_bytes())
        self.tokenizer = UMT5Tokenizer.from_path(tok_dir) if (tok_dir / "spiece.model").exists() else train_tokenizer(tok_dir, cfg.tokenizer_vocab)
        torch.manual_seed(cfg.seed)
        self.t5 = UMT5Encoder(vocab_size=max(self.tokenizer.vocab_size, cfg.tokenizer_vocab), dim=cfg.text_dim, dim_attn=cfg.text_dim,
                              dim_ffn=cfg.text_ffn_dim, num_heads=cfg.text_heads, num_layers=cfg.text_layers,
                              num_buckets=cfg.text_buckets).to(device)
        self.clip = CLIPVisionTower(ClipVisionConfig(image_size=cfg.clip_image_size, patch_size=cfg.clip_patch, dim=cfg.clip_dim,
                                                     mlp_dim=4 * cfg.clip_dim, num_heads=cfg.clip_heads,
                                                     num_layers=cfg.clip_layers)).to(device)
        nn_init_clip(self.clip)
        self.dit = WanDiT(DiTConfig("i2v", in_dim=36, dim=cfg.dim, ffn_dim=cfg.ffn_dim, text_dim=cfg.text_dim,
                                    num_heads=cfg.num_heads, num_layers=cfg.num_layers, image_dim=cfg.clip_dim,
                                    text_len=cfg.text_len)).init_weights().to(device)
        self.info = ModelInfo(tuple(TASKS), self.sample_defaults())  # what the exported model will declare
        if cfg.init_from:
            self.load_init(cfg.init_from)

    def load_init(self, path: str) -> None:
        """Start the DiT, umT5 and CLIP from a training checkpoint, run folder or exported model folder."""
        import kinema

        loaders = {"dit": kinema.load_dit, "t5": lambda p: kinema.load_text_encoder(p).model,
                   "clip": lambda p: kinema.load_clip_vision(p).model}
        for name, module in DiTTask.modules(self).items():
            state = init_state(path, name, loaders[name])
            own = module.state_dict()
            wrong = [k for k, v in own.items() if k not in state or state[k].shape != v.shape]
            if wrong:
                raise KinemaError(f"init_from {path}: its {name} does not match this config ({len(wrong)} tensors missing "
                                  f"or of another shape, e.g. {wrong[0]}); use the same model sizes as the run it came from.")
            module.load_state_dict({k: state[k] for k in own})
        log.info("initialised the DiT, umT5 and CLIP from %s", path)
        # What the init model declares beyond this trainer's own defaults (guidance extras' settings, its context
        # windows) was chosen for these weights: a fine-tune keeps it, the windows only at the same clip length.
        own, theirs = self.info.sample_defaults, init_declarations(Path(path).expanduser())
        kept = {k: v for k, v in theirs.items() if k not in own}
        if "context" in kept and theirs.get("frame_num") != own["frame_num"]:
            log.info("init_from declares context windows for %s-frame clips; this run trains on %d: not kept",
                     theirs.get("frame_num"), own["frame_num"])
            kept.pop("context")
        if kept:
            log.info("kept the init model's sampling declarations: %s", ", ".join(sorted(kept)))
            self.info = ModelInfo(self.info.tasks, {**own, **kept})

    def vae_source(self) -> str:
        """Where the (frozen) VAE comes from."""
        return self.cfg.vae

    def sample_defaults(self) -> dict:
        c = self.cfg
        return {"size": f"{c.width}*{c.height}", "frame_num": c.frames, "steps": c.sample_steps, "shift": c.sample_shift,
                "guide_scale": c.sample_guide_scale, "negative_prompt": "", "fps": c.fps}

    def _pool(self, out: Path) -> LatentPool:
        c = self.cfg
        recipe = {k: getattr(c, k) for k in ("pool_size", "pool_frames", "pool_frame_shares", "mode_shares",
                                             "ref_noise_mean", "ref_noise_std", "colors", "width", "height", "data")}
        recipe["seed"], recipe["vae"] = pool_seed(c), self.vae_source()
        recipe = json.loads(json.dumps(recipe))
        path = out / "pool.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)
            if saved.get("recipe") == recipe:
                return LatentPool(saved["data"])
            log.info("the latent pool recipe changed; re-encoding")
        pool = LatentPool.build(c, self.vae, tuple(c.colors))
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"recipe": recipe, "data": pool.data}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return pool

    def modules(self):
        return {"dit": self.dit, "t5": self.t5, "clip": self.clip}

    def trainable(self):
        params = [*self.dit.parameters(), *self.clip.parameters()]
        if self.cfg.text_lr_scale > 0:
            params += list(self.t5.parameters())
        else:
            self.t5.requires_grad_(False)
        return params

    # -- one step ----------------------------------------------------------------------------------
    def empty_condition(self, key: tuple[int, int, int]) -> dict:
        """The pipeline's inputs for a step without known frames (y and clip_fea), for (frames, height, width)."""
        from kinema.pipeline.conditioning import empty_condition

        empty = empty_condition(self.dit.config, self.vae, *key, self._empty)  # made once per size, kept in _empty
        return {k: v.to(self.device) for k, v in empty.args().items()}

    def clip_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> CLIP tokens [B, N, clip_dim], with the pipeline's preprocessing."""
        x = images.to(self.device).float() / 127.5 - 1
        return self.clip(ClipVisionEncoder(self.clip).preprocess(x))

    def batch(self, step: int, g: torch.Generator) -> dict:
        c = self.cfg
        rng = np.random.default_rng([c.seed, step, 5])
        keys = list(self.pool.data)
        counts = np.array([len(self.pool.data[k]["captions"]) for k in keys], dtype=float)
        key = keys[int(rng.choice(len(keys), p=counts / counts.sum()))]
        entry, frames = self.pool.data[key], key[0]
        image_step = rng.random() < c.image_share
        mode = "t2v" if image_step else MODES[int(rng.choice(len(MODES), p=np.array(c.mode_shares) / sum(c.mode_shares)))]
        candidates = np.flatnonzero(entry["mode"].numpy() == MODES.index(mode))
        if mode == "t2v" or len(candidates) == 0:
            mode, candidates = "t2v", np.arange(len(entry["captions"]))
        idx = torch.from_numpy(rng.choice(candidates, size=c.batch_size, replace=len(candidates) < c.batch_size))
        x0 = entry["x0"][idx].to(self.device)
        captions = ["" if rng.random() < c.caption_dropout else entry["captions"][i] for i in idx.tolist()]
        if image_step:
            x0 = x0[:, :, :1]
            frames = 1
        if mode == "t2v":
            empty = self.empty_condition((frames, x0.shape[3] * self.vae.spatial_ratio, x0.shape[4] * self.vae.spatial_ratio))
            n = len(idx)
            return {"x0": x0, "y": empty["y"].expand(n, -1, -1, -1, -1), "clip_fea": empty["clip_fea"].expand(n, -1, -1),
                    "clip_images": None, "captions": captions, "mode": mode}
        y = entry["y"][idx].to(self.device).float()
        images = entry["images"][idx]
        clip = images[:, :2] if mode == "flf2v" else images[:, :1]
        return {"x0": x0, "y": y, "clip_fea": None, "clip_images": clip, "captions": captions, "mode": mode}

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, clip_fea: torch.Tensor, y: torch.Tensor):
        """The DiT forward pass, with optional gradient checkpointing of each block."""
        dit = self.dit
        tokens, grid = dit.embed(x, y)
        e, e0 = dit.time_embed(t, x.shape[0])
        ctx, img = dit.embed_context(context, clip_fea)
        rope = dit.rope(grid, tokens.device)
        for block in dit.blocks:
            if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, e0, rope, ctx, img, use_reentrant=False)
            else:
                tokens = block(tokens, e0, rope, ctx, img)
        return dit.unpatchify(dit.head(tokens, e), grid)

    def loss(self, step, generator):
        c, b = self.cfg, self.batch(step, generator)
        x0 = b["x0"]
        n = x0.shape[0]
        sigma = torch.sigmoid(c.logit_mean + c.logit_std * torch.randn(n, generator=generator, device=self.device))
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        context = encode_text(self.t5, self.tokenizer, b["captions"], self.dit.config.text_len, self.device)
        clip_fea = b["clip_fea"]
        if clip_fea is None:
            k = b["clip_images"].shape[1]
            clip_fea = self.clip_tokens(b["clip_images"].flatten(0, 1)).unflatten(0, (n, k)).flatten(1, 2)
        pred = self.forward(xt, sigma * 1000, context, clip_fea, b["y"])
        # t2v steps' y is the empty condition: its frame mask is all 0, so known_weights leaves them at 1
        w = latent_weights(x0, c.object_weight) * known_weights(b["y"], c.known_weight, self.vae.temporal_ratio)
        err = pred - (noise - x0)
        loss = (w * err**2).mean() / w.mean()
        terms = {"mode": MODES.index(b["mode"]), "frames": x0.shape[2]}
        if c.temporal_weight and x0.shape[2] > 1:
            flicker = temporal_error(err, w)
            loss = loss + c.temporal_weight * flicker
            terms["temporal"] = flicker.item()
        return loss, terms

    # -- samples and export -------------------------------------------------------------------------
    def pipeline(self):
        """The models being trained as a kinema.Pipeline (the one `kinema generate` uses), for samples."""
        from kinema.pipeline.models import Models
        from kinema.pipeline.pipeline import Pipeline

        return Pipeline(Models(self.dit, self.vae, TextEncoder(self.t5, self.tokenizer), ClipVisionEncoder(self.clip),
                               self.info))

    @torch.no_grad()
    def sample(self, folder: Path, step: int) -> None:
        from kinema.toy.analyse import analyse

        folder.mkdir(parents=True, exist_ok=True)
        modules = self.modules().values()
        for m in modules:
            m.eval()
        rng = np.random.default_rng(12345)
        rows, report, pipe = [], [], self.pipeline()
        for i in range(4):
            spec = world.random_spec(rng, self.cfg.width, self.cfg.height, colors=tuple(self.cfg.colors))
            video = pipe(spec.caption, task="t2v", seed=i, progress=False).video
            frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            report.append({"prompt": spec.caption, "analysis": analyse(frames).caption()})
            rows.append(np.concatenate(list(frames[::4]), axis=1))
        for m in modules:
            m.train()
        from PIL import Image

        Image.fromarray(np.concatenate(rows, axis=0)).save(folder / f"dit-step{step:07d}.png")
        (folder / f"dit-step{step:07d}.json").write_text(json.dumps(report, indent=1))
        log.info("dit step %d samples: %s", step, "; ".join(f"{r['prompt']} -> {r['analysis']}" for r in report))

    def export(self, folder: Path) -> None:
        export_model(folder, self.dit, self.t5, self.tokenizer, self.clip, self.cfg.vae, self.info)


def nn_init_clip(tower: CLIPVisionTower) -> None:
    torch.nn.init.normal_(tower.pos_embedding, std=0.02)
    torch.nn.init.normal_(tower.cls_embedding, std=0.02)


def export_model(folder: Path, dit: WanDiT, t5: UMT5Encoder, tokenizer: UMT5Tokenizer, clip: CLIPVisionTower, vae_path,
                 info: ModelInfo, dtype: torch.dtype = torch.float16) -> None:
    """A complete model folder in the diffusers pipeline layout, each component in the official key names;
    `info` (its tasks and sampling defaults) goes into the DiT's config.json."""
    import shutil

    from kinema.loading.dit import dtype_policy
    from kinema.train.export import save_component

    cfg = dit.config
    keep = lambda k: dtype_policy(torch.float16)(k) == torch.float32  # noqa: E731  fp32 islands stay fp32
    save_component(folder / "transformer", "diffusion_pytorch_model.safetensors", dit.state_dict(), {
        "_class_name": "WanModel", "model_type": cfg.model_type, "dim": cfg.dim, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "text_len": cfg.text_len, "tasks": list(info.tasks),
        "sample_defaults": info.sample_defaults, "producer": "kinema train dit",
    }, dtype=dtype, keep_fp32=keep)
    save_component(folder / "text_encoder", "model.safetensors", t5.state_dict(), dtype=dtype)
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(tokenizer.source) if Path(tokenizer.source).is_file() else Path(tokenizer.source) / "spiece.model",
                    folder / "tokenizer" / "spiece.model")
    # The Wan CLIP file holds every block, though only the penultimate output is used: the last block
    # is written as a copy of the one before so the file has the standard structure.
    state = {f"visual.{k}": v for k, v in clip.state_dict().items()}
    last = clip.config.num_layers - 1
    state.update({k.replace(f"visual.transformer.{last - 1}.", f"visual.transformer.{last}."): v.clone()
                  for k, v in state.items() if k.startswith(f"visual.transformer.{last - 1}.")})
    c = clip.config
    save_component(folder / "image_encoder", "model.safetensors", state, {
        "model_type": "clip_vision_model", "hidden_size": c.dim, "intermediate_size": c.mlp_dim,
        "num_attention_heads": c.num_heads, "num_hidden_layers": c.num_layers, "image_size": c.image_size,
        "patch_size": c.patch_size, "hidden_act": c.activation, "layer_norm_eps": c.norm_eps,
    }, dtype=dtype, keep_fp32=lambda k: "norm" in k)
    vae_src = Path(vae_path)
    vae_src = vae_src / "vae" if (vae_src / "vae").is_dir() else vae_src
    if vae_src.resolve() != (folder / "vae").resolve():
        shutil.copytree(vae_src, folder / "vae", dirs_exist_ok=True)
