"""Device specs: presets, spec strings, heterogeneous lists, and clear errors."""

from __future__ import annotations

import pytest

from partition.devices import PRESETS, Device, parse_devices
from partition.errors import PlanError


def test_presets_have_published_figures() -> None:
    assert PRESETS["h100"].memory == 80 * 10**9 and PRESETS["h100"].flops == 989e12
    assert PRESETS["a100-40"].memory == 40 * 10**9 and PRESETS["a100-80"].flops == 312e12
    assert PRESETS["h200"].memory == 141 * 10**9
    assert {"a100-40", "a100-80", "h100", "h200", "cpu"} <= set(PRESETS)


def test_spec_strings() -> None:
    d = Device.parse("mem=16GiB,tflops=100,bw=25GB/s,lat=5us,name=gpu")
    assert (d.memory, d.flops, d.bandwidth, d.latency, d.name) == (
        16 * 2**30,
        100e12,
        25e9,
        5e-6,
        "gpu",
    )
    assert Device.parse("a100-40,mem=30GiB").flops == 312e12
    assert Device.parse("a100-40,mem=30GiB").memory == 30 * 2**30


def test_fixed_costs_have_keys_and_presets_leave_them_unmeasured() -> None:
    d = Device.parse("cpu,fwd=3us,bwd=9us,action=15us")
    assert (d.dispatch_forward, d.dispatch_backward, d.action_overhead) == (3e-6, 9e-6, 15e-6)
    assert Device.parse("cpu,dispatch_backward=1ms").dispatch_backward == 1e-3
    assert all(p.dispatch_forward == p.action_overhead == 0.0 for p in PRESETS.values())
    with pytest.raises(PlanError, match=r"fwd \(seconds per operation's forward\)"):
        Device.parse("cpu,dispatch=3us")


def test_device_lists() -> None:
    four = parse_devices("h100", 4)
    assert [d.name for d in four] == ["h100:0", "h100:1", "h100:2", "h100:3"]
    mixed = parse_devices("h100;a100-40;cpu")
    assert [d.flops for d in mixed] == [989e12, 312e12, 100e9]
    with pytest.raises(PlanError, match="3 device specs given but --devices 2"):
        parse_devices("h100;a100-40;cpu", 2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tpu9", "unknown device preset"),
        ("mem=1GB", "lacks flops"),
        ("mem=1GB,tflops=1,speed=3", "unknown device spec key"),
        ("cpu,lat=fast", "cannot read time 'fast'"),
        ("cpu,mem=lots", "cannot read size 'lots'"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Device.parse(spec)


def test_round_trip() -> None:
    d = PRESETS["h200"]
    assert Device.from_dict(d.to_dict()) == d
