"""The jitted train step: `train_step(state, batch) -> (state, metrics)`, state donated.

Batch: int32 [B, T] arrays `tokens`, `segment_ids` (0 = padding), `positions` (per document).
Multimodal batch (data/multimodal.py): `tokens`, `segment_ids`, `loss_mask` [B, T] (0: never a
target), `pixel_values` float32 [B, P_row, F], `image_grid_thw` int32 [B, G_row, 3], no
`positions` (the model computes the 3-D rope index per document). The model runs the vision tower
over all B * P_row patches at once (attention within each image) and scatters its outputs into the
placeholders: one jitted step with static shapes, no loop over images.
With `grad_accum = A`, the batch is split into A micro-batches of B/A rows scanned in sequence;
the gradients of

    objective = sum_micro [ (CE_sum + z * Z_sum) / N1 + mtp_lambda * MTP_sum / N2
                            + router_aux_loss_coef * aux / A ]

(N1, N2: main and MTP target counts of the whole batch) add up to the gradient of the
whole-batch CE, z- and MTP losses, so for them accumulation changes memory, not the update. The
MoE aux loss is a product of batch means (fraction routed x mean router probability), so it is
averaged over the micro-batches' aux losses instead, as per-micro-batch trainers do.

Non-finite guard: when the objective or the gradient norm is NaN/Inf, or the update itself
would put NaN/Inf into the new parameters or optimizer moments (a too-large learning rate can do
that from finite gradients), the new params and optimizer state are discarded (the state is
unchanged but for `step` and `skipped`; metric `update_finite` tells the two causes apart). With
`nan_policy="stop"` the loop also stops; either way no non-finite value reaches the state, so
no checkpoint ever holds one (train/divergence.py stops a run that keeps skipping).

Metrics (scalars unless noted): loss (main next-token CE), mtp_loss, z_loss (coefficient x mean
logsumexp^2), lse_sq (mean logsumexp^2), aux_loss (unscaled), objective, grad_norm (before
clipping), lr, finite, update_finite, skipped, tokens (targets counted),
expert_load [L, E] (MoE only; fraction of top-k assignments per expert per layer),
dropped_tokens (MoE only; routed rows dropped by `runtime.moe_capacity_factor`, main + MTP),
mtp_aux_loss and mtp_expert_load [mtp layers, E] (MoE MTP head, when trained; reported, not
part of the objective).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import qwen35_jax
from train import losses
from train.integrity import all_finite
from train.state import TrainState

Batch = dict[str, jax.Array]


def micro_losses(
    model_cfg: qwen35_jax.Qwen35Config,
    params: Any,
    batch: Batch,
    *,
    mtp_lambda: float,
    z_loss: float,
    n_main: jax.Array,
    n_mtp: jax.Array,
    num_micro: int,
    loss_chunk: int = 0,
    runtime: qwen35_jax.Runtime | None = None,
    loss_row_groups: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(objective share of one micro-batch, its metric sums). `loss_chunk` > 0: the heads'
    cross-entropies are computed over chunks of that many positions per row, the rows in
    `loss_row_groups` groups, without the full [B, T, V] logits
    (`losses.chunked_cross_entropy_sums`)."""
    tokens_BT, seg_BT = batch["tokens"], batch["segment_ids"]
    mask_BT = batch.get("loss_mask")
    with_mtp = model_cfg.text_config.mtp_num_hidden_layers > 0 and mtp_lambda > 0
    out = qwen35_jax.apply(
        model_cfg,
        params,
        tokens_BT,
        segment_ids=seg_BT,
        positions=batch.get("positions"),
        return_logits=not loss_chunk,
        return_mtp=with_mtp,
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        runtime=runtime,
    )
    head_DV = qwen35_jax.lm_head_weights(model_cfg, params) if loss_chunk else None

    def ce_sums(hidden_BTD, logits_BTV, targets_BT, valid_BT):
        if loss_chunk:
            dtype = (runtime or qwen35_jax.Runtime()).dtype
            return losses.chunked_cross_entropy_sums(
                hidden_BTD,
                head_DV,
                targets_BT,
                valid_BT,
                chunk=loss_chunk,
                dtype=dtype,
                row_groups=loss_row_groups,
            )
        return losses.cross_entropy_sums(logits_BTV, targets_BT, valid_BT)

    targets_BT, valid_BT = losses.shifted_targets(tokens_BT, seg_BT, 1, mask_BT)
    ce_sum, z_sum, _ = ce_sums(out.hidden, out.logits, targets_BT, valid_BT)
    n_main = jnp.maximum(n_main, 1.0)
    objective = (ce_sum + z_loss * z_sum) / n_main
    sums = {"ce": ce_sum, "z": z_sum, "aux": out.aux_loss}
    if with_mtp:
        targets2_BT, valid2_BT = losses.shifted_targets(tokens_BT, seg_BT, 2, mask_BT)
        mtp_sum, _, _ = ce_sums(out.mtp_hidden, out.mtp_logits, targets2_BT, valid2_BT)
        objective = objective + mtp_lambda * mtp_sum / jnp.maximum(n_mtp, 1.0)
        sums["mtp"] = mtp_sum
    if model_cfg.is_moe:
        coef = model_cfg.text_config.router_aux_loss_coef
        objective = objective + coef * out.aux_loss / num_micro
        sums["expert_load"] = out.expert_load
        sums["dropped"] = out.dropped_tokens
        if with_mtp:
            sums["mtp_aux"], sums["mtp_expert_load"] = out.mtp_aux_loss, out.mtp_expert_load
    return objective, sums


def make_train_step(
    model_cfg: qwen35_jax.Qwen35Config,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    train_cfg: ml_collections.ConfigDict,
    *,
    runtime: qwen35_jax.Runtime | None = None,
    batch_shards: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) step function; `loop.py` jits it with shardings and donation.

    `batch_shards`: the devices the rows are split over (`loop.jitted_step` reads it from the
    mesh); the chunked cross-entropy then takes one row per device at a time."""
    num_micro = int(train_cfg.grad_accum)
    micro_rows = int(train_cfg.batch_size) // num_micro
    row_groups = micro_rows // batch_shards if micro_rows % batch_shards == 0 else 1
    mtp_lambda, z_loss = float(train_cfg.mtp_lambda), float(train_cfg.z_loss)
    loss_chunk = int(train_cfg.get("loss_chunk", 0))
    with_mtp = model_cfg.text_config.mtp_num_hidden_layers > 0 and mtp_lambda > 0

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        n_main, n_mtp = losses.target_counts(batch["segment_ids"], with_mtp, batch.get("loss_mask"))
        kw = dict(
            mtp_lambda=mtp_lambda,
            z_loss=z_loss,
            n_main=n_main,
            n_mtp=n_mtp,
            num_micro=num_micro,
            loss_chunk=loss_chunk,
            runtime=runtime,
            loss_row_groups=row_groups,
        )
        grad_fn = jax.value_and_grad(
            lambda p, mb: micro_losses(model_cfg, p, mb, **kw), has_aux=True
        )
        if num_micro == 1:
            (objective, sums), grads = grad_fn(state.params, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), batch
            )
            zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            first = jax.tree.map(lambda x: x[0], micro)
            (_, sums_shape), _ = jax.eval_shape(grad_fn, state.params, first)
            zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)

            def accumulate(carry, mb):
                obj, sums, grads = carry
                (o, s), g = grad_fn(state.params, mb)
                grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
                return (obj + o, jax.tree.map(jnp.add, sums, s), grads), None

            init = (jnp.zeros((), jnp.float32), zero_sums, zero_grads)
            (objective, sums, grads), _ = jax.lax.scan(accumulate, init, micro)
            for mean in ("aux", "expert_load", "mtp_aux", "mtp_expert_load"):  # dropped: a sum
                if mean in sums:
                    sums[mean] = sums[mean] / num_micro
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        update_finite = all_finite((new_params, new_opt_state))
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm) & update_finite
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        n = jnp.maximum(n_main, 1.0)
        metrics = {
            "loss": sums["ce"] / n,
            "z_loss": z_loss * sums["z"] / n,  # its contribution to the objective
            "lse_sq": sums["z"] / n,  # mean logsumexp^2 (what the z-loss pushes down)
            "aux_loss": sums["aux"],
            "objective": objective,
            "grad_norm": grad_norm,
            "lr": schedule(state.step - state.skipped),  # the optimizer's update count
            "finite": finite,
            "update_finite": update_finite,
            "skipped": new_state.skipped,
            "tokens": n_main,
        }
        if "mtp" in sums:
            metrics["mtp_loss"] = sums["mtp"] / jnp.maximum(n_mtp, 1.0)
        if "expert_load" in sums:
            metrics["expert_load"] = sums["expert_load"]
            metrics["dropped_tokens"] = sums["dropped"]
        if "mtp_aux" in sums:
            metrics["mtp_aux_loss"] = sums["mtp_aux"]
            metrics["mtp_expert_load"] = sums["mtp_expert_load"]
        return new_state, metrics

    return train_step
