from stagewise.parallel.fsdp import mesh_shape


def test_mesh_is_flat_on_one_machine_and_hybrid_across_machines():
    assert mesh_shape(8, 8) == (8,)
    assert mesh_shape(16, 8) == (2, 8)  # shard within a machine, replicate across the two
    assert mesh_shape(2, 1) == (2, 1)
    assert mesh_shape(6, 4) == (6,)  # uneven machines: flat
