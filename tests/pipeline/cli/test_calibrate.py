"""`pipeline.cli.calibrate`: ``pipepart calibrate`` measures this machine and writes a device spec
that ``--device-spec @FILE`` reads back, for planning and simulating alike."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from partition.devices import PRESETS, Device, parse_devices
from partition.errors import PlanError
from pipeline.cli.command import main


@pytest.mark.slow
def test_calibrate_writes_a_spec_that_plan_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calib.json"
    assert main(["calibrate", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # one JSON object on stdout
    assert "matmul throughput" in captured.err and "point-to-point" in captured.err  # progress
    written = json.loads(out.read_text())
    assert printed["device"] == written["device"]
    device = Device.from_dict(written["device"])
    assert device.flops > 1e8 and device.memory > 2**30  # a CPU does more than 0.1 GFLOP/s
    assert 0 <= device.latency < 0.1 and device.bandwidth > 1e6  # the ranks may take it all
    assert device.dispatch_forward > 0 and device.dispatch_backward > 0
    assert written["measured"]["link"]["backend"] == "gloo"
    # per message and per step: what a latency-bound step pays beyond its actions
    link = written["measured"]["link"]
    assert 0 < device.message_overhead <= link["one_way"] / 2
    assert device.latency == pytest.approx(link["one_way"] - 2 * device.message_overhead)
    assert device.step_overhead > link["allreduce"] > 0 and device.update_rate > 1e6

    assert (
        main(
            ["plan", "gpt", "--size", "toy", "--devices", "2", "--device-spec", f"@{out}", "--json"]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in plan["devices"]} == {f"{device.name}:0", f"{device.name}:1"}
    assert all(d["dispatch_forward"] == device.dispatch_forward for d in plan["devices"])
    assert all(d["message_overhead"] == device.message_overhead for d in plan["devices"])
    assert all(d["update_rate"] == device.update_rate for d in plan["devices"])


def test_a_spec_file_takes_overrides_and_round_trips(tmp_path: Path) -> None:
    spec = Device(
        name="box", memory=2**34, flops=5e10, bandwidth=1e9, latency=1e-4, dispatch_forward=3e-6
    )
    path = tmp_path / "box.json"
    path.write_text(json.dumps({"format": "pipepart-device-spec", "device": spec.to_dict()}))
    (one, two) = parse_devices(f"@{path},mem=8GiB", 2)
    assert one.memory == two.memory == 8 * 2**30  # the override wins
    assert (one.flops, one.dispatch_forward, one.dispatch_backward) == (5e10, 3e-6, 0.0)
    assert Device.from_dict(one.to_dict()) == one
    assert "dispatch_backward" not in one.to_dict()  # an unmeasured fixed cost is not written


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read the device spec file"),
        ("not json", "cannot read the device spec file"),
        ('{"device": {}}', "is not a device spec file"),
        ('{"format": "pipepart-device-spec", "device": {"name": "x"}}', "incomplete"),
    ],
)
def test_a_bad_spec_file_says_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, says: str
) -> None:
    path = tmp_path / "calib.json"
    if content is not None:
        path.write_text(content)
    assert main(["plan", "gpt", "--size", "toy", "--device-spec", f"@{path}"]) == 2
    err = capsys.readouterr().err
    assert says in err and ("pipepart calibrate" in err or "incomplete" in says)


def test_calibrate_refuses_zero_threads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--threads", "0", "--no-link"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_the_per_message_and_per_step_costs_parse_and_survive_a_spec_file(tmp_path: Path) -> None:
    spec = Device.parse("cpu,msg=40us,step=1.5ms,update=8GB/s")
    assert (spec.message_overhead, spec.step_overhead, spec.update_rate) == (40e-6, 1.5e-3, 8e9)
    assert Device.parse("cpu,message=40us") == replace(PRESETS["cpu"], message_overhead=40e-6)
    path = tmp_path / "box.json"
    path.write_text(json.dumps({"format": "pipepart-device-spec", "device": spec.to_dict()}))
    (again,) = parse_devices(f"@{path},step=2ms", 1)
    assert again == replace(spec, name="cpu:0", step_overhead=2e-3)
    assert "update_rate" not in PRESETS["cpu"].to_dict()  # unmeasured: not written
    with pytest.raises(PlanError, match="message_overhead must be >= 0"):
        Device.parse("cpu,msg=-1us")
    with pytest.raises(PlanError, match=r"msg \(per message, on each rank\).*update"):
        Device.parse("cpu,messages=1us")
