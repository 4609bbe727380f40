"""The CPU-sized models the runtime benchmarks train, their data, and per-rank memory readings.

Both `benchmarks.schedules` and `benchmarks.vs_pipelining` run these, so that their numbers
describe the same work. A `Workload` is a picklable model factory (spawned ranks call it under
``torch.device("meta")``) returning ``(model, args, kwargs, loss_fn, target)`` like
`partition.models.registry`; its sizes make each stage's compute dominate a step on one CPU thread:

* ``gpt``: the bundled GPT, width 256, 4 heads, a small vocabulary (1,024) so that blocks, not
  the LM head, hold the time; ``rows`` sequences of ``seq`` tokens per micro-batch.
* ``skipnet``: the bundled `SkipNet` widened (width 1,024): a tensor skips every stage boundary
  from the first layer to the last, so every cut carries two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from partition.models import examples
from partition.models.registry import BuiltModel

__all__: list[str] = []


@dataclass(frozen=True)
class Workload:
    """A model and its batch shape: ``rows`` examples per micro-batch, ``microbatches`` per step."""

    model: str
    """``gpt`` or ``skipnet``."""
    width: int
    layers: int
    rows: int
    microbatches: int
    seq: int = 64
    """Tokens per sequence (``gpt`` only)."""
    vocab: int = 1024
    """Vocabulary (``gpt`` only)."""

    @property
    def batch(self) -> int:
        return self.rows * self.microbatches

    @property
    def loss_fn(self) -> Any:
        """The loss of ``model``'s factory in `partition.models.examples` (no model built)."""
        return examples.lm_loss if self.model == "gpt" else torch.nn.functional.mse_loss

    def describe(self) -> str:
        if self.model == "gpt":
            return (
                f"GPT d={self.width}, {self.layers} blocks, 4 heads, vocab {self.vocab}, "
                f"{self.rows}x{self.seq} tokens per micro-batch"
            )
        return f"SkipNet width {self.width}, {self.layers} layers, {self.rows} rows per micro-batch"

    def __call__(self) -> BuiltModel:
        """The model, its example batch, loss and target; under ``torch.device("meta")``, no
        weights."""
        meta = torch.empty(0).device.type == "meta"
        model: torch.nn.Module
        if self.model == "gpt":
            config = examples.GPTConfig(
                vocab_size=self.vocab,
                block_size=self.seq,
                n_layer=self.layers,
                n_head=4,
                n_embd=self.width,
            )
            model, args, loss_fn = examples.gpt(config, batch=self.batch, seq=self.seq)
            target = (
                torch.empty_like(args[0]) if meta else torch.randint(0, self.vocab, args[0].shape)
            )
        elif self.model == "skipnet":
            model, args, loss_fn = examples.skipnet(
                batch=self.batch, width=self.width, depth=self.layers
            )
            target = torch.empty_like(args[0]) if meta else torch.randn(args[0].shape)
        else:
            raise ValueError(f"unknown workload model {self.model!r}; use gpt or skipnet")
        return BuiltModel(model, tuple(args), {}, loss_fn, target)


def gpt(microbatches: int, *, layers: int = 8, rows: int = 2, width: int = 256) -> Workload:
    return Workload("gpt", width, layers, rows, microbatches)


def skipnet(microbatches: int, *, layers: int = 8, rows: int = 64, width: int = 1024) -> Workload:
    return Workload("skipnet", width, layers, rows, microbatches)


@dataclass(frozen=True)
class HFGPT2:
    """Hugging Face's GPT-2 (``hf:gpt2``'s model and loss) at a small width: a third-party model
    for `benchmarks.plan_accuracy`, fed ``input_ids`` and an ``attention_mask``."""

    layers: int = 8
    width: int = 64
    rows: int = 2
    microbatches: int = 4
    seq: int = 32
    vocab: int = 512
    model: str = "hf-gpt2"

    @property
    def batch(self) -> int:
        return self.rows * self.microbatches

    def describe(self) -> str:
        return (
            f"HF GPT-2 d={self.width}, {self.layers} blocks, 4 heads, vocab {self.vocab}, "
            f"{self.rows}x{self.seq} tokens per micro-batch"
        )

    def __call__(self) -> BuiltModel:
        import transformers

        from partition.models.hf import causal_lm_loss

        config = transformers.GPT2Config(
            n_layer=self.layers,
            n_embd=self.width,
            n_head=4,
            vocab_size=self.vocab,
            n_positions=self.seq,
            use_cache=False,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        meta = torch.empty(0).device.type == "meta"
        shape = (self.batch, self.seq)
        (ids,), target = (
            ((torch.empty(shape, dtype=torch.long),), torch.empty(shape, dtype=torch.long))
            if meta
            else batch(self)
        )
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        model = transformers.GPT2LMHeadModel(config)
        return BuiltModel(model, (), kwargs, causal_lm_loss, target)  # inputs by keyword


def batch(
    workload: Workload | HFGPT2, seed: int = 1
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A deterministic batch and target for ``workload`` (the same on every rank and run)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(workload, HFGPT2):
        shape = (workload.batch, workload.seq)
        idx = torch.randint(0, workload.vocab, shape, generator=generator)
        return (idx,), torch.randint(0, workload.vocab, shape, generator=generator)
    if workload.model == "gpt":
        shape = (workload.batch, workload.seq)
        idx = torch.randint(0, workload.vocab, shape, generator=generator)
        return (idx,), torch.randint(0, workload.vocab, shape, generator=generator)
    shape2 = (workload.batch, workload.width)
    return (torch.randn(shape2, generator=generator),), torch.randn(shape2, generator=generator)


def revision() -> str:
    """The repository's commit, with ``+dirty`` if the runtime (``pipeline/``) has local edits."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "pipeline"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def rss_mib() -> tuple[float, float]:
    """This process's ``(current, peak)`` resident set in MiB (``VmRSS``, ``VmHWM``)."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)


def machine(load: Any) -> dict[str, Any]:
    """Where a benchmark ran: platform, cores, versions, load average and the code's revision."""
    import os
    import platform
    import sys

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average": list(load),
        "revision": revision(),
    }
