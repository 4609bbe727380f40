"""Assembling a `Plan` from a solved split: each stage's nodes, costs, memory and boundary
tensors, the schedule's predicted step, and the parameters several stages share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from partition.graph import LinearGraph
from partition.plan import Plan, StagePlan
from partition.planning.analysis import Analysis
from partition.planning.predict import predict_step
from partition.solve import Solution
from partition.split import Stage, split

__all__ = ["build_plan", "stage_plans"]


def stage_plans(
    graph: LinearGraph, solution: Solution, stages: Sequence[Stage] | None = None
) -> tuple[StagePlan, ...]:
    """Each stage of a solved split as a `StagePlan`: nodes, costs, memory and, given the
    split's ``stages``, their boundary tensors (without them: none, which pricing a split with
    `partition.planning.predict.predict_step` does not read)."""
    problem, evaluation, bounds = solution.problem, solution.evaluation, solution.bounds
    forward = graph.forward
    out = []
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        parts = evaluation.stage_memory_parts[s]
        stage = stages[s] if stages is not None else None
        out.append(
            StagePlan(
                index=s,
                device=problem.stage_device(s),
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
                inputs=stage.inputs if stage is not None else (),
                outputs=stage.outputs if stage is not None and not stage.is_last else (),
                dispatched=float(graph.dispatched[lo:hi].sum()),
            )
        )
    return tuple(out)


def build_plan(
    analysis: Analysis,
    solution: Solution,
    *,
    stages: Sequence[Stage] | None = None,
) -> Plan:
    """A `Plan` from a solved split, with the step time and bubble the simulator predicts
    (`partition.planning.predict.predict_step`); ``stages``: the split's stages, if made already."""
    problem, evaluation = solution.problem, solution.evaluation
    graph = analysis.graph
    stages = list(stages) if stages is not None else split(analysis.traced, graph, solution.bounds)
    plans = stage_plans(graph, solution, stages)
    step_time, bubble = predict_step(problem.schedule, problem.virtual, problem.microbatches, plans)
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
        objective=problem.objective,
        bottleneck=float(evaluation.bottleneck),
        perfect_balance=float(evaluation.perfect_balance),
        step_time=step_time,
        bubble=bubble,
        stages=plans,
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
