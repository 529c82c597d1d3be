"""Routing replay at scale: the experts recorded for `rl.routing_replay` stay on the devices.

The recorded ids ([B, L, W, k] int32: gigabytes per step at scale) leave the record pass as
global arrays with the batch's sharding (rows over the batch mesh axes), the sharding the update
takes, so they never travel through the host nor are replicated on every device; their values
are those of an unsharded record. (`train.rl`'s loop records minibatch by minibatch this way;
tests/test_routing_replay.py runs it with ratio 1.)
"""

import jax
import numpy as np

import qwen35_jax as q
from qwen35_jax import sharding
from train.rl import replay
from train.state import batch_shardings


def test_recorded_experts_keep_the_batch_sharding():
    c = q.get_config("tiny-moe")
    text = c.text_config.__class__(
        **{**c.text_config.__dict__, "num_hidden_layers": 2, "full_attention_interval": 2}
    )
    config = c.replace(text_config=text.__class__(**{**text.__dict__, "mtp_num_hidden_layers": 0}))
    params = q.init_params(config, jax.random.key(0))
    rows, width = 8, 6
    ids = np.asarray(jax.random.randint(jax.random.key(1), (rows, width), 0, 64), np.int32)
    valid = np.ones_like(ids)
    want_logp, want_experts = jax.jit(lambda p, i, v: replay.record(config, p, i, v))(
        params, ids, valid
    )
    mesh = sharding.make_mesh(data=2, fsdp=2, expert=2)
    shape = replay.routing_shape(config, rows, width)
    bs = batch_shardings(mesh, {"ids": (rows, width), "routing": shape})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with sharding.use_mesh(mesh):
        record = replay.recorder(config, replicated, bs["routing"])
        put = [jax.device_put(x, bs["ids"]) for x in (ids, valid)]
        logp, experts = record(params, *put)
    assert isinstance(experts, jax.Array) and experts.shape == shape
    assert experts.sharding.is_equivalent_to(bs["routing"], len(shape))
    # each device holds its own rows only (the batch axes: data x fsdp x expert = 8 -> 1 row)
    assert {s.data.shape for s in experts.addressable_shards} == {(1, *shape[1:])}
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(want_experts))
    np.testing.assert_allclose(np.asarray(logp), np.asarray(want_logp), atol=1e-5)
