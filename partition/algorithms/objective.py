"""The partitioning objective: what a split costs, in which order splits compare, and its evaluation.

[Note: objective]
A *split* of ``n`` nodes into ``k`` stages is a tuple of bounds ``0 = b_0 < b_1 < ... < b_k = n``;
stage ``s`` holds nodes ``[b_s, b_{s+1})`` and runs on ``stage_device(s)``. With prefix sums ``P``
of ``compute``, ``N`` of ``dispatched``, ``W`` of ``param_bytes``, ``V`` of ``buffer_bytes``,
``A`` of ``saved_bytes`` and ``c = cut_bytes``::

    T_s(i, j) = (P_j - P_i) / flops_s  +  (N_j - N_i) d_s  +  o_s
                +  comm(c_i, device of stage s-1)  +  comm(c_j, device of s)
    d_s = dispatch_forward + dispatch_backward,   o_s = action_overhead   (of stage s's device)
    comm(c, d) = 0 if c == 0 else 2 * (d.latency + d.message_overhead + c / d.bandwidth)
    M_s(i, j) = kappa (W_j - W_i) + (V_j - V_i) + inflight_s (A_j - A_i) + c_i + c_j  <=  cap_s

Times are seconds per micro-batch; the activation crosses a link forward and its gradient comes
back over the same link, hence the 2. ``d_s`` and ``o_s`` are the device's fixed costs (0 unless
calibrated): every operation a node dispatches pays ``d_s`` whatever its size, and each forward
with its backward ``o_s`` on top; `Costs.compute_time` includes both, and ``X_s = P / flops_s +
N d_s`` (`Costs.prefix_time`) makes ``T_s`` a difference of prefixes again, plus constants. The first stage has no link in and the last none out (cut 0
comes from the data loader, cut ``n`` goes to the loss), but ``c_0`` and ``c_n`` still count as
buffers if the graph gives them (`LinearGraph` makes them 0). ``kappa`` is
`MemoryModel.bytes_per_param_byte` and ``inflight_s`` is `Problem.inflight`; see
[Note: stage memory] in `partition.memory`. Under ``MemoryModel.recompute`` a stage holds ``A``
once and ``inflight_s`` copies of its input ``c_i`` more, and its time adds its forward again
([Note: recompute]; `Costs.act`, `Costs.hold`: the search's ``mkey_i`` subtracts ``(1 +
inflight_s) c_i``). The one implementation of ``T``, ``M`` and the units
below is `Costs` (`partition.algorithms.problem`, shared by every algorithm).

The objective, in this order (lexicographic):

1. the bottleneck ``B = max_s T_s`` over splits whose every stage fits its cap, smallest first;
   splits within ``1e-12`` relative of the least, ``B*``, are *ties* (float noise);
2. then the fewest *idle* stages: ``[i, j)`` is idle when its compute is at most
   ``tau = IDLE_SHARE * P_n / k`` (1 % of an even share), tested as ``P_i >= P_j - tau``;
3. then the total time ``S = sum_s T_s``, least first;
4. then the communication ``sum of c_{b_s}`` over the interior cuts ``0 < s < k``, least first;
5. then the peak memory ``max_s M_s / cap_s``, least first.

Why (2): (3) alone prefers the narrowest cuts, and when the bottleneck leaves the other stages
slack (one node sets it, or links dominate a small model) the narrowest are often those between
the inputs and their shape queries — stages with nothing to do. On GPT-2 small over 8 A100s,
where the LM head sets ``B``, 4 of the 8 stages held an input, a ``size`` or an ``arange``
(issue 18). Such a split is optimal for the model and useless to a user; with (2) the spare
devices take work, at no cost to ``B``. Whether any split can use them is the plan's to say
(`partition.idle`).

Why (3): a 1F1B or GPipe step with ``m`` micro-batches takes about ``(m - 1) B + S`` (the steady
state, then the fill and drain), so among splits of one bottleneck the one with less work on the
slow devices and fewer slow links is faster. Without (3) a baseline could tie the bottleneck and
still beat "optimal" on the predicted step (the LM head of a GPT, alone on the last stage, set
the bottleneck of every split over H100s and A100s; the least-communication tie left the work on
the A100s). It stays a tie-break, not a trade: a split with a larger bottleneck can still have a
smaller ``(m - 1) B + S`` when ``m`` is not much larger than ``k`` and the devices differ (on the
Llama-7B shape over 4 H100s + 4 A100s with ``m = k = 8``, the best split at block boundaries has
a 10 % larger bottleneck, lets the H100s take more, and predicts a 5 % faster step;
`benchmarks/results/partitioners.txt`). ``objective="step"`` makes that trade, exactly:
[Note: step objective] in `partition.algorithms.step`.

*Comparing S exactly.* ``S`` is a sum of quotients; two splits with equal ``S`` in exact
arithmetic may differ in the last bits, and a relative tolerance (``|S - S'| <= eps S``) is not
transitive, so "least ``S``, then least communication" would not even be well defined. ``S`` is
therefore compared in integer *units* of ``u`` seconds (`Costs.unit`), each term rounded once::

    units(split) = sum_s  R_s(b_{s+1}) - R_s(b_s) + L_{s-1}(b_s) + L_s(b_{s+1})
    R_s(j) = rint(X_s(j) / u)          L_s(j) = rint(comm(c_j, device of s) / u)

— the same separation as ``T_s``, so a dynamic programme adds the same integers as a brute force,
exactly. The overheads ``o_s`` are left out: every split pays each once, so they shift every
``S`` alike. ``u`` is the power of two ``2^(e + m - 52)`` with ``2^e > max_s (X_s(n) + o_s)``
plus the slowest link (so a stage is at most ``2^(53 - m)`` units) and ``2^m > k + 3``, so that every
partial sum of a dynamic programme stays below ``2^53``. Two splits are *S-tied* iff their units are equal: always when they differ
only in where zero-compute nodes between equal cuts go or, on identical devices, in where compute
goes (the ``R`` terms telescope); never when their ``S`` differ by more than ``4 k u`` (each
split's units are within ``2 k u`` of its ``S``; ``4 k u`` is about ``1.5e-11`` of the largest
stage time on 64 stages). So the S-ties are a relative epsilon of that size, but as an
equivalence, which makes (2)-(5) a total preorder and exact.

``perfect_balance = sum(compute) / sum over stages of flops_s`` is a lower bound of (1).

Interleaved schedules: with ``v`` virtual stages per device and ``p`` devices there are ``p * v``
stages; stage ``s`` runs on device ``s % p``. The partitioner gives each stage the cap
``device.memory / v`` (a *share*): per stage, so that the memory check stays separable. That is
conservative — a device's ``v`` chunks each fit their share, so together they fit the device, but
a split where one chunk borrows another's headroom is not considered (an exact per-device check
couples stages ``s, s + p, ...`` and would make the search pseudo-polynomial in bytes).
`evaluate` reports both: ``fits`` is the physical test, every device's chunks together within its
memory (for ``v = 1`` the same as every stage within its cap), and ``within_shares`` the test the
partitioner enforces. ``peak_memory`` is per share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from partition.algorithms.problem import Problem
from partition.errors import PlanError

__all__ = ["Bounds", "Evaluation", "check_bounds", "evaluate"]

Bounds = tuple[int, ...]
"""A split: ``num_stages + 1`` node indices, ``0 = b_0 < b_1 < ... < b_k = n``."""


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Every term of the objective for one split; see [Note: objective]."""

    bounds: Bounds
    stage_times: tuple[float, ...]
    """``T_s``: compute + communication seconds per micro-batch."""
    stage_compute_times: tuple[float, ...]
    """Compute and fixed costs (all but the links), seconds per micro-batch."""
    stage_comm_times: tuple[float, ...]
    stage_memory: tuple[float, ...]
    """``M_s`` in bytes; the sum of `stage_memory_parts`."""
    stage_memory_parts: tuple[dict[str, float], ...]
    """Per stage: ``weights``, ``gradients``, ``optimizer`` (with any master copy), ``activations``
    (all in-flight micro-batches) and ``buffers`` (received activation and gradient) bytes."""
    stage_inflight: tuple[int, ...]
    caps: tuple[float, ...]
    """Per stage, the bytes the partitioner allows it: its device's memory over ``virtual``."""
    device_memory: tuple[float, ...]
    """Per device, the sum of its stages' ``M_s`` (one stage each unless interleaved)."""
    device_caps: tuple[float, ...]
    """Per device, its memory."""
    bottleneck: float
    """The objective: the largest ``T_s``."""
    total_time: float
    """``S``, the sum of the ``T_s`` (the second tie-break; compared in `Costs.split_units`)."""
    fits: bool
    """Whether every device's stages together fit its memory (what a run needs)."""
    within_shares: bool
    """Whether every stage fits its cap, what the partitioner enforces; implies `fits`, and is the
    same test unless interleaved (see [Note: objective])."""
    comm_bytes: float
    """Bytes per micro-batch crossing the interior cuts (the third tie-break)."""
    peak_memory: float
    """The largest ``M_s / cap_s`` (the fourth tie-break); above 1 when a stage exceeds its cap."""
    perfect_balance: float
    """The lower bound ``sum(compute) / sum(flops over stages)``."""
    idle_stages: int = 0
    """Stages doing at most `IDLE_SHARE` of an even share of the compute (the first tie-break)."""

    @property
    def balance_ratio(self) -> float:
        """``bottleneck / perfect_balance``: 1 is a perfect split."""
        if self.perfect_balance == 0:
            return 1.0 if self.bottleneck == 0 else float("inf")
        return self.bottleneck / self.perfect_balance

    @property
    def key(self) -> tuple[float, int, float, float, float]:
        """The objective as a tuple, smaller is better: (bottleneck, idle_stages, total_time,
        comm_bytes, peak_memory). Compared plainly it has no tie tolerances; see
        [Note: objective]."""
        return (
            self.bottleneck,
            self.idle_stages,
            self.total_time,
            self.comm_bytes,
            self.peak_memory,
        )


def check_bounds(problem: Problem, bounds: Sequence[int]) -> Bounds:
    """``bounds`` as a tuple of ints after checking it is a split of ``problem``."""
    n, k = len(problem.graph), problem.num_stages
    b = tuple(int(x) for x in bounds)
    if len(b) != k + 1:
        raise PlanError(f"a split into {k} stages needs {k + 1} bounds, got {len(b)}: {b}")
    if b[0] != 0 or b[-1] != n:
        raise PlanError(f"bounds must start at 0 and end at {n} (the node count), got {b}")
    for s in range(k):
        if b[s + 1] <= b[s]:
            raise PlanError(f"stage {s} is empty or reversed: bounds[{s}:{s + 2}] = {b[s : s + 2]}")
    return b


def evaluate(problem: Problem, bounds: Sequence[int]) -> Evaluation:
    """Every stage's time, memory and the objective of the split ``bounds``.

    Raises:
        PlanError: ``bounds`` is not a split of the problem's nodes into ``num_stages`` stages.
    """
    b = check_bounds(problem, bounds)
    costs = problem.costs
    k = problem.num_stages
    compute, comm, memory, parts = [], [], [], []
    mm = problem.memory
    grads = 0.0 if mm.optimizer == "none" else 1.0
    for s in range(k):
        i, j = np.int64(b[s]), np.int64(b[s + 1])
        compute.append(float(costs.compute_time(s, i, j)))
        comm.append(float(costs.comm_time(s, i, j)))
        params, acts, buffers = costs.memory_parts(s, i, j)
        memory.append(float((params + acts) + buffers))
        w, v = float(costs.W[j] - costs.W[i]), float(costs.V[j] - costs.V[i])
        parts.append(
            {
                "weights": w + v,  # parameters and buffers
                "gradients": grads * w,  # parameters only, as the optimizer state
                "optimizer": float(params) - (1.0 + grads) * w - v,
                "activations": float(acts),
                "buffers": float(buffers),
            }
        )
    times = [float(t) for t in costs.split_times(b)]
    caps = problem.caps
    total_flops = float(costs.flops.sum())
    p = len(problem.devices)
    device_memory = tuple(
        sum(m for s, m in enumerate(memory) if problem.stage_rank(s) == d) for d in range(p)
    )
    device_caps = tuple(float(d.memory) for d in problem.devices)
    shares = all(m <= cap for m, cap in zip(memory, caps, strict=True))
    return Evaluation(
        bounds=b,
        stage_times=tuple(times),
        stage_compute_times=tuple(compute),
        stage_comm_times=tuple(comm),
        stage_memory=tuple(memory),
        stage_memory_parts=tuple(parts),
        stage_inflight=problem.inflight,
        caps=caps,
        device_memory=device_memory,
        device_caps=device_caps,
        bottleneck=max(times),
        total_time=float(sum(times)),
        fits=shares or all(m <= cap for m, cap in zip(device_memory, device_caps, strict=True)),
        within_shares=shares,
        comm_bytes=float(sum(costs.c[x] for x in b[1:-1])),
        peak_memory=max(m / cap for m, cap in zip(memory, caps, strict=True)),
        perfect_balance=float(costs.P[-1]) / total_flops,
        idle_stages=costs.split_idle(b),
    )
