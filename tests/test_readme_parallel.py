"""The README's "Many GPUs" commands run as written (torchrun on the CPU, gloo, the built-in model), in a fresh
folder with the repo's .venv linked in, and give the single-process video."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from kinema.media import read_video

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n### ", start + len(title))
    return README[start:end]


def _commands() -> list[str]:
    """The torchrun commands of the section's first bash block, one string each (continuations joined)."""
    (block, *_) = re.findall(r"```bash\n(.*?)```", _section("### One job on many GPUs"), re.S)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["bash", "-e", "-c", cmd], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _single_process(cwd: Path, cmd: str) -> Path:
    """The same command without torchrun and its parallel flags: the reference video."""
    from kinema.cli.main import main

    args = cmd.split(" -m kinema ", 1)[1]
    args = re.sub(r"--(ulysses_size|ring_size) \d+|--(cfg_parallel|dit_fsdp|t5_fsdp|vae_parallel)\b", "", args)
    args = re.sub(r"--save_file (\S+)", lambda m: f"--save_file {m.group(1)[:-4]}-single.mp4", args)
    argv = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args)]
    cwd_before = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd_before)
    return cwd / re.search(r"--save_file (\S+)", args).group(1)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / ".venv").symlink_to(ROOT / ".venv" if (ROOT / ".venv").exists() else Path(os.sys.prefix))
    return tmp_path


def check(folder: Path, cmd: str) -> None:
    _run(cmd, folder)
    made = folder / re.search(r"--save_file (\S+)", cmd).group(1)
    ref = _single_process(folder, cmd)
    a, b = read_video(made).frames.int(), read_video(ref).frames.int()
    assert a.shape == b.shape == (17, 64, 64, 3)
    assert (a - b).abs().float().mean() < 0.5  # h264 of the same frames (the frames agree within 1e-5 before it)


def test_readme_torchrun_ring(folder):
    cmds = _commands()
    assert len(cmds) == 3 and all(c.startswith(".venv/bin/torchrun --nproc_per_node=") for c in cmds)
    check(folder, cmds[0])


@pytest.mark.slow
@pytest.mark.parametrize("index", [1, 2])
def test_readme_torchrun_ulysses_fsdp_and_cfg(folder, index):
    check(folder, _commands()[index])


@pytest.mark.slow
def test_readme_torchrun_python_script(folder):
    (code,) = re.findall(r"```py\n(.*?)```", _section("### One job on many GPUs"), re.S)
    command = re.search(r"# parallel_t2v.py: (.*)", code).group(1)
    (folder / "parallel_t2v.py").write_text(code)
    out = _run(command, folder)
    (saved,) = [line for line in out.stdout.splitlines() if line.strip()]
    assert saved.startswith("outputs/parallel/") and (folder / saved).is_file()
    assert read_video(folder / saved).frames.shape == (17, 64, 64, 3)
