"""The space the configuration search of ``plan --auto`` walks: micro-batch counts, device
pools, analyses between two traces, and the narrow cuts a screening solve uses; see
[Note: the configuration search] in `partition.planning.auto`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from partition.devices import Device
from partition.graph import LinearGraph
from partition.planning.analysis import Analysis

__all__ = ["devices_for", "divisors", "interpolated", "narrow_cuts"]

_AFFINE = ("compute", "forward", "saved_bytes", "cut_bytes")


def divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def devices_for(pool: Sequence[Device], count: int) -> tuple[Device, ...]:
    """The first ``count`` devices of ``pool``, then copies of the last (renamed ``:i``)."""
    given = tuple(pool[:count])
    last = pool[-1]
    base = last.name.rsplit(":", 1)[0]
    return given + tuple(replace(last, name=f"{base}:{i}") for i in range(len(given), count))


def interpolated(lo: Analysis, hi: Analysis, m: int) -> Analysis | None:
    """The analysis at ``m`` micro-batches from two traced at other counts, each node's FLOPs,
    saved activations and cut widths affine in the micro-batch's rows (a position embedding's
    part does not grow with them, the rest grows in proportion); None when the two traces
    differ in their nodes (then ``m`` must be traced itself)."""
    if m in (lo.microbatches, hi.microbatches):
        return lo if m == lo.microbatches else hi
    a, b = lo.graph, hi.graph
    if a.names != b.names or lo.microbatches == hi.microbatches:
        return None
    ra, rb, r = 1.0 / lo.microbatches, 1.0 / hi.microbatches, 1.0 / m  # rows, in batches
    t = (r - rb) / (ra - rb)
    changes = {
        name: np.maximum(getattr(b, name) + t * (getattr(a, name) - getattr(b, name)), 0.0)
        for name in _AFFINE
    }
    return replace(lo, graph=replace(a, **changes), microbatches=m)


def narrow_cuts(graph: LinearGraph, count: int) -> list[int] | None:
    """``count`` screening cuts, rising: the narrowest cut in each of ``count`` windows of equal
    compute (ties to the earlier); None when the graph has no more cuts than that.

    The narrowest cuts of the whole graph would not do: they crowd where nothing computes (the
    inputs and their shape queries), and a split restricted to them puts all the work on one
    stage, so screening would rank every configuration alike (GPT-2 over 4 A100s with 32
    micro-batches priced at 3x its step, and lost to 1 micro-batch).
    """
    widths = np.asarray(graph.cut_bytes[1:-1], dtype=np.float64)
    if widths.size <= count:
        return None
    prefix = np.cumsum(np.asarray(graph.compute, dtype=np.float64))
    done, total = prefix[:-1], float(prefix[-1])  # done[k]: the compute before cut k + 1
    share = done / total if total > 0 else np.arange(widths.size) / widths.size
    window = np.minimum((share * count).astype(np.int64), count - 1)
    order = np.lexsort((np.arange(widths.size), widths, window))  # by window, width, position
    _, first = np.unique(window[order], return_index=True)
    return sorted(int(order[i]) + 1 for i in first)
