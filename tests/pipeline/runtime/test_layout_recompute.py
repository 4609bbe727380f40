"""`pipeline.runtime.layout`: a plan priced with recomputation runs with it, and a pipeline asked
to recompute plans its memory so."""

from __future__ import annotations

from dataclasses import replace

import torch

from partition.devices import parse_devices
from partition.memory import MemoryModel
from partition.models import examples
from partition.models.registry import BuiltModel
from partition.planning.model import plan_model
from pipeline.runtime.layout import planning_options, recompute_of
from pipeline.runtime.options import PipelineOptions


def _plan(recompute: bool):
    with torch.device("meta"):
        model, args, _ = examples.gpt("toy", batch=4)
    return plan_model(
        model,
        args,
        devices=parse_devices("cpu", 2),
        microbatches=2,
        memory=replace(MemoryModel(), recompute=recompute),
    )


def test_a_plan_priced_with_recompute_runs_with_it() -> None:
    with_it, without = _plan(True), _plan(False)
    assert recompute_of(with_it, PipelineOptions()) is True
    assert recompute_of(without, PipelineOptions()) is False
    assert recompute_of(without, PipelineOptions(recompute=True)) is True


def test_a_pipeline_asked_to_recompute_plans_its_memory_so() -> None:
    with torch.device("meta"):
        model, args, loss = examples.gpt("toy", batch=4)
    built = BuiltModel(model, tuple(args), {}, loss)
    asked = planning_options(built, PipelineOptions(microbatches=2, recompute=True))
    plain = planning_options(built, PipelineOptions(microbatches=2))
    assert asked.memory.recompute and not plain.memory.recompute
