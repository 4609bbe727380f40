"""Replicas of a pipeline on a 2-D device mesh: which ranks form each replica's pipeline, which
hold the same stages across replicas, and the process groups of both, all from the mesh.

[Note: the (dp, pp) mesh]
A job of ``dp`` replicas of a ``pp``-rank pipeline is a ``torch.distributed.device_mesh``
``DeviceMesh`` of shape ``(dp, pp)`` with dimensions named ``"dp"`` and ``"pp"``: stage-rank ``s``
of replica ``r`` is ``mesh[r, s]`` (global rank ``r * pp + s`` when pipepart builds the mesh from
``PipelineOptions(dp=...)``). Every group comes from the mesh: the pipeline's own (its
point-to-point traffic, the tied weights' sums, the global norm) is ``mesh["pp"]``'s group of
this rank, so activations never cross replicas; the gradient reduction runs over ``mesh["dp"]``'s
(the ranks holding the same stages in every replica); the non-finite verdict is reached over
the whole mesh, so that every replica steps or none does.

[Note: subgroups of replicas]
``torch.distributed.new_group`` is a collective of the whole world: every rank must call it, in
the same order, with the same ranks, or two groups get the same name (and rendezvous keys) on
different ranks. A pipeline creates subgroups of its own group (the ranks sharing a tied weight,
a communicator per link under NCCL), and every replica asks for the same subgroup of *its*
pipeline at the same moment. So for a group registered here (`register_replicas`, done when a
`Pipeline` is built on a mesh) `new_subgroup` creates that subgroup for every replica, in
replica order, on every rank, and returns this rank's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from partition.errors import PlanError

__all__ = [
    "MESH_DIMS",
    "Replicas",
    "new_subgroup",
    "pipeline_mesh",
    "register_replicas",
    "replicas",
]

MESH_DIMS = ("dp", "pp")
"""The mesh's dimensions, in order: replicas, then a replica's pipeline ranks."""

_REPLICAS: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {}
"""A replica's pipeline group (its global ranks) -> every replica's pipeline group, in replica
order; see [Note: subgroups of replicas]."""


@dataclass(frozen=True)
class Replicas:
    """This rank's place on the mesh and the groups it uses; see [Note: the (dp, pp) mesh]."""

    mesh: DeviceMesh | None
    """The (dp, pp) mesh; None for a single pipeline (``dp == 1`` and no mesh given)."""
    pp_group: dist.ProcessGroup | None
    """This replica's pipeline (None: the world)."""
    dp_group: dist.ProcessGroup | None
    """The ranks holding this rank's stages in every replica (None when ``dp == 1``)."""
    whole: dist.ProcessGroup | None
    """Every rank of the mesh (None: the world)."""
    dp: int
    """How many replicas."""
    replica: int
    """This rank's replica, ``0 .. dp - 1``."""


def pipeline_mesh(dp: int, pp: int, device_type: str = "cpu") -> DeviceMesh:
    """The ``(dp, pp)`` mesh over the world, dimensions named `MESH_DIMS` (a collective).

    Raises:
        PlanError: the world is not ``dp * pp`` ranks.
    """
    world = dist.get_world_size()
    if dp < 1 or pp < 1 or dp * pp != world:
        raise PlanError(
            f"a mesh of dp={dp} replicas x pp={pp} pipeline ranks needs {dp * pp} ranks, and "
            f"{world} are running; launch dp * pp ranks, or choose dp dividing {world}"
        )
    return init_device_mesh(device_type, (dp, pp), mesh_dim_names=MESH_DIMS)


def replicas(mesh: DeviceMesh | None, group: dist.ProcessGroup | None, dp: int | None) -> Replicas:
    """This rank's replicas: of ``mesh`` when given, else of a ``(dp, world / dp)`` mesh built
    over the world when ``dp > 1``, else one pipeline over ``group``; a collective when it
    builds a mesh. See [Note: the (dp, pp) mesh].

    Raises:
        PlanError: torch.distributed is not initialised; both a mesh and a group, a mesh without the `MESH_DIMS` dimensions, a ``dp``
            that is not the mesh's, or replicas asked of a group other than the world.
    """
    if not dist.is_initialized():
        raise PlanError(
            "torch.distributed is not initialised: call init_process_group first, "
            "or use pipeline.launch.run"
        )
    if mesh is not None and group is not None:
        raise PlanError(
            "give a mesh or a group, not both: with mesh=, the pipeline's group is the mesh's "
            '"pp" group of this rank'
        )
    if mesh is None and (dp or 1) == 1:
        return Replicas(None, group, None, group, 1, 0)
    if mesh is None:
        assert dp is not None
        if group is not None:
            raise PlanError(
                f"dp={dp} replicas are laid out over the whole world; pass mesh= (a (dp, pp) "
                "DeviceMesh) instead of group= to run them on part of it"
            )
        world = dist.get_world_size()
        if world % dp:
            raise PlanError(
                f"{world} ranks do not split into dp={dp} replicas of equal pipelines; launch a "
                f"multiple of {dp} ranks, or choose dp among {_divisors(world)}"
            )
        mesh = pipeline_mesh(dp, world // dp, _device_type())
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise PlanError(
            f"the mesh's dimensions are {mesh.mesh_dim_names}, pipepart needs {MESH_DIMS} "
            "(replicas first): init_device_mesh(device, (dp, pp), mesh_dim_names=('dp', 'pp'))"
        )
    size = mesh.size(0)
    if dp not in (None, size):
        raise PlanError(f"the mesh has {size} replicas (its 'dp' size), the options ask dp={dp}")
    table = tuple(tuple(int(r) for r in row) for row in mesh.mesh.tolist())
    if any(list(row) != sorted(row) for row in table):
        raise PlanError(
            f"the mesh's replicas are {[list(row) for row in table]}: list each replica's ranks "
            "in increasing order, so that a replica's stage-rank s is its s-th rank everywhere"
        )
    register_replicas(table)
    whole = None if mesh.size() == dist.get_world_size() else _whole_group(table)
    coordinate = mesh.get_coordinate()
    assert coordinate is not None, "this rank is not on the mesh"
    return Replicas(
        mesh, mesh.get_group("pp"), mesh.get_group("dp"), whole, size, int(coordinate[0])
    )


def register_replicas(table: Sequence[Sequence[int]]) -> None:
    """Record every replica's pipeline ranks (``table[r]``: replica r's, in stage-rank order);
    see [Note: subgroups of replicas]."""
    rows = tuple(tuple(row) for row in table)
    for row in rows:
        _REPLICAS[row] = rows


def new_subgroup(group: dist.ProcessGroup | None, ranks: Sequence[int]) -> dist.ProcessGroup:
    """A new process group over ``ranks`` (ranks of ``group``, None: the world); a collective of
    the world, called by every rank in the same order. For a replica's pipeline group, the same
    subgroup of every replica is created and this rank's returned (see [Note: subgroups of
    replicas]); a rank in none of them gets torch's non-member placeholder."""
    if group is None:
        made = dist.new_group(list(ranks))
        assert made is not None
        return made
    own = tuple(dist.get_process_group_ranks(group))
    mine = None
    for row in _REPLICAS.get(own, (own,)):
        made = dist.new_group([row[r] for r in ranks])
        if row == own:
            mine = made
    assert mine is not None
    return mine


def _whole_group(table: tuple[tuple[int, ...], ...]) -> dist.ProcessGroup:
    group = dist.new_group(sorted(r for row in table for r in row))
    assert group is not None
    return group


def _device_type() -> str:
    """The mesh's device type: ``cuda`` under NCCL with a GPU, else ``cpu``."""
    nccl = dist.get_backend() == "nccl" and torch.cuda.is_available()
    return "cuda" if nccl else "cpu"


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
