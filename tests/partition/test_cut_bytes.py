"""What crosses a cut is computed twice — the partitioner's ``cut_bytes`` (`partition.graph`) and
the tensors a split stage actually sends (`partition.split`) — and the two must agree."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from partition import analyze
from partition.models import examples
from partition.split import split


def _models() -> list[tuple[str, Any]]:
    return [
        ("gpt", lambda: examples.gpt("toy", batch=4)),
        ("skipnet", lambda: examples.skipnet(batch=4)),  # a skip across stages
        ("two-tower", lambda: examples.two_tower(batch=4)),  # two inputs, two outputs
    ]


@pytest.mark.parametrize(("name", "factory"), _models())
def test_every_cut_sends_what_the_partitioner_priced(name: str, factory: Any) -> None:
    with torch.device("meta"):
        model, inputs, *_ = factory()
    analysis = analyze(model, inputs, microbatches=2)
    graph = analysis.graph
    n = len(graph)
    checked = 0
    for cut in range(1, n, max(1, n // 40)):  # ~40 cuts along the order, a 2-stage split each
        stages = split(analysis.traced, graph, [0, cut, n])
        sent = sum(spec.nbytes for spec in stages[0].outputs)
        assert sent == pytest.approx(float(graph.cut_bytes[cut])), (name, cut, graph.names[cut])
        checked += 1
    assert checked >= min(n - 1, 20)
