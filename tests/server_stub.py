"""Stand-in nodes for the server tests, and a way to start `kinema serve` with them registered.

    python tests/server_stub.py serve --port N --output DIR ...   # kinema.cli.main with these nodes

KinemaTestSlowImage reports progress over `steps` steps (sleeping `delay` s each, with a preview) and
writes a PNG of one colour worked from its seed through kinema.media, so a test can decode it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kinema.errors import Cancelled  # noqa: E402
from kinema.workflow.types import FLOAT, INT, NODES, STRING, NodeOutput, node  # noqa: E402


def colour(seed: int) -> tuple[int, int, int]:
    return (seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256


def _slow_image(ctx, seed, steps, delay, width, height, filename_prefix):
    from kinema.media import save_video

    frame = np.zeros((1, height, width, 3), np.uint8)
    frame[:] = colour(seed)
    for i in range(steps):
        if ctx.cancel.is_set():
            raise Cancelled("interrupted")
        time.sleep(delay)
        ctx.progress(i + 1, steps, frame[0])
    path = save_video(frame, ctx.output_dir, format="png", filename_prefix=filename_prefix, metadata={"seed": seed})
    return NodeOutput((), {"images": [{"filename": path.name, "subfolder": "", "type": "output"}]})


def _number(ctx, value):
    return (value,)


def _fail(ctx, value):
    raise RuntimeError(f"KinemaTestFail failed on purpose with {value}")


if "KinemaTestSlowImage" not in NODES:
    node("KinemaTestSlowImage", required={"seed": INT(0, 0, 2**32), "steps": INT(3, 1, 1000), "delay": FLOAT(0.05, 0, 10),
                                          "width": INT(16, 1, 256), "height": INT(16, 1, 256),
                                          "filename_prefix": STRING("test")},
         output_node=True, category="testing")(_slow_image)
    node("KinemaTestNumber", required={"value": INT(0, 0, 2**32)}, outputs=("INT",), category="testing")(_number)
    node("KinemaTestFail", required={"value": INT(0)}, output_node=True, category="testing")(_fail)


if __name__ == "__main__":
    from kinema.cli.main import main

    sys.exit(main(sys.argv[1:]))
