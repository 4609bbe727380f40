"""The export route traces a model on meta as if on the CPU: a branch on ``device.type`` takes
the CPU's way, not a way no real device would (see [Note: tracing as on the CPU])."""

from __future__ import annotations

import torch
from torch import nn

from partition import trace_model


class DeviceBranch(nn.Module):
    """transformers' MoE routing has this shape: histc wants floats on the CPU, ints elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if x.device.type in ("cpu", "mps") else 3.0
        return self.fc(x) * scale


def test_a_device_branch_is_traced_as_on_the_cpu() -> None:
    with torch.device("meta"):
        model = DeviceBranch()
    traced = trace_model(model, (torch.empty(2, 4, device="meta"),), method="export")
    scales = [
        n.args[1]
        for n in traced.graph.nodes
        if n.op == "call_function" and "mul" in str(n.target) and len(n.args) > 1
    ]
    assert scales == [2.0], scales
    assert all(p.device.type == "meta" for p in model.parameters())  # the model is left as it was
