"""Every benchmark's quick mode runs and writes its JSON, so that benchmarks never rot.

Each ``benchmarks/NAME.py`` (not ``_private``) is run as ``main(["--quick", "--out", FILE])``
and its JSON is read back from that file and checked for the keys its README table is made from. No timing is
asserted: CI machines are shared. Correctness that a benchmark measures (the two runtimes'
losses in ``vs_pipelining``) is asserted, since it does not depend on the machine.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NAMES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_"))

# Top-level keys of each benchmark's JSON, and the keys of each of its rows ("rows" holds them;
# a top-level list is the rows itself). A benchmark not listed is only run and read back.
EXPECTED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "checkpoint_cost": (
        ("question", "command", "quick", "machine", "state_bytes_per_rank", "rows"),
        ("mode", "plain_step_s", "save_cost_s", "step_ratio", "peak_rss_growth_mib"),
    ),
    "dp_memory": (
        ("question", "command", "quick", "model", "machine", "rows"),
        ("pp", "dp", "reduction", "rank", "weights_mib", "peak_mib", "predicted_mib", "ratio"),
    ),
    "data_parallel": (
        ("question", "command", "quick", "machine", "workload", "link", "rows"),
        (
            "row",
            "pp",
            "dp",
            "when",
            "runtime",
            "step_s",
            "vs_ddp",
            "predicted_s",
            "peak_rss_growth_mib",
            "predicted_mib",
            "loss",
        ),
    ),
    "auto_search": (
        ("question", "command", "quick", "target_s", "rows"),
        ("objective", "searched", "search_s", "chosen", "plan_step_s", "top"),
    ),
    "step_objective": (
        ("question", "command", "quick", "summary", "rows"),
        ("schedule", "microbatches", "time_ratio", "same_split", "sim_gain"),
    ),
    "gpu_check": (
        ("question", "command", "quick", "device", "spec", "rows"),
        ("model", "stage", "predicted_s", "measured_s", "time_error", "predicted_bytes"),
    ),
    "split_backward": (
        ("question", "command", "quick", "workload", "machine", "grad_max_abs_diff", "rows"),
        ("variant", "wall_ms", "cpu_ms", "wall_ratio", "cpu_ratio"),
    ),
    "trace_cost": (("target_seconds_96_blocks", "rows"), ("blocks", "nodes", "trace_s", "cost_s")),
    "partition_speed": (("meta", "quick", "rows"), ()),
    "simulate_speed": (("quick", "machine", "verdict", "rows"), ("schedule", "ranks", "seconds")),
    "partitioners": ((), ("model", "devices", "rows")),
    "plan_accuracy": (
        ("question", "command", "quick", "machine", "device", "calibration", "targets", "rows"),
        (
            "group",
            "ranks",
            "splits",
            "plan_vs_fastest",
            "spearman",
            "median_error",
            "memory_median_error",
            "points",
        ),
    ),
    "runtime_overhead": (
        ("question", "command", "machine", "rows"),
        ("schedule", "measured_step_s", "ideal_step_s", "overhead"),
    ),
    "schedules": (
        ("question", "command", "quick", "machine", "summary", "gantt", "rows"),
        (
            "model",
            "ranks",
            "schedule",
            "microbatches",
            "step_s",
            "span_s",
            "bubble",
            "predicted_s",
            "predicted_bubble",
            "error",
            "compute_only_error",
            "peak_rss_mib",
            "rss_growth_mib",
            "predicted_activation_mib",
            "profile_s",
        ),
    ),
    "vs_pipelining": (
        ("question", "command", "quick", "machine", "summary", "rows"),
        (
            "model",
            "ranks",
            "schedule",
            "microbatches",
            "bounds",
            "step_s",
            "time_ratio",
            "memory_ratio",
            "memory_growth_ratio",
            "loss",
            "loss_abs_diff",
            "grad_max_rel_diff",
            "pipepart_breakdown_s",
        ),
    ),
}


def _rows(data: Any) -> list[Any]:
    return data if isinstance(data, list) else data.get("rows", [])


def test_every_benchmark_is_listed() -> None:
    """A new benchmark gets its expected keys here (and a section in benchmarks/README.md)."""
    readme = (BENCHMARKS / "README.md").read_text()
    assert [n for n in NAMES if n not in EXPECTED] == []
    assert [n for n in NAMES if f"benchmarks.{n}" not in readme] == []


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quick_mode_writes_its_json(name: str, tmp_path: Path) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    path = tmp_path / f"{name}.json"
    assert module.main(["--quick", "--out", str(path)]) == 0
    data = json.loads(path.read_text())  # every benchmark writes the JSON file it is given
    top, row_keys = EXPECTED.get(name, ((), ()))
    if top:
        assert isinstance(data, dict)
        assert [k for k in top if k not in data] == []
    rows = _rows(data)
    assert rows, f"{name} wrote no rows"
    for row in rows:
        assert [k for k in row_keys if k not in row] == []
    if name == "gpu_check":  # without CUDA, quick mode measures the CPU: every stage timed
        assert all(row["measured_s"] > 0 and row["predicted_s"] > 0 for row in rows)
    if name == "schedules":
        assert (path.parent / data["gantt"]).is_file()
    if name == "plan_accuracy":  # one point per split, pipepart's plan among them
        assert (path.parent / data["plot"]).is_file()
        for row in rows:
            assert sum(p["plan"] for p in row["points"]) == 1
            assert all(p["predicted_s"] > 0 and p["measured_s"] > 0 for p in row["points"])
    if name == "data_parallel":  # the same global batch and weights: the same first loss
        losses = [row["loss"] for row in rows]
        assert None not in losses and max(losses) - min(losses) < 1e-4, losses
    if name == "vs_pipelining":  # same modules, same batch: the same loss and gradients
        for row in rows:
            assert row["loss_abs_diff"] < 1e-5
            assert row["grad_max_rel_diff"] < 1e-4
