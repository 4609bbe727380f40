"""The pipepart command end to end: tables, one JSON object with --json, clear one-line errors,
every flag by its effect. Each module of `pipeline.cli` has its own tests in tests/pipeline/cli/."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from partition.schedules.actions import build_schedule
from pipeline.cli.command import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:  # type: ignore[type-arg]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one line"
    return json.loads(out)  # type: ignore[no-any-return]


def test_plan_json_has_the_bottleneck(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(capsys, ["plan", "gpt", "--devices", "3", "--microbatches", "4", "--json"])
    assert data["bottleneck"] == max(s["time"] for s in data["stages"])
    assert data["bottleneck_stage"] in range(3) and len(data["stages"]) == 3
    assert data["algorithm"] == "optimal" and data["fits"] is True
    assert 0 < data["bubble"] < 1 and data["step_time"] > 0


def test_plan_table_and_out_then_show(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert main(["plan", "gpt", "--devices", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for word in ("stage", "GFLOPs", "memory / capacity", "predicted step", "bubble", "bottleneck"):
        assert word in table
    shown = _json(capsys, ["show", str(out), "--json"])
    assert shown["bottleneck"] == json.loads(out.read_text())["objective"]["bottleneck"]
    slower = _json(capsys, ["show", str(out), "--device-spec", "mem=1GiB,tflops=0.001", "--json"])
    assert slower["bottleneck"] > shown["bottleneck"]
    assert [s["nodes"] for s in slower["stages"]] == [s["nodes"] for s in shown["stages"]]


@pytest.mark.parametrize("algorithm", ["uniform", "params", "time"])
def test_baselines_are_never_better_than_optimal(
    capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    argv = [
        "plan",
        "gpt",
        "--devices",
        "3",
        "--json",
        "--device-spec",
        "mem=16GiB,tflops=1,bw=1GB/s",
    ]
    optimal = _json(capsys, argv)
    baseline = _json(capsys, [*argv, "--algorithm", algorithm])
    assert baseline["algorithm"] == algorithm
    assert optimal["bottleneck"] <= baseline["bottleneck"] * (1 + 1e-12)


def test_heterogeneous_devices(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(capsys, ["plan", "gpt", "--device-spec", "h100;a100-40;cpu", "--json"])
    assert [s["device"]["name"] for s in data["stages"]] == ["h100", "a100-40", "cpu"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["plan", "gpt", "--device-spec", "tpu9"], "unknown device preset"),
        (
            ["plan", "gpt", "--batch", "7", "--microbatches", "4"],
            "batch 7 is not divisible by 4 micro-batches",
        ),
        (["plan", "gpt", "--device-spec", "mem=64KiB,tflops=1", "--devices", "2"], "fit"),
        (["show", "missing.json"], "no plan file"),
        (  # a factory that raises: named, what it raised, and how to see its traceback
            ["plan", "json:loads"],
            "the model factory json:loads raised TypeError: loads() missing 1 required "
            "positional argument: 's' (building the model, its inputs and its loss); "
            "--debug shows its traceback",
        ),
    ],
)
def test_errors_are_one_line_and_non_zero(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_every_subcommand_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("plan", "show", "simulate", "run", "export", "bench"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"pipepart {command}" in out


def test_simulate_a_saved_plan_and_draw_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan = tmp_path / "p.json"
    assert (
        main(["plan", "gpt", "--devices", "4", "--microbatches", "8", "--out", str(plan), "--json"])
        == 0
    )
    capsys.readouterr()
    png = tmp_path / "gantt.png"
    same = _json(capsys, ["simulate", str(plan), "--png", str(png), "--json"])
    assert same["microbatches"] == 8 and same["schedule"] == "1f1b"
    saved = json.loads(plan.read_text())
    assert same["step_time"] == pytest.approx(saved["predicted"]["step_time"])
    # not only self-consistent (both come from the simulator): within what any 1F1B step takes,
    # from the plan's own per-micro-batch stage times — no faster than the slowest stage doing
    # all 8 micro-batches plus the others' first forward / last backward, no slower than serial
    work = [st["compute_time"] for st in saved["stages"]]
    comm = sum(st["comm_time"] for st in saved["stages"])
    assert 8 * max(work) <= same["step_time"] <= 8 * sum(work) + 16 * comm
    assert png.stat().st_size > 10_000
    gpipe = _json(capsys, ["simulate", str(plan), "--schedule", "gpipe", "--json"])
    assert gpipe["peak_activation_microbatches"] == [8, 8, 8, 8]
    assert same["peak_activation_microbatches"] == [4, 3, 2, 1]


def test_simulate_a_model_directly(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(
        capsys,
        [
            "simulate",
            "gpt",
            "--devices",
            "2",
            "--schedule",
            "interleaved",
            "--virtual",
            "2",
            "--json",
        ],
    )
    assert data["ranks"] == 2 and len(data["peak_activation_microbatches"]) == 4


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_json_reports_steps_and_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "run.png"
    argv = [
        "run",
        "gpt",
        "--ranks",
        "2",
        "--steps",
        "2",
        "--check",
        "--json",
        "--timeout",
        "60",
        "--png",
        str(png),
    ]
    data = _json(capsys, argv)
    assert [s["step"] for s in data["steps"]] == [0, 1]
    assert all(s["time"] > 0 and s["loss"] > 0 for s in data["steps"])
    assert data["stages"] == {"0": [0], "1": [1]}
    assert _computed(data) == _expected("1f1b", 2, 4)  # the defaults: 1F1B, 4 micro-batches
    assert (
        data["check"]["loss"] < 1e-5
        and data["check"]["grads"] < 1e-5
        and data["check"]["params"] < 1e-5
    )
    assert png.stat().st_size > 10_000


def test_run_bad_batch_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "gpt", "--ranks", "2", "--batch", "7", "--timeout", "60"]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch 7 is not divisible by 4 micro-batches" in err and "\n" not in err


def test_ranks_that_are_not_pp_times_dp_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19: ``--ranks`` must be ``--pp`` x ``--dp``; refused before any process starts,
    naming the numbers and the ranks to launch; and so is a global batch that does not split
    into ``--accumulate`` x ``--dp`` shards of the micro-batches."""
    assert main(["run", "gpt", "--ranks", "5", "--pp", "2", "--dp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ranks 5 is not --pp 2 pipeline ranks x --dp 2 replicas; launch --ranks 4" in err
    assert "\n" not in err
    flags = ["--ranks", "4", "--dp", "2", "--accumulate", "2", "--batch", "12"]
    assert main(["run", "gpt", *flags, "--microbatches", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a batch of 12 rows does not split into 4 shards (2 accumulation steps x 2 " in err
    assert "use --batch 8, 16" in err and "\n" not in err


# --- every flag through the command line, by its effect ------------------------------------------


def _computed(data: dict) -> list[str]:  # type: ignore[type-arg]
    """Each rank's computations (F, B, I, W) in the order it ran them, from a run's timeline."""
    ranks = sorted({r for r, *_ in data["timeline"]})
    return [
        " ".join(
            a
            for _, a, _, _ in sorted(
                (e for e in data["timeline"] if e[0] == rank), key=lambda e: e[2]
            )
            if a.lstrip("0123456789")[0] in "FBIW"
        )
        for rank in ranks
    ]


def _expected(schedule: str, ranks: int, microbatches: int, virtual: int = 1) -> list[str]:
    return build_schedule(schedule, ranks, microbatches, virtual).to_text().split("\n")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_takes_its_schedule_from_the_plan_file_or_the_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan = tmp_path / "p.json"
    argv = ["plan", "gpt", "--devices", "2", "--schedule", "gpipe", "--microbatches", "8"]
    assert main([*argv, "--out", str(plan)]) == 0
    capsys.readouterr()
    # the tables of a saved plan: show (per stage) and simulate (per rank)
    assert main(["show", str(plan)]) == 0
    shown = capsys.readouterr().out
    assert "GPT · gpipe · 8 micro-batches · optimal" in shown and "cpu:1" in shown
    assert main(["simulate", str(plan)]) == 0
    simulated = capsys.readouterr().out
    assert "gpipe · 8 micro-batches (simulated)" in simulated
    assert re.search(r"│\s+1\s+│.*│\s+8\s+│", simulated), simulated  # rank 1 holds all 8 (GPipe)

    base = ["run", "gpt", "--ranks", "2", "--steps", "1", "--timeout", "60", "--json"]
    from_plan = _json(capsys, [*base, "--plan", str(plan)])
    assert _computed(from_plan) == _expected("gpipe", 2, 8)  # the plan's schedule and count
    interleaved = _json(
        capsys, [*base, "--schedule", "interleaved", "--virtual", "2", "--microbatches", "2"]
    )
    assert interleaved["stages"] == {"0": [0, 2], "1": [1, 3]}  # 2 stages per rank
    assert _computed(interleaved) == _expected("interleaved", 2, 2, virtual=2)


def test_plan_flags_change_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "gpt", "--devices", "2", "--json"]
    base = _json(capsys, argv)
    assert base["model"]["trace_method"] == "fx"  # --trace auto: fx where it works
    assert base["memory_model"] == {"optimizer": "adam", "master_weights": False}

    exported = _json(capsys, [*argv, "--trace", "export"])
    assert exported["model"]["trace_method"] == "export"
    assert exported["model"]["num_nodes"] != base["model"]["num_nodes"]  # ATen, not modules

    blocks = _json(capsys, [*argv, "--leaf", "h.*"])  # every block one node
    assert blocks["model"]["num_nodes"] < base["model"]["num_nodes"]
    cuts = [blocks["stages"][0]["modules"]["last"], blocks["stages"][1]["modules"]["first"]]
    assert all(re.fullmatch(r"h\.\d+", m) for m in cuts), cuts  # the cut is between blocks

    master = _json(capsys, [*argv, "--master-weights"])
    assert master["memory_model"]["master_weights"] is True
    for b, m in zip(base["stages"], master["stages"], strict=True):  # fp32: + one fp32 copy
        assert m["memory"]["optimizer"] - b["memory"]["optimizer"] == b["param_bytes"]
        assert m["memory"]["total"] - b["memory"]["total"] == b["param_bytes"]

    measured = _json(capsys, [*argv, "--profile"])
    for stage in base["stages"]:  # priced: FLOPs over the cpu preset's 100 GFLOP/s
        assert stage["compute_time"] == pytest.approx(stage["flops"] / stage["device"]["flops"])
    # measured: this machine's seconds, which dwarf the FLOP price of a toy model
    assert sum(s["compute_time"] for s in measured["stages"]) > 2 * sum(
        s["compute_time"] for s in base["stages"]
    )


TINY = """
\"\"\"A user's model factory, for `pipepart ... mymodels.tiny:build` (tests/pipeline/test_cli.py).\"\"\"

import torch
from torch import nn


def build():
    x = torch.linspace(-1.0, 1.0, 8 * 6).reshape(8, 6)  # no random data: only weights vary
    y = torch.sin(torch.arange(8 * 3, dtype=torch.float32)).reshape(8, 3)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    return model, (x,), nn.functional.mse_loss, y
"""


def _reference(
    build: Any,
    *,
    seed: int = 0,
    optimizer: str = "sgd",
    lr: float = 1e-3,
    loss: str = "mean",
    clip: float | None = None,
    microbatches: int = 4,
) -> list[float]:
    """Two steps of the user's plain model: ``torch.manual_seed(seed); model = factory()``."""
    torch.manual_seed(seed)
    model, (x,), loss_fn, y = build()
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = kind(model.parameters(), lr=lr)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        parts = [
            loss_fn(model(xs), ys)
            for xs, ys in zip(x.chunk(microbatches), y.chunk(microbatches), strict=True)
        ]
        total = torch.stack(parts).sum() / (microbatches if loss == "mean" else 1)
        total.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(total.detach()))
    return losses


def _differs(a: list[float], b: list[float], at: int) -> bool:
    return abs(a[at] - b[at]) > 1e-3 * abs(b[at])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_flags_train_a_users_model_like_the_plain_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``package.module:callable`` from the current directory; --seed, --optimizer, --lr,
    --loss, --clip and --recompute each checked by the step-0 and step-1 losses they give."""
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "__init__.py").write_text("")
    (tmp_path / "mymodels" / "tiny.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    build = importlib.import_module("mymodels.tiny").build

    model = ["mymodels.tiny:build", "--ranks", "2", "--steps", "2", "--timeout", "60", "--check"]
    commands = [
        ["plan", "mymodels.tiny:build", "--devices", "2", "--json"],
        ["run", *model, "--json", "--seed", "3", "--optimizer", "adam", "--lr", "0.01"],
        ["run", *model, "--loss", "sum", "--clip", "0.05", "--lr", "0.1", "--recompute"],
    ]
    driver = (  # one interpreter, as a user's shell would run the commands one after another
        "import json, sys\n"
        "from pipeline.cli.command import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    print('EXIT', main(argv), flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(commands)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    outputs = done.stdout.split("EXIT ")
    assert done.returncode == 0 and len(outputs) == 4, done.stdout + done.stderr[-3000:]
    assert [o.split("\n", 1)[0] for o in outputs[1:]] == ["0", "0", "0"], done.stdout

    planned = json.loads(outputs[0])
    assert planned["model"]["class_name"] == "Sequential" and len(planned["stages"]) == 2

    adam = json.loads(outputs[1].split("\n", 1)[1])
    got = [s["loss"] for s in adam["steps"]]
    want = _reference(build, seed=3, optimizer="adam", lr=0.01)
    assert got == pytest.approx(want, rel=1e-5), (got, want)
    assert adam["check"]["passed"], adam["check"]
    assert _differs(want, _reference(build, seed=0, optimizer="adam", lr=0.01), at=0)  # --seed
    assert _differs(want, _reference(build, seed=3, optimizer="sgd", lr=0.01), at=1)  # --optimizer
    assert _differs(want, _reference(build, seed=3, optimizer="adam"), at=1)  # --lr

    table = outputs[2].split("\n", 1)[1]  # the run's table: one row per step, then the check
    rows = re.findall(r"│\s*(\d+)\s*│[^│]+│\s*(-?\d+\.\d+)\s*│", table)
    assert [int(step) for step, _ in rows] == [0, 1], table
    got = [float(loss) for _, loss in rows]
    want = _reference(build, loss="sum", clip=0.05, lr=0.1)
    assert got == pytest.approx(want, abs=2e-6), (got, want)  # the table shows 6 decimals
    assert "passed" in table and "FAILED" not in table, table
    assert _differs(want, _reference(build, loss="mean", clip=0.05, lr=0.1), at=0)  # --loss
    assert _differs(want, _reference(build, loss="sum", lr=0.1), at=1)  # --clip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_leaf_modules_reach_the_ranks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18, item 3: ``run`` dropped ``--leaf``, and a plan made with ``--leaf`` was refused
    by ``run --plan`` as made for another model (the ranks traced without the leaf modules).
    Now the plan records them and every rank traces with them; both runs train exactly."""
    common = ["gpt", "--size", "toy", "--microbatches", "2", "--trace", "fx", "--leaf", "h.0"]
    plan_file = tmp_path / "plan.json"
    assert main(["plan", *common, "--devices", "2", "--out", str(plan_file), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["model"]["leaf_modules"] == ["h.0"]
    assert main(["plan", *common[:-2], "--devices", "2", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert planned["model"]["num_nodes"] < whole["model"]["num_nodes"]  # h.0 is one node
    run = ["run", "gpt", "--size", "toy", "--ranks", "2", "--steps", "1", "--check", "--json"]
    assert main([*run, "--plan", str(plan_file)]) == 0
    assert json.loads(capsys.readouterr().out)["check"]["passed"]
    assert main([*run, "--microbatches", "2", "--trace", "fx", "--leaf", "h.0"]) == 0
    assert json.loads(capsys.readouterr().out)["check"]["passed"]
