"""Measured node times: run every node on real tensors on a device and time forward and backward.

The FLOP model prices a node by its FLOPs over a device's sustained FLOP/s, which misjudges ops
that are bound by memory traffic or launch overhead. `profile` measures instead: each compute
node runs on random tensors of its traced shapes (integer inputs are zeros, valid as indices),
with freshly allocated weights of its own — one node's worth of memory at a time, so a model on
``meta`` can be profiled too — ``warmup`` times untimed, then ``repeats`` times timed; the median
is kept. The backward is timed the same way with ``torch.autograd.grad``. A node that writes
an input in place runs on a fresh clone of it each time (a leaf that requires grad may not be
written, and a written input must not drift run after run); the clone's own time is measured
alone and taken off.

The profiled `CostGraph` remembers the FLOP/s of the device it was measured on
(``profiled_flops``); `partition.graph.linearize` turns seconds back into FLOP-equivalents with
it, so planning for devices of the same kind reproduces the measured times, and planning for
faster or slower ones scales them by their FLOP/s.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from partition.cost import CostGraph
from partition.devices import Device
from partition.trace.inplace import mutates
from partition.trace.meta import fetch_args

__all__ = ["profile"]

_log = logging.getLogger(__name__)


def profile(
    costs: CostGraph,
    device: Device,
    *,
    torch_device: str | torch.device = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> CostGraph:
    """``costs`` with measured ``fwd_time`` / ``bwd_time`` on every compute node.

    Args:
        costs: the FLOP-model costs of a traced model.
        device: the spec of the device measured on (its ``flops`` converts times back).
        torch_device: where to run (``"cpu"``, ``"cuda:0"``).
        repeats: timed runs per node (the median is kept).
        warmup: untimed runs first.
    """
    traced = costs.traced
    state = traced.meta_state
    target = torch.device(torch_device)
    values = {n.name: n.meta.get("val") for n in traced.graph.nodes}
    nodes = dict(costs.nodes)
    compute = [
        n for n in traced.graph.nodes if n.op in ("call_function", "call_method", "call_module")
    ]
    for index, node in enumerate(compute):
        if progress and index % 200 == 0:
            progress(f"profiling node {index}/{len(compute)} on {target}")
        fwd, bwd = _time_node(
            node, values, traced.param_placeholders, state, target, repeats, warmup
        )
        nodes[node.name] = replace(nodes[node.name], fwd_time=fwd, bwd_time=bwd)
    for node in traced.graph.nodes:  # inputs and attributes cost no time
        if node.name in nodes and nodes[node.name].fwd_time is None:
            nodes[node.name] = replace(nodes[node.name], fwd_time=0.0, bwd_time=0.0)
    return CostGraph(
        traced=traced,
        nodes=nodes,
        edges=costs.edges,
        profiled_flops=device.flops,
        info={**costs.info, "profiled_on": str(target), "profile_repeats": repeats},
    )


def _real(value: Any, device: torch.device, weights: bool = False) -> Any:
    """Random tensors of ``value``'s shapes; activations require grad, ``weights`` as they did."""

    def make(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point() or x.is_complex():
            out = torch.randn(x.shape, dtype=x.dtype, device=device)
            return out.requires_grad_(x.requires_grad if weights else True)
        return torch.zeros(x.shape, dtype=x.dtype, device=device)

    return tree_map(make, value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_node(
    node: fx.Node,
    values: dict[str, Any],
    param_placeholders: dict[str, str],
    state: Any,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> tuple[float, float]:
    real = {
        name: _real(values[name], device, weights=name in param_placeholders)
        for name in (a.name for a in node.all_input_nodes)
    }
    args, kwargs = fetch_args(node, real)
    params: dict[str, torch.Tensor] = {}
    module = None
    if node.op == "call_module":
        module = state.root.get_submodule(str(node.target))
        params = {
            k: _real(v, device, weights=True)
            for k, v in state.module_state(str(node.target)).items()
        }

    written = [name for name in mutates(node) if name in real]

    def copies() -> dict[str, Any]:
        return {name: tree_map(_copy, real[name]) for name in written}

    def forward() -> Any:
        a, k = fetch_args(node, {**real, **copies()}) if written else (args, kwargs)
        if module is not None:
            return torch.func.functional_call(module, params, a, k)
        if node.op == "call_method":
            self_obj, *rest = a
            return getattr(self_obj, str(node.target))(*rest, **k)
        return node.target(*a, **k)  # type: ignore[operator]

    try:
        with torch.no_grad():
            fwd = _median_time(forward, device, repeats, warmup)
            copy = _median_time(copies, device, repeats, warmup) if written else 0.0
    except Exception:  # an op that needs real data (indices, shapes) we cannot invent: price 0
        return 0.0, 0.0
    fwd = max(fwd - copy, 0.0)
    leaves = [
        t
        for t in tree_flatten((args, kwargs, params))[0]
        if isinstance(t, torch.Tensor) and t.requires_grad
    ]

    def outputs() -> list[torch.Tensor]:
        found = tree_flatten(forward())[0]
        return [t for t in found if isinstance(t, torch.Tensor) and t.requires_grad]

    try:
        out = outputs()
        if not leaves or not out:
            return fwd, 0.0
        grads = [torch.ones_like(t) for t in out]

        def backward() -> None:
            torch.autograd.grad(outputs(), leaves, grads, allow_unused=True)

        total = _median_time(backward, device, repeats, warmup) - copy  # forward + backward
    except Exception as e:  # as for the forward: no backward we can run on invented data
        _log.debug("no backward timed for node %s: %s", node.name, e)
        return fwd, 0.0
    return fwd, max(total - fwd, 0.0)


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x
