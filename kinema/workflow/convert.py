"""ComfyUI's UI (graph) format -> its API format, as the frontend's graphToPrompt does it.

The UI format stores each node's widget values as a list in the order of the node definition's widget
inputs (with one extra value after a seed: the "control after generate" mode, and one after an upload
combo: the upload button), and its links as [id, from_node, from_slot, to_node, to_slot, type].
Frontend-only nodes (Reroute, PrimitiveNode, Note, kijai's SetNode / GetNode) vanish: links are followed
through them and primitive values pushed into their targets. Muted nodes (mode 2) are dropped; a
bypassed node (mode 4) hands each consumer its first input of the consumer's type.
"""

from __future__ import annotations

import math

from kinema.errors import KinemaError
from kinema.workflow.types import NODES

MUTED, BYPASSED = 2, 4
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")
REROUTES = {"Reroute", "Reroute (rgthree)"}
NOTES = {"Note", "MarkdownNote", "Note Plus (mtb)", "Label (rgthree)", "Bookmark (rgthree)",
         "Fast Groups Bypasser (rgthree)", "Fast Groups Muter (rgthree)", "Fast Bypasser (rgthree)",
         "Fast Muter (rgthree)"}
VIRTUAL = REROUTES | NOTES | {"PrimitiveNode", "SetNode", "GetNode"}
UI_ONLY_WIDGETS = {"videopreview", "preview"}  # VHS's preview widget, serialised with the others


def is_ui_format(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)


def to_api(workflow: dict) -> dict:
    """A UI-format workflow as an API-format prompt ({id: {class_type, inputs, _meta}}); anything else is
    returned unchanged (validation judges it)."""
    if not is_ui_format(workflow):
        return workflow
    import kinema.workflow.nodes  # noqa: F401  (widgets map onto the registered node definitions)

    try:
        return _Graph(workflow).prompt()
    except KinemaError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:
        raise KinemaError(f"the workflow is not a valid ComfyUI UI-format graph ({type(exc).__name__}: {exc}); "
                          "export it again from ComfyUI (Save, or Export (API)).") from None


def _link_record(link) -> tuple | None:
    """(id, from_node, from_slot, to_node, to_slot, type) from the list or the object form."""
    if isinstance(link, (list, tuple)) and len(link) >= 5:
        return (link[0], str(link[1]), int(link[2]), str(link[3]), int(link[4]), link[5] if len(link) > 5 else None)
    if isinstance(link, dict) and "id" in link:
        return (link["id"], str(link["origin_id"]), int(link["origin_slot"]), str(link["target_id"]),
                int(link["target_slot"]), link.get("type"))
    return None


class _Graph:
    def __init__(self, workflow: dict):
        self.nodes: dict[str, dict] = {}
        for n in workflow["nodes"]:
            if not isinstance(n, dict) or "id" not in n or "type" not in n:
                raise KinemaError(f"the workflow has a node record without an id and a type: {str(n)[:120]}")
            self.nodes[str(n["id"])] = n
        self.links: dict = {}
        for link in workflow.get("links") or ():
            rec = _link_record(link)
            if rec is not None:
                self.links[rec[0]] = rec
        subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or ()
        self.subgraph_ids = {str(s.get("id")) for s in subgraphs if isinstance(s, dict)}
        # kijai's SetNode: its widget names a constant that GetNodes read.
        self.setters: dict = {}
        for nid, n in self.nodes.items():
            if n["type"] == "SetNode" and n.get("widgets_values"):
                self.setters.setdefault(n["widgets_values"][0], nid)

    # -- following links -----------------------------------------------------------------------------------
    def _input_link(self, node: dict, slot: int):
        inputs = node.get("inputs") or []
        return inputs[slot].get("link") if 0 <= slot < len(inputs) else None

    def source(self, link_id, want_type):
        """Where a link's value really comes from: ("link", node_id, slot), ("value", v) or None (nothing: a
        muted node, a dangling reroute)."""
        seen = set()
        while link_id is not None and link_id not in seen:
            seen.add(link_id)
            rec = self.links.get(link_id)
            if rec is None:
                return None
            _, src_id, src_slot, _, _, link_type = rec
            src = self.nodes.get(src_id)
            if src is None:
                return None
            kind, mode = src["type"], src.get("mode", 0)
            if kind in REROUTES or kind == "SetNode":
                link_id = self._input_link(src, 0)
            elif kind == "GetNode":
                name = (src.get("widgets_values") or [None])[0]
                setter = self.nodes.get(self.setters.get(name, ""))
                if setter is None:
                    raise KinemaError(f"GetNode #{src_id} reads the constant {name!r}, but no SetNode sets it; "
                                      "add a SetNode with that name or reconnect the input.")
                link_id = self._input_link(setter, 0)
            elif kind == "PrimitiveNode":
                values = src.get("widgets_values") or []
                return ("value", values[0]) if values else None
            elif mode == MUTED:
                return None
            elif mode == BYPASSED:
                inputs = src.get("inputs") or []
                order = [src_slot, *range(len(inputs))]
                typ = want_type if want_type is not None else link_type
                match = [i for i in order if 0 <= i < len(inputs) and inputs[i].get("type") == typ]
                if not match:
                    return None
                link_id = inputs[match[0]].get("link")
            else:
                return ("link", src_id, src_slot)
        return None

    # -- one node ------------------------------------------------------------------------------------------
    def widget_inputs(self, node: dict) -> dict:
        values = node.get("widgets_values")
        definition = NODES.get(node["type"])
        if isinstance(values, dict):  # VHS: keyed by input name
            return {k: v for k, v in values.items()
                    if k not in UI_ONLY_WIDGETS and not isinstance(v, (dict, list))}
        if not isinstance(values, list):
            return {}
        if definition is None:
            named = node.get("widgets_values_named")
            if isinstance(named, dict):
                return {k: v for k, v in named.items() if k != "control_after_generate"
                        and not isinstance(v, (dict, list))}
            return {}
        widgets = [(name, inp) for name, inp in definition.inputs.items() if inp.is_widget]
        out, i = {}, 0
        for name, inp in widgets:
            if i >= len(values):
                break
            out[name] = values[i]
            i += 1
            nxt = values[i] if i < len(values) else None
            seed_like = inp.control_after_generate or (inp.type == "INT" and name in SEED_NAMES)
            if isinstance(nxt, str) and nxt in CONTROL_VALUES and (seed_like or len(values) > len(widgets)):
                i += 1  # the frontend's "control after generate" widget
            elif inp.upload and nxt == inp.upload:
                i += 1  # the upload button
        for name, inp in widgets:  # a workflow saved before a widget existed: the frontend gives it its default
            if name not in out and inp.default is not None:
                out[name] = inp.default
        return out

    def api_node(self, nid: str, node: dict) -> dict:
        if node["type"] in self.subgraph_ids:
            raise KinemaError(f"node #{nid} ({node.get('title') or 'a subgraph'}) is a subgraph; Kinema does not "
                              "expand subgraphs yet: in ComfyUI, select it and choose 'Unpack Subgraph', then save.")
        inputs = self.widget_inputs(node)
        for inp in node.get("inputs") or []:
            link = inp.get("link")
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if link is None or name is None:
                continue
            src = self.source(link, inp.get("type"))
            if src is None:
                inputs.pop(name, None)
            elif src[0] == "value":
                inputs[name] = src[1]
            else:
                inputs[name] = [src[1], src[2]]
        definition = NODES.get(node["type"])
        title = node.get("title") or (definition and definition.display_name) or node["type"]
        return {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}

    def prompt(self) -> dict:
        out = {}
        for nid, node in self.nodes.items():
            if node["type"] in VIRTUAL or node.get("mode", 0) in (MUTED, BYPASSED):
                continue
            out[nid] = self.api_node(nid, node)
        for record in out.values():  # inputs from removed nodes go, as the frontend does
            for name, value in list(record["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in out:
                    del record["inputs"][name]
        return dict(sorted(out.items(), key=lambda kv: _id_key(kv[0])))


def _id_key(nid: str):
    try:
        return (0, float(nid), nid) if math.isfinite(float(nid)) else (1, 0.0, nid)
    except ValueError:
        return (1, 0.0, nid)
