"""Tracing: shapes on meta, the 10 B model's memory, options, and the errors users see."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from partition import analyze
from partition.errors import InputError, TraceError
from partition.models.examples import gpt, skipnet, two_tower
from partition.split import split
from partition.trace.fx import trace


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.proj(x)
        return -x


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), _Branchy())

    def forward(self, x: torch.Tensor, scale: float = 1.0, flip: bool = False) -> torch.Tensor:
        y = self.encoder(x) * scale
        if flip:
            y = -y
        return y


def test_every_node_has_shapes_from_meta() -> None:
    model, (idx,), _ = gpt("toy", batch=2, seq=8)
    traced = trace(model, (idx,))
    vals = {n.name: n.meta.get("val") for n in traced.graph.nodes if n.op != "output"}
    assert all(
        v is None or not isinstance(v, torch.Tensor) or v.device.type == "meta"
        for v in vals.values()
    )
    logits = next(n for n in traced.graph.nodes if n.op == "call_module" and n.target == "lm_head")
    assert tuple(logits.meta["val"].shape) == (2, 8, model.config.vocab_size)
    assert logits.meta["tensor_meta"].dtype == torch.float32
    # the real weights were never touched: still on CPU, no meta leaked into the model
    assert all(p.device.type == "cpu" for p in model.parameters())


# This process's peak RSS in KiB. Not ru_maxrss: a child keeps its parent's peak in it across
# fork and exec (a subprocess of a big pytest starts "peaked"), which hides any growth below it.
_PEAK_KIB = """
def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
"""


@pytest.mark.slow
def test_meta_model_traces_and_costs_without_allocating() -> None:
    """A ~10 B-parameter GPT on meta traces and is costed with peak RSS growing < 1 GiB."""
    script = _PEAK_KIB + textwrap.dedent(
        """
        import torch
        from partition.models.examples import gpt
        from partition.trace.fx import trace
        from partition.cost import cost_model
        before = peak_kib()
        with torch.device("meta"):
            model, inputs, _ = gpt("10b", batch=1, seq=2048)
        costs = cost_model(trace(model, inputs))
        after = peak_kib()
        print(costs.param_numel, (after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    numel, grown = map(int, out.stdout.split())
    assert numel > 10e9
    assert grown < 2**30, f"peak RSS grew {grown / 2**20:.0f} MiB"


def test_untraceable_model_names_module_line_and_the_way_out() -> None:
    with pytest.raises(TraceError) as info:
        trace(_Outer(), (torch.randn(2, 4),), method="fx")
    message = str(info.value)
    assert "'encoder.1'" in message  # the module path
    assert "if x.sum() > 0" in message  # the source line
    assert "leaf_modules" in message and "concrete_args" in message and "export" in message


def test_a_model_neither_route_traces_says_what_each_hit_and_no_circular_advice() -> None:
    """Issue 18: when fx failed and export failed too, the message appended export's error to
    fx's, whose advice was to trace through export. Now: what each route hit, and each route's
    own ways out, never the route that just failed."""
    with pytest.raises(TraceError) as info:
        trace(_Outer(), (torch.randn(2, 4),), method="auto")
    message = str(info.value)
    head, fx_line, export_line, ways = message.splitlines()
    assert head == "cannot trace _Outer by either route."
    assert fx_line.startswith("fx (symbolic tracing): ") and "'encoder.1'" in fx_line
    assert "if x.sum() > 0" in fx_line
    assert export_line.startswith("torch.export: torch.export could not trace _Outer")
    assert ways.startswith("Ways out: keep 'encoder.1' as one node (leaf_modules=['encoder.1']")
    assert "concrete_args" in ways and "torch.cond" in ways
    assert "--trace export" not in message and "--trace fx" not in message


def test_one_route_alone_offers_the_other() -> None:
    with pytest.raises(TraceError, match=r"Ways out: keep 'encoder.1'.*--trace export"):
        trace(_Outer(), (torch.randn(2, 4),), method="fx")
    with pytest.raises(TraceError, match=r"torch.cond.*--trace fx"):
        trace(_Outer(), (torch.randn(2, 4),), method="export")


def test_leaf_module_gets_past_the_branch() -> None:
    traced = trace(_Outer(), (torch.randn(2, 4),), method="fx", leaf_modules=["encoder.1"])
    targets = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert "encoder.1" in targets  # kept whole
    traced = trace(_Outer(), (torch.randn(2, 4),), method="fx", leaf_modules=[_Branchy])
    assert "encoder.1" in [n.target for n in traced.graph.nodes if n.op == "call_module"]


def test_concrete_args_fix_a_flag() -> None:
    model = _Outer()
    x = torch.randn(2, 4)
    analysis = analyze(
        model, (x,), method="fx", leaf_modules=["encoder.1"], concrete_args={"flip": True}
    )
    assert analysis.traced.input_names == ("x",)  # scale and flip became constants
    (whole,) = split(analysis.traced, analysis.graph, [0, len(analysis.graph)])
    assert torch.equal(whole(x), model(x, flip=True))
    assert not torch.equal(whole(x), model(x))


def test_tracer_class_hook_is_used() -> None:
    calls = []

    class Recording(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            calls.append(name)
            return super().is_leaf_module(m, name)

    model, inputs, _ = skipnet()
    trace(model, inputs, method="fx", tracer_class=Recording)
    assert "inp" in calls


def test_unknown_leaf_module_is_an_error() -> None:
    model, inputs, _ = skipnet()
    with pytest.raises(InputError, match="matches no submodule"):
        trace(model, inputs, leaf_modules=["nope.*"])


def test_wrong_inputs_name_the_signature() -> None:
    model, (a, b), _ = two_tower()
    with pytest.raises(InputError) as info:
        trace(model, (a,))
    assert "TwoTower.forward(a: 'Tensor', b: 'Tensor')" in str(info.value) or "forward(a" in str(
        info.value
    )
    with pytest.raises(InputError, match="forward"):
        trace(model, (a, b, a))


def test_keyword_inputs() -> None:
    model, (a, b), _ = two_tower(batch=3)
    traced = trace(model, (a,), {"b": b})
    assert traced.input_names == ("a", "b")


def test_peak_rss_is_read_in_kib() -> None:
    """Guards the RSS test above: its reading of the peak RSS, in a subprocess of this process,
    measures a known allocation as that many bytes (not 1024 times more or fewer, not less
    because the subprocess inherited this process's peak)."""
    script = _PEAK_KIB + textwrap.dedent(
        """
        before = peak_kib()
        block = bytearray(b"\\x01") * (256 << 20)  # 256 MiB, every page written
        after = peak_kib()
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = int(out.stdout)
    assert 0.9 * (256 << 20) < grown < 1.5 * (256 << 20), f"{grown / 2**20:.0f} MiB"
