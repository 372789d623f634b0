"""`kinema serve --ray auto|local|ADDRESS`: the server's jobs run on a Ray cluster's machines.

The server keeps what it owns: the HTTP API, the SQLite queue and history (the source of truth) and
the output folder. A dispatcher thread takes jobs from the queue as workers come free and runs each
on a worker: one Ray actor, or for a parallel job (`--ulysses_size` ... `--cfg_parallel`) a group of
U x R x C rank actors on a placement group of as many GPUs of one machine, joined by
torch.distributed. A worker keeps its models loaded between jobs (each rank its Executor's model
cache), runs a job in a scratch folder and hands back its files and messages; the dispatcher writes
the files into the output folder (a name already taken gets the next counter) and records the job,
in one transaction, as the in-process worker does (worker.py's `execute_job` runs it on both).

A worker that dies mid-job (its process killed, its machine lost) leaves no file behind: its job goes
back to the front of the queue with its attempt counted (`JobQueue.requeue`) and runs on another
worker, and a new worker takes the lost one's place; a job that loses its worker `MAX_ATTEMPTS` times
is recorded as failed. Only the dispatcher records jobs, once each, so none is run twice to
completion. Messages reach websocket clients when the job ends (no live progress or previews).
"""

from __future__ import annotations

import logging
import os
import re
import runpy
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kinema.errors import KinemaError
from kinema.parallel.mesh import ParallelOptions
from kinema.server.hub import Hub
from kinema.server.queue import Job, JobQueue
from kinema.server.worker import Done, QueueThread, execute_job

log = logging.getLogger("kinema")

ADDRESS = re.compile(r"auto|local|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}")
ADDRESS_FORMS = ("auto (the cluster `ray start --head` made on this machine, or $RAY_ADDRESS), local (a Ray instance "
                 "inside the server), HOST:PORT (a head's address, e.g. 10.0.0.1:6379) or ray://HOST:10001 (Ray Client)")
RETRY_S = 10.0  # wait before making a worker again after its actors could not be placed


@dataclass(frozen=True)
class ClusterOptions:
    """`kinema serve`'s --ray flags."""

    address: str
    workers: int | None = None  # worker groups; None: as many as the cluster's GPUs allow (1 on a CPU cluster)
    cpus: float = 1.0  # per rank
    gpus: float | None = None  # per rank; None: 1 on a cluster with GPUs, else 0
    parallel: ParallelOptions = ParallelOptions()  # each job's split; U x R x C ranks per worker
    setup: tuple[str, ...] = ()  # Python files every rank runs first (custom nodes)

    @property
    def ranks(self) -> int:
        return self.parallel.degree

    def check(self) -> ClusterOptions:
        if not ADDRESS.fullmatch(self.address or ""):
            raise KinemaError(f"--ray {self.address!r} is not a Ray address; use {ADDRESS_FORMS}.")
        if self.workers is not None and self.workers < 1:
            raise KinemaError(f"--ray_workers {self.workers} must be at least 1.")
        for flag, value in (("--ray_cpus", self.cpus), ("--ray_gpus", self.gpus)):
            if value is not None and not value >= 0:
                raise KinemaError(f"{flag} {value} must be a number >= 0 (per rank).")
        self.parallel.check()
        for path in self.setup:
            if not Path(path).is_file():
                raise KinemaError(f"--ray_setup {path} is not a file; give a Python file every worker runs first.")
        return self


def import_ray():
    try:
        import ray
    except ImportError:
        raise KinemaError("--ray needs Ray, which is not installed: pip install 'kinema[ray]' (on the server and on "
                          "every worker machine), or leave out --ray to run jobs in the server.") from None
    return ray


def connect(options: ClusterOptions) -> ClusterOptions:
    """Join (or, with `local`, start) the Ray cluster; the options with the workers and GPUs per rank settled."""
    ray = import_ray()
    if options.address not in ("auto", "local"):  # Ray retries an address nothing listens at for minutes
        host, _, port = options.address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            raise KinemaError(f"--ray {options.address}: nothing answers at {host}:{port} ({exc.strerror or exc}). Start "
                              f"the head there (`ray start --head --port {port}`), check the address, or use "
                              f"{ADDRESS_FORMS}.") from None
    kw = dict(ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=False)
    try:
        if options.address == "local":
            ray.init(include_dashboard=False, **kw)
        else:
            ray.init(address=options.address, **kw)
    except Exception as exc:  # ConnectionError, a timeout, a refused handshake: all the address's fault
        raise KinemaError(f"--ray {options.address}: no Ray cluster answers there ({' '.join(str(exc).split())[:300]}). "
                          f"Start one (`ray start --head` on the head machine, README \"Many machines\"), or use "
                          f"{ADDRESS_FORMS}.") from None
    resources = ray.cluster_resources()
    have_gpus = resources.get("GPU", 0)
    gpus = options.gpus if options.gpus is not None else (1.0 if have_gpus else 0.0)
    if options.workers is not None:
        workers = options.workers
    elif gpus > 0:
        workers = max(1, int(have_gpus // (gpus * options.ranks)))
    else:
        workers = 1
    settled = replace(options, workers=workers, gpus=gpus)
    log.info("Ray cluster %s: %g CPUs, %g GPUs; %d worker%s of %d rank%s (%g CPU, %g GPU each)", options.address,
             resources.get("CPU", 0), have_gpus, workers, "s" * (workers > 1), options.ranks, "s" * (options.ranks > 1),
             options.cpus, gpus)
    if gpus * options.ranks * workers > have_gpus:
        log.warning("the workers ask for %g GPUs, the cluster has %g: some wait until machines join",
                    gpus * options.ranks * workers, have_gpus)
    return settled


# -- a worker's rank: a Ray actor on a cluster machine -----------------------------------------------------
class JobRunner:
    """One rank of a worker, in its own process: an Executor over the server's model folders (the same paths on
    every machine), its model cache kept between jobs. Made a Ray actor by the dispatcher."""

    def __init__(self, settings: dict):
        for path in settings.get("setup", ()):
            runpy.run_path(path, run_name="kinema_ray_setup")
        import kinema.workflow.nodes  # noqa: F401  (registers the nodes)
        from kinema.workflow.context import ModelCache
        from kinema.workflow.folders import ModelFolders

        self.folders = ModelFolders(settings.get("models_dir"), settings.get("extra_model_paths"))
        self.models = ModelCache(settings.get("memory_budget"), parallel=settings.get("parallel") or {})
        self.cancels: dict[str, threading.Event] = {}
        self.stopping = False

    def describe(self) -> dict:
        return {"pid": os.getpid(), "node": socket.gethostname()}

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: where the group's torch.distributed store listens (this machine, a free port)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, rank: int, world: int, address: str, port: int) -> None:
        """torchrun's environment for rank `rank` of `world`: Pipeline.load joins the group when a job loads one."""
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))

    def interrupt(self, prompt_id: str, stopping: bool = False) -> None:
        self.stopping |= stopping
        self.cancels.setdefault(prompt_id, threading.Event()).set()

    def free(self) -> int:
        return self.models.free()

    def run(self, job: dict, inputs: dict[str, bytes]) -> dict:
        """Run one job in a scratch folder: {"done": Done's fields, "files": {"output"|"temp": {relative name: bytes}},
        "events": the job's messages but progress and previews, in order}."""
        from kinema.workflow.executor import Executor

        scratch = Path(tempfile.mkdtemp(prefix="kinema-job-"))
        dirs = {name: scratch / name for name in ("output", "input", "temp")}
        for d in dirs.values():
            d.mkdir()
        for name, data in inputs.items():
            (dirs["input"] / name).parent.mkdir(parents=True, exist_ok=True)
            (dirs["input"] / name).write_bytes(data)
        events: list = []

        def forward(event: str, data: dict) -> None:
            if event not in ("progress", "preview"):
                events.append([event, data])

        try:
            executor = Executor(self.folders, dirs["output"], input_dir=dirs["input"], temp_dir=dirs["temp"],
                                models=self.models)
            cancel = self.cancels.setdefault(job["prompt_id"], threading.Event())
            done = execute_job(executor, job["prompt_id"], job["prompt"], job["extra_data"], cancel, forward,
                               lambda: self.stopping)
            files = {kind: {str(p.relative_to(dirs[kind])): p.read_bytes() for p in sorted(dirs[kind].rglob("*"))
                            if p.is_file()} for kind in ("output", "temp")}
        finally:
            self.cancels.pop(job["prompt_id"], None)
            shutil.rmtree(scratch, ignore_errors=True)
        return {"done": vars(done), "files": files, "events": events}


# -- the output folder -------------------------------------------------------------------------------------
def free_name(folder: Path, name: str, taken: set[str]) -> str:
    """`name` (relative), or, when it or a name in `taken` is there, the same with its last number counted up
    (ComfyUI's `prefix_00001_.png` -> `prefix_00002_.png`), or `_1`, `_2` ... added to its stem."""
    def free(n: str) -> bool:
        return n not in taken and not (folder / n).exists()

    if free(name):
        return name
    path = Path(name)
    numbers = list(re.finditer(r"\d+", path.name))
    for i in range(1, 1_000_000):
        if numbers:
            m = numbers[-1]
            digits = str(int(m.group()) + i).zfill(len(m.group()))
            candidate = path.name[: m.start()] + digits + path.name[m.end():]
        else:
            candidate = f"{path.stem}_{i}{path.suffix}"
        candidate = str(path.with_name(candidate))
        if free(candidate):
            return candidate
    raise KinemaError(f"no free name for {name} in {folder}")


def publish(files: dict[str, bytes], folder: Path) -> dict[str, str]:
    """Write a job's files into `folder`, never over another file: {name as written by the job: name in `folder`}.
    A sidecar (`x.webp.json` beside `x.webp`) keeps its file's new name. Each file appears whole (written under
    a temporary name, then renamed)."""
    names = sorted(files)
    primary = {n: next((p for p in names if p != n and n.startswith(p) and n[len(p)] == "."), None) for n in names}
    moved: dict[str, str] = {}
    for name in names:
        if primary[name] is None:
            moved[name] = free_name(folder, name, set(moved.values()))
    for name in names:
        if primary[name] is not None:
            moved[name] = moved[primary[name]] + name[len(primary[name]):]
    for name, new in moved.items():
        target = folder / new
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        tmp.write_bytes(files[name])
        os.replace(tmp, target)
    return moved


def renamed(value, moves: dict[str, dict[str, str]]):
    """A job's outputs / messages with each file reference ({filename, subfolder, type}) under its new name."""
    if isinstance(value, list):
        return [renamed(v, moves) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: renamed(v, moves) for k, v in value.items()}
    kind, name = out.get("type"), out.get("filename")
    if isinstance(name, str) and kind in moves:
        rel = str(Path(out.get("subfolder") or "") / name)
        if rel in moves[kind]:
            new = Path(moves[kind][rel])
            out["filename"], out["subfolder"] = new.name, "" if str(new.parent) == "." else str(new.parent)
    return out


def input_files(prompt: dict, folder: Path) -> dict[str, bytes]:
    """The files of the server's input folder a prompt names (LoadImage's image, a video to load): shipped to the
    worker, which may run on another machine."""
    root = folder.resolve()
    found = {}
    for node in prompt.values():
        for value in (node.get("inputs") or {}).values() if isinstance(node, dict) else ():
            if not isinstance(value, str) or not value or len(value) > 1024:
                continue
            name = re.sub(r" \[input\]$", "", value)
            try:
                path = (root / name).resolve()
            except (OSError, ValueError):
                continue
            if path.is_relative_to(root) and path.is_file() and not os.path.isabs(name):
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


# -- the dispatcher ----------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One worker: its rank actors (rank 0 first), their placement group, the job it runs."""

    index: int
    actors: list = field(default_factory=list)
    group: object = None  # the placement group of a multi-rank worker
    job: Job | None = None
    refs: list = field(default_factory=list)  # the running job's tasks, one per rank
    info: dict = field(default_factory=dict)  # rank 0's pid and machine
    ready_at: float = 0.0  # when to try making it again after a failure
    starting: bool = False  # its actors are being made


class RayDispatcher(QueueThread):
    """Runs the queue's jobs on Ray workers; the in-process Worker's interface (status, queue_changed, interrupt,
    set_flag, stop), which the app calls."""

    def __init__(self, queue: JobQueue, hub: Hub, options: ClusterOptions, settings: dict, folders: dict[str, Path]):
        super().__init__(queue, hub, "kinema-ray-dispatcher")
        self.options, self.folders = options, folders
        self.settings = {**settings, "setup": [str(Path(p).resolve()) for p in options.setup],
                         "parallel": {k: v for k, v in vars(options.parallel).items()} if options.ranks > 1 or
                         options.parallel.active else {}}
        self.slots = [Slot(i) for i in range(options.workers or 1)]

    # -- the queue runner interface (QueueThread) --------------------------------------------------------------------------
    @property
    def current(self) -> Job | None:
        return next((s.job for s in self.slots if s.job is not None), None)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        hit = False
        for slot in self.slots:
            if slot.job is not None and (not prompt_id or prompt_id == slot.job.prompt_id):
                for actor in slot.actors:
                    actor.interrupt.remote(slot.job.prompt_id, self.stopping.is_set())
                hit = True
        return hit

    def stop(self, timeout: float = 10.0) -> None:
        """Clean shutdown: running jobs are stopped and put back at the front of the queue; the actors dropped."""
        super().stop(timeout)
        ray = import_ray()
        for slot in self.slots:
            self._drop(slot)
        if self.options.address == "local":
            ray.shutdown()

    def workers(self) -> list[dict]:
        """What each worker runs, for /kinema/workers: {index, ranks, pid, node, prompt_id}."""
        return [{"index": s.index, "ranks": len(s.actors), "pid": s.info.get("pid"), "node": s.info.get("node"),
                 "prompt_id": s.job.prompt_id if s.job else None} for s in self.slots]

    # -- the thread ------------------------------------------------------------------------------------
    def run(self) -> None:
        ray = import_ray()
        while not self.stopping.is_set():
            try:
                self._apply_flags()
                for slot in self.slots:
                    if not slot.actors and not slot.starting and time.time() >= slot.ready_at:
                        slot.starting = True  # made on a thread of its own: the others keep running jobs meanwhile
                        threading.Thread(target=self._make, args=(slot,), daemon=True).start()
                for slot in self.slots:
                    if slot.actors and not slot.starting and slot.job is None and not self.stopping.is_set():
                        job = self.queue.take()
                        if job is None:
                            break
                        self._submit(slot, job)
                busy = [s for s in self.slots if s.job is not None]
                if not busy:
                    self.idle.set()
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                self.idle.clear()
                ray.wait([r for s in busy for r in s.refs], num_returns=1, timeout=0.5)
                for slot in busy:
                    self._check(slot)
            except Exception:
                log.exception("ray dispatcher: the loop failed; going on")
                self.stopping.wait(1.0)
        for slot in self.slots:  # shutdown: what was running goes back to the queue
            if slot.job is not None:
                self._finish_stopped(slot)

    def _apply_flags(self) -> None:
        with self._lock:
            flags, self.flags = self.flags, {}
        if flags.get("unload_models") or flags.get("free_memory"):
            for slot in self.slots:
                for actor in slot.actors:
                    actor.free.remote()

    def _make(self, slot: Slot) -> None:
        """The worker's rank actors, placed (a placement group of one machine for several ranks) and joined."""
        ray = import_ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        o, n = self.options, self.options.ranks
        bundle = {"CPU": o.cpus, **({"GPU": o.gpus} if o.gpus else {})}
        Runner = ray.remote(JobRunner)
        actors = []
        try:
            if n > 1:
                slot.group = ray.util.placement_group([bundle] * n, strategy="STRICT_PACK")
                ray.get(slot.group.ready(), timeout=600)
                actors = [Runner.options(num_cpus=o.cpus, num_gpus=o.gpus or 0, max_concurrency=4,
                                         scheduling_strategy=PlacementGroupSchedulingStrategy(slot.group, i)
                                         ).remote(self.settings) for i in range(n)]
                address, port = ray.get(actors[0].rendezvous.remote(), timeout=300)
                ray.get([a.join.remote(i, n, address, port) for i, a in enumerate(actors)], timeout=300)
            else:
                actors = [Runner.options(num_cpus=o.cpus, num_gpus=o.gpus or 0, max_concurrency=4).remote(self.settings)]
            slot.info = ray.get(actors[0].describe.remote(), timeout=600)
            slot.actors = actors
            log.info("ray worker %d ready: %d rank%s, pid %s on %s", slot.index, n, "s" * (n > 1), slot.info["pid"],
                     slot.info["node"])
            self.wake.set()
        except Exception as exc:
            if not self.stopping.is_set():
                log.warning("ray worker %d could not start (%s); trying again in %gs", slot.index,
                            " ".join(str(exc).split())[:300], RETRY_S)
            slot.actors = actors
            self._drop(slot)
            slot.ready_at = time.time() + RETRY_S
        finally:
            slot.starting = False

    def _drop(self, slot: Slot) -> None:
        ray = import_ray()
        for actor in slot.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if slot.group is not None:
            try:
                ray.util.remove_placement_group(slot.group)
            except Exception:
                pass
        slot.actors, slot.group, slot.info, slot.refs = [], None, {}, []

    def _submit(self, slot: Slot, job: Job) -> None:
        payload = {"prompt_id": job.prompt_id, "prompt": job.prompt, "extra_data": job.extra_data}
        inputs = input_files(job.prompt, self.folders["input"])
        slot.job = job
        slot.refs = [actor.run.remote(payload, inputs) for actor in slot.actors]
        log.info("running %s on ray worker %d (attempt %d)", job.prompt_id, slot.index, job.attempts)
        self.queue_changed()

    def _check(self, slot: Slot) -> None:
        """Record the slot's job when every rank has answered; a rank lost puts the job back and the worker is made
        again."""
        ray = import_ray()
        ready, _ = ray.wait(slot.refs, num_returns=len(slot.refs), timeout=0)
        lost = None
        for ref in ready:
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as exc:
                lost = exc
            except ray.exceptions.RayTaskError as exc:  # the runner itself failed: the job's error, not the worker's
                if ref is slot.refs[0] and lost is None:
                    self._record(slot, Done(status="error", messages=[["execution_error", _error(slot.job, exc)]]),
                                 {}, [])
                    return
        if lost is not None:
            job = slot.job
            log.warning("ray worker %d was lost while running %s (%s): the job goes back to the queue", slot.index,
                        job.prompt_id, type(lost).__name__)
            self._drop(slot)
            slot.job = None
            if not self.stopping.is_set():
                requeued = self.queue.requeue(job, "the Ray worker running this job died (killed, out of memory or its "
                                                   "machine lost)")
                if not requeued:
                    self._announce_end(job)
            self.queue_changed()
            return
        if len(ready) < len(slot.refs):
            return
        result = ray.get(slot.refs[0])
        done = Done(**result["done"])
        if done.stopped or (self.stopping.is_set() and done.status != "success"):
            self._finish_stopped(slot)
            return
        self._record(slot, done, result["files"], result["events"])

    def _record(self, slot: Slot, done: Done, files: dict, events: list) -> None:
        job = slot.job
        folders = {"output": self.folders["output"], "temp": self.folders["temp"]}
        moves = {kind: publish(files.get(kind, {}), folders[kind]) for kind in folders}
        sid = job.extra_data.get("client_id") if isinstance(job.extra_data.get("client_id"), str) else None
        for event, data in renamed(events, moves):
            if not (event == "executing" and data.get("node") is None):
                self.hub.send(event, data, sid)
        self.queue.finish(job, renamed(done.outputs, moves), done.status, renamed(done.messages, moves), done.meta)
        slot.job, slot.refs = None, []
        self._announce_end(job)
        log.info("finished %s on ray worker %d: %s", job.prompt_id, slot.index, done.status)

    def _finish_stopped(self, slot: Slot) -> None:
        self.queue.release(slot.job.prompt_id)
        log.info("job %s put back on the queue for the next start", slot.job.prompt_id)
        slot.job, slot.refs = None, []

    def _announce_end(self, job: Job) -> None:
        sid = job.extra_data.get("client_id") if isinstance(job.extra_data.get("client_id"), str) else None
        self.queue_changed()
        self.hub.send("executing", {"node": None, "prompt_id": job.prompt_id}, sid)


def _error(job: Job, exc: BaseException) -> dict:
    return {"prompt_id": job.prompt_id, "node_id": None, "node_type": None, "executed": [],
            "exception_message": " ".join(str(exc).split())[:2000], "exception_type": type(exc).__name__,
            "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": int(time.time() * 1000)}


def settings_of(config) -> dict:
    """What a worker needs of the server's configuration (kinema.server.app.ServerConfig): the model folders."""
    budget = None if config.memory_budget_gb is None else int(config.memory_budget_gb * (1 << 30))
    return {"models_dir": None if config.models_dir is None else str(Path(config.models_dir).resolve()),
            "extra_model_paths": None if config.extra_model_paths is None else str(Path(config.extra_model_paths).resolve()),
            "memory_budget": budget}

