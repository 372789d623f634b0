"""`kinema run WORKFLOW.json`: a ComfyUI workflow (UI or API format) run without a server.

`--set NODE.INPUT=VALUE` changes an input first (NODE: a node id, a class type used once, or a node
title). The prompt is validated as the server would (errors listed, exit code 1), then run with a
progress bar per node; each file written is printed. Ctrl-C stops at the next step and writes nothing
half-done (the media writers publish a file only once it is complete).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from kinema.errors import Cancelled, KinemaError

log = logging.getLogger("kinema")


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="run a ComfyUI workflow file (UI or API format) without a server",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    r.add_argument("workflow", help="the workflow JSON: ComfyUI's Save (UI format) or Export (API)")
    r.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", dest="overrides",
                   help="change an input before running; NODE is a node id, a class type used once or a node title; "
                        "VALUE is read as JSON when it parses (5, 2.5, true, \"text\"), else as text; repeatable")
    r.add_argument("--models", default=None, metavar="DIR", help="a ComfyUI-style models folder (diffusion_models/, "
                   "text_encoders/, vae/, clip_vision/, loras/); the built-in model is always listed too")
    r.add_argument("--extra_model_paths", default=None, metavar="YAML", help="more model folders, in ComfyUI's "
                   "extra_model_paths.yaml format")
    r.add_argument("--output", default="output", metavar="DIR", help="where output nodes write their files")
    r.add_argument("--input", default="input", metavar="DIR", help="where LoadImage and video loaders read files")
    r.set_defaults(run=cmd_run)


def cmd_run(args) -> int:
    from kinema.workflow.validate import PromptError

    try:
        prompt = load_workflow(args.workflow)
        apply_overrides(prompt, args.overrides)
        executor = make_executor(args)
        ui = run_interruptible(executor, prompt)
    except PromptError as exc:
        if args.debug:
            raise
        print(f"kinema: the workflow failed validation: {exc}", file=sys.stderr)
        return 1
    except Cancelled:
        print("kinema: interrupted; nothing was written for the unfinished node.", file=sys.stderr)
        return 130
    except KinemaError as exc:
        if args.debug:
            raise
        print(f"kinema: error: {exc}", file=sys.stderr)
        return 1
    for path in output_files(ui, executor):
        print(path)
    return 0


def load_workflow(path) -> dict:
    from kinema.workflow.convert import is_ui_format, to_api

    p = Path(path)
    if not p.is_file():
        raise KinemaError(f"workflow {path} does not exist" + (" (it is a folder)" if p.is_dir() else "") +
                          "; pass a ComfyUI workflow .json file.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise KinemaError(f"workflow {path} is not a text file; pass a ComfyUI workflow .json file.") from None
    except json.JSONDecodeError as exc:
        raise KinemaError(f"workflow {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
                          ) from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]  # a POST /prompt body or a history entry
    if is_ui_format(data):
        return to_api(data)
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) and "class_type" in v
                                                         for v in data.values()):
        raise KinemaError(f"workflow {path} is neither ComfyUI's UI format (nodes and links) nor its API format "
                          "({id: {class_type, inputs}}); export it from ComfyUI with Save or Export (API).")
    return data


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def find_node(prompt: dict, name: str) -> str:
    """A node id from an id, a class type used once, or a title."""
    if name in prompt:
        return name
    by_type = [nid for nid, r in prompt.items() if r.get("class_type") == name]
    if len(by_type) == 1:
        return by_type[0]
    by_title = [nid for nid, r in prompt.items() if (r.get("_meta") or {}).get("title") == name]
    if len(by_title) == 1:
        return by_title[0]
    if len(by_type) > 1 or len(by_title) > 1:
        ids = by_type if len(by_type) > 1 else by_title
        raise KinemaError(f"--set: {name!r} names {len(ids)} nodes ({', '.join(ids)}); use the node id instead.")
    listing = ", ".join(f"{nid} ({r.get('class_type')})" for nid, r in prompt.items())
    raise KinemaError(f"--set: no node {name!r} in the workflow; use a node id, class type or title: {listing}.")


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    from kinema.workflow.types import NODES

    for item in overrides:
        key, eq, text = item.partition("=")
        node_name, dot, input_name = key.rpartition(".")
        if not eq or not dot or not node_name or not input_name:
            raise KinemaError(f"--set {item!r}: write NODE.INPUT=VALUE, e.g. --set KSampler.seed=42.")
        nid = find_node(prompt, node_name)
        record = prompt[nid]
        definition = NODES.get(record.get("class_type"))
        known = list(definition.inputs) if definition else list(record.get("inputs", {}))
        if input_name not in known:
            raise KinemaError(f"--set {item!r}: node {nid} ({record.get('class_type')}) has no input {input_name!r}; "
                              f"its inputs are {', '.join(known) or 'none'}.")
        record.setdefault("inputs", {})[input_name] = _parse_value(text)


def make_executor(args):
    from kinema.workflow.executor import Executor
    from kinema.workflow.folders import ModelFolders  # imported here: the CLI loads without the workflow stack

    folders = ModelFolders(args.models, args.extra_model_paths)
    return Executor(folders, Path(args.output), input_dir=Path(args.input), temp_dir=Path(args.output) / "temp")


class _Bars:
    """One tqdm bar per node that reports progress."""

    def __init__(self, prompt: dict):
        self.prompt = prompt
        self.bar = None
        self.node = None

    def __call__(self, event: str, data: dict) -> None:
        from tqdm import tqdm

        if event == "executing":
            self.close()
            if data.get("node") is not None:
                log.info("running node %s (%s)", data["node"], self.prompt.get(data["node"], {}).get("class_type"))
        elif event == "execution_cached" and data.get("nodes"):
            log.info("cached: %s", ", ".join(data["nodes"]))
        elif event == "progress":
            if self.node != data["node"] or self.bar is None:
                self.close()
                kind = self.prompt.get(data["node"], {}).get("class_type", "")
                self.bar = tqdm(total=data["max"], desc=f"{kind} #{data['node']}", file=sys.stderr, leave=True)
                self.node = data["node"]
            self.bar.total = data["max"]
            self.bar.update(data["value"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.node = None, None


def run_interruptible(executor, prompt: dict) -> dict:
    """Run in a worker thread so Ctrl-C (delivered to the main thread) sets the cancel event and the run stops
    cleanly at its next step."""
    cancel = threading.Event()
    bars = _Bars(prompt)
    box: dict = {}

    def work():
        try:
            box["ui"] = executor.execute(prompt, "cli", listener=bars, cancel=cancel)
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    worker = threading.Thread(target=work, name="kinema-run", daemon=True)
    main_thread = threading.current_thread() is threading.main_thread()
    # Ctrl-C raises KeyboardInterrupt here whatever handler a library (or an embedding program) left behind
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        cancel.set()
        print("\nkinema: stopping at the next step (Ctrl-C again to quit at once) ...", file=sys.stderr)
        worker.join()
    finally:
        bars.close()
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if "error" in box:
        raise box["error"]
    if cancel.is_set():
        raise Cancelled("interrupted")
    return box["ui"]


def output_files(ui: dict, executor) -> list[Path]:
    """The files output nodes report ({"images" | "gifs" | "videos" | ...: [{filename, subfolder, type}]})."""
    roots = {"output": executor.output_dir, "temp": executor.temp_dir, "input": executor.input_dir}
    files = []
    for node_ui in ui.values():
        for items in node_ui.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    root = roots.get(item.get("type", "output"), executor.output_dir)
                    files.append(root / (item.get("subfolder") or "") / item["filename"])
    return files
