"""``--check``: the same steps on the user's own model in one process, and how far the pipeline is.

[Note: an independent check]
A check that shares code with what it checks proves nothing. The reference is the model exactly
as the factory builds it (`pipeline.runtime.weights.build_eager`: ``torch.manual_seed(seed);
model_fn()``), run the plain way in this process — never through pipepart's tracing, splitting
or materialisation — so the check also proves that the pipeline trains the model's own weights
(its step-0 loss must equal the eager model's). To compare like with like it runs the pipeline's
step semantics: the same micro-batches one after another, each loss scaled by ``1/m`` for
``loss_reduction="mean"`` (unscaled for ``"sum"``), gradient clipping by the global norm, the
same optimizer; BatchNorm then sees the same micro-batches, as the pipeline's does. It runs on
one CPU thread, as each rank `pipepart run` spawns does: CPU kernels divide their work by thread
count, and an ill-conditioned model turns that reordering into differences far above fp32
rounding (torchvision's EfficientNet-B0 at 96 px, batch 8: 3.8e-4 on a squeeze-excitation bias
with the reference on 2 threads, 0 on 1).

Differences are relative. A gradient: ``max|pipeline - reference|`` over its own largest
magnitude, or its layer's when that is larger (see [Note: a gradient's rounding floor]). A
parameter or buffer: over the
largest magnitude of any parameter (buffer) of the model — Adam turns rounding noise in
near-zero gradients into updates the size of the learning rate, noise relative to the model, not
to a zero-initialised bias. A step's loss: ``|loss - reference| / max(|reference|, 1e-6)``. The
check passes when the largest of them is at most the tolerance. A non-finite loss, gradient,
parameter or buffer on either side fails the check and is reported as ``nan`` / ``inf``, never
as a difference of 0. With ``--batchnorm batch`` the reference's running statistics are those of
the whole batch, as the pipeline's.

[Note: a gradient's rounding floor]
A gradient is a sum over the batch's rows (and positions) of per-row contributions: a Linear's
``dL/db = sum_t d_t`` and ``dL/dW = sum_t d_t x_t^T``, with ``d_t`` the gradient of its output.
Two fp32 computations that add in another order (micro-batches, another process, another kernel)
differ by rounding of about ``eps * sqrt(n)`` times the size of the *contributions*
(``eps = 2**-24``), not of the result. Usually the result is as large as its contributions and a
difference relative to the gradient's own largest magnitude is a few ``eps``. When the
contributions cancel, it is not: a bias before BatchNorm (which subtracts the mean), or the key
bias of attention — softmax is shift-invariant, so ``sum_t dL/dk_t = q * sum_t dL/ds_t = 0`` for
every query — has a true gradient of exactly 0, computed as ~1e-9 of noise on both sides; over
its own magnitude that is a difference of order 1, a false alarm.

The contributions are not visible afterwards, but the layer's other gradients are made of the
same ones: ``|dL/dW| ~ sqrt(n) * |d| * |x|`` grows with the batch as the bias's rounding
``eps * sqrt(n) * |d|`` does, so the rounding relative to the layer's largest gradient is a few
``eps / |x|`` whatever the batch: 1-4 eps on the key biases of a 2-layer attention model
(`test_attention_key_biases_pass_the_check`, and on 2 ranks), with inputs ``x`` of order 1, as a
normalisation leaves them. So a gradient's difference is judged over ``max(|reference|.max(), layer)``, ``layer``
being the largest reference gradient of the module that owns the tensor (or of the nearest
enclosing module owning another gradient, when it owns only this one). The floor picks the scale
the rounding is proportional to; the tolerance (1e-5, ~84 eps) stays the allowance for it, so the
floor carries no ``eps * sqrt(n)`` factor of its own. A real error is still one: a gradient off
by 0.1 %, one element off, or a zero gradient given a value a thousandth of its layer's, is
1e-3. A layer whose every gradient is zero is judged over ``eps`` times the model's largest
gradient (any difference of meaningful size fails). Non-finite values fail before any scale.
Inputs far below 1 make the floor strict, and far above, lenient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_TOLERANCE",
    "CheckResult",
    "RankReport",
    "Reference",
    "StepSemantics",
    "compare",
    "run_reference",
]

DEFAULT_TOLERANCE = 1e-5
"""Relative, for fp32 (`--check-tol`); see [Note: an independent check]."""

_FLOOR = 1e-6
_EPS32 = float(torch.finfo(torch.float32).eps) / 2  # 2**-24, fp32's unit roundoff


class StepSemantics(Protocol):
    """What a step does beyond the model, as the pipeline ran it (a `PipelineOptions` is one)."""

    @property
    def loss_reduction(self) -> str: ...
    @property
    def max_grad_norm(self) -> float | None: ...
    @property
    def batchnorm(self) -> str: ...


class RankReport(Protocol):
    """What `compare` reads of a rank's report (a `pipeline.launch.job.RankResult`)."""

    losses: list[float | None]
    params: dict[str, Tensor]
    grads: dict[str, Tensor]
    buffers: dict[str, Tensor]


@dataclass
class Reference:
    """What the plain model did: per-step losses, and its state after the last step."""

    losses: list[float]
    params: dict[str, Tensor]
    grads: dict[str, Tensor]
    buffers: dict[str, Tensor]
    canonical: dict[str, str]
    """Every name of a tensor -> its first name (a tied weight has several)."""


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    """The largest relative differences from the plain model (see [Note: an independent
    check]), the worst tensor of each kind, and whether all are within the tolerance."""

    loss: float
    grads: float
    params: float
    buffers: float
    worst: dict[str, str]
    """Kind (``grads``, ``params``, ``buffers``) -> the name of its worst tensor."""
    tolerance: float
    failures: list[str]
    """One line per kind over the tolerance or not finite, e.g. ``grads nan (h.0.attn.w)``."""
    losses: list[float]
    """The pipeline's loss at each step."""
    reference_losses: list[float]
    """The plain model's loss at each step."""

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _chunks(value: Any, m: int) -> list[Any]:
    if isinstance(value, Tensor):
        return list(value.tensor_split(m))
    if isinstance(value, (tuple, list)):
        parts = [_chunks(v, m) for v in value]
        return [type(value)(p[i] for p in parts) for i in range(m)]
    if isinstance(value, dict):
        parts_by_key = {k: _chunks(v, m) for k, v in value.items()}
        return [{k: p[i] for k, p in parts_by_key.items()} for i in range(m)]
    return [value] * m


@contextlib.contextmanager
def _cpu_threads(threads: int) -> Iterator[None]:
    """``threads`` CPU threads while it lasts, the caller's again afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_reference(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: tuple[Any, Any],
    *,
    microbatches: int,
    steps: int,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    semantics: StepSemantics,
    threads: int = 1,
) -> Reference:
    """Train ``model`` (the factory's, eager) for ``steps`` steps on ``batch`` (inputs, target)
    with the pipeline's step semantics.

    With ``semantics.batchnorm == "batch"`` the BatchNorm running statistics are those of one
    forward over the whole batch per step, before the optimizer step (what
    `pipeline.runtime.batchnorm` commits); normalisation still uses each micro-batch's own.
    It runs on ``threads`` CPU threads, as each local rank does (see [Note: an independent
    check]).
    """
    inputs, target = batch
    loss_reduction, max_grad_norm = semantics.loss_reduction, semantics.max_grad_norm
    batchnorm = semantics.batchnorm
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    params = list(model.parameters())
    optimizer = optimizer_factory(params)
    scale = 1.0 / microbatches if loss_reduction == "mean" else 1.0
    mb_inputs = _chunks(inputs, microbatches)
    mb_targets = _chunks(target, microbatches) if target is not None else [None] * microbatches
    losses = []
    with _cpu_threads(threads):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            before = [[t.clone() for t in _stats(m)] for m in norms] if batchnorm == "batch" else []
            for x, y in zip(mb_inputs, mb_targets, strict=True):
                output = model(**x) if isinstance(x, dict) else model(*x)
                loss = loss_fn(output, y)
                (loss * scale).backward()
                total += float(loss.detach())
            if before:  # the statistics of the whole batch instead, as the pipeline commits them
                with torch.no_grad():
                    for m, saved in zip(norms, before, strict=True):
                        for t, v in zip(_stats(m), saved, strict=True):
                            t.copy_(v)
                    _ = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(total * scale)
    named = dict(model.named_parameters())
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for source in (model.named_parameters, model.named_buffers):
        for n, t in source(remove_duplicate=False):
            canonical[n] = first.setdefault(id(t), n)
    return Reference(
        losses=losses,
        params={n: p.detach().clone() for n, p in named.items()},
        grads={n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None},
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        canonical=canonical,
    )


def _stats(m: nn.Module) -> list[Tensor]:
    """A BatchNorm's running statistics (cloned when read for saving)."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    return [b for n in names if isinstance(b := getattr(m, n, None), Tensor)]


def _relative(got: Tensor, want: Tensor, floor: float = _FLOOR) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not bool(torch.isfinite(got).all()) or not bool(torch.isfinite(want).all()):
        return math.nan
    if got.shape != want.shape:
        return math.inf
    if not got.numel():
        return 0.0
    scale = max(float(want.abs().max()), floor)
    return float((got - want).abs().max()) / scale


def _largest(tensors: dict[str, Tensor]) -> dict[str, float]:
    """Each tensor's largest finite magnitude (0 for an empty or wholly non-finite one)."""
    out = {}
    for n, t in tensors.items():
        finite = t.detach()[torch.isfinite(t.detach())]
        out[n] = float(finite.abs().max()) if finite.numel() else 0.0
    return out


def _layer_floors(grads: dict[str, Tensor]) -> dict[str, float]:
    """Each gradient's floor: the largest gradient of the module owning it, or of the nearest
    enclosing module owning another gradient; see [Note: a gradient's rounding floor]."""
    sizes = _largest(grads)
    scale: dict[str, float] = {}
    count: dict[str, int] = {}
    for n, size in sizes.items():
        for prefix in _owners(n):
            scale[prefix] = max(scale.get(prefix, 0.0), size)
            count[prefix] = count.get(prefix, 0) + 1
    last_resort = _EPS32 * max(sizes.values(), default=0.0) or _FLOOR
    floors = {}
    for n in sizes:
        layer = next((scale[p] for p in _owners(n) if count[p] > 1), 0.0)
        floors[n] = layer or last_resort
    return floors


def _owners(name: str) -> list[str]:
    """The modules owning ``name``, innermost first: ``a.b.w`` -> ``a.b``, ``a``, ``""``."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:k]) for k in range(len(parts), -1, -1)]


def _worst(pairs: Iterable[tuple[str, float]]) -> tuple[float, str]:
    """The largest difference and its name; NaN (a non-finite value) beats everything."""
    worst, name = 0.0, ""
    for n, d in pairs:
        if math.isnan(d):
            return d, n
        if d > worst:
            worst, name = d, n
    return worst, name


def compare(
    results: Sequence[RankReport], reference: Reference, *, tolerance: float = DEFAULT_TOLERANCE
) -> CheckResult:
    """The largest relative differences between the ranks' ``results`` and ``reference``:
    ``losses`` per step (None off the last stage), and ``params``, ``grads``, ``buffers`` by
    qualified name."""
    steps = len(reference.losses)
    pipe_losses: list[float] = [
        next((loss for r in results if (loss := r.losses[k]) is not None), math.nan)
        for k in range(steps)
    ]
    loss_diffs = []
    for got, want in zip(pipe_losses, reference.losses, strict=True):
        if not (math.isfinite(got) and math.isfinite(want)):
            loss_diffs.append(math.nan)
        else:
            loss_diffs.append(abs(got - want) / max(abs(want), _FLOOR))
    out: dict[str, float] = {"loss": _worst((f"step {k}", d) for k, d in enumerate(loss_diffs))[0]}
    worst_names: dict[str, str] = {}
    failures: list[str] = []
    for what in ("grads", "params", "buffers"):
        want_all: dict[str, Tensor] = getattr(reference, what)
        # parameters and buffers relative to the model's largest; a gradient to its own largest,
        # or its layer's (see [Note: a gradient's rounding floor])
        largest = max([_FLOOR, *_largest(want_all).values()])
        floors = _layer_floors(want_all) if what == "grads" else {}
        pairs = []
        seen: set[str] = set()
        for r in results:
            for alias, t in getattr(r, what).items():
                name = reference.canonical.get(alias, alias)
                seen.add(name)
                if name not in want_all:
                    if what == "grads":  # the pipeline computed a gradient the model did not
                        pairs.append((name, math.inf))
                    continue
                pairs.append((name, _relative(t, want_all[name], floors.get(name, largest))))
        if what == "grads":  # a gradient the model has but no rank reported
            pairs += [(n, math.inf) for n, g in want_all.items() if n not in seen and g.any()]
        out[what], worst_names[what] = _worst(pairs)
    for what in ("loss", "grads", "params", "buffers"):
        d = out[what]
        if not math.isfinite(d) or d > tolerance:
            where = f" ({worst_names[what]})" if worst_names.get(what) else ""
            failures.append(f"{what} {_fmt(d)}{where}")
    return CheckResult(
        loss=out["loss"],
        grads=out["grads"],
        params=out["params"],
        buffers=out["buffers"],
        worst=worst_names,
        tolerance=tolerance,
        failures=failures,
        losses=pipe_losses,
        reference_losses=list(reference.losses),
    )


def _fmt(d: float) -> str:
    return "nan" if math.isnan(d) else ("inf" if math.isinf(d) else f"{d:.3g}")
