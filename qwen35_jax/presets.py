"""The released Qwen3.5 presets (DESIGN.md section 2) and tiny ones for tests and demos.

    get_config(name) -> Qwen35Config;  PRESETS: every name, the eight released models first.

All released models: vocab 248,320, head dim 256, GDN key/value head dim 128, conv 4, attention
every 4th layer, partial rotary 0.25, rope theta 1e7, mRoPE [11, 11, 10] interleaved, one MTP
layer, a vision tower whose output width is the text width.
"""

from __future__ import annotations

import dataclasses

from qwen35_jax.config import ConfigError, Qwen35Config, RopeParameters, TextConfig, VisionConfig


def _real(
    d: int,
    layers: int,
    heads: tuple[int, int],
    gdn_v: int,
    vision: tuple[int, ...],
    ffn: int = 12288,
    moe: tuple[int, int, int] | None = None,
    tied: bool = False,
) -> Qwen35Config:
    m = {}
    if moe:
        e, k, w = moe
        m = dict(
            num_experts=e,
            num_experts_per_tok=k,
            moe_intermediate_size=w,
            shared_expert_intermediate_size=w,
        )
    text = TextConfig(
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        linear_num_key_heads=16,
        linear_num_value_heads=gdn_v,
        tie_word_embeddings=tied,
        mtp_num_hidden_layers=1,
        eos_token_id=248044,
        **m,
    )
    depth, width, mlp, nh = vision
    vis = VisionConfig(
        depth=depth, hidden_size=width, intermediate_size=mlp, num_heads=nh, out_hidden_size=d
    )
    return Qwen35Config(text_config=text, vision_config=vis)


_V_SMALL, _V_MID, _V_BIG = (12, 768, 3072, 12), (24, 1024, 4096, 16), (27, 1152, 4304, 16)
_TINY = TextConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    tie_word_embeddings=True,
    mtp_num_hidden_layers=1,
    rope_parameters=RopeParameters(rope_theta=10_000.0),
)
# MoE presets keep the default intermediate_size: the released MoE configs do not carry one.
_PRESETS: dict[str, Qwen35Config] = {
    "qwen3.5-0.8b": _real(1024, 24, (8, 2), 16, _V_SMALL, ffn=3584, tied=True),
    "qwen3.5-2b": _real(2048, 24, (8, 2), 16, _V_MID, ffn=6144, tied=True),
    "qwen3.5-4b": _real(2560, 32, (16, 4), 32, _V_MID, ffn=9216, tied=True),
    "qwen3.5-9b": _real(4096, 32, (16, 4), 32, _V_BIG, ffn=12288),
    "qwen3.5-27b": _real(5120, 64, (24, 4), 48, _V_BIG, ffn=17408),
    "qwen3.5-35b-a3b": _real(2048, 40, (16, 2), 32, _V_BIG, moe=(256, 8, 512)),
    "qwen3.5-122b-a10b": _real(3072, 48, (32, 2), 64, _V_BIG, moe=(256, 8, 1024)),
    "qwen3.5-397b-a17b": _real(4096, 60, (32, 2), 64, _V_BIG, moe=(512, 10, 1024)),
    "tiny": Qwen35Config(text_config=_TINY),
    "tiny-moe": Qwen35Config(
        text_config=dataclasses.replace(
            _TINY,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            tie_word_embeddings=False,
        )
    ),
    # vision token ids moved inside the 512-token vocabulary so they can be embedded
    "tiny-vl": Qwen35Config(
        text_config=_TINY,
        vision_start_token_id=508,
        vision_end_token_id=509,
        image_token_id=510,
        video_token_id=511,
        vision_config=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            temporal_patch_size=2,
            spatial_merge_size=2,
            num_position_embeddings=64,
        ),
    ),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def get_config(name: str) -> Qwen35Config:
    """The preset called ``name`` (see ``PRESETS``)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown config name {name!r}; valid names: {', '.join(PRESETS)}")
    return _PRESETS[name]
