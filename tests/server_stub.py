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


def have_executor() -> bool:
    try:
        import kinema.workflow.executor  # noqa: F401
        import kinema.workflow.validate  # noqa: F401
    except ImportError:
        return False
    return True


class StubEngine:
    """Only while kinema.workflow.executor is not there: runs the stand-in nodes in id order, ComfyUI's events."""

    def __init__(self, config):
        from kinema.workflow.context import ModelCache
        from kinema.workflow.folders import ModelFolders

        self.config, self.folders = config, ModelFolders()
        self.executor = self
        self.models = ModelCache()

    def to_api(self, workflow):
        from kinema.workflow.convert import to_api

        return to_api(workflow)

    def validate(self, prompt):
        from kinema.server.app import PromptRefused, _error

        outs = []
        for nid, n in prompt.items():
            if not isinstance(n, dict) or n.get("class_type") not in NODES or not isinstance(n.get("inputs"), dict):
                raise PromptRefused(_error("missing_node_type", f"bad node {nid}"))
            nd = NODES[n["class_type"]]
            for name, inp in nd.required.items():
                v = n["inputs"].get(name)
                if isinstance(v, list):
                    if len(v) != 2 or str(v[0]) not in prompt or str(v[0]) == nid:
                        raise PromptRefused(_error("bad_linked_input", f"{nid}.{name}"))
                elif inp.type == "INT" and (not isinstance(v, int) or isinstance(v, bool) or not inp.min <= v <= inp.max):
                    raise PromptRefused(_error("invalid_input_type", f"{nid}.{name}"))
                elif inp.type == "FLOAT" and (not isinstance(v, (int, float)) or not inp.min <= v <= inp.max):
                    raise PromptRefused(_error("invalid_input_type", f"{nid}.{name}"))
                elif inp.type == "STRING" and not isinstance(v, str):
                    raise PromptRefused(_error("invalid_input_type", f"{nid}.{name}"))
            if nd.output_node:
                outs.append(nid)
        if not outs:
            raise PromptRefused(_error("prompt_no_outputs", "no outputs"))
        return outs

    def execute(self, prompt, prompt_id, *, listener=None, cancel=None, extra_data=None):
        from kinema.workflow.context import ExecutionContext, Progress

        emit = listener or (lambda e, d: None)
        ms = lambda: int(time.time() * 1000)  # noqa: E731
        emit("execution_start", {"prompt_id": prompt_id, "timestamp": ms()})
        emit("execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": ms()})
        values, ui = {}, {}

        def report(nid, value, total, preview):
            emit("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": nid})
            if preview is not None:
                emit("preview", {"image": preview, "node": nid})

        order = sorted(prompt, key=lambda k: any(isinstance(v, list) for v in prompt[k]["inputs"].values()))
        try:
            for nid in order:
                n = prompt[nid]
                emit("executing", {"node": nid, "display_node": nid, "prompt_id": prompt_id})
                kw = {k: values[str(v[0])][v[1]] if isinstance(v, list) else v for k, v in n["inputs"].items()}
                ctx = ExecutionContext(self.folders, self.config.output_dir, self.config.input_dir,
                                       self.config.temp_dir, self.models, cancel or __import__("threading").Event(),
                                       Progress(report, nid), prompt_id, nid, prompt)
                out = NODES[n["class_type"]].fn(ctx, **kw)
                if isinstance(out, NodeOutput):
                    values[nid] = out.outputs
                    if out.ui:
                        ui[nid] = out.ui
                        emit("executed", {"node": nid, "display_node": nid, "output": out.ui, "prompt_id": prompt_id})
                else:
                    values[nid] = out
        except Cancelled:
            emit("execution_interrupted", {"prompt_id": prompt_id, "node_id": nid, "node_type": n["class_type"],
                                           "executed": [], "timestamp": ms()})
            raise
        except Exception as e:
            emit("execution_error", {"prompt_id": prompt_id, "node_id": nid, "node_type": n["class_type"],
                                     "executed": [], "exception_message": str(e), "exception_type": type(e).__name__,
                                     "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": ms()})
            raise
        emit("execution_success", {"prompt_id": prompt_id, "timestamp": ms()})
        emit("executing", {"node": None, "prompt_id": prompt_id})
        return ui


if __name__ == "__main__":
    from kinema.cli.main import main

    if not have_executor():
        import kinema.server.app

        kinema.server.app.Engine = StubEngine

    sys.exit(main(sys.argv[1:]))
