"""An API-format prompt checked as ComfyUI's validate_prompt does, from its output nodes back.

Errors come in ComfyUI's shapes ({"type", "message", "details", "extra_info"}, node_errors keyed by node
id with the outputs they block), so its clients show them unchanged. Widget values are coerced in place
(INT from "5" or 5.0, FLOAT from 5) as ComfyUI does; the executor runs the coerced prompt. Nothing a
client sends makes this raise anything but PromptError: the graph is walked without recursion and every
value shown back is shortened.
"""

from __future__ import annotations

import math
import reprlib
import traceback

from kinema.errors import KinemaError
from kinema.workflow.types import COMBO, NODES, PRIMITIVES

MAX_NODES = 2000
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 3, 200, 200, 10, 10


class PromptError(KinemaError):
    """A prompt ComfyUI would refuse: `error` and `node_errors` in its shapes (a 400 from POST /prompt)."""

    def __init__(self, error: dict, node_errors: dict | None = None):
        self.error = error
        self.node_errors = node_errors or {}
        super().__init__(format_errors(error, self.node_errors))


class Outputs(list):
    """The output node ids that validated; `node_errors` holds the outputs that did not (ComfyUI runs the
    good ones and reports the rest)."""

    node_errors: dict = {}


def error(type_: str, message: str, details: str = "", extra_info: dict | None = None) -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}}


def show(value):
    """A value as it may go back to a client: JSON-safe scalars as they are, the rest shortened."""
    if value is None or isinstance(value, (bool, int)) and abs(value) < 2**63:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= 1000:
        return value
    try:
        return _repr.repr(value)
    except Exception:  # a pathological __repr__
        return f"<{type(value).__name__}>"


def format_errors(err: dict, node_errors: dict) -> str:
    """The errors as ComfyUI prints them: the prompt's, then each failing node's."""
    lines = [err.get("message", "")]
    if err.get("details") and not node_errors:
        lines[0] += f": {err['details']}"
    for nid, entry in node_errors.items():
        lines.append(f"  {entry.get('class_type')} (node {nid}):")
        for e in entry.get("errors", []):
            lines.append(f"    - {e['message']}: {e['details']}" if e.get("details") else f"    - {e['message']}")
    return "\n".join(lines)


def validate_prompt(prompt, ctx=None) -> Outputs:
    """The output node ids to run (an `Outputs` list), or PromptError."""
    import kinema.workflow.nodes  # noqa: F401  (registers every node)

    try:
        return _validate(prompt, ctx)
    except PromptError:
        raise
    except Exception as exc:  # a case this code does not foresee is still a refusal, not a crash
        raise PromptError(error("exception_during_validation", "Exception when validating prompt", show(str(exc)),
                                {"exception_type": type(exc).__name__,
                                 "traceback": traceback.format_tb(exc.__traceback__)})) from exc


def _validate(prompt, ctx) -> Outputs:
    if not isinstance(prompt, dict):
        raise PromptError(error("invalid_prompt", "Invalid prompt", f"a prompt is an object of nodes by id, got "
                                f"{type(prompt).__name__}", {}))
    if len(prompt) > MAX_NODES:
        raise PromptError(error("invalid_prompt", "Invalid prompt", f"the prompt has {len(prompt)} nodes; at most "
                                f"{MAX_NODES} are accepted", {}))
    outputs = []
    for nid, record in prompt.items():
        if not isinstance(nid, str):
            raise PromptError(error("invalid_prompt", "Invalid prompt", f"node ids are strings, got {show(nid)}", {}))
        if not isinstance(record, dict):
            raise PromptError(error("invalid_prompt", "Invalid prompt", f"Node ID '#{nid}': a node is an object with "
                                    f"class_type and inputs, got {type(record).__name__}", {}))
        title = record.get("_meta", {}).get("title") if isinstance(record.get("_meta"), dict) else None
        title = title if isinstance(title, str) else None
        class_type = record.get("class_type")
        if class_type is None:
            raise PromptError(error("missing_node_type", f"Node '{title or f'ID #{nid}'}' has no class_type. The "
                                    "workflow may be corrupted or a custom node is missing.", f"Node ID '#{nid}'",
                                    {"node_id": nid, "class_type": None, "node_title": title}))
        if not isinstance(class_type, str):
            raise PromptError(error("invalid_prompt", "Invalid prompt", f"Node ID '#{nid}': class_type must be a "
                                    f"string, got {show(class_type)}", {}))
        if not isinstance(record.setdefault("inputs", {}), dict):
            raise PromptError(error("invalid_prompt", "Invalid prompt", f"Node ID '#{nid}': inputs must be an "
                                    f"object, got {type(record['inputs']).__name__}", {}))
        definition = NODES.get(class_type)
        if definition is None:
            raise PromptError(error("missing_node_type", f"Node '{title or class_type}' not found. The custom node "
                                    "may not be installed.", f"Node ID '#{nid}'",
                                    {"node_id": nid, "class_type": show(class_type), "node_title": title or class_type}))
        if definition.output_node:
            outputs.append(nid)
    if not outputs:
        raise PromptError(error("prompt_no_outputs", "Prompt has no outputs", "", {}))

    # Each node's own errors and its upstream links, for every node the outputs need (no recursion).
    local: dict[str, list] = {}
    upstream: dict[str, list[str]] = {}
    todo = list(outputs)
    while todo:
        nid = todo.pop()
        if nid in local:
            continue
        local[nid], upstream[nid] = _check_node(prompt, nid, ctx)
        todo.extend(u for u in upstream[nid] if u not in local)

    cyclic = _cycles(upstream)
    for nid in cyclic:
        local[nid].append(error("dependency_cycle", "Dependency cycle detected",
                                f"node {nid} depends on itself through its inputs", {"node_id": nid}))
    valid = _propagate(local, upstream, cyclic)

    good, node_errors, failed = Outputs(), {}, []
    for o in outputs:
        if valid[o]:
            good.append(o)
            continue
        failed.append(o)
        for nid in _reachable(o, upstream):
            if local[nid]:
                entry = node_errors.setdefault(nid, {"errors": local[nid], "dependent_outputs": [],
                                                     "class_type": prompt[nid]["class_type"]})
                entry["dependent_outputs"].append(o)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for o in failed for e in local[o])
        raise PromptError(error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, {}),
                          node_errors)
    good.node_errors = node_errors
    return good


def _check_node(prompt: dict, nid: str, ctx) -> tuple[list, list[str]]:
    record = prompt[nid]
    definition = NODES[record["class_type"]]
    inputs = record["inputs"]
    errors, links = [], []
    for name, inp in definition.inputs.items():
        required = name in definition.required
        if name not in inputs:
            if required:
                errors.append(error("required_input_missing", "Required input is missing", name, {"input_name": name}))
            continue
        try:
            info = inp.info(ctx)
        except Exception as exc:  # a file-list callable failing (an unreadable models folder)
            errors.append(error("exception_during_validation", "Exception when validating node",
                                show(f"{name}: {exc}"), {"input_name": name, "exception_type": type(exc).__name__}))
            continue
        value = inputs[name]
        if isinstance(value, list):
            link_error = _check_link(prompt, name, inp, value, info)
            if link_error:
                errors.append(link_error)
            else:
                inputs[name] = [str(value[0]), value[1]]
                links.append(str(value[0]))
            continue
        if isinstance(value, dict) and "__value__" in value:  # a list-valued widget, wrapped by the frontend
            value = inputs[name] = value["__value__"]
        if not inp.is_widget and inp.type not in PRIMITIVES and inp.type != "*":
            errors.append(error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                f"{name}: {inp.type} comes from a link, got the value {show(value)!r}",
                                {"input_name": name, "input_config": info, "received_value": show(value)}))
            continue
        value_error = _check_value(inputs, name, inp, value, info, ctx)
        if value_error:
            errors.append(value_error)
    return errors, links


def _check_link(prompt, name, inp, value, info) -> dict | None:
    def bad(why):
        return error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                     f"{name}: {why}", {"input_name": name, "input_config": info, "received_value": show(value)})

    if len(value) != 2:
        return bad(f"got a list of {len(value)} items")
    src, slot = value
    if isinstance(src, bool) or not isinstance(src, (str, int)):
        return bad(f"the node id must be a string, got {show(src)!r}")
    if isinstance(slot, bool) or not isinstance(slot, int):
        return bad(f"the slot must be a whole number, got {show(slot)!r}")
    src = str(src)
    if src not in prompt:
        return bad(f"node '{show(src)}' is not in the prompt")
    outputs = NODES[prompt[src]["class_type"]].outputs
    if not 0 <= slot < len(outputs):
        return bad(f"node {src} ({prompt[src]['class_type']}) has {len(outputs)} outputs; slot {slot} does not exist")
    received = outputs[slot]
    expected = inp.type
    if not _types_match(received, expected):
        return error("return_type_mismatch", "Return type mismatch between linked nodes",
                     f"{name}, received_type({received}) mismatch input_type({expected})",
                     {"input_name": name, "input_config": info, "received_type": received, "linked_node": [src, slot]})
    return None


def _types_match(received: str, expected: str) -> bool:
    if received == expected or "*" in (received, expected):
        return True
    if expected == COMBO:
        return received in (COMBO, "STRING")
    return bool(set(received.split(",")) & set(expected.split(",")))


def _check_value(inputs, name, inp, value, info, ctx) -> dict | None:
    typ = inp.type
    try:
        value = _coerce(typ, value)
    except Exception as exc:
        return error("invalid_input_type", f"Failed to convert an input value to a {typ} value",
                     f"{name}, {show(value)}, {show(str(exc))}",
                     {"input_name": name, "input_config": info, "received_value": show(value),
                      "exception_message": show(str(exc))})
    inputs[name] = value
    if typ in ("INT", "FLOAT"):
        if inp.min is not None and value < inp.min:
            return error("value_smaller_than_min", f"Value {show(value)} smaller than min of {inp.min}", name,
                         {"input_name": name, "input_config": info, "received_value": show(value)})
        if inp.max is not None and value > inp.max:
            return error("value_bigger_than_max", f"Value {show(value)} bigger than max of {inp.max}", name,
                         {"input_name": name, "input_config": info, "received_value": show(value)})
    if typ == COMBO:
        options = info[0]
        if value not in options:
            long = len(options) > 20
            listing = f"(list of length {len(options)})" if long else str(options)
            return error("value_not_in_list", "Value not in list", f"{name}: '{show(value)}' not in {listing}",
                         {"input_name": name, "input_config": None if long else info, "received_value": show(value)})
    return None


def _coerce(typ: str, value):
    if typ == "INT":
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        return int(value)
    if typ == "FLOAT":
        value = float(value)
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if typ == "STRING":
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected text, got {type(value).__name__}")
        return str(value)
    if typ == "BOOLEAN":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected true or false, got {type(value).__name__}")
        return bool(value)
    if typ == COMBO and isinstance(value, (dict, list)):
        raise ValueError(f"expected one of the choices, got {type(value).__name__}")
    return value


def _cycles(upstream: dict[str, list[str]]) -> list[str]:
    """Nodes on a dependency cycle (iterative Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in upstream:
        if root in index:
            continue
        work = [(root, iter(upstream.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in upstream:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(upstream.get(w, ()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1 or v in upstream.get(v, ()):
                        out.extend(sorted(component))
    return out


def _propagate(local, upstream, cyclic) -> dict[str, bool]:
    """A node is valid when it and everything upstream has no error (cycles are already errors)."""
    valid: dict[str, bool] = {n: False for n in cyclic}
    for root in upstream:
        if root in valid:
            continue
        work = [root]
        while work:
            v = work[-1]
            if v in valid:
                work.pop()
                continue
            pending = [u for u in upstream[v] if u not in valid]
            if pending:
                work.extend(pending)
                continue
            work.pop()
            valid[v] = not local[v] and all(valid[u] for u in upstream[v])
    return valid


def _reachable(start: str, upstream) -> list[str]:
    seen, order, todo = set(), [], [start]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        order.append(v)
        todo.extend(upstream.get(v, ()))
    return order
