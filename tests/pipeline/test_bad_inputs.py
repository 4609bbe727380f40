"""Every bad input in the README's table, tried on every rank: the error and what it says.

`_try_every_row` runs on each of 2 gloo ranks and gives each bad input of `ROWS` in turn — a
batch, a plan, options, a model, a checkpoint — catching what is raised. Each row must raise the
error type the table names, with the words the table promises, identically on every rank; the
errors that can be known before any collective are raised before one (the ranks stay in step, so
the next row still runs), and after the last row a good pipeline trains a step with a finite loss:
no hang, no abort, nothing left in flight. Rows that need a rank to die or a tensor to change
mid-step are driven in `test_failures.py` and `test_checkpoint.py`; the README names them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import nn

from partition import plan_model
from partition.devices import parse_devices
from partition.errors import (
    BatchError,
    CheckpointError,
    FactoryError,
    InfeasibleError,
    PeerError,
    PlanError,
    TraceError,
)
from partition.models import examples
from partition.models.registry import build_meta_model
from partition.plan import Plan
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

M = 4  # micro-batches
FEWEST = "mem=150KiB,tflops=1"  # 2 of these hold too little; 5 are the fewest that fit the toy
README = Path(__file__).parents[2] / "README.md"


def toy(batch: int = 2 * M) -> Any:
    return examples.gpt("toy", batch=batch)


def small() -> Any:
    return examples.gpt("small", batch=2 * M)


def _batch(batch: int = 2 * M, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 96, (batch, seq), generator=g),
        torch.randint(0, 96, (batch, seq), generator=g),
    )


class Box:
    """Not a tensor: what a model may pass between its parts."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


@torch.fx.wrap
def boxed(t: torch.Tensor) -> Box:
    return Box(t)


class BoxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box = boxed(self.a(x))
        return self.b(box.t + torch.relu(x))


def boxnet() -> Any:
    return BoxNet(), (torch.randn(8, 8),), F.mse_loss


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return x


def branchy() -> Any:
    return Branchy(), (torch.randn(8, 8),), F.mse_loss


def missing_weights() -> Any:
    raise FileNotFoundError("weights.bin")


# Row -> (the error type, words its message must hold). The README's table has these rows.
ROWS: dict[str, tuple[type[Exception], tuple[str, ...]]] = {
    "batch not divisible by the micro-batches": (
        BatchError,
        ("batch 7 is not divisible by 4 micro-batches", "use a batch of 4, 8, 12"),
    ),
    "batch smaller than the micro-batches": (
        BatchError,
        ("batch 3 is smaller than 4 micro-batches (some would be empty)", "--microbatches 3"),
    ),
    "empty batch": (BatchError, ("batch 0", "4 micro-batches")),
    "micro-batch of another shape than the plan's": (
        BatchError,
        ("input 'idx' is int64[12, 16]", "the plan's micro-batch is int64[2, 16]", "re-plan"),
    ),
    "fewer micro-batches than the schedule needs": (
        PlanError,
        ("interleaved", "got 3 micro-batches on 2 ranks", "use 2 or 4 micro-batches"),
    ),
    "plan for another model": (
        PlanError,
        ("this plan was made for another model: GPT", "the model given is BoxNet"),
    ),
    "plan for the same class, another size": (
        PlanError,
        (
            "this plan was made for another model: GPT with 16,480 parameters",
            "but the model given is GPT with",
            "re-plan",
        ),
    ),
    "plan for another world size": (
        PlanError,
        ("the plan is for 3 ranks", "but 2 ranks are running", "--devices 2"),
    ),
    "plan for another schedule": (
        PlanError,
        ("made for the '1f1b' schedule", "ask for 'gpipe'", "--schedule gpipe"),
    ),
    "plan for other micro-batches": (
        PlanError,
        ("made for 4 micro-batches", "ask for 8", "--microbatches 8"),
    ),
    "ranks that disagree on the plan": (
        PlanError,
        ("the ranks disagree on the plan", "rank 0:", "rank 1:", "same plan"),
    ),
    "memory that more devices would have": (
        InfeasibleError,
        ("no split of the 117 nodes fits 2 device(s)", "fit is 5 ('device' devices of 150 KiB)"),
    ),
    "memory that no number of devices has": (
        InfeasibleError,
        ("no split of the 117 nodes fits 2 device(s)", "no number of", "more memory"),
    ),
    "a node larger than a device": (InfeasibleError, ("'lm_head'", "no stage can hold it")),
    "untraceable model": (
        TraceError,
        ("cannot trace Branchy", "if x.sum() > 0:", "leaf_modules", "concrete_args", "export"),
    ),
    "a non-tensor crossing a cut": (
        PlanError,
        ("'boxed' (a Box", "only tensors", "Cut before 'boxed'"),
    ),
    "a model factory that raises": (
        FactoryError,
        ("the model factory", "missing_weights raised FileNotFoundError: weights.bin"),
    ),
    "replicas (`dp=`) that do not divide the world": (
        PlanError,
        ("2 ranks do not split into dp=3 replicas", "choose dp among 1, 2"),
    ),
    "a missing checkpoint": (CheckpointError, ("no checkpoint at",)),
    "a checkpoint without its manifest": (CheckpointError, ("manifest",)),
}


def _outcome(fn: Any, *args: Any, **kwargs: Any) -> tuple[list[str], str]:
    """The names of the error's classes and its message, or ``(["no error"], repr)``."""
    try:
        value = fn(*args, **kwargs)
    except Exception as e:
        return [c.__name__ for c in type(e).__mro__], str(e)
    return ["no error"], repr(value)[:200]


def _try_every_row(plans: dict[str, Plan], root: str) -> dict[str, Any]:
    rank = torch.distributed.get_rank()
    opts = PipelineOptions
    out: dict[str, Any] = {}
    pipe = Pipeline(toy, plan=plans["2 ranks"])
    for name, batch in (
        ("batch not divisible by the micro-batches", _batch(7)),
        ("batch smaller than the micro-batches", _batch(3)),
        ("empty batch", _batch(0)),
        ("micro-batch of another shape than the plan's", _batch(3 * M)),
    ):
        out[name] = _outcome(pipe.step, *batch)
    out["nothing sent"] = not pipe.rank_executor.transport._pending and not pipe.timeline
    out["fewer micro-batches than the schedule needs"] = _outcome(
        Pipeline, toy, options=opts(schedule="interleaved", microbatches=3, virtual=2)
    )
    out["plan for another model"] = _outcome(Pipeline, boxnet, plan=plans["2 ranks"])
    out["plan for the same class, another size"] = _outcome(Pipeline, small, plan=plans["2 ranks"])
    out["plan for another world size"] = _outcome(Pipeline, toy, plan=plans["3 ranks"])
    out["plan for another schedule"] = _outcome(
        Pipeline, toy, plan=plans["2 ranks"], options=opts(schedule="gpipe")
    )
    out["plan for other micro-batches"] = _outcome(
        Pipeline, toy, plan=plans["2 ranks"], options=opts(microbatches=8)
    )
    mine = plans["2 ranks"] if rank == 0 else plans["2 ranks, 2 micro-batches"]
    out["ranks that disagree on the plan"] = _outcome(Pipeline, toy, plan=mine)
    built = build_meta_model(toy)
    for name, spec in (
        ("memory that more devices would have", FEWEST),
        ("memory that no number of devices has", "mem=40KiB,tflops=1"),
        ("a node larger than a device", "mem=20KiB,tflops=1"),
    ):
        devices = parse_devices(spec, 2)
        out[name] = _outcome(plan_model, built.model, built.args, devices=devices, microbatches=M)
    out["untraceable model"] = _outcome(Pipeline, branchy, options=opts(microbatches=2))
    out["a non-tensor crossing a cut"] = _outcome(
        Pipeline, boxnet, options=opts(microbatches=2, bounds=(0, 3, 7))
    )
    out["a model factory that raises"] = _outcome(Pipeline, missing_weights)
    out["replicas (`dp=`) that do not divide the world"] = _outcome(
        Pipeline, toy, options=opts(microbatches=M, dp=3)
    )
    out["a missing checkpoint"] = _outcome(pipe.load, f"{root}/nowhere")
    unfinished = Path(root, "step-00000001")  # a folder that looks like a save, never finished
    if rank == 0:
        unfinished.mkdir(parents=True)
    torch.distributed.barrier()
    out["a checkpoint without its manifest"] = _outcome(pipe.load, unfinished)
    loss = pipe.step(*_batch())  # after all of it, a good step
    out["loss"] = None if loss is None else float(loss)
    return out


@pytest.mark.timeout(240)
def test_every_bad_input_gets_its_error_on_every_rank(tmp_path: Path) -> None:
    built = build_meta_model(toy)
    plans = {
        name: plan_model(built.model, built.args, devices=parse_devices("cpu", n), microbatches=m)
        for name, n, m in (("2 ranks", 2, M), ("3 ranks", 3, M), ("2 ranks, 2 micro-batches", 2, 2))
    }
    ranks = run_ranks(2, _try_every_row, plans, str(tmp_path), timeout=200)
    for rank, out in enumerate(ranks):
        wrong = [
            f"rank {rank}, {row}: {kind.__name__} with {words}, got {out[row]}"
            for row, (kind, words) in ROWS.items()
            if kind.__name__ not in out[row][0] or not all(w in out[row][1] for w in words)
        ]
        assert not wrong, "\n".join(wrong)
        assert out["nothing sent"], rank
        for row in ROWS:  # every rank says the same
            assert out[row] == ranks[0][row] or row == "ranks that disagree on the plan", row
    classes, factory = ranks[0]["a model factory that raises"]
    assert "FileNotFoundError" in classes  # still catchable as what the factory raised
    assert "(it was called under torch.device('meta')" in factory
    assert ranks[0]["loss"] is None and math.isfinite(ranks[1]["loss"])
    for n, fits in ((4, False), (5, True)):  # "the fewest devices that fit is 5" is so
        try:
            plan_model(built.model, built.args, devices=parse_devices(FEWEST, n), microbatches=M)
        except InfeasibleError:
            assert not fits, n
        else:
            assert fits, n


def _factory_raises_on(rank_that_fails: int) -> Any:
    if torch.distributed.get_rank() == rank_that_fails:
        return Pipeline(missing_weights)
    return Pipeline(toy, options=PipelineOptions(microbatches=M))


@pytest.mark.timeout(120)
def test_a_factory_raising_on_one_rank_ends_the_others() -> None:
    outcomes = run_ranks(2, _factory_raises_on, 1, timeout=90, expect_failure=True)
    failed, peer = outcomes[1], outcomes[0]
    assert "FactoryError" in failed.error_types, failed.describe()
    assert PeerError.__name__ in peer.error_types, peer.describe()
    assert "a peer rank ended before the ranks compared their pipeline layouts" in peer.message
    assert not peer.killed and not failed.killed


def _readme_rows() -> list[tuple[str, str, str]]:
    """(bad input, error, test) of each row of the README's bad-input table."""
    text = README.read_text()
    table = text[text.index("| Bad input |") :].split("\n\n", 1)[0].splitlines()[2:]
    rows = []
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0], cells[1].strip("`"), cells[-1]))
    return rows


def test_the_readme_table_is_the_rows_tested() -> None:
    rows = _readme_rows()
    here = {name: kind.__name__ for name, (kind, _) in ROWS.items()}
    named = {name: kind for name, kind, test in rows if test == "`test_bad_inputs`"}
    assert named == here  # every row tested here is in the table, with its error, and no other
    tests = Path(__file__).parents[1]
    for name, _, test in rows:  # every other row names a test that exists
        if test != "`test_bad_inputs`":
            match = re.fullmatch(r"`(test_\w+)::(test_\w+)`", test)
            assert match is not None, (name, test)
            (module,) = tests.glob(f"*/{match[1]}.py")
            assert f"def {match[2]}(" in module.read_text(), (name, test)
