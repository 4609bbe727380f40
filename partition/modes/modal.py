"""Train and eval modes: the graph of each mode a model distinguishes, and which one runs.

Tracing runs the model's Python ``forward``, so whatever it decides from ``self.training`` is
fixed in the graph: ``F.dropout(x, p, self.training)`` keeps ``training=True``, HF attention's
``dropout if self.training else 0.0`` keeps ``p``, a branch on ``self.training`` keeps one side,
and the export route bakes even ``nn.Dropout`` and ``nn.BatchNorm`` in (fx keeps torch's own
modules as leaf nodes, which follow the module's mode at run time). So:

* `trace_modes` traces the model in the mode it is in while recording which modules' forward
  code read ``training`` (see [Note: proving the modes equal]); only if some did is the model
  traced again in the other mode, and that graph kept only if it differs (``modes="train"`` or
  ``"eval"``, the mode the model is in, skips that second trace: the other mode cannot run);
* `partition.modes.cuts` says which cuts of the traced graph carry over, so that the planner
  only picks those;
* `partition.modes.split.modal_stages` splits the other mode's graph with the cuts of the first:
  every boundary carries the same tensors, in the same order, in both modes, or the build fails
  naming the stage;
* after the weights are in place, `bind_other_mode` points each other-mode stage at the same
  submodules and tensors, and `stage_module` says which graph runs in a mode.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from partition.errors import PipepartError, PlanError, TraceError
from partition.microbatch import first_microbatch
from partition.modes.compare import same_graph
from partition.options import Modes, PlanOptions, with_knobs
from partition.split import Stage
from partition.trace.fx import trace
from partition.trace.traced import TracedModel

__all__ = [
    "ModalStage",
    "OtherMode",
    "bind_other_mode",
    "describe_modes",
    "mode_name",
    "stage_module",
    "trace_modes",
]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_NN_DIR = os.path.join(_TORCH_DIR, "nn") + os.sep
_OUR_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep  # the partition package


@dataclass(eq=False)
class ModalStage(Stage):
    """A stage whose model behaves differently in train and eval mode: both graphs."""

    traced_mode: bool = True
    """The mode ``module`` was traced in (the model's mode as its factory returned it)."""
    other: fx.GraphModule | None = None
    """The same stage traced in the other mode: the same inputs and outputs, in the same order;
    ``None`` when that mode was not traced (``modes="train"`` or ``"eval"``): it cannot run."""
    untraced: str = ""
    """Without ``other``: why the other mode cannot run, and how to make it run."""


@dataclass(frozen=True, eq=False)
class OtherMode:
    """The model in the mode its analysis was not: its graph, or why there is none."""

    traced: TracedModel | None
    """The graph in ``mode``; ``None`` when ``modes`` asked for the traced mode only."""
    mode: bool
    """``True``: the training mode; ``False``: eval."""
    readers: tuple[str, ...] = ()
    """The modules whose forward reads ``self.training`` (``""``: the root)."""

    @property
    def name(self) -> str:
        return mode_name(self.mode)


def mode_name(mode: bool) -> str:
    return "train" if mode else "eval"


def describe_modes(modes: Sequence[str]) -> str:
    """A line saying which modes a plan traced and planned (its ``ModelInfo.modes``)."""
    if len(modes) > 1:
        return (
            f"modes: {' and '.join(modes)} traced (the forward reads self.training); every cut "
            f"carries over to {modes[1]} mode"
        )
    if not modes:
        return "modes: one graph serves train and eval mode"
    other = "eval" if modes[0] == "train" else "train"
    return f"modes: {modes[0]} only (--modes {modes[0]}); the pipeline refuses {other} mode"


def stage_module(stage: Stage, mode: bool) -> fx.GraphModule:
    """The graph module that runs ``stage`` in training (``True``) or eval (``False``) mode.

    Raises:
        PlanError: ``mode`` was not traced (``modes="train"`` or ``"eval"``) and differs.
    """
    if isinstance(stage, ModalStage) and mode != stage.traced_mode:
        if stage.other is None:
            raise PlanError(stage.untraced)
        return stage.other
    return stage.module


# --- which modes differ ---------------------------------------------------------------------


@contextmanager
def _training_reads(model: nn.Module) -> Iterator[set[str]]:
    """Record the paths of the modules of ``model`` whose ``training`` flag code reads.

    [Note: proving the modes equal]
    While the model is traced, every module is given, for the duration, a subclass of its own
    class (same name and module, so tracers and plans see no difference) whose ``training`` is
    a property that answers with the flag and notes who asked. Reads by torch's tracing
    machinery (``torch.fx``, ``torch.export``…) and by pipepart do not count; reads by module
    code (the user's, a library's, ``torch.nn``'s own modules traced through) do, and a module
    that cannot be watched counts as read. A forward
    that never read the flag runs the same Python in both modes, so the graphs are equal: no
    second trace. The fx route's leaf modules (``call_module`` nodes) are run, not traced — they
    follow the mode at run time — so their reads (during shape propagation and costing) are
    dropped afterwards (`_run_at_run_time`), and so are those of ``nn.Dropout(p=0)``, the same
    in both modes (the export route reads it in every block of the bundled GPT).
    """
    paths: set[str] = set()
    swapped: dict[int, tuple[nn.Module, type[nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in swapped:
            continue
        original = type(module)
        try:
            recording = _recording_class(original)
            if "training" not in module.__dict__:
                raise TypeError("training is not an instance attribute")
            module.__class__ = recording
        except TypeError:  # a class that cannot be watched: count it as read
            paths.add(name)
            continue
        module.__dict__[_FLAG] = module.__dict__.pop("training")
        module.__dict__[_PATH] = name
        swapped[id(module)] = (module, original)
    _RECORDS.append(paths)
    try:
        yield paths
    finally:
        _RECORDS.remove(paths)
        for module, original in swapped.values():
            module.__class__ = original
            module.__dict__["training"] = module.__dict__.pop(_FLAG)
            module.__dict__.pop(_PATH, None)


_FLAG = "_pipepart_training"
_PATH = "_pipepart_path"
_RECORDS: list[set[str]] = []
_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _recording_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with a ``training`` property that records its readers (cached per class)."""
    if cls not in _CLASSES:

        def get(self: nn.Module) -> bool:
            if _RECORDS and _counts(sys._getframe(1).f_code.co_filename):
                _RECORDS[-1].add(self.__dict__[_PATH])
            return bool(self.__dict__[_FLAG])

        def set_(self: nn.Module, value: bool) -> None:
            self.__dict__[_FLAG] = value

        namespace = {
            "training": property(get, set_),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        _CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _CLASSES[cls]


def _counts(filename: str) -> bool:
    """Whether a read of ``training`` from code in ``filename`` is the model's own."""
    if filename.startswith(_OUR_DIR):
        return False
    if filename.startswith(_TORCH_DIR):
        return filename.startswith(_TORCH_NN_DIR)
    return True


def _run_at_run_time(traced: TracedModel, path: str) -> bool:
    """Whether module ``path`` is (inside) a leaf of the graph, run rather than traced."""
    for node in traced.graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            if path == target or path.startswith(target + "."):
                return True
    return False


def _same_in_both(module: nn.Module) -> bool:
    """Whether ``module``'s own forward computes the same in both modes (dropout with p = 0)."""
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0


def trace_modes(
    model: nn.Module,
    example_inputs: Sequence[Any],
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
    **knobs: Any,
) -> tuple[TracedModel, OtherMode | None]:
    """The model traced in its mode (at one micro-batch), and in the other mode when it differs
    (``None`` when the two graphs are equal; see [Note: proving the modes equal]): all a rank
    given a plan needs.

    ``options`` (or ``knobs``, its fields one by one): the tracing fields of `PlanOptions`
    (``microbatches``, ``method``, ``leaf_modules``, ``concrete_args``, ``tracer_class``) and
    ``modes``: ``"both"``, or the model's own mode alone (then an `OtherMode` without a graph
    when the forward reads ``self.training``: that mode cannot run).

    Raises:
        PlanError: ``modes`` names the mode the model is not in.
        TraceError: a trace failed; for the other mode, the message says that pipepart traced it
            and how to trace one mode.
    """
    options = with_knobs(options or PlanOptions(microbatches=1), knobs)
    _check_modes(options.modes, model.training)
    args, kwargs = first_microbatch(example_inputs, example_kwargs, options.microbatches)
    fx_options: dict[str, Any] = {
        "leaf_modules": options.leaf_modules,
        "concrete_args": options.concrete_args,
        "tracer_class": options.tracer_class,
    }
    with _training_reads(model) as reads:
        traced = trace(model, args, kwargs, method=options.method, **fx_options)
    modules = dict(model.named_modules(remove_duplicate=False))
    readers = tuple(
        sorted(
            p for p in reads if not _run_at_run_time(traced, p) and not _same_in_both(modules[p])
        )
    )
    if not readers:
        return traced, None
    mode = not model.training
    if options.modes != "both":
        return traced, OtherMode(None, mode, readers)
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode)
    try:
        if traced.method != "fx":
            fx_options = {}
        other = trace(model, args, kwargs, method=traced.method, **fx_options)
    except Exception as e:
        raise _other_failed(e, mode, readers) from e
    finally:
        for module, flag in flags:
            module.training = flag
    return traced, None if same_graph(traced, other) else OtherMode(other, mode, readers)


def _check_modes(modes: Modes, training: bool) -> None:
    if modes not in ("both", mode_name(training)):
        raise PlanError(
            f"modes={modes!r} traces {modes} mode only, but the model is in "
            f"{mode_name(training)} mode; call model.{'train()' if modes == 'train' else 'eval()'} "
            f"first (in the factory), or trace {mode_name(training)!r} or 'both'"
        )


def _other_failed(error: Exception, mode: bool, readers: Sequence[str]) -> Exception:
    """``error``, raised tracing the model in the other ``mode``, said as that."""
    traced = mode_name(not mode)
    shown = ", ".join(repr(r or "(the model)") for r in readers[:3])
    more = f" and {len(readers) - 3} more" if len(readers) > 3 else ""
    message = (
        f"pipepart also traced the model in {mode_name(mode)} mode, because its forward reads "
        f"self.training ({shown}{more}), so that the pipeline can switch modes, and that trace "
        f"failed. To trace only {traced} mode, the mode the model is in, plan with "
        f"modes={traced!r} (--modes {traced}): the pipeline then refuses train({mode}). "
        f"The {mode_name(mode)}-mode trace said: {error}"
    )
    kind = type(error) if isinstance(error, PipepartError) else TraceError
    try:
        return kind(message)
    except TypeError:
        return TraceError(message)


# --- after materialisation ------------------------------------------------------------------


def bind_other_mode(stage: Stage, sources: Sequence[nn.Module]) -> None:
    """Make ``stage``'s other-mode graph use the submodules and tensors of ``sources`` (this
    rank's stage modules in the traced mode, with their real weights), by qualified name.

    Raises:
        PlanError: the other mode reads a tensor none of ``sources`` holds.
    """
    if not isinstance(stage, ModalStage) or stage.other is None:
        return
    module = stage.other
    modules: dict[str, nn.Module] = {}
    tensors: dict[str, torch.Tensor] = {}
    for source in sources:
        modules.update(source.named_modules(remove_duplicate=False))
        tensors.update(source.named_parameters(remove_duplicate=False))
        tensors.update(source.named_buffers(remove_duplicate=False))
    for node in module.graph.nodes:
        if node.op == "call_module" and str(node.target) in modules:
            module.set_submodule(str(node.target), modules[str(node.target)])
    own = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, _ in own:
        if name not in tensors:
            raise PlanError(
                f"stage {stage.index} reads {name!r} in {'train' if not stage.traced_mode else 'eval'} "
                "mode only, and its traced-mode stage does not hold it; choose bounds that put "
                "its readers of both modes in one stage"
            )
        path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(path)
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensors[name]  # type: ignore[assignment]
        else:
            owner._buffers[leaf] = tensors[name]
