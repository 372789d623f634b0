"""FSDP2 (`fully_shard`) of the DiT and of umT5: each rank keeps 1/n of every weight, gathered per block to run.

The official code wraps each transformer block in FSDP after loading the whole model on every
rank. Here the model is built on the meta device and loaded one unit at a time (a block, or one
of the small top-level parts: embeddings, head), each read from the checkpoint whole on its own
(LoRAs merged, fp8 applied as the single-process loader does, so the weights are bit-identical),
then sharded at once; the full copy of the unit is freed before the next is read. No rank ever
holds more than one block's full weights besides its shards. Parameters keep the dtypes the
loader gives (bf16 with the float32 islands on GPUs, `WanDiT._keep_in_fp32_modules`); reductions
(for training) would run in float32. At run time each unit's shards are all-gathered just before
it runs and freed after (`reshard_after_forward`), so the peak holds one block whole.
"""

from __future__ import annotations

import logging

import torch

from kinema.encoders.text import TextEncoder
from kinema.loading.dit import DiTCheckpoint, LoadedDiT, dtype_policy
from kinema.loading.materialize import materialize
from kinema.loading.t5 import WHAT as T5_WHAT
from kinema.loading.t5 import T5Checkpoint
from kinema.ops.fp8 import set_fp8_fast
from kinema.parallel.mesh import Group

log = logging.getLogger("kinema")


def device_mesh(group: Group, device: torch.device):
    """The DeviceMesh FSDP shards over: `group`'s ranks."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group.handle, device.type)


def units(model: torch.nn.Module, blocks: str = "blocks") -> list[str]:
    """The FSDP units of a model: each of its repeated blocks, then each other top-level part."""
    stack = getattr(model, blocks)
    return [f"{blocks}.{i}" for i in range(len(stack))] + [n for n, _ in model.named_children() if n != blocks]


def _shard_units(model, names: list[str], load_unit, group: Group, device: torch.device):
    """Load each unit (`load_unit(name)`), shard it over `group`, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh(group, device)
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # parameters as loaded; reductions in float32
    for name in names:
        load_unit(name)
        fully_shard(model.get_submodule(name), mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    return model.eval().requires_grad_(False)


def shard_dit(ckpt: DiTCheckpoint, group: Group, dtype: torch.dtype, device: torch.device,
              quantization: str | None = None, fp8_fast: bool = False, loras=()) -> LoadedDiT:
    """The DiT of an opened checkpoint, loaded a unit at a time and sharded over `group`.
    loras: `read_loras`' result [(path, strength, weights)], merged into each unit before it is sharded."""
    from kinema.lora.network import merge_loras

    mode = ckpt.quantize(quantization, dtype)
    ckpt.loaded = True
    model, policy = ckpt.model, dtype_policy(dtype)
    what = f"Wan2.1 {model.config.model_type} DiT"

    def load_unit(name: str) -> None:
        inside = name + "."
        materialize(model, ckpt.plan, ckpt.source, policy, device, what=what, skip=lambda k: not k.startswith(inside))
        mine = [({n: u for n, u in weights.items() if n == name or n.startswith(inside)}, strength)
                for _, strength, weights in loras]
        if any(w for w, _ in mine):
            merge_loras(model, [(w, s) for w, s in mine if w])

    _shard_units(model, units(model), load_unit, group, device)
    if fp8_fast:
        set_fp8_fast(model)
    log.info("DiT sharded over %d ranks (FSDP): %s of weights on this rank", group.size,
             _gib(sum(_local_bytes(p) for p in model.parameters())))
    return LoadedDiT(model, ckpt.info, mode, None, ckpt.source.name)


def shard_text_encoder(ckpt: T5Checkpoint, group: Group, device: torch.device, fp8_fast: bool = False) -> TextEncoder:
    """umT5 from an opened checkpoint (`open_text_encoder`), loaded a block at a time and sharded over `group`."""
    model = ckpt.model

    def load_unit(name: str) -> None:
        inside = name + "."
        materialize(model, ckpt.plan, ckpt.source, lambda _: ckpt.dtype, device, T5_WHAT,
                    skip=lambda k: not k.startswith(inside))

    _shard_units(model, units(model), load_unit, group, device)
    if fp8_fast:
        set_fp8_fast(model)
    return TextEncoder(model, ckpt.tokenizer)


def _local_bytes(p: torch.Tensor) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.numel() * local.element_size()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
