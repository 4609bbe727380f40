"""The packages' public names: never a submodule, whatever was imported first; errors in one tree.

A package attribute named like a submodule becomes that submodule once anything imports it
(``partition.trace.fx`` was the function until ``import partition.cost`` imported the module); see
[Note: no name is a submodule's] in `partition`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import partition
import pipeline
from partition import errors

PACKAGES = (partition, pipeline)
# Submodules that need an optional extra to import; the rest must all import.
OPTIONAL = {"partition.models.hf": "transformers", "partition.plots": "matplotlib"}


def _submodules(package: types.ModuleType) -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}."))


def _import_every_submodule() -> None:
    for name in [*_submodules(partition), *_submodules(pipeline)]:
        try:
            importlib.import_module(name)
        except ImportError:
            if name not in OPTIONAL:
                raise


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_no_public_name_is_a_submodule_name(package: types.ModuleType) -> None:
    submodules = {name.rsplit(".", 1)[1] for name in _submodules(package)}
    assert sorted(set(package.__all__) & submodules) == []


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_public_names_after_every_submodule_is_imported(package: types.ModuleType) -> None:
    _import_every_submodule()
    assert sorted(package.__all__) == sorted(package._WHERE)  # type: ignore[attr-defined]
    for name in package.__all__:
        value = getattr(package, name)
        assert not isinstance(value, types.ModuleType), f"{package.__name__}.{name} is a module"
        module, attribute = package._WHERE[name]  # type: ignore[attr-defined]
        full = module if "." in module else f"{package.__name__}.{module}"
        assert value is getattr(sys.modules[full], attribute), name
        namespace: dict[str, object] = {}
        exec(f"from {package.__name__} import {name}", namespace)
        assert namespace[name] is value, name
        assert inspect.isclass(value) or callable(value) or name == "PRESETS", name


def test_public_functions_are_callable_after_their_modules_are_imported() -> None:
    import torch

    importlib.import_module("partition.trace.fx")
    importlib.import_module("partition.cost")  # imports partition.trace.fx: the original symptom
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    traced = partition.trace_model(model, (torch.randn(3, 4),))
    assert isinstance(traced, partition.TracedModel)
    schedule = pipeline.build_schedule("1f1b", 2, 2)
    result = pipeline.simulate_schedule(schedule, forward_time=1.0, backward_time=2.0)
    assert result.step_time == pytest.approx(9.0)  # (m + p - 1)(F + B) for 1F1B, p = m = 2


def test_every_error_is_a_pipepart_error_and_a_standard_type() -> None:
    standard = {
        "BatchError": ValueError,
        "BoundaryError": ValueError,
        "CheckpointError": ValueError,
        "FactoryError": RuntimeError,
        "InfeasibleError": ValueError,
        "InputError": TypeError,
        "NonFiniteError": FloatingPointError,
        "PeerError": ConnectionError,
        "PlanError": ValueError,
        "StageError": RuntimeError,
        "TraceError": RuntimeError,
    }
    defined = [n for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert sorted(defined) == sorted([*standard, "PipepartError"])
    for name, kind in standard.items():
        error = getattr(errors, name)
        assert issubclass(error, errors.PipepartError) and issubclass(error, kind), name
        assert getattr(partition, name) is error, name
    for name in ("BatchError", "BoundaryError", "NonFiniteError", "PeerError", "StageError"):
        assert getattr(pipeline, name) is getattr(errors, name), name
    from pipeline.runtime.comm import BoundaryError, PeerError
    from pipeline.runtime.pipeline import BatchError

    assert (BoundaryError, PeerError, BatchError) == (
        errors.BoundaryError,
        errors.PeerError,
        errors.BatchError,
    )  # still importable from where they were defined before


def test_importing_the_packages_stays_light() -> None:
    """``import partition, pipeline`` loads no submodule, and the schedules load no torch."""
    code = (
        "import sys\n"
        "def loaded():\n"
        "    return [m for m in sys.modules if m == 'torch' or m.startswith(('partition.', 'pipeline.'))]\n"
        "import partition, pipeline\n"
        "print(sorted(loaded()))\n"
        "import partition.errors, partition.schedules.actions\n"
        "print('torch' in loaded())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["[]", "False"], out


def _imports(path: str) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function-local imports too)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_partition_imports_nothing_from_pipeline() -> None:
    """Dependencies run one way, ``pipeline`` -> ``partition``, even inside functions."""
    offenders = {}
    for name in _submodules(partition):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        path = spec.origin
        bad = sorted(m for m in _imports(path) if m == "pipeline" or m.startswith("pipeline."))
        if bad:
            offenders[name] = bad
    assert offenders == {}
    code = (
        "import importlib, pkgutil, sys, partition\n"
        "for m in pkgutil.walk_packages(partition.__path__, 'partition.'):\n"
        "    try: importlib.import_module(m.name)\n"
        "    except ImportError: pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["[]"], out


def test_no_two_modules_import_each_other() -> None:
    """The modules of both packages import in one direction only — no cycle, even through
    function-local or ``TYPE_CHECKING`` imports (a cycle is how two rooms become one)."""
    import networkx as nx

    graph = nx.DiGraph()
    for package in (partition, pipeline):
        for name in _submodules(package):
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.origin, name
            for target in _imports(spec.origin):
                if target.split(".")[0] in ("partition", "pipeline") and "." in target:
                    graph.add_edge(name, target)
    assert sorted(nx.simple_cycles(graph)) == []


def test_the_public_import_paths_kept_through_the_move_to_sub_packages() -> None:
    """Paths users, the README, the notebooks and pyproject name, each the object it was."""
    from importlib.metadata import entry_points

    import partition.examples
    import partition.models.examples
    import pipeline.cli
    import pipeline.cli.command
    import pipeline.runtime
    import pipeline.runtime.pipeline

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "pipepart"]
    assert script.value == "pipeline.cli:main" and script.load() is pipeline.cli.command.main
    assert partition.examples.gpt is partition.models.examples.gpt
    assert set(partition.examples.__all__) == set(partition.models.examples.__all__)
    assert pipeline.runtime.Pipeline is pipeline.runtime.pipeline.Pipeline is pipeline.Pipeline
    assert pipeline.runtime.PipelineOptions is pipeline.PipelineOptions
    assert partition.plan_model is pipeline.plan_model  # planning is partition's; re-exported
    namespace: dict[str, object] = {}
    exec("from partition import plan_model, simulate_plan, build_schedule", namespace)
    assert callable(namespace["plan_model"])
