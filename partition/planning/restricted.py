"""Solving a split whose cuts may fall at some positions only (a model with two modes).

[Note: solving on allowed cuts]
The partitioner sees a model as prefix sums over nodes, so a split whose cuts must fall on a
subset of positions is a split of a coarser graph: the nodes between two allowed cuts merged into
one (every per-node cost summed: compute, parameter, buffer and saved bytes...), each remaining
cut as wide as it was. Every prefix sum of the coarse graph is one of the fine graph's, so every stage's time and
memory — and with them the bottleneck, the total time and the tie-breaks of
[Note: what optimal guarantees] in `partition.solve` — are those of the same split of the fine
graph: the optimum over the allowed cuts, found by the algorithms unchanged. The split is then
mapped back and evaluated on the fine graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np

from partition.devices import Device
from partition.errors import InfeasibleError
from partition.graph import LinearGraph
from partition.options import PlanOptions
from partition.solve import Problem, Solution, evaluate, solve

__all__ = ["coarsen", "solve_on_cuts"]


def coarsen(graph: LinearGraph, cuts: Sequence[int]) -> LinearGraph:
    """``graph`` with the nodes between consecutive ``cuts`` (interior positions, rising)
    merged; see [Note: solving on allowed cuts]."""
    n = len(graph)
    edges = np.array([0, *cuts, n], dtype=np.int64)
    starts, stops = edges[:-1], edges[1:]

    def summed(values: np.ndarray) -> np.ndarray:
        prefix = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
        return np.asarray(prefix[stops] - prefix[starts], dtype=np.float64)

    names = tuple(
        graph.names[i] if j - i == 1 else f"{graph.names[i]}…{graph.names[j - 1]}"
        for i, j in zip(starts, stops, strict=True)
    )
    changes: dict[str, Any] = {
        "names": names,
        "module_paths": tuple(graph.module_paths[i] for i in starts),
        "cut_bytes": np.asarray(graph.cut_bytes, dtype=np.float64)[edges],
        "extra": dict(graph.extra),
    }
    for f in fields(graph):  # every per-node cost, whichever the graph has
        value = getattr(graph, f.name)
        if f.name not in changes and isinstance(value, np.ndarray) and value.shape == (n,):
            changes[f.name] = summed(value)
    return replace(graph, **changes)


def solve_on_cuts(
    graph: LinearGraph,
    cuts: Sequence[int],
    devices: Sequence[Device],
    options: PlanOptions,
    why: str,
) -> Solution:
    """The split of ``graph`` over ``devices`` with ``options``' algorithm, cut only at ``cuts``
    (interior positions, rising); ``why``: what makes the other cuts unusable, for the error.

    Raises:
        InfeasibleError: fewer cuts than the stages need, or (``optimal``) no split fits.
    """
    stages = len(devices) * options.virtual
    if stages - 1 > len(cuts):
        raise InfeasibleError(
            f"{stages} stages need {stages - 1} cuts, but only {len(cuts)} of the "
            f"{len(graph) - 1} cut positions can be used: {why}. Use at most "
            f"{(len(cuts) + 1) // options.virtual} devices"
        )
    coarse = solve(
        coarsen(graph, cuts),
        list(devices),
        schedule=options.schedule,
        microbatches=options.microbatches,
        virtual=options.virtual,
        memory=options.memory,
        algorithm=options.algorithm,
        objective=options.objective,
    )
    edges = [0, *cuts, len(graph)]
    bounds = tuple(edges[b] for b in coarse.bounds)
    problem = Problem(
        graph=graph,
        devices=tuple(devices),
        schedule=options.schedule,
        microbatches=options.microbatches,
        virtual=options.virtual,
        memory=options.memory,
    )
    return Solution(
        problem=problem,
        algorithm=coarse.algorithm,
        bounds=bounds,
        evaluation=evaluate(problem, bounds),
    )
