"""The partitioning problem: checked on construction, with its stages, caps and in-flight counts."""

from __future__ import annotations

import dataclasses

import pytest

from partition.algorithms.problem import DEFAULT_MEMORY, Problem
from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph
from partition.memory import MemoryModel

GRAPH = LinearGraph.from_arrays([1.0] * 6, [8.0] * 6, [2.0] * 6, [1.0] * 5)
A = Device(name="a", memory=1000, flops=1.0)
B = Device(name="b", memory=600, flops=2.0)


def _problem(**changes: object) -> Problem:
    fields: dict[str, object] = {
        "graph": GRAPH,
        "devices": (A, B, A),
        "schedule": "1f1b",
        "microbatches": 8,
    }
    fields.update(changes)
    return Problem(**fields)  # type: ignore[arg-type]


def test_stages_devices_and_caps() -> None:
    p = _problem()
    assert p.num_stages == 3 and p.caps == (1000, 600, 1000)
    assert [p.stage_device(s).name for s in range(3)] == ["a", "b", "a"]
    # interleaved: stage s on device s % p, each stage a 1/v share of its device
    v = _problem(devices=[A, B], schedule="interleaved", virtual=2)
    assert v.devices == (A, B)  # a list is stored as a tuple
    assert v.num_stages == 4 and v.caps == (500, 300, 500, 300)
    assert [v.stage_device(s).name for s in range(4)] == ["a", "b", "a", "b"]


def test_in_flight_counts_are_the_schedules() -> None:
    assert _problem().inflight == (3, 2, 1)  # 1F1B: min(k - s, m)
    assert _problem(schedule="gpipe").inflight == (8, 8, 8)  # GPipe: every micro-batch
    assert _problem(schedule="zb-h1").inflight == (3, 3, 3)  # ZB-H1: min(k, m)
    assert _problem(microbatches=2).inflight == (2, 2, 1)
    assert _problem().inflight_for(5) == (5, 4, 3, 2, 1)


def test_bytes_held_per_parameter_byte() -> None:
    assert _problem().kappa == 4.0  # weights, gradients and Adam's two states
    assert _problem(memory=MemoryModel(optimizer="none")).kappa == 1.0
    bf16 = dataclasses.replace(GRAPH, param_element_size=2.0)
    # bf16 weights, Adam in fp32 with a master copy: (2 + 2 + 8 + 4) / 2 bytes per byte
    assert _problem(graph=bf16, memory=MemoryModel(master_weights=True)).kappa == 8.0
    assert MemoryModel() == DEFAULT_MEMORY


def test_the_schedule_is_stored_canonical() -> None:
    assert _problem(schedule="One_F_One_B").schedule == "1f1b"
    assert _problem(schedule="zero-bubble").schedule == "zb-h1"


def test_the_costs_are_made_once() -> None:
    p = _problem()
    assert p.costs is p.costs and p.costs.k == 3 and p.costs.n == 6


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"devices": ()}, "no devices given"),
        ({"devices": ("h100",)}, "devices must be Device objects, got str"),
        ({"graph": [1.0, 2.0]}, "graph must be a LinearGraph, got list"),
        ({"microbatches": 0}, "micro-batches must be at least 1, got 0"),
        ({"microbatches": True}, "micro-batches must be an integer, got True"),
        ({"microbatches": 2.0}, "micro-batches must be an integer, got 2.0"),
        ({"virtual": 0}, "virtual stages per device must be a positive integer, got 0"),
        ({"virtual": 2}, "virtual=2 needs the interleaved schedule, not '1f1b'"),
        ({"schedule": "zigzag"}, "unknown schedule 'zigzag'"),
        ({"memory": "adam"}, "memory must be a MemoryModel, got str"),
    ],
)
def test_bad_problems_say_what_is_wrong(changes: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        _problem(**changes)


def test_a_message_costs_each_stage_its_overhead_each_way_by_hand() -> None:
    # Cut 2 carries 1 byte: at 2 B/s with 0.1 s latency and 0.05 s per message on each rank, the
    # activation and its gradient cost both stages around the cut 2 x (0.1 + 0.05 + 0.5) s.
    a = dataclasses.replace(A, bandwidth=2.0, latency=0.1, message_overhead=0.05)
    costs = _problem(devices=(a, a)).costs
    times = costs.split_times((0, 2, 6))
    assert times.tolist() == pytest.approx([2 + 1.3, 4 + 1.3])
    assert costs.time(0, 0, 2) == pytest.approx(2 + 1.3)
