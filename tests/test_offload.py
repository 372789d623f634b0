"""Model offload, block swap and DiT streaming (kinema/memory/offload.py, block_swap.py, streaming.py).

Without a GPU the compute and the storage device are both the CPU: every move, copy,
release and count still happens (only the side stream and pinning are CUDA's), so
the scheduling is checked here and the CUDA-only parts by the tests skipped without one.

Outputs are compared with torch.equal. CPU matmul kernels can round differently for
weights at different address alignments, and a loaded checkpoint's tensors are views
of the memory-mapped file at its byte offsets, while every copy these wrappers make
sits in ordinary (64-byte aligned) memory; so references built from a file first get
their weights copied into ordinary memory too (`own_memory`), and the comparisons are
then exact.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import kinema
from kinema.cli.main import main
from kinema.demo import write_random_checkpoint
from kinema.errors import CheckpointError, KinemaError
from kinema.memory.block_swap import BlockSwap, check_block_swap
from kinema.memory.offload import get_slot, set_slot, tensor_slots
from kinema.memory.streaming import stream_dit
from kinema.models.dit import DiTConfig, WanDiT
from kinema.pipeline.models import Models, Runtime
from kinema.pipeline.pipeline import Pipeline

PROMPT = "a red circle moving right on a black background"
KW = dict(size=(48, 32), frame_num=5, steps=2, seed=3, progress=False)
CPU = torch.device("cpu")


def run(models, task, offload=False, t5_cpu=False, **kw):
    """(pipeline, result) of one call; with `offload` every model visits the "compute" device (the CPU here)."""
    pipe = Pipeline(models, Runtime(CPU, torch.float32, torch.float32, offload=offload, t5_cpu=t5_cpu))
    return pipe, pipe(PROMPT, task=task, **KW, **kw)
OFFICIAL_ORDER = [("t5", "compute"), ("t5", "storage"), ("clip", "compute"), ("clip", "storage"), ("vae", "compute"),
                  ("vae", "storage"), ("dit", "compute"), ("dit", "storage"), ("vae", "compute"), ("vae", "storage")]


def own_memory(module):
    """Every tensor of `module` copied out of the mapped checkpoint into ordinary memory."""
    for slot in tensor_slots(module):
        set_slot(slot, get_slot(slot).detach().clone())
    return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload") / "Wan2.1-I2V-tiny"
    write_random_checkpoint(folder, model_type="i2v")
    return folder


def load_models(folder) -> Models:
    te = kinema.load_text_encoder(folder)
    clip = kinema.load_clip_vision(folder)
    own_memory(te.model), own_memory(clip.model)
    return Models(own_memory(kinema.load_dit(folder)), own_memory(kinema.load_vae(folder)), te, clip)


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 40, 60, generator=torch.Generator().manual_seed(1)) * 2 - 1


# -- offload ---------------------------------------------------------------------------------------------
def test_offload_is_exact_and_in_the_official_order(ckpt, image):
    models = load_models(ckpt)
    _, plain = run(models, "i2v", image=image)
    pipe, out = run(models, "i2v", offload=True, image=image)
    off = pipe.offloader
    assert torch.equal(out.latents, plain.latents) and torch.equal(out.video, plain.video)
    # umT5 off after encoding, CLIP off after encoding, the DiT off before the VAE decodes.
    assert off.moves == OFFICIAL_ORDER
    # Back home: every tensor is the storage copy the Offloader keeps, not a compute-device copy.
    for name, placement in off.placements.items():
        assert not placement.parked.sent, name


def test_offload_order_t2v_and_v2v(tmp_path):
    write_random_checkpoint(tmp_path / "t2v")
    te = kinema.load_text_encoder(tmp_path / "t2v")
    own_memory(te.model)
    models = Models(own_memory(kinema.load_dit(tmp_path / "t2v")), own_memory(kinema.load_vae(tmp_path / "t2v")), te)
    _, plain = run(models, "t2v")
    pipe, out = run(models, "t2v", offload=True)
    assert torch.equal(out.latents, plain.latents)
    assert pipe.offloader.moves == [("t5", "compute"), ("t5", "storage"), ("dit", "compute"), ("dit", "storage"),
                                    ("vae", "compute"), ("vae", "storage")]
    pipe, again = run(models, "v2v", offload=True, video=plain.video, denoise=0.5)
    assert torch.equal(again.latents, run(models, "v2v", video=plain.video, denoise=0.5)[1].latents)
    assert pipe.offloader.moves == [("t5", "compute"), ("t5", "storage"), ("vae", "compute"), ("vae", "storage"),
                                    ("dit", "compute"), ("dit", "storage"), ("vae", "compute"), ("vae", "storage")]


def test_offload_and_t5_cpu(ckpt, image):
    models = load_models(ckpt)
    _, plain = run(models, "i2v", image=image, decode=False)
    t5_weight = models.text_encoder.model.token_embedding.weight
    pipe, out = run(models, "i2v", offload=True, t5_cpu=True, image=image, decode=False)
    moves = pipe.offloader.moves
    assert torch.equal(out.latents, plain.latents)
    assert [m for m in moves if m[0] == "t5"] == [] and moves[:2] == [("clip", "compute"), ("clip", "storage")]
    assert models.text_encoder.model.token_embedding.weight is t5_weight  # never moved


def test_offload_with_block_swap_parks_the_swapped_dit(ckpt, image):
    models = load_models(ckpt)
    _, plain = run(models, "i2v", image=image, decode=False)
    swap = BlockSwap(models.dit, blocks_to_swap=1, prefetch_blocks=1, device="cpu", record=True)
    models.placement = swap
    pipe, out = run(models, "i2v", offload=True, image=image, decode=False)
    assert pipe.offloader.placements["dit"] is swap
    assert torch.equal(out.latents, plain.latents)
    assert pipe.offloader.moves == OFFICIAL_ORDER[:-2]  # decode=False: no VAE decode visit
    assert not swap.window.ready  # parked: no block left on the compute device


# -- block swap ------------------------------------------------------------------------------------------
def tiny_dit(layers=6, model_type="t2v"):
    cfg = DiTConfig(model_type, in_dim=36 if model_type != "t2v" else 16, dim=64, ffn_dim=96, text_dim=16, num_heads=2,
                    num_layers=layers, image_dim=32)
    return WanDiT(cfg).eval().requires_grad_(False)


def dit_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 7, 16, generator=g)


@pytest.mark.parametrize("n,k", [(0, None), (1, 1), (3, 1), (3, 2), (6, 1), (6, 4), (6, 6)])
def test_block_swap_is_bit_identical_and_bounded(n, k):
    dit = tiny_dit()
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        ref = [dit(x, t * s, ctx) for s in (1.0, 0.5)]
        swap = BlockSwap(dit, n, k, device="cpu", record=True)
        homes = swap.window.homes
        on_device = []

        def count(module, args):  # independent of the window's bookkeeping: whose weights are not their host copy?
            swapped_here = sum(get_slot(h.slots[0]).data_ptr() != h.home[0].data_ptr() for h in homes.values())
            on_device.append(len(dit.blocks) - len(homes) + swapped_here)

        for block in dit.blocks:
            block.register_forward_pre_hook(count)  # after the swap's own hook: the block has been fetched
        out = [dit(x, t * s, ctx) for s in (1.0, 0.5)]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    k = k or 0
    bound = len(dit.blocks) - n + k
    assert max(on_device) <= bound and swap.stats.peak_resident <= bound
    if n:
        assert max(on_device) == bound or n == k  # the window is used, not just allowed
        fetched = [i for what, i in swap.stats.log if what == "fetch"]
        assert sorted(set(fetched)) == list(range(n))  # only the first n blocks ever move
        assert swap.stats.releases == 2 * n  # each swapped block released once per call
        # Every block came through the prefetch window, none was fetched on demand (that would evict others):
        # k fetches to fill the window, then one per release.
        assert swap.stats.fetches == k + swap.stats.releases


def test_block_swap_out_of_order_and_remove():
    dit = tiny_dit(layers=4)
    x, t, ctx = dit_inputs()
    with torch.no_grad():
        ref = dit(x, t, ctx)
        swap = BlockSwap(dit, 3, 1, device="cpu")
        tokens, grid = dit.embed(x)
        e, e0 = dit.time_embed(t, 1)
        context, _ = dit.embed_context(ctx)
        rope = dit.rope(grid, tokens.device)
        for i in (2, 0, 1, 3):  # not the run order: each block is fetched on demand, the window still holds
            dit.blocks[i](tokens, e0, rope, context)
        assert swap.stats.peak_resident <= 4 - 3 + 1
        assert torch.equal(dit(x, t, ctx), ref)
        with pytest.raises(KinemaError, match="already swapped or streamed"):
            BlockSwap(dit, 1, device="cpu")
        swap.remove()
        assert not any(b._forward_pre_hooks for b in dit.blocks)
        assert all(home.sent for home in swap.window.homes.values())  # every block back on the compute device
        assert torch.equal(dit(x, t, ctx), ref)
        swap = BlockSwap(dit, 2, 1, device="cpu")
        swap.remove(to_device=False)
        assert not any(home.sent for home in swap.window.homes.values()) and torch.equal(dit(x, t, ctx), ref)


def test_block_swap_bad_values():
    for n, k, message in [(-1, None, "out of range"), (7, None, "out of range: this DiT has 6 blocks"),
                          (0, 2, "needs --blocks_to_swap"), (2, 3, "between 1 and --blocks_to_swap (2)"),
                          (2, 0, "between 1 and")]:
        with pytest.raises(KinemaError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_block_swap(6, n, k)
    assert check_block_swap(6, 2, None) == 1 and check_block_swap(6, 0, None) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="block swap's side stream and pinned memory need a CUDA GPU")
def test_block_swap_on_cuda_is_exact_and_bounded():
    dit = tiny_dit(layers=8)
    x, t, ctx = (v.cuda() for v in dit_inputs())
    with torch.no_grad():
        ref = dit.cuda()(x, t, ctx)
        dit.cpu()
        swap = BlockSwap(dit, 6, 2, device="cuda")
        assert all(h.home[0].is_pinned() for h in swap.window.homes.values())
        out = [dit(x, t, ctx) for _ in range(3)]
        torch.cuda.synchronize()
    assert all(torch.equal(o, ref) for o in out)
    assert swap.stats.peak_resident <= 8 - 6 + 2
    assert all(get_slot(h.slots[0]).device.type == "cpu" for i, h in swap.window.homes.items() if i not in swap.window.ready)


# -- streaming -------------------------------------------------------------------------------------------
def save_dit(dit, folder, prefix="", shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v.contiguous() for k, v in dit.state_dict().items()}
    (folder / "config.json").write_text(json.dumps({"num_heads": dit.config.num_heads}))
    if shards == 1:
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
        return folder
    keys = list(state)
    weight_map = {}
    for s in range(shards):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("layout,quantization,prefetch", [
    ("official", None, 1), ("sharded", None, 2), ("comfyui", "fp8_e4m3fn_scaled", 1), ("official", None, 4)])
def test_stream_equals_a_normal_load(tmp_path, layout, quantization, prefetch):
    folder = save_dit(tiny_dit(layers=4, model_type="i2v"), tmp_path / layout,
                      prefix="model.diffusion_model." if layout == "comfyui" else "", shards=3 if layout == "sharded" else 1)
    loaded = own_memory(kinema.load_dit(folder, quantization=quantization))
    record, placement = stream_dit(folder, quantization=quantization, prefetch_blocks=prefetch, record=True)
    streamed = record.model
    x, t, ctx = dit_inputs()
    g = torch.Generator().manual_seed(2)
    extra = dict(clip_fea=torch.randn(1, 5, 32, generator=g), y=torch.randn(1, 20, 2, 4, 4, generator=g))
    with torch.no_grad():
        ref = loaded(x, t, ctx, **extra)
        outs = [streamed(x, t, ctx, **extra) for _ in range(2)]
    assert all(torch.equal(o, ref) for o in outs)
    stats = placement.stats
    assert stats.peak_resident <= prefetch and stats.releases == 2 * 4
    # Between runs only the blocks read ahead for the next run hold their Linear weights; the rest always stays.
    held = {k for k, v in streamed.state_dict().items() if not v.is_meta}
    ahead = set(placement.window.ready)
    assert len(ahead) == prefetch
    for i in range(4):
        linear = {f"blocks.{i}.{n}" for n in ("self_attn.q.weight", "cross_attn.k_img.weight", "ffn.2.weight")}
        assert (linear <= held) if i in ahead else not (linear & held), i
    assert {"head.head.weight", "text_embedding.0.weight", "blocks.3.modulation", "blocks.3.norm3.weight",
            "blocks.3.ffn.0.bias"} <= held
    placement.remove()  # streaming undone: every block read in, a plain resident model again
    assert not any(b._forward_pre_hooks for b in streamed.blocks)
    assert not any(v.is_meta for v in streamed.state_dict().values())
    with torch.no_grad():
        assert torch.equal(streamed(x, t, ctx, **extra), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming to a GPU (side-stream copies) needs CUDA")
def test_stream_on_cuda_equals_a_normal_load(tmp_path):
    folder = save_dit(tiny_dit(layers=4), tmp_path / "dit")
    loaded = kinema.load_dit(folder, device="cuda")
    streamed, _ = stream_dit(folder, device="cuda", prefetch_blocks=2)
    streamed = streamed.model
    x, t, ctx = (v.cuda() for v in dit_inputs())
    with torch.no_grad():
        ref = loaded(x, t, ctx)
        outs = [streamed(x, t, ctx) for _ in range(3)]
        torch.cuda.synchronize()
    assert all(torch.equal(o, ref) for o in outs)


def test_stream_refuses_what_is_not_a_dit(ckpt):
    with pytest.raises(CheckpointError, match="holds a VAE, not a diffusion transformer"):
        stream_dit(ckpt / "Wan2.1_VAE.pth")


STREAM_RSS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from kinema.memory.streaming import stream_dit
    from kinema.models.dit import DiTConfig, WanDiT

    def peak():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    with torch.no_grad():  # warm up what any run needs, then measure: the CPU kernels, and the meta-device
        # machinery every loader uses (a fixed ~70 MB of Python state on first use, as in bench/load_memory.py)
        tiny = WanDiT(DiTConfig(dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=1))
        tiny(torch.randn(1, 16, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, 16))
        with torch.device("meta"):
            WanDiT(DiTConfig(dim=64, ffn_dim=64, text_dim=16, num_heads=2, num_layers=1))
        base = peak()
        dit = stream_dit(sys.argv[1])[0].model
        loaded = peak()
        x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([900.0]), torch.randn(1, 16, 64)
        out = [dit(x, t, ctx).abs().sum().item() for _ in range(2)]
    print(json.dumps({"base": base, "loaded": loaded, "peak": peak(), "out": out}))
""")


def test_streaming_keeps_memory_below_the_file(tmp_path):
    """A ~400 MB float32 DiT (6 blocks of width 1024) run streamed in a fresh process: its peak resident
    memory above the import baseline stays well below the file (resident weights + one block + activations)."""
    cfg = DiTConfig("t2v", dim=1024, ffn_dim=4096, text_dim=64, num_heads=8, num_layers=6)
    with torch.device("meta"):
        shapes = WanDiT(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in shapes.items()}
    path = tmp_path / "big_dit.safetensors"
    save_file(state, path)
    del state
    size = path.stat().st_size
    assert size > 380 * 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", STREAM_RSS, str(path)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    above = r["peak"] - r["base"]
    print(f"file {size / 2**20:.0f} MiB, import baseline {r['base'] / 2**20:.0f} MiB, after stream_dit "
          f"{(r['loaded'] - r['base']) / 2**20:.0f} MiB, peak above baseline {above / 2**20:.0f} MiB ({above / size:.2f}x the file)")
    assert above < 0.6 * size, r
    assert r["out"][0] == r["out"][1] and r["out"][0] > 0  # finite, and the second streamed pass equals the first


# -- the command line ------------------------------------------------------------------------------------
def _gen(ckpt, *extra):
    return ["generate", "--task", "i2v-14B", "--ckpt_dir", str(ckpt), "--size", "48*32", "--frame_num", "5",
            "--sample_steps", "2", "--prompt", PROMPT, "--base_seed", "11", *extra]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.new("RGB", (60, 40), (200, 30, 30)).save(path)
    return path


def test_cli_offload_swap_and_stream_equal_a_plain_run(ckpt, image_file, tmp_path):
    from kinema.media import read_video

    base = _gen(ckpt, "--image", str(image_file))
    assert main([*base, "--save_file", str(tmp_path / "plain.webp"), "--lossless"]) == 0  # exact, unlike libx264
    plain = read_video(tmp_path / "plain.webp").frames
    for i, extra in enumerate([["--offload_model", "True", "--t5_cpu", "--blocks_to_swap", "2", "--prefetch_blocks", "1"],
                               ["--stream_dit", "--prefetch_blocks", "2"]]):
        target = tmp_path / f"out{i}.webp"
        assert main([*base, *extra, "--save_file", str(target), "--lossless"]) == 0, extra
        assert torch.equal(read_video(target).frames, plain), extra  # the same latents, the same encoder: the same file


def test_cli_bad_memory_flags_exit_2(ckpt, image_file, capsys):
    base = _gen(ckpt, "--image", str(image_file))
    cases = [
        (["--blocks_to_swap", "-1"], "--blocks_to_swap -1 must be a whole number >= 0"),
        (["--blocks_to_swap", "3"], "--blocks_to_swap 3 is out of range: this DiT has 2 blocks"),
        (["--prefetch_blocks", "2"], "--prefetch_blocks 2 needs --blocks_to_swap"),
        (["--blocks_to_swap", "2", "--prefetch_blocks", "3"], "--prefetch_blocks 3 must be between 1 and --blocks_to_swap (2)"),
        (["--stream_dit", "--blocks_to_swap", "1"], "use one"),
        (["--stream_dit", "--dit", str(ckpt / "Wan2.1_VAE.pth")], "holds a VAE, not a diffusion transformer"),
    ]
    for extra, message in cases:
        code = main([*base, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (extra, err)
        assert err[-1].startswith("kinema: error:") and message in err[-1], (message, err[-1])
        assert not any("Traceback" in line for line in err)
