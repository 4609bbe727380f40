"""`pipeline.cli.bench`: ``pipepart bench`` finds a checkout's benchmarks/ folder, lists it, and
runs one (its table on stderr and its JSON on stdout with ``--json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import pipeline.cli.bench
from pipeline.cli.command import main

ROOT = Path(__file__).resolve().parents[3]

OK = '''"""Does it work? A benchmark that writes its JSON and prints a table."""
import argparse, json
from pathlib import Path


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    Path(args.out).write_text(json.dumps({"quick": args.quick, "rows": [1, 2]}))
    print("| table |")
    return 0
'''

FAILS = '''"""Does it fail? A benchmark that returns 3."""


def main(argv):
    print("| failing table |")
    return 3
'''


def _forget_benchmarks() -> dict[str, object]:
    return {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "benchmarks"}


@pytest.fixture
def fake_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A checkout whose benchmarks/ holds ``ok`` and ``fails`` (and a private ``_shared``)."""
    folder = tmp_path / "checkout" / "benchmarks"
    folder.mkdir(parents=True)
    (folder.parent / "pyproject.toml").write_text("")
    (folder / "__init__.py").write_text("")
    (folder / "ok.py").write_text(OK)
    (folder / "fails.py").write_text(FAILS)
    (folder / "_shared.py").write_text("")
    monkeypatch.setattr(pipeline.cli.bench, "_BENCHMARKS", folder)
    monkeypatch.chdir(tmp_path)
    saved = _forget_benchmarks()
    try:
        yield folder
    finally:
        _forget_benchmarks()
        sys.modules.update(saved)  # type: ignore[arg-type]


def test_the_benchmarks_are_the_checkouts() -> None:
    """A past bug: moving the CLI into `pipeline.cli` put bench.py one folder deeper, and
    ``pipepart bench`` looked for pipeline/benchmarks/, saying a checkout was not one."""
    assert pipeline.cli.bench._BENCHMARKS == ROOT / "benchmarks"
    assert (ROOT / "pyproject.toml").is_file()


def test_list_names_each_benchmark_and_its_question(
    capsys: pytest.CaptureFixture[str], fake_checkout: Path
) -> None:
    assert main(["bench", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["fails", "ok"]  # sorted, no _private
    assert lines[1].endswith("Does it work? A benchmark that writes its JSON and prints a table.")


def test_a_run_writes_its_json_where_asked(
    capsys: pytest.CaptureFixture[str], fake_checkout: Path, tmp_path: Path
) -> None:
    assert main(["bench", "ok", "--out", "results/here"]) == 0
    assert capsys.readouterr().out == "| table |\n"
    written = tmp_path / "results" / "here" / "ok.json"
    assert json.loads(written.read_text()) == {"quick": False, "rows": [1, 2]}


def test_json_goes_to_stdout_and_the_table_to_stderr(
    capsys: pytest.CaptureFixture[str], fake_checkout: Path, tmp_path: Path
) -> None:
    assert main(["bench", "ok", "--quick", "--json"]) == 0  # --out: the current directory
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"quick": True, "rows": [1, 2]}
    assert captured.out.count("\n") == 1 and captured.err == "| table |\n"
    assert (tmp_path / "ok.json").is_file()


def test_a_failing_benchmark_gives_its_exit_code_and_no_json(
    capsys: pytest.CaptureFixture[str], fake_checkout: Path
) -> None:
    assert main(["bench", "fails", "--json"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "| failing table |\n"


def test_a_dashed_name_is_the_module(
    capsys: pytest.CaptureFixture[str], fake_checkout: Path
) -> None:
    (fake_checkout / "two_words.py").write_text(OK)
    assert main(["bench", "two-words"]) == 0
    assert (Path.cwd() / "two_words.json").is_file()


def test_an_unknown_benchmark_names_the_choices(
    capsys: pytest.CaptureFixture[str], fake_checkout: Path
) -> None:
    assert main(["bench", "nope"]) == 2
    assert capsys.readouterr().err == (
        "pipepart bench: error: no benchmark 'nope'; choose one of fails, ok "
        "(or `pipepart bench list`)\n"
    )


def test_another_package_named_benchmarks_is_not_taken(
    capsys: pytest.CaptureFixture[str],
    fake_checkout: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    other = tmp_path / "mine" / "benchmarks"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(other.parent))
    import benchmarks  # the user's own

    assert Path(benchmarks.__path__[0]) == other
    assert main(["bench", "list"]) == 2
    err = capsys.readouterr().err
    assert "another package named benchmarks is imported" in err and str(other) in err


def test_bench_outside_a_checkout_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline.cli.bench, "_BENCHMARKS", tmp_path / "benchmarks")
    assert main(["bench", "list"]) == 2
    err = capsys.readouterr().err
    assert "no benchmarks/ folder" in err and "source checkout" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_bench_lists_and_writes_where_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkout's own benchmarks: listed, and one run in its quick mode."""
    assert main(["bench", "list"]) == 0
    listed = capsys.readouterr().out
    assert "trace_cost" in listed and "partitioners" in listed
    monkeypatch.chdir(tmp_path)  # the default --out: the current directory, not benchmarks/
    assert main(["bench", "trace_cost", "--quick", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one line"
    data = json.loads(out)
    assert data["rows"][0]["blocks"] == 12
    assert json.loads((tmp_path / "trace_cost.json").read_text()) == data
    assert main(["bench", "nope"]) == 2


def test_bench_gpu_is_the_gpu_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pipepart bench gpu`` runs `benchmarks.gpu_check`: without CUDA its quick mode times the
    stages on the CPU; the JSON names the device it measured."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "gpu", "--quick", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (tmp_path / "gpu_check.json").is_file()
    if not torch.cuda.is_available():
        assert data["device"].startswith("cpu")
    assert {row["model"].split()[0] for row in data["rows"]} == {"hf:gpt2", "hf:llama"}
