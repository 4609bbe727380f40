"""What a run reports: every step's loss and time, where the ranks' weights came from, the last
step's measured timeline and, with ``--check``, how far the pipeline is from the plain model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.launch.job import RankResult, TimedAction
from pipeline.launch.reference import CheckResult

__all__ = ["RunResult", "StepResult", "summarize"]


@dataclass(frozen=True)
class StepResult:
    """One step: its index, the slowest rank's time, and the loss (None if no rank had it)."""

    step: int
    time: float
    loss: float | None


@dataclass(kw_only=True)
class RunResult:
    """A finished run, as `run_pipeline` returns it (`to_json` is ``pipepart run --json``)."""

    ranks: int
    stages: dict[int, list[int]]
    """Rank -> the stages it ran."""
    weights: dict[int, list[str]]
    """Rank -> where its tensors came from (``factory``, ``checkpoint``, ``init``)."""
    steps: list[StepResult]
    timeline: list[TimedAction]
    """The last step's actions on every rank, seconds from the first one's start."""
    restarts: int = 0
    """How many times the local ranks were started again after a failure."""
    resumed_from: int = 0
    """The step the run started from (a checkpoint's), 0 for a fresh run."""
    check: CheckResult | None = None
    """The comparison with the plain model, when asked for."""
    notes: list[str] = field(default_factory=list)
    """What the ranks said the user should know (each line once)."""
    rank_results: list[RankResult] = field(default_factory=list, repr=False)
    """Every rank's own report, in rank order."""

    def to_json(self) -> dict[str, Any]:
        """The run as plain JSON values (``check`` only when it ran)."""
        out: dict[str, Any] = {
            "ranks": self.ranks,
            "stages": self.stages,
            "weights": self.weights,
            "steps": [asdict(s) for s in self.steps],
            "restarts": self.restarts,
            "resumed_from": self.resumed_from,
            "timeline": [[r, a, s, e] for r, a, s, e in self.timeline],
            "notes": list(self.notes),
        }
        if self.check is not None:
            out["check"] = self.check.to_json()
        return out


def summarize(results: Sequence[RankResult], steps: int, restarts: int = 0) -> RunResult:
    """The run's report from the ranks' own ones."""
    by_step = []
    for k in range(steps):
        losses = [r.losses[k] for r in results if r.losses[k] is not None]
        by_step.append(
            StepResult(
                step=k,
                time=max(r.times[k] for r in results),
                loss=losses[0] if losses else None,
            )
        )
    events = [e for r in results for e in r.timelines[-1]]
    t0 = min((e[2] for e in events), default=0.0)
    return RunResult(
        ranks=len(results),
        stages={r.rank: r.stages for r in results},
        weights={r.rank: r.weights for r in results},
        steps=by_step,
        timeline=[(r, a, s - t0, e - t0) for r, a, s, e in events],
        restarts=restarts,
        resumed_from=min(r.resumed_from for r in results),
        notes=list(dict.fromkeys(n for r in results for n in r.notes)),
        rank_results=list(results),
    )
