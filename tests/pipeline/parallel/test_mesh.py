"""The (dp, pp) mesh's errors before anything is built ([Note: the (dp, pp) mesh] in
`pipeline.parallel.mesh`), on one rank; the layout on 4 ranks is `test_data_parallel`'s."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from partition.errors import PlanError
from partition.models import examples
from pipeline.parallel.mesh import replicas
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

pytestmark = pytest.mark.usefixtures("one_rank")


def test_no_replicas_is_the_pipeline_group_alone() -> None:
    one = replicas(None, None, None)
    assert (one.mesh, one.pp_group, one.dp_group, one.dp, one.replica) == (None, None, None, 1, 0)


def test_replicas_that_do_not_divide_the_world_are_refused_with_the_divisors() -> None:
    with pytest.raises(PlanError, match=r"1 ranks do not split into dp=2 .* choose dp among 1"):
        Pipeline(examples.skipnet, options=PipelineOptions(microbatches=2, dp=2))


def test_a_mesh_and_a_group_together_are_refused() -> None:
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "pp"))
    with pytest.raises(PlanError, match="give a mesh or a group, not both"):
        replicas(mesh, dist.group.WORLD, None)


def test_a_mesh_needs_dp_and_pp_dimensions_and_its_own_dp() -> None:
    other = init_device_mesh("cpu", (1, 1), mesh_dim_names=("pp", "dp"))
    with pytest.raises(PlanError, match=r"pipepart needs \('dp', 'pp'\)"):
        replicas(other, None, None)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "pp"))
    with pytest.raises(PlanError, match=r"the mesh has 1 replicas .* the options ask dp=2"):
        replicas(mesh, None, 2)
    assert replicas(mesh, None, 1).dp == 1


def test_dp_must_be_positive() -> None:
    with pytest.raises(PlanError, match="dp must be at least 1"):
        PipelineOptions(dp=0)
