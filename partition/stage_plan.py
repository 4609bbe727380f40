"""One stage of a plan (`StagePlan`): where it runs, what it holds and what it costs, with its
JSON form; `partition.plan` holds the whole plan and re-exports it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from partition.devices import Device
from partition.graph import LinearGraph
from partition.wires import TensorSpec

__all__ = ["StagePlan", "stage_graph"]


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One stage of a plan: where it runs, what it holds and what it costs."""

    index: int
    device: Device
    start: int
    """First node index in the plan's order (inclusive)."""
    stop: int
    """Last node index + 1."""
    first_node: str
    last_node: str
    first_module: str
    last_module: str
    flops: float
    """Forward + backward FLOPs per micro-batch (FLOP-equivalents if profiled)."""
    forward_flops: float
    param_bytes: int
    memory: dict[str, float]
    """``weights``, ``gradients``, ``optimizer``, ``activations``, ``buffers`` and ``total`` bytes."""
    capacity: int
    compute_time: float
    """Seconds of forward + backward compute per micro-batch on its device."""
    comm_time: float
    """Seconds per micro-batch sending and receiving across its cuts."""
    saved_bytes: float = 0.0
    """Activation bytes one micro-batch keeps on this stage until its backward."""
    inflight: int = 1
    """Micro-batches of activations the schedule keeps alive here at peak."""
    send_bytes: float = 0.0
    """Bytes per micro-batch crossing the cut after this stage (0 for the last)."""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    dispatched: float = 0.0
    """Operations its nodes dispatch per forward (`LinearGraph.dispatched` summed), each paying
    the device's fixed costs; a plan file without it counts every node."""

    @property
    def time(self) -> float:
        """The stage's term of the objective: compute + communication per micro-batch."""
        return self.compute_time + self.comm_time

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "device": self.device.to_dict(),
            "nodes": {
                "start": self.start,
                "stop": self.stop,
                "first": self.first_node,
                "last": self.last_node,
            },
            "modules": {"first": self.first_module, "last": self.last_module},
            "flops": self.flops,
            "forward_flops": self.forward_flops,
            "param_bytes": self.param_bytes,
            "memory": dict(self.memory),
            "capacity": self.capacity,
            "compute_time": self.compute_time,
            "comm_time": self.comm_time,
            "time": self.time,
            "saved_bytes": self.saved_bytes,
            "inflight": self.inflight,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "send_bytes": self.send_bytes,
            "dispatched": self.dispatched,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagePlan:
        return cls(
            index=int(data["index"]),
            device=Device.from_dict(data["device"]),
            start=int(data["nodes"]["start"]),
            stop=int(data["nodes"]["stop"]),
            first_node=str(data["nodes"]["first"]),
            last_node=str(data["nodes"]["last"]),
            first_module=str(data["modules"]["first"]),
            last_module=str(data["modules"]["last"]),
            flops=float(data["flops"]),
            forward_flops=float(data["forward_flops"]),
            param_bytes=int(data["param_bytes"]),
            memory={str(k): float(v) for k, v in data["memory"].items()},
            capacity=int(data["capacity"]),
            compute_time=float(data["compute_time"]),
            comm_time=float(data["comm_time"]),
            saved_bytes=float(data["saved_bytes"]),
            inflight=int(data["inflight"]),
            send_bytes=float(data["send_bytes"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            dispatched=float(
                data.get("dispatched", data["nodes"]["stop"] - data["nodes"]["start"])
            ),
        )


def stage_graph(stages: Sequence[StagePlan], param_element_size: float) -> LinearGraph:
    """A plan's stages as the nodes of one graph (a stage's costs on one node, the bytes it sends
    on the cut after it), for the partitioner's objective to price them on other devices or
    other bounds. Its buffers are what its weights hold beyond its parameters."""
    buffers = [max(s.memory.get("weights", s.param_bytes) - s.param_bytes, 0.0) for s in stages]
    return LinearGraph(
        names=tuple(f"stage{s.index}" for s in stages),
        module_paths=tuple(s.first_module for s in stages),
        compute=np.array([s.flops for s in stages], dtype=np.float64),
        forward=np.array([s.forward_flops for s in stages], dtype=np.float64),
        param_bytes=np.array([s.param_bytes for s in stages], dtype=np.float64),
        saved_bytes=np.array([s.saved_bytes for s in stages], dtype=np.float64),
        cut_bytes=np.array([0.0, *(s.send_bytes for s in stages[:-1]), 0.0]),
        param_element_size=param_element_size,
        buffer_bytes=np.array(buffers, dtype=np.float64),
        dispatched=np.array([s.dispatched for s in stages], dtype=np.float64),
    )
