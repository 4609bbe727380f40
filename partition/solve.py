"""The partitioner's front door: split a linear cost graph over devices with a named algorithm.

``solve(graph, devices)`` builds a `Problem`, runs the algorithm and evaluates the split with the
one objective every algorithm shares ([Note: objective] in `partition.algorithms.objective`).

[Note: what optimal guarantees]
For the ``optimal`` algorithm, with ``B*`` the least bottleneck over the splits that fit memory
(see [Note: bottleneck search] for how):

1. the returned split fits every cap (interleaved: every stage its share of the device, see
   [Note: objective]) and every stage is non-empty;
2. its bottleneck is ``B*`` up to float noise (within ``1e-11`` relative; the search has no
   tolerance to tune);
3. the *ties* are the splits that fit with a bottleneck within ``1e-12`` relative of the one
   found (stage times compared with that slack, for rounding). Among them the split has the
   fewest *idle* stages (compute at most 1 % of an even share, `IDLE_SHARE`: an input, a shape
   query; see [Note: idle stages] in `partition.idle`), exactly; among those, the least
   total time ``S = sum_s T_s`` — what a step adds to ``(m - 1) B`` for its fill and drain —
   compared exactly in integer units of at most ``(k + 3) 2^-50`` of the longest possible
   stage time (``6e-14`` of it on 64 stages; see
   [Note: objective] for why units and not a tolerance: splits whose ``S`` differ by more than
   ``4 k`` units never tie, and natural ties, zero-compute nodes moved between equal cuts or
   compute moved between identical devices, always do);
4. among those, the least communication — the sum of the interior cut widths — compared exactly
   in float64 (cut widths are byte counts, so the sums are exact up to 2^53);
5. among the ties with that communication, the least peak memory ``max_s M_s / cap_s``: exactly
   when the tight starts number at most ``EDGE_BUDGET`` (two million) beyond one per cut —
   always, unless the windows are wide *and* many splits tie on time and communication, as with
   identical devices and equal cut widths — and otherwise to ``1e-9`` relative (bisection);
6. what is still tied goes to the earliest cut, stage by stage from the last; the result is
   deterministic.

Nothing else is optimised. The simulated step time is not: its model is about ``(m - 1) B + S``,
which the order above minimises only among splits of the least ``B`` — when ``m`` is close to
``k`` on mixed devices a larger ``B`` with a smaller ``S`` can predict a faster step — and the
simulator overlaps sends with compute where ``T_s`` adds them. Nor is the balance of the
non-bottleneck stages beyond ``S``. ``objective="step"`` makes that trade: it minimises
``lambda B + S`` exactly ([Note: step objective] in `partition.algorithms.step`), among the
splits that leave no more stages idle than their bottleneck forces, then the same tie-breaks.

Baselines ignore memory: their split is returned even when `Evaluation.fits` is false.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from partition.algorithms import baselines
from partition.algorithms.objective import Bounds, Evaluation, evaluate
from partition.algorithms.optimal import min_devices, optimal_split
from partition.algorithms.problem import DEFAULT_MEMORY, DEFAULT_OBJECTIVE, Problem
from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph
from partition.memory import MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.schedules.names import DEFAULT_SCHEDULE

__all__ = ["ALGORITHMS", "Evaluation", "Problem", "Solution", "evaluate", "min_devices", "solve"]

ALGORITHMS: tuple[str, ...] = ("optimal", "uniform", "params", "time")
_RUN: dict[str, Callable[[Problem], Bounds]] = {
    "optimal": optimal_split,
    "uniform": baselines.uniform,
    "params": baselines.params,
    "time": baselines.time,
}


@dataclass(frozen=True, kw_only=True)
class Solution:
    """A split of a problem, the algorithm that chose it and its evaluation."""

    problem: Problem
    algorithm: str
    """One of `ALGORITHMS`."""
    bounds: Bounds
    """Stage ``s`` holds nodes ``bounds[s]`` to ``bounds[s + 1] - 1``."""
    evaluation: Evaluation


def solve(
    graph: LinearGraph,
    devices: Sequence[Device],
    *,
    schedule: str = DEFAULT_SCHEDULE,
    microbatches: int = DEFAULT_MICROBATCHES,
    virtual: int = 1,
    memory: MemoryModel = DEFAULT_MEMORY,
    algorithm: str = "optimal",
    objective: str = DEFAULT_OBJECTIVE,
) -> Solution:
    """Split ``graph`` into pipeline stages over ``devices``.

    Args:
        graph: the nodes in order with their costs.
        devices: one per rank in pipeline order; with ``virtual > 1`` each holds ``virtual``
            stages (stage ``s`` on ``devices[s % len(devices)]``).
        schedule: ``gpipe``, ``1f1b``, ``interleaved`` or ``zb-h1``.
        microbatches: micro-batches per step.
        virtual: virtual stages per device (``interleaved`` only).
        memory: what training keeps per parameter byte.
        algorithm: one of `ALGORITHMS`; see [Note: what optimal guarantees].
        objective: (``optimal``) ``step``, the least predicted step (see [Note: step objective]
            in `partition.algorithms.step`), or ``bottleneck``, the least bottleneck.

    Returns:
        The split and its evaluation.

    Raises:
        PlanError: an unknown algorithm or schedule, or invalid settings.
        InfeasibleError: (``optimal``) no split fits; the message says which node is too large
            or the fewest devices that fit. (Any algorithm) more stages than nodes.
    """
    run = _RUN.get(algorithm)
    if run is None:
        raise PlanError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    problem = Problem(
        graph=graph,
        devices=tuple(devices),
        schedule=schedule,
        microbatches=microbatches,
        virtual=virtual,
        memory=memory,
        objective=objective,
    )
    bounds = run(problem)
    return Solution(
        problem=problem, algorithm=algorithm, bounds=bounds, evaluation=evaluate(problem, bounds)
    )
