"""Train and eval modes survive tracing: `Pipeline.train(False)` runs the model's eval graph.

The bug: a forward reading ``self.training`` (``F.dropout(x, p, self.training)``, HF attention's
``p if self.training else 0.0``, a branch, or anything on the export route) was traced in train
mode only, so after ``train(False)`` evaluation still dropped out: the same input evaluated twice
gave outputs 0.86 apart. The references are the user's plain eager model in eval mode.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import Tensor, nn

from partition import plan_model
from partition.devices import parse_devices
from partition.errors import PlanError
from partition.models import examples
from partition.models.registry import build_meta_model
from partition.modes.modal import ModalStage, OtherMode, stage_module, trace_modes
from partition.modes.split import modal_stages
from partition.planning.analysis import Analysis, analyze_traced
from partition.split import split
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

# --- models (module level: the ranks import them) ----------------------------------------------


class FunctionalDropout(nn.Module):
    """``F.dropout(..., self.training)`` and a branch taken in train mode only."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, width)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(torch.tanh(self.fc1(x)), 0.5, self.training)
        if self.training:  # nodes of one mode only: the cuts must still pair up
            h = h + 0.1 * torch.tanh(h)
        h = F.dropout(torch.tanh(self.fc2(h)), p=0.5, training=self.training)
        return self.fc3(h) + x


class HFAttention(nn.Module):
    """Attention written as HF writes it: the dropout probability depends on the mode."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)
        self.attention_dropout = 0.5

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        dropout = 0.0 if not self.training else self.attention_dropout
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // self.heads), dim=-1)
        weights = F.dropout(weights, p=dropout, training=self.training)  # (B, nh, T, T)
        y = (weights @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.out(y)
        return x + F.dropout(torch.tanh(self.mlp(x)), p=dropout, training=self.training)


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HFAttention() for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TrainOnlyOutput(nn.Module):
    """A tensor that only train mode computes crosses the middle of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        extra = self.aux(h) if self.training else None
        h = self.b(torch.relu(h))
        return h + extra.mean() if extra is not None else h


class SameInBothModes(nn.Module):
    """Reads ``self.training`` but computes the same thing in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.rate = 0.0

    def forward(self, x: Tensor) -> Tensor:
        p = self.rate if self.training else 0.0
        return F.dropout(self.a(x), p=p, training=True)


MODELS: dict[str, Any] = {
    "functional": (FunctionalDropout, (8, 16)),
    "hf": (HFStyle, (4, 6, 16)),
}


def _tensor(out: Any) -> Tensor:
    """The model's output (the export route's last stage returns it as a flat tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _mse(out: Any, target: Tensor) -> Tensor:
    return F.mse_loss(_tensor(out), target)


def factory(name: str) -> Any:
    cls, shape = MODELS[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    return cls(), (x,), _mse


# --- without ranks: every cut of both routes -------------------------------------------------


def analyze_modes(
    model: nn.Module, inputs: tuple[Any, ...], *, microbatches: int = 1, method: str = "auto"
) -> tuple[Analysis, OtherMode | None]:
    """Both modes traced, the model's own costed: what a rank given a plan builds from."""
    traced, other = trace_modes(model, inputs, microbatches=microbatches, method=method)  # type: ignore[arg-type]
    return analyze_traced(traced, microbatches=microbatches), other


@pytest.mark.parametrize("route", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_cut_runs_the_eval_graph(name: str, route: str) -> None:
    """Split at every cut, the eval stages chained give the eager model's eval output."""
    torch.manual_seed(0)
    model, (x,), _ = factory(name)
    analysis, other = analyze_modes(model, (x,), method=route)  # type: ignore[arg-type]
    assert other is not None and other.mode is False
    n = len(analysis.graph)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    refused = []
    for cut in range(1, n):
        try:
            stages = modal_stages(
                analysis.traced, other, split(analysis.traced, analysis.graph, [0, cut, n])
            )
        except PlanError as e:
            assert "stage 1 cannot receive the same tensors in both modes" in str(e)
            refused.append(cut)
            continue
        assert all(isinstance(s, ModalStage) and s.other is not None for s in stages)
        values: Any = (x,)
        with torch.no_grad():
            for stage in stages:
                values = stage_module(stage, False)(*values)
        got = values[0] if isinstance(values, (tuple, list)) else values
        assert torch.allclose(got, expected, atol=1e-6), (cut, (got - expected).abs().max())
        # the traced mode is untouched: train mode still drops out
        with torch.no_grad():
            values = (x,)
            for stage in stages:
                values = stage_module(stage, True)(*values)
        got = values[0] if isinstance(values, (tuple, list)) else values
        assert not torch.allclose(got, expected, atol=1e-3), cut
    # inside `h + 0.1 * tanh(h)` two tensors cross (h, and tanh(h) or its product) where eval
    # mode has one: the two cuts there are refused, every other cut runs
    assert len(refused) == (2 if name == "functional" else 0), refused


def test_a_cut_with_no_partner_names_the_stage() -> None:
    model = TrainOnlyOutput()
    x = torch.randn(4, 8)
    analysis, other = analyze_modes(model, (x,), method="fx")
    assert other is not None
    names = list(analysis.graph.names)
    cut = names.index("relu")  # `aux(a)` is live here in train mode only
    with pytest.raises(PlanError, match=r"stage 1 cannot receive the same tensors in both modes"):
        modal_stages(
            analysis.traced, other, split(analysis.traced, analysis.graph, [0, cut, len(names)])
        )


def test_models_that_do_not_read_the_mode_are_traced_once() -> None:
    built = build_meta_model(functools.partial(examples.gpt, "toy", batch=4))
    _, other = analyze_modes(built.model, built.args or (), microbatches=2)
    assert other is None  # nn.Dropout is a leaf: it follows the mode at run time
    _, other = analyze_modes(built.model, built.args or (), microbatches=2, method="export")
    assert other is None  # export traces nn.Dropout(p=0) through: the same in both modes
    _, other = analyze_modes(SameInBothModes(), (torch.randn(4, 8),), method="fx")
    assert other is None  # read, traced again, found equal: one graph kept


def test_a_model_that_does_not_read_the_mode_is_traced_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tracing both modes costs nothing for a model whose forward does not read the mode: one
    trace, not two (counted, not timed)."""
    import partition.modes.modal as modal

    calls: list[str] = []
    original = modal.trace

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("trace")
        return original(*args, **kwargs)

    monkeypatch.setattr(modal, "trace", counting)
    plain = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.ReLU(), nn.Linear(8, 2))
    _, other = trace_modes(plain, (torch.randn(4, 8),), method="fx")
    assert other is None and calls == ["trace"]  # nn.Dropout is a leaf: read at run time only
    calls.clear()
    model, (x,), _ = factory("functional")  # reads self.training: traced in both modes
    _, other = trace_modes(model, (x,), method="fx")
    assert other is not None and calls == ["trace", "trace"]


# --- on ranks ---------------------------------------------------------------------------------


def _evaluate(name: str, plan: Any) -> dict[str, Any]:
    pipe = Pipeline(
        functools.partial(factory, name), plan=plan, options=PipelineOptions(microbatches=2)
    )
    _, (x,), _ = factory(name)
    out: dict[str, Any] = {
        "modal": any(isinstance(pipe.stages[s], ModalStage) for s in pipe.my_stages)
    }

    def evaluate() -> Tensor | None:  # every rank takes part; the output is on the last
        got = pipe.evaluate(x)
        return None if got is None else _tensor(got)

    pipe.train(False)
    out["eval"] = [evaluate(), evaluate()]
    pipe.train(True)
    out["train"] = evaluate()
    loss = pipe.step(x, torch.zeros_like(x))  # training runs the train graph, with autograd
    out["loss"] = None if loss is None else float(loss)
    pipe.train(False)
    out["after"] = evaluate()
    out["params"] = {n: p.detach().clone() for n, p in pipe.named_parameters().items()}
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("route", ["fx", "export"])
def test_pipeline_eval_equals_the_eager_model_in_eval_mode(route: str) -> None:
    plans = {}
    for name in sorted(MODELS):
        meta = build_meta_model(functools.partial(factory, name))
        plans[name] = plan_model(
            meta.model,
            meta.args or (),
            devices=parse_devices("cpu", 2),
            microbatches=2,
            method=route,  # type: ignore[arg-type]
        )

    names = sorted(MODELS)
    results = run_ranks(2, _run_all, names, plans, timeout=160)
    for k, name in enumerate(names):
        first, last = results[0][k], results[1][k]
        assert first["modal"] and last["modal"], name
        torch.manual_seed(0)
        model, (x,), _ = factory(name)
        model.eval()
        with torch.no_grad():
            expected = model(x)
        one, two = last["eval"]
        assert torch.equal(one, two), name  # no dropout left in eval mode
        assert (one - expected).abs().max() < 1e-6, name
        assert (last["train"] - expected).abs().max() > 1e-2, name  # train mode drops out
        assert first["eval"] == [None, None] and last["loss"] is not None
        # after a step, eval mode sees the trained weights
        trained = {**first["params"], **last["params"]}
        model.load_state_dict(trained)
        with torch.no_grad():
            expected = model(x)
        assert (last["after"] - expected).abs().max() < 1e-6, name


def _run_all(names: list[str], plans: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for name in names:
        results.append(_evaluate(name, plans[name]))
        torch.distributed.barrier()
    return results
