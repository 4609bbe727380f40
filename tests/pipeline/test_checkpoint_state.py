"""A rank's state by the model's names (`pipeline.checkpoint.state`), on one process, no group:
its tensors and the aliases of a tied weight, the model's identity under any split, the
optimizer's state by parameter name (loaded into an optimizer that orders its parameters
otherwise), the checks of a checkpoint's index, and the RNG.

The "pipeline" is a stand-in (`_Pipe`) holding real modules as stages: these functions read
only its stages, its tied weights and its optimizer (see `Checkpointable`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from partition.errors import CheckpointError
from pipeline.checkpoint.state import (
    check_index,
    check_model,
    model_identity,
    optimizer_reads,
    optimizer_state,
    rank_tensors,
    restore_rng,
    rng_state,
)
from pipeline.runtime.tied import Shared


class TiedNet(nn.Module):
    """An embedding and a head sharing one weight, a BatchNorm, a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.fc = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def _holder(**children: nn.Module) -> nn.Module:
    """A stage's module: ``children`` under their names in the whole model."""
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


@dataclass(eq=False)
class _Pipe:
    """What the checkpoint reads of a pipeline (`Checkpointable`), nothing more."""

    stages: list[Any]
    my_stages: list[int]
    shared: list[Shared] = field(default_factory=list)
    rank: int = 0
    model_class: str = "TiedNet"
    plan: Any = None
    optimizer: Any = None

    @property
    def tied(self) -> Any:
        return SimpleNamespace(shared=self.shared)


def _stage(module: nn.Module) -> Any:
    return SimpleNamespace(module=module)


TIED = Shared(names=("embed.weight", "head.weight"), ranks=(0, 1), source_rank=1)


def _split(model: TiedNet, rank: int) -> _Pipe:
    """Rank ``rank`` of a 2-stage split (embed, fc | norm, head), the other stage on meta as it
    is on a real rank; the head's weight a copy on rank 1, tied to the embedding across ranks."""
    first, second = _holder(embed=model.embed, fc=model.fc), _holder(norm=model.norm)
    second.add_module("head", nn.Linear(4, 6, bias=False))
    second.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    stages = [first, second]
    stages[1 - rank] = copy.deepcopy(stages[1 - rank]).to("meta")
    return _Pipe([_stage(m) for m in stages], [rank], [TIED], rank=rank)


PERSISTENT = {
    "fc.weight",
    "fc.bias",
    "norm.weight",
    "norm.bias",
    "norm.running_mean",
    "norm.running_var",
    "norm.num_batches_tracked",
}


# --- tensors and aliases ------------------------------------------------------------------------


def test_a_tied_weight_on_one_rank_is_one_tensor_under_its_smallest_name() -> None:
    model = TiedNet()
    local = rank_tensors(_Pipe([_stage(model)], [0]))
    assert set(local) == PERSISTENT | {"embed.weight"}  # not head.weight, not the scratch buffer
    tensor, names = local["embed.weight"]
    assert tensor is model.embed.weight and names == ["embed.weight", "head.weight"]
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in PERSISTENT:
        tensor, names = local[name]
        assert tensor is own[name] and names == [name], name


def test_a_weight_tied_across_ranks_has_the_same_key_on_both() -> None:
    model = TiedNet()
    first, second = rank_tensors(_split(model, 0)), rank_tensors(_split(model, 1))
    assert set(first) == {"embed.weight", "fc.weight", "fc.bias"}
    assert set(second) == {"embed.weight"} | {n for n in PERSISTENT if n.startswith("norm.")}
    assert first["embed.weight"][0] is model.embed.weight
    held = second["embed.weight"][0]  # rank 1 holds it as head.weight only
    assert held is not model.embed.weight and torch.equal(held, model.embed.weight)
    assert first["embed.weight"][1] == second["embed.weight"][1] == ["embed.weight", "head.weight"]
    assert first["fc.bias"][1] == ["fc.bias"]


def test_without_the_tie_recorded_a_rank_keys_the_copy_by_its_own_name() -> None:
    pipe = _split(TiedNet(), 1)
    pipe.shared = []
    assert rank_tensors(pipe)["head.weight"][1] == ["head.weight"]


# --- the model's identity -----------------------------------------------------------------------


def test_the_identity_is_the_same_on_every_rank_and_under_every_split() -> None:
    model = TiedNet()
    whole = model_identity(_Pipe([_stage(model)], [0]))
    assert whole["class_name"] == "TiedNet" and whole["graph_hash"] is None
    assert whole["tensors"]["fc.weight"] == [[4, 4], "float32"]
    assert whole["tensors"]["norm.num_batches_tracked"] == [[], "int64"]
    assert set(whole["tensors"]) == PERSISTENT | {"embed.weight", "head.weight"}
    assert len(whole["model_hash"]) == 16
    for rank in (0, 1):  # the other stage on meta
        assert model_identity(_split(model, rank)) == whole


def test_the_identity_changes_with_a_dtype_or_a_shape_and_records_the_plan() -> None:
    base = model_identity(_Pipe([_stage(TiedNet())], [0]))
    doubled = model_identity(_Pipe([_stage(TiedNet().double())], [0]))
    assert doubled["tensors"]["fc.weight"] == [[4, 4], "float64"]
    wider = TiedNet()
    wider.fc = nn.Linear(4, 5)
    other = model_identity(_Pipe([_stage(wider)], [0]))
    assert len({base["model_hash"], doubled["model_hash"], other["model_hash"]}) == 3
    planned = _Pipe(
        [_stage(TiedNet())], [0], plan=SimpleNamespace(model=SimpleNamespace(graph_hash="g1"))
    )
    with_plan = model_identity(planned)
    assert with_plan["graph_hash"] == "g1" and with_plan["model_hash"] == base["model_hash"]


def test_check_model_refuses_another_model_and_another_shape_by_name(tmp_path: Path) -> None:
    mine = model_identity(_Pipe([_stage(TiedNet())], [0]))
    check_model(tmp_path, mine, copy.deepcopy(mine))  # the same: fine

    foreign = {**mine, "class_name": "OtherNet", "tensors": {"table.weight": [[6, 4], "float32"]}}
    with pytest.raises(CheckpointError, match="another model: OtherNet") as caught:
        check_model(tmp_path, foreign, mine)
    assert "this pipeline runs TiedNet" in str(caught.value)
    assert "'embed.weight'" in str(caught.value) and "'table.weight'" in str(caught.value)

    wider = copy.deepcopy(mine)
    wider["tensors"]["fc.bias"] = [[5], "float32"]
    with pytest.raises(CheckpointError, match=r"'fc.bias' is float32 of shape \(5,\) in the che"):
        check_model(tmp_path, wider, mine)
    doubled = copy.deepcopy(mine)
    doubled["tensors"]["fc.bias"] = [[4], "float64"]
    with pytest.raises(
        CheckpointError, match=r"float64 of shape \(4,\) in the checkpoint, but flo"
    ):
        check_model(tmp_path, doubled, mine)


# --- the optimizer, by parameter name -----------------------------------------------------------


def _trained(model: nn.Module, order: list[str], optimizer: type[torch.optim.Optimizer]) -> Any:
    """``optimizer`` over ``model``'s parameters in ``order`` (two groups: the first parameter,
    the rest), after two steps on a fixed gradient."""
    params = [model.get_parameter(n) for n in order]
    opt = optimizer([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.01}])
    for k in range(2):
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, 0.5 * (i + 1) + k)
        opt.step()
    return opt


NAMES = ["fc.weight", "fc.bias", "norm.weight"]


def _model() -> nn.Module:
    model = nn.Module()
    model.fc, model.norm = nn.Linear(3, 2), nn.BatchNorm1d(2)
    return model


def _key_of(model: nn.Module) -> dict[int, str]:
    return {id(model.get_parameter(n)): n for n in NAMES}


def test_optimizer_state_is_keyed_by_parameter_name() -> None:
    model = _model()
    opt = _trained(model, NAMES, torch.optim.Adam)
    tensors, saved = optimizer_state(opt, _key_of(model))
    assert set(tensors) == {
        f"optim/{n}/{s}" for n in NAMES for s in ("step", "exp_avg", "exp_avg_sq")
    }
    for name in NAMES:
        for state, value in opt.state[model.get_parameter(name)].items():
            assert torch.equal(tensors[f"optim/{name}/{state}"], value), (name, state)
    assert saved["class"] == "Adam"
    assert [g["params"] for g in saved["param_groups"]] == [
        ["fc.weight"],
        ["fc.bias", "norm.weight"],
    ]
    assert [g["lr"] for g in saved["param_groups"]] == [0.1, 0.01]
    assert saved["state"]["fc.bias"] == {
        "step": "tensor",
        "exp_avg": "tensor",
        "exp_avg_sq": "tensor",
    }
    assert optimizer_state(None, {}) == ({}, None)


def _index(tensors: dict[str, Tensor]) -> dict[str, Any]:
    """What DCP's index says of each tensor: its size and dtype."""
    return {
        k: SimpleNamespace(size=t.shape, properties=SimpleNamespace(dtype=t.dtype))
        for k, t in tensors.items()
    }


def _restore(
    saved: Any,
    tensors: dict[str, Tensor],
    fresh: torch.optim.Optimizer,
    key_of: dict[int, str],
) -> None:
    """Load what was saved into ``fresh`` the way a load does: the JSON part through a file's
    round trip, the tensors read into what `optimizer_reads` allocates."""
    parts = [{"optimizer": json.loads(json.dumps(saved))}]
    wanted, build = optimizer_reads(Path("ckpt"), fresh, parts, 0, key_of, _index(tensors))
    assert build is not None and set(wanted) == set(tensors)
    for k, t in wanted.items():
        t.copy_(tensors[k])
    fresh.load_state_dict(build(wanted))


def test_optimizer_state_loads_by_name_into_another_parameter_order() -> None:
    """Saved by an optimizer over (fc.weight | fc.bias, norm.weight), loaded into one over
    (fc.weight | norm.weight, fc.bias) of a copy of the model: the same shapes at swapped
    indices, so only loading by name gives each parameter its own state; one more step on
    both then gives bit-equal parameters."""
    model = _model()
    opt = _trained(model, NAMES, torch.optim.Adam)
    tensors, saved = optimizer_state(opt, _key_of(model))
    tensors = {k: v.clone() for k, v in tensors.items()}

    other = copy.deepcopy(model)
    fresh = torch.optim.Adam(
        [{"params": [other.fc.weight], "lr": 1.0}, {"params": [other.norm.weight, other.fc.bias]}]
    )
    _restore(saved, tensors, fresh, _key_of(other))
    for name in NAMES:
        mine, theirs = fresh.state[other.get_parameter(name)], opt.state[model.get_parameter(name)]
        assert set(mine) == set(theirs)
        for k in theirs:
            assert torch.equal(mine[k], theirs[k]), (name, k)
    # the groups' hyper-parameters are the saved ones; JSON's lists are tuples again
    assert [g["lr"] for g in fresh.param_groups] == [0.1, 0.01]
    assert fresh.param_groups[1]["betas"] == (0.9, 0.999)

    for net in (model, other):
        for name in NAMES:
            net.get_parameter(name).grad = torch.ones_like(net.get_parameter(name))
    opt.step()
    fresh.step()
    for name in NAMES:
        assert torch.equal(other.get_parameter(name), model.get_parameter(name)), name


class Counting(torch.optim.Optimizer):
    """Plain SGD that also keeps a step count (not a tensor) and the last gradient."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["count"] = state.get("count", 0) + 1
                state["last"] = p.grad.detach().clone()
                p.data.add_(p.grad, alpha=-group["lr"])


def test_non_tensor_state_travels_as_json_and_comes_back() -> None:
    model = _model()
    opt = _trained(model, NAMES, Counting)
    tensors, saved = optimizer_state(opt, _key_of(model))
    assert set(tensors) == {f"optim/{n}/last" for n in NAMES}
    assert saved["state"]["fc.bias"] == {"count": {"value": 2}, "last": "tensor"}
    other = copy.deepcopy(model)
    fresh = Counting(
        [{"params": [other.fc.weight]}, {"params": [other.fc.bias, other.norm.weight]}]
    )
    _restore(saved, tensors, fresh, _key_of(other))
    for name in NAMES:
        state = fresh.state[other.get_parameter(name)]
        assert state["count"] == 2 and isinstance(state["count"], int)
        assert torch.equal(state["last"], opt.state[model.get_parameter(name)]["last"])


def test_hyper_parameters_come_from_the_same_rank_else_the_first_with_an_optimizer() -> None:
    model = _model()
    opt = _trained(model, NAMES, torch.optim.SGD)
    _, saved = optimizer_state(opt, _key_of(model))
    halved = copy.deepcopy(saved)
    for g in halved["param_groups"]:
        g["lr"] /= 2
    cases = [  # (parts, this rank, the learning rates it gets)
        ([{"optimizer": saved}, {"optimizer": halved}], 1, [0.05, 0.005]),
        ([{"optimizer": saved}, {"optimizer": halved}], 0, [0.1, 0.01]),
        ([{"optimizer": saved}, {"optimizer": halved}], 3, [0.1, 0.01]),  # a rank beyond them
        ([{"optimizer": None}, {"optimizer": halved}], 0, [0.05, 0.005]),  # no optimizer there
    ]
    for parts, rank, lrs in cases:
        fresh = torch.optim.SGD(
            [{"params": [model.fc.weight]}, {"params": [model.fc.bias, model.norm.weight]}], lr=9.0
        )
        tensors, build = optimizer_reads(Path("ckpt"), fresh, parts, rank, _key_of(model), {})
        assert tensors == {} and build is not None  # plain SGD keeps no state
        fresh.load_state_dict(build({}))
        assert [g["lr"] for g in fresh.param_groups] == lrs, (rank, parts)


def test_an_optimizer_that_does_not_fit_is_refused() -> None:
    model = _model()
    opt = _trained(model, NAMES, torch.optim.Adam)
    tensors, saved = optimizer_state(opt, _key_of(model))
    parts, key_of = [{"optimizer": saved}], _key_of(model)
    sgd = torch.optim.SGD([{"params": [model.fc.weight]}, {"params": [model.fc.bias]}], lr=0.1)
    with pytest.raises(CheckpointError, match="a Adam optimizer, this pipeline's is SGD"):
        optimizer_reads(Path("ckpt"), sgd, parts, 0, key_of, _index(tensors))
    one_group = torch.optim.Adam(model.parameters())
    with pytest.raises(CheckpointError, match=r"saved with 2 parameter group\(s\), this one has 1"):
        optimizer_reads(Path("ckpt"), one_group, parts, 0, key_of, _index(tensors))
    fresh = torch.optim.Adam([{"params": [model.fc.weight]}, {"params": [model.fc.bias]}])
    del tensors["optim/fc.bias/exp_avg"]
    with pytest.raises(
        CheckpointError, match=r"lacks the optimizer tensor 'optim/fc\.bias/exp_avg'"
    ):
        optimizer_reads(Path("ckpt"), fresh, parts, 0, key_of, _index(tensors))
    # nothing to restore: no optimizer here, or none saved
    assert optimizer_reads(Path("ckpt"), None, parts, 0, key_of, {}) == ({}, None)
    assert optimizer_reads(Path("ckpt"), fresh, [{"optimizer": None}], 0, key_of, {}) == ({}, None)


# --- the index holds what the parts name --------------------------------------------------------


def _parts() -> tuple[dict[str, Any], list[Any], set[str]]:
    """A manifest and parts of 2 ranks, a tied weight across them, and every key they name."""
    manifest = {"model": {"tensors": {"embed.weight": 0, "head.weight": 0, "fc.bias": 0}}}
    alias = {"embed.weight": ["embed.weight", "head.weight"]}
    state = {"fc.bias": {"step": "tensor", "exp_avg": "tensor", "count": {"value": 3}}}
    parts = [
        {"aliases": alias, "optimizer": {"state": state}},
        {"aliases": alias, "optimizer": None},
    ]
    keys = {"model/embed.weight", "model/fc.bias", "optim/fc.bias/step", "optim/fc.bias/exp_avg"}
    return manifest, parts, keys | {"rng/0/cpu", "rng/1/cpu"}


def test_check_index_accepts_an_index_with_every_named_tensor(tmp_path: Path) -> None:
    manifest, parts, keys = _parts()
    check_index(tmp_path, manifest, parts, keys)  # head.weight is stored as embed.weight


@pytest.mark.parametrize("missing", ["model/fc.bias", "optim/fc.bias/exp_avg", "rng/1/cpu"])
def test_check_index_names_what_the_index_lacks(tmp_path: Path, missing: str) -> None:
    manifest, parts, keys = _parts()
    with pytest.raises(CheckpointError, match=f"lacks 1 tensor\\(s\\) .*'{missing}'"):
        check_index(tmp_path, manifest, parts, keys - {missing})


def test_check_index_counts_a_missing_tied_weight_once(tmp_path: Path) -> None:
    """It was: a tied weight's key was listed once per name, one missing tensor reported as 2."""
    manifest, parts, keys = _parts()
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) .*\['model/embed.weight'\]"):
        check_index(tmp_path, manifest, parts, keys - {"model/embed.weight"})


def test_check_index_refuses_a_malformed_part(tmp_path: Path) -> None:
    manifest, parts, keys = _parts()
    del parts[1]["aliases"]
    with pytest.raises(CheckpointError, match="a rank's part is malformed \\(KeyError"):
        check_index(tmp_path, manifest, parts, keys)


# --- the RNG ------------------------------------------------------------------------------------


def test_rng_state_is_per_rank_and_restoring_it_repeats_the_draws() -> None:
    state = rng_state(3)
    if not torch.cuda.is_initialized():
        assert set(state) == {"rng/3/cpu"}
    first = torch.rand(5)
    torch.rand(7)  # move on
    restore_rng(state, 3)
    assert torch.equal(torch.rand(5), first)
    with pytest.raises(KeyError):
        restore_rng(state, 0)  # another rank's state is not this one's
