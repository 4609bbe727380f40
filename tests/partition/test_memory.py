"""The stage memory model: bytes per parameter and in-flight micro-batches per schedule."""

from __future__ import annotations

import pytest

from partition.errors import PlanError
from partition.memory import MemoryModel, replicated_memory
from partition.schedules.inflight import inflight_microbatches


@pytest.mark.parametrize(
    ("optimizer", "master", "element", "per_param"),
    [
        ("none", False, 4, 4),  # inference: weights only
        ("sgd", False, 4, 8),  # + gradients
        ("sgd-momentum", False, 4, 12),
        ("adam", False, 4, 16),
        ("adam", True, 2, 16),  # bf16 weights + grads, fp32 master + two fp32 states: 2+2+4+8
        ("sgd-momentum", True, 2, 12),  # 2 + 2 + 4 (momentum, fp32) + 4 (master)
    ],
)
def test_bytes_per_parameter(optimizer: str, master: bool, element: int, per_param: int) -> None:
    model = MemoryModel(optimizer=optimizer, master_weights=master)  # type: ignore[arg-type]
    assert model.bytes_per_param_byte(element) * element == per_param


def test_schedules_keep_what_theory_says() -> None:
    assert [inflight_microbatches("gpipe", s, 4, 8) for s in range(4)] == [8] * 4
    assert [inflight_microbatches("1f1b", s, 4, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [inflight_microbatches("1f1b", s, 4, 2) for s in range(4)] == [2, 2, 2, 1]
    # ZB-H1 defers W, so every stage holds p micro-batches (it read [4, 3, 2, 1], as 1F1B)
    assert [inflight_microbatches("zb-h1", s, 4, 8) for s in range(4)] == [4, 4, 4, 4]
    assert [inflight_microbatches("zb-h1", s, 4, 2) for s in range(4)] == [2, 2, 2, 2]


def test_bad_names() -> None:
    with pytest.raises(PlanError, match="unknown optimizer"):
        MemoryModel(optimizer="lion")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="unknown schedule"):
        inflight_microbatches("dualpipe", 0, 2, 2)


def test_replicas_add_a_gradient_copy_under_ddp_and_shard_the_optimizer_under_fsdp() -> None:
    """[Note: memory with replicas]: fp32 Adam, W bytes of weights, A of activations."""
    w, a = 100.0, 30.0
    parts = {"weights": w, "gradients": w, "optimizer": 2 * w, "activations": a, "buffers": 0.0}
    assert replicated_memory({**parts, "total": 4 * w + a}, w, 1, "fsdp") == 4 * w + a
    assert replicated_memory(parts, w, 2, "ddp") == 5 * w + a  # the flat copy reduced
    # gathered weights and unsharded gradients at the peak, beside their shards: 4W + A at dp=2
    assert replicated_memory(parts, w, 2, "fsdp") == 4 * w + a
    assert replicated_memory(parts, w, 8, "fsdp") == 2.5 * w + a  # 2W + 2W/8 + 2W/8
    inference = {**parts, "gradients": 0.0, "optimizer": 0.0}
    assert replicated_memory(inference, w, 8, "ddp") == w + a  # nothing to reduce
    with pytest.raises(PlanError, match="unknown reduction 'zero'"):
        replicated_memory(parts, w, 2, "zero")
