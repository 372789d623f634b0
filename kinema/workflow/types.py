"""Node definitions: typed inputs and outputs, and the `/object_info` record ComfyUI clients read.

A node is a plain function `fn(ctx, **inputs) -> tuple | NodeOutput` registered with `@node(...)`;
its inputs are declared with `Input` records, so validation, the UI-format conversion and
`/object_info` all read one description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# ComfyUI's primitive widget types; every other type name is a link-only type (MODEL, LATENT, ...).
PRIMITIVES = ("INT", "FLOAT", "STRING", "BOOLEAN")
COMBO = "COMBO"


@dataclass(frozen=True)
class Input:
    """One input. `type` is a type name ("INT", "MODEL", ...) or COMBO with `options` (a list, or a callable
    returning the list at validation time: model file names)."""

    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple | Callable[[Any], list] | None = None
    tooltip: str | None = None
    multiline: bool = False
    force_input: bool = False  # a widget type that only takes a link
    control_after_generate: bool = False  # seeds: the UI format stores one more widget value after this one
    upload: str | None = None  # "image" / "video": the frontend shows an upload button
    extra: dict = field(default_factory=dict)  # more keys for /object_info's options dict

    @property
    def is_widget(self) -> bool:
        return (self.type in PRIMITIVES or self.type == COMBO) and not self.force_input

    def choices(self, ctx=None) -> list:
        opts = self.options
        return list(opts(ctx) if callable(opts) else opts or ())

    def info(self, ctx=None) -> list:
        """[type or choice list, {options}] as /object_info gives it."""
        opts: dict[str, Any] = {}
        for key in ("default", "min", "max", "step", "tooltip"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.multiline:
            opts["multiline"] = True
        if self.force_input:
            opts["forceInput"] = True
        if self.control_after_generate:
            opts["control_after_generate"] = True
        if self.upload:
            opts[f"{self.upload}_upload"] = True
        opts.update(self.extra)
        head = self.choices(ctx) if self.type == COMBO else self.type
        return [head, opts] if opts else [head]


@dataclass(frozen=True)
class NodeOutput:
    """What a node returns when it has UI output too (saved files: {"images": [...]} / {"gifs": [...]})."""

    outputs: tuple = ()
    ui: dict | None = None


@dataclass(frozen=True)
class NodeDef:
    class_type: str
    fn: Callable[..., Any]
    required: dict[str, Input]
    optional: dict[str, Input] = field(default_factory=dict)
    hidden: dict[str, str] = field(default_factory=dict)  # e.g. {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    category: str = "kinema"
    display_name: str | None = None
    description: str = ""
    module: str = "nodes"  # /object_info's python_module: "nodes", "custom_nodes.ComfyUI-WanVideoWrapper", ...
    deterministic: bool = True  # False: never served from the cache (a file loaded from disk may change: see fingerprint)
    fingerprint: Callable[..., Any] | None = None  # ComfyUI's IS_CHANGED: a value that changes when the output would

    @property
    def inputs(self) -> dict[str, Input]:
        return {**self.required, **self.optional}

    def object_info(self, ctx=None) -> dict:
        order = {"required": list(self.required)}
        if self.optional:
            order["optional"] = list(self.optional)
        info = {
            "input": {"required": {k: v.info(ctx) for k, v in self.required.items()}},
            "input_order": order,
            "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs),
            "output_name": list(self.output_names or self.outputs),
            "name": self.class_type,
            "display_name": self.display_name or self.class_type,
            "description": self.description,
            "python_module": self.module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if self.optional:
            info["input"]["optional"] = {k: v.info(ctx) for k, v in self.optional.items()}
        if self.hidden:
            info["input"]["hidden"] = dict(self.hidden)
        return info


NODES: dict[str, NodeDef] = {}


def node(class_type: str, *, required: dict[str, Input], optional: dict[str, Input] | None = None,
         outputs: tuple[str, ...] = (), output_names: tuple[str, ...] | None = None, output_node: bool = False,
         category: str = "kinema", display_name: str | None = None, description: str = "", module: str = "nodes",
         hidden: dict[str, str] | None = None, deterministic: bool = True, fingerprint=None):
    """Register `fn(ctx, **inputs)` as the node `class_type`."""

    def register(fn):
        if class_type in NODES:
            raise ValueError(f"node {class_type} registered twice")
        NODES[class_type] = NodeDef(class_type, fn, dict(required), dict(optional or {}), dict(hidden or {}),
                                    tuple(outputs), output_names and tuple(output_names), output_node, category,
                                    display_name, description or (fn.__doc__ or "").strip(), module, deterministic,
                                    fingerprint)
        return fn

    return register


# Shorthands for declaring inputs.
def INT(default=0, min=-(2**63), max=2**63 - 1, step=1, **kw) -> Input:
    return Input("INT", default, min, max, step, **kw)


def FLOAT(default=0.0, min=-1e9, max=1e9, step=0.01, **kw) -> Input:
    return Input("FLOAT", default, min, max, step, **kw)


def STRING(default="", multiline=False, **kw) -> Input:
    return Input("STRING", default, multiline=multiline, **kw)


def BOOLEAN(default=False, **kw) -> Input:
    return Input("BOOLEAN", default, **kw)


def CHOICE(options, default=None, **kw) -> Input:
    if default is None and not callable(options) and options:
        default = options[0]
    return Input(COMBO, default, options=options if callable(options) else tuple(options), **kw)


def LINK(type_name: str, **kw) -> Input:
    return Input(type_name, **kw)
