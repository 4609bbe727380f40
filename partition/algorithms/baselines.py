"""Baseline partitioners to compare with: uniform node counts, balanced parameters, balanced time.

Each takes a `Problem` and returns bounds; none looks at memory (`evaluate` says whether the
split fits) or at communication.

* `uniform` — equal node counts, the node-level analogue of Megatron-LM's uniform layers.
* `params` — the contiguous split minimising the largest stage parameter bytes, what DeepSpeed's
  ``partition_method="parameters"`` aims at (exact: bisection over greedy prefix packing).
* `time` — torchgpipe's ``balance_by_time``: the block-partition heuristic of Bárány and
  Grinberg ("Block partitions of sequences", 2015) on per-node compute, as torchgpipe runs it
  (costs shifted by their minimum and scaled to [0, 1]; stop when the largest block exceeds the
  smallest by at most one unit). Device speeds are ignored, as in torchgpipe.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from partition.algorithms.objective import Bounds
from partition.algorithms.problem import Problem
from partition.errors import InfeasibleError

__all__ = ["params", "time", "uniform"]

FloatArray = npt.NDArray[np.float64]


def _check(problem: Problem) -> tuple[int, int]:
    n, k = len(problem.graph), problem.num_stages
    if k > n:
        raise InfeasibleError(f"{k} stages but only {n} nodes; every stage needs at least one node")
    return n, k


def uniform(problem: Problem) -> Bounds:
    """Equal node counts per stage (``n // k`` or one more; the later stages take the extra)."""
    n, k = _check(problem)
    return tuple(s * n // k for s in range(k + 1))


def params(problem: Problem) -> Bounds:
    """The contiguous split with the least largest-stage parameter bytes (each stage greedy)."""
    n, k = _check(problem)
    prefix = np.concatenate([[0.0], np.cumsum(problem.graph.param_bytes, dtype=np.float64)])
    lo = max(float(problem.graph.param_bytes.max()), prefix[-1] / k)
    best = _pack(prefix, n, k, prefix[-1])
    assert best is not None  # one bound of the whole sum always packs
    hi = _largest(prefix, best)
    lo = min(lo, hi)
    for _ in range(200):
        if hi <= lo * (1 + 1e-12) or hi == 0.0:
            break
        mid = 0.5 * (lo + hi)
        split = _pack(prefix, n, k, mid)
        if split is None:
            lo = mid
        else:
            best, hi = split, _largest(prefix, split)
    return best


def _largest(prefix: FloatArray, bounds: Bounds) -> float:
    b = np.asarray(bounds)
    return float(np.max(prefix[b[1:]] - prefix[b[:-1]]))


def _pack(prefix: FloatArray, n: int, k: int, limit: float) -> Bounds | None:
    """Greedy: each stage takes the most nodes within ``limit``, leaving one node per later stage.

    Greedy packing covers all nodes in at most ``k`` stages iff any split does; splitting a stage
    never raises the largest sum, so ``k`` non-empty stages exist then too.
    """
    bounds = [0]
    for s in range(k):
        start = bounds[-1]
        if s == k - 1:
            end = n
        else:
            end = int(np.searchsorted(prefix, prefix[start] + limit, "right")) - 1
            end = min(max(end, start + 1), n - (k - 1 - s))
        if prefix[end] - prefix[start] > limit:
            return None
        bounds.append(end)
    return tuple(bounds)


def time(problem: Problem) -> Bounds:
    """torchgpipe's block partition of per-node compute (see the module docstring)."""
    n, k = _check(problem)
    cost = np.asarray(problem.graph.compute, dtype=np.float64)
    low, span = float(cost.min()), float(cost.max() - cost.min())
    normal = (cost - low) / span if span > 0 else np.zeros(n)
    prefix = np.concatenate([[0.0], np.cumsum(normal)])
    splits = [n // k * (x + 1) for x in range(k - 1)] + [n]

    def sizes() -> FloatArray:
        b = np.asarray([0, *splits])
        return prefix[b[1:]] - prefix[b[:-1]]

    for _ in range(50 * n * k + 1000):
        size = sizes()
        # (1) a maximal block p; torchgpipe's max over (size, index) takes the last one.
        p = int(k - 1 - np.argmax(size[::-1]))
        while True:
            size = sizes()
            q = int(np.argmin(size))  # (2) a minimal block, the first one on ties
            if size[p] <= size[q] + 1:
                return (0, *splits)
            # (3) move one node into q from its neighbour h on the side of p.
            if p < q:
                h = q - 1
                if splits[h] - (splits[h - 1] if h > 0 else 0) <= 1:
                    return (0, *splits)  # would empty block h
                splits[h] -= 1
            else:
                h = q + 1
                if splits[h] - splits[q] <= 1:
                    return (0, *splits)
                splits[q] += 1
            if p == h:
                break
    return (0, *splits)  # pragma: no cover - the heuristic terminates long before
