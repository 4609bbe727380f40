"""Device specs: memory, sustained FLOP/s and the link to the next device, with presets and parsing.

A pipeline puts stage ``s`` on device ``s``; the link of device ``s`` is the one to device ``s + 1``.
A spec's sizes, rates and times are read in human units by `partition.units`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from partition.errors import PlanError
from partition.units import parse_flops, parse_rate, parse_seconds, parse_size

__all__ = ["PRESETS", "SPEC_FORMAT", "Device", "parse_devices", "read_spec_file"]


@dataclass(frozen=True, kw_only=True)
class Device:
    """One pipeline device and its link to the next one."""

    name: str
    """Free-form label shown in plans, e.g. ``"h100"`` or ``"gpu3"``."""
    memory: int
    """Bytes of memory the stage may use."""
    flops: float
    """Sustained FLOP/s for this stage's kernels (what the cost model divides FLOPs by)."""
    bandwidth: float = 25e9
    """Bytes per second from this device to the next one."""
    latency: float = 10e-6
    """Seconds of fixed cost per message on the link to the next device (time the ranks may
    compute through; their own share is `message_overhead`)."""
    dispatch_forward: float = 0.0
    """Seconds of fixed cost per traced node in a forward, whatever its size (Python dispatch,
    kernel launch); 0 for the presets, which are not measured (``pipepart calibrate`` measures)."""
    dispatch_backward: float = 0.0
    """The same per node in a backward."""
    action_overhead: float = 0.0
    """Seconds of fixed cost per forward-and-backward action of a stage, beyond its nodes'."""
    message_overhead: float = 0.0
    """Seconds each of the two ranks spends per message between them, whatever its size (posting
    the send, posting the receive and taking the data in): rank time, where ``latency`` is the
    link's. As calibrated, ``latency + 2 * message_overhead`` is a one-element message's one-way
    time through the runtime's transport."""
    step_overhead: float = 0.0
    """Seconds of fixed cost per training step beyond the schedule: clearing gradients, the
    non-finite check and its all-reduce, the optimizer's launch."""
    update_rate: float = 0.0
    """Parameter bytes per second of an optimizer step (each rank steps its own parameters once
    the schedule is done); 0: not priced. ``pipepart calibrate`` measures SGD, the run's default."""

    def __post_init__(self) -> None:
        if self.memory <= 0:
            raise PlanError(f"device {self.name!r}: memory must be positive, got {self.memory}")
        if self.flops <= 0:
            raise PlanError(f"device {self.name!r}: flops must be positive, got {self.flops}")
        if self.bandwidth <= 0:
            raise PlanError(
                f"device {self.name!r}: bandwidth must be positive, got {self.bandwidth}"
            )
        for name in ("latency", "update_rate", *_FIXED):
            if getattr(self, name) < 0:
                raise PlanError(
                    f"device {self.name!r}: {name} must be >= 0, got {getattr(self, name)}"
                )

    @classmethod
    def parse(cls, spec: str) -> Device:
        """A preset name (``"h100"``) or a calibrated spec file (``"@calib.json"``), optionally
        overridden, or explicit fields.

        ``"h100"``, ``"a100-40,mem=30GiB"``, ``"@calib.json,mem=8GiB"``,
        ``"mem=16GiB,tflops=100,bw=25GB/s,lat=5us,name=gpu"``, ``"cpu,fwd=3us,bwd=9us,action=15us"``
        (the fixed costs: `dispatch_forward`, `dispatch_backward`, `action_overhead`),
        ``"cpu,msg=20us,step=1ms,update=2GB/s"`` (`message_overhead`, `step_overhead`,
        `update_rate`).
        """
        fields = [f.strip() for f in spec.split(",") if f.strip()]
        if not fields:
            raise PlanError(
                "empty device spec: give a preset (h100, a100-80, cpu, ...), a file written by "
                "pipepart calibrate (@calib.json) or mem=...,tflops=..."
            )
        base: Device | None = None
        if fields[0].startswith("@"):
            base = read_spec_file(fields.pop(0)[1:])
        elif "=" not in fields[0]:
            key = fields.pop(0).lower()
            if key not in PRESETS:
                raise PlanError(
                    f"unknown device preset {key!r}; presets: {', '.join(sorted(PRESETS))}"
                )
            base = PRESETS[key]
        values: dict[str, object] = {}
        for field in fields:
            key, sep, value = field.partition("=")
            key = key.strip().lower()
            if not sep:
                raise PlanError(f"device spec field {field!r} is not key=value")
            if key in ("mem", "memory"):
                values["memory"] = parse_size(value)
            elif key == "tflops":
                values["flops"] = float(value) * 1e12
            elif key == "flops":
                values["flops"] = parse_flops(value)
            elif key in ("bw", "bandwidth"):
                values["bandwidth"] = parse_rate(value)
            elif key in ("lat", "latency"):
                values["latency"] = parse_seconds(value)
            elif key in _FIXED_KEYS:
                values[_FIXED_KEYS[key]] = parse_seconds(value)
            elif key in ("update", "update_rate"):
                values["update_rate"] = parse_rate(value)
            elif key == "name":
                values["name"] = value.strip()
            else:
                raise PlanError(
                    f"unknown device spec key {key!r} in {spec!r}; keys: mem, tflops, flops, bw, "
                    "lat, fwd (seconds per operation's forward), bwd (per operation's backward), "
                    "action (per forward-and-backward action), msg (per message, on each rank), "
                    "step (per training step), update (parameter bytes per second of an "
                    "optimizer step), name"
                )
        if base is not None:
            return replace(base, **values)  # type: ignore[arg-type]
        missing = [k for k in ("memory", "flops") if k not in values]
        if missing:
            raise PlanError(
                f"device spec {spec!r} lacks {', '.join(missing)}; e.g. mem=16GiB,tflops=100"
            )
        values.setdefault("name", "device")
        return cls(**values)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """Its fields; a fixed cost only when measured (not 0), so preset plans read as before."""
        fixed = {name: getattr(self, name) for name in _MEASURED if getattr(self, name)}
        return {
            "name": self.name,
            "memory": self.memory,
            "flops": self.flops,
            "bandwidth": self.bandwidth,
            "latency": self.latency,
            **fixed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Device:
        return cls(
            name=str(data["name"]),
            memory=int(data["memory"]),  # type: ignore[call-overload]
            flops=float(data["flops"]),  # type: ignore[arg-type]
            bandwidth=float(data["bandwidth"]),  # type: ignore[arg-type]
            latency=float(data["latency"]),  # type: ignore[arg-type]
            **{name: float(data.get(name, 0.0)) for name in _MEASURED},  # type: ignore[arg-type]
        )


_FIXED = (
    "dispatch_forward",
    "dispatch_backward",
    "action_overhead",
    "message_overhead",
    "step_overhead",
)
_MEASURED = (*_FIXED, "update_rate")  # 0 unless calibrated; a plan file lists them when not 0
_FIXED_KEYS = {
    "fwd": "dispatch_forward",
    "bwd": "dispatch_backward",
    "action": "action_overhead",
    "msg": "message_overhead",
    "message": "message_overhead",
    "step": "step_overhead",
}
_FIXED_KEYS.update({name: name for name in _FIXED})
SPEC_FORMAT = "pipepart-device-spec"
"""The ``format`` of a device spec file (``pipepart calibrate --out FILE``, read as ``@FILE``): a
JSON object with ``format``, ``version`` and ``device``, the fields of `Device` as `Device.to_dict`
writes them (``name``, ``memory`` in bytes, ``flops`` in FLOP/s, ``bandwidth`` in bytes/s,
``latency`` in seconds; then, when measured, ``dispatch_forward``, ``dispatch_backward``,
``action_overhead``, ``message_overhead`` and ``step_overhead`` in seconds and ``update_rate``
in bytes/s), beside ``measured`` (every measurement behind them, for people), ``host``,
``torch``, ``date`` and ``seconds``. Only ``device`` is read; a missing measured field is 0."""


def read_spec_file(path: str) -> Device:
    """The device a ``pipepart calibrate`` file describes (its ``device`` object).

    Raises:
        PlanError: when the file is missing, not JSON, or not a device spec.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PlanError(
            f"cannot read the device spec file {path!r}: {e}; write one with "
            f"`pipepart calibrate --out {path}`"
        ) from e
    if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
        raise PlanError(
            f'{path!r} is not a device spec file (no "format": "{SPEC_FORMAT}"); write one '
            f"with `pipepart calibrate --out {path}`"
        )
    try:
        return Device.from_dict(data["device"])
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"device spec file {path!r}: its device is incomplete ({e!r})") from e


# Published figures: memory as marketed (GB = 10^9 bytes), dense BF16 tensor-core peak, and
# NVLink bandwidth one way (half the bidirectional figure). Real sustained throughput is lower
# (40-60% MFU is typical in training); pass `tflops=` for a measured figure.
PRESETS: dict[str, Device] = {
    "a100-40": Device(
        name="a100-40", memory=40 * 10**9, flops=312e12, bandwidth=300e9, latency=5e-6
    ),
    "a100-80": Device(
        name="a100-80", memory=80 * 10**9, flops=312e12, bandwidth=300e9, latency=5e-6
    ),
    "h100": Device(name="h100", memory=80 * 10**9, flops=989e12, bandwidth=450e9, latency=5e-6),
    "h200": Device(name="h200", memory=141 * 10**9, flops=989e12, bandwidth=450e9, latency=5e-6),
    "cpu": Device(name="cpu", memory=16 * 2**30, flops=100e9, bandwidth=10e9, latency=50e-6),
}
PRESETS["a100"] = replace(PRESETS["a100-80"], name="a100")


def parse_devices(specs: Sequence[str] | str, count: int | None = None) -> list[Device]:
    """Devices from specs separated by ``;`` (or a list); one spec repeated ``count`` times.

    ``parse_devices("h100", 4)`` gives four H100s; ``parse_devices("h100;h100;a100-40")`` three
    devices in that order. With several specs, ``count`` must be omitted or equal their number.
    """
    if isinstance(specs, str):
        specs = [s for s in specs.split(";") if s.strip()]
    devices = [Device.parse(s) for s in specs]
    if not devices:
        raise PlanError("no devices given")
    if count is None:
        return devices
    if count < 1:
        raise PlanError(f"device count must be at least 1, got {count}")
    if len(devices) == 1:
        return [replace(devices[0], name=f"{devices[0].name}:{i}") for i in range(count)]
    if len(devices) != count:
        raise PlanError(
            f"{len(devices)} device specs given but --devices {count}; give one spec to repeat, "
            f"or exactly {count} specs"
        )
    return devices
