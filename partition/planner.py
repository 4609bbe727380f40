"""From a model to a `Plan`: trace on meta, cost every node, solve the split, predict the step.

[Note: micro-batch shapes]
The example inputs are one *full batch*; they are cut into ``microbatches`` equal chunks along
dimension 0 and the model is traced and costed at the chunk's shape, because a pipeline runs one
micro-batch at a time and every cost in a plan is per micro-batch. A batch that does not divide
is an error before anything is traced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from partition.cost import CostGraph, cost_model
from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph, linearize
from partition.memory import MemoryModel, canonical_schedule
from partition.microbatch import DEFAULT_MICROBATCHES, first_microbatch
from partition.plan import ModelInfo, Plan, StagePlan, graph_hash
from partition.solve import Solution, solve
from partition.split import Stage, TensorSpec, split
from partition.trace import TracedModel, TraceMethod, trace

if TYPE_CHECKING:
    from pipeline.simulate import SimResult

__all__ = [
    "Analysis",
    "analyze",
    "build_plan",
    "plan_model",
    "predict_step",
    "reprice",
    "simulate_plan",
    "stages_for_plan",
]

Progress = Callable[[str], None]
Cuts = Literal["partitioner", "markers"]
"""Who places the cuts: the partitioner, or the model's ``pipe_split()`` markers."""


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

    def plan(
        self,
        devices: Sequence[Device],
        *,
        schedule: str = "1f1b",
        virtual: int = 1,
        memory: MemoryModel | None = None,
        algorithm: str = "optimal",
        cuts: Cuts = "partitioner",
    ) -> Plan:
        """Solve and price a split of this model — no re-tracing, so trying many is cheap.

        With ``cuts="markers"`` the model's ``pipe_split()`` markers are the cuts (one stage per
        segment; see `partition.markers`) and ``algorithm`` is not used.
        """
        if cuts == "markers":
            return build_plan(self, self._marker_solution(devices, schedule, virtual, memory))
        if cuts != "partitioner":
            raise PlanError(f"unknown cuts {cuts!r}; choose 'partitioner' or 'markers'")
        solution = solve(
            self.graph,
            list(devices),
            schedule=canonical_schedule(schedule),
            microbatches=self.microbatches,
            virtual=virtual,
            memory=memory or MemoryModel(),
            algorithm=algorithm,
        )
        return build_plan(self, solution)

    def _marker_solution(
        self, devices: Sequence[Device], schedule: str, virtual: int, memory: MemoryModel | None
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
            schedule=canonical_schedule(schedule),
            microbatches=self.microbatches,
            virtual=virtual,
            memory=memory or MemoryModel(),
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
        by_name = {n.name: n for n in self.traced.graph.nodes}
        metas = []
        for name in self.graph.names:
            node = by_name[name]
            val = node.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            metas.append(f"{node.op}|{getattr(node.target, '__name__', node.target)}|{shape}")
        return graph_hash(self.graph, metas)

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            class_name=str(
                getattr(self.traced.model, "model_class", type(self.traced.model).__name__)
            ),
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
    analysis: Analysis, solution: Solution, stages: Sequence[Stage] | None = None
) -> Plan:
    """A `Plan` from a solved split, with the simulator's predicted step time and bubble."""
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
    step_time, bubble = predict_step(
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


def simulate_plan(
    plan: Plan, *, schedule: str | None = None, microbatches: int | None = None
) -> SimResult:
    """The simulator run on ``plan``'s stages (its schedule and micro-batches unless overridden).

    Stage times are the plan's per-micro-batch predictions: forward FLOPs over device speed for F,
    the rest of the stage's compute for B (split in half for zero-bubble I and W), and latency +
    bytes / bandwidth for each cut, sends overlapping compute.
    """
    return _simulate(
        schedule or plan.schedule, plan.virtual, microbatches or plan.microbatches, plan.stages
    )


def _simulate(
    schedule: str, virtual: int, microbatches: int, stages: Sequence[StagePlan]
) -> SimResult:
    from pipeline.schedules import build_schedule
    from pipeline.simulate import simulate

    schedule = canonical_schedule(schedule)
    if (schedule == "interleaved") != (virtual > 1):
        raise PlanError(
            f"the plan has {virtual} stage(s) per device, which schedule {schedule!r} cannot run; "
            "re-plan with --schedule interleaved --virtual V (V >= 2) for an interleaved pipeline"
        )
    num_ranks = len(stages) // virtual
    built = build_schedule(schedule, num_ranks, microbatches, virtual)
    fwd = [s.forward_flops / s.device.flops for s in stages]
    bwd = [max(s.compute_time - f, 0.0) for s, f in zip(stages, fwd, strict=True)]
    comm = [
        s.device.latency + s.send_bytes / s.device.bandwidth if s.send_bytes else 0.0
        for s in stages[:-1]
    ]
    activations = [s.saved_bytes for s in stages]
    return simulate(
        built, forward_time=fwd, backward_time=bwd, comm_time=comm, activation_bytes=activations
    )


def predict_step(
    schedule: str, virtual: int, microbatches: int, stages: Sequence[StagePlan]
) -> tuple[float, float]:
    """Simulated step time and bubble of ``schedule`` with the stages' predicted times."""
    result = _simulate(schedule, virtual, microbatches, stages)
    return float(result.step_time), float(result.bubble_fraction)


def reprice(plan: Plan, devices: Sequence[Device]) -> Plan:
    """The same split priced on other ``devices`` (one per rank): times, capacities, prediction.

    Works from the plan file alone — each stage becomes one node of a stage-level graph, which
    the same objective (`partition.algorithms.objective.evaluate`) prices.
    """
    from dataclasses import replace

    from partition.algorithms.objective import Problem, evaluate

    if len(devices) != plan.num_ranks:
        raise PlanError(
            f"the plan has {plan.num_ranks} ranks but {len(devices)} devices were given"
        )
    stages = plan.stages
    element = (
        plan.model.param_bytes / plan.model.num_parameters if plan.model.num_parameters else 4.0
    )
    graph = LinearGraph(
        names=tuple(f"stage{s.index}" for s in stages),
        module_paths=tuple(s.first_module for s in stages),
        compute=np.array([s.flops for s in stages], dtype=np.float64),
        forward=np.array([s.forward_flops for s in stages], dtype=np.float64),
        param_bytes=np.array([s.param_bytes for s in stages], dtype=np.float64),
        saved_bytes=np.array([s.saved_bytes for s in stages], dtype=np.float64),
        cut_bytes=np.array([0.0, *(s.send_bytes for s in stages[:-1]), 0.0]),
        param_element_size=element,
    )
    problem = Problem(
        graph=graph,
        devices=tuple(devices),
        schedule=plan.schedule,
        microbatches=plan.microbatches,
        virtual=plan.virtual,
        memory=plan.memory_model,
    )
    evaluation = evaluate(problem, tuple(range(len(stages) + 1)))
    new_stages = tuple(
        replace(
            stage,
            device=problem.stage_device(s),
            capacity=int(evaluation.caps[s]),
            compute_time=evaluation.stage_compute_times[s],
            comm_time=evaluation.stage_comm_times[s],
            memory={**evaluation.stage_memory_parts[s], "total": evaluation.stage_memory[s]},
        )
        for s, stage in enumerate(stages)
    )
    step_time, bubble = predict_step(plan.schedule, plan.virtual, plan.microbatches, new_stages)
    return replace(
        plan,
        stages=new_stages,
        bottleneck=evaluation.bottleneck,
        perfect_balance=evaluation.perfect_balance,
        step_time=step_time,
        bubble=bubble,
    )


def plan_model(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    devices: Sequence[Device],
    schedule: str = "1f1b",
    microbatches: int = DEFAULT_MICROBATCHES,
    virtual: int = 1,
    memory: MemoryModel | None = None,
    algorithm: str = "optimal",
    method: TraceMethod = "auto",
    leaf_modules: Sequence[Any] = (),
    concrete_args: Mapping[str, Any] | None = None,
    order: str = "auto",
    profile: bool = False,
    progress: Progress | None = None,
    cuts: Cuts = "partitioner",
) -> Plan:
    """Plan ``model`` over ``devices``: the one call most users need.

    Args:
        model: the model, on any device (``meta`` for models larger than memory).
        example_inputs: one full batch; see [Note: micro-batch shapes].
        devices: one per pipeline rank, in pipeline order.
        schedule: ``gpipe``, ``1f1b``, ``interleaved`` (with ``virtual`` stages per device) or
            ``zb-h1``; decides how many micro-batches each stage keeps in memory.
        microbatches: micro-batches per step.
        memory: what training keeps per parameter (optimizer state; default Adam, no fp32 master).
        algorithm: ``optimal`` (the exact partitioner) or a baseline: ``uniform``, ``params``,
            ``time``.
        profile: measure node times on this machine (CUDA if available, else CPU) taking
            ``devices[0]`` as the kind of device it is, instead of pricing FLOPs.
        cuts: ``"partitioner"`` (``algorithm`` places them), or ``"markers"``: one stage per
            segment between the model's ``torch.distributed.pipelining.pipe_split()`` calls, so
            ``len(devices) * virtual`` must be the number of markers + 1 (the node order is then
            the program order).

    Raises:
        InputError, TraceError: the inputs or the model cannot be traced.
        InfeasibleError: no split fits; the message says what would.
    """
    schedule = canonical_schedule(schedule)
    if not devices:
        raise PlanError("no devices given")
    analysis = analyze(
        model,
        example_inputs,
        example_kwargs,
        microbatches=microbatches,
        method=method,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        order="graph" if cuts == "markers" and order == "auto" else order,
        profile_on=devices[0] if profile else None,
        profile_device="cuda" if profile and torch.cuda.is_available() else "cpu",
        progress=progress,
    )
    if progress:
        progress(f"partitioning {len(analysis.graph)} nodes over {len(devices)} devices")
    return analysis.plan(
        devices, schedule=schedule, virtual=virtual, memory=memory, algorithm=algorithm, cuts=cuts
    )


def stages_for_plan(analysis: Analysis, plan: Plan) -> list[Stage]:
    """The stage modules of ``plan``, after checking it was made for this model."""
    plan.check_model(analysis.model_info().class_name, analysis.graph_hash, len(analysis.graph))
    return split(analysis.traced, analysis.graph, plan.bounds)
