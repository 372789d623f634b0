"""The ranks of a parallel run: the options that lay them out, the process groups they talk in.

A run on N processes (torchrun, or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR) splits
N = C x R x U: C = 2 with CFG parallel (cond and uncond on two rank groups), R the ring degree and
U the Ulysses degree. Ranks are numbered Ulysses-fastest,

    rank = c * (R * U) + r * U + u

so a Ulysses group (the U ranks that exchange heads by all-to-all, every step, every block) is U
neighbouring ranks, which torchrun places on one machine, and a ring group (K/V passed around,
overlapping compute) spans machines, as the official maintainers advise. The R x U ranks of one
CFG group split one branch's tokens: rank (r, u) holds chunk r * U + u of the sequence.

Process groups are made once, when a pipeline loads (`start`), and kept in a `Mesh` record that
the pipeline's runtime holds; nothing is kept in module globals but torch.distributed's own state.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from kinema.errors import KinemaError

log = logging.getLogger("kinema")

# How the options read on the command line, for messages (the Python names are the same without "--").
FLAGS = {"ulysses_size": "--ulysses_size", "ring_size": "--ring_size", "cfg_parallel": "--cfg_parallel",
         "t5_fsdp": "--t5_fsdp", "dit_fsdp": "--dit_fsdp", "vae_parallel": "--vae_parallel"}


@dataclass(frozen=True)
class ParallelOptions:
    """How a run spreads over processes: `kinema generate`'s flags and `Pipeline.load`'s keywords of the same names."""

    ulysses_size: int = 1  # U: heads <-> sequence all-to-all
    ring_size: int = 1  # R: K/V passed around a ring
    cfg_parallel: bool = False  # cond and uncond on two rank groups (C = 2)
    t5_fsdp: bool = False  # umT5 sharded over the ranks
    dit_fsdp: bool = False  # the DiT sharded over the ranks of a CFG group
    vae_parallel: bool = False  # the VAE decode split by spatial tiles over the ranks

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def sequence_size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def degree(self) -> int:
        """The processes the split asks for: U x R x C."""
        return self.sequence_size * self.cfg_size

    @property
    def active(self) -> bool:
        return self.degree > 1 or self.t5_fsdp or self.dit_fsdp or self.vae_parallel

    def check(self, names: dict | None = None) -> ParallelOptions:
        """The options with their types checked; a KinemaError naming the option otherwise."""
        names = names or {}
        for f in fields(self):
            value, name = getattr(self, f.name), names.get(f.name, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise KinemaError(f"{name} {value!r} must be a whole number >= 1 (1: no split).")
            elif not isinstance(value, bool):
                raise KinemaError(f"{name} {value!r} must be True or False.")
        return self

    def check_call(self, guided: bool, batched: bool = False, enhance: bool = False, vae_tile="auto",
                   names: dict | None = None) -> None:
        """What a call asks that this split cannot do: a KinemaError naming both, before any model runs."""
        n = {**FLAGS, **(names or {})}
        if self.cfg_parallel and not guided:
            raise KinemaError(f"{n['cfg_parallel']} runs cond and uncond on two rank groups, but this call is not guided "
                              f"(guide scale 1: no uncond pass); leave out {n['cfg_parallel']} and give the processes "
                              f"to {n['ulysses_size']} / {n['ring_size']}, or set a guide scale above 1.")
        if self.cfg_parallel and batched:
            raise KinemaError(f"{n.get('batched_cfg', 'batched_cfg')} and {n['cfg_parallel']} both place the guidance "
                              "branches; use one.")
        if self.sequence_size > 1 and enhance:
            raise KinemaError(f"{n.get('enhance', 'enhance')} (Enhance-A-Video) measures attention across every frame "
                              f"of a position, which a split sequence does not hold on one rank; leave it out, or run "
                              f"without {n['ulysses_size']} / {n['ring_size']} ({n['cfg_parallel']} is fine).")
        if self.vae_parallel and vae_tile == "off":
            raise KinemaError(f"{n['vae_parallel']} splits the decode by tiles, but {n.get('vae_tile', 'vae_tile')} is "
                              "off; leave one of them out.")

    def describe(self) -> str:
        parts = [f"ulysses {self.ulysses_size}" if self.ulysses_size > 1 else "",
                 f"ring {self.ring_size}" if self.ring_size > 1 else "", "cfg 2" if self.cfg_parallel else "",
                 "t5_fsdp" if self.t5_fsdp else "", "dit_fsdp" if self.dit_fsdp else "",
                 "vae_parallel" if self.vae_parallel else ""]
        return ", ".join(p for p in parts if p) or "none"


@dataclass(frozen=True, eq=False)
class Group:
    """One process group as this rank sees it: its members (global ranks, in group order) and its place in it."""

    ranks: tuple[int, ...]
    index: int  # this process's place in `ranks`
    handle: object = None  # the torch.distributed ProcessGroup; None for a group of one

    @property
    def size(self) -> int:
        return len(self.ranks)

    def peer(self, index: int) -> int:
        """The global rank of member `index` (modulo the size: a ring's neighbours)."""
        return self.ranks[index % self.size]


@dataclass(frozen=True, eq=False)
class Mesh:
    """This process's place in a parallel run and the groups it talks in (see the module doc)."""

    options: ParallelOptions
    rank: int
    world_size: int
    device: torch.device
    world: Group
    sequence: Group  # the U x R ranks that split one branch's tokens (its index: the chunk this rank holds)
    ulysses: Group
    ring: Group
    cfg: Group  # the C ranks holding the same chunk of the cond and the uncond branch

    @property
    def leader(self) -> bool:
        """Rank 0 logs, shows the progress bar and writes the files."""
        return self.rank == 0

    @property
    def shard_group(self) -> Group:
        """The ranks FSDP shards the DiT over: those running the same DiT calls in lockstep (one CFG group;
        the branches of the two groups may skip different blocks or steps, so they do not share shards)."""
        return self.sequence if self.options.cfg_parallel else self.world

    def describe(self) -> str:
        return (f"rank {self.rank} of {self.world_size} ({self.options.describe()}; backend "
                f"{dist.get_backend() if dist.is_initialized() else 'none'})")


def launched_world_size() -> int:
    """The processes a launcher (torchrun) started, 1 when not launched by one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_world(options: ParallelOptions, world: int, names: dict | None = None) -> None:
    """The split must use every process: U x R x C = N (or 1 with FSDP / a parallel VAE alone)."""
    n = {**FLAGS, **(names or {})}
    u, r, c = options.ulysses_size, options.ring_size, options.cfg_size
    product = f"{n['ulysses_size']} {u} x {n['ring_size']} {r}" + (f" x {n['cfg_parallel']} 2" if c > 1 else "")
    if options.degree > 1 and world == 1:
        raise KinemaError(f"{product} = {options.degree} processes, but this is a single process; start it with "
                          f"torchrun --nproc_per_node={options.degree} -m kinema generate ... (README, \"Many GPUs\").")
    if options.degree > 1 and options.degree != world:
        hint = f"e.g. {n['ulysses_size']} {world}" if world > 1 else ""
        raise KinemaError(f"{product} = {options.degree}, but {world} processes were started: the product must equal "
                          f"the number of processes (torchrun --nproc_per_node x --nnodes){'; ' + hint if hint else ''}.")


def start(options: ParallelOptions, device: torch.device, names: dict | None = None,
          timeout_s: float = 1800.0) -> tuple[Mesh | None, torch.device]:
    """The run's Mesh (None when nothing is split) and the device this rank computes on (cuda:LOCAL_RANK on GPUs).
    Joins the process group torchrun describes in the environment, unless one is already initialised: nccl on
    GPUs, gloo on the CPU."""
    options.check({**FLAGS, **(names or {})})
    if not options.active:
        return None, device
    world = launched_world_size()
    check_world(options, world, names)
    if world == 1:
        log.warning("%s on a single process: nothing to split or shard, the run goes on as usual",
                    options.describe())
        return None, device
    if not dist.is_available():
        raise KinemaError("this PyTorch has no torch.distributed; the parallel options need it.")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is None:
            device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise KinemaError(f"{key} is not set: start parallel runs with torchrun (it sets RANK, WORLD_SIZE, "
                                  "MASTER_ADDR and MASTER_PORT), README \"Many GPUs\".")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    mesh = build_mesh(options, device)
    if mesh.leader:
        log.info("Parallel run: %d processes (%s)", mesh.world_size, mesh.describe())
    return mesh, device


def build_mesh(options: ParallelOptions, device: torch.device) -> Mesh:
    """The groups of `options` over the initialised world. Every rank makes every group, in the same order, as
    torch.distributed requires."""
    rank, world = dist.get_rank(), dist.get_world_size()
    check_world(options, world)
    u_n, r_n, c_n = options.ulysses_size, options.ring_size, options.cfg_size
    seq = u_n * r_n if options.degree > 1 else 1
    c, s = divmod(rank, seq)
    r, u = divmod(s, u_n) if options.degree > 1 else (0, 0)

    def layout(members_of) -> dict[tuple, tuple[int, ...]]:
        return {key: tuple(ranks) for key, ranks in members_of()}

    if options.degree > 1:
        sequence = layout(lambda: (((cc,), [cc * seq + i for i in range(seq)]) for cc in range(c_n)))
        ulysses = layout(lambda: (((cc, rr), [cc * seq + rr * u_n + i for i in range(u_n)])
                                  for cc in range(c_n) for rr in range(r_n)))
        ring = layout(lambda: (((cc, uu), [cc * seq + i * u_n + uu for i in range(r_n)])
                               for cc in range(c_n) for uu in range(u_n)))
        cfg = layout(lambda: (((ss,), [i * seq + ss for i in range(c_n)]) for ss in range(seq)))
        keys = {"sequence": (c,), "ulysses": (c, r), "ring": (c, u), "cfg": (s,)}
    else:  # FSDP / VAE alone: every rank runs the whole job; groups of one but the world
        sequence = {(rank,): (rank,)}
        ulysses, ring, cfg = dict(sequence), dict(sequence), dict(sequence)
        keys = {"sequence": (rank,), "ulysses": (rank,), "ring": (rank,), "cfg": (rank,)}
    groups = {}
    for name, table in (("sequence", sequence), ("ulysses", ulysses), ("ring", ring), ("cfg", cfg)):
        for key, members in sorted(table.items()):
            handle = dist.new_group(list(members)) if len(members) > 1 and options.degree > 1 else None
            if key == keys[name]:
                groups[name] = Group(members, members.index(rank), handle)
    world_group = Group(tuple(range(world)), rank, dist.group.WORLD if world > 1 else None)
    return Mesh(options, rank, world, device, world_group, groups["sequence"], groups["ulysses"], groups["ring"],
                groups["cfg"])


def broadcast_object(value, mesh: Mesh | None):
    """Rank 0's `value` on every rank (a seed drawn at random, a prompt read from a file: every rank runs the same)."""
    if mesh is None or mesh.world_size == 1:
        return value
    box = [value if mesh.leader else None]
    dist.broadcast_object_list(box, src=0, device=mesh.device if mesh.device.type == "cuda" else None)
    return box[0]


def any_rank(flag: bool, mesh: Mesh | None) -> bool:
    """True on every rank when `flag` is True on any (a stop asked on one rank stops them all together)."""
    if mesh is None or mesh.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=mesh.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shared_stop(callback, cancel, mesh: Mesh):
    """A step callback for every rank: rank 0 runs the caller's `callback` and reads `cancel`, and a stop either
    asks is shared (one all-reduce per step), so every rank stops after the same step."""
    def step(info):
        stop = False
        if mesh.leader:
            stop = (callback is not None and callback(info) is False) or (cancel is not None and cancel.is_set())
        return False if any_rank(stop, mesh) else None

    return step


def finish(mesh: Mesh) -> None:
    """The end of a parallel command: every rank waits for the others (rank 0's file is written), then leaves."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
