"""Measuring the machine pipepart runs on: compute, dispatch and links, as a device spec.

``pipepart calibrate`` (or `calibrate`) times matmuls and elementwise work at a few sizes, the
fixed cost of each traced node and of each forward/backward action, and a point-to-point link
between two ranks on the backend in use; it writes a device spec file that every command taking
``--device-spec`` reads as ``@FILE`` (see `partition.devices`).
"""

from pipeline.calibrate.machine import Calibration, calibrate

__all__ = ["Calibration", "calibrate"]
