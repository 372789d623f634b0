"""Runs a validated prompt: nodes in dependency order, outputs cached across prompts by input signature.

A node's signature is its class, its widget values, its fingerprint (a file's mtime) and the signatures
of what feeds it, so a prompt that changes only the sampler's seed re-runs the sampler and what follows
and takes everything else from the cache. As ComfyUI's default cache, only the latest prompt's outputs
are kept. Messages go to a listener in ComfyUI's websocket types, order and shapes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from kinema.errors import Cancelled, KinemaError
from kinema.workflow.context import ExecutionContext, ModelCache, Progress
from kinema.workflow.convert import is_ui_format, to_api
from kinema.workflow.types import NODES, NodeDef, NodeOutput
from kinema.workflow.validate import validate_prompt

log = logging.getLogger("kinema")

Listener = Callable[[str, dict], None]


class WorkflowError(KinemaError):
    """A node failed while the prompt ran; `event` is the execution_error message sent for it."""

    def __init__(self, message: str, node_id: str, node_type: str, event: dict | None = None):
        super().__init__(message)
        self.node_id, self.node_type, self.event = node_id, node_type, event or {}


@dataclass
class _Cached:
    outputs: tuple
    ui: dict | None


def _now() -> int:
    return int(time.time() * 1000)


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _format_value(x):
    """ComfyUI's format_value, for execution_error's current_inputs."""
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    shape = getattr(x, "shape", None)
    if shape is not None:
        return f"{type(x).__name__}{list(shape)}"
    return str(x)[:200]


_UNIQUE = itertools.count()


def _json_key(value) -> str:
    try:
        return json.dumps(value, sort_keys=True, default=repr)
    except (TypeError, ValueError, RecursionError):
        return f"uncomparable {next(_UNIQUE)}"  # a value that cannot be written down never hits the cache


class Executor:
    """Validates and runs prompts; keeps node outputs (by signature) and loaded models between them."""

    def __init__(self, folders, output_dir, input_dir=None, temp_dir=None, models: ModelCache | None = None):
        import kinema.workflow.nodes  # noqa: F401  (registers every node)

        self.folders = folders
        self.output_dir = Path(output_dir)
        self.input_dir = Path(input_dir) if input_dir is not None else self.output_dir.parent / "input"
        self.temp_dir = Path(temp_dir) if temp_dir is not None else self.output_dir.parent / "temp"
        self.models = models if models is not None else ModelCache()
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def context(self, **kw) -> ExecutionContext:
        return ExecutionContext(self.folders, self.output_dir, self.input_dir, self.temp_dir, self.models, **kw)

    def object_info(self) -> dict:
        """Every node's /object_info record, file-name combos listed from the folders now."""
        ctx = self.context()
        return {name: _safe_info(d, ctx) for name, d in sorted(NODES.items())}

    def reset(self) -> None:
        """Forget every cached node output (ComfyUI's POST /free with free_memory); models stay loaded."""
        with self._lock:
            self._cache.clear()

    # -- running a prompt ----------------------------------------------------------------------------------
    def execute(self, prompt: dict, prompt_id: str, *, listener: Listener | None = None,
                cancel: threading.Event | None = None, extra_data: dict | None = None) -> dict:
        """Run `prompt` (API format; UI format is converted); returns {node_id: ui} of nodes with UI output.
        Raises PromptError (invalid), WorkflowError (a node failed) or Cancelled."""
        with self._lock:
            return _Run(self, prompt, prompt_id, listener, cancel, extra_data or {}).run()


class _Run:
    def __init__(self, ex: Executor, prompt, prompt_id, listener, cancel, extra_data):
        self.ex = ex
        self.prompt_id = prompt_id
        self.listener = listener
        self.cancel = cancel if cancel is not None else threading.Event()
        self.extra_data = extra_data
        prompt = to_api(prompt) if is_ui_format(prompt) else prompt
        self.prompt = _copy(prompt)  # validation coerces values in place
        self.ctx = ex.context(cancel=self.cancel, prompt_id=prompt_id, prompt=self.prompt,
                              extra_pnginfo=extra_data.get("extra_pnginfo"), preview=extra_data.get("preview", True))
        self.executed: list[str] = []

    def send(self, event: str, data: dict) -> None:
        if self.listener is None:
            return
        try:
            self.listener(event, data)
        except Exception:  # a client gone away must not stop the run
            log.warning("workflow listener failed on %s", event, exc_info=True)

    def run(self) -> dict:
        outputs = validate_prompt(self.prompt, self.ctx)
        order = self.order(outputs)
        signatures = self.signatures(order)
        cache = self.ex._cache
        self.send("execution_start", {"prompt_id": self.prompt_id, "timestamp": _now()})
        try:
            cached = [n for n in order if signatures[n] in cache]
            self.send("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id, "timestamp": _now()})
            results: dict[str, tuple] = {}
            ui: dict[str, dict] = {}
            for nid in order:
                record = self.prompt[nid]
                if self.cancel.is_set():
                    self.interrupted(nid, record["class_type"])
                hit = cache.get(signatures[nid])
                if hit is not None:
                    results[nid] = hit.outputs
                    if hit.ui is not None:
                        ui[nid] = hit.ui
                        self.send("executed", {"node": nid, "display_node": nid, "output": hit.ui,
                                               "prompt_id": self.prompt_id})
                    self.executed.append(nid)
                    continue
                self.send("executing", {"node": nid, "display_node": nid, "prompt_id": self.prompt_id})
                out = self.run_node(nid, record, results)
                results[nid] = out.outputs
                cache[signatures[nid]] = _Cached(out.outputs, out.ui)
                self.executed.append(nid)
                if out.ui is not None:
                    ui[nid] = out.ui
                    self.send("executed", {"node": nid, "display_node": nid, "output": out.ui,
                                           "prompt_id": self.prompt_id})
            self.send("execution_success", {"prompt_id": self.prompt_id, "timestamp": _now()})
            return ui
        finally:
            keep = set(signatures.values())  # the latest prompt's outputs only, as ComfyUI's default cache
            for key in [k for k in cache if k not in keep]:
                del cache[key]
            self.send("executing", {"node": None, "prompt_id": self.prompt_id})

    def order(self, outputs: list[str]) -> list[str]:
        """Every node the outputs need, each after its inputs (depth first, in input order, as ComfyUI)."""
        done, order = set(), []
        for root in outputs:
            work = [(root, False)]
            while work:
                nid, expanded = work.pop()
                if nid in done:
                    continue
                if expanded:
                    done.add(nid)
                    order.append(nid)
                    continue
                work.append((nid, True))
                for src in reversed(self.links(nid)):
                    if src not in done:
                        work.append((src, False))
        return order

    def links(self, nid: str) -> list[str]:
        definition = NODES[self.prompt[nid]["class_type"]]
        inputs = self.prompt[nid]["inputs"]
        return [inputs[k][0] for k in definition.inputs if isinstance(inputs.get(k), list)]

    def signatures(self, order: list[str]) -> dict[str, str]:
        sig: dict[str, str] = {}
        for nid in order:
            record = self.prompt[nid]
            definition = NODES[record["class_type"]]
            parts = [record["class_type"]]
            widgets = {}
            for name in definition.inputs:
                if name not in record["inputs"]:
                    continue
                value = record["inputs"][name]
                if isinstance(value, list):
                    parts.append(f"{name}<-{sig[value[0]]}:{value[1]}")
                else:
                    widgets[name] = value
                    parts.append(f"{name}={_json_key(value)}")
            if not definition.deterministic:
                parts.append(f"run {next(_UNIQUE)}")
            elif definition.fingerprint is not None:
                parts.append(f"fingerprint={self.fingerprint(nid, definition, widgets)}")
            sig[nid] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return sig

    def fingerprint(self, nid: str, definition: NodeDef, widgets: dict) -> str:
        try:
            value = definition.fingerprint(self.node_ctx(nid), **widgets)
        except Exception as exc:  # the node runs and reports the problem itself
            log.debug("fingerprint of node %s failed: %s", nid, exc)
            return f"failed {next(_UNIQUE)}"
        if isinstance(value, float) and math.isnan(value):  # ComfyUI's IS_CHANGED: NaN means always changed
            return f"nan {next(_UNIQUE)}"
        return _json_key(value)

    def node_ctx(self, nid: str) -> ExecutionContext:
        return replace(self.ctx, node_id=nid, progress=Progress(self.progress, nid))

    def progress(self, node: str, value: int, total: int, preview) -> None:
        self.send("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node})
        if preview is not None and self.ctx.preview:
            self.send("preview", {"image": preview, "node": node})
        if self.cancel.is_set():
            raise Cancelled(f"interrupted at step {value} of {total}")

    def run_node(self, nid: str, record: dict, results: dict) -> NodeOutput:
        class_type = record["class_type"]
        definition = NODES[class_type]
        kwargs = {}
        for name in definition.inputs:
            if name in record["inputs"]:
                value = record["inputs"][name]
                kwargs[name] = results[value[0]][value[1]] if isinstance(value, list) else value
        for name, kind in definition.hidden.items():
            kwargs[name] = {"PROMPT": self.prompt, "DYNPROMPT": self.prompt, "UNIQUE_ID": nid,
                            "EXTRA_PNGINFO": self.ctx.extra_pnginfo}.get(kind)
        try:
            out = definition.fn(self.node_ctx(nid), **kwargs)
            if self.cancel.is_set():
                raise Cancelled("interrupted")
            return self.check_output(nid, definition, out)
        except Cancelled:
            self.interrupted(nid, class_type)
        except Exception as exc:
            self.failed(nid, class_type, exc, kwargs)

    def check_output(self, nid: str, definition: NodeDef, out) -> NodeOutput:
        if out is None:
            out = NodeOutput((), None)
        elif not isinstance(out, NodeOutput):
            out = NodeOutput(tuple(out) if isinstance(out, (tuple, list)) else (out,), None)
        if len(out.outputs) != len(definition.outputs):
            raise RuntimeError(f"node {definition.class_type} returned {len(out.outputs)} outputs; it declares "
                               f"{len(definition.outputs)} ({', '.join(definition.outputs) or 'none'})")
        return NodeOutput(tuple(out.outputs), out.ui)

    def interrupted(self, nid: str, class_type: str):
        self.send("execution_interrupted", {"prompt_id": self.prompt_id, "node_id": nid, "node_type": class_type,
                                            "executed": list(self.executed), "timestamp": _now()})
        raise Cancelled(f"the prompt was interrupted at node {nid} ({class_type})")

    def failed(self, nid: str, class_type: str, exc: Exception, kwargs: dict):
        user_error = isinstance(exc, KinemaError)
        event = {
            "prompt_id": self.prompt_id, "node_id": nid, "node_type": class_type, "executed": list(self.executed),
            "exception_message": str(exc), "exception_type": _type_name(exc),
            "traceback": [] if user_error else traceback.format_tb(exc.__traceback__),
            "current_inputs": {k: [_format_value(v)] for k, v in kwargs.items()},
            "current_outputs": list(self.executed), "timestamp": _now(),
        }
        self.send("execution_error", event)
        message = str(exc) if user_error else f"{_type_name(exc)}: {exc}"
        raise WorkflowError(f"{class_type} (node {nid}): {message}", nid, class_type, event) from exc


def _copy(prompt):
    """The levels validation writes to (the prompt, each record, its inputs), copied; values are shared."""
    if not isinstance(prompt, dict):
        return prompt
    out = {}
    for nid, record in prompt.items():
        if isinstance(record, dict):
            record = dict(record)
            if isinstance(record.get("inputs"), dict):
                record["inputs"] = dict(record["inputs"])
        out[nid] = record
    return out


def _safe_info(definition: NodeDef, ctx) -> dict:
    try:
        return definition.object_info(ctx)
    except Exception as exc:  # a file list that cannot be read: the node is still listed, its combo empty
        log.warning("object_info of %s: %s", definition.class_type, exc)

        def guard(inp):
            if not callable(inp.options):
                return inp
            opts = inp.options

            def listed(c, opts=opts):
                try:
                    return opts(c)
                except Exception:
                    return []

            return replace(inp, options=listed)

        return replace(definition, required={k: guard(v) for k, v in definition.required.items()},
                       optional={k: guard(v) for k, v in definition.optional.items()}).object_info(ctx)
