"""Module attributes a forward assigns: found after tracing, put back, and named.

[Note: attributes assigned in forward]
``self.count += 1`` on a buffer, or ``self.last = x.detach()``, is a side effect on the module
object, not a value the forward returns. Tracing runs forward on stand-ins (fx proxies, export's
fake tensors), so the assignment leaves a stand-in on the user's model and is not in the graph:
the split model would compute the outputs but never update the attribute, and a later forward
(or costing, which reads the buffers) finds a proxy where a tensor was.

So both routes snapshot every module's attributes, parameters and buffers before tracing, and
afterwards put back every one a stand-in replaced. The fx route then refuses the model, naming
each attribute and its module and the ways out (an in-place update, ``self.count.add_(1)``,
which a graph keeps; the assignment out of forward; the module kept whole). torch.export records
an assignment to a registered buffer as an in-place copy, which the split model runs; a plain
attribute it drops, so that route warns, naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from partition.errors import TraceError
from partition.trace.traced import route_error

__all__ = ["Assigned", "AttributeWatch", "assigns_error", "is_proxy"]


@dataclass(frozen=True)
class Assigned:
    """One attribute a forward assigned: the module's path, class, the name and what it is."""

    path: str
    module_class: str
    name: str
    kind: str
    """``"buffer"``, ``"parameter"`` or ``"attribute"``."""

    def __str__(self) -> str:
        where = f"module {self.path!r}" if self.path else "the model"
        return f"the {self.kind} {self.name!r} of {where} ({self.module_class})"


class AttributeWatch:
    """Every module's attributes, parameters and buffers as they were before tracing."""

    def __init__(self, model: nn.Module) -> None:
        self._saved = [
            (path, module, dict(vars(module)), dict(module._parameters), dict(module._buffers))
            for path, module in model.named_modules(remove_duplicate=False)
        ]

    def restore(self, stand_in: Callable[[Any], bool]) -> list[Assigned]:
        """Put back each attribute now holding a value for which ``stand_in`` is true (on any
        leaf of it); returns them, each once."""
        found: dict[tuple[int, str], Assigned] = {}
        for path, module, attrs, params, buffers in self._saved:
            cls = type(module).__name__
            for kind, before, now in (
                ("parameter", params, module._parameters),
                ("buffer", buffers, module._buffers),
                ("attribute", attrs, vars(module)),
            ):
                for name, value in list(now.items()):
                    if name in before and before[name] is value:
                        continue
                    if not any(stand_in(leaf) for leaf in tree_leaves(value)):
                        continue
                    if name in before:
                        now[name] = before[name]
                    else:
                        del now[name]
                    found.setdefault((id(module), name), Assigned(path, cls, name, kind))
        return list(found.values())


def is_proxy(value: Any) -> bool:
    return isinstance(value, fx.Proxy)


def assigns_error(name: str, assigned: list[Assigned]) -> TraceError:
    """The fx route's refusal of a forward that assigns attributes; see [Note: attributes
    assigned in forward] in `partition.trace.assigns`."""
    buffers = [a for a in assigned if a.kind != "attribute"]
    ways = []
    if buffers:
        b = buffers[0].name
        ways.append(
            f"update a buffer in place (`self.{b}.add_(1)`, `self.{b}.copy_(value)` on a "
            "buffer made with register_buffer), which the graph keeps and the stage runs"
        )
    ways.append("keep the assignment out of forward (return the value instead)")
    inner = sorted({a.path for a in assigned if a.path})
    if inner:
        ways.append(
            f"keep {', '.join(repr(p) for p in inner)} whole (leaf_modules={inner!r} / --leaf "
            f"{inner[0]}), so its forward runs as it is"
        )
    other = (
        "or trace with method='export' (--trace export), which records a buffer's assignment "
        "as an in-place copy"
        if buffers
        else "or trace with method='export' (--trace export), which drops the assignment, saying so"
    )
    return route_error(
        f"cannot trace {name}: its forward assigns {'; '.join(str(a) for a in assigned)} "
        "(`self.x = ...` or `self.x += ...`). A traced graph holds no assignment to a module, so "
        "pipepart cannot split it: the split model would never update it",
        "; ".join(ways),
        other,
    )
