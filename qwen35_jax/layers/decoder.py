"""One decoder layer (pre-norm) and the scanned stacks built from it.

    x = x + mixer(input_layernorm(x))         mixer: GatedDeltaNet ("linear_attention")
                                                      or GatedAttention ("full_attention")
    x = x + ffn(post_attention_layernorm(x))  ffn: SwiGLU MLP (dense) or MoE

Parameter names (ours -> Hugging Face `layers.{i}.*`): input_layernorm, post_attention_layernorm,
linear_attn (GDN) or self_attn (attention), mlp (dense MLP or MoE: gate, experts,
shared_expert, shared_expert_gate).

`LayerContext` carries what every layer reads besides the residual stream: segment ids, the
rotary cos/sin, the attention mask and the token-validity mask. The scans broadcast it.

Decoding: `layer(x, ctx, cache)` continues each row from its cache (a `GDNCache` or a `KVCache`;
`ctx.mask` is then [B, 1, 1, T, S], the cache slots the new tokens see besides themselves) and
`layer(x, ctx, return_cache=True)` is a prefill; both return (x, stats, new cache): the GDN
layer's new state and windows, the attention layer's keys/values of the T new tokens (the
caller writes them into its cache). The stacks over layers live in `qwen35_jax/decode.py`.

Routing replay (MoE): `record_routing=True` (a module field, so the default program is
unchanged) fills `RouterStats.experts` [B, T, k] with the router's own top-k, and a forced
`routing_BTk` (4th positional argument: the scans pass it as xs) replaces the top-k
(`moe.py`). Through the scans both are stacked per layer like the statistics,
[layers, B, T, k] int32, in layer order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax import sharding
from qwen35_jax.config import TextConfig
from qwen35_jax.layers.attention import GatedAttention
from qwen35_jax.layers.gated_deltanet import GatedDeltaNet
from qwen35_jax.layers.mlp import MLP
from qwen35_jax.layers.moe import MoE, RouterStats
from qwen35_jax.layers.norms import RMSNorm
from qwen35_jax.layers.weights import RuntimeDtypes
from qwen35_jax.runtime import Runtime

LINEAR, FULL = "linear_attention", "full_attention"

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class LayerContext(NamedTuple):
    segment_ids_BT: jax.Array
    cos_BTR: jax.Array
    sin_BTR: jax.Array
    mask: jax.Array  # [B, 1, 1, T, T] boolean
    valid_BT: jax.Array


class DecoderLayer(RuntimeDtypes, nn.Module):
    config: TextConfig
    kind: str  # LINEAR or FULL
    runtime: Runtime = Runtime()
    record_routing: bool = False

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        ctx: LayerContext,
        cache=None,
        routing_BTk: jax.Array | None = None,
        *,
        return_cache: bool = False,
        every_position: bool = False,
    ) -> tuple[jax.Array, RouterStats | None] | tuple[jax.Array, RouterStats | None, tuple]:
        """(x_BTD, the MoE router statistics (None for a dense FFN)[, the layer's new cache]).
        every_position: a GDN layer's cache after every new token (`GatedDeltaNet`).
        routing_BTk: forced expert ids of the MoE FFN (routing replay)."""
        c, rt = self.config, self.runtime
        h_BTD = RMSNorm(c.rms_norm_eps, self.param_dtype, name="input_layernorm")(x_BTD)
        decoding = cache is not None or return_cache
        new_cache = None
        if self.kind == LINEAR:
            seg_BT = None if cache is not None else ctx.segment_ids_BT
            h_BTD = GatedDeltaNet(c, rt, name="linear_attn")(
                h_BTD, seg_BT, cache, return_cache=return_cache, every_position=every_position
            )
        else:
            h_BTD = GatedAttention(c, rt, name="self_attn")(
                h_BTD,
                ctx.cos_BTR,
                ctx.sin_BTR,
                ctx.mask,
                segment_ids_BT=ctx.segment_ids_BT,
                cache=cache,
                return_cache=return_cache,
            )
        if decoding:
            h_BTD, new_cache = h_BTD
        x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)

        h_BTD = RMSNorm(c.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x_BTD)
        if c.is_moe:
            moe = MoE(c, rt, record_routing=self.record_routing, name="mlp")
            h_BTD, stats = moe(h_BTD, ctx.valid_BT, routing_BTk)
        else:
            mlp = MLP(c.hidden_size, c.intermediate_size, self.dtype, self.param_dtype, name="mlp")
            h_BTD, stats = mlp(h_BTD), None
        x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
        x_BTD = sharding.constrain(x_BTD, ("batch", "length", "activation_embed"))
        if decoding:
            return x_BTD, stats, new_cache
        return x_BTD, stats


def layer_class(remat_policy: str) -> type[nn.Module]:
    """DecoderLayer, wrapped in nn.remat when the policy asks for it."""
    if remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)


def scanned_layers(
    layer_cls: type[nn.Module], length: int, axis_name: str, in_axes: tuple = (nn.broadcast,)
) -> type[nn.Module]:
    """`length` identical layers applied in sequence by nn.scan; params stacked on axis 0.
    in_axes: of the arguments after the carry (the context broadcast; a forced routing 0)."""
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=length,
        metadata_params={nn.PARTITION_NAME: axis_name},
    )


class Block(nn.Module):
    """The repeating unit: (full_attention_interval - 1) GDN layers, then one attention layer."""

    config: TextConfig
    runtime: Runtime = Runtime()
    record_routing: bool = False

    @nn.compact
    def __call__(
        self, x_BTD: jax.Array, ctx: LayerContext, routing_LBTk: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats | None]:
        """(x_BTD, router statistics [interval, ...] in layer order; None when dense).
        routing_LBTk: forced expert ids of the block's interval layers, in layer order."""
        c, rt, rec = self.config, self.runtime, self.record_routing
        cls = layer_class(rt.remat_policy)
        n_linear = c.full_attention_interval - 1
        per_layer = []
        if n_linear:
            if routing_LBTk is None:
                stack = scanned_layers(cls, n_linear, "sublayers")
                args = (ctx,)
            else:  # the layer's (ctx, cache, routing): routing scanned
                stack = scanned_layers(cls, n_linear, "sublayers", (nn.broadcast, nn.broadcast, 0))
                args = (ctx, None, routing_LBTk[:n_linear])
            stack = stack(c, LINEAR, rt, record_routing=rec, name="linear_layers")
            x_BTD, linear_stats = stack(x_BTD, *args)
            per_layer.append(linear_stats)
        full = cls(c, FULL, rt, record_routing=rec, name="full_layer")
        args = (ctx,) if routing_LBTk is None else (ctx, None, routing_LBTk[n_linear])
        x_BTD, full_stats = full(x_BTD, *args)
        if full_stats is None:
            return x_BTD, None
        per_layer.append(jax.tree.map(lambda a: a[None], full_stats))
        return x_BTD, concat_layers(per_layer)


def concat_layers(stats: list[RouterStats]) -> RouterStats:
    """Per-layer statistics with leading layer axes, joined along axis 0 (in layer order)."""
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *stats)
