"""The README's Python examples run as written (the built-in model, and the demo's random checkpoint), in order,
and print what the README says they print."""

import re
from pathlib import Path

from kinema.demo import write_random_checkpoint
from kinema.media import read_metadata, read_video

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    assert text.index("```python") > text.index("## Python API")
    assert "kinema.Pipeline.load" in blocks[0]  # the Python section starts with the Pipeline
    monkeypatch.chdir(tmp_path)
    write_random_checkpoint(tmp_path / "outputs" / "demo" / "random-wan2.1")
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "(17, 64, 64, 3) torch.Size([16, 5, 8, 8])" in out
    assert "outputs/readme/kinema_00001.mp4" in out and "outputs/readme/i2v.gif i2v 20" in out
    assert "[0, 1, 2, 3, 4, 5, 6, 7] 8" in out
    assert read_video(tmp_path / "outputs/readme/kinema_00001.mp4").frames.shape == (17, 64, 64, 3)
    assert read_metadata(tmp_path / "outputs/readme/i2v.gif")["task"] == "i2v"
    assert "torch.Size([1, 3, 17, 64, 64]) torch.Size([1, 16, 5, 8, 8])" in out
    assert "3 1 2.0 auto" in out and "True sd3" in out  # the guidance extras
    assert "(49, 64, 64, 3) 17 16 uniform_standard" in out  # context windows (the built-in model's)
    assert "8 pyramid False" in out  # and one's own
    assert "(17, 64, 64, 3) (33, 64, 64, 3) 16" in out  # extension
    assert "flowmatch_distill 4 1.0" in out  # the built-in distillation LoRA
    assert "(17, 192, 192, 3) 96*96 2" in out  # refine and upscale
