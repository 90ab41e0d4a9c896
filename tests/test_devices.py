"""The one default link model (no cluster given): meshes and stage-to-stage links."""

import pytest

from alpa_lite.cluster import get_cluster_preset
from alpa_lite.config import PipeshardParallel
from alpa_lite.devices import default_mesh, stage_link, stage_mesh_builder, submesh_spans


@pytest.mark.parametrize("platform, beta", [("cpu", 1 / 10e9), ("gpu", 1 / 100e9)])
def test_stage_link_uses_the_platforms_default_links(platform, beta):
    assert stage_link(None, 8, 8, platform) == (5e-6, beta)
    assert stage_link(None, 4, 8, platform) == (1e-5, 4 * beta)  # across hosts
    method = PipeshardParallel(num_micro_batches=2, mesh_alpha=(1.0, 2.0), mesh_beta=(3.0, 4.0))
    links = (method.mesh_alpha, method.mesh_beta)
    assert stage_link(None, 4, 8, platform, links) == (2.0, 4.0)


def test_stage_link_and_stage_meshes_agree_on_the_default_links():
    mesh = stage_mesh_builder(None, "gpu")((2, 4), (2, 4))
    assert submesh_spans((2, 4), (2, 4)) == (True, False)
    assert (mesh.alpha_s[0], mesh.beta_s_per_byte[0]) == stage_link(None, 4, 8, "gpu")
    assert (mesh.alpha_s[1], mesh.beta_s_per_byte[1]) == stage_link(None, 8, 8, "gpu")
    assert default_mesh((8,), (False,), "gpu").peak_flops_per_s == 4e14


def test_a_cluster_prices_stage_links_with_its_own_links():
    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(2)
    inter = cluster.inter_host
    assert stage_link(cluster, 4, 8) == (inter.alpha_s, inter.beta_s_per_byte)
