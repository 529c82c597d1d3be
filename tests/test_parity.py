"""Float32 parity with transformers' Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM.

Each case builds a tiny perturbed HF model, writes it with save_pretrained, reads it with our
load_hf, and compares logits (max|diff| / max|ref| <= 1e-4) on valid (non-padding) positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen35_jax as q
from qwen35_jax.convert.hf_names import hf_rules
from tests import hf_oracle

TOL = 1e-4

CASES = {
    # name: (moe, overrides, T)
    "dense-tied-block+tail": (False, dict(tie_word_embeddings=True), 70),
    "dense-untied-interval2": (
        False,
        dict(num_hidden_layers=8, full_attention_interval=2, tie_word_embeddings=False),
        67,
    ),
    "dense-kv-equal-heads": (
        False,
        dict(
            num_hidden_layers=4,
            linear_num_key_heads=3,
            linear_num_value_heads=3,
            linear_key_head_dim=16,
            linear_value_head_dim=8,
            num_attention_heads=6,
            num_key_value_heads=3,
        ),
        33,
    ),
    "moe-untied": (True, dict(num_hidden_layers=8), 70),
    "moe-interval3-tail": (True, dict(num_hidden_layers=7, full_attention_interval=3), 45),
}


@pytest.fixture(scope="module")
def jit_forward():
    return jax.jit(q.forward, static_argnums=0)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(case, tmp_path, jit_forward):
    moe, overrides, t = CASES[case]
    model = hf_oracle.build(moe=moe, **overrides)
    config, params = q.load_hf(hf_oracle.save(model, tmp_path))
    rng = np.random.RandomState(1)
    ids = rng.randint(0, config.text_config.vocab_size, (3, t))
    mask = np.ones((3, t), np.int64)
    mask[1, t - 20 :] = 0  # right padding
    mask[2, t - 3 :] = 0
    ref = hf_oracle.logits(model, ids, mask)
    ours = np.asarray(jit_forward(config, params, ids, attention_mask=mask))
    valid = mask.astype(bool)
    assert ours.shape == ref.shape
    assert hf_oracle.rel_err(ours[valid], ref[valid]) <= TOL


def _our_grad_as_hf(config, grads, key):
    """Our gradient for the HF tensor `key`, laid out as HF lays out that tensor."""
    (rule,) = [r for r in hf_rules(config, multimodal_prefix=False) if r.key == key]
    parts = []
    for piece in rule.pieces:
        leaf = grads
        for name in piece.path:
            leaf = leaf[name]
        parts.append(piece.to_hf(np.asarray(leaf)[piece.index]))
    return rule.join(parts)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_loss_and_gradients_match_reference(moe, tmp_path):
    model = hf_oracle.build(moe=moe, num_hidden_layers=4)
    config, params = q.load_hf(hf_oracle.save(model, tmp_path))
    ids = np.random.RandomState(2).randint(0, config.text_config.vocab_size, (2, 40))
    names = [
        "model.embed_tokens.weight",
        "model.layers.1.linear_attn.in_proj_qkv.weight",
        "model.layers.0.linear_attn.A_log",
        "model.layers.3.self_attn.q_proj.weight",
    ]
    if moe:
        names.append("model.layers.2.mlp.experts.gate_up_proj")
    ref_loss, ref_grads = hf_oracle.loss_and_grads(model, ids, names)

    def loss_fn(p):
        logits = q.forward(config, p, ids)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert abs(float(loss) - ref_loss) / abs(ref_loss) <= TOL
    for name in names:
        if name.endswith("experts.gate_up_proj"):  # HF's fused in-memory layout [E, 2I, D]
            gate = _our_grad_as_hf(config, grads, "model.layers.2.mlp.experts.3.gate_proj.weight")
            up = _our_grad_as_hf(config, grads, "model.layers.2.mlp.experts.3.up_proj.weight")
            ours, ref = np.concatenate([gate, up]), ref_grads[name][3]
        else:
            ours, ref = _our_grad_as_hf(config, grads, name), ref_grads[name]
        assert hf_oracle.rel_err(ours, ref) <= TOL, name
