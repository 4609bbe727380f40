"""What does a checkpoint cost a training step, saved synchronously or in the background?

Question: how much longer does training take when every step also saves a checkpoint, with
``save_checkpoint`` (blocking) and with ``save_checkpoint_async`` (a host copy, then a
background thread); and how much memory does a save add over the rank's own state?

Run:  python -m benchmarks.checkpoint_cost [--quick] [--cycles N] [--out PATH]

Two gloo ranks train a GPT with Adam and run cycles of five steps, interleaved so that a slow
moment of the shared machine meets every mode alike::

    A  plain step                      (nothing in flight: the baseline)
    B  step + save_checkpoint          (the step's time includes the whole save)
       plain step, not timed
    C  step + save_checkpoint_async    (the call returns once the state is copied)
    A' plain step, then wait()         (runs beside the background write, then waits for it)

The extra seconds a save costs training are ``B - A`` (sync) and ``C + A' - 2 A`` (async: the
copy, the slowdown of the step it runs beside, and any wait). Each timed region starts and
ends with a barrier, and the slower rank's time counts; the medians over cycles are reported.
Peak RSS during a save is sampled every 2 ms (``/proc/self/statm``) and compared with the rank's
state (parameters, buffers, Adam's moments). Checkpoints go to a temporary directory with
``keep=1``; its filesystem is in the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from partition.models import examples
from pipeline.checkpoint.save_load import save_checkpoint, save_checkpoint_async
from pipeline.launch.spawn import spawn_ranks
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_cost.json"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def model(width: int, layers: int, seq: int, batch: int) -> Any:
    config = examples.GPTConfig(
        vocab_size=2048, block_size=seq, n_layer=layers, n_head=4, n_embd=width
    )
    return examples.gpt(config, batch=batch, seq=seq)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _Peak:
    """The highest RSS seen while the block runs, above what it was when it began."""

    def __enter__(self) -> _Peak:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _timed(fn: Callable[[], Any]) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _rank(factory: Any, microbatches: int, cycles: int, root: str) -> dict[str, Any]:
    pipe = Pipeline(
        factory,
        options=PipelineOptions(microbatches=microbatches),
        optimizer_factory=functools.partial(torch.optim.Adam, lr=1e-4),
    )
    spec = pipe.input_specs[0].shape
    x = torch.randint(0, 2048, (spec[0] * microbatches, spec[1]))

    def step() -> None:
        pipe.step(x, x)

    for _ in range(2):  # warm-up, Adam's state allocated
        step()
    state = sum(t.numel() * t.element_size() for t in pipe.state_dict().values())
    assert pipe.optimizer is not None
    state += sum(
        v.numel() * v.element_size()
        for s in pipe.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    rows: dict[str, list[float]] = {k: [] for k in ("A", "B", "C", "A_after_async")}
    peaks: dict[str, list[int]] = {"sync": [], "async": []}
    pending: list[Any] = []
    for _ in range(cycles):
        rows["A"].append(_timed(step))
        with _Peak() as peak:
            rows["B"].append(_timed(lambda: (step(), save_checkpoint(pipe, root, keep=1))))
        peaks["sync"].append(peak.growth)
        step()  # untimed: the second plain step of the cycle
        with _Peak() as peak:
            rows["C"].append(
                _timed(lambda: (step(), pending.append(save_checkpoint_async(pipe, root, keep=1))))
            )
            rows["A_after_async"].append(_timed(lambda: (step(), pending.pop().wait())))
        peaks["async"].append(peak.growth)
    return {"times": rows, "peaks": peaks, "state_bytes": state}


def _filesystem(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()[-1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, 3 cycles")
    parser.add_argument("--cycles", type=int, default=None, help="A B A C cycles (default 24)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        width, layers, seq, rows_per_mb, cycles = 128, 2, 32, 2, args.cycles or 3
    else:
        width, layers, seq, rows_per_mb, cycles = 512, 6, 64, 4, args.cycles or 24
    m = 4
    factory = functools.partial(model, width, layers, seq, rows_per_mb * m)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pipepart-ckpt-bench-") as tmp:
        fs = _filesystem(tmp)
        outcomes = spawn_ranks(_rank, 2, (factory, m, cycles, tmp), timeout=3600, pg_timeout=600)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        for o in failed:
            print(o.describe(), o.traceback, file=sys.stderr)
        return 1
    ranks = [o.value for o in outcomes]
    slow = {  # the slower rank's time, per cycle
        k: [max(r["times"][k][i] for r in ranks) for i in range(cycles)] for k in ranks[0]["times"]
    }
    plain = statistics.median(slow["A"])
    sync_cost = [b - a for a, b in zip(slow["A"], slow["B"], strict=True)]
    async_cost = [
        c + a2 - 2 * a for a, c, a2 in zip(slow["A"], slow["C"], slow["A_after_async"], strict=True)
    ]
    state = max(r["state_bytes"] for r in ranks)
    rows = []
    for mode, cost, peaks in [
        ("sync", sync_cost, [p for r in ranks for p in r["peaks"]["sync"]]),
        ("async", async_cost, [p for r in ranks for p in r["peaks"]["async"]]),
    ]:
        extra = statistics.median(cost)
        rows.append(
            {
                "mode": mode,
                "plain_step_s": plain,
                "save_cost_s": extra,
                "step_ratio": (plain + extra) / plain,
                "blocking_call_s": statistics.median(
                    [
                        b - a
                        for a, b in zip(
                            slow["A"], slow["B" if mode == "sync" else "C"], strict=True
                        )
                    ]
                ),
                "peak_rss_growth_mib": max(peaks) / 2**20,
                "peak_over_state": max(peaks) / state,
                "costs_s": cost,
            }
        )
    print(
        f"GPT width {width}, {layers} blocks, seq {seq}, {rows_per_mb * m} rows, 2 ranks, Adam; "
        f"{state / 2**20:.0f} MiB of state per rank; {cycles} cycles; checkpoints on {fs}"
    )
    print(
        f"{'mode':<7}{'plain step':>12}{'save costs':>12}{'ratio':>8}{'blocks':>10}{'peak RSS +':>12}{'/ state':>9}"
    )
    for r in rows:
        print(
            f"{r['mode']:<7}{r['plain_step_s'] * 1e3:>10.0f}ms{r['save_cost_s'] * 1e3:>10.0f}ms"
            f"{r['step_ratio']:>8.2f}{r['blocking_call_s'] * 1e3:>8.0f}ms"
            f"{r['peak_rss_growth_mib']:>10.0f}MiB{r['peak_over_state']:>9.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "question": "extra step time and peak memory of a checkpoint saved every step, sync vs async",
                "command": "python -m benchmarks.checkpoint_cost"
                + (" --quick" if args.quick else ""),
                "quick": args.quick,
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "load_average_1m": os.getloadavg()[0],
                    "filesystem": fs,
                },
                "model": {"width": width, "layers": layers, "seq": seq, "rows": rows_per_mb * m},
                "cycles": cycles,
                "state_bytes_per_rank": state,
                "times_s": slow,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
