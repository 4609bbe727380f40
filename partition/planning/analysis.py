"""Analysing a model for planning: trace it on meta and cost every node, at micro-batch shape.

`Analysis` is a traced and costed model, solved into splits any number of times;
`partition.planning.assemble.build_plan` turns a solved split into a `Plan`, and
`partition.planning.model.plan_model` (the one call most users need) does all of it.

[Note: micro-batch shapes]
The example inputs are one *full batch*; they are cut into ``microbatches`` equal chunks along
dimension 0 and the model is traced and costed at the chunk's shape, because a pipeline runs one
micro-batch at a time and every cost in a plan is per micro-batch. A batch that does not divide
is an error before anything is traced.

A model whose forward reads ``self.training`` is traced in both modes (`partition.modes`): the
analysis costs the mode the model is in (the one ``Pipeline.step`` trains) and keeps the other's
graph, and `Analysis.solve` places cuts only where they carry over to it (`mode_cuts`; see
[Note: cuts valid in both modes] in `partition.modes.cuts`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch import nn

from partition.algorithms.objective import Bounds
from partition.cost import CostGraph, cost_model
from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph, linearize, node_order
from partition.microbatch import first_microbatch
from partition.modes.cuts import ModeCuts, mode_cuts
from partition.modes.modal import OtherMode, mode_name, trace_modes
from partition.options import PlanOptions, with_knobs
from partition.plan import ModelInfo, Plan, graph_hash
from partition.solve import Solution, solve
from partition.split import Stage, split
from partition.trace.traced import TracedModel
from partition.wires import TensorSpec

__all__ = [
    "Analysis",
    "analyze",
    "analyze_traced",
    "stages_for_plan",
]

Progress = Callable[[str], None]


@dataclass(eq=False)
class Analysis:
    """A traced and costed model, ready to be split any number of ways."""

    traced: TracedModel
    costs: CostGraph
    graph: LinearGraph
    inputs: tuple[TensorSpec, ...]
    """One micro-batch's tensor inputs."""
    microbatches: int = 1
    """The batch was traced as this many micro-batches (each cost is per micro-batch)."""
    other: OtherMode | None = None
    """The model's other mode, when its forward reads ``self.training`` and the graphs differ."""

    @cached_property
    def mode_cuts(self) -> ModeCuts | None:
        """Which cuts carry over to the other mode (``None``: every cut does)."""
        if self.other is None or self.other.traced is None:
            return None
        return mode_cuts(self.traced, self.other, self.graph.names)

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes traced and planned, the model's own first (see `ModelInfo.modes`)."""
        if self.other is None:
            return ()
        own = mode_name(not self.other.mode)
        return (own,) if self.other.traced is None else (own, self.other.name)

    def solve(
        self,
        devices: Sequence[Device],
        options: PlanOptions | None = None,
    ) -> Solution:
        """Solve a split of this model — no re-tracing, so trying many is cheap.

        With ``options.cuts == "markers"`` the model's ``pipe_split()`` markers are the cuts (one
        stage per segment; see `partition.trace.markers`), with ``options.bounds`` those bounds;
        either way ``options.algorithm`` is not used.
        """
        options = options or PlanOptions(microbatches=self.microbatches)
        if options.microbatches != self.microbatches:
            raise PlanError(
                f"the model was traced as {self.microbatches} micro-batches, the options ask for "
                f"{options.microbatches}: analyze it again with microbatches={options.microbatches}"
            )
        if options.cuts == "markers":
            return self._marker_solution(devices, options)
        if options.bounds is not None:
            return self._given_solution(devices, options, options.bounds, "given")
        if self.mode_cuts is not None and self.other is not None:
            from partition.planning.restricted import solve_on_cuts

            why = (
                f"the model's forward reads self.training and its {self.other.name} graph "
                "differs, so a cut must carry over to it (see partition.modes.cuts); or trace "
                f"one mode (modes={self.modes[0]!r}, --modes {self.modes[0]})"
            )
            return solve_on_cuts(self.graph, self.mode_cuts.usable(), devices, options, why)
        return solve(
            self.graph,
            list(devices),
            schedule=options.schedule,
            microbatches=self.microbatches,
            virtual=options.virtual,
            memory=options.memory,
            algorithm=options.algorithm,
            objective=options.objective,
        )

    def _marker_solution(self, devices: Sequence[Device], options: PlanOptions) -> Solution:
        from partition.trace.markers import marker_bounds

        bounds = tuple(marker_bounds(self.traced, self.graph))
        stages, virtual = len(bounds) - 1, options.virtual
        if stages != len(devices) * virtual:
            raise PlanError(
                f"the model's {stages - 1} pipe_split() markers make {stages} stages, but "
                f"{len(devices)} device(s) × {virtual} virtual stage(s) make "
                f"{len(devices) * virtual}; use {stages // virtual if stages % virtual == 0 else stages} "
                "devices (--devices / --ranks), or leave the cuts to the partitioner"
            )
        return self._given_solution(devices, options, bounds, "markers")

    def _given_solution(
        self, devices: Sequence[Device], options: PlanOptions, bounds: Bounds, algorithm: str
    ) -> Solution:
        """``bounds`` as the split, priced by the partitioner's objective."""
        from partition.solve import Problem, evaluate

        virtual = options.virtual
        if len(bounds) - 1 != len(devices) * virtual:
            raise PlanError(
                f"bounds {list(bounds)} make {len(bounds) - 1} stages; {len(devices)} ranks with "
                f"{virtual} stage(s) each need {len(devices) * virtual}"
            )
        n = len(self.graph)
        if bounds[0] != 0 or bounds[-1] != n or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise PlanError(
                f"bounds {list(bounds)} are not a split of the {n} nodes: they must rise from 0 "
                f"to {n}, each stage holding at least one node"
            )
        problem = Problem(
            graph=self.graph,
            devices=tuple(devices),
            schedule=options.schedule,
            microbatches=self.microbatches,
            virtual=virtual,
            memory=options.memory,
        )
        return Solution(
            problem=problem,
            algorithm=algorithm,
            bounds=bounds,
            evaluation=evaluate(problem, bounds),
        )

    @property
    def graph_hash(self) -> str:
        return _graph_hash(self.traced, self.graph)

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            class_name=_class_name(self.traced),
            graph_hash=self.graph_hash,
            num_nodes=len(self.graph),
            num_parameters=self.costs.param_numel,
            param_bytes=self.costs.param_bytes,
            trace_method=self.traced.method,
            order=str(self.graph.extra.get("order", "graph")),
            inputs=self.inputs,
            leaf_modules=self.traced.leaf_modules,
            modes=self.modes,
        )


def analyze(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
    profile_on: Device | None = None,
    progress: Progress | None = None,
    **knobs: Any,
) -> Analysis:
    """Trace and cost ``model`` at micro-batch shape (the inputs are a full batch).

    Args:
        options: the tracing fields of `PlanOptions` are used (``microbatches``, ``method``,
            ``leaf_modules``, ``concrete_args``, ``tracer_class``, ``order``); ``knobs`` are its
            fields one by one (``microbatches=8``), over ``options``. Without ``options`` the
            batch is traced whole, as one micro-batch.
        profile_on: the spec of the device this process runs on: node times are then measured
            here (CUDA if available, else CPU) instead of derived from FLOPs; see
            `partition.profile`.
        progress: called with a line of text as each phase starts.
    """
    options = with_knobs(options or PlanOptions(microbatches=1), knobs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args, kwargs = first_microbatch(example_inputs, example_kwargs, options.microbatches)
    if progress:
        progress(f"tracing {type(model).__name__}")
    traced, other = trace_modes(model, args, kwargs, options=replace(options, microbatches=1))
    analysis = analyze_traced(
        traced,
        microbatches=options.microbatches,
        order=options.node_order,
        profile_on=profile_on,
        progress=progress,
    )
    analysis.other = other
    return analysis


def analyze_traced(
    traced: TracedModel,
    *,
    microbatches: int = 1,
    order: str = "auto",
    profile_on: Device | None = None,
    progress: Progress | None = None,
) -> Analysis:
    """Cost an already traced model (traced at one micro-batch of ``microbatches``); see `analyze`."""
    if progress:
        progress(f"costing {len(traced.graph.nodes)} nodes")
    costs = cost_model(traced)
    if profile_on is not None:
        from partition.profile import profile

        here = "cuda" if torch.cuda.is_available() else "cpu"
        costs = profile(costs, profile_on, torch_device=here, progress=progress)
    graph = linearize(costs, order)
    specs = tuple(  # by the forward's own argument names (fx names ``input`` ``input_1``)
        TensorSpec.of(str(node.target).lstrip("*"), node.meta["val"])
        for node in traced.graph.nodes
        if node.op == "placeholder"
        and node.name not in traced.param_placeholders
        and isinstance(node.meta.get("val"), torch.Tensor)
    )
    return Analysis(
        traced=traced, costs=costs, graph=graph, inputs=specs, microbatches=microbatches
    )


def stages_for_plan(traced: TracedModel, plan: Plan) -> list[Stage]:
    """The stage modules of ``plan``, after checking it was made for this model.

    Only the plan's node order is rebuilt (`partition.graph.node_order`): nothing is costed, so a
    rank given a plan pays for a trace on meta and no more.
    """
    order = node_order(traced, plan.model.order)
    given = sum(p.numel() for p in traced.model.parameters())  # each once, as the plan counts
    plan.check_model(_class_name(traced), _graph_hash(traced, order), len(order), given)
    return split(traced, order, plan.bounds)


def _class_name(traced: TracedModel) -> str:
    return str(getattr(traced.model, "model_class", type(traced.model).__name__))


def _graph_hash(traced: TracedModel, order: LinearGraph) -> str:
    """`partition.plan.graph_hash` of ``order``: each node's op, target and output shape."""
    by_name = {n.name: n for n in traced.graph.nodes}
    metas = []
    for name in order.names:
        node = by_name[name]
        val = node.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
        metas.append(f"{node.op}|{getattr(node.target, '__name__', node.target)}|{shape}")
    return graph_hash(order, metas)
