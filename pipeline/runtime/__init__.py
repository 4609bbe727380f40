"""The runtime: every rank builds only its stages and runs its schedule's actions.

`pipeline` holds the `Pipeline` users make, its set-up and its step, `update` what the step does
after its schedule; `layout` where every stage is; `executor` one rank's actions over
micro-batches, `stage` one stage's forward and backward, `comm` the messages, `failure` the place
an error names; `batch` the split into micro-batches and back; `weights`, `init` and
`tensorfile` where the values come from; `tied` weights on several ranks, `clip` the global-norm
clipping, `batchnorm`, `optim`, `device` and `options` the rest. Replicas of a pipeline are
`pipeline.parallel`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.runtime.options import PipelineOptions
    from pipeline.runtime.pipeline import ModelFactory, Pipeline

__all__ = ["ModelFactory", "Pipeline", "PipelineOptions"]


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (so ``pipeline.runtime.stage`` stays light)."""
    if name in ("Pipeline", "ModelFactory"):
        from pipeline.runtime.pipeline import ModelFactory, Pipeline

        return {"Pipeline": Pipeline, "ModelFactory": ModelFactory}[name]
    if name == "PipelineOptions":
        from pipeline.runtime.options import PipelineOptions

        return PipelineOptions
    raise AttributeError(f"module 'pipeline.runtime' has no attribute {name!r}")
