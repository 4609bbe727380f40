"""How a run trains: `RunOptions` (ranks, steps, optimizer, check, checkpoints), and the
`Checkpoints` settings every rank is handed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from partition.errors import InputError
from pipeline.launch.reference import DEFAULT_TOLERANCE
from pipeline.runtime.optim import OptimizerFactory
from pipeline.runtime.options import PipelineOptions

__all__ = ["Checkpoints", "RunOptions"]


@dataclass(frozen=True, kw_only=True)
class Checkpoints:
    """Where and how often the ranks save, and whether they start from the newest save."""

    root: str
    every: int | None = None
    """Save after every this many steps (None: never during the run)."""
    keep: int | None = None
    """Keep only the newest ``keep`` complete checkpoints."""
    resume: bool = False
    """Start from the newest complete checkpoint in ``root`` (from step 0 if none)."""
    lock_here: bool = False
    """Rank 0 takes the folder's lock (under torchrun; a local launcher holds it itself); see
    [Note: one job per folder] in `pipeline.checkpoint.lock`."""


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How `run_pipeline` trains: where, how long, the optimizer and the check. How the pipeline
    itself runs (schedule, micro-batches, weights, ...) is ``pipeline``, a `PipelineOptions`."""

    ranks: int = 2
    """Local processes to spawn (under torchrun: the world size it started): ``pp * dp``."""
    pp: int | None = None
    """Pipeline ranks of each replica (default ``ranks / dp``, with ``dp`` ``pipeline.dp``);
    see [Note: the (dp, pp) mesh] in `pipeline.parallel.mesh`."""
    accumulate: int = 1
    """Steps whose gradients add up before each optimizer step (``Pipeline.step(...,
    accumulate=True)`` for all but the last); the batch is split into ``accumulate * dp``
    shards, see [Note: a replica's shard] in `pipeline.parallel.data`."""
    steps: int = 1
    """Optimizer steps, each over the same batch."""
    optimizer: str = "sgd"
    """A name in `pipeline.runtime.optim.OPTIMIZER_CLASSES`."""
    lr: float = 1e-3
    check: bool = False
    """Also train the factory's own model in this process and compare; see [Note: an
    independent check] in `pipeline.launch.reference`."""
    check_tol: float = DEFAULT_TOLERANCE
    """The largest relative difference the check accepts."""
    timeout: float = 300.0
    """Seconds a rank waits for a peer (the process group's timeout)."""
    backend: str | None = None
    """``gloo`` or ``nccl``; default NCCL with a GPU per rank, else gloo."""
    size: str = ""
    """For a bundled or ``hf:`` model name: its size (``toy``, ``small``, ``tiny``, ``real``...)."""
    batch: int = 8
    """For a bundled or ``hf:`` model name: the batch its example has."""
    seq: int | None = None
    """For a bundled or ``hf:`` model name: the sequence length."""
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    checkpoint_dir: str | Path | None = None
    """Where the ranks save checkpoints (``step-N`` directories; see `pipeline.checkpoint`)."""
    checkpoint_every: int | None = None
    """Save after every this many steps (needs ``checkpoint_dir``)."""
    keep: int | None = None
    """Keep only the newest ``keep`` complete checkpoints (never deleting the only one)."""
    resume: bool = False
    """Start from the newest complete checkpoint in ``checkpoint_dir`` (from step 0 if none)."""
    restarts: int = 0
    """Local ranks only: when a rank dies, start every rank again this many times, resuming
    from the newest complete checkpoint (under torchrun, its ``--max-restarts`` does this)."""

    def __post_init__(self) -> None:
        for name in ("ranks", "steps", "batch", "accumulate"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if not self.check_tol > 0:
            raise InputError(f"check_tol must be positive, got {self.check_tol}")
        if not self.timeout > 0:
            raise InputError(f"timeout must be positive, got {self.timeout}")
        OptimizerFactory(self.optimizer, self.lr)  # an unknown name fails here
        for name in ("checkpoint_every", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        self._check_mesh()
        if self.restarts < 0:
            raise InputError(f"restarts must be at least 0, got {self.restarts}")
        needs_dir = [
            flag
            for flag, given in (
                ("checkpoint_every", self.checkpoint_every is not None),
                ("keep", self.keep is not None),
                ("resume", self.resume),
                ("restarts", self.restarts > 0),
            )
            if given
        ]
        if needs_dir and self.checkpoint_dir is None:
            raise InputError(
                f"{', '.join(needs_dir)} need checkpoint_dir (--checkpoint-dir DIR): that is "
                "where checkpoints are saved and resumed from"
            )

    def _check_mesh(self) -> None:
        """``ranks`` is ``pp * dp``."""
        dp = self.pipeline.dp or 1
        if self.pp is not None and self.pp < 1:
            raise InputError(f"pp must be at least 1, got {self.pp}")
        if self.pp is None and self.ranks % dp:
            raise InputError(
                f"--ranks {self.ranks} do not split into --dp {dp} replicas of equal pipelines; "
                f"launch a multiple of {dp} ranks, or give --dp a divisor of {self.ranks}"
            )
        if self.ranks != self.pp_ranks * dp:
            pp = self.pp_ranks
            raise InputError(
                f"--ranks {self.ranks} is not --pp {pp} pipeline ranks x --dp {dp} replicas; "
                f"launch --ranks {self.pp_ranks * dp}, or choose --pp and --dp whose product "
                f"is {self.ranks}"
            )

    @property
    def pp_ranks(self) -> int:
        """Pipeline ranks per replica: ``pp``, else ``ranks / dp``."""
        return self.pp if self.pp is not None else max(1, self.ranks // (self.pipeline.dp or 1))

    @property
    def checkpoints(self) -> Checkpoints | None:
        """Where and how often the ranks save, or None without ``checkpoint_dir``."""
        if self.checkpoint_dir is None:
            return None
        return Checkpoints(
            root=str(self.checkpoint_dir),
            every=self.checkpoint_every,
            keep=self.keep,
            resume=self.resume,
        )
