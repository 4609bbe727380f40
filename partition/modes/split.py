"""Splitting a model's graph in its other mode with the cuts chosen on the traced one.

`partition.modes.modal` traces a model in both modes when they differ; the plan's cuts are indices
into the traced mode's node order. `modal_stages` carries each cut over to the other mode's
graph — see [Note: corresponding cuts] — so that a stage receives and sends the same tensors,
in the same order, whichever mode runs, and `Pipeline.train` can switch graphs.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch.fx as fx
from torch import nn

from partition.errors import PlanError
from partition.graph import LinearGraph
from partition.modes.compare import node_key
from partition.modes.modal import ModalStage, OtherMode, mode_name
from partition.split import Stage, split
from partition.trace.tensor_constants import constant_key
from partition.trace.traced import TracedModel, module_path
from partition.wires import Wire, leaf, live_tensors, wire_name

__all__ = ["align", "assign", "is_local", "match_wires", "modal_stages"]


def modal_stages(
    traced: TracedModel, other_mode: OtherMode | None, stages: Sequence[Stage]
) -> list[Stage]:
    """``stages`` (split from ``traced``), each with its graph in the other mode.

    [Note: corresponding cuts]
    The two graphs are aligned node by node (`difflib` over what each node is: its op, target
    and module path, never its name, which shifts when a node exists in one mode only). An
    aligned node of the other mode goes to its partner's stage; one without a partner (a
    branch taken in one mode only) goes as late as its users allow, so that what crosses a cut
    is, where possible, a tensor both modes make. Each boundary's tensors are then paired: by
    their producers where those are aligned, else by the aligned node that reads them after
    the cut (``dropout(x)`` in train mode and ``x`` in eval mode feed the same ``linear``). The
    other mode's stage takes and returns them in the traced mode's order; a tensor without a
    partner of the same shape and dtype is an error naming the stage.

    Raises:
        PlanError: a cut cannot be carried over to the other mode.
    """
    if other_mode is None:
        return list(stages)
    mode = not other_mode.mode
    names = [f.name for f in fields(Stage)]
    if other_mode.traced is None:
        why = _untraced(other_mode)
        return [
            ModalStage(**{k: getattr(s, k) for k in names}, traced_mode=mode, untraced=why)
            for s in stages
        ]
    other = other_mode.traced
    what = other_mode.name
    partner = align(traced, other)
    stage_of = {name: s for s, stage in enumerate(stages) for name in stage.nodes}
    by_name = {node.name: node for node in traced.graph.nodes}
    stage_a = {by_name[name]: s for name, s in stage_of.items()}
    stage_b, conflicts = assign(other, partner, stage_a, len(stages))
    for node, s, t in conflicts[:1]:
        raise PlanError(
            f"stage {s}: in {what} mode its node {node.name!r} reads a tensor made in stage "
            f"{t}; choose other bounds around module {module_path(node) or node.name!r}"
        )
    nodes_b = [n for n in other.graph.nodes if n.op != "output"]
    program = {n: i for i, n in enumerate(nodes_b)}
    order_b = sorted(nodes_b, key=lambda n: (stage_b[n], program[n]))
    counts = [0] * len(stages)
    for n in nodes_b:
        counts[stage_b[n]] += 1
    empty = [s for s, c in enumerate(counts) if c == 0]
    if empty:
        raise PlanError(
            f"stage {empty[0]} has no nodes in {what} mode (everything it computes is "
            f"{'train' if mode else 'eval'}-only); choose bounds that give it a node both modes run"
        )
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    linear = LinearGraph.uncosted(tuple(n.name for n in order_b))
    try:
        split_b = split(other, linear, bounds)
    except PlanError as e:
        raise PlanError(f"the split does not carry over to {what} mode: {e}") from e
    order_a = [by_name[name] for stage in stages for name in stage.nodes]
    live_a = live_tensors(traced, order_a, _bounds(stages))  # what `split` sends, by its rule
    live_b = live_tensors(other, order_b, bounds)
    for s, (stage, stage_other) in enumerate(zip(stages, split_b, strict=True)):
        for live, made in ((live_a[s], stage), (live_b[s], stage_other)):
            if [wire_name(w) for w in live] != [spec.name for spec in made.inputs]:
                raise PlanError(  # the stages were not split from these graphs by `split`
                    f"stage {s}: internal error pairing the modes' boundaries; please report"
                )
        if s > 0:
            perm = _pair(live_a[s], live_b[s], partner, _earlier(stage_a, s), s, what)
            _reorder_inputs(stage_other.module, perm)
            _reorder_outputs(split_b[s - 1].module, perm)
    last, last_other = stages[-1].outputs, split_b[-1].outputs
    if [(t.shape, t.dtype) for t in last] != [(t.shape, t.dtype) for t in last_other]:
        raise PlanError(
            f"the model's outputs differ between modes: {_names(last)} in "
            f"{'train' if mode else 'eval'} mode, {_names(last_other)} in {what} mode"
        )
    if traced.out_spec != other.out_spec:
        raise PlanError(f"the model returns a different structure in {what} mode")
    for stage_other in split_b:
        stage_other.module.recompile()
    held = {name for stage in stages for name in _tensor_names(stage.module)}
    carried: list[Stage] = []
    for stage, b in zip(stages, split_b, strict=True):
        extra = [n for n in _tensor_names(b.module) if n not in held]
        for name in extra:  # read in the other mode only: this stage holds it for that mode
            _hold(stage.module, traced.model, name)
        fields_of = {k: getattr(stage, k) for k in names}
        fields_of["params"] = (*stage.params, *extra)
        carried.append(ModalStage(**fields_of, traced_mode=mode, other=b.module))
    return carried


def _earlier(stage_a: dict[fx.Node, int], s: int) -> Callable[[fx.Node], bool]:
    """Whether a traced-mode node is in a stage before ``s`` (the output node never is)."""
    return lambda node: stage_a.get(node, s) < s


def _untraced(other_mode: OtherMode) -> str:
    """Why a pipeline that traced one mode cannot run ``other_mode``."""
    traced, other = mode_name(not other_mode.mode), other_mode.name
    shown = ", ".join(repr(r or "(the model)") for r in other_mode.readers[:3])
    return (
        f"the pipeline traced {traced} mode only (modes={traced!r}), and the model's forward "
        f"reads self.training ({shown}), so its {other} graph is unknown and it cannot run in "
        f"{other} mode (train({other_mode.mode})); plan with modes='both' (--modes both) to "
        "switch modes"
    )


def _tensor_names(module: nn.Module) -> list[str]:
    """The parameters and buffers ``module`` holds, by qualified name (constants left out)."""
    return [
        name
        for name, _ in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
        if constant_key(name) is None
    ]


def _hold(module: nn.Module, model: nn.Module, name: str) -> None:
    """Make ``module`` (a stage) hold ``model``'s tensor ``name`` under that name, unused by
    its graph: its other-mode graph reads it (`partition.modes.modal.bind_other_mode`)."""
    path, _, leaf_name = name.rpartition(".")
    source = model.get_submodule(path)
    owner = module
    for part in path.split(".") if path else ():
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if hasattr(owner, leaf_name):
        return
    if leaf_name in source._parameters:
        owner.register_parameter(leaf_name, source._parameters[leaf_name])
    else:
        persistent = leaf_name not in source._non_persistent_buffers_set
        owner.register_buffer(leaf_name, source._buffers[leaf_name], persistent=persistent)


def _bounds(stages: Sequence[Stage]) -> list[int]:
    bounds = [0]
    for stage in stages:
        bounds.append(bounds[-1] + len(stage.nodes))
    return bounds


def _names(specs: Sequence[Any]) -> str:
    return "[" + ", ".join(s.describe() for s in specs) + "]"


def align(a: TracedModel, b: TracedModel) -> dict[fx.Node, fx.Node]:
    """Node of ``a`` → its partner in ``b``; see [Note: corresponding cuts]."""
    nodes_a = [n for n in a.graph.nodes if n.op != "output"]
    nodes_b = [n for n in b.graph.nodes if n.op != "output"]
    keys_a, keys_b = [node_key(n, a) for n in nodes_a], [node_key(n, b) for n in nodes_b]
    if keys_a == keys_b:
        partner = dict(zip(nodes_a, nodes_b, strict=True))
    else:
        partner = {}
        matcher = difflib.SequenceMatcher(None, keys_a, keys_b, autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                partner[nodes_a[block.a + k]] = nodes_b[block.b + k]
    outputs = [next(n for n in g.graph.nodes if n.op == "output") for g in (a, b)]
    partner[outputs[0]] = outputs[1]  # what the model returns pairs through the outputs
    return partner


def is_local(traced: TracedModel, node: fx.Node) -> bool:
    return node.op == "get_attr" or node.name in traced.param_placeholders


Conflict = tuple[fx.Node, int, int]
"""A node of the other mode whose partner is in stage ``s`` but that reads a tensor made in a
later stage ``t``: ``(node, s, t)``."""


def assign(
    b: TracedModel,
    partner: dict[fx.Node, fx.Node],
    stage_a: dict[fx.Node, int],
    num_stages: int,
) -> tuple[dict[fx.Node, int], list[Conflict]]:
    """The stage of every node of ``b`` (see [Note: corresponding cuts]), and the nodes that
    cannot follow their partner (each then goes to its partner's stage regardless).

    Only ``max``, ``min`` and comparisons combine the stages, so given each node's *position*
    as its stage (``num_stages = n``), it gives each node of ``b`` the last cut it follows:
    `partition.modes.cuts` reads every two-stage split off one call."""
    conflicts: list[Conflict] = []
    back = {y: x for x, y in partner.items()}
    nodes = [n for n in b.graph.nodes if n.op != "output"]
    last = num_stages - 1
    earliest: dict[fx.Node, int] = {}
    for node in nodes:
        inputs = [earliest[n] for n in node.all_input_nodes if not is_local(b, n)]
        lo = max(inputs, default=0)
        if node.op == "placeholder" and not is_local(b, node):
            lo = 0
        mate = back.get(node)
        if mate is not None and mate in stage_a and not is_local(b, node):
            if stage_a[mate] < lo:
                conflicts.append((node, stage_a[mate], lo))
            lo = stage_a[mate]
        earliest[node] = lo
    stage: dict[fx.Node, int] = {}
    for node in reversed(nodes):
        mate = back.get(node)
        users = [stage.get(u, last) for u in node.users]
        if mate is not None and mate in stage_a and not is_local(b, node):
            stage[node] = stage_a[mate]
        elif is_local(b, node) or users:
            stage[node] = max(min(users, default=earliest[node]), earliest[node])
        else:
            stage[node] = earliest[node]
    return stage, conflicts


def _pair(
    wires_a: list[Wire],
    wires_b: list[Wire],
    partner: dict[fx.Node, fx.Node],
    before: Callable[[fx.Node], bool],
    s: int,
    what: str,
) -> list[int]:
    """For each tensor stage ``s`` receives in the traced mode, the index of its partner among
    those it receives in the other mode (``before``: whether a traced-mode node is in an
    earlier stage); see [Note: corresponding cuts]."""
    perm, unpaired = match_wires(wires_a, wires_b, partner, before)
    if unpaired or len(perm) != len(wires_b):
        traced = "eval" if what == "train" else "train"
        extra = [w for k, w in enumerate(wires_b) if k not in perm]
        raise PlanError(
            f"stage {s} cannot receive the same tensors in both modes: "
            f"{_describe(unpaired) or 'nothing'} ({traced} mode) has no partner among "
            f"{_describe(extra) or 'nothing'} ({what} mode); move the cut before stage {s} "
            "to where both modes compute the same tensors (--bounds, or re-plan)"
        )
    return perm


def match_wires(
    wires_a: list[Wire],
    wires_b: list[Wire],
    partner: dict[fx.Node, fx.Node],
    before: Callable[[fx.Node], bool],
) -> tuple[list[int], list[Wire]]:
    """The partner's index among ``wires_b`` of each of ``wires_a`` that has one, and those
    that have none (`_pair` without the error; `partition.modes.cuts` asks it of every cut)."""
    index_b = {wire: k for k, wire in enumerate(wires_b)}
    perm: list[int] = []
    unpaired: list[Wire] = []
    for node, path in wires_a:
        k = index_b.get((partner[node], path)) if node in partner else None
        if k is None:  # produced in one mode only: pair through a reader after the cut
            k = _through_reader(node, path, partner, before, index_b)
        if k is None or k in perm or not _same_spec((node, path), wires_b[k]):
            unpaired.append((node, path))
        else:
            perm.append(k)
    return perm, unpaired


def _through_reader(
    node: fx.Node,
    path: tuple[int, ...],
    partner: dict[fx.Node, fx.Node],
    before: Callable[[fx.Node], bool],
    index_b: dict[Wire, int],
) -> int | None:
    """The other mode's tensor that the first aligned reader of ``node`` after the cut reads
    where it reads ``node`` (through nodes of one mode only in between)."""
    queue, seen = [node], {node}
    while queue:
        feeder = queue.pop(0)
        for user in feeder.users:
            if user in seen or before(user):
                continue
            seen.add(user)
            mate = partner.get(user)
            if mate is None:
                queue.append(user)
                continue
            position = user.all_input_nodes.index(feeder)
            if position < len(mate.all_input_nodes):
                k = index_b.get((mate.all_input_nodes[position], path))
                if k is not None:
                    return k
    return None


def _same_spec(a: Wire, b: Wire) -> bool:
    x, y = _tensor(a), _tensor(b)
    return bool(x.shape == y.shape and x.dtype == y.dtype)


def _tensor(wire: Wire) -> Any:
    return leaf(wire[0].meta.get("val"), wire[1])


def _describe(wires: Sequence[Wire]) -> str:
    return ", ".join(
        f"{w[0].name}{''.join(f'[{i}]' for i in w[1])}: "
        f"{str(_tensor(w).dtype).removeprefix('torch.')}{list(_tensor(w).shape)}"
        for w in wires
    )


def _reorder_inputs(module: fx.GraphModule, perm: list[int]) -> None:
    """Placeholder ``k`` becomes what was placeholder ``perm[k]``."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    first = next(n for n in module.graph.nodes if n.op != "placeholder")
    for k in perm:
        first.prepend(placeholders[k])


def _reorder_outputs(module: fx.GraphModule, perm: list[int]) -> None:
    output = next(n for n in module.graph.nodes if n.op == "output")
    values: Any = output.args[0]
    assert isinstance(values, tuple)
    output.args = (tuple(values[k] for k in perm),)
