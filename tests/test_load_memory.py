"""A small run of bench/load_memory.py: loading a DiT holds no second copy of its weights."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_memory.py"


def test_load_holds_one_copy():
    out = subprocess.run([sys.executable, str(BENCH), "--small", "--only", "kinema", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["file"] > 300 * 2**20  # a checkpoint large enough that a second copy would show
    # Above the process's own start-up memory, the load may add the weights once, plus the
    # float32 islands (upcast from bf16), plus slack: a second full copy would be >= 2.0.
    assert row["ratio_above_base"] <= 1.3, row
