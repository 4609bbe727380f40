"""Plots of plans: the bars are the plan's numbers, and a PNG is written when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from partition import plan_model
from partition.devices import parse_devices
from partition.models.examples import skipnet
from partition.plan import Plan
from partition.plots import compare_splits, plot_memory, plot_stage_times, plot_stages

matplotlib = pytest.importorskip("matplotlib")  # an optional dependency (dev)
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")


def _plan(algorithm: str = "optimal") -> Plan:
    model, inputs, _ = skipnet(batch=8)
    return plan_model(
        model, inputs, devices=parse_devices("cpu", 3), microbatches=4, algorithm=algorithm
    )


def test_the_time_bars_are_the_stage_times() -> None:
    plan = _plan()
    fig, ax = plt.subplots()
    plot_stage_times(plan, ax)
    bars = ax.patches
    assert len(bars) == 2 * plan.num_ranks  # compute, then communication stacked on it
    compute, comm = bars[: plan.num_ranks], bars[plan.num_ranks :]
    for s, stage in enumerate(plan.stages):
        assert compute[s].get_height() == pytest.approx(stage.compute_time * 1e3)
        assert comm[s].get_y() == pytest.approx(stage.compute_time * 1e3)
        assert comm[s].get_height() == pytest.approx(stage.comm_time * 1e3)
    assert "bottleneck" in ax.get_title()
    plt.close(fig)


def test_the_memory_bars_add_up_to_each_stage_total() -> None:
    plan = _plan()
    fig, ax = plt.subplots()
    plot_memory(plan, ax)
    k = plan.num_ranks
    tops = [0.0] * k
    for i, bar in enumerate(ax.patches):
        tops[i % k] = max(tops[i % k], bar.get_y() + bar.get_height())
    assert tops == pytest.approx([s.memory["total"] / 2**30 for s in plan.stages])
    plt.close(fig)


def test_figures_are_written_when_asked(tmp_path: Path) -> None:
    plan = _plan()
    fig = plot_stages(plan, path=str(tmp_path / "stages.png"))
    assert len(fig.axes) == 2 and (tmp_path / "stages.png").read_bytes()[:4] == b"\x89PNG"
    plt.close(fig)
    both = compare_splits(
        {"optimal": plan, "uniform": _plan("uniform")}, path=str(tmp_path / "c.png")
    )
    assert len(both.axes) == 2 and (tmp_path / "c.png").exists()
    plt.close(both)
    one = compare_splits([plan])
    assert len(one.axes) == 1
    plt.close(one)
