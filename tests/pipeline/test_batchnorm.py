"""BatchNorm in train mode on a pipeline, against the user's eager model.

``batchnorm="microbatch"`` (the default): loss, every gradient, the parameters and the running
statistics after 2 steps equal one process running the same micro-batches one after another —
on both trace routes, with and without ``recompute`` (whose second forward must not update the
statistics again). ``batchnorm="batch"``: the same loss and gradients, and running statistics
updated once per step, as a BatchNorm fed the step's micro-batches as one batch; for the first
BatchNorm that is the eager model's own on the whole batch. In eval mode the pipeline then
equals the eager model in eval mode (the export route bakes the mode into its graph).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import Tensor, nn

from partition import analyze, plan_model
from partition.devices import parse_devices
from partition.models.registry import build_meta_model
from pipeline.runtime.batchnorm import DeferredBatchNorm, defer_batchnorm, recompute_contexts
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

M = 2  # micro-batches
BATCH = 8
STEPS = 2
LR = 0.1

# --- models (module level: the ranks import them) ----------------------------------------------


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=0.3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))  # (B, 8, 6, 6)
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))  # (B, 4)


class MLPBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 16)
        self.bn2 = nn.BatchNorm1d(16, momentum=0.2)  # (momentum=None: export cannot trace it)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn1(self.fc1(x)))
        return self.head(torch.tanh(self.bn2(self.fc2(h))))


def _loss(out: Any, target: Tensor) -> Tensor:
    out = out[0] if isinstance(out, (tuple, list)) else out  # the export route: a flat tuple
    return F.mse_loss(out, target)


def factory(name: str) -> Any:
    model = (ConvBN if name == "conv" else MLPBN)().double()
    shape = (BATCH, 3, 6, 6) if name == "conv" else (BATCH, 6)
    return model, (torch.zeros(shape, dtype=torch.float64),), _loss


def batches(name: str) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    shape = (BATCH, 3, 6, 6) if name == "conv" else (BATCH, 6)
    return [
        (
            torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1,
            torch.randn(BATCH, 4, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


@dataclass(frozen=True)
class Case:
    model: str  # conv | mlp
    route: str  # fx | export
    batchnorm: str = "microbatch"
    recompute: bool = False
    schedule: str = "1f1b"


CASES = [
    Case(model, route, batchnorm, recompute, "gpipe" if recompute else "1f1b")
    for model in ("conv", "mlp")
    for route in ("fx", "export")
    for batchnorm in ("microbatch", "batch")
    for recompute in (False, True)
] + [  # a split backward: the recomputation happens in I, W runs later
    Case("conv", route, batchnorm, True, "zb-h1")
    for route in ("fx", "export")
    for batchnorm in ("microbatch", "batch")
]


def _plans() -> dict[tuple[str, str], Any]:
    """A plan per model and route, cut where the second block starts (a BatchNorm each side)."""
    plans = {}
    for model in ("conv", "mlp"):
        meta = build_meta_model(functools.partial(factory, model))
        for route in ("fx", "export"):
            plan = plan_model(
                meta.model,
                meta.args or (),
                devices=parse_devices("cpu", 2),
                microbatches=M,
                method=route,
            )
            graph = analyze(meta.model, meta.args or (), microbatches=M, method=route).graph
            second = "conv2" if model == "conv" else "fc2"
            cut = min(i for i, path in enumerate(graph.module_paths) if path == second)
            first, last = plan.stages
            stages = (dataclasses.replace(first, stop=cut), dataclasses.replace(last, start=cut))
            plans[model, route] = dataclasses.replace(plan, stages=stages)
    return plans


# --- on the ranks ----------------------------------------------------------------------------


def _train(cases: list[Case], plans: dict[tuple[str, str], Any]) -> list[dict[str, Any]]:
    results = []
    for case in cases:
        options = PipelineOptions(
            recompute=case.recompute,
            batchnorm=case.batchnorm,  # type: ignore[arg-type]
        )
        plan = plans[case.model, case.route]  # the same cut, run with the case's schedule
        pipe = Pipeline(
            functools.partial(factory, case.model),
            plan=dataclasses.replace(plan, schedule=case.schedule),
            options=options,
            optimizer_factory=functools.partial(torch.optim.SGD, lr=LR),
        )
        out: dict[str, Any] = {"losses": [], "buffers": []}
        for k, (x, y) in enumerate(batches(case.model)):
            loss = pipe.step(x, y)
            out["losses"].append(None if loss is None else float(loss))
            if k == 0:
                named = pipe.named_parameters().items()
                out["grads"] = {n: p.grad.clone() for n, p in named if p.grad is not None}
            out["buffers"].append({n: t.clone() for n, t in pipe.state_dict().items()})
        out["params"] = {n: p.detach().clone() for n, p in pipe.named_parameters().items()}
        pipe.train(False)
        evaluated = pipe.evaluate(batches(case.model)[0][0])
        out["eval"] = _first(evaluated) if evaluated is not None else None
        out["deferred"] = sum(
            isinstance(m, DeferredBatchNorm)
            for s in pipe.my_stages
            for m in pipe.stages[s].module.modules()
        )
        results.append(out)
        torch.distributed.barrier()
    return results


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# --- in the test process ----------------------------------------------------------------------


def _reference(case: Case) -> dict[str, Any]:
    """The user's model, the same micro-batches one after another."""
    torch.manual_seed(0)
    model, _, loss_fn = factory(case.model)
    norms = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
    }
    seen: dict[str, list[Tensor]] = {n: [] for n in norms}
    for n, bn in norms.items():
        bn.register_forward_pre_hook(lambda _, args, n=n: seen[n].append(args[0].detach()))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out: dict[str, Any] = {"losses": [], "buffers": []}
    for k, (x, y) in enumerate(batches(case.model)):
        before = {n: copy.deepcopy(bn) for n, bn in norms.items()}
        for inputs in seen.values():
            inputs.clear()
        opt.zero_grad()
        losses = []
        for xi, yi in zip(x.tensor_split(M), y.tensor_split(M), strict=True):
            loss = loss_fn(model(xi), yi)
            (loss / M).backward()
            losses.append(loss.item())
        out["losses"].append(sum(losses) / M)
        if k == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        if case.batchnorm == "batch":  # what a BatchNorm fed the step's inputs as one batch keeps
            for n, bn in norms.items():
                whole = before[n].train()
                whole(torch.cat(seen[n]))
                bn.load_state_dict(whole.state_dict())
        opt.step()
        out["buffers"].append({n: t.clone() for n, t in model.state_dict().items()})
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        out["eval"] = model(batches(case.model)[0][0])
    return out


def _whole_batch_first_norm(name: str) -> dict[str, Tensor]:
    """The eager model's first BatchNorm after one forward on the whole first batch."""
    torch.manual_seed(0)
    model, _, _ = factory(name)
    model(batches(name)[0][0])
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return {f"bn1.{k}": getattr(model.bn1, k) for k in stats}


def _close(got: Tensor, want: Tensor, tol: float = 1e-10) -> bool:
    scale = max(1.0, float(want.double().abs().max()))
    return bool((got.double() - want.double()).abs().max() <= tol * scale)


@pytest.mark.timeout(300)
def test_batchnorm_matches_the_eager_model() -> None:
    plans = _plans()
    results = run_ranks(2, _train, CASES, plans, timeout=280)
    for i, case in enumerate(CASES):
        first, last = results[0][i], results[1][i]
        ref = _reference(case)
        assert first["losses"] == [None] * STEPS
        assert last["losses"] == pytest.approx(ref["losses"], rel=1e-10), case
        for what in ("grads", "params"):
            got = {**first[what], **last[what]}
            assert set(got) == set(ref[what]), (case, what)
            for name, value in got.items():
                assert _close(value, ref[what][name]), (case, what, name)
        for step in range(STEPS):
            got = {**first["buffers"][step], **last["buffers"][step]}
            want = ref["buffers"][step]
            assert set(got) == set(want), case
            for name, value in got.items():
                assert _close(value, want[name]), (case, step, name, value, want[name])
        # both ranks hold a BatchNorm, so both stages' statistics are checked
        for r in (first, last):
            assert any("running_mean" in n for n in r["buffers"][0]), case
        deferred = first["deferred"] + last["deferred"]
        assert deferred == (2 if case.batchnorm == "batch" else 0), case
        assert _close(last["eval"], ref["eval"]), case  # eval mode: the running statistics
        if case.batchnorm == "batch":
            whole = _whole_batch_first_norm(case.model)
            got = {**first["buffers"][0], **last["buffers"][0]}
            for name, value in whole.items():
                assert _close(got[name], value), (case, name)


# --- without ranks ----------------------------------------------------------------------------


def test_a_deferred_batchnorm_equals_one_batchnorm_on_the_whole_batch() -> None:
    """torchgpipe's test, our module: 4 micro-batches, one commit, the whole batch's statistics."""
    for bn in (nn.BatchNorm2d(3), nn.BatchNorm2d(3, momentum=None), nn.BatchNorm1d(3)):
        deferred = DeferredBatchNorm.of(copy.deepcopy(bn), microbatches=4)
        shape = (16, 3, 5, 5) if isinstance(bn, nn.BatchNorm2d) else (16, 3)
        for _ in range(2):
            x = torch.randn(shape) * 3 + 2
            out = torch.cat([deferred(chunk) for chunk in x.chunk(4)])
            bn(x)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                got, want = getattr(deferred, name), getattr(bn, name)
                assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6), name
        expected = torch.cat(
            [F.batch_norm(c, None, None, bn.weight, bn.bias, True) for c in x.chunk(4)]
        )
        assert torch.allclose(out, expected, atol=1e-6)  # each micro-batch: its own statistics


def test_conversion_keeps_names_and_tensors() -> None:
    import torch.fx as fx

    model = ConvBN()
    module = fx.symbolic_trace(model)
    before = dict(module.state_dict(keep_vars=True))
    assert defer_batchnorm(module, 2) == 2
    after = dict(module.state_dict(keep_vars=True))
    assert set(before) == set(after) and all(before[k] is after[k] for k in before)


def test_recompute_does_not_update_the_statistics_twice() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model, plain = MLPBN(), MLPBN()
    plain.load_state_dict(model.state_dict())
    xs = [torch.randn(4, 6) for _ in range(3)]
    outs = [
        checkpoint(
            model, x, use_reentrant=False, context_fn=functools.partial(recompute_contexts, model)
        )
        for x in xs
    ]
    for out in outs:
        out.sum().backward()
    for x in xs:
        plain(x).sum().backward()
    for name, value in plain.state_dict().items():
        assert torch.allclose(model.state_dict()[name].double(), value.double()), name
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.allclose(p.grad, q.grad)
