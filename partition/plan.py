"""The plan file: a split a person can read, diff and load again, as versioned JSON.

A `Plan` records what was planned (model identity, devices, schedule, micro-batches, the memory
model), the answer (node range of each stage, with module paths) and the numbers behind it
(FLOPs, parameter bytes, memory breakdown against capacity, predicted time, the tensors crossing
each cut), plus the objective value and the algorithm. Applying a plan to a model re-traces the
model and compares the graph hash, so a plan made for another model fails with a clear message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partition.auto_choice import AutoChoice
from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph
from partition.memory import MemoryModel
from partition.schedules.names import canonical_schedule, placement_of
from partition.schedules.placement import stage_rank
from partition.schema import check_plan
from partition.stage_plan import StagePlan
from partition.wires import TensorSpec

__all__ = ["SCHEMA_VERSION", "SUMMARY_FIELDS", "ModelInfo", "Plan", "StagePlan", "graph_hash"]

SCHEMA_VERSION = 1
SUMMARY_FIELDS: tuple[str, ...] = (
    "bottleneck",
    "bottleneck_stage",
    "step_time",
    "bubble",
    "fits",
    "idle_stages",
    "devices_note",
    "bubble_note",
)
"""Top-level fields of ``pipepart plan --json`` that a plan derives (`Plan.summary`; the CLI adds
``bubble_note`` from `partition.planning.bubble`): a plan file may carry them, and those of
`Plan.summary` must agree with it."""


def graph_hash(graph: LinearGraph, nodes_meta: list[str]) -> str:
    """A short hash of the linear order: node names and what each computes, with shapes."""
    digest = hashlib.sha256()
    for name, meta in zip(graph.names, nodes_meta, strict=True):
        digest.update(f"{name}|{meta}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Which model a plan belongs to."""

    class_name: str
    graph_hash: str
    num_nodes: int
    num_parameters: int
    param_bytes: int
    trace_method: str
    order: str
    """The node order the plan's ranges refer to (see `partition.graph.linearize`)."""
    inputs: tuple[TensorSpec, ...]
    """One micro-batch's inputs (the runtime checks every micro-batch against these)."""
    leaf_modules: tuple[str, ...] = ()
    """The submodules fx kept whole (qualified names or patterns, or classes as
    ``class:module.QualName``): every rank traces with the same ones."""
    modes: tuple[str, ...] = ()
    """The modes traced and planned, the model's own first: ``("train", "eval")`` (its forward
    reads ``self.training``: cuts valid in both), ``("eval",)`` (that mode only, as asked: the
    pipeline refuses the other), or ``()`` (one graph serves both modes)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_name": self.class_name,
            "graph_hash": self.graph_hash,
            "num_nodes": self.num_nodes,
            "num_parameters": self.num_parameters,
            "param_bytes": self.param_bytes,
            "trace_method": self.trace_method,
            "order": self.order,
            "inputs": [t.to_dict() for t in self.inputs],
            **({"leaf_modules": list(self.leaf_modules)} if self.leaf_modules else {}),
            **({"modes": list(self.modes)} if self.modes else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            class_name=str(data["class_name"]),
            graph_hash=str(data["graph_hash"]),
            num_nodes=int(data["num_nodes"]),
            num_parameters=int(data["num_parameters"]),
            param_bytes=int(data["param_bytes"]),
            trace_method=str(data["trace_method"]),
            order=str(data["order"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            leaf_modules=tuple(str(x) for x in data.get("leaf_modules", ())),
            modes=tuple(str(x) for x in data.get("modes", ())),
        )


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A pipeline plan. Save with `save`, read with `Plan.load`; see the module docstring."""

    model: ModelInfo
    schedule: str
    microbatches: int
    virtual: int = 1
    memory_model: MemoryModel = field(default_factory=MemoryModel)
    algorithm: str
    objective: str = "bottleneck"
    """What ``optimal`` minimised: ``bottleneck`` or ``step`` (`PlanOptions.objective`)."""
    bottleneck: float
    """The slowest stage's seconds per micro-batch (compute + communication)."""
    perfect_balance: float
    """The lower bound: total compute over total device speed."""
    step_time: float
    """Predicted seconds per training step (all micro-batches), from the simulator."""
    bubble: float
    """Predicted idle fraction of the pipeline."""
    stages: tuple[StagePlan, ...]
    shared_params: dict[str, list[int]] = field(default_factory=dict)
    """Parameters held by more than one stage (tied weights) → the stages; gradients are summed."""
    auto: AutoChoice | None = None
    """What ``plan --auto`` searched: the configuration chosen (this plan's) and its runner-ups."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        canonical_schedule(self.schedule)
        if not self.stages:
            raise PlanError("a plan needs at least one stage")
        expected = 0
        for i, stage in enumerate(self.stages):
            if stage.index != i:
                raise PlanError(f"stage {i} has index {stage.index}")
            if stage.start != expected or stage.stop <= stage.start:
                raise PlanError(
                    f"stage {i} covers nodes [{stage.start}, {stage.stop}); stages must be non-empty "
                    f"and contiguous, starting at node {expected}"
                )
            expected = stage.stop
        if expected != self.model.num_nodes:
            raise PlanError(
                f"the stages cover {expected} of the model's {self.model.num_nodes} nodes"
            )
        if self.microbatches < 1:
            raise PlanError(f"micro-batches must be at least 1, got {self.microbatches}")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_ranks(self) -> int:
        return len(self.stages) // self.virtual

    @property
    def placement(self) -> str:
        """Which rank holds which stage, as the schedule implies it (``loop`` or ``v``); see
        [Note: placement] in `partition.schedules.placement`."""
        return placement_of(self.schedule)

    def stage_rank(self, stage: int) -> int:
        """The rank that holds ``stage``."""
        return stage_rank(stage, self.num_ranks, self.placement)

    @property
    def bounds(self) -> tuple[int, ...]:
        return (0, *(s.stop for s in self.stages))

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(s.device for s in self.stages[: self.num_ranks])

    @property
    def bottleneck_stage(self) -> int:
        return max(range(self.num_stages), key=lambda i: self.stages[i].time)

    def fits(self) -> bool:
        return all(s.memory["total"] <= s.capacity for s in self.stages)

    # --- JSON ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The headline numbers ``pipepart plan --json`` prints beside the plan's own fields;
        `from_dict` reads them back, checked against the plan (see `SUMMARY_FIELDS`)."""
        from partition.idle import devices_note, idle_stages

        return {
            "bottleneck": self.bottleneck,
            "bottleneck_stage": self.bottleneck_stage,
            "step_time": self.step_time,
            "bubble": self.bubble,
            "fits": self.fits(),
            "idle_stages": idle_stages(self),  # see [Note: idle stages] in partition.idle
            "devices_note": devices_note(self),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "schedule": self.schedule,
            "microbatches": self.microbatches,
            "virtual": self.virtual,
            "memory_model": {
                "optimizer": self.memory_model.optimizer,
                "master_weights": self.memory_model.master_weights,
                **({"recompute": True} if self.memory_model.recompute else {}),
            },
            "algorithm": self.algorithm,
            "objective": {
                "minimised": self.objective,
                "bottleneck": self.bottleneck,
                "bottleneck_stage": self.bottleneck_stage,
                "perfect_balance": self.perfect_balance,
                "balance_ratio": self.bottleneck / self.perfect_balance
                if self.perfect_balance
                else None,
            },
            "predicted": {"step_time": self.step_time, "bubble": self.bubble},
            "devices": [d.to_dict() for d in self.devices],
            "stages": [s.to_dict() for s in self.stages],
            "shared_params": self.shared_params,
            **({"auto": self.auto.to_dict()} if self.auto is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the plan") -> Plan:
        """A plan from its JSON object, after checking it against the schema (`partition.schema`).

        Raises:
            PlanError: another schema version, an unknown or missing field, a value of the wrong
                type, or stages that do not fit together; the message names the field and
                ``source`` (the file).
        """
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise PlanError(
                f"{source}: plan schema version {version!r} is not supported (this pipepart reads "
                f"version {SCHEMA_VERSION}"
                + ("; the file was written by a newer pipepart" if newer else "")
                + "); re-create the plan with `pipepart plan`"
            )
        summary = {k: data[k] for k in SUMMARY_FIELDS if k in data}
        data = {k: v for k, v in data.items() if k not in SUMMARY_FIELDS}
        check_plan(data, source)
        try:
            plan = cls(
                model=ModelInfo.from_dict(data["model"]),
                schedule=str(data["schedule"]),
                microbatches=int(data["microbatches"]),
                virtual=int(data.get("virtual", 1)),
                memory_model=MemoryModel(**data["memory_model"]),
                algorithm=str(data["algorithm"]),
                objective=str(data["objective"].get("minimised", "bottleneck")),
                bottleneck=float(data["objective"]["bottleneck"]),
                perfect_balance=float(data["objective"]["perfect_balance"]),
                step_time=float(data["predicted"]["step_time"]),
                bubble=float(data["predicted"]["bubble"]),
                stages=tuple(StagePlan.from_dict(s) for s in data["stages"]),
                shared_params={
                    str(k): [int(i) for i in v] for k, v in data.get("shared_params", {}).items()
                },
                auto=AutoChoice.from_dict(data["auto"]) if "auto" in data else None,
            )
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{source} is malformed: {type(e).__name__}: {e}") from e
        derived = plan.summary()
        for key, value in summary.items():  # the CLI's notes (bubble_note) are advice, not checked
            if key in derived and value != derived[key]:
                raise PlanError(
                    f"{source}: its {key!r} says {value!r}, but its stages give {derived[key]!r}; "
                    f"the file was edited: remove the summary fields ({', '.join(SUMMARY_FIELDS)}) "
                    "or re-create it with `pipepart plan`"
                )
        return plan

    @classmethod
    def from_json(cls, text: str, source: str = "the plan") -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise PlanError(f"{source} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomically: a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.exists():
            raise PlanError(
                f"no plan file at {path}; make one with `pipepart plan MODEL --out {path}`"
            )
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"cannot read the plan file {path}: {e}") from e
        return cls.from_json(text, f"plan file {path}")

    def check_model_class(self, class_name: str) -> None:
        """Raise `PlanError` unless the plan was made for a model of class ``class_name``.

        Checked before tracing: another model's ``forward`` may not even take the plan's inputs.
        """
        if class_name != self.model.class_name:
            inputs = ", ".join(t.describe() for t in self.model.inputs)
            raise PlanError(
                f"this plan was made for another model: {self.model.class_name} (graph "
                f"{self.model.graph_hash}, {self.model.num_nodes} nodes, inputs {inputs}), but "
                f"the model given is {class_name}; re-plan for {class_name} with `pipepart plan`, "
                f"or give the plan of {class_name}"
            )

    def check_model(
        self, class_name: str, graph_hash_value: str, num_nodes: int, num_parameters: int
    ) -> None:
        """Raise `PlanError` unless the plan was made for this model."""
        if graph_hash_value != self.model.graph_hash or num_nodes != self.model.num_nodes:
            raise PlanError(
                f"this plan was made for another model: {self.model.class_name} with "
                f"{self.model.num_parameters:,} parameters (graph {self.model.graph_hash}, "
                f"{self.model.num_nodes} nodes), but the model given is {class_name} with "
                f"{num_parameters:,} parameters (graph {graph_hash_value}, {num_nodes} nodes). "
                "Plans are tied to one model, one micro-batch shape and one trace route: "
                "re-plan with `pipepart plan`"
            )
