"""Meshes, the sharding table, and sharded training math on 8 simulated CPU devices.

The tiny MoE model's loss and gradients under five meshes equal the single-device ones (float32,
1e-5 relative); every parameter, gradient and AdamW moment is sharded as the table says.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qwen35_jax as q
from qwen35_jax import distributed, sharding

FAST = {"xla_backend_optimization_level": 0}  # compile time dominates; numerics are the same
MESHES = {
    "data=8": dict(data=8, fsdp=1),
    "fsdp=8": dict(fsdp=8),
    "fsdp=2,tensor=2,expert=2": dict(fsdp=2, tensor=2, expert=2),
    "data=2,expert=4": dict(data=2, fsdp=1, expert=4),
    "fsdp=4,sequence=2": dict(fsdp=4, sequence=2),
}
B, T = 8, 16


def tiny_moe() -> q.Qwen35Config:
    """tiny-moe cut to one GDN and one attention layer (both MoE)."""
    cfg = q.get_config("tiny-moe")
    text = dataclasses.replace(
        cfg.text_config, num_hidden_layers=2, full_attention_interval=2, mtp_num_hidden_layers=0
    )
    return cfg.replace(text_config=text)


RUNTIME = q.Runtime(gdn_chunk_size=8)  # two GDN chunks per row


def loss_fn(cfg, params, ids_BT, seg_BT):
    out = q.apply(cfg, params, ids_BT, segment_ids=seg_BT, runtime=RUNTIME)
    logp_BTV = jax.nn.log_softmax(out.logits[:, :-1])
    nll_BT = -jnp.take_along_axis(logp_BTV, ids_BT[:, 1:, None], axis=-1)[..., 0]
    mask_BT = ((seg_BT[:, 1:] == seg_BT[:, :-1]) & (seg_BT[:, 1:] != 0)).astype(jnp.float32)
    return jnp.sum(nll_BT * mask_BT) / jnp.sum(mask_BT) + 0.01 * out.aux_loss


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_moe()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.text_config.vocab_size, (B, T)), jnp.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, 9:] = 2  # two packed documents per row
    seg[1, 12:] = 0  # and some padding
    seg[5, 3:] = 0
    seg = jnp.asarray(seg)
    params = q.init_params(cfg, jax.random.key(0))
    step = jax.value_and_grad(lambda p, i, s: loss_fn(cfg, p, i, s))
    loss, grads = jax.jit(step, compiler_options=FAST)(params, ids, seg)
    return types.SimpleNamespace(
        cfg=cfg,
        ids=ids,
        seg=seg,
        params=params,
        abstract=q.abstract_params(cfg),
        step=step,
        loss=loss,
        grads=grads,
    )


def expected_spec(names, mesh) -> P:
    """flax's own reading of the table (`nn.logical_to_mesh_axes`), size-1 mesh axes dropped;
    the tiny model's shapes all divide, so nothing else differs."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    out = []
    for entry in nn.logical_to_mesh_axes(names, sharding.LOGICAL_RULES):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        axes = tuple(a for a in axes if sizes[a] > 1)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def check_shardings(abstract, shardings, mesh, expert_size):
    flat = jax.tree_util.tree_flatten_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    got = jax.tree.leaves(shardings)
    assert len(flat) == len(got)
    for (path, box), s in zip(flat, got, strict=True):
        name = jax.tree_util.keystr(path)
        want = NamedSharding(mesh, expected_spec(box.names, mesh))
        ndim = len(box.names)
        assert s.is_equivalent_to(want, ndim), f"{name}: {s.spec} != table {want.spec}"
        if expert_size > 1 and "experts" in box.names:
            assert not s.is_fully_replicated, f"{name} is replicated on expert={expert_size}"


SLOW_MESHES = ("data=8", "fsdp=8")  # plain data parallelism / FSDP: the cheap-to-skip ones


@pytest.mark.parametrize(
    "mesh_name",
    [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_MESHES else m for m in MESHES],
)
def test_sharded_loss_and_grads_equal_single_device(setup, mesh_name):
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    param_sh = sharding.logical_to_mesh_sharding(setup.abstract, mesh)
    check_shardings(setup.abstract, param_sh, mesh, mesh.shape["expert"])
    batch_sh = sharding.batch_sharding(mesh, B)
    params = jax.device_put(setup.params, param_sh)
    with sharding.use_mesh(mesh):
        lowered = jax.jit(
            setup.step,
            in_shardings=(param_sh, batch_sh, batch_sh),
            out_shardings=(NamedSharding(mesh, P()), param_sh),
        ).lower(params, setup.ids, setup.seg)
    if mesh.shape["expert"] > 1:  # the MoE layers really dispatch by all-to-all
        assert "all_to_all" in lowered.as_text()
    loss, grads = lowered.compile(FAST)(params, setup.ids, setup.seg)
    assert abs(float(loss - setup.loss)) <= 1e-5 * abs(float(setup.loss))
    flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, g), g0 in zip(flat_g, jax.tree.leaves(setup.grads), strict=True):
        err = float(jnp.linalg.norm(g - g0) / jnp.maximum(jnp.linalg.norm(g0), 1e-30))
        assert err < 1e-5, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(param_sh), strict=True):
        assert g.sharding.is_equivalent_to(s, g.ndim)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_sh), strict=True):
        assert p.sharding.is_equivalent_to(s, p.ndim)


def test_optimizer_state_follows_params(setup):
    mesh = sharding.make_mesh(**MESHES["fsdp=2,tensor=2,expert=2"])
    tx = optax.adamw(1e-3)
    abstract_opt = jax.eval_shape(tx.init, setup.abstract)
    opt_sh = sharding.logical_to_mesh_sharding(abstract_opt, mesh)
    param_sh = sharding.logical_to_mesh_sharding(setup.abstract, mesh)
    adam = opt_sh[0]
    for moment in (adam.mu, adam.nu):
        for a, b in zip(jax.tree.leaves(moment), jax.tree.leaves(param_sh), strict=True):
            assert a == b
    assert adam.count.spec == P()


def test_full_size_expert_weights_are_split():
    """397B-A17B on fsdp=64, expert=8 (abstract): routed experts over 512 devices."""
    mesh = jax.sharding.AbstractMesh((1, 64, 1, 8, 1), sharding.MESH_AXES)
    abstract = q.abstract_params(q.get_config("qwen3.5-397b-a17b"))
    specs = sharding.partition_specs(abstract, mesh)
    wg = specs["blocks"]["linear_layers"]["mlp"]["experts"]["gate_proj"]
    assert wg == P(None, None, "expert", "fsdp")
    # every other weight's D axis is split over fsdp x expert
    assert specs["embed_tokens"] == P(None, ("fsdp", "expert"))
    assert specs["blocks"]["full_layer"]["self_attn"]["q_proj"] == P(None, ("fsdp", "expert"))


# ------------------------------------------------------------------------- table resolution


def test_logical_spec_rules():
    sizes = {"data": 2, "fsdp": 4, "tensor": 4, "expert": 1, "sequence": 1}
    assert sharding.logical_spec(("batch", "length"), (8, 16), sizes) == P(("data", "fsdp"))
    # 2 kv heads do not divide over tensor=4: replicated, not an error
    assert sharding.logical_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), sizes) == P("fsdp")
    # batch 2: only `data` divides
    assert sharding.logical_spec(("batch",), (2,), sizes) == P("data")
    # a mesh axis is used once per array; rules apply in table order, with fallbacks
    assert sharding.logical_spec(("mlp", "heads"), (8, 8), sizes) == P(None, "tensor")
    ep = {"fsdp": 2, "expert": 4}
    assert sharding.logical_spec(("experts", "embed", "mlp"), (8, 64, 8), ep) == P("expert", "fsdp")
    assert sharding.logical_spec(("embed", "experts"), (64, 8), ep) == P("fsdp", "expert")
    assert sharding.logical_spec(("embed", "heads"), (64, 8), ep) == P(("fsdp", "expert"))
    assert sharding.logical_spec(("batch",), None, sizes) == P(("data", "fsdp"))
    with pytest.raises(KeyError, match="LOGICAL_RULES"):
        sharding.logical_spec(("nonsense",), (4,), sizes)


# ---------------------------------------------------------------------------------- meshes


def test_make_mesh_and_config():
    mesh = sharding.make_mesh(data=2, fsdp=-1, expert=2)
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == dict(data=2, fsdp=2, tensor=1, expert=2, sequence=1)
    cfg = {"data": 2, "fsdp": 2, "tensor": 1, "expert": 2, "sequence": 1}
    assert dict(sharding.mesh_from_config(cfg).shape) == dict(mesh.shape)
    obj = types.SimpleNamespace(data=1, fsdp=-1, tensor=2, expert=1, sequence=2)
    assert sharding.mesh_from_config(obj).shape["fsdp"] == 2
    assert sharding.mesh_from_config({}).shape["fsdp"] == 8
    assert sharding.parse_mesh("fsdp=64, expert=8,dcn_data=2") == {
        "fsdp": 64,
        "expert": 8,
        "dcn_data": 2,
    }
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="use 6 devices"):
        sharding.make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match="bad entry"):
        sharding.parse_mesh("model=4")


def test_dcn_grid_puts_slices_outermost():
    """Two processes (granules) x 4 devices: dcn_data=2 splits `data` across processes."""
    devices = [
        types.SimpleNamespace(id=i, process_index=i // 4, platform="cpu", device_kind="cpu")
        for i in range(8)
    ]
    grid = sharding.device_grid({"fsdp": -1}, {"data": 2}, devices)
    assert grid.shape == (2, 4, 1, 1, 1)
    assert [[d.process_index for d in row.reshape(-1)] for row in grid] == [[0] * 4, [1] * 4]
    grid = sharding.device_grid({"fsdp": 2, "expert": 2}, {"fsdp": 2}, devices)
    assert grid.shape == (1, 4, 1, 2, 1)
    assert [d.process_index for d in grid[0, :, 0, 0, 0]] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="dcn"):
        sharding.device_grid({"fsdp": -1}, {"data": 3}, devices)
    # one process per device (GPU style): granules are runs of 4 processes
    single = [dataclasses.replace(d, process_index=d.id) for d in map(_Dev.of, devices)]
    grid = sharding.device_grid({"expert": 4}, {"fsdp": 2}, single)
    assert grid.shape == (1, 2, 1, 4, 1)
    assert [d.id for d in grid.reshape(-1)] == list(range(8))
    # TPU slices: slice_index decides, whatever the processes
    sliced = [dataclasses.replace(d, slice_index=1 - d.id // 4) for d in map(_Dev.of, devices)]
    grid = sharding.device_grid({"fsdp": -1}, {"data": 2}, sliced)
    assert [d.slice_index for d in grid[:, 0, 0, 0, 0]] == [0, 1]


@dataclasses.dataclass(frozen=True)
class _Dev:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"
    slice_index: int | None = None

    @classmethod
    def of(cls, d):
        return cls(d.id, d.process_index)


def test_process_batch_slice_single_process():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert distributed.process_batch_slice(mesh, 8) == slice(0, 8)
    batch = distributed.make_global_batch({"ids": np.arange(16).reshape(8, 2)}, mesh, 8)
    assert batch["ids"].sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
    np.testing.assert_array_equal(np.asarray(batch["ids"]), np.arange(16).reshape(8, 2))
