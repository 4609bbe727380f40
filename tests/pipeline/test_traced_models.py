"""What tracing keeps reaches the ranks: in-place ops on received activations, tensor constants,
a custom autograd Function's backward — on 2 gloo ranks, against the plain eager model.

Each model marks its cut with ``pipe_split()`` and is planned with ``cuts="markers"``, so the
second stage starts exactly where the hazard is: an ``add_`` and an ``nn.ReLU(inplace=True)`` on
the activations it receives (leaves that require grad), a tensor default argument, a
gradient-reversal ``Function``. The reference is ``torch.manual_seed(0); factory()`` trained in
one process on the whole batch; float64, held to 1e-10.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import Tensor, nn
from torch.distributed.pipelining import pipe_split

from partition import plan_model
from partition.devices import parse_devices
from partition.plan import Plan
from pipeline.runtime.pipeline import Pipeline

D, BATCH, STEPS = 8, 4, 2
_DEFAULT = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)


class InPlaceStart(nn.Module):
    """The second stage's first op writes in place into what it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h, g = self.fc1(x), self.fc2(x)
        pipe_split()
        h.add_(g)  # in place, on a received activation
        return self.fc3(self.act(h))  # and again


class DefaultArg(nn.Module):
    """A tensor default argument read after the cut (PyTorch's ``ModelWithKwargs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: Tensor, y: Tensor = _DEFAULT) -> Tensor:
        h = torch.tanh(self.fc1(x))
        pipe_split()
        return self.fc2(h + y) * (y + torch.tensor(2.0, dtype=torch.float64))


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


class Reversal(nn.Module):
    """A gradient-reversal layer as the second stage's first op."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.head = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.features(x))
        pipe_split()
        return self.head(torch.tanh(_Reverse.apply(h)))


MODELS = {"inplace": InPlaceStart, "default": DefaultArg, "reversal": Reversal}
CASES = [("inplace", "fx"), ("inplace", "export"), ("default", "fx"), ("default", "export")]
CASES += [("reversal", "fx")]


def factory(name: str) -> Any:
    model = MODELS[name]().double()
    return model, (torch.randn(BATCH, D, dtype=torch.float64),), F.mse_loss


def _batches() -> list[tuple[Tensor, Tensor]]:
    """One (inputs, target) per step, the same on every rank and in the reference."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, D, generator=g, dtype=torch.float64)
        out.append((x, torch.randn(BATCH, D, generator=g, dtype=torch.float64)))
    return out


def _plan(name: str, method: Any) -> Plan:
    with torch.device("meta"):
        model, inputs, _ = factory(name)
    devices = parse_devices("cpu", 2)
    return plan_model(model, inputs, devices=devices, microbatches=2, cuts="markers", method=method)


def _optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def _train(cases: list[tuple[str, Plan]]) -> list[dict[str, Any]]:
    results = []
    for name, plan in cases:
        pipe = Pipeline(functools.partial(factory, name), plan=plan, optimizer_factory=_optimizer)
        losses, grads = [], {}
        for k, (x, y) in enumerate(_batches()):
            loss = pipe.step(x, y)
            losses.append(None if loss is None else float(loss))
            if k == 0:
                grads = {n: p.grad.clone() for n, p in pipe.named_parameters().items()}
        params = {n: p.detach().clone() for n, p in pipe.named_parameters().items()}
        results.append({"losses": losses, "grads": grads, "params": params})
        torch.distributed.barrier()
    return results


def _reference(name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model, _, loss_fn = factory(name)
    opt = _optimizer(model.parameters())
    losses, grads = [], {}
    for k, (x, y) in enumerate(_batches()):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if k == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads, "params": dict(model.named_parameters())}


@pytest.mark.timeout(240)
def test_two_ranks_train_exactly_like_the_eager_model() -> None:
    plans = [(name, _plan(name, method)) for name, method in CASES]
    assert all(
        plan.model.trace_method == method
        for (_, method), (_, plan) in zip(CASES, plans, strict=False)
    )
    results = run_ranks(2, _train, plans, timeout=200)
    for i, (name, method) in enumerate(CASES):
        ref, ranks = _reference(name), [r[i] for r in results]
        where = f"{name} ({method})"
        (last,) = [r for r in ranks if r["losses"][0] is not None]
        assert last["losses"] == pytest.approx(ref["losses"], abs=1e-10, rel=1e-10), where
        for what in ("grads", "params"):
            seen = {n: v for r in ranks for n, v in r[what].items()}
            assert seen.keys() == ref[what].keys(), where
            for n, v in seen.items():
                diff = (v - ref[what][n].detach()).abs().max().item()
                assert diff <= 1e-10, f"{where}: {what[:-1]} {n} differs by {diff:.3g}"
    flipped = _reference("reversal")["grads"]["features.weight"]
    assert flipped.abs().sum() > 0  # the reversal's sign is in the gradients compared
