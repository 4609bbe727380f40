"""How a pipeline runs: `PipelineOptions`, every knob of `pipeline.runtime.pipeline.Pipeline` with one
default each, checked when made. Fields left ``None`` come from the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from partition.errors import PlanError
from partition.options import MODES, Modes, PlanOptions
from pipeline.runtime.finite import ON_NONFINITE, OnNonFinite

__all__ = ["DpReduce", "PipelineOptions", "WeightsMode"]

WeightsMode = Literal["auto", "factory", "init"]
"""Where a stage's weights come from; see [Note: the model's own weights] in
`pipeline.runtime.weights`."""

DpReduce = Literal["ddp", "fsdp"]
"""How replicas of a pipeline share gradients; see `PipelineOptions.dp_reduce`."""


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """How to run a pipeline. Fields left ``None`` come from the plan."""

    schedule: str | None = None
    """``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``, ``zb-v`` or ``dualpipev`` (or a schedule's
    text, ``@FILE``); default the plan's, else ``1f1b``."""
    microbatches: int | None = None
    """Micro-batches per step; default the plan's (required without a plan)."""
    virtual: int | None = None
    """Stages per rank (``interleaved``; ``zb-v`` and ``dualpipev`` have 2); default the plan's,
    else 1 (2 for those)."""
    bounds: tuple[int, ...] | None = None
    """Without a plan: the split, as node indices of the linear order (default: the partitioner's)."""
    modes: Modes | None = None
    """Which of the model's modes to trace: ``both`` (when its forward reads ``self.training``),
    or ``train`` or ``eval`` (the mode it is in; the pipeline then refuses the other); default
    the plan's, else ``both``. See `partition.options.PlanOptions.modes`."""
    planning: PlanOptions | None = None
    """Without a plan: how the first rank plans (trace route, leaf modules, memory model,
    algorithm...); the schedule, micro-batches, stages per rank and bounds above, where given,
    override its own. See `pipeline.runtime.layout.plan_for`."""
    loss_reduction: Literal["mean", "sum"] = "mean"
    """How micro-batch losses combine; see [Note: loss scaling] in `pipeline.runtime.stage`."""
    seed: int = 0
    """The factory builds the model after ``torch.manual_seed(seed)`` (and ``weights="init"``
    seeds its rules from it)."""
    weights: WeightsMode = "auto"
    """Where the values come from: ``factory`` (the model the factory builds, once per machine),
    ``init`` (the model's per-module init rules, for a model too big for host memory), ``auto``
    (``factory`` if the model fits in host memory); see [Note: the model's own weights] in
    `pipeline.runtime.weights`."""
    checkpoint: str | Path | None = None
    """A whole-model ``state_dict`` or safetensors file; each rank reads only its tensors. What it
    lacks (non-persistent buffers) comes from ``weights``."""
    factory_weights: str | Path | None = None
    """A file `pipeline.runtime.weights.save_tensors` wrote from the factory's model (the launcher passes
    it so that no rank builds the model again)."""
    recompute: bool = False
    """Recompute each stage's forward during its backward instead of keeping activations."""
    batchnorm: Literal["microbatch", "batch"] = "microbatch"
    """BatchNorm's running statistics in train mode: updated per micro-batch (what one process
    running the micro-batches one after another does), or once per step from the whole batch's
    statistics (each micro-batch is still normalised with its own); see `pipeline.runtime.batchnorm`."""
    autocast: torch.dtype | None = None
    """Run forward under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``)."""
    max_grad_norm: float | None = None
    """Clip gradients to this global norm (across all stages) before the optimizer step."""
    on_nonfinite: OnNonFinite = "stop"
    """A step whose loss or gradients are not finite: ``stop`` (a `NonFiniteError` on every
    rank, before the optimizer steps), ``skip`` (drop that step's update on every rank; needs
    an optimizer) or ``warn`` (log it and step anyway); see [Note: non-finite steps] in
    `pipeline.runtime.finite`. Costs one all-reduce of one number per step."""
    check_boundaries: bool = True
    """Check each sent tensor's shape and dtype against the plan (one comparison per tensor)."""
    device: str | None = None
    """Where the stages live; default ``cuda:<local rank>`` under NCCL, else ``cpu``."""
    link_groups: bool | None = None
    """One communicator per link (default: on NCCL only); see [Note: one communicator per link]
    in `pipeline.runtime.comm`."""
    dp: int | None = None
    """Data-parallel replicas of the pipeline: the world's ranks form a (dp, pp) mesh, replica
    ``r``'s stage-rank ``s`` on rank ``r * pp + s``, each replica fed its own shard of the batch
    and the gradients reduced over the replicas once per optimizer step; default the mesh's
    (``Pipeline(mesh=...)``), else 1. See [Note: the (dp, pp) mesh] in `pipeline.parallel.mesh`."""
    dp_reduce: DpReduce = "ddp"
    """How the replicas share gradients: ``ddp`` (replicated weights, gradients all-reduced in
    buckets, see `pipeline.parallel.reduce`) or ``fsdp`` (FSDP2's ``fully_shard`` over the
    replicas: parameters, gradients and optimizer state sharded, see `pipeline.parallel.fsdp`).
    Without replicas (``dp`` 1) both are one pipeline."""

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("mean", "sum"):
            raise PlanError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if self.microbatches is not None and self.microbatches < 1:
            raise PlanError(f"microbatches must be at least 1, got {self.microbatches}")
        if self.virtual is not None and self.virtual < 1:
            raise PlanError(f"virtual must be at least 1, got {self.virtual}")
        if self.modes is not None and self.modes not in MODES:
            raise PlanError(f"unknown modes {self.modes!r}; choose one of {', '.join(MODES)}")
        if self.batchnorm not in ("microbatch", "batch"):
            raise PlanError(f"batchnorm must be 'microbatch' or 'batch', got {self.batchnorm!r}")
        if self.weights not in ("auto", "factory", "init"):
            raise PlanError(f"weights must be 'auto', 'factory' or 'init', got {self.weights!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise PlanError(
                f"on_nonfinite must be one of {', '.join(map(repr, ON_NONFINITE))}, got "
                f"{self.on_nonfinite!r}"
            )
        if self.dp_reduce not in ("ddp", "fsdp"):
            raise PlanError(f"dp_reduce must be 'ddp' or 'fsdp', got {self.dp_reduce!r}")
        if self.dp_reduce == "fsdp" and self.batchnorm == "batch":
            raise PlanError(
                "batchnorm='batch' swaps a stage's BatchNorm modules after dp_reduce='fsdp' has "
                "sharded their weights; use batchnorm='microbatch' (--batchnorm microbatch) with "
                "fsdp, or dp_reduce='ddp'"
            )
        if self.dp is not None and self.dp < 1:
            raise PlanError(f"dp must be at least 1 (replicas of the pipeline), got {self.dp}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PlanError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
