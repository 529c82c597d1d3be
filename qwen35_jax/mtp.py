"""Multi-token prediction (MTP) head.

For position t, with the main model's final (post-norm) hidden state h_t and the embedding of
the next token:
    x_t = fc(concat(pre_fc_norm_embedding(embed(token_{t+1})), pre_fc_norm_hidden(h_t)))
    x   = decoder_layer_i(x) for each of the `mtp_num_hidden_layers` full-attention layers
    out = norm(x);  logits = lm_head(out)  ->  predicts token t+2
The embedding table and LM head are the main model's. Training adds lambda * CE(token t+2).

Decoding (speculative drafting, `generate/speculative.py`): `caches` (one `KVCache` per MTP
layer, [B, G, S, H]) or `return_cache=True` (a prefill) makes the call also return each layer's
keys/values of the T tokens, as `DecoderLayer` does; `ctx` then carries the decode mask.

MoE models: the MTP layer's FFN is MoE too, so it records / replays its routing like the main
layers (`record_routing`, `routing_LBTk` [mtp layers, B, T, k]; `layers/moe.py`).

Parameter names (ours -> Hugging Face `mtp.*`):
    fc [2D, D] <- fc.weight [D, 2D];   pre_fc_norm_embedding/scale, pre_fc_norm_hidden/scale,
    norm/scale <- *.weight;            layers_{i}/... <- layers.{i}.* (a full-attention layer)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qwen35_jax.config import TextConfig
from qwen35_jax.layers.decoder import FULL, DecoderLayer, LayerContext, concat_layers
from qwen35_jax.layers.moe import RouterStats
from qwen35_jax.layers.norms import RMSNorm
from qwen35_jax.layers.weights import RuntimeDtypes, weight
from qwen35_jax.runtime import Runtime


class MTPHead(RuntimeDtypes, nn.Module):
    config: TextConfig
    runtime: Runtime = Runtime()
    record_routing: bool = False

    @nn.compact
    def __call__(
        self,
        h_BTD: jax.Array,
        next_embed_BTD: jax.Array,
        ctx: LayerContext,
        caches: tuple | None = None,
        *,
        return_cache: bool = False,
        routing_LBTk: jax.Array | None = None,
    ) -> tuple[jax.Array, RouterStats | None] | tuple[jax.Array, RouterStats | None, tuple]:
        """(out_BTD, the MoE layers' router statistics [mtp layers, ...]; None when dense
        [, the layers' new-token KVCaches when decoding])."""
        c = self.config
        d, eps = c.hidden_size, c.rms_norm_eps
        fc = weight(self, "fc", (2 * d, d), ("mlp", "embed"), cast=False)
        e_BTD = RMSNorm(eps, self.param_dtype, name="pre_fc_norm_embedding")(next_embed_BTD)
        h_BTD = RMSNorm(eps, self.param_dtype, name="pre_fc_norm_hidden")(h_BTD)
        x_BTD = jnp.concatenate([e_BTD, h_BTD], axis=-1).astype(self.dtype) @ fc.astype(self.dtype)
        stats, new_caches = [], []
        decoding = caches is not None or return_cache
        for i in range(c.mtp_num_hidden_layers):
            layer = DecoderLayer(
                c, FULL, self.runtime, record_routing=self.record_routing, name=f"layers_{i}"
            )
            if decoding:
                cache = None if caches is None else caches[i]
                x_BTD, layer_stats, kv = layer(x_BTD, ctx, cache, return_cache=return_cache)
                new_caches.append(kv)
            elif routing_LBTk is None:
                x_BTD, layer_stats = layer(x_BTD, ctx)
            else:
                x_BTD, layer_stats = layer(x_BTD, ctx, None, routing_LBTk[i])
            if layer_stats is not None:
                stats.append(jax.tree.map(lambda a: a[None], layer_stats))
        out_BTD = RMSNorm(eps, self.param_dtype, name="norm")(x_BTD)
        if decoding:
            return out_BTD, concat_layers(stats) if stats else None, tuple(new_caches)
        return out_BTD, concat_layers(stats) if stats else None
