"""Multimodal pretraining on real images: scikit-learn's handwritten digits, captioned (CPU).

    pip install -e '.[digits]'
    python -m train.main --config=configs/digits.py --workdir=/tmp/digits

Each document is one 8x8 digit image upscaled to 32x32 followed by its caption "digit 7" (word
tokenizer; `--config.data.images_per_doc=3` interleaves three images with their captions). The
images become 16 patches of 8x8 px (4 merged tokens) for a 2-layer vision tower feeding a tiny
dense hybrid text model (1 Gated DeltaNet + 1 gated-attention layer). Rows of 64 tokens hold up
to 7 documents with a fixed budget of 112 patches and 7 grids per row (zero padded); the loss is
on text tokens only. The run ends by captioning 200 held-out digits: the prompt is the image and
"digit", the greedy next token must be the label (chance 10%).
"""

from train.config_schema import base_config


def get_config():
    c = base_config("tiny-vl", keep_vision=True)
    t = c.model.text_config
    t.vocab_size = c.data.get_ref("vocab_size")
    t.hidden_size = 64
    t.intermediate_size = 128
    t.num_hidden_layers = 2
    t.full_attention_interval = 2
    t.num_attention_heads = 4
    t.num_key_value_heads = 2
    t.head_dim = 16
    t.linear_num_key_heads = 2
    t.linear_num_value_heads = 4
    t.linear_key_head_dim = 16
    t.linear_value_head_dim = 16
    t.mtp_num_hidden_layers = 0
    # the word tokenizer has 14 ids (<pad> <eos> <unk> digit 0..9); vision ids on top
    c.model.vision_start_token_id = 28
    c.model.vision_end_token_id = 29
    c.model.image_token_id = 30
    c.model.video_token_id = 31
    v = c.model.vision_config
    v.depth = 2
    v.hidden_size = 64
    v.intermediate_size = 128
    v.num_heads = 2
    v.out_hidden_size = 64
    v.patch_size = 8
    v.temporal_patch_size = 2
    v.spatial_merge_size = 2
    v.num_position_embeddings = 16
    c.runtime.gdn_chunk_size = 32

    c.train.steps = 300
    c.train.batch_size = 8
    c.train.seq_len = 64
    c.train.log_every = 25
    c.train.mtp_lambda = 0.0
    c.train.prompts = ()
    c.train.completion_tokens = 0
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.mesh.fsdp = 1
    c.mesh.data = -1
    c.data.kind = "digits"
    c.data.vocab_size = 32
    c.data.image_size = 32
    c.data.images_per_doc = 1
    c.data.patches_per_row = 112
    c.data.images_per_row = 7
    c.data.eval_examples = 200
    return c
