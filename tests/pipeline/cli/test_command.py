"""`pipeline.cli.command`: the parser of every sub-command, ``--debug`` before or after it, and the
one-line errors with their exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.cli.plan
from partition.errors import PipepartError
from pipeline.cli.command import _one_line, _parser, main

SUBCOMMANDS = ("plan", "show", "simulate", "run", "export", "bench", "calibrate")

FAILING = {  # a sub-command's argv that fails, and what its one-line error says
    "plan": (["plan", "json:loads"], "the model factory json:loads raised TypeError"),
    "show": (["show", "missing.json"], "no plan file at missing.json"),
    "simulate": (["simulate", "missing.json"], "no plan file at missing.json"),
    "run": (["run", "json:loads", "--ranks", "2"], "the model factory json:loads raised"),
    "export": (["export", "ckpt", "model.bin"], "model.bin is not a .safetensors file"),
    "bench": (["bench", "no-such-benchmark"], "no benchmark 'no-such-benchmark'"),
    "calibrate": (["calibrate", "--threads", "0"], "--threads must be at least 1, got 0"),
}


def test_every_subcommand_has_a_failing_example() -> None:
    assert set(FAILING) == set(SUBCOMMANDS) == set(_subparsers())


def _subparsers() -> dict[str, object]:
    actions = [a for a in _parser()._actions if a.dest == "command"]
    return dict(actions[0].choices)  # type: ignore[call-overload]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_debug_before_or_after_the_subcommand_prints_the_traceback(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: str,
) -> None:
    """The bug of issue 17: ``--debug`` was on the top parser and again on each sub-parser,
    whose default (False) overwrote it, so ``pipepart --debug plan gpt`` showed no traceback;
    ``export`` had no ``--debug`` of its own, so ``pipepart export a b --debug`` was a usage
    error."""
    monkeypatch.chdir(tmp_path)  # missing.json, ckpt: nothing there
    argv, message = FAILING[command]
    for given in (["--debug", *argv], [*argv, "--debug"]):
        assert main(given) == 2, given
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err, (given, err)
        assert err.rstrip().splitlines()[-1].startswith(f"pipepart {command}: error: "), err
        assert message in err.rstrip().splitlines()[-1], err
        assert "--debug shows its traceback" not in err  # it just did
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and message in err, err


def test_debug_is_in_every_subcommands_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "--debug" in out and "--json" in out, (command, out)


def test_debug_defaults_to_off_and_is_read_from_either_side() -> None:
    parser = _parser()
    assert parser.parse_args(["show", "p.json"]).debug is False
    assert parser.parse_args(["--debug", "show", "p.json"]).debug is True
    assert parser.parse_args(["show", "p.json", "--debug"]).debug is True
    assert parser.parse_args(["--debug", "show", "p.json", "--debug"]).debug is True


def test_a_factory_error_hints_at_debug(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "json:loads"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("; --debug shows its traceback")
    assert main(["show", "missing.json"]) == 2  # not a factory's: no hint
    assert "--debug" not in capsys.readouterr().err


def test_no_subcommand_or_an_unknown_flag_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in ([], ["--debug"], ["plan", "gpt", "--no-such-flag"], ["teleport"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        assert "usage: pipepart" in capsys.readouterr().err


def _raising(error: BaseException) -> object:
    def command(args: object) -> int:
        raise error

    return command


def test_an_os_error_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline.cli.plan, "_cmd_show", _raising(PermissionError("plan.json")))
    assert main(["show", "plan.json"]) == 2
    assert capsys.readouterr().err == "pipepart show: error: plan.json\n"


def test_an_interrupt_is_exit_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline.cli.plan, "_cmd_show", _raising(KeyboardInterrupt()))
    assert main(["show", "plan.json"]) == 130
    assert capsys.readouterr().err == "pipepart show: interrupted\n"


def test_a_bug_is_not_hidden_behind_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only pipepart's own errors (and OSError) become one line; anything else is a bug in
    pipepart and keeps its traceback."""
    monkeypatch.setattr(pipeline.cli.plan, "_cmd_show", _raising(ZeroDivisionError("oops")))
    with pytest.raises(ZeroDivisionError, match="oops"):
        main(["show", "plan.json"])


def test_the_exit_code_is_the_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.cli.plan, "_cmd_show", lambda args: 1)  # e.g. a failed --check
    assert main(["show", "plan.json"]) == 1


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("", "failed"),
        ("  \n\n ", "failed"),
        ("no plan file at p.json", "no plan file at p.json"),
        ("\n  the first line.  \nThe second.\n", "the first line. The second."),
        (  # a multi-rank report: the rank that failed, not the ones the launcher killed after
            "2 ranks failed\nrank 1: killed by the launcher after rank 0 failed\n"
            "rank 0: [stage 0 · step 1 · 0F1] RuntimeError: boom\n",
            "rank 0: [stage 0 · step 1 · 0F1] RuntimeError: boom",
        ),
        ("rank 1: killed by the launcher\n", "rank 1: killed by the launcher"),
    ],
)
def test_one_line_of_an_error(message: str, line: str) -> None:
    assert _one_line(message) == line


def test_a_multi_line_error_keeps_its_ways_out(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: a model neither route traces says what each hit on its own line, then the ways
    out; the one-line printer kept only the first line, dropping what to do."""
    error = PipepartError("cannot trace M by either route.\nfx: a.\nexport: b.\nWays out: c.")
    monkeypatch.setattr(pipeline.cli.plan, "_cmd_show", _raising(error))
    assert main(["show", "plan.json"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "pipepart show: error: cannot trace M by either route. fx: a. export: b. Ways out: c.\n"
    )


def test_a_multi_line_error_prints_the_failed_ranks_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    error = PipepartError("ranks failed\nrank 1: killed by the launcher\nrank 0: PlanError: bad")
    monkeypatch.setattr(pipeline.cli.plan, "_cmd_show", _raising(error))
    assert main(["show", "plan.json"]) == 2
    assert capsys.readouterr().err == "pipepart show: error: rank 0: PlanError: bad\n"


@pytest.mark.parametrize("module", ["pipeline.cli", "pipeline.cli.command"])
def test_python_dash_m_runs_the_command(module: str, tmp_path: Path) -> None:
    """``python -m pipeline.cli`` (and ``torchrun ... -m pipeline.cli``) is the command; so is
    ``-m pipeline.cli.command``. The exit code is main's, the traceback printed with --debug."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", module, "--debug", "show", "missing.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("make one with `pipepart plan MODEL --out missing.json`")
