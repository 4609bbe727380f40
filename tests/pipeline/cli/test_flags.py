"""`pipeline.cli.flags`: the shared flags become one frozen `PlanOptions` (the defaults are
`PlanOptions`' own), the devices of ``--device-spec``, and every sub-command's parser."""

from __future__ import annotations

import argparse
import copy
import dataclasses

import pytest

from partition.errors import PlanError
from partition.memory import MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.options import PlanOptions
from partition.schedules.names import DEFAULT_SCHEDULE
from pipeline.cli.command import _parser
from pipeline.cli.flags import (
    add_command,
    add_debug_argument,
    devices,
    devices_of_spec,
    make_plan,
    meta_model,
    plan_options,
)


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


@pytest.mark.parametrize(
    "argv",
    [["plan", "gpt"], ["simulate", "gpt"], ["simulate", "plan.json"]],
)
def test_no_flags_plan_as_plan_model_does(argv: list[str]) -> None:
    """One default per knob: the command's, and `PlanOptions`' (so `plan_model`'s), agree."""
    assert plan_options(_args(*argv)) == PlanOptions()
    assert PlanOptions().schedule == DEFAULT_SCHEDULE
    assert PlanOptions().microbatches == DEFAULT_MICROBATCHES


def test_the_help_names_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"pipeline schedule (default {DEFAULT_SCHEDULE})" in out
    assert f"micro-batches per step (default {DEFAULT_MICROBATCHES})" in out
    assert "partitioner (default optimal)" in out and "trace route (default auto)" in out


def test_every_flag_reaches_its_field() -> None:
    args = _args(
        "plan",
        "gpt",
        "--schedule",
        "interleaved",
        "--microbatches",
        "8",
        "--virtual",
        "2",
        "--optimizer",
        "sgd",
        "--master-weights",
        "--algorithm",
        "params",
        "--trace",
        "export",
        "--leaf",
        "h.*",
        "--leaf",
        "lm_head",
        "--profile",
    )
    assert plan_options(args) == PlanOptions(
        schedule="interleaved",
        microbatches=8,
        virtual=2,
        memory=MemoryModel(optimizer="sgd", master_weights=True),
        algorithm="params",
        method="export",
        leaf_modules=("h.*", "lm_head"),
        profile=True,
    )
    assert plan_options(_args("plan", "gpt", "--cuts", "markers")).cuts == "markers"


def test_given_fields_win_and_args_are_never_changed() -> None:
    args = _args("plan", "gpt", "--schedule", "gpipe", "--optimizer", "sgd")
    before = copy.deepcopy(vars(args))
    options = plan_options(args, schedule="1f1b", microbatches=2, memory=MemoryModel())
    assert (options.schedule, options.microbatches, options.memory) == ("1f1b", 2, MemoryModel())
    assert vars(args) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.schedule = "gpipe"  # type: ignore[misc]


def test_a_given_memory_model_is_not_built_from_the_flags() -> None:
    """``run --cuts markers``: ``--optimizer`` is the run's (``run``'s choices), never the
    planner's: a given `MemoryModel` means the flag is not read at all."""
    args = argparse.Namespace(optimizer="no-such-optimizer")
    assert plan_options(args, memory=MemoryModel()).memory == MemoryModel()
    with pytest.raises(PlanError, match="unknown optimizer 'no-such-optimizer'"):
        plan_options(args)


def test_a_bad_flag_value_is_the_options_error() -> None:
    """The CLI does not re-validate: `PlanOptions` says what is wrong."""
    with pytest.raises(PlanError, match="microbatches must be a positive integer, got 0"):
        plan_options(_args("plan", "gpt", "--microbatches", "0"))
    with pytest.raises(PlanError, match="interleaved"):
        plan_options(_args("plan", "gpt", "--schedule", "interleaved"))  # --virtual 1


@pytest.mark.parametrize(
    ("argv", "count", "names"),
    [
        (["plan", "gpt"], None, ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]),  # 4 by default
        (["plan", "gpt", "--devices", "2"], None, ["cpu:0", "cpu:1"]),
        (["plan", "gpt", "--devices", "2"], 3, ["cpu:0", "cpu:1", "cpu:2"]),  # count wins
        (["plan", "gpt", "--device-spec", "h100"], None, [f"h100:{i}" for i in range(4)]),
        (["plan", "gpt", "--device-spec", "h100;a100-40;"], None, ["h100", "a100-40"]),
        (["plan", "gpt", "--device-spec", "h100;cpu", "--devices", "2"], None, ["h100", "cpu"]),
        (["simulate", "gpt"], None, ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]),  # spec None: cpu
    ],
)
def test_devices_of_the_flags(argv: list[str], count: int | None, names: list[str]) -> None:
    assert [d.name for d in devices(_args(*argv), count)] == names


def test_several_specs_must_match_the_count() -> None:
    with pytest.raises(PlanError, match="2 device specs given but --devices 3"):
        devices(_args("plan", "gpt", "--device-spec", "h100;cpu", "--devices", "3"))
    with pytest.raises(PlanError, match="no devices given"):
        devices_of_spec(";", None, repeat=2)


def test_devices_of_a_spec_repeat_one_and_keep_several() -> None:
    assert [d.name for d in devices_of_spec("a100-80", None, repeat=2)] == [
        "a100-80:0",
        "a100-80:1",
    ]
    assert [d.name for d in devices_of_spec("a100-80", 3, repeat=2)] == [
        f"a100-80:{i}" for i in range(3)
    ]
    assert [d.name for d in devices_of_spec("h100;h200", None, repeat=5)] == ["h100", "h200"]


def test_the_model_is_built_on_meta() -> None:
    model, inputs, kwargs = meta_model(_args("plan", "gpt", "--batch", "4", "--seq", "16"))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert inputs[0].device.type == "meta" and inputs[0].shape[:2] == (4, 16)
    assert isinstance(kwargs, dict)
    big, _, _ = meta_model(_args("plan", "gpt", "--size", "1b"))  # nothing allocated
    assert sum(p.numel() for p in big.parameters()) > 500_000_000
    assert all(p.is_meta for p in big.parameters())


def test_make_plan_reports_what_it_does() -> None:
    args = _args("plan", "gpt", "--devices", "2", "--microbatches", "2")
    said: list[str] = []
    plan = make_plan(args, plan_options(args), devices(args), said.append)
    assert plan.num_stages == 2 and plan.microbatches == 2
    assert said[0] == "building gpt on meta" and len(said) > 1


def test_a_command_gets_json_debug_its_examples_and_its_function() -> None:
    parser = argparse.ArgumentParser(prog="tool")
    add_debug_argument(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    command = add_command(sub, "go", lambda args: 7, help="go", epilog="examples:\n  tool go")
    command.add_argument("--fast", action="store_true")
    args = parser.parse_args(["go"])
    assert (args.json, args.debug, args.fast, args.func(args)) == (False, False, False, 7)
    assert parser.parse_args(["--debug", "go", "--json"]).debug is True
    assert parser.parse_args(["go", "--debug"]).debug is True
    assert "examples:\n  tool go" in command.format_help()  # kept as written


def test_a_sub_commands_debug_has_no_default() -> None:
    """See [Note: --debug anywhere]: a default on the sub-parser would overwrite the top's."""
    parser = argparse.ArgumentParser()
    add_debug_argument(parser, top=False)
    assert "debug" not in vars(parser.parse_args([]))
    assert parser.parse_args(["--debug"]).debug is True
