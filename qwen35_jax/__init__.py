"""qwen35_jax: the Qwen3.5 model family in JAX/Flax, exact to the Hugging Face reference.

Public API (stable; later modules and the tests use exactly these names):
    get_config(name) -> Qwen35Config                   presets: PRESETS
    config_from_hf(path or dict) -> Qwen35Config       HF config.json (also a checkpoint dir)
    config_to_hf(config) -> dict                       a config.json transformers loads
    Runtime(compute_dtype=..., remat_policy=..., ...)  how to run (dtypes, remat, kernel
                                                       sizes, MoE dispatch); every model function
                                                       takes runtime=... (None: the defaults)
    init_params(config, rng) -> params                 a plain nested dict of arrays
    load_hf(path, dtype=jnp.float32) -> (config, params)
    forward(config, params, input_ids, *, attention_mask=None, segment_ids=None,
            positions=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None) -> logits [B, T, vocab]
    apply(config, params, input_ids, ...) -> ModelOutput(logits, hidden, aux_loss,
            expert_load, mtp_logits, mtp_hidden)       what training needs
    Routing(experts [L, B, T, k], mtp_experts)         MoE routing replay: apply(...,
                                                       routing=, return_routing=True)
    lm_head_weights(config, params) -> [D, vocab]      the output projection (tied or not)
    abstract_params(config) -> shapes with logical axis names (jax.eval_shape, no FLOPs)
    process_images(images, **kw), process_videos(videos, **kw) -> pixel arrays and grids
    expand_placeholders(input_ids, image_grid_thw=..., video_grid_thw=..., ...) -> input ids
    rope_index(config, input_ids, image_grid_thw, video_grid_thw, ...) -> positions [3, B, T]
    generate(config, params, prompts, *, max_new_tokens, rng=None, temperature=0.0, top_k=0,
             top_p=1.0, stop_token_ids=(), pixel_values=None, ...) -> GenerateOutput(tokens,
             lengths, logprobs)                batched prefill + cached decode (generate/)
    decode_state_bytes(config, batch, max_length) -> bytes of the decode state

Axis letters used in tensor names throughout (`x_BTD`, `q_BTNH`, `state_BHKV`), one meaning each:
    B batch           T time (sequence)      S key/source time     D model width (hidden_size)
    V vocabulary, or the GDN value head dim in GDN code           N attention (query) heads
    G key/value heads H head dim (attention) or GDN value heads (in GDN code)
    J GDN key heads   K GDN key head dim     R rotary dims         I FFN width
    E experts         k top-k                C chunk length        L layers
    A tokens of a batch flattened (B*T)      M routed rows (A*k) or other flattened rows
    W conv width      P patches              F patch features      Z devices on a mesh axis
    Y buffer slots per device pair (MoE dispatch)                 Q blocks or chunks (count)
    X any leading axes (kernels)
Kernel-local letters, stated in their files: ops/delta_rule.py lays its chunk scan out as
[G segments, S chunks], ops/attention.py names block rows M (query) and K (key), vision.py the
tower width W and the position table S.
"""

from qwen35_jax.config import (
    ConfigError,
    Qwen35Config,
    TextConfig,
    VisionConfig,
)
from qwen35_jax.convert.hf import CheckpointError, load_hf
from qwen35_jax.decode_state import decode_state_bytes
from qwen35_jax.generate import GenerateOutput, generate
from qwen35_jax.hf_config import from_hf as config_from_hf
from qwen35_jax.hf_config import to_hf as config_to_hf
from qwen35_jax.model import (
    ModelOutput,
    Routing,
    abstract_params,
    apply,
    forward,
    init_params,
    lm_head_weights,
)
from qwen35_jax.positions import rope_index
from qwen35_jax.presets import PRESETS, get_config
from qwen35_jax.processor import expand_placeholders, process_images, process_videos
from qwen35_jax.runtime import Runtime

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "GenerateOutput",
    "ModelOutput",
    "Qwen35Config",
    "Routing",
    "Runtime",
    "TextConfig",
    "VisionConfig",
    "abstract_params",
    "apply",
    "decode_state_bytes",
    "config_from_hf",
    "config_to_hf",
    "expand_placeholders",
    "forward",
    "generate",
    "get_config",
    "init_params",
    "lm_head_weights",
    "load_hf",
    "process_images",
    "process_videos",
    "rope_index",
]
