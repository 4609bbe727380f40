"""A zoo model through pipepart and through its own eager self: plan it, train it, compare.

[Note: the zoo's comparison]
For each model: (a) `plan_model` at ``size="real"`` on meta for 4 devices; (b) ``size="tiny"``
trained by `pipeline.Pipeline` in each `Setup` (2 or 3 gloo ranks, 1f1b or gpipe; 2 micro-batches,
2 SGD steps at lr 1e-2) on the plan pipepart makes, which must give every rank work, against the
reference: the factory's own model, built in this process by
``torch.manual_seed(0); factory("tiny")`` and run the plain way over the same 2 micro-batches,
each micro-batch's loss divided by 2 before its backward, the same SGD. Compared: each step's
loss, every gradient of the first step, every parameter and buffer after the second. A model
whose training is random (``check="eval"``) is instead evaluated twice in eval mode
(``Pipeline.train(False)``) against ``model.eval()``'s output.

The rule (fp32): a loss's difference is ``|pipe - ref| / max(|ref|, 1e-6)``, a gradient's (or an
eval output's) ``max|pipe - ref| / max(max|ref|, 1e-6)`` — for a gradient, over its module's
largest gradient when that is larger: a true zero gradient (attention's key bias; softmax is
shift-invariant) is rounding noise of the size of the contributions it sums, which its module's
other gradients are made of (as `--check` judges it: [Note: a gradient's rounding floor] in
`pipeline.launch.reference`) — a parameter's or buffer's the same over
the largest magnitude of any parameter (buffer) of the model; a model passes when the largest of
them is at most `TOLERANCE` (1e-5). A NaN or inf on either side, a missing or extra tensor, or a
shape mismatch is a failure (reported as nan / inf), never a difference of 0.

[Note: one spawn for many models]
Forking 2 ranks is quick, but each rank then imports the model libraries (seconds). So one spawn
runs many models in sequence, each rank saving every finished model's result to a file. A model
that fails on a rank ends that spawn (its peer is killed at once rather than left waiting on a
message that will never come); the rest run in a new spawn.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from partition import plan_model
from partition.devices import parse_devices
from pipeline.launch.spawn import spawn_ranks
from pipeline.runtime.pipeline import Pipeline, PipelineOptions
from zoo.models import ZOO

__all__ = ["SETUPS", "TOLERANCE", "Outcome", "Setup", "check_plan", "check_runs", "first_line"]

log = logging.getLogger(__name__)

STEPS, MICROBATCHES, LR, SCHEDULE = 2, 2, 1e-2, "1f1b"


@dataclass(frozen=True)
class Setup:
    """How the tiny model runs: on how many gloo ranks, under which schedule."""

    world: int = 2
    schedule: str = SCHEDULE

    def __str__(self) -> str:
        return f"{self.world} ranks, {self.schedule}"


SETUPS = (Setup(2, "1f1b"), Setup(3, "gpipe"), Setup(2, "gpipe"), Setup(3, "1f1b"))
"""Every setup the survey runs; the test suite runs the first two (both rank counts, both
schedules)."""
TOLERANCE = 1e-5
_FLOOR = 1e-6
_PRELOAD = ("zoo.models", "zoo.parity", "torchvision", "timm", "diffusers", "transformers")


def first_line(text: str) -> str:
    """The first non-empty line of an error message, at most 160 characters."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= 160 else line[:157] + "..."


@dataclass
class Outcome:
    """How one model's run went: an error, or the largest difference and where."""

    name: str
    error: str = ""
    worst: float = math.nan
    where: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error and not self.problems and self.worst <= TOLERANCE

    def summary(self) -> str:
        if self.error:
            return self.error
        if self.problems:
            return f"{len(self.problems)} problem(s): {self.problems[0]}"
        verdict = "ok" if self.ok else "DIFFERS"
        return f"{verdict} (largest {self.worst:.2g} at {self.where})"


# --- (a) the plan ----------------------------------------------------------------------------


def check_plan(name: str) -> str:
    """Plan the real-size model on meta for 4 devices; returns a one-line summary.

    Raises:
        Exception: whatever planning raised.
    """
    entry = ZOO[name]
    with torch.device("meta"):
        model, inputs, _, _ = entry.factory("real", batch=8)
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else (tuple(inputs), None)
    devices = parse_devices(entry.devices, 4)
    plan = plan_model(model, args, kwargs, devices=devices, schedule=SCHEDULE, microbatches=4)
    assert plan.num_stages == 4, plan.num_stages
    return f"ok: {plan.model.num_nodes} nodes, cuts {list(plan.bounds[1:-1])}"


# --- (b) the run: on the ranks ---------------------------------------------------------------


def _train(name: str, inputs: Any, target: Tensor, setup: Setup) -> dict[str, Any]:
    entry = ZOO[name]
    group = dist.new_group(list(range(setup.world)))  # a fresh communicator per model
    pipe = Pipeline(
        functools.partial(entry.factory, "tiny"),
        options=PipelineOptions(schedule=setup.schedule, microbatches=MICROBATCHES),
        optimizer_factory=functools.partial(torch.optim.SGD, lr=LR),
        group=group,
    )
    bounds = pipe.plan.bounds
    empty = [s for s in range(pipe.plan.num_stages) if bounds[s] == bounds[s + 1]]
    if entry.check == "eval":
        pipe.train(False)
        return {"outputs": [pipe.evaluate(inputs) for _ in range(2)], "empty": empty}
    losses: list[float | None] = []
    grads: dict[str, Tensor] = {}
    for k in range(STEPS):
        loss = pipe.step(inputs, target)
        losses.append(None if loss is None else float(loss))
        if k == 0:
            grads = {
                n: p.grad.detach().clone()
                for n, p in pipe.named_parameters().items()
                if p.grad is not None
            }
    return {
        "empty": empty,
        "losses": losses,
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in pipe.named_parameters().items()},
        "buffers": {n: b.detach().clone() for n, b in pipe.named_buffers().items()},
    }


def _train_many(names: list[str], batches: dict[str, Any], out: str, setup: Setup) -> None:
    """On each rank: every model in turn, each result saved as ``out/NAME.RANK.pt``."""
    rank = dist.get_rank()
    for name in names:
        result = _train(name, *batches[name], setup)
        torch.save(result, Path(out, f"{name}.{rank}.pt"))
        dist.barrier()


# --- (b) the run: the reference and the comparison ---------------------------------------------


def _chunks(value: Any, m: int) -> list[Any]:
    if isinstance(value, Tensor):
        return list(value.tensor_split(m))
    if isinstance(value, dict):
        parts = {k: _chunks(v, m) for k, v in value.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(m)]
    parts_t = [_chunks(v, m) for v in value]
    return [tuple(p[i] for p in parts_t) for i in range(m)]


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def reference(name: str) -> tuple[dict[str, Any], Any, Tensor]:
    """The eager run of ``name`` at size tiny, on one thread like each rank; returns
    ``(result, inputs, target)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(name)
    finally:
        torch.set_num_threads(threads)


def _reference(name: str) -> tuple[dict[str, Any], Any, Tensor]:
    entry = ZOO[name]
    torch.manual_seed(0)
    model, inputs, loss_fn, target = entry.factory("tiny")
    if entry.check == "eval":
        model.eval()
        with torch.no_grad():
            return {"output": _call(model, inputs)}, inputs, target
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], {}
    for k in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in zip(_chunks(inputs, MICROBATCHES), _chunks(target, MICROBATCHES), strict=True):
            loss = loss_fn(_call(model, x), y)
            (loss / MICROBATCHES).backward()
            total += float(loss.detach()) / MICROBATCHES
        losses.append(total)
        if k == 0:
            grads = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters(remove_duplicate=False)
                if p.grad is not None
            }
        optimizer.step()
    first: dict[int, str] = {}
    canonical = {  # every name of a tensor -> its first (a tied weight has several)
        n: first.setdefault(id(t), n)
        for source in (model.named_parameters, model.named_buffers)
        for n, t in source(remove_duplicate=False)
    }
    result = {
        "losses": losses,
        "grads": {n: g for n, g in grads.items() if canonical[n] == n},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "canonical": canonical,
        "persistent": set(model.state_dict()),
    }
    return result, inputs, target


def _relative(got: Tensor, want: Tensor, scale: float) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(want).all())):
        return math.nan
    if got.shape != want.shape:
        return math.inf
    if not got.numel():
        return 0.0
    return float((got - want).abs().max()) / scale


def _largest(tensors: dict[str, Tensor]) -> float:
    finite = [float(t.detach().abs().max()) for t in tensors.values() if t.numel()]
    return max([_FLOOR, *[v for v in finite if math.isfinite(v)]])


def _own_scale(t: Tensor) -> float:
    return max(float(t.detach().abs().max()) if t.numel() else 0.0, _FLOOR)


def _layer_scale(name: str, grads: dict[str, Tensor]) -> float:
    """A gradient's scale: its own largest magnitude, or its module's largest gradient when that
    is larger (a true zero gradient, like attention's key bias, is rounding of the contributions
    its module's other gradients are made of; see [Note: the zoo's comparison])."""
    own = _own_scale(grads[name])
    module = name.rpartition(".")[0]
    siblings = [g for n, g in grads.items() if n.rpartition(".")[0] == module and g.numel()]
    return max([own, *(float(g.detach().abs().max()) for g in siblings)])


def compare(name: str, ref: dict[str, Any], ranks: list[dict[str, Any]]) -> Outcome:
    """How far the ranks' results are from the reference; see [Note: the zoo's comparison]."""
    out = Outcome(name)
    diffs: list[tuple[float, str]] = []
    empty = ranks[0].get("empty", [])
    if empty:  # every rank has work, or the run does not test a pipeline of this many stages
        out.problems.append(f"stages {empty} of the plan are empty")
    if "output" in ref:
        got = [r["outputs"] for r in ranks if r["outputs"][0] is not None]
        if len(got) != 1:
            return Outcome(name, error=f"eval output came back on {len(got)} ranks, not 1")
        for k, output in enumerate(got[0]):
            want = ref["output"]
            diffs.append((_relative(output, want, _own_scale(want)), f"eval output {k}"))
    else:
        last = [r for r in ranks if r["losses"][0] is not None]
        if len(last) != 1:
            return Outcome(name, error=f"the loss came back on {len(last)} ranks, not 1")
        for k, (got_loss, want_loss) in enumerate(
            zip(last[0]["losses"], ref["losses"], strict=True)
        ):
            d = abs(got_loss - want_loss) / max(abs(want_loss), _FLOOR)
            diffs.append((d if math.isfinite(got_loss + want_loss) else math.nan, f"loss {k}"))
        for what in ("grads", "params", "buffers"):
            want_all: dict[str, Tensor] = ref[what]
            model_scale = _largest(want_all)
            seen: set[str] = set()
            for r in ranks:
                for alias, t in r[what].items():
                    tensor_name = ref["canonical"].get(alias, alias)
                    seen.add(tensor_name)
                    if tensor_name not in want_all:
                        if what == "grads" and bool((t != 0).any()):
                            out.problems.append(f"a gradient the model has not: {tensor_name}")
                        continue
                    want = want_all[tensor_name]
                    scale = _layer_scale(tensor_name, want_all) if what == "grads" else model_scale
                    diffs.append((_relative(t, want, scale), f"{what[:-1]} {tensor_name}"))
            missing = sorted(set(want_all) - seen)
            if what == "grads":  # a gradient the pipeline lacks is fine only if it is zero
                missing = [n for n in missing if bool((want_all[n] != 0).any())]
            elif what == "buffers":  # one in no state dict that no stage reads is no state
                missing = [n for n in missing if n in ref["persistent"]]
            if missing:
                out.problems.append(f"{what} missing on every rank: {', '.join(missing[:4])}")
    nan = [w for d, w in diffs if math.isnan(d)]
    if nan:
        out.worst, out.where = math.nan, nan[0]
        out.problems.append(f"non-finite values at {nan[0]} ({len(nan)} tensors)")
    elif diffs:
        out.worst, out.where = max(diffs)
    else:
        out.worst, out.where = math.inf, "nothing compared"
        out.problems.append("nothing compared")
    return out


def check_runs(
    names: list[str], setup: Setup = SETUPS[0], timeout_per_model: float = 90.0
) -> dict[str, Outcome]:
    """Train every model in ``names`` as ``setup`` says and compare; see [Note: one spawn for
    many models]. Returns an `Outcome` per model, in ``names``' order."""
    refs: dict[str, dict[str, Any]] = {}
    batches: dict[str, Any] = {}
    outcomes: dict[str, Outcome] = {}
    for name in names:
        try:
            refs[name], inputs, target = reference(name)
            batches[name] = (inputs, target)
        except Exception as e:
            outcomes[name] = Outcome(name, error=f"eager: {type(e).__name__}: {first_line(str(e))}")
    pending = [n for n in names if n in refs]
    with tempfile.TemporaryDirectory(prefix="pipepart-zoo-") as tmp:
        while pending:
            start = time.monotonic()
            results = spawn_ranks(
                _train_many,
                setup.world,
                (pending, {n: batches[n] for n in pending}, tmp, setup),
                timeout=timeout_per_model * len(pending),
                pg_timeout=60.0,
                backend="gloo",
                start_method="forkserver",
                preload=_PRELOAD,
            )
            elapsed = time.monotonic() - start
            done = [
                n
                for n in pending
                if all(Path(tmp, f"{n}.{r}.pt").exists() for r in range(setup.world))
            ]
            for n in done:
                ranks = [
                    torch.load(Path(tmp, f"{n}.{r}.pt"), weights_only=False)
                    for r in range(setup.world)
                ]
                outcomes[n] = compare(n, refs[n], ranks)
                outcomes[n].seconds = elapsed / max(len(done), 1)
            rest = pending[len(done) :]
            if not rest:
                break
            failed, pending = rest[0], rest[1:]
            outcomes[failed] = Outcome(failed, error=_rank_error(results), seconds=elapsed)
    return {n: outcomes[n] for n in names}


def _rank_error(results: list[Any]) -> str:
    """The first line of the error of the rank that failed first (not of those killed)."""
    failed = [o for o in results if not o.ok and not o.killed] or [o for o in results if not o.ok]
    if not failed:
        return "ranks ended without a result"
    o = failed[0]
    kind = o.error_types[0] if o.error_types else f"exit code {o.exitcode}"
    if o.killed == "timeout":
        return f"timeout (rank {o.rank} killed)"
    return f"{kind}: {first_line(o.message)}"
