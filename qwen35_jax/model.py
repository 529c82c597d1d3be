"""The Qwen3.5 text model: embedding, a scan over blocks of layers, final norm, LM head, MTP.

Data flow (axis letters in `qwen35_jax/__init__.py`):
    input_ids_BT -> embed_tokens -> x_BTD
    x_BTD -> scan over num_blocks Blocks, each = (interval-1) GDN layers + 1 attention layer
          -> scan over the num_tail_layers trailing GDN layers (when layers % interval != 0)
          -> norm -> hidden_BTD -> lm_head (or embed_tokens^T when tied) -> logits_BTV
    (optional) MTPHead(hidden_BTD, embed(input_ids shifted by one)) -> mtp logits (token t+2)
Multimodal (early fusion, `fusion.py`; tower `vision.py`): pixels -> merged_MD; the k-th image
placeholder token's embedding is replaced by row k of the image tokens, the k-th video
placeholder's by row k of the video tokens (over the flattened batch, row after row); positions
default to the 3-D rope index (`positions.py`). Without visual inputs the tower is skipped.

Parameter tree (ours -> Hugging Face):
    embed_tokens [V, D]                     <- model.embed_tokens.weight
    blocks/linear_layers/... [nb, i-1, ...] <- model.layers.{b*i + j}.*      (j < i-1)
    blocks/full_layer/...    [nb, ...]      <- model.layers.{b*i + i-1}.*
    tail_layers/...          [r, ...]       <- model.layers.{nb*i + j}.*
    norm/scale [D]                          <- model.norm.weight
    lm_head [D, V]                          <- lm_head.weight [V, D]  (absent when tied)
    mtp/...                                 <- mtp.*   (see mtp.py)
    visual/...                              <- model.visual.*   (see vision.py; when the
                                               config has a vision_config)
Compile time does not grow with depth: the stacks are nn.scan loops over stacked parameters.

MoE routing replay (`Routing`; RL's `rl.routing_replay`): `apply(..., return_routing=True)`
returns every MoE layer's own top-k expert ids, [L, B, T, k] int32 in layer order (and the MoE
MTP head's, [mtp layers, B, T, k], when it runs); `apply(..., routing=Routing(...))` forces
those ids instead of each router's top-k, the combine weights recomputed from the current
router (`layers/moe.py`). The ids travel through the block scans as xs (the blocks' layers
[nb, interval, ...] then the tail's). Without either argument the program is the one it was.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax import sharding
from qwen35_jax.config import Qwen35Config
from qwen35_jax.fusion import (
    VisionInputs,
    check_placeholder_counts,
    dummy_vision,
    scatter_visual,
    vision_inputs,
)
from qwen35_jax.layers.attention import attention_mask
from qwen35_jax.layers.decoder import (
    LINEAR,
    Block,
    LayerContext,
    concat_layers,
    layer_class,
    scanned_layers,
)
from qwen35_jax.layers.moe import RouterStats
from qwen35_jax.layers.norms import RMSNorm
from qwen35_jax.layers.rotary import rotary_cos_sin
from qwen35_jax.layers.weights import RuntimeDtypes, weight
from qwen35_jax.mtp import MTPHead
from qwen35_jax.positions import rope_index
from qwen35_jax.runtime import Runtime, resolve
from qwen35_jax.vision import VisionTower, vision_rope_theta


class Routing(NamedTuple):
    """MoE expert ids per layer and token (routing replay; see the module docstring)."""

    experts: jax.Array  # [L, B, T, k] int32: the main layers, in layer order
    mtp_experts: jax.Array | None = None  # [mtp layers, B, T, k] int32 (the MoE MTP head)


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (None when return_logits=False)
    hidden: jax.Array  # [B, T, D] final hidden state, after the final norm
    aux_loss: jax.Array  # scalar MoE load-balancing loss (0 for dense), unscaled by the coef
    expert_load: jax.Array | None  # [L, E] fraction of top-k assignments per expert per layer
    mtp_logits: jax.Array | None  # [B, T, V] float32, predicts token t+2 (when return_mtp)
    mtp_hidden: jax.Array | None = None  # [B, T, D] the MTP head's hidden state (when return_mtp)
    # MoE only: routed (token, expert) rows dropped by a capacity factor, main layers + MTP
    dropped_tokens: jax.Array | None = None  # scalar
    # MoE MTP head (when return_mtp): its own load-balancing loss and expert load
    mtp_aux_loss: jax.Array | None = None  # scalar, unscaled
    mtp_expert_load: jax.Array | None = None  # [mtp layers, E]
    # return_routing: the routers' own top-k ids (with a forced routing: what they would pick)
    routing: Routing | None = None


def document_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Positions that restart at 0 at every document start (where the segment id changes)."""
    t = segment_ids_BT.shape[1]
    idx_BT = jnp.broadcast_to(jnp.arange(t), segment_ids_BT.shape)
    start_BT = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1],
        ],
        axis=1,
    )
    last_start_BT = jax.lax.cummax(jnp.where(start_BT, idx_BT, 0), axis=1)
    return idx_BT - last_start_BT


class Qwen35TextModel(RuntimeDtypes, nn.Module):
    config: Qwen35Config
    runtime: Runtime = Runtime()

    @nn.compact
    def __call__(
        self,
        input_ids_BT: jax.Array,
        segment_ids_BT: jax.Array,
        positions: jax.Array,
        return_logits: bool = True,
        return_mtp: bool = False,
        vision: VisionInputs | None = None,
        routing: Routing | None = None,
        return_routing: bool = False,
    ) -> ModelOutput:
        cfg, rt = self.config, self.runtime
        c = cfg.text_config
        dtype, param_dtype = self.dtype, self.param_dtype

        embed_VD = weight(
            self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"), cast=False
        )
        x_BTD = jnp.take(embed_VD, input_ids_BT, axis=0).astype(dtype)
        if cfg.vision_config is not None and (vision is not None or self.is_initializing()):
            tower = VisionTower(cfg.vision_config, vision_rope_theta(cfg), rt, name="visual")
            if vision is None:  # init: build the tower's parameters on one dummy image
                vision = dummy_vision(cfg)
            merged_MD = tower(vision.pixels_PF.astype(dtype), vision.layout)
            x_BTD = scatter_visual(cfg, x_BTD, input_ids_BT, merged_MD, vision)
        x_BTD = sharding.constrain(x_BTD, ("batch", "length", "activation_embed"))

        rotary_dim = int(c.head_dim * c.rope_parameters.partial_rotary_factor)
        rope = c.rope_parameters
        cos_BTR, sin_BTR = rotary_cos_sin(
            positions, rotary_dim, rope.rope_theta, rope.mrope_section, rope.mrope_interleaved
        )
        valid_BT = segment_ids_BT != 0
        ctx = LayerContext(
            segment_ids_BT, cos_BTR, sin_BTR, attention_mask(segment_ids_BT), valid_BT
        )

        stats = []  # RouterStats with a leading layer axis, in layer order (MoE only)
        rec = return_routing
        forced_LBTk = None if routing is None else routing.experts
        n_block_layers = c.num_blocks * c.full_attention_interval
        if c.num_blocks:
            args, in_axes = (ctx,), (nn.broadcast,)
            if forced_LBTk is not None:
                block_LBTk = forced_LBTk[:n_block_layers]
                block_LBTk = block_LBTk.reshape(c.num_blocks, -1, *block_LBTk.shape[1:])
                args, in_axes = (ctx, block_LBTk), (nn.broadcast, 0)
            blocks = scanned_layers(Block, c.num_blocks, "layers", in_axes)
            blocks = blocks(c, rt, record_routing=rec, name="blocks")
            x_BTD, block_stats = blocks(x_BTD, *args)  # [nb, interval, ...]
            if block_stats is not None:
                stats.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), block_stats))
        if c.num_tail_layers:
            args, in_axes = (ctx,), (nn.broadcast,)
            if forced_LBTk is not None:  # the layer's (ctx, cache, routing)
                args = (ctx, None, forced_LBTk[n_block_layers:])
                in_axes = (nn.broadcast, nn.broadcast, 0)
            tail_cls = layer_class(rt.remat_policy)
            tail = scanned_layers(tail_cls, c.num_tail_layers, "layers", in_axes)
            tail = tail(c, LINEAR, rt, record_routing=rec, name="tail_layers")
            x_BTD, tail_stats = tail(x_BTD, *args)
            if tail_stats is not None:
                stats.append(tail_stats)
        hidden_BTD = RMSNorm(c.rms_norm_eps, param_dtype, name="norm")(x_BTD)

        if c.tie_word_embeddings:
            head_DV = embed_VD.T
        else:
            head_DV = weight(
                self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), cast=False
            )

        def logits_of(h_BTD):
            return jnp.einsum(
                "btd,dv->btv",
                h_BTD.astype(dtype),
                head_DV.astype(dtype),
                preferred_element_type=jnp.float32,
            )

        logits = logits_of(hidden_BTD) if return_logits else None
        all_stats = concat_layers(stats) if stats else None
        aux_loss, expert_load, dropped = _moe_statistics(c, all_stats)

        mtp_logits = mtp_hidden_BTD = mtp_aux = mtp_load = None
        mtp_stats = None
        if c.mtp_num_hidden_layers and (return_mtp or self.is_initializing()):
            next_ids_BT = jnp.concatenate(
                [input_ids_BT[:, 1:], jnp.zeros_like(input_ids_BT[:, :1])], axis=1
            )
            next_embed_BTD = jnp.take(embed_VD, next_ids_BT, axis=0).astype(dtype)
            mtp = MTPHead(c, rt, record_routing=rec, name="mtp")
            mtp_forced = None if routing is None else routing.mtp_experts
            mtp_hidden_BTD, mtp_stats = mtp(
                hidden_BTD, next_embed_BTD, ctx, routing_LBTk=mtp_forced
            )
            mtp_logits = logits_of(mtp_hidden_BTD) if return_logits else None
            if mtp_stats is not None:
                mtp_aux, mtp_load, mtp_dropped = _moe_statistics(c, mtp_stats)
                dropped = dropped + mtp_dropped
        routing_out = None
        if return_routing and all_stats is not None:
            mtp_experts = None if mtp_stats is None else mtp_stats.experts
            routing_out = Routing(all_stats.experts, mtp_experts)
        return ModelOutput(
            logits,
            hidden_BTD,
            aux_loss,
            expert_load,
            mtp_logits,
            mtp_hidden_BTD,
            dropped,
            mtp_aux,
            mtp_load,
            routing_out,
        )


def _moe_statistics(
    c, stats: RouterStats | None
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Per-layer router statistics [L, ...] -> (HF-style aux loss, expert load [L, E], dropped
    rows in total); (0, None, None) for a dense model."""
    if stats is None:
        return jnp.zeros((), jnp.float32), None, None
    counts_LE, probs_LE, tokens_L = stats.expert_counts, stats.router_prob_sum, stats.num_tokens
    total = jnp.maximum(jnp.sum(tokens_L), 1.0)
    aux = c.num_experts * jnp.sum((counts_LE.sum(0) / total) * (probs_LE.sum(0) / total))
    load_LE = counts_LE / jnp.maximum(tokens_L, 1.0)[:, None]
    return aux, load_LE, jnp.sum(stats.dropped_tokens)


# ----------------------------------------------------------------------------- functional API


def _model(config: Qwen35Config, runtime: Runtime | None) -> Qwen35TextModel:
    return Qwen35TextModel(config, resolve(runtime))


def _dummy_inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    ids_BT = jnp.zeros((1, 8), jnp.int32)
    return ids_BT, jnp.ones_like(ids_BT), jnp.broadcast_to(jnp.arange(8), (1, 8))


def abstract_params(config: Qwen35Config, *, runtime: Runtime | None = None):
    """Shapes and dtypes of the parameters as `nn.Partitioned` boxes (logical axis names).

    No FLOPs and no memory: `jax.eval_shape` of init. Feed it to
    `sharding.logical_to_mesh_sharding` to get the parameter shardings.
    """
    ids, seg, pos = _dummy_inputs()
    variables = jax.eval_shape(
        lambda rng: _model(config, runtime).init(rng, ids, seg, pos, return_logits=False),
        jax.random.key(0),
    )
    return variables["params"]


def init_params(config: Qwen35Config, rng: jax.Array, *, runtime: Runtime | None = None) -> dict:
    """Random parameters: a plain nested dict of arrays (`runtime.param_dtype`, float32)."""
    ids, seg, pos = _dummy_inputs()

    @jax.jit
    def init(rng):
        variables = _model(config, runtime).init(rng, ids, seg, pos, return_logits=False)
        return nn.meta.unbox(variables["params"])

    return init(rng)


def apply(
    config: Qwen35Config,
    params: dict,
    input_ids: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    return_logits: bool = True,
    return_mtp: bool = False,
    pixel_values: jax.Array | None = None,
    image_grid_thw: jax.Array | None = None,
    pixel_values_videos: jax.Array | None = None,
    video_grid_thw: jax.Array | None = None,
    runtime: Runtime | None = None,
    routing: Routing | None = None,
    return_routing: bool = False,
) -> ModelOutput:
    """The full model: logits, final hidden states, MoE aux loss and expert load, MTP logits.

    input_ids [B, T] int. attention_mask [B, T] (Hugging Face: 1 token, 0 padding).
    segment_ids [B, T] int: packed documents, 0 = padding. positions [B, T] or [3, B, T]
    (multimodal); default: arange(T), or restarting per document when segment_ids is given;
    with visual inputs, the 3-D rope index (`positions.rope_index`), also per document.
    pixel_values [P, F] / image_grid_thw [n, 3] and pixel_values_videos / video_grid_thw as the
    processor (`processor.py`) returns them: the image (video) placeholder tokens, in order over
    the flattened batch, take the tower's outputs (Hugging Face semantics). The grids may be
    traced values (shapes depend only on P), and a patch budget may be padded (zero patches,
    zero grid rows). Per-row form for training: pixels [B, P_row, F] with grids [B, G_row, 3]
    (row b's placeholders take row b's patches; see `fusion.py`).
    return_logits=False skips both heads' [B, T, V] logits (hidden and mtp_hidden are still
    returned): a loss can then project chunks of tokens itself with `lm_head_weights`.
    runtime: how to run (dtypes, remat, kernel sizes, MoE dispatch); None = `Runtime()`.
    routing (MoE): forced expert ids, `Routing(experts [L, B, T, k], mtp_experts)`; the MTP
    head routes itself when mtp_experts is None. return_routing (MoE): `ModelOutput.routing`
    holds each router's own top-k ids (module docstring).
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if routing is not None or return_routing:
        check_routing(config, routing, input_ids.shape)
    if segment_ids is None:
        segment_ids_BT = jnp.ones_like(input_ids, dtype=jnp.int32)
        default_positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    else:
        segment_ids_BT = jnp.asarray(segment_ids, jnp.int32)
        default_positions = document_positions(segment_ids_BT)
    if attention_mask is not None:
        segment_ids_BT = jnp.where(jnp.asarray(attention_mask) != 0, segment_ids_BT, 0)
    for name, arr in (("segment_ids", segment_ids_BT), ("attention_mask", attention_mask)):
        if arr is not None and jnp.shape(arr) != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {input_ids.shape}")
    vision = vision_inputs(
        config, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
    )
    if vision is not None:
        check_placeholder_counts(
            config,
            input_ids,
            image_grid_thw if vision.replace_images else None,
            video_grid_thw if vision.replace_videos else None,
        )
        if positions is None:
            default_positions = rope_index(
                config,
                input_ids,
                image_grid_thw if vision.replace_images else None,
                video_grid_thw if vision.replace_videos else None,
                segment_ids=segment_ids_BT,
            )
    positions = default_positions if positions is None else jnp.asarray(positions)
    if positions.shape[-2:] != input_ids.shape or positions.ndim not in (2, 3):
        raise ValueError(
            f"positions must be [B, T] or [3, B, T] with [B, T] = {input_ids.shape}, "
            f"got {positions.shape}"
        )
    return _model(config, runtime).apply(
        {"params": params},
        input_ids,
        segment_ids_BT,
        positions,
        return_logits=return_logits,
        return_mtp=return_mtp,
        vision=vision,
        routing=routing,
        return_routing=return_routing,
    )


def check_routing(config: Qwen35Config, routing: Routing | None, shape_BT: tuple) -> None:
    """A routing argument fits the model and the batch (one-line ValueError otherwise)."""
    c = config.text_config
    if not c.is_moe:
        raise ValueError("routing= / return_routing=True need an MoE model (num_experts > 0)")
    if routing is None:
        return
    parts = [("routing.experts", routing.experts, c.num_hidden_layers)]
    if routing.mtp_experts is not None:
        parts.append(("routing.mtp_experts", routing.mtp_experts, c.mtp_num_hidden_layers))
    for name, arr, layers in parts:
        want = (layers, *shape_BT, c.num_experts_per_tok)
        if tuple(jnp.shape(arr)) != want or not jnp.issubdtype(jnp.result_type(arr), jnp.integer):
            raise ValueError(
                f"{name} must be integer expert ids of shape [layers, B, T, k] = {want}, "
                f"got {jnp.result_type(arr)}{list(jnp.shape(arr))}"
            )


def lm_head_weights(config: Qwen35Config, params: dict) -> jax.Array:
    """The [D, V] output projection shared by the main and MTP heads (tied: embed_tokens^T)."""
    if config.text_config.tie_word_embeddings:
        return params["embed_tokens"].T
    return params["lm_head"]


def forward(
    config: Qwen35Config,
    params: dict,
    input_ids: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    pixel_values: jax.Array | None = None,
    image_grid_thw: jax.Array | None = None,
    pixel_values_videos: jax.Array | None = None,
    video_grid_thw: jax.Array | None = None,
    runtime: Runtime | None = None,
    routing: Routing | None = None,
) -> jax.Array:
    """Logits [B, T, vocab] (float32). See `apply` for the arguments."""
    return apply(
        config,
        params,
        input_ids,
        attention_mask=attention_mask,
        segment_ids=segment_ids,
        positions=positions,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        runtime=runtime,
        routing=routing,
    ).logits
