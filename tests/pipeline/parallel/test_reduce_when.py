"""When the reduction over replicas starts (``pipe.sync.when``): as each stage's last backward
ends, or all after the schedule. Where it starts changes no bit of the result: 2 replicas of a
2-stage interleaved pipeline (each rank holds two stages, so "stage" starts the later stage's
buckets while the earlier one still computes) give the same gradients both ways."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from harness import run_ranks

from partition.models import examples
from pipeline.parallel.data import shard
from pipeline.runtime.pipeline import Pipeline, PipelineOptions


def _skipnet() -> Any:
    model, (x,), loss = examples.skipnet(batch=4)
    return model.double(), (x.double(),), loss


def _both_ways() -> dict[str, Any]:
    options = PipelineOptions(
        schedule="interleaved", microbatches=4, virtual=2, bounds=(0, 7, 14, 21, 29), dp=2
    )
    pipe = Pipeline(_skipnet, options=options)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(8, 16, generator=g, dtype=torch.float64) for _ in range(2))
    x, y = shard((x, y), pipe.replica, pipe.dp)
    grads, hooks = {}, {}
    for when in ("stage", "end"):
        pipe.sync.when = when  # type: ignore[assignment]
        hooks[when] = len(pipe.sync.hooks(accumulate=False))
        pipe.step(x, y)
        grads[when] = {n: p.grad.clone() for n, p in pipe.named_parameters().items()}
    return {"grads": grads, "hooks": hooks}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_reducing_at_the_end_gives_the_same_gradients_as_stage_by_stage() -> None:
    for rank in run_ranks(4, _both_ways, timeout=150):
        assert rank["hooks"] == {"stage": 2, "end": 0}  # a rank's two stages: two ready points
        stage, end = rank["grads"]["stage"], rank["grads"]["end"]
        assert stage.keys() == end.keys() and stage
        assert all(torch.equal(stage[n], end[n]) for n in stage)
