"""The optimiser: global-norm clipping, then AdamW with a decay mask and a warmup schedule.

Schedules (`optimizer.schedule`), after a linear warmup from lr / warmup_steps to lr over
`warmup_steps` updates:
    cosine  cosine decay from lr to lr * min_lr_ratio at the last step
    wsd     warmup-stable-decay: constant lr, then over the final `decay_fraction` of the steps a
            linear decay to lr * min_lr_ratio

Weight decay is decoupled (AdamW: p -= lr * wd * p) and applies to projection and embedding
matrices only. It is masked off (decision, documented here and tested):
    norm scales     every RMSNorm scale: layer norms, q/k norms, the final norm, the GDN output
                    norm, the MTP norms (any path with a component containing "norm")
    biases          attention biases (q_bias, k_bias, v_bias, o_bias; any name ending "bias")
    gates           GDN decay parameters A_log and dt_bias, the MoE router `mlp/gate` and the
                    shared expert's gate vector `shared_expert_gate`: these set gating and routing
                    rather than carry features, and decaying them biases routing toward uniform
                    and decay rates toward fixed values
Everything else decays: embeddings and LM head, q/k/v/o, the GDN projections (including
in_proj_a / in_proj_b, which are D->heads projections) and depthwise conv taps, MLP and expert
weights (their `gate_proj` is a projection, not a gate), the MTP `fc`.

Parameters and optimizer state stay in float32 (moments are created in the parameters' dtype,
float32 by default); compute dtype is the model's business.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

_NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "gate", "shared_expert_gate"})


def decays(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (its dict keys) gets weight decay."""
    if any("norm" in part or part.endswith("bias") for part in path):
        return False
    return path[-1] not in _NO_DECAY_NAMES


def decay_mask(params: Any) -> Any:
    """A tree of bools like `params`: True where weight decay applies."""

    def leaf(path, _):
        return decays(tuple(getattr(k, "key", str(k)) for k in path))

    return jax.tree_util.tree_map_with_path(leaf, params)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The schedule of `optimizer.schedule` over `total_steps` optimizer updates."""
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    floor = opt.lr * opt.min_lr_ratio
    rest = max(total_steps - warmup, 1)
    if opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(opt.lr, rest, alpha=opt.min_lr_ratio)
    elif opt.schedule == "wsd":
        decay = max(int(round(opt.decay_fraction * total_steps)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(opt.lr), optax.linear_schedule(opt.lr, floor, decay)],
            [stable],
        )
    else:
        raise ValueError(f"optimizer.schedule={opt.schedule!r} must be 'cosine' or 'wsd'")
    if warmup == 0:
        return after
    warm = optax.linear_schedule(opt.lr / warmup, opt.lr, warmup)  # update 0 already moves
    return optax.join_schedules([warm, after], [warmup])


def make_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule): clip_by_global_norm (if clip_norm > 0), then masked AdamW."""
    schedule = learning_rate_schedule(opt, total_steps)
    parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    parts.append(
        optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
