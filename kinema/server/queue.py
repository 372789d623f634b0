"""The job queue and the history, persisted in SQLite (OUTPUT/.kinema/queue.sqlite, WAL mode).

A job moves pending -> running -> history. Taking a job counts an attempt in the same transaction
that marks it running, and finishing it deletes it from the queue in the same transaction that
writes its history record, so a job recorded as done is never run again.

A server killed while a job runs (SIGKILL, the OOM killer, a power cut) leaves that job marked
running. On the next start it goes back to the front of the queue, to run first, unless it has
already been started `MAX_ATTEMPTS` times: then it goes to the history as an error saying so, so a
job that brings the server down is not retried for ever. Pending jobs are kept as they were.
A kill after a job's files are written but before its record commits runs it once more: its files
take the next counter names, nothing is overwritten. With Ray workers (cluster.py) a worker that dies
mid-job puts its job back the same way (`requeue`), to run on another worker.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MAX_ATTEMPTS = 2
MAX_HISTORY = 10000  # ComfyUI's MAXIMUM_HISTORY_SIZE

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT UNIQUE NOT NULL,
    number REAL NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0,      -- 1: interrupted by a server stop, runs before the rest
    state TEXT NOT NULL DEFAULT 'pending',  -- pending | running
    attempts INTEGER NOT NULL DEFAULT 0,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT UNIQUE NOT NULL,
    record TEXT NOT NULL,                   -- ComfyUI's history entry, as /history returns it
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
ORDER = "ORDER BY resume DESC, number ASC, seq ASC"


@dataclass
class Job:
    prompt_id: str
    number: float
    prompt: dict
    extra_data: dict
    outputs: list
    attempts: int

    def item(self) -> list:
        """ComfyUI's queue item: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
        return [_number(self.number), self.prompt_id, self.prompt, self.extra_data, self.outputs]


def _number(n: float):
    return int(n) if float(n).is_integer() else n


def _dumps(value) -> str:
    return json.dumps(value, default=str, allow_nan=False)


class JobQueue:
    """Thread-safe; one connection guarded by a lock (the server's writes are small and few)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self.recovered: list[str] = []  # prompt ids re-queued by recover()
        self.failed: list[str] = []  # prompt ids given up by recover()
        self.recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

    # -- start-up ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Jobs left running by a server that stopped without finishing them: see the module docstring."""
        with self._tx() as db:
            rows = db.execute(f"SELECT * FROM queue WHERE state = 'running' {ORDER}").fetchall()
            for row in rows:
                job = _job(row)
                if job.attempts >= MAX_ATTEMPTS:
                    message = (f"the server stopped (killed or crashed) while running this job, {job.attempts} times; "
                               "it is not run again. Check the server's log and memory, then queue it anew.")
                    error = {"prompt_id": job.prompt_id, "node_id": None, "node_type": None, "executed": [],
                             "exception_message": message, "exception_type": "ServerStopped", "traceback": [],
                             "current_inputs": {}, "current_outputs": {}, "timestamp": int(time.time() * 1000)}
                    self._write_history(db, job, {}, "error", [["execution_error", error]])
                    self.failed.append(job.prompt_id)
                else:
                    db.execute("UPDATE queue SET state = 'pending', resume = 1 WHERE prompt_id = ?", (job.prompt_id,))
                    self.recovered.append(job.prompt_id)

    def next_number(self) -> int:
        """ComfyUI's prompt counter, carried over restarts."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'number'").fetchone()
            n = int(row[0]) if row else 0
            db.execute("INSERT OR REPLACE INTO meta VALUES ('number', ?)", (str(n + 1),))
            return n

    # -- the queue -----------------------------------------------------------------------------
    def put(self, prompt_id: str, number: float, prompt: dict, extra_data: dict, outputs: list) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO queue (prompt_id, number, prompt, extra_data, outputs, created) VALUES (?,?,?,?,?,?)",
                       (prompt_id, float(number), _dumps(prompt), _dumps(extra_data), _dumps(outputs), time.time()))

    def known(self, prompt_id: str) -> bool:
        with self._lock:
            return bool(self._db.execute("SELECT 1 FROM queue WHERE prompt_id = ? UNION "
                                         "SELECT 1 FROM history WHERE prompt_id = ?", (prompt_id, prompt_id)).fetchone())

    def take(self) -> Job | None:
        """The next pending job, marked running with one more attempt; None when nothing is pending."""
        with self._tx() as db:
            row = db.execute(f"SELECT * FROM queue WHERE state = 'pending' {ORDER} LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE queue SET state = 'running', attempts = attempts + 1 WHERE seq = ?", (row["seq"],))
        job = _job(row)
        job.attempts += 1
        return job

    def release(self, prompt_id: str) -> None:
        """A running job stopped by a clean server shutdown: pending again, at the front, the attempt not counted."""
        with self._tx() as db:
            db.execute("UPDATE queue SET state = 'pending', resume = 1, attempts = MAX(attempts - 1, 0) "
                       "WHERE prompt_id = ? AND state = 'running'", (prompt_id,))

    def requeue(self, job: Job, why: str) -> bool:
        """A running job whose worker was lost (a Ray worker died, kinema/server/cluster.py): pending again at the
        front, its attempt counted, to run on another worker; after MAX_ATTEMPTS attempts an error in the history
        saying `why`, as `recover` does after server crashes. True when it was queued again."""
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM queue WHERE prompt_id = ? AND state = 'running'",
                             (job.prompt_id,)).fetchone()
            if row is None:  # finished or deleted meanwhile: nothing to do
                return False
            if row["attempts"] < MAX_ATTEMPTS:
                db.execute("UPDATE queue SET state = 'pending', resume = 1 WHERE prompt_id = ?", (job.prompt_id,))
                return True
            message = f"{why}, {row['attempts']} times; it is not run again. Check the workers' logs, then queue it anew."
            error = {"prompt_id": job.prompt_id, "node_id": None, "node_type": None, "executed": [],
                     "exception_message": message, "exception_type": "WorkerLost", "traceback": [],
                     "current_inputs": {}, "current_outputs": {}, "timestamp": int(time.time() * 1000)}
            self._write_history(db, job, {}, "error", [["execution_error", error]])
            return False

    def finish(self, job: Job, outputs: dict, status: str, messages: list, meta: dict | None = None) -> None:
        """Record the job's history and take it off the queue, in one transaction."""
        with self._tx() as db:
            self._write_history(db, job, outputs, status, messages, meta)

    def _write_history(self, db, job: Job, outputs: dict, status: str, messages: list, meta: dict | None = None) -> None:
        record = {"prompt": job.item(), "outputs": outputs,
                  "status": {"status_str": status, "completed": status == "success", "messages": messages},
                  "meta": meta or {}}
        db.execute("DELETE FROM queue WHERE prompt_id = ?", (job.prompt_id,))
        db.execute("INSERT OR REPLACE INTO history (prompt_id, record, finished) VALUES (?,?,?)",
                   (job.prompt_id, _dumps(record), time.time()))
        db.execute("DELETE FROM history WHERE seq <= (SELECT MAX(seq) FROM history) - ?", (MAX_HISTORY,))

    def current(self) -> tuple[list, list]:
        """(running items, pending items) in run order, as /queue returns them."""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM queue {ORDER}").fetchall()
        jobs = [_job(r) for r in rows]
        running = [j.item() for j, r in zip(jobs, rows) if r["state"] == "running"]
        pending = [j.item() for j, r in zip(jobs, rows) if r["state"] == "pending"]
        return running, pending

    def remaining(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]

    def delete_pending(self, prompt_ids) -> int:
        with self._tx() as db:
            n = 0
            for pid in prompt_ids:
                n += db.execute("DELETE FROM queue WHERE prompt_id = ? AND state = 'pending'", (str(pid),)).rowcount
            return n

    def clear_pending(self) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM queue WHERE state = 'pending'").rowcount

    # -- the history ---------------------------------------------------------------------------
    def history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        """ComfyUI's get_history: one entry, or the last `max_items` (from `offset` when given), oldest first."""
        with self._lock:
            if prompt_id is not None:
                rows = self._db.execute("SELECT prompt_id, record FROM history WHERE prompt_id = ?", (prompt_id,)).fetchall()
            else:
                total = self._db.execute("SELECT COUNT(*) FROM history").fetchone()[0]
                if offset < 0:
                    offset = max(total - max_items, 0) if max_items is not None else 0
                limit = -1 if max_items is None else max_items
                rows = self._db.execute("SELECT prompt_id, record FROM history ORDER BY seq LIMIT ? OFFSET ?",
                                        (limit, offset)).fetchall()
        return {r["prompt_id"]: json.loads(r["record"]) for r in rows}

    def delete_history(self, prompt_ids) -> None:
        with self._tx() as db:
            for pid in prompt_ids:
                db.execute("DELETE FROM history WHERE prompt_id = ?", (str(pid),))

    def clear_history(self) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM history")


def _job(row) -> Job:
    return Job(row["prompt_id"], row["number"], json.loads(row["prompt"]), json.loads(row["extra_data"]),
               json.loads(row["outputs"]), row["attempts"])


class _Transaction:
    """`with queue._tx() as db:` one IMMEDIATE transaction under the queue's lock."""

    def __init__(self, db: sqlite3.Connection, lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()
