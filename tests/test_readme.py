"""The README's Python example runs as written (against the demo's random checkpoint)."""

import re
from pathlib import Path

from kinema.demo import write_random_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    write_random_checkpoint(tmp_path / "outputs" / "demo" / "random-wan2.1")
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([1, 3, 17, 64, 64]) torch.Size([1, 16, 5, 8, 8])" in out
