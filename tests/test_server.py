"""`kinema serve` over a real socket: a server subprocess (tests/server_stub.py, with stand-in nodes) and
real HTTP / websocket clients. The message sequence of a job, /history and /view of its output,
4 clients x 5 prompts done once each, interrupt, SIGKILL mid-job and restart, path traversal, the token.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import websocket
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from server_stub import colour  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`kinema serve` with the stand-in nodes, in a subprocess."""

    def __init__(self, tmp: Path, *args, host="127.0.0.1", port=None, output=None):
        self.port = port or free_port()
        self.output = Path(output or tmp / "output")
        self.input = tmp / "input"
        self.host = host
        self.args = ["--host", host, "--port", str(self.port), "--output", str(self.output), "--input", str(self.input),
                     *args]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"server-{self.port}-{time.time_ns()}.log", "w+")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "server_stub.py"), "serve", *self.args],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout=90, headers=None) -> "Server":
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.text()}")
            try:
                if httpx.get(self.url + "/prompt", timeout=2, headers=headers).status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.text()}")

    def text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def ws(self, client_id: str, **kw) -> websocket.WebSocket:
        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=30, **kw)

    def post(self, prompt: dict, client_id: str | None = None, **kw) -> httpx.Response:
        body = {"prompt": prompt, **({"client_id": client_id} if client_id else {}), **kw}
        return httpx.post(self.url + "/prompt", json=body, timeout=30)


def image_prompt(seed: int, steps=3, delay=0.05, prefix="test") -> dict:
    return {"1": {"class_type": "KinemaTestNumber", "inputs": {"value": seed}},
            "2": {"class_type": "KinemaTestSlowImage",
                  "inputs": {"seed": ["1", 0], "steps": steps, "delay": delay, "width": 16, "height": 8,
                             "filename_prefix": prefix}}}


def messages_until_done(ws, prompt_id: str, timeout=60) -> list:
    """Every message (dicts, and bytes for binary frames) up to `executing` with node None for prompt_id."""
    out, end = [], time.time() + timeout
    while time.time() < end:
        frame = ws.recv()
        if isinstance(frame, bytes):
            out.append(frame)
            continue
        msg = json.loads(frame)
        out.append(msg)
        if msg["type"] == "executing" and msg["data"].get("node") is None and msg["data"].get("prompt_id") == prompt_id:
            return out
    raise AssertionError(f"no end of {prompt_id} in {out}")


def wait_history(server: Server, n: int, timeout=90) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        hist = httpx.get(server.url + "/history", timeout=10).json()
        if len(hist) >= n and not httpx.get(server.url + "/queue", timeout=10).json()["queue_running"]:
            return hist
        time.sleep(0.2)
    raise AssertionError(f"history holds {len(hist)} of {n}:\n{server.text()[-3000:]}")


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    s = Server(tmp, "--max_upload_mb", "1").wait_ready()
    yield s
    s.stop()
    print(s.text()[-2000:])


def test_job_sequence_history_and_view(server):
    cid = uuid.uuid4().hex
    ws = server.ws(cid)
    hello = json.loads(ws.recv())
    assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": cid}}
    r = server.post(image_prompt(7), cid)
    assert r.status_code == 200, r.text
    body = r.json()
    pid = body["prompt_id"]
    assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
    msgs = messages_until_done(ws, pid)
    ws.close()
    kinds = [m["type"] if isinstance(m, dict) else "preview" for m in msgs]
    for a, b in [("execution_start", "execution_cached"), ("execution_cached", "executing"),
                 ("executing", "progress"), ("progress", "executed"), ("executed", "execution_success")]:
        assert kinds.index(a) < kinds.index(b), kinds
    # ComfyUI's order at the end: execution_success, the queue's status, then executing null (history written)
    assert [k for k in kinds if k != "status"][-2:] == ["execution_success", "executing"], kinds
    assert "status" in kinds[: kinds.index("execution_start") + 1]  # the queue changed: status to everyone
    progress = [m["data"] for m in msgs if isinstance(m, dict) and m["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"], p["prompt_id"]) for p in progress] == [(i, 3, "2", pid) for i in (1, 2, 3)]
    running = [m["data"]["node"] for m in msgs if isinstance(m, dict) and m["type"] == "executing"]
    assert running[-1] is None and "2" in running
    previews = [m for m in msgs if isinstance(m, bytes)]
    assert len(previews) == 3
    assert struct.unpack(">II", previews[0][:8]) == (1, 1)  # PREVIEW_IMAGE, JPEG
    jpeg = np.asarray(Image.open(io.BytesIO(previews[0][8:])).convert("RGB")).astype(int)
    assert jpeg.shape == (8, 16, 3) and np.abs(jpeg - np.array(colour(7))).max() <= 8
    executed = next(m["data"] for m in msgs if isinstance(m, dict) and m["type"] == "executed")
    image = executed["output"]["images"][0]
    assert executed["node"] == "2" and image["type"] == "output"

    for prefix in ("", "/api"):
        hist = httpx.get(f"{server.url}{prefix}/history/{pid}").json()
        entry = hist[pid]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
        assert entry["outputs"]["2"]["images"] == [image]
        assert entry["prompt"][1] == pid and entry["prompt"][2]["2"]["class_type"] == "KinemaTestSlowImage"
        assert entry["prompt"][3]["client_id"] == cid and entry["prompt"][4] == ["2"]
        r = httpx.get(f"{server.url}{prefix}/view", params={"filename": image["filename"], "subfolder": "", "type": "output"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == (server.output / image["filename"]).read_bytes()
    assert (read_png(server.output / image["filename"]) == np.array(colour(7), np.uint8)).all()
    q = httpx.get(server.url + "/queue").json()
    assert q == {"queue_running": [], "queue_pending": []}
    assert httpx.get(server.url + "/prompt").json() == {"exec_info": {"queue_remaining": 0}}
    assert pid in httpx.get(server.url + "/history", params={"max_items": 1}).json()


def test_four_clients_five_prompts_each_done_once(server):
    before = set(httpx.get(server.url + "/history").json())
    results, errors = {}, []

    def client(k: int):
        try:
            cid = f"client{k}-{uuid.uuid4().hex[:6]}"
            ws = server.ws(cid)
            ids = []
            for j in range(5):
                r = server.post(image_prompt(100 + 10 * k + j, steps=1, delay=0, prefix=f"c{k}"), cid)
                assert r.status_code == 200, r.text
                ids.append(r.json()["prompt_id"])
            for pid in ids:
                msgs = messages_until_done(ws, pid, timeout=120)
                # the client saw its own jobs' events only, never another client's
                assert all(m["data"].get("prompt_id") in (None, *ids) for m in msgs if isinstance(m, dict))
            ws.close()
            results[k] = ids
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join(180) for t in threads]
    assert not errors, errors
    hist = httpx.get(server.url + "/history").json()
    new = {pid: e for pid, e in hist.items() if pid not in before}
    assert sorted(new) == sorted(p for ids in results.values() for p in ids) and len(new) == 20
    numbers = [e["prompt"][0] for e in new.values()]
    assert len(set(numbers)) == 20
    for k in range(4):
        files = sorted(server.output.glob(f"c{k}_*.png"))
        assert len(files) == 5, files  # one file per job: none run twice
        got = sorted(tuple(read_png(f)[0, 0]) for f in files)
        assert got == sorted(colour(100 + 10 * k + j) for j in range(5))
    assert all(e["status"]["status_str"] == "success" for e in new.values())


def test_interrupt_and_queue_edits(server):
    cid = uuid.uuid4().hex
    ws = server.ws(cid)
    ws.recv()
    slow = server.post(image_prompt(1, steps=200, delay=0.05, prefix="slow"), cid).json()["prompt_id"]
    waiting = [server.post(image_prompt(2 + i, steps=1, delay=0, prefix="wait"), cid).json()["prompt_id"] for i in range(3)]
    first = server.post(image_prompt(9, steps=1, delay=0, prefix="front"), cid, front=True).json()
    while True:
        m = ws.recv()
        if isinstance(m, str) and json.loads(m)["type"] == "progress":
            break
    q = httpx.get(server.url + "/queue").json()
    assert [i[1] for i in q["queue_running"]] == [slow]
    assert [i[1] for i in q["queue_pending"]] == [first["prompt_id"], *waiting]  # front: a negative number
    assert first["number"] < 0
    assert httpx.post(server.url + "/queue", json={"delete": [waiting[0]]}).status_code == 200
    assert [i[1] for i in httpx.get(server.url + "/queue").json()["queue_pending"]] == [first["prompt_id"], *waiting[1:]]
    assert httpx.post(server.url + "/queue", json={"clear": True}).status_code == 200
    assert httpx.get(server.url + "/queue").json()["queue_pending"] == []
    assert httpx.post(server.url + "/interrupt", json={}).status_code == 200
    msgs = messages_until_done(ws, slow)
    ws.close()
    kinds = [m["type"] for m in msgs if isinstance(m, dict)]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds
    entry = httpx.get(f"{server.url}/history/{slow}").json()[slow]
    assert entry["status"]["status_str"] == "error" and entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert not list(server.output.glob("slow_*")) and not list(server.output.glob("wait_*"))
    assert httpx.post(server.url + "/history", json={"delete": [slow]}).status_code == 200
    assert httpx.get(f"{server.url}/history/{slow}").json() == {}
    assert httpx.post(server.url + "/free", json={"unload_models": True}).status_code == 200


def test_failing_node_is_recorded_and_the_worker_survives(server):
    cid = uuid.uuid4().hex
    ws = server.ws(cid)
    ws.recv()
    bad = server.post({"1": {"class_type": "KinemaTestFail", "inputs": {"value": 3}}}, cid).json()["prompt_id"]
    msgs = messages_until_done(ws, bad)
    err = next(m["data"] for m in msgs if isinstance(m, dict) and m["type"] == "execution_error")
    assert "failed on purpose with 3" in err["exception_message"] and err["prompt_id"] == bad
    entry = httpx.get(f"{server.url}/history/{bad}").json()[bad]
    assert entry["status"]["status_str"] == "error"
    partly = image_prompt(5, steps=1, delay=0, prefix="after_fail")
    partly["3"] = {"class_type": "KinemaTestSlowImage", "inputs": {**partly["2"]["inputs"], "steps": "many"}}
    r = server.post(partly, cid).json()  # ComfyUI runs the outputs that validate and reports the others
    assert list(r["node_errors"]) == ["3"] and r["node_errors"]["3"]["dependent_outputs"] == ["3"]
    good = r["prompt_id"]
    msgs = messages_until_done(ws, good)
    assert any(isinstance(m, dict) and m["type"] == "execution_success" for m in msgs)
    assert httpx.get(f"{server.url}/history/{good}").json()[good]["prompt"][4] == ["2"]
    assert len(list(server.output.glob("after_fail_*.png"))) == 1
    ws.close()


def test_object_info_models_and_stats(server):
    info = httpx.get(server.url + "/object_info").json()
    slow = info["KinemaTestSlowImage"]
    assert slow["input"]["required"]["steps"][0] == "INT" and slow["output_node"] is True
    one = httpx.get(server.url + "/api/object_info/KinemaTestNumber").json()
    assert list(one) == ["KinemaTestNumber"] and one["KinemaTestNumber"]["output"] == ["INT"]
    assert httpx.get(server.url + "/object_info/NoSuchNode").json() == {}
    kinds = httpx.get(server.url + "/models").json()
    assert "diffusion_models" in kinds
    assert "kinema_builtin_dit.safetensors" in httpx.get(server.url + "/models/diffusion_models").json()
    assert httpx.get(server.url + "/models/nonsense").status_code == 404
    stats = httpx.get(server.url + "/system_stats").json()
    assert stats["system"]["ram_total"] > 0 and stats["devices"][0]["type"] in ("cpu", "cuda")
    assert httpx.get(server.url + "/embeddings").json() == []
    assert isinstance(httpx.get(server.url + "/extensions").json(), list)
    assert httpx.get(server.url + "/").status_code == 200


def _png_bytes(c=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), c).save(buf, format="PNG")
    return buf.getvalue()


def test_view_and_upload_stay_in_their_folders(server, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png_bytes())
    (server.output / "escape").symlink_to(tmp_path, target_is_directory=True)
    (server.output / "link.png").symlink_to(secret)
    view = server.url + "/view"
    for params in [{"filename": "../secret.png"}, {"filename": str(secret)}, {"filename": "x.png", "subfolder": ".."},
                   {"filename": "secret.png", "subfolder": "escape"}, {"filename": "link.png"},
                   {"filename": "secret.png", "subfolder": str(tmp_path)}, {"filename": "x.png", "type": "etc"},
                   {"filename": ".kinema/queue.sqlite"}, {"filename": "queue.sqlite", "subfolder": ".kinema"},
                   {"filename": "x\x00.png"}, {"filename": "../../etc/passwd", "type": "input"}, {}]:
        r = httpx.get(view, params=params)
        assert r.status_code in (400, 403, 404), (params, r.status_code)
        assert "error" in r.json()
    # percent-encoded dots and slashes, sent raw
    for raw in ["filename=%2e%2e%2fsecret.png", "filename=secret.png&subfolder=%2e%2e", "filename=%2Fetc%2Fpasswd",
                "filename=..%5csecret.png", "filename=secret.png&type=output&subfolder=escape%2f"]:
        r = httpx.get(f"{view}?{raw}")
        assert r.status_code in (400, 403, 404), (raw, r.status_code)

    up = server.url + "/upload/image"
    png = _png_bytes()
    r = httpx.post(up, files={"image": ("in.png", png, "image/png")}, data={"subfolder": "sub"})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "in.png", "subfolder": "sub", "type": "input"}
    assert (server.input / "sub" / "in.png").read_bytes() == png
    r = httpx.post(up, files={"image": ("in.png", png, "image/png")}, data={"subfolder": "sub"})
    assert r.json()["name"] == "in.png"  # the same bytes: not stored twice
    other = _png_bytes((200, 0, 0))
    r = httpx.post(up, files={"image": ("in.png", other, "image/png")}, data={"subfolder": "sub"})
    assert r.json()["name"] == "in (1).png" and (server.input / "sub" / "in (1).png").read_bytes() == other
    r = httpx.post(up, files={"image": ("in.png", other, "image/png")}, data={"subfolder": "sub", "overwrite": "true"})
    assert r.json()["name"] == "in.png" and (server.input / "sub" / "in.png").read_bytes() == other
    r = httpx.get(view, params={"filename": "in.png", "subfolder": "sub", "type": "input"})
    assert r.status_code == 200 and r.content == other
    (server.input / "out").symlink_to(tmp_path, target_is_directory=True)
    refused = [({"image": ("../evil.png", png)}, {}), ({"image": (str(tmp_path / "evil.png"), png)}, {}),
               ({"image": ("evil.png", png)}, {"subfolder": ".."}), ({"image": ("evil.png", png)}, {"subfolder": "/tmp"}),
               ({"image": ("evil.png", png)}, {"subfolder": "out"}), ({"image": ("evil.png", png)}, {"type": "models"}),
               ({"image": ("evil.png", b"<html><script>alert(1)</script>")}, {}),
               ({"image": ("evil.html", png)}, {}), ({"image": ("evil.png", b"\xff\xd8\xff" + b"0" * 20)}, {}),
               ({"image": (".hidden.png", png)}, {}), ({"image": ("big.png", png + b"0" * (2 << 20))}, {}),
               ({"other": ("evil.png", png)}, {})]
    for files, data in refused:
        r = httpx.post(up, files=files, data=data)
        assert r.status_code in (400, 403, 413, 415), (files["image" if "image" in files else "other"][0], data, r.text)
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.glob("*evil*"))
    assert sorted(p.name for p in (server.input / "sub").iterdir()) == ["in (1).png", "in.png"]
    assert not list(server.input.rglob("*.partial*"))
    mp4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40
    r = httpx.post(up, files={"image": ("clip.mp4", mp4)})
    assert r.status_code == 200 and r.json()["name"] == "clip.mp4"


def test_bodies_over_the_limit_are_refused(server):
    r = httpx.post(server.url + "/prompt", content=b"{" + b" " * (17 << 20) + b"}",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    def chunks():  # no Content-Length: counted while it streams
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * (1 << 20)
        yield b'"}'
    r = httpx.post(server.url + "/prompt", content=chunks(), timeout=60)
    assert r.status_code == 413
    assert httpx.get(server.url + "/prompt").status_code == 200


def test_sigkill_mid_job_then_restart(tmp_path):
    """Killed twice while job A runs: after the first restart A runs first again, after the second it is failed with
    its reason; the jobs queued behind it all run once; no temporary file is left under a final name."""
    out = tmp_path / "output"
    cid = "killer"
    s = Server(tmp_path, output=out).wait_ready()
    ws = s.ws(cid)
    ws.recv()
    a = s.post(image_prompt(1, steps=400, delay=0.05, prefix="a"), cid).json()["prompt_id"]
    # r0 goes to the front: after a restart only the interrupted job's own rule puts A before it
    rest = [s.post(image_prompt(20 + i, steps=4, delay=0.25, prefix=f"r{i}"), cid, front=i == 0).json()["prompt_id"]
            for i in range(3)]

    def kill_during_a(server, ws):
        while True:
            m = ws.recv()
            if isinstance(m, str):
                m = json.loads(m)
                if m["type"] == "progress":
                    assert m["data"]["prompt_id"] == a
                    break
        ws.close()
        server.kill()

    kill_during_a(s, ws)
    db = sqlite3.connect(out / ".kinema" / "queue.sqlite")
    rows = dict(db.execute("SELECT prompt_id, state FROM queue").fetchall())
    db.close()
    assert rows == {a: "running", **{p: "pending" for p in rest}}
    s = Server(tmp_path, output=out, port=s.port)
    ws = s.wait_ready().ws(cid)
    ws.recv()
    running = []
    while not running:
        running = [i[1] for i in httpx.get(s.url + "/queue").json()["queue_running"]]
    assert running == [a]  # again, first
    kill_during_a(s, ws)
    s = Server(tmp_path, output=out, port=s.port).wait_ready()
    try:
        hist = wait_history(s, 4)
        assert sorted(hist) == sorted([a, *rest])
        fail = hist[a]["status"]
        assert fail["status_str"] == "error" and fail["messages"][-1][0] == "execution_error"
        assert "stopped (killed or crashed) while running this job, 2 times" in fail["messages"][-1][1]["exception_message"]
        for i, p in enumerate(rest):
            assert hist[p]["status"]["status_str"] == "success"
            files = list(out.glob(f"r{i}_*"))
            assert len(files) == 1 and tuple(read_png(files[0])[0, 0]) == colour(20 + i)
        assert not list(out.glob("a_*"))
        assert httpx.get(s.url + "/queue").json() == {"queue_running": [], "queue_pending": []}
    finally:
        s.stop()
    assert not [p for p in out.rglob("*") if "partial" in p.name]


def test_sigkill_once_reruns_the_job(tmp_path):
    out = tmp_path / "output"
    s = Server(tmp_path, output=out).wait_ready()
    ws = s.ws("k")
    ws.recv()
    a = s.post(image_prompt(3, steps=30, delay=0.1, prefix="once"), "k").json()["prompt_id"]
    while not (isinstance(m := ws.recv(), str) and json.loads(m)["type"] == "progress"):
        pass
    s.kill()
    s = Server(tmp_path, output=out, port=s.port).wait_ready()
    try:
        hist = wait_history(s, 1)
        assert hist[a]["status"]["status_str"] == "success"
        files = list(out.glob("once_*"))
        assert len(files) == 1 and tuple(read_png(files[0])[0, 0]) == colour(3)
    finally:
        s.stop()


def test_token_required_beyond_localhost(tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "server_stub.py"), "serve", "--host", "0.0.0.0", "--port",
                        str(port), "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--token" in r.stderr and "0.0.0.0" in r.stderr, r.stderr
    s = Server(tmp_path, "--token", "s3cret", host="0.0.0.0").wait_ready()
    try:
        url = s.url + "/prompt"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(s.url + "/api/queue", auth=("anyone", "s3cret")).status_code == 200
        assert httpx.get(s.url + "/history", auth=("anyone", "nope")).status_code == 401
        assert httpx.post(s.url + "/prompt", json={"prompt": image_prompt(1)}).status_code == 401
        assert httpx.get(s.url + "/view", params={"filename": "x.png"}).status_code == 401
        r = httpx.get(s.url + "/", params={"token": "s3cret"})
        assert r.status_code == 200 and "kinema_token" in r.headers.get("set-cookie", "")
        assert httpx.get(url, cookies={"kinema_token": "s3cret"}).status_code == 200
        with pytest.raises(websocket.WebSocketBadStatusException):
            s.ws("nobody")
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(f"ws://127.0.0.1:{s.port}/ws?clientId=x&token=wrong", timeout=10)
        ws = websocket.create_connection(f"ws://127.0.0.1:{s.port}/ws?clientId=x&token=s3cret", timeout=10)
        assert json.loads(ws.recv())["type"] == "status"
        ws.close()
        auth = base64.b64encode(b"u:s3cret").decode()
        ws = s.ws("y", header=[f"Authorization: Basic {auth}"])
        assert json.loads(ws.recv())["data"]["sid"] == "y"
        ws.close()
        # a page on another site driving the server through the browser is refused, token or not
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret", "Origin": "http://evil.example"}).status_code == 403
    finally:
        s.stop()


def test_builtin_model_t2v_through_the_server(server):
    """The ComfyUI core t2v graph on the built-in model, posted as a client would: progress per sampler step,
    the saved WebP decoded (frames, size, a picture), and fetched back through /view."""
    from kinema.media import read_video
    from kinema.server.examples import t2v_prompt

    cid = uuid.uuid4().hex
    ws = server.ws(cid)
    ws.recv()
    r = server.post(t2v_prompt(width=64, height=48, length=5, steps=3, seed=5, prefix="builtin"), cid)
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    msgs = messages_until_done(ws, pid, timeout=300)
    ws.close()
    events = [m for m in msgs if isinstance(m, dict)]
    assert [m["type"] for m in events if m["type"].startswith("execution_")][-1] == "execution_success", events[-3:]
    steps = [m["data"]["value"] for m in events if m["type"] == "progress" and m["data"]["node"] == "8"]
    assert steps[-1] == 3 and steps == sorted(steps)
    entry = httpx.get(f"{server.url}/history/{pid}").json()[pid]
    (saved,) = entry["outputs"]["10"]["images"]
    path = server.output / saved["subfolder"] / saved["filename"]
    video = read_video(path)
    assert tuple(video.frames.shape) == (5, 48, 64, 3) and video.frames.float().std() > 5
    view = httpx.get(server.url + "/view", params={"filename": saved["filename"], "subfolder": saved["subfolder"]})
    assert view.status_code == 200 and view.headers["content-type"] == "image/webp" and view.content == path.read_bytes()


def test_sigterm_puts_the_running_job_back(tmp_path):
    """A clean stop (SIGTERM, Ctrl-C) interrupts the running job and queues it again first, its attempt not counted."""
    out = tmp_path / "output"
    s = Server(tmp_path, output=out).wait_ready()
    ws = s.ws("t")
    ws.recv()
    a = s.post(image_prompt(4, steps=40, delay=0.05, prefix="term"), "t").json()["prompt_id"]
    while not (isinstance(m := ws.recv(), str) and json.loads(m)["type"] == "progress"):
        pass
    ws.close()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    db = sqlite3.connect(out / ".kinema" / "queue.sqlite")
    assert db.execute("SELECT prompt_id, state, attempts, resume FROM queue").fetchall() == [(a, "pending", 0, 1)]
    db.close()
    s = Server(tmp_path, output=out, port=s.port).wait_ready()
    try:
        hist = wait_history(s, 1)
        assert hist[a]["status"]["status_str"] == "success"
        assert len(list(out.glob("term_*"))) == 1
    finally:
        s.stop()


def test_jobs_view(server):
    cid = uuid.uuid4().hex
    ws = server.ws(cid)
    ws.recv()
    pid = server.post(image_prompt(8, steps=1, delay=0, prefix="jobs"), cid).json()["prompt_id"]
    messages_until_done(ws, pid)
    ws.close()
    page = httpx.get(server.url + "/api/jobs", params={"status": "completed,failed,cancelled", "limit": 200}).json()
    job = next(j for j in page["jobs"] if j["id"] == pid)
    assert job["status"] == "completed" and job["outputs_count"] == 1
    assert job["preview_output"]["filename"].startswith("jobs_") and job["preview_output"]["nodeId"] == "2"
    assert job["execution_end_time"] >= job["execution_start_time"] > 0
    assert page["pagination"]["total"] == len(httpx.get(server.url + "/history").json())
    assert [j["create_time"] for j in page["jobs"]] == sorted((j["create_time"] for j in page["jobs"]), reverse=True)
    one = httpx.get(f"{server.url}/api/jobs/{pid}").json()
    assert one["workflow"]["prompt"]["2"]["class_type"] == "KinemaTestSlowImage" and "2" in one["outputs"]
    assert httpx.get(server.url + "/api/jobs", params={"status": "pending,in_progress"}).json()["jobs"] == []
    assert httpx.get(server.url + "/api/jobs", params={"status": "bogus"}).status_code == 400
    assert httpx.get(server.url + "/api/jobs/nope").status_code == 404


def test_comfy_frontend(tmp_path):
    """--comfy-frontend: ComfyUI's own page and the user routes it calls (settings, user files), confined."""
    pkg = pytest.importorskip("comfyui_frontend_package", reason="pip install comfyui-frontend-package to test it")
    s = Server(tmp_path, "--comfy-frontend").wait_ready()
    try:
        page = httpx.get(s.url + "/")
        assert page.status_code == 200
        assert page.text == (Path(pkg.__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
        assert httpx.get(s.url + "/api/users").json() == {"storage": "server", "migrated": True}
        assert httpx.post(s.url + "/api/settings/Comfy.TutorialCompleted", json=True).status_code == 200
        assert httpx.get(s.url + "/api/settings").json() == {"Comfy.TutorialCompleted": True}
        assert httpx.get(s.url + "/api/settings/Comfy.TutorialCompleted").json() is True
        wf = json.dumps({"nodes": [], "links": []})
        r = httpx.post(s.url + "/api/userdata/workflows%2Fmine.json", content=wf, params={"full_info": "true"})
        assert r.status_code == 200 and r.json()["path"] == "workflows/mine.json"
        assert httpx.get(s.url + "/api/userdata/workflows%2Fmine.json").text == wf
        listing = httpx.get(s.url + "/api/userdata", params={"dir": "workflows", "recurse": "true"}).json()
        assert listing == ["mine.json"]
        for bad in ("..%2F..%2Fqueue.sqlite", "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2F..%2Fx", ".hidden"):
            assert httpx.post(f"{s.url}/api/userdata/{bad}", content=b"x").status_code in (400, 403, 404), bad
            assert httpx.get(f"{s.url}/api/userdata/{bad}").status_code in (400, 403, 404), bad
        assert httpx.delete(s.url + "/api/userdata/workflows%2Fmine.json").status_code == 204
        assert httpx.get(s.url + "/api/extensions").json()  # the frontend's own core extensions
        assert httpx.get(s.url + "/api/features").json()["max_upload_size"] > 0
    finally:
        s.stop()
    assert not list((s.output / ".kinema").rglob("*.partial*"))


def test_comfy_frontend_runs_a_graph_in_chromium(tmp_path):
    """ComfyUI's own editor against Kinema in headless Chromium: it starts with no page error, takes the built-in t2v
    graph, and its Run queues it; the video is written and decoded."""
    import shutil

    pytest.importorskip("comfyui_frontend_package", reason="pip install comfyui-frontend-package to test it")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    from kinema.media import read_video
    from kinema.server.examples import t2v_prompt

    s = Server(tmp_path, "--comfy-frontend").wait_ready()
    errors = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(s.url + "/", wait_until="load", timeout=90000)
            page.wait_for_function("window.app && window.app.graph", timeout=90000)
            graph = t2v_prompt(width=64, height=48, length=5, steps=2, seed=3, prefix="frontend")
            page.evaluate("async (p) => { await window.app.loadApiJson(p, 'kinema.json'); }", graph)
            assert page.evaluate("window.app.graph._nodes.length") == len(graph)
            page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
            hist = wait_history(s, 1, timeout=180)
            browser.close()
        (entry,) = hist.values()
        assert entry["status"]["status_str"] == "success", entry["status"]
        (saved,) = entry["outputs"]["10"]["images"]
        assert tuple(read_video(s.output / saved["filename"]).frames.shape) == (5, 48, 64, 3)
        assert not errors, errors
    finally:
        s.stop()


def test_free_memory_forgets_cached_outputs(server):
    """POST /free {"free_memory": true} (ComfyUI's): models unloaded and node outputs forgotten, so the same
    prompt runs again in full; without it the second run is served from the cache."""
    cid = uuid.uuid4().hex
    ws = server.ws(cid)
    ws.recv()

    def cached_nodes(prompt_id):
        msgs = [m for m in messages_until_done(ws, prompt_id) if isinstance(m, dict)]
        (c,) = [m["data"]["nodes"] for m in msgs if m["type"] == "execution_cached"]
        return set(c)

    prompt = image_prompt(77, steps=1, delay=0, prefix="freed")
    assert cached_nodes(server.post(prompt, cid).json()["prompt_id"]) == set()
    assert "1" in cached_nodes(server.post(prompt, cid).json()["prompt_id"])
    assert httpx.post(server.url + "/free", json={"free_memory": True}).status_code == 200
    assert cached_nodes(server.post(prompt, cid).json()["prompt_id"]) == set()
    ws.close()
