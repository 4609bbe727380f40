"""The runtime against the same model in one process: loss, every gradient, parameters after steps.

R1 (parity) and R2 (loss reduction × micro-batches) of shared/design/reliability-tests.md: for
every schedule × ranks ∈ {2, 3, 4} × (the bundled GPT, a skip connection across stages, tied
weights), one spawn per world size runs every case on the same ranks; the parent runs the
reference. fp32 models are held to 1e-5, fp64 models to 1e-10.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import resource
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks

from partition import analyze
from partition.models import examples
from partition.models.registry import BuiltModel, build_meta_model, unpack_model
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v", "dualpipev")
VIRTUAL = {"interleaved": 2, "zb-v": 2, "dualpipev": 2}  # stages per rank


# --- models (module level: the ranks import them) ----------------------------------------------


def gpt_model(batch: int, tied: bool = False, dtype: str = "float32") -> Any:
    model, inputs, loss_fn = examples.gpt("toy", batch=batch, tie_weights=tied)
    return model.to(getattr(torch, dtype)), inputs, loss_fn


def _mse_sum(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target, reduction="sum")


def skipnet_model(batch: int, reduction: str = "mean") -> Any:
    model, (x,), _ = examples.skipnet(batch=batch)
    return model.double(), (x.double(),), F.mse_loss if reduction == "mean" else _mse_sum


def big_gpt_model(batch: int) -> Any:
    """~330 MB of fp32 weights (24 blocks of width 512, vocabulary 8192), quick on a CPU."""
    config = examples.GPTConfig(vocab_size=8192, block_size=16, n_layer=24, n_head=8, n_embd=512)
    return examples.gpt(config, batch=batch, seq=8)


@dataclass(frozen=True)
class Case:
    """One pipeline run: a model, a schedule and the numbers to run it with."""

    model: str  # gpt | gpt-tied | skipnet | skipnet-sum
    schedule: str
    world: int
    microbatches: int
    virtual: int = 1
    optimizer: str = "sgd"
    max_grad_norm: float | None = None
    recompute: bool = False
    link_groups: bool = False
    steps: int = 3

    @property
    def reduction(self) -> str:
        return "sum" if self.model.endswith("-sum") else "mean"

    @property
    def fp64(self) -> bool:
        return self.model != "gpt"

    @property
    def batch(self) -> int:
        return 2 * self.microbatches

    def factory(self) -> Any:
        if self.model.startswith("skipnet"):
            return functools.partial(skipnet_model, self.batch, self.reduction)
        return functools.partial(
            gpt_model, self.batch, self.model == "gpt-tied", "float64" if self.fp64 else "float32"
        )

    def options(self, num_nodes: int) -> PipelineOptions:
        k = self.world * self.virtual
        return PipelineOptions(
            schedule=self.schedule,
            microbatches=self.microbatches,
            virtual=self.virtual,
            bounds=tuple(round(i * num_nodes / k) for i in range(k + 1)),
            loss_reduction=self.reduction,  # type: ignore[arg-type]
            max_grad_norm=self.max_grad_norm,
            recompute=self.recompute,
            link_groups=self.link_groups,
        )

    def optimizer_factory(self) -> Any:
        if self.optimizer == "adamw":
            return functools.partial(torch.optim.AdamW, lr=1e-2)
        lr = (
            0.1 if self.reduction == "mean" else 0.1 / (self.batch * 16)
        )  # a sum is batch × 16 means
        return functools.partial(torch.optim.SGD, lr=lr, momentum=0.9)

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (inputs, target) per step, the same on every rank and in the reference."""
        g = torch.Generator().manual_seed(1234)
        out = []
        for _ in range(self.steps):
            if self.model.startswith("skipnet"):
                x = torch.randn(self.batch, 16, generator=g, dtype=torch.float64)
                y = torch.randn(self.batch, 16, generator=g, dtype=torch.float64)
            else:
                x = torch.randint(0, 96, (self.batch, 16), generator=g)
                y = torch.randint(0, 96, (self.batch, 16), generator=g)
            out.append((x, y))
        return out


NUM_NODES = {"gpt": 117, "gpt-tied": 117, "skipnet": 29, "skipnet-sum": 29}


def cases_for(world: int) -> list[Case]:
    m = 2 * world  # interleaved needs a multiple of the ranks
    cases = [
        Case(model, schedule, world, m, virtual=VIRTUAL.get(schedule, 1))
        for schedule in SCHEDULES
        for model in ("gpt", "gpt-tied", "skipnet")
    ]
    cases += [
        Case("skipnet-sum", "1f1b", world, m),  # R2: a sum loss is not scaled by 1/m
        Case("skipnet-sum", "zb-h1", world, world - 1 or 1),  # fewer micro-batches than ranks
        Case("gpt", "gpipe", world, 1, optimizer="adamw"),
        Case("gpt-tied", "1f1b", world, m, max_grad_norm=0.05),  # clipping is active
        Case("skipnet", "interleaved", world, world, virtual=3, recompute=True),
        Case("gpt", "interleaved", world, m, virtual=2, link_groups=True),  # NCCL's way, on gloo
    ]
    return cases


# --- on the ranks ----------------------------------------------------------------------------


def _train(cases: list[Case]) -> list[dict[str, Any]]:
    results = []
    for case in cases:
        pipe = Pipeline(
            case.factory(),
            options=case.options(NUM_NODES[case.model]),
            optimizer_factory=case.optimizer_factory(),
        )
        losses, grads = [], {}
        for k, (x, y) in enumerate(case.batches()):
            loss = pipe.step(x, y)
            losses.append(None if loss is None else float(loss))
            if k == 0:
                grads = {
                    n: p.grad.clone()
                    for n, p in pipe.named_parameters().items()
                    if p.grad is not None
                }
        params = {n: p.detach().clone() for n, p in pipe.named_parameters().items()}
        results.append(
            {"losses": losses, "grads": grads, "params": params, "events": len(pipe.timeline)}
        )
        torch.distributed.barrier()
    return results


# --- in the test process ----------------------------------------------------------------------


def eager(factory: Any, seed: int = 0) -> BuiltModel:
    """The model exactly as its factory builds it, the plain way: the reference of every test."""
    torch.manual_seed(seed)
    return unpack_model(factory())


def _reference(case: Case) -> dict[str, Any]:
    built = eager(case.factory())
    model, loss_fn = built.model, built.loss_fn
    assert loss_fn is not None
    opt = case.optimizer_factory()(list(model.parameters()))
    losses, grads = [], {}
    for k, (x, y) in enumerate(case.batches()):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if case.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), case.max_grad_norm)
            assert norm > case.max_grad_norm  # the test means to exercise clipping
        if k == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        opt.step()
        losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return {"losses": losses, "grads": grads, "params": params}


def _compare(case: Case, ranks: list[dict[str, Any]]) -> None:
    ref = _reference(case)
    tol = 1e-10 if case.fp64 else 1e-5
    last = [r for r in ranks if r["losses"][0] is not None]
    assert len(last) == 1, f"{case}: the loss must come back on exactly one rank"
    assert last[0]["losses"] == pytest.approx(ref["losses"], abs=tol, rel=tol), case
    for what in ("grads", "params"):
        seen = set()
        for r in ranks:
            for name, value in r[what].items():
                seen.add(name)
                diff = (value - ref[what][name]).abs().max().item()
                scale = max(1.0, ref[what][name].abs().max().item())
                assert diff <= tol * scale, f"{case}: {what[:-1]} {name} differs by {diff:.3g}"
        assert seen == set(ref[what]), f"{case}: {what} missing for {sorted(set(ref[what]) - seen)}"


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_schedule_matches_one_process(world: int) -> None:
    cases = cases_for(world)
    results = run_ranks(world, _train, cases, timeout=200)
    for i, case in enumerate(cases):
        _compare(case, [r[i] for r in results])


def test_cases_cover_the_matrix() -> None:
    for world in (2, 3, 4):
        got = {(c.schedule, c.model) for c in cases_for(world)}
        assert {(s, m) for s in SCHEDULES for m in ("gpt", "gpt-tied", "skipnet")} <= got


def test_node_counts_are_current() -> None:
    for name, factory in [("gpt", gpt_model), ("skipnet", skipnet_model)]:
        built = build_meta_model(functools.partial(factory, 8))
        assert len(analyze(built.model, built.args, microbatches=4).graph) == NUM_NODES[name]


# --- memory -------------------------------------------------------------------------------------


def _rss_kib() -> int:
    """This process's resident memory now (not its peak: a forked rank's ``ru_maxrss`` starts at
    its parent's)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _memory(bounds: tuple[int, ...], weights: str) -> dict[str, Any]:
    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    before = peak()
    factory = functools.partial(big_gpt_model, 2)
    pipe = Pipeline(
        factory,
        options=PipelineOptions(microbatches=2, bounds=bounds, weights=weights),  # type: ignore[arg-type]
    )
    x = torch.randint(0, 8192, (2, 8), generator=torch.Generator().manual_seed(0))
    pipe.evaluate(x)
    weights = peak()
    pipe.step(x, x)
    stage = sum(p.numel() * p.element_size() for p in pipe.parameters)
    return {"weights": weights - before, "training": peak() - before, "stage": stage}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("weights", ["init", "factory"])
def test_each_rank_holds_only_its_stage(weights: str) -> None:
    """Peak RSS growth per rank follows its stage's size, far below the whole model's.

    With ``weights="init"`` (a model too big for host memory) no rank ever holds more; with
    ``"factory"`` one rank per machine also builds the whole model once, the others do not."""
    from partition.devices import parse_devices
    from partition.solve import solve

    built = build_meta_model(functools.partial(big_gpt_model, 2))
    full = sum(p.numel() * p.element_size() for p in built.model.parameters())
    assert full > 300e6
    graph = analyze(built.model, built.args, microbatches=2).graph
    bounds = solve(graph, parse_devices("cpu", 4), microbatches=2, algorithm="params").bounds
    results = run_ranks(4, _memory, tuple(bounds), weights, timeout=200)
    slack = 64e6  # tracing on meta, the interpreter's arenas, activations
    if weights == "factory":  # rank 0 built the model for the machine: full + its stage
        builder, *results = results
        assert builder["weights"] < full + builder["stage"] + slack, (builder, full)
    for rank, r in enumerate(results):
        assert r["stage"] < 0.35 * full, (rank, r)  # the model is several times a rank's share
        assert r["weights"] < r["stage"] + slack, (rank, r, full)
        assert r["weights"] < 0.5 * full, (rank, r, full)
        # weights and gradients of the stage, plus a transient gradient, and never the whole
        # model's weights (which alone would be `full`)
        assert r["training"] < 2 * r["stage"] + slack + 0.15 * full, (rank, r, full)
        assert r["training"] < 0.85 * full, (rank, r, full)


# --- evaluation, autocast, checkpoints, LR schedules, plans, timelines ----------------------------


def _features(checkpoint: str, plan: Any) -> dict[str, Any]:
    case = Case("gpt", "1f1b", 2, 4)
    options = case.options(NUM_NODES["gpt"])
    (x, y), *_ = case.batches()
    out: dict[str, Any] = {}

    pipe = Pipeline(case.factory(), options=options)
    out["eval_output"] = pipe.evaluate(x)
    out["eval_loss"] = pipe.evaluate(x, y)
    out["timeline"] = pipe.timeline
    loss = pipe.step(x, y)
    out["fp32_loss"] = None if loss is None else float(loss)
    out["train_timeline"] = pipe.timeline
    out["actions"] = [str(a) for a in pipe._actions]

    # R12: nothing is kept from one step to the next, and memory stays flat
    for _ in range(3):
        pipe.step(x, y)
    rss = _rss_kib()
    for _ in range(20):
        pipe.step(x, y)
    out["rss_growth_kib"] = _rss_kib() - rss
    out["idle"] = pipe.rank_executor.transport.idle and not any(
        e._saved for e in pipe.executors.values()
    )
    out["pools_full"] = all(len(pool._free) >= 2 for pool in pipe.rank_executor._pools.values())

    bf16 = Pipeline(case.factory(), options=dataclasses.replace(options, autocast=torch.bfloat16))
    seen: set[torch.dtype] = set()  # what the stage's linear layers compute in
    for s in bf16.my_stages:
        for layer in bf16.executors[s].module.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_hook(lambda _m, _i, o: seen.add(o.dtype))
    loss = bf16.step(x, y)
    out["bf16_loss"] = None if loss is None else float(loss)
    out["bf16_dtypes"] = seen

    loaded = Pipeline(case.factory(), options=dataclasses.replace(options, checkpoint=checkpoint))
    out["loaded"] = loaded.state_dict()

    scheduled = Pipeline(
        case.factory(),
        options=options,
        optimizer_factory=case.optimizer_factory(),
        lr_scheduler_factory=functools.partial(
            torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5
        ),
    )
    for xb, yb in case.batches():
        scheduled.step(xb, yb)
    out["scheduled"] = {n: p.detach().clone() for n, p in scheduled.named_parameters().items()}

    planned = Pipeline(case.factory(), plan=plan)
    loss = planned.step(x, y)
    out["plan_loss"] = None if loss is None else float(loss)
    out["plan_grads"] = {n: p.grad.clone() for n, p in planned.named_parameters().items()}
    return out


@pytest.mark.timeout(120)
def test_evaluation_autocast_checkpoint_lr_schedule_plan_and_timeline(tmp_path: Any) -> None:
    from partition import plan_model
    from partition.devices import parse_devices

    case = Case("gpt", "1f1b", 2, 4)
    (x, y), *_ = case.batches()
    ref = eager(case.factory())
    model, loss_fn = ref.model, ref.loss_fn
    assert loss_fn is not None
    checkpoint = tmp_path / "gpt.pt"
    saved = {k: torch.randn_like(v) for k, v in model.state_dict().items()}  # unlike any init
    torch.save(saved, checkpoint)
    meta = build_meta_model(case.factory())
    plan = plan_model(meta.model, meta.args, devices=parse_devices("cpu", 2), microbatches=4)

    ranks = run_ranks(2, _features, str(checkpoint), plan, timeout=100)
    first, last = ranks
    with torch.no_grad():
        expected = model(x)
    assert first["eval_output"] is None and first["eval_loss"] is None
    assert (last["eval_output"] - expected).abs().max() < 1e-5
    assert abs(float(last["eval_loss"]) - float(loss_fn(expected, y))) < 1e-5

    # the timeline: one event per action, in order, on the monotonic clock
    for r in ranks:
        assert r["idle"] and r["pools_full"] and r["rss_growth_kib"] < 1024, r["rss_growth_kib"]
        events = r["train_timeline"]
        assert [str(a) for _, a, _, _ in events] == r["actions"]
        assert all(start <= end for _, _, start, end in events)
        assert all(a[3] <= b[2] for a, b in itertools.pairwise(events))
        assert {str(a)[1:2] for _, a, _, _ in r["timeline"]} <= {
            "F",
            "S",
            "R",
        }  # eval: forward only

    # autocast ran: every rank's linear layers computed in bf16, and the first step's loss moved
    # off the same step's in fp32 (bit-identical if autocast did nothing), but not far
    for r in ranks:
        assert r["bf16_dtypes"] == {torch.bfloat16}, r["bf16_dtypes"]
    assert last["bf16_loss"] is not None and last["fp32_loss"] is not None
    assert last["bf16_loss"] != last["fp32_loss"]
    assert abs(last["bf16_loss"] - float(loss_fn(expected, y))) < 0.05

    for r in ranks:
        for name, value in r["loaded"].items():
            assert torch.equal(value, saved[name]), name

    opt = case.optimizer_factory()(list(model.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for xb, yb in case.batches():
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        sched.step()
    named = dict(model.named_parameters(remove_duplicate=False))
    for r in ranks:
        for name, value in r["scheduled"].items():
            assert (value - named[name]).abs().max() < 1e-5, name

    fresh = eager(case.factory()).model
    loss = loss_fn(fresh(x), y)
    loss.backward()
    assert abs(last["plan_loss"] - loss.item()) < 1e-5
    fresh_named = dict(fresh.named_parameters(remove_duplicate=False))
    assert {n for r in ranks for n in r["plan_grads"]} == set(fresh_named)
    for r in ranks:
        for name, grad in r["plan_grads"].items():
            assert (grad - fresh_named[name].grad).abs().max() < 1e-5, name
