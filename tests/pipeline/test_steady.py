"""Steady under load: 30 steps at 4 ranks × 8 micro-batches for every schedule leave nothing behind.

For gpipe, 1f1b, interleaved (2 stages per rank) and zb-h1, every rank checks after each step:
every activation its stages made in the step is gone (a weakref to each stage output), the
executors keep nothing (`StageExecutor._saved`, the rank's inbox, outbox and held buffers) and
the transport is idle, the number of live tensors (`gc`) is the same as after step 2, and so is
the resident set (``/proc/self/statm``, not ``ru_maxrss``: a forked rank starts with its parent's
peak). The watched run saves a checkpoint every 5 steps (keeping 2), and its losses must equal,
bit for bit, those of a run of the same schedule that never saves. A control run leaks one stage
output per step on purpose and every detector must see it.

[Note: the RSS slack]
The model is a ribbon of elementwise layers: activations of 32 × 4096 fp32 per micro-batch
(512 KiB) for almost no FLOPs, so a leak is large and the steps are fast. A leak of one
activation per step grows the resident set by at least 512 KiB a step, 12 MiB over the 25 steps
after the first save; the slack, 2 MiB, is below 10 steps of it (asserted). glibc is told to map and
unmap blocks of 64 KiB and more (`_exact_rss`), so that the resident set follows what is alive.
Measured on the 2 shared cores (the whole file: 33 s): growth of -8 to 252 KiB on every rank and
schedule, saving or not; the first save, 3.2 to 3.9 MiB once; the control grew by 14 to 28 MiB
(its leaked output keeps its micro-batch's autograd graph alive too).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import nn

from pipeline.runtime.pipeline import Pipeline, PipelineOptions

RANKS, M, STEPS = 4, 8, 30
ROWS, WIDTH, DEPTH = 32, 4096, 8  # rows per micro-batch; see [Note: the RSS slack]
SLACK_KIB = 2048
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1))


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(width))
        self.b = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w + self.b)


class Ribbon(nn.Module):
    """Elementwise layers: big activations, few FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(WIDTH) for _ in range(DEPTH)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def ribbon() -> Any:
    x = torch.empty(ROWS * M, WIDTH) if torch.empty(0).is_meta else torch.randn(ROWS * M, WIDTH)
    return Ribbon(), (x,), F.mse_loss


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") // 1024


def _live_tensors() -> int:
    """Floating-point tensors alive among the objects made since `gc.freeze` (the pipeline's and
    the steps'); see [Note: what a save leaves for a moment]."""
    gc.collect()
    return sum(
        1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.is_floating_point()
    )


def _exact_rss() -> None:
    """Blocks of 64 KiB and more are mmapped and unmapped when freed, so that the resident set is
    what is alive, not glibc's cache (whose threshold otherwise grows with the frees)."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it stops the dynamic adjustment)
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _run(schedule: str, virtual: int, leak: bool, checkpoints: str | None) -> dict[str, Any]:
    options = PipelineOptions(schedule=schedule, microbatches=M, virtual=virtual)
    pipe = Pipeline(
        ribbon, options=options, optimizer_factory=functools.partial(torch.optim.SGD, lr=1e-3)
    )
    step_refs: list[weakref.ref[torch.Tensor]] = []
    leaked: list[torch.Tensor] = []

    def watch(_module: Any, _inputs: Any, outputs: Any) -> None:
        for t in outputs if isinstance(outputs, tuple) else (outputs,):
            step_refs.append(weakref.ref(t))
        if leak and len(step_refs) == 1:  # the control: keep one stage output per step
            leaked.append(outputs[0] if isinstance(outputs, tuple) else outputs)

    for s in pipe.my_stages:
        pipe.executors[s].module.register_forward_hook(watch)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(ROWS * M, WIDTH, generator=g), torch.randn(ROWS * M, WIDTH, generator=g)
    gc.collect()
    gc.freeze()  # counting 300,000 objects per step would take most of the test's time
    out: dict[str, list[Any]] = {"alive": [], "busy": [], "tensors": [], "rss": [], "loss": []}
    rank_executor = pipe.rank_executor
    for step in range(1, STEPS + 1):
        step_refs.clear()
        loss = pipe.step(x, y)
        out["loss"].append(None if loss is None else loss.item())
        if checkpoints is not None and step % 5 == 0:
            pipe.save(checkpoints, keep=2)
        gc.collect()
        out["alive"].append(sum(r() is not None for r in step_refs))
        out["busy"].append(
            not rank_executor.transport.idle
            or any(e._saved for e in pipe.executors.values())
            or bool(rank_executor._inbox or rank_executor._outbox or rank_executor._held)
        )
        out["tensors"].append(_live_tensors())
        out["rss"].append(_rss_kib())
    specs = [spec for s in pipe.my_stages for spec in pipe.stages[s].outputs]
    out["activation_kib"] = [min(spec.nbytes for spec in specs) / 1024]
    gc.unfreeze()
    leaked.clear()
    del pipe
    gc.collect()
    return out


def _steady(root: str) -> dict[str, dict[str, Any]]:
    _exact_rss()
    results = {}
    for name, virtual in SCHEDULES:
        results[name] = _run(name, virtual, leak=False, checkpoints=f"{root}/{name}")
        results[f"{name} unsaved"] = _run(name, virtual, leak=False, checkpoints=None)
    results["1f1b leaking"] = _run("1f1b", 1, leak=True, checkpoints=None)
    return results


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_thirty_steps_leave_nothing_behind(tmp_path: Path) -> None:
    ranks = run_ranks(RANKS, _steady, str(tmp_path), timeout=200)
    for rank, results in enumerate(ranks):
        for name, r in results.items():
            (activation_kib,) = r["activation_kib"]
            assert activation_kib == ROWS * WIDTH * 4 / 1024  # one micro-batch's activation
            assert 10 * activation_kib > SLACK_KIB  # see [Note: the RSS slack]
            flat_from = 5 if name in dict(SCHEDULES) else 2  # the step after the first save
            growth = r["rss"][-1] - r["rss"][flat_from]
            where = f"rank {rank}, {name}"
            if name.endswith("leaking"):  # every detector sees a leak of one output per step
                assert all(n >= 1 for n in r["alive"]), (where, r["alive"])
                assert r["tensors"][-1] > r["tensors"][2], (where, r["tensors"])
                assert growth > SLACK_KIB, (where, r["rss"])
                continue
            assert r["alive"] == [0] * STEPS, (where, r["alive"])
            assert not any(r["busy"]), (where, r["busy"])
            assert r["tensors"][2:] == [r["tensors"][2]] * (STEPS - 2), (where, r["tensors"])
            assert growth <= SLACK_KIB, (where, growth, r["rss"])
            if name in dict(SCHEDULES):  # saving every 5 steps changed no loss bit
                assert r["loss"] == results[f"{name} unsaved"]["loss"], where
                assert (rank == RANKS - 1) == all(loss is not None for loss in r["loss"]), where
        for name, _ in SCHEDULES:
            assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
                ".lock",  # the saving job's: see [Note: one job per folder]
                "step-00000025",
                "step-00000030",
            ]
