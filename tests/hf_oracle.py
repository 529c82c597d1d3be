"""Tiny random Hugging Face Qwen3.5 models: the ground truth for parity tests.

Every model is built from a small config, its weights perturbed (the reference initialises norms
at 0 or 1 and would hide mistakes there), written with `save_pretrained` and read back by our
`load_hf`, so the converter is under test too.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
)

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    intermediate_size=48,
    rms_norm_eps=1e-6,
)
MOE = dict(
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)


def build(moe: bool = False, seed: int = 0, **overrides) -> torch.nn.Module:
    """A perturbed tiny HF causal LM (float32, eval mode)."""
    torch.manual_seed(seed)
    kw = {**BASE, **(MOE if moe else {}), **overrides}
    if "full_attention_interval" in kw:
        interval = kw.pop("full_attention_interval")
        kw["layer_types"] = [
            "linear_attention" if (i + 1) % interval else "full_attention"
            for i in range(kw["num_hidden_layers"])
        ]
    config = Qwen3_5MoeTextConfig(**kw) if moe else Qwen3_5TextConfig(**kw)
    model = (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval().float()


def save(model: torch.nn.Module, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.numpy()


def loss_and_grads(model, ids: np.ndarray, names: list[str]) -> tuple[float, dict[str, np.ndarray]]:
    """Mean next-token cross-entropy and its gradient for the named HF parameters."""
    model.zero_grad()
    out = model(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    params = dict(model.named_parameters())
    return float(out.loss), {n: params[n].grad.numpy().copy() for n in names}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
