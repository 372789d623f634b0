"""The README's `kinema run` commands and its server client example run as written: the commands in a fresh
folder (the repo's .venv and examples/ linked in), the client against a real `kinema serve` on a free port."""

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kinema.media import read_video
from test_server import Server

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start:end]


def test_readme_kinema_run_commands(tmp_path):
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", _section("## Workflows: `kinema run`"), re.S)
              if "kinema run" in b]
    assert len(blocks) == 2
    for name in (".venv", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for block in blocks:
        out = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "outputs" / "run").rglob("*") if p.is_file() and not p.name.endswith(".json"))
    webp = [f for f in files if f.endswith(".webp")]
    mp4 = [f for f in files if f.endswith(".mp4")]
    assert webp == ["t2v_00001_.webp"] and len(mp4) == 1, files
    assert read_video(tmp_path / "outputs" / "run" / webp[0]).frames.shape == (9, 64, 64, 3)
    frames = read_video(next((tmp_path / "outputs" / "run").rglob("*.mp4"))).frames.numpy()
    assert frames.shape == (9, 64, 64, 3)
    red = frames[..., 0].astype(int) - frames[..., 2].astype(int)  # the prompt asks for a red circle: red pixels
    assert (red > 60).any()


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path).wait_ready()  # `kinema serve` in a subprocess, on a free port
    yield srv.port, srv.output
    srv.stop()


def test_readme_server_client_example(server, capsys):
    port, output = server
    (code,) = re.findall(r"```py\n(.*?)```", _section("## Server: `kinema serve`"), re.S)
    assert '"127.0.0.1:8188"' in code
    scope = {}
    exec(compile(code.replace('"127.0.0.1:8188"', f'"127.0.0.1:{port}"'), "README.md", "exec"), scope)
    assert "kinema_t2v_00001_.webp output" in capsys.readouterr().out
    assert scope["data"] == (output / "kinema_t2v_00001_.webp").read_bytes()
    frames = read_video(output / "kinema_t2v_00001_.webp").frames
    assert frames.shape == (9, 64, 64, 3) and np.asarray(frames).std() > 1
