"""The jitted policy update and the log-probabilities of generated sequences.

    sequence_logp(model_cfg, params, ids_BW, valid_BW) -> (logp_BT, entropy_BT)   T = W - 1
    make_update(...) -> update(state, batch) -> (state, metrics)    jitted by the loop, donating

`logp_BT[b, j]` is log p(ids[b, j+1] | ids[b, :j+1]) under the full forward pass (float32
logits), `entropy_BT` the entropy of that next-token distribution. The update takes the
gradient of `losses.policy_loss` (plus `rl.mtp_lambda` x the MTP cross-entropy on the
generated tokens, and the MoE load-balancing loss as in pretraining) and applies the trainer's
optimizer (train/optimizer.py) to the TrainState (train/state.py); a non-finite loss or
gradient leaves the state unchanged but for `step` and `skipped`.
With `rl.routing_replay` the batch carries the rollout's experts (`routing`, [B, L, W, k]) and
every policy forward replays them (train/rl/replay.py; metric routing_changed_frac).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import qwen35_jax
from train.integrity import all_finite
from train.rl import replay
from train.rl.losses import policy_loss
from train.state import TrainState


def _logp_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    return logp_BT, entropy_BT


def forward_logp(
    model_cfg,
    params,
    ids_BW,
    valid_BW,
    *,
    runtime=None,
    mtp: bool = False,
    routing=None,
    pixels_BPF=None,
    grids_BG3=None,
):
    """(logp_BT, entropy_BT, model output) of the module docstring. routing: replayed experts
    [B, L, W, k] (the output then holds the routers' own top-k). Image prompts take their
    patches in the per-row form (train/rl/prompts.py), as generate and the trainer's step."""
    out = qwen35_jax.apply(
        model_cfg,
        params,
        ids_BW,
        attention_mask=valid_BW,
        pixel_values=pixels_BPF,
        image_grid_thw=grids_BG3,
        return_mtp=mtp,
        runtime=runtime,
        routing=None if routing is None else replay.model_routing(routing),
        return_routing=routing is not None,
    )
    logp_BT, entropy_BT = _logp_entropy(out.logits[:, :-1], ids_BW[:, 1:])
    return logp_BT, entropy_BT, out


def sequence_logp(
    model_cfg, params, ids_BW, valid_BW, pixels_BPF=None, grids_BG3=None, *, runtime=None
) -> jax.Array:
    return forward_logp(
        model_cfg,
        params,
        ids_BW,
        valid_BW,
        runtime=runtime,
        pixels_BPF=pixels_BPF,
        grids_BG3=grids_BG3,
    )[0]


def make_update(
    model_cfg: qwen35_jax.Qwen35Config,
    tx: optax.GradientTransformation,
    schedule: Any,
    rl: dict,
    *,
    runtime: qwen35_jax.Runtime | None = None,
):
    """update(state, batch) -> (state, metrics); batch: ids, valid [B, W], mask, old_logp
    (and ref_logp when rl beta > 0) [B, W-1], adv [B] (and routing [B, L, W, k] when
    rl.routing_replay; pixels [B, P, F], grids [B, 1, 3] for image prompts)."""
    mtp = rl["mtp_lambda"] > 0
    aux_coef = (
        model_cfg.text_config.router_aux_loss_coef if model_cfg.text_config.num_experts else 0.0
    )

    def loss_fn(params, batch):
        routing = batch.get("routing")  # rl.routing_replay: the rollout's experts
        logp_BT, entropy_BT, out = forward_logp(
            model_cfg,
            params,
            batch["ids"],
            batch["valid"],
            runtime=runtime,
            mtp=mtp,
            routing=routing,
            pixels_BPF=batch.get("pixels"),
            grids_BG3=batch.get("grids"),
        )
        loss, m = policy_loss(
            logp_BT,
            batch["old_logp"],
            batch["adv"],
            batch["mask"],
            algo=rl["algo"],
            eps_low=rl["eps_low"],
            eps_high=rl["eps_high"],
            ref_logp_BT=batch.get("ref_logp"),
            beta=rl["beta"],
            loss_agg=rl["loss_agg"],
            max_len=rl["max_new_tokens"],
        )
        mask_BT = batch["mask"]
        tokens = jnp.maximum(jnp.sum(mask_BT), 1.0)
        extra = {"entropy": jnp.sum(entropy_BT * mask_BT) / tokens}
        if mtp:  # position j predicts token j+2; the target must be a generated token
            mtp_logp_BT, _ = _logp_entropy(out.mtp_logits[:, :-2], batch["ids"][:, 2:])
            mtp_mask_BT = mask_BT[:, 1:]
            mtp_loss = -jnp.sum(mtp_logp_BT * mtp_mask_BT) / jnp.maximum(jnp.sum(mtp_mask_BT), 1)
            loss = loss + rl["mtp_lambda"] * mtp_loss
            extra["mtp_loss"] = mtp_loss
        if routing is not None:
            extra["routing_changed_frac"] = replay.changed_fraction(
                out.routing.experts, replay.model_routing(routing).experts, batch["valid"]
            )
        if aux_coef:
            loss = loss + aux_coef * out.aux_loss
            extra["aux_loss"] = out.aux_loss
        return loss, (m, extra)

    def update(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (loss, (m, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & all_finite(grads)

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new = state.replace(
            step=state.step + 1,
            params=pick(params, state.params),
            opt_state=pick(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            **m._asdict(),
            **extra,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
            "finite": finite,
        }
        return new, metrics

    return update
