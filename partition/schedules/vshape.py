"""The V-shaped schedules: ZB-V and DualPipeV, 2 stages per rank in the V placement.

Both put rank r's stages at ``r`` and ``2p - 1 - r`` (see [Note: placement] in
`partition.schedules.placement`): a micro-batch goes down the ranks through the first half of
the stages and back up through the second, so rank 0 holds the first stage and the last, and
the middle pair (``p - 1``, ``p``) meets on rank ``p - 1`` with no message between them.

ZB-V (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", section 6; pipelining's
``ScheduleZBVZeroBubble``) splits every backward into I and W and fills the warm-up and the
drain with W: with F = I = W and ``m >= 2p`` it has no bubble beyond the pipeline's fill and
drain of one stage, at 1F1B's activation memory. 2 ranks, 4 micro-batches, 4 stages::

    rank 0 | 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 ...
    rank 1 | 1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 ...

DualPipeV (DeepSeek-V3's DualPipe cut in half; pipelining's ``ScheduleDualPipeV``) runs, in
its steady state, a forward of one stage and a full backward of the rank's other stage as one
overlapped pair, and splits backwards into I and W only in the drain.

[Note: DualPipeV's overlapped pair]
DualPipe overlaps the pair's forward with the other's backward so that one's communication
(an MoE all-to-all) hides under the other's compute; pipelining's runtime still runs the pair's
two halves one after another on one stream. Here the pair is two adjacent actions, the forward
first (``0F5 3B1``), not a new kind: every tool (the checks, the simulator, the in-flight
counts, the runtime) already knows F and B, the text form stays ``<stage><code><mb>``, and a
pair whose halves belong to different stages needs no two-stage action. The simulator prices a
pair at ``F + B``, and, as the runtime runs it, lets the forward start before the backward's
gradient has arrived. An overlapped pair cannot: it starts when both inputs are there.
`partition.schedules.communication.overlap_pairs` writes the schedule that way (each pair's
backward receive moved ahead of its forward), and with it the simulator gives DeepSeek's published DualPipe bubble exactly,
``(PP/2 - 1)(F&B + B - 3W)`` with ``PP = 2p`` stages and ``F&B = F + B``, i.e.
``(p - 1)(F + 2B - 3W)``, whenever ``F <= I`` and ``W <= I`` (``I = B - W``; checked for p in
2..6 by ``tests/partition/test_vshape.py``). The schedule as built waits less and its bubble is
never larger: with ``F = I = W`` it is ``(p - 1) F``, the fill alone, against the published
``2 (p - 1) F``. That is the bubble the runtime sees, having no overlap to gain from a pair.
"""

from __future__ import annotations

from partition.schedules.schedule import Action, Kind, Schedule, _bulk, _check_sizes

__all__ = ["build_v", "dualpipev", "zero_bubble_v"]


def _finish(name: str, p: int, m: int, rows: list[list[Action]]) -> Schedule:
    """The schedule of ``rows``, less the actions of micro-batches ``m`` and above (each builder
    plans for at least as many micro-batches as fill its pipeline, as pipelining does)."""
    kept = tuple(tuple(a for a in row if a.microbatch < m) for row in rows)
    return Schedule(name, p, 2 * p, m, kept, placement="v")


@_bulk
def zero_bubble_v(num_ranks: int, m: int) -> Schedule:
    """ZB-V: see the module docstring. Any ``m >= 1``.

    Rank r's list, with ``c0 = r`` (the way down) and ``c1 = 2p - 1 - r`` (the way up): warm-up
    ``2 (p - r) - 1`` forwards of c0, then ``r`` pairs (F c1, F c0), then ``p - r`` triples
    (F c1, I c1, W c1); the steady state repeats (F c0, I c0, W c0, F c1, I c1, W c1); the drain
    runs the remaining I, deferring W to the end.
    """
    _check_sizes("zb-v", num_ranks, m)
    n = max(2 * num_ranks - 1, m)
    return _finish("zb-v", num_ranks, m, [_zbv_rank(num_ranks, n, r) for r in range(num_ranks)])


def _zbv_rank(p: int, n: int, r: int) -> list[Action]:
    c0, c1 = r, 2 * p - 1 - r
    count = {(c, k): 0 for c in (c0, c1) for k in (Kind.F, Kind.I, Kind.W)}
    row: list[Action] = []

    def add(stage: int, *kinds: Kind) -> None:
        for kind in kinds:
            row.append(Action(stage, kind, count[stage, kind]))
            count[stage, kind] += 1

    for _ in range(2 * (p - r) - 1):
        add(c0, Kind.F)
    for _ in range(r):
        add(c1, Kind.F)
        add(c0, Kind.F)
    for _ in range(p - r):
        add(c1, Kind.F, Kind.I, Kind.W)
    while count[c1, Kind.F] < count[c0, Kind.F] or count[c0, Kind.F] < n:
        if count[c0, Kind.F] < n:
            add(c0, Kind.F)
        add(c0, Kind.I, Kind.W)
        add(c1, Kind.F, Kind.I, Kind.W)
    for _ in range(r):
        add(c0, Kind.I)
        add(c1, Kind.I)
    for _ in range(p - r):
        add(c0, Kind.I, Kind.W)
    for c in (c1, c0):
        while count[c, Kind.W] < count[c, Kind.I]:
            add(c, Kind.W)
    return row


@_bulk
def dualpipev(num_ranks: int, m: int) -> Schedule:
    """DualPipeV: see the module docstring and [Note: DualPipeV's overlapped pair]. Any
    ``m >= 1`` (pipelining's class needs ``m >= 2p``: fewer drop the actions of the micro-batches
    that do not exist from the schedule for ``2p``, which `check.validate` accepts).

    Rank r, with ``c0 = r`` and ``c1 = 2p - 1 - r``: ``2 (p - r - 1)`` forwards of c0; ``r + 1``
    pairs (F c0, F c1); ``p - r - 1`` of (I c1, a pending W, F c1); ``m - 2p + r + 1`` steady
    rounds of two overlapped pairs (F c0 & B c1, F c1 & B c0); ``p - r - 1`` of (B c1, F c1 & B c0); ``r + 1`` of (B c1, B c0),
    switching to I from the middle on; ``p - r - 1`` of (pending W, B c0); the pending W.
    """
    _check_sizes("dualpipev", num_ranks, m)
    n = max(2 * num_ranks, m)
    rows = [_dualpipev_rank(num_ranks, n, r) for r in range(num_ranks)]
    return _finish("dualpipev", num_ranks, m, rows)


def _dualpipev_rank(p: int, n: int, r: int) -> list[Action]:
    c0, c1 = r, 2 * p - 1 - r
    fwd = {c0: 0, c1: 0}
    bwd = {c0: 0, c1: 0}
    pending: list[Action] = []  # the W owed for each I, oldest first
    row: list[Action] = []

    def f(stage: int) -> None:
        row.append(Action(stage, Kind.F, fwd[stage]))
        fwd[stage] += 1

    def b(stage: int, split: bool = False) -> None:
        i = bwd[stage]
        row.append(Action(stage, Kind.I if split else Kind.B, i))
        if split:
            pending.append(Action(stage, Kind.W, i))
        bwd[stage] += 1

    def w() -> None:
        if pending:
            row.append(pending.pop(0))

    for _ in range(2 * (p - r - 1)):
        f(c0)
    for _ in range(r + 1):
        f(c0)
        f(c1)
    for _ in range(p - r - 1):
        b(c1, split=True)
        w()
        f(c1)
    for _ in range(n - 2 * p + r + 1):  # the pairs: see [Note: DualPipeV's overlapped pair]
        f(c0)
        b(c1)
        f(c1)
        b(c0)
    for _ in range(p - r - 1):
        b(c1)
        f(c1)
        b(c0)
    steps, split = r + 1, False
    for i in range(steps):  # I and W from the middle on
        split = split or (i == steps // 2 and r % 2 == 1)
        b(c1, split)
        split = split or (i == steps // 2 and r % 2 == 0)
        b(c0, split)
    for _ in range(p - r - 1):
        w()
        b(c0, split)
    while pending:
        w()
    return row


def build_v(name: str, num_ranks: int, m: int) -> Schedule:
    """The V schedule ``name`` (``zb-v`` or ``dualpipev``) for ``num_ranks`` and ``m``."""
    return {"zb-v": zero_bubble_v, "dualpipev": dualpipev}[name](num_ranks, m)
