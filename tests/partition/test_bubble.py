"""`partition.planning.bubble`: a plan whose pipeline mostly idles says how to fill it."""

from __future__ import annotations

import torch
from torch import nn

from partition import plan_model
from partition.devices import parse_devices
from partition.plan import Plan
from partition.planning.bubble import POOR_BUBBLE, bubble_note
from partition.planning.predict import simulate_plan


def _plan(stages: int, microbatches: int, bandwidth: str = "h100,bw=100TB/s") -> Plan:
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(2 * stages)])
    return plan_model(
        model,
        (torch.empty(16384, 4096, device="meta"),),
        devices=parse_devices(bandwidth, stages),  # compute-bound unless told otherwise
        schedule="1f1b",
        microbatches=microbatches,
    )


def test_a_poor_plan_names_the_fewest_micro_batches_that_fill_it() -> None:
    plan = _plan(8, 2)
    assert plan.bubble > POOR_BUBBLE  # (8 - 1) / (2 + 8 - 1): most of the step idles
    note = bubble_note(plan)
    assert note is not None and note.startswith(f"bubble {plan.bubble:.0%} with 2 micro-batches")
    m = int(note.split("--microbatches ")[1].split()[0])
    assert simulate_plan(plan, microbatches=m).bubble_fraction <= POOR_BUBBLE
    assert simulate_plan(plan, microbatches=m // 2).bubble_fraction > POOR_BUBBLE  # the fewest


def test_a_full_pipeline_says_nothing() -> None:
    plan = _plan(2, 16)
    assert plan.bubble <= POOR_BUBBLE
    assert bubble_note(plan) is None


def test_a_pipeline_its_links_hold_says_no_count_fills_it() -> None:
    plan = _plan(8, 2, bandwidth="h100,bw=1GB/s")  # every micro-batch waits on its links
    note = bubble_note(plan)
    assert (
        note is not None and "no schedule of this split and no micro-batch count up to 128" in note
    )
