"""`kinema serve --ray`: the queue's jobs on a real local Ray cluster (a head started by `ray start`, two worker
actors), the same files as the in-process server; a worker killed mid-job re-runs its job elsewhere, none lost
or doubled. The head's processes are stopped at the end (by their process group, which this test made)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_server import ROOT, Server, free_port, image_prompt, wait_history  # noqa: E402

ray = pytest.importorskip("ray", reason="the Ray test needs the ray extra: pip install 'kinema[ray]'")
RAY = Path(sys.executable).with_name("ray")


def kinema_prompt(seed: int, prefix: str) -> dict:
    """Kinema's own nodes on the built-in model: a real model loaded and kept by the worker that runs it."""
    return {
        "1": {"class_type": "KinemaPipelineLoader", "inputs": {"ckpt": "builtin", "dtype": "default",
                                                               "quantization": "disabled", "attention": "sdpa",
                                                               "blocks_to_swap": 0}},
        "2": {"class_type": "KinemaGenerate", "inputs": {
            "pipeline": ["1", 0], "task": "t2v", "prompt": "a red circle moving right on a black background",
            "negative_prompt": "", "width": 64, "height": 64, "frame_num": 5, "steps": 2, "seed": seed,
            "guide_scale": 0.0, "shift": 0.0, "solver": "unipc", "cache": "off", "vae_tile": "auto"}},
        "3": {"class_type": "KinemaSaveVideo", "inputs": {"images": ["2", 0], "fps": ["2", 1], "format": "webp",
                                                          "filename_prefix": prefix, "settings": ["2", 2]}},
    }


JOBS = [("slow", image_prompt(7, steps=40, delay=0.1, prefix="slow"))]  # the one whose worker is killed
JOBS += [(f"img{i}", image_prompt(i, steps=3, delay=0.05, prefix=f"img{i}")) for i in range(4)]
JOBS += [("video", kinema_prompt(3, "video"))]


@pytest.fixture
def head(tmp_path):
    """A Ray head on this machine with 2 CPUs (the two workers' slots), in a process group of its own."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    yield f"127.0.0.1:{port}"
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):  # the head's daemons kept the group `ray start` made
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(wait)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".kinema" not in p.parts}


def run_jobs(server: Server, kill: bool = False) -> dict:
    ids = {}
    for name, prompt in JOBS:
        r = server.post(prompt)
        assert r.status_code == 200, r.text
        ids[name] = r.json()["prompt_id"]
    killed = None
    if kill:  # SIGKILL the worker process running "slow", mid-job
        end = time.time() + 120
        while killed is None and time.time() < end:
            for w in httpx.get(server.url + "/kinema/workers", timeout=10).json()["workers"]:
                if w["prompt_id"] == ids["slow"] and w["pid"]:
                    time.sleep(1.0)
                    os.kill(w["pid"], signal.SIGKILL)
                    killed = w
            time.sleep(0.1)
        assert killed is not None, server.text()[-3000:]
    hist = wait_history(server, len(JOBS), timeout=300)
    for name, pid in ids.items():
        assert hist[pid]["status"]["status_str"] == "success", (name, hist[pid]["status"])
    return {"ids": ids, "killed": killed, "history": hist}


def test_ray_workers_run_the_queue(tmp_path, head):
    ray_dir, local_dir = tmp_path / "ray", tmp_path / "local"
    ray_dir.mkdir(), local_dir.mkdir()
    server = Server(ray_dir, "--ray", head, "--ray_workers", "2", "--ray_setup",
                    str(ROOT / "tests" / "server_stub.py")).wait_ready(timeout=120)
    try:
        got = run_jobs(server, kill=True)
        log = server.text()
    finally:
        server.stop()
    assert f"was lost while running {got['ids']['slow']}" in log, log[-3000:]
    assert log.count(f"running {got['ids']['slow']} on ray worker") == 2  # killed once, run again: attempt 2
    assert f"{got['ids']['slow']} on ray worker" in log and "(attempt 2)" in log

    reference = Server(local_dir).wait_ready()  # the same jobs in the server's own process
    try:
        run_jobs(reference)
    finally:
        reference.stop()
    ours, theirs = files_of(server.output), files_of(reference.output)
    assert sorted(ours) == sorted(theirs)  # one file per job: none lost, none doubled
    assert {n for n in ours if n.endswith(".png")} == {"slow_00001.png", *(f"img{i}_00001.png" for i in range(4))}
    for name in ours:
        if name.endswith(".png"):
            assert ours[name] == theirs[name], name
    from kinema.media import read_video

    video = [n for n in ours if n.endswith(".webp")]
    assert video == ["video_00001.webp"]
    a, b = read_video(server.output / video[0]).frames, read_video(reference.output / video[0]).frames
    assert a.shape == b.shape == (5, 64, 64, 3) and (a.int() - b.int()).abs().max() <= 2


@pytest.mark.slow
def test_a_parallel_job_on_a_placement_group(tmp_path, head):
    """--ring_size 2: a worker is two rank actors on a placement group, joined by torch.distributed (gloo here);
    Kinema's pipeline nodes split the job's tokens over them, and the video equals the in-process server's."""
    videos = {}
    for name, args in (("ray", ("--ray", head, "--ring_size", "2")), ("local", ())):
        (tmp_path / name).mkdir()
        server = Server(tmp_path / name, *args).wait_ready(timeout=120)
        try:
            r = server.post(kinema_prompt(5, "ring"))
            assert r.status_code == 200, r.text
            (entry,) = wait_history(server, 1, timeout=300).values()
            log = server.text()
            if name == "ray":
                assert [w["ranks"] for w in httpx.get(server.url + "/kinema/workers", timeout=10).json()["workers"]] == [2]
                assert "ray worker 0 ready: 2 ranks" in log and "Parallel run" not in log  # the ranks log, not the server
        finally:
            server.stop()
        assert entry["status"]["status_str"] == "success", (entry["status"], log[-3000:])
        from kinema.media import read_video

        videos[name] = read_video(server.output / "ring_00001.webp").frames.int()
    assert videos["ray"].shape == (5, 64, 64, 3) and (videos["ray"] - videos["local"]).abs().max() <= 2
