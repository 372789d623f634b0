"""Key-mapping tables: how one checkpoint format names the weights of one model.

Each format is one `KeyMap`: an ordered list of (source pattern, canonical name)
rules. Canonical names are the names of Kinema's modules, which follow the
official Wan2.1 code, so official checkpoints map one to one. A canonical name
may end in `#i/n` when the source splits one weight in n parts along dim 0
(e.g. separate q/k/v projections for a fused qkv weight); the parts are joined
in order when the tensor is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kinema.errors import CheckpointError
from kinema.loading.files import TensorSource


@dataclass
class Plan:
    """Which source keys make each canonical tensor (several when parts are concatenated)."""

    sources: dict[str, list[str]] = field(default_factory=dict)

    def keys(self):
        return self.sources.keys()


@dataclass(frozen=True)
class KeyMap:
    name: str
    rules: tuple[tuple[str, str], ...]
    ignore: tuple[str, ...] = ()  # patterns of source keys that are deliberately not loaded
    strip_prefixes: tuple[str, ...] = ()  # wrappers some tools add, e.g. "model.diffusion_model."

    def _compiled(self):
        return [(re.compile(p), t) for p, t in self.rules], [re.compile(p) for p in self.ignore]

    def strip(self, key: str) -> str:
        for prefix in self.strip_prefixes:
            if key.startswith(prefix):
                return key[len(prefix):]
        return key

    def plan(self, source: TensorSource) -> Plan:
        rules, ignores = self._compiled()
        parts: dict[str, dict[int, str]] = {}
        counts: dict[str, int] = {}
        unknown = []
        for key in source.keys():
            bare = self.strip(key)
            if any(p.fullmatch(bare) for p in ignores):
                continue
            for pattern, template in rules:
                m = pattern.fullmatch(bare)
                if m:
                    target = m.expand(template)
                    index, total = 0, 1
                    if "#" in target:
                        target, spec = target.split("#")
                        index, total = (int(v) for v in spec.split("/"))
                    parts.setdefault(target, {})[index] = key
                    counts[target] = total
                    break
            else:
                unknown.append(key)
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise CheckpointError(
                f"{source.name}: unknown keys for the {self.name} format: {shown}{more}. "
                "The file is another model or a variant Kinema does not support; nothing was loaded."
            )
        plan = Plan()
        for target, found in parts.items():
            if sorted(found) != list(range(counts[target])):
                raise CheckpointError(
                    f"{source.name}: '{target}' is stored in {counts[target]} parts but only "
                    f"{len(found)} are present ({', '.join(found.values())}); the file is incomplete."
                )
            plan.sources[target] = [found[i] for i in range(counts[target])]
        return plan


def identity_map(name: str, ignore: tuple[str, ...] = (), strip_prefixes: tuple[str, ...] = ()) -> KeyMap:
    """The map for a format whose names already are the canonical ones."""
    return KeyMap(name, ((r"(.*)", r"\1"),), ignore, strip_prefixes)
