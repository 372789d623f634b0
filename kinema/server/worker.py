"""The one worker thread: takes jobs from the queue one at a time and runs them through one Executor,
which keeps models loaded between prompts. Nothing a job does can stop the thread: every failure
becomes the job's `execution_error` in the history.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

from kinema.errors import Cancelled
from kinema.server.hub import Hub
from kinema.server.queue import Job, JobQueue

log = logging.getLogger("kinema")

# The events ComfyUI keeps in a history entry's status messages.
STATUS_EVENTS = ("execution_start", "execution_cached", "execution_success", "execution_error", "execution_interrupted")


def now_ms() -> int:
    return int(time.time() * 1000)


class QueueThread(threading.Thread):
    """What the app calls on whatever runs the queue (the in-process Worker, or the Ray dispatcher of
    kinema/server/cluster.py): status, queue_changed, set_flag, stop; subclasses add interrupt and run."""

    def __init__(self, queue: JobQueue, hub: Hub, name: str):
        super().__init__(name=name, daemon=True)
        self.queue, self.hub = queue, hub
        self.wake, self.stopping, self.idle = threading.Event(), threading.Event(), threading.Event()
        self.flags: dict[str, bool] = {}
        self.last_node: str | None = None
        self._lock = threading.Lock()

    def status(self) -> dict:
        return {"exec_info": {"queue_remaining": self.queue.remaining()}}

    def queue_changed(self) -> None:
        self.hub.send("status", {"status": self.status()})
        self.wake.set()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        raise NotImplementedError

    def set_flag(self, name: str, value: bool) -> None:
        with self._lock:
            self.flags[name] = bool(value) or self.flags.get(name, False)
        self.wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Clean shutdown: running jobs are stopped and put back at the front of the queue."""
        self.stopping.set()
        self.interrupt()
        self.wake.set()
        if self.is_alive():
            self.join(timeout)


class Worker(QueueThread):
    def __init__(self, queue: JobQueue, executor, hub: Hub):
        super().__init__(queue, hub, "kinema-worker")
        self.executor = executor
        self.current: Job | None = None
        self.cancel: threading.Event | None = None

    # -- called by the routes --------------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> bool:
        with self._lock:
            job, cancel = self.current, self.cancel
        if job is None or cancel is None or (prompt_id and prompt_id != job.prompt_id):
            return False
        cancel.set()
        return True

    # -- the thread ------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._apply_flags()
                job = self.queue.take()
            except Exception:
                log.exception("worker: the queue could not be read")
                self.stopping.wait(1.0)
                continue
            if job is None:
                self.idle.set()
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            self.idle.clear()
            try:
                self._run(job)
            except Exception:  # recording the result failed; keep serving
                log.exception("worker: job %s could not be recorded", job.prompt_id)

    def _apply_flags(self) -> None:
        with self._lock:
            flags, self.flags = self.flags, {}
        if flags.get("unload_models") or flags.get("free_memory"):  # ComfyUI: free_memory unloads too
            n = self.executor.models.free()
            log.info("unloaded %d models", n)
        if flags.get("free_memory"):  # and forgets the cached node outputs (their tensors)
            self.executor.reset()
            import gc

            gc.collect()

    def _run(self, job: Job) -> None:
        sid = job.extra_data.get("client_id") if isinstance(job.extra_data.get("client_id"), str) else None
        cancel = threading.Event()
        with self._lock:
            self.current, self.cancel = job, cancel
        self.queue_changed()

        def forward(event: str, data: dict) -> None:
            if event == "preview":
                self.hub.send_preview(data.get("image"), sid)
                return
            if event == "executing":
                self.last_node = data.get("node")
                if data.get("node") is None:  # sent by us once the history is written
                    return
            self.hub.send(event, data, sid)

        log.info("running %s (attempt %d)", job.prompt_id, job.attempts)
        done = execute_job(self.executor, job.prompt_id, job.prompt, job.extra_data, cancel, forward,
                           self.stopping.is_set)
        if done.stopped:  # shutdown, not the user's interrupt: run it again at the next start
            self.queue.release(job.prompt_id)
            with self._lock:
                self.current = self.cancel = None
            log.info("job %s put back on the queue for the next start", job.prompt_id)
            return
        self.queue.finish(job, done.outputs, done.status, done.messages, done.meta)
        with self._lock:
            self.current = self.cancel = None
        self.last_node = None
        self.queue_changed()
        self.hub.send("executing", {"node": None, "prompt_id": job.prompt_id}, sid)
        log.info("finished %s: %s", job.prompt_id, done.status)


@dataclass
class Done:
    """How a job ended: what its history entry records, or `stopped` (a server shutdown interrupted it)."""

    outputs: dict = field(default_factory=dict)
    status: str = "success"
    messages: list = field(default_factory=list)
    stopped: bool = False

    @property
    def meta(self) -> dict:
        return {nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                for nid in self.outputs}


def execute_job(executor, prompt_id: str, prompt: dict, extra_data: dict, cancel: threading.Event, forward,
                stopping=lambda: False) -> Done:
    """Run one job through `executor`, handing every message to `forward(event, data)`; every failure becomes the
    job's execution_error (or _interrupted) message, as ComfyUI records it. The in-process worker and a Ray
    worker (kinema/server/cluster.py) both run jobs through here. `stopping()` True when the cancel came from a
    server shutdown: the job is then `stopped`, not interrupted."""
    done = Done()
    executed: list[str] = []
    state = {"ended": False, "node": None}

    def listener(event: str, data: dict) -> None:
        try:
            if event in STATUS_EVENTS:
                done.messages.append([event, data])
                state["ended"] |= event in ("execution_success", "execution_error", "execution_interrupted")
            if event == "executing":
                state["node"] = data.get("node")
            if event == "executed" and data.get("node") is not None:
                executed.append(str(data["node"]))
            forward(event, data)
        except Exception:
            log.exception("worker: event %s not forwarded", event)

    outputs: dict = {}
    try:
        outputs = executor.execute(prompt, prompt_id, listener=listener, cancel=cancel, extra_data=extra_data) or {}
    except Cancelled:
        done.status = "error"
        if stopping():
            return Done(stopped=True)
        if not state["ended"]:
            listener("execution_interrupted", {"prompt_id": prompt_id, "node_id": state["node"], "node_type": None,
                                               "executed": executed, "timestamp": now_ms()})
    except Exception as exc:
        done.status = "error"
        if not state["ended"]:  # the executor failed before it could report it
            log.exception("job %s failed", prompt_id)
            listener("execution_error", {
                "prompt_id": prompt_id, "node_id": state["node"], "node_type": None, "executed": executed,
                "exception_message": str(exc), "exception_type": type(exc).__name__,
                "traceback": traceback.format_exception(exc), "current_inputs": {}, "current_outputs": {},
                "timestamp": now_ms()})
    else:
        if any(m[0] in ("execution_error", "execution_interrupted") for m in done.messages):
            done.status = "error"
    done.outputs = _jsonable(outputs)
    return done


def _jsonable(outputs: dict) -> dict:
    import json

    return json.loads(json.dumps({str(k): v for k, v in outputs.items()}, default=str))
