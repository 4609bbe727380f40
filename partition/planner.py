"""From a model to a `Plan`: trace on meta, cost every node, solve the split, assemble the plan.

The step time a plan predicts comes from the simulator, which runs the schedules of
`pipeline.schedules`; `partition` never imports `pipeline`, so `build_plan` takes the predictor as
an argument and `pipeline.planning.plan_model` (the one call most users need) passes it, with the
schedule's own in-flight counts.

[Note: micro-batch shapes]
The example inputs are one *full batch*; they are cut into ``microbatches`` equal chunks along
dimension 0 and the model is traced and costed at the chunk's shape, because a pipeline runs one
micro-batch at a time and every cost in a plan is per micro-batch. A batch that does not divide
is an error before anything is traced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partition.cost import CostGraph, cost_model
from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph, linearize, node_order
from partition.memory import InflightFn, MemoryModel, closed_form_inflight
from partition.microbatch import first_microbatch
from partition.options import PlanOptions
from partition.plan import ModelInfo, Plan, StagePlan, graph_hash
from partition.solve import Solution, solve
from partition.split import Stage, TensorSpec, split
from partition.trace import TraceMethod, trace
from partition.traced import TracedModel

__all__ = [
    "Analysis",
    "StepPredictor",
    "analyze",
    "analyze_traced",
    "build_plan",
    "stages_for_plan",
]

Progress = Callable[[str], None]
StepPredictor = Callable[[str, int, int, Sequence[StagePlan]], tuple[float, float]]
"""``predict(schedule, virtual, microbatches, stages)`` -> (step seconds, bubble fraction);
`pipeline.planning.predict_step` is the one there is."""


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

    def solve(
        self,
        devices: Sequence[Device],
        options: PlanOptions | None = None,
        *,
        inflight: InflightFn | None = None,
    ) -> Solution:
        """Solve a split of this model — no re-tracing, so trying many is cheap.

        With ``options.cuts == "markers"`` the model's ``pipe_split()`` markers are the cuts (one
        stage per segment; see `partition.markers`) and ``options.algorithm`` is not used.
        """
        options = options or PlanOptions(microbatches=self.microbatches)
        if options.microbatches != self.microbatches:
            raise PlanError(
                f"the model was traced as {self.microbatches} micro-batches, the options ask for "
                f"{options.microbatches}: analyze it again with microbatches={options.microbatches}"
            )
        if options.cuts == "markers":
            return self._marker_solution(
                devices, options.schedule, options.virtual, options.memory, inflight
            )
        return solve(
            self.graph,
            list(devices),
            schedule=options.schedule,
            microbatches=self.microbatches,
            virtual=options.virtual,
            memory=options.memory,
            algorithm=options.algorithm,
            inflight=inflight,
        )

    def _marker_solution(
        self,
        devices: Sequence[Device],
        schedule: str,
        virtual: int,
        memory: MemoryModel,
        inflight: InflightFn | None,
    ) -> Solution:
        from partition.markers import marker_bounds
        from partition.solve import Problem, evaluate

        bounds = marker_bounds(self.traced, self.graph)
        stages = len(bounds) - 1
        if stages != len(devices) * virtual:
            raise PlanError(
                f"the model's {stages - 1} pipe_split() markers make {stages} stages, but "
                f"{len(devices)} device(s) × {virtual} virtual stage(s) make "
                f"{len(devices) * virtual}; use {stages // virtual if stages % virtual == 0 else stages} "
                "devices (--devices / --ranks), or leave the cuts to the partitioner"
            )
        problem = Problem(
            graph=self.graph,
            devices=tuple(devices),
            schedule=schedule,
            microbatches=self.microbatches,
            virtual=virtual,
            memory=memory,
            inflight_fn=inflight or closed_form_inflight,
        )
        bounds_t = tuple(bounds)
        return Solution(
            problem=problem,
            algorithm="markers",
            bounds=bounds_t,
            evaluation=evaluate(problem, bounds_t),
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
        )


def analyze(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    microbatches: int = 1,
    method: TraceMethod = "auto",
    leaf_modules: Sequence[Any] = (),
    concrete_args: Mapping[str, Any] | None = None,
    tracer_class: Any = None,
    order: str = "auto",
    profile_on: Device | None = None,
    profile_device: str = "cpu",
    progress: Progress | None = None,
) -> Analysis:
    """Trace and cost ``model`` at micro-batch shape (the inputs are a full batch).

    With ``profile_on`` (the spec of the device this process runs on), node times are measured
    on ``profile_device`` instead of derived from FLOPs; see `partition.profile`.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args, kwargs = first_microbatch(example_inputs, example_kwargs, microbatches)
    if progress:
        progress(f"tracing {type(model).__name__}")
    traced = trace(
        model,
        args,
        kwargs,
        method=method,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        tracer_class=tracer_class,
    )
    return analyze_traced(
        traced,
        microbatches=microbatches,
        order=order,
        profile_on=profile_on,
        profile_device=profile_device,
        progress=progress,
    )


def analyze_traced(
    traced: TracedModel,
    *,
    microbatches: int = 1,
    order: str = "auto",
    profile_on: Device | None = None,
    profile_device: str = "cpu",
    progress: Progress | None = None,
) -> Analysis:
    """Cost an already traced model (traced at one micro-batch of ``microbatches``); see `analyze`."""
    if progress:
        progress(f"costing {len(traced.graph.nodes)} nodes")
    costs = cost_model(traced)
    if profile_on is not None:
        from partition.profile import profile

        costs = profile(costs, profile_on, torch_device=profile_device, progress=progress)
    graph = linearize(costs, order)
    specs = tuple(
        TensorSpec.of(node.name, node.meta["val"])
        for node in traced.graph.nodes
        if node.op == "placeholder"
        and node.name not in traced.param_placeholders
        and isinstance(node.meta.get("val"), torch.Tensor)
    )
    return Analysis(
        traced=traced, costs=costs, graph=graph, inputs=specs, microbatches=microbatches
    )


def build_plan(
    analysis: Analysis,
    solution: Solution,
    *,
    predict: StepPredictor,
    stages: Sequence[Stage] | None = None,
) -> Plan:
    """A `Plan` from a solved split, with the step time and bubble ``predict`` gives."""
    problem, evaluation = solution.problem, solution.evaluation
    graph = analysis.graph
    stages = list(stages) if stages is not None else split(analysis.traced, graph, solution.bounds)
    bounds = solution.bounds
    stage_plans = []
    forward = graph.forward
    for s, stage in enumerate(stages):
        lo, hi = bounds[s], bounds[s + 1]
        device = problem.devices[s % len(problem.devices)]
        parts = evaluation.stage_memory_parts[s]
        stage_plans.append(
            StagePlan(
                index=s,
                device=device,
                start=lo,
                stop=hi,
                first_node=graph.names[lo],
                last_node=graph.names[hi - 1],
                first_module=_first_path(graph.module_paths[lo:hi]),
                last_module=_first_path(reversed(graph.module_paths[lo:hi])),
                flops=float(graph.compute[lo:hi].sum()),
                forward_flops=float(forward[lo:hi].sum()),
                param_bytes=int(graph.param_bytes[lo:hi].sum()),
                memory={
                    **{k: float(v) for k, v in parts.items()},
                    "total": float(evaluation.stage_memory[s]),
                },
                capacity=int(evaluation.caps[s]),
                compute_time=float(evaluation.stage_compute_times[s]),
                comm_time=float(evaluation.stage_comm_times[s]),
                saved_bytes=float(graph.saved_bytes[lo:hi].sum()),
                inflight=int(evaluation.stage_inflight[s]),
                send_bytes=float(graph.cut_bytes[hi]),
                inputs=stage.inputs,
                outputs=stage.outputs if not stage.is_last else (),
            )
        )
    step_time, bubble = predict(
        problem.schedule, problem.virtual, problem.microbatches, stage_plans
    )
    holders: dict[str, list[int]] = {}
    first_name = _first_names(analysis)
    for stage in stages:
        for name in stage.params:
            holders.setdefault(first_name.get(name, name), []).append(stage.index)
    shared = {name: sorted(set(ids)) for name, ids in holders.items() if len(set(ids)) > 1}
    return Plan(
        model=analysis.model_info(),
        schedule=problem.schedule,
        microbatches=problem.microbatches,
        virtual=problem.virtual,
        memory_model=problem.memory,
        algorithm=solution.algorithm,
        bottleneck=float(evaluation.bottleneck),
        perfect_balance=float(evaluation.perfect_balance),
        step_time=step_time,
        bubble=bubble,
        stages=tuple(stage_plans),
        shared_params=shared,
    )


def _first_names(analysis: Analysis) -> dict[str, str]:
    """Every parameter name → the first name of the same tensor (tied weights share one)."""
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, tensor in analysis.traced.model.named_parameters(remove_duplicate=False):
        names[name] = first.setdefault(id(tensor), name)
    return names


def _first_path(paths: Any) -> str:
    for path in paths:
        if path:
            return str(path)
    return ""


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
