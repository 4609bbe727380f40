"""Plots of plans: per-stage time and memory against capacity, and splits side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from partition.plan import Plan

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["compare_splits", "plot_memory", "plot_stage_times", "plot_stages"]

_PARTS = (
    ("weights", "#4C72B0"),
    ("gradients", "#8172B3"),
    ("optimizer", "#937860"),
    ("activations", "#DD8452"),
    ("buffers", "#BBBBBB"),
)


def plot_stage_times(plan: Plan, ax: Axes, *, label: bool = True) -> None:
    """Stacked bars of each stage's compute and communication time per micro-batch (ms)."""
    x = [s.index for s in plan.stages]
    compute = [s.compute_time * 1e3 for s in plan.stages]
    comm = [s.comm_time * 1e3 for s in plan.stages]
    ax.bar(x, compute, color="#4C72B0", label="compute" if label else None)
    ax.bar(x, comm, bottom=compute, color="#555555", label="communication" if label else None)
    ax.axhline(
        plan.perfect_balance * 1e3,
        color="green",
        linestyle="--",
        linewidth=1,
        label="perfect balance" if label else None,
    )
    ax.set_xticks(x, [f"{s.index}\n{s.device.name}" for s in plan.stages], fontsize=8)
    ax.set_ylabel("ms per micro-batch")
    ax.set_title(
        f"{plan.algorithm}: bottleneck {plan.bottleneck * 1e3:.2f} ms ({plan.bottleneck / plan.perfect_balance:.3f}× perfect)"
    )
    if label:
        ax.legend(fontsize=8)


def plot_memory(plan: Plan, ax: Axes, *, label: bool = True) -> None:
    """Stacked bars of each stage's memory (GiB) by part, with its device's capacity marked."""
    x = [s.index for s in plan.stages]
    bottom = [0.0] * len(x)
    for part, colour in _PARTS:
        values = [s.memory.get(part, 0.0) / 2**30 for s in plan.stages]
        ax.bar(x, values, bottom=bottom, color=colour, label=part if label else None)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for s in plan.stages:
        ax.hlines(s.capacity / 2**30, s.index - 0.4, s.index + 0.4, colors="red", linewidth=2)
    ax.plot([], [], color="red", linewidth=2, label="capacity" if label else None)
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("stage")
    ax.set_ylabel("GiB")
    ax.set_title(f"memory under {plan.schedule}, {plan.microbatches} micro-batches")
    ax.set_ylim(0, max(max(bottom), max(s.capacity for s in plan.stages) / 2**30) * 1.35)
    if label:
        ax.legend(fontsize=8, ncols=3, loc="upper center")


def plot_stages(plan: Plan, *, path: str | None = None) -> Figure:
    """Time and memory of every stage of ``plan``, side by side; writes a PNG when ``path``."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    plot_stage_times(plan, left)
    plot_memory(plan, right)
    if path:
        fig.savefig(path, dpi=110)
    return fig


def compare_splits(
    plans: Mapping[str, Plan] | Sequence[Plan], *, path: str | None = None
) -> Figure:
    """Per-stage time of several plans of one model (e.g. optimal and the baselines), one row each."""
    import matplotlib.pyplot as plt

    items = list(plans.items()) if isinstance(plans, Mapping) else [(p.algorithm, p) for p in plans]
    fig, axes = plt.subplots(
        len(items),
        1,
        figsize=(10, 2.6 * len(items)),
        sharex=True,
        sharey=True,
        constrained_layout=True,
    )
    axes = [axes] if len(items) == 1 else list(axes)
    for i, (ax, (_, plan)) in enumerate(zip(axes, items, strict=True)):
        plot_stage_times(plan, ax, label=i == 0)
    if path:
        fig.savefig(path, dpi=110)
    return fig
