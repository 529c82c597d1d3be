"""A few sharded SGD steps of a tiny MoE model across processes: proves the multi-host path.

    launch/local.sh 2 4 ...   with LAUNCH_MODULE=launch.dist_check:
    LAUNCH_MODULE=launch.dist_check launch/local.sh 2 4 --mesh data=2,expert=4 --workdir /tmp/d

Every process joins with `distributed.initialize_distributed`, builds the global mesh from
--mesh, generates only its own rows of each global batch (`process_batch_slice`), assembles the
global batch (`make_global_batch`) and runs jitted value-and-grad steps with the table's
shardings (the MoE layers dispatch by all-to-all when expert > 1). Process 0 appends
{"step", "loss"} lines to <workdir>/metrics.jsonl. The same flags with one process of all the
devices must give the same losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qwen35_jax as q
from qwen35_jax import distributed, sharding


def tiny_config() -> q.Qwen35Config:
    cfg = q.get_config("tiny-moe")
    text = dataclasses.replace(
        cfg.text_config, num_hidden_layers=2, full_attention_interval=2, mtp_num_hidden_layers=0
    )
    return cfg.replace(text_config=text)


RUNTIME = q.Runtime(gdn_chunk_size=8)


def batch_rows(step: int, rows: slice, seq_len: int, vocab: int) -> np.ndarray:
    """Rows `rows` of global batch `step` (every row from its own seed: any split agrees)."""
    out = [
        np.random.default_rng([step, r]).integers(0, vocab, seq_len, dtype=np.int32)
        for r in range(rows.start, rows.stop)
    ]
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mesh", default="fsdp=-1")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()

    joined = distributed.initialize_distributed()
    cfg = tiny_config()
    mesh = sharding.mesh_from_config(sharding.parse_mesh(args.mesh))
    param_sh = sharding.logical_to_mesh_sharding(q.abstract_params(cfg, runtime=RUNTIME), mesh)
    batch_sh = sharding.batch_sharding(mesh, args.batch)
    rows = distributed.process_batch_slice(mesh, args.batch)

    def loss_fn(params, ids_BT):
        logits = q.apply(cfg, params, ids_BT, runtime=RUNTIME).logits
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, ids_BT[:, 1:, None], axis=-1)
        return jnp.mean(nll)

    def step(params, ids_BT):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids_BT)
        return jax.tree.map(lambda p, g: p - args.lr * g, params, grads), loss

    with sharding.use_mesh(mesh):
        init = jax.jit(lambda k: q.init_params(cfg, k, runtime=RUNTIME), out_shardings=param_sh)
        params = init(jax.random.key(0))
        train_step = jax.jit(
            step,
            in_shardings=(param_sh, batch_sh),
            out_shardings=(param_sh, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        losses = []
        for i in range(args.steps):
            local = batch_rows(i, rows, args.seq_len, cfg.text_config.vocab_size)
            ids = distributed.make_global_batch(local, mesh, args.batch)
            params, loss = train_step(params, ids)
            losses.append(float(loss))
    info = dict(
        process=jax.process_index(), processes=jax.process_count(), rows=[rows.start, rows.stop]
    )
    print(json.dumps({**info, "distributed": joined, "mesh": dict(mesh.shape), "losses": losses}))
    if jax.process_index() == 0:
        os.makedirs(args.workdir, exist_ok=True)
        with open(os.path.join(args.workdir, "metrics.jsonl"), "a") as f:
            for i, loss in enumerate(losses):
                f.write(json.dumps({"step": i + 1, "loss": loss}) + "\n")
    if joined:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
