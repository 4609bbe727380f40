"""The plan file's schema: a real plan passes, and every field removed, retyped or added is named."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from partition import plan_model
from partition.devices import parse_devices
from partition.errors import PlanError
from partition.models.examples import gpt
from partition.schema import check_plan

OPTIONAL = {
    "virtual",
    "devices",
    "shared_params",
    "objective.bottleneck_stage",
    "objective.minimised",  # plans written before the step objective: bottleneck
    "objective.balance_ratio",
    "stages[0].time",
    "stages[0].dispatched",  # plans written before fixed costs: the stage's node count
}
FREE = {"memory", "shared_params"}  # objects with free keys


@functools.cache
def _plan_text() -> str:
    model, inputs, _ = gpt("toy", batch=4, tie_weights=True)  # tied: shared_params is there
    plan = plan_model(model, inputs, devices=parse_devices("cpu", 2), microbatches=2)
    return plan.to_json()


def _plan() -> dict[str, Any]:
    return json.loads(_plan_text())  # type: ignore[no-any-return]


def _fields(value: Any, path: str = "") -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Every field of a plan: its path as the schema prints it, and the keys to reach it.
    Lists are entered at their first item only."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            yield where, (key,)
            if key not in FREE:
                for sub, keys in _fields(item, where):
                    yield sub, (key, *keys)
    elif isinstance(value, list) and value:
        for sub, keys in _fields(value[0], f"{path}[0]"):
            yield sub, (0, *keys)


def _reach(data: Any, keys: tuple[Any, ...]) -> tuple[Any, Any]:
    for key in keys[:-1]:
        data = data[key]
    return data, keys[-1]


def _error(data: Any) -> str:
    with pytest.raises(PlanError) as info:
        check_plan(data, "plan.json")
    return str(info.value)


def test_a_plan_pipepart_wrote_follows_the_schema() -> None:
    data = _plan()
    assert data["shared_params"]  # the optional parts are there to be checked too
    check_plan(data, "plan.json")
    assert len(list(_fields(data))) > 60


def test_every_field_removed_is_named_unless_it_is_optional() -> None:
    data = _plan()
    for path, keys in _fields(data):
        broken = copy.deepcopy(data)
        parent, key = _reach(broken, keys)
        del parent[key]
        if path in OPTIONAL:
            check_plan(broken, "plan.json")
        else:
            assert f"missing field {path!r}" in _error(broken), path


def test_every_field_retyped_is_named_with_the_type_it_needs() -> None:
    data = _plan()
    for path, keys in _fields(data):
        broken = copy.deepcopy(data)
        parent, key = _reach(broken, keys)
        value = parent[key]
        parent[key] = "x" if not isinstance(value, str) else 7
        message = _error(broken)
        assert path in message, (path, message)
        assert "got str 'x'" in message or "got int 7" in message, (path, message)


def test_an_unknown_field_is_named_with_the_fields_there_are() -> None:
    data = _plan()
    data["stages"][1]["nodes"]["middle"] = 3
    message = _error(data)
    assert "unknown field 'stages[1].nodes.middle'" in message
    assert "stages[1].nodes has the fields start, stop, first, last" in message
    data = _plan()
    data["comment"] = "mine"
    assert "unknown field 'comment'; the plan has the fields schema_version, model" in _error(data)


@pytest.mark.parametrize(
    ("path", "value", "wanted"),
    [
        (("model", "num_nodes"), True, "must be an integer, got bool True"),
        (("model", "num_nodes"), 3.5, "must be an integer, got float 3.5"),
        (("objective", "bottleneck"), "1", "must be a number, got str '1'"),
        (("objective", "bottleneck"), False, "must be a number, got bool False"),
        (("objective", "balance_ratio"), None, None),  # null is allowed there
        (("memory_model", "master_weights"), 1, "must be true or false, got int 1"),
        (("stages",), {}, "stages must be a list, got dict {}"),
        (("model",), [], "model must be a JSON object, got list []"),
    ],
)
def test_types_are_exact(path: tuple[str, ...], value: Any, wanted: str | None) -> None:
    data = _plan()
    parent, key = _reach(data, path)
    parent[key] = value
    if wanted is None:
        check_plan(data, "plan.json")
    else:
        assert wanted in _error(data)


def test_the_message_names_the_file_and_how_to_make_a_good_one() -> None:
    message = _error([])
    assert message.startswith("plan.json is malformed: the plan must be a JSON object, got list")
    assert "Re-create it with `pipepart plan ... --out FILE`" in message
    long = _plan()
    long["schedule"] = list(range(100))
    assert "got list [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11...." in _error(long)
