"""What ``pipepart plan --auto`` chose: the configuration, its runner-ups and what was refused,
as data a plan carries (``auto`` in the plan file) and `pipepart show` prints.

`partition.planning.auto` searches; this module only holds the record, with its JSON form, so
that a plan file can be read without importing the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from partition.errors import PlanError

__all__ = ["AUTO_OBJECTIVES", "AutoChoice", "Candidate", "Config"]

AUTO_OBJECTIVES: tuple[str, ...] = ("step", "throughput")
"""What the search ranks by: the predicted step time, or samples per second per device."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """One configuration the search priced."""

    schedule: str
    microbatches: int
    virtual: int = 1
    """Stages per device (2 for the V schedules, ``v`` for interleaved)."""
    devices: int
    recompute: bool = False

    def describe(self) -> str:
        """``1f1b · 8 mb · 4 devices`` (``· v2``, ``· recompute`` when they apply)."""
        parts = [self.schedule, f"{self.microbatches} mb", f"{self.devices} devices"]
        if self.schedule == "interleaved":
            parts.insert(1, f"v{self.virtual}")
        if self.recompute:
            parts.append("recompute")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "microbatches": self.microbatches,
            "virtual": self.virtual,
            "devices": self.devices,
            "recompute": self.recompute,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return cls(
            schedule=str(data["schedule"]),
            microbatches=int(data["microbatches"]),
            virtual=int(data["virtual"]),
            devices=int(data["devices"]),
            recompute=bool(data["recompute"]),
        )


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A configuration with what its best split predicts."""

    config: Config
    step_time: float
    """Predicted seconds per step (the simulator's, as a plan's ``step_time``)."""
    peak_memory: float
    """Bytes of the fullest device (its stages' weights, state, activations and buffers)."""
    throughput: float
    """Samples per second per device: the global batch over the step time over the devices."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "step_time": self.step_time,
            "peak_memory": self.peak_memory,
            "throughput": self.throughput,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(
            config=Config.from_dict(data["config"]),
            step_time=float(data["step_time"]),
            peak_memory=float(data["peak_memory"]),
            throughput=float(data["throughput"]),
        )


@dataclass(frozen=True, kw_only=True)
class AutoChoice:
    """The search's answer: the chosen configuration (the plan's own) and the next best."""

    objective: str
    """One of `AUTO_OBJECTIVES`."""
    global_batch: int
    """Samples per step: the micro-batch counts searched divide it."""
    chosen: Candidate
    runner_ups: tuple[Candidate, ...] = ()
    """Up to five, best first, by the same objective."""
    searched: int = 0
    """Configurations priced (each solved exactly)."""
    skipped: tuple[str, ...] = ()
    """Why configurations were not priced: a schedule that refuses a count, memory that no
    split fits (one line per reason)."""

    def __post_init__(self) -> None:
        if self.objective not in AUTO_OBJECTIVES:
            raise PlanError(
                f"unknown auto objective {self.objective!r}; choose one of "
                f"{', '.join(AUTO_OBJECTIVES)}"
            )
        object.__setattr__(self, "runner_ups", tuple(self.runner_ups))
        object.__setattr__(self, "skipped", tuple(self.skipped))

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "global_batch": self.global_batch,
            "chosen": self.chosen.to_dict(),
            "runner_ups": [c.to_dict() for c in self.runner_ups],
            "searched": self.searched,
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoChoice:
        return cls(
            objective=str(data["objective"]),
            global_batch=int(data["global_batch"]),
            chosen=Candidate.from_dict(data["chosen"]),
            runner_ups=tuple(Candidate.from_dict(c) for c in data["runner_ups"]),
            searched=int(data["searched"]),
            skipped=tuple(str(s) for s in data.get("skipped", ())),
        )
