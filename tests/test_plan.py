"""The memory planner's terms against what the TPU compiler was seen to do (bench/RESULTS.md)."""

import qwen35_jax as q
from launch import plan as planner
from qwen35_jax.layers import decoder


def test_dense_saved_activations_split_over_tensor_model_width_included():
    """The TPU compiler keeps every saved residual of a dense layer split over `tensor`, the
    model-width ones (layer inputs, out_proj outputs) too: the 27b recipe (fsdp 64 x tensor 4)
    saves [.., 4096, 1280] of D = 5120. The per-sequence part of each source is 1/tensor of
    its tensor=1 size."""
    c = q.get_config("tiny").text_config
    rt = q.Runtime(remat_policy="dots_no_batch", compute_dtype="bfloat16")

    def saved(tensor):
        args = (4, 256, tensor, rt.gdn_chunk_size, rt.dtype, rt.weights_dtype, 1)
        return planner.layer_activation_bytes(c, decoder.LINEAR, rt.remat_policy, *args)

    (whole, by_src), (split, by_src4) = saved(1), saved(4)
    assert by_src["layer inputs"] == 4 * 256 * c.hidden_size * 2  # bf16 [4, 256, D]
    assert by_src4["layer inputs"] == by_src["layer inputs"] / 4
    assert split == whole / 4  # no weight-sized (per-layer constant) residual in this layer
