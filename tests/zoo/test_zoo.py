"""The model zoo: every model of `zoo.models.ZOO` plans at its published size and trains at a tiny
size exactly like the model its factory builds.

Per model: ``test_plan`` plans the real-size model on meta for 4 devices; ``test_run`` trains the
tiny one on 2 gloo ranks under 1f1b and on 3 under gpipe (2 micro-batches, 2 SGD steps at lr
1e-2; every rank must hold work) and compares with the factory's own eager model
(``torch.manual_seed(0); factory("tiny")``) over the same micro-batches:
each step's loss, every gradient of the first step, every parameter and buffer after the second
(eval-mode output for a model whose training is random). Tolerance, fp32: 1e-5 relative — a loss
to its own magnitude, a gradient to its tensor's largest magnitude, a parameter or buffer to the
largest of the model's; NaN, inf, a missing tensor or a shape mismatch always fails (see [Note:
the zoo's comparison] in `zoo.parity`). The runs of all selected models share spawns
([Note: one spawn for many models]). A model whose library (torchvision, timm, transformers,
diffusers: the ``zoo`` extra) is not installed is skipped.

``python tests/zoo/survey.py`` prints the same checks as a table.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from zoo.models import ZOO
from zoo.parity import SETUPS, Outcome, Setup, check_plan, check_runs

# [Note: the zoo's expected failures]
# Each mark names the work in progress that the model waits for (issue 9); the lead removes a
# mark when its fix lands (strict: a mark on a model that passes fails the suite).
XFAIL_PLAN: dict[str, str] = {}
XFAIL_RUN: dict[str, str] = {}


def _available(name: str) -> bool:
    library = ZOO[name].library
    return library == "torch" or importlib.util.find_spec(library) is not None


def _params(xfail: dict[str, str]) -> list[Any]:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=xfail[n])) if n in xfail else n
        for n in ZOO
    ]


def _require(name: str) -> None:
    library = ZOO[name].library
    if library != "torch":
        pytest.importorskip(library, reason=f'{library} is not installed (the "zoo" extra)')


TESTED_SETUPS = SETUPS[:2]  # 2 ranks under 1f1b, 3 under gpipe; the survey runs all four


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> dict[Setup, dict[str, Outcome]]:
    """Every selected ``test_run`` model's outcome per setup, from shared spawns."""
    selected: dict[Setup, list[str]] = {s: [] for s in TESTED_SETUPS}
    for item in request.session.items:
        if (
            isinstance(item, pytest.Function)
            and item.originalname == "test_run"
            and item.module is request.module
        ):
            name = str(item.callspec.params["name"])
            if _available(name):
                selected[item.callspec.params["setup"]].append(name)
    return {s: check_runs(list(dict.fromkeys(names)), s) for s, names in selected.items()}


@pytest.mark.slow
@pytest.mark.timeout(300)  # hf-mamba: torch.export of both modes, 6k nodes
@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")  # trained-weights on meta
@pytest.mark.parametrize("name", _params(XFAIL_PLAN))
def test_plan(name: str) -> None:
    _require(name)
    check_plan(name)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first one runs the whole zoo (the `runs` fixture)
@pytest.mark.parametrize("setup", TESTED_SETUPS, ids=lambda s: f"{s.world}-{s.schedule}")
@pytest.mark.parametrize("name", _params(XFAIL_RUN))
def test_run(name: str, setup: Setup, runs: dict[Setup, dict[str, Outcome]]) -> None:
    _require(name)
    outcome = runs[setup][name]
    assert outcome.ok, f"{name} ({setup}): {outcome.summary()}; all problems: {outcome.problems}"


@pytest.mark.parametrize("name", list(ZOO))
def test_factory_contract(name: str) -> None:
    """Weights follow the global seed, inputs and target do not; a batch of 4 splits in 2."""
    _require(name)
    built = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model, inputs, _, target = ZOO[name].factory("tiny")
        built.append((model.state_dict(), inputs, target))
    (w0, x0, t0), (w0b, x0b, t0b), (w1, x1, t1) = built
    assert all(torch.equal(w0[k], w0b[k]) for k in w0), "not deterministic given the seed"
    values = x0.values() if isinstance(x0, dict) else x0
    others = [x0b, x1]
    for other in others:
        got = other.values() if isinstance(other, dict) else other
        assert all(torch.equal(a, b) for a, b in zip(values, got, strict=True)), "inputs vary"
    assert torch.equal(t0, t0b) and torch.equal(t0, t1), "the target depends on the seed"
    assert t0.shape[0] == 4
    random = [k for k in w0 if w0[k].is_floating_point() and w0[k].numel() > 1]
    if name != "trained-weights":  # loaded from a file, whatever the seed
        assert any(not torch.equal(w0[k], w1[k]) for k in random), "the factory seeds itself"
