"""How ``pipepart run`` shows a finished run: a table of steps, the notes, where the weights came
from and the check's verdict; or one JSON object, every non-finite number spelled out."""

from __future__ import annotations

import math
from typing import Any

from partition.units import format_time
from pipeline.cli.flags import console
from pipeline.launch.results import RunResult

__all__ = ["check_status", "finite_json", "print_run"]


def print_run(model: str, result: RunResult) -> None:
    """The run as a table of steps, where the weights came from, and the check's verdict."""
    from rich.table import Table

    table = Table(title=f"{model} on {result.ranks} ranks")
    table.add_column("step", justify="right")
    table.add_column("time", justify="right")
    table.add_column("loss", justify="right")
    for row in result.steps:
        table.add_row(
            str(row.step),
            format_time(row.time),
            f"{row.loss:.6f}" if row.loss is not None else "–",
        )
    out = console()
    out.print(table)
    if result.resumed_from:
        out.print(f"resumed from step {result.resumed_from} (the newest complete checkpoint)")
    if result.restarts:
        out.print(f"ranks restarted {result.restarts} time(s) after a failure")
    for note in result.notes:
        out.print(note)
    sources = sorted({s for ranks in result.weights.values() for s in ranks})
    if sources:
        out.print(f"weights from: {', '.join(sources)} (see --weights)")
    check = result.check
    if check is not None:
        shown = ", ".join(
            f"{k} {_fmt_diff(getattr(check, k))}" for k in ("loss", "grads", "params", "buffers")
        )
        verdict = (
            "[green]passed[/green]"
            if check.passed
            else f"[red]FAILED[/red]: {'; '.join(check.failures)}"
        )
        out.print(
            f"largest relative difference from the factory's model trained on one process: "
            f"{shown} (tolerance {check.tolerance:g}) — {verdict}"
        )


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"``
    (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return _fmt_diff(value) if not value < 0 else "-inf"
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _fmt_diff(d: float) -> str:
    return "nan" if math.isnan(d) else ("inf" if math.isinf(d) else f"{d:.3g}")


def check_status(result: RunResult) -> int:
    """1 when --check ran and failed; see [Note: an independent check] in `pipeline.launch.reference`."""
    return 1 if result.check is not None and not result.check.passed else 0
