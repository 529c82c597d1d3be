"""Image-text pretraining on your own JSON-lines documents: a tiny vision-language model (CPU).

    python -m train.main --config=configs/image_text.py --workdir=/tmp/image_text \
        --config.data.path='/data/captions/*.jsonl'

Each line of `data.path` is {"image": "img/1.png", "text": "a caption"} or {"parts": ["text",
{"image": "a.jpg"}, "more text", ...]} (paths relative to the JSONL file; any image Pillow reads;
train/data/image_text.py). A bad line or an unreadable image is skipped and counted. A
sentencepiece model of `data.vocab_size` pieces is trained on the texts into the workdir; the
model's vocabulary is those ids plus four vision ids on top (vision_start, vision_end, image,
video), so `--config.data.vocab_size=N` moves all of them. With your own tokenizer add
`--config.data.tokenizer=hf --config.data.tokenizer_path=DIR/tokenizer.json
--config.data.vocab_size=<its size>`. Images are resized to at most `data.patches_per_row`
patches of 8x8 px (256: 128x128 px) for a 2-layer vision tower feeding a 4-layer hybrid text
model (3 Gated DeltaNet + 1 gated attention); the loss is on text tokens only.
"""

from train.config_schema import base_config


def get_config():
    c = base_config("tiny-vl", keep_vision=True)
    vocab = c.data.get_ref("vocab_size")
    t = c.model.text_config
    t.vocab_size = vocab + 4
    t.hidden_size = 128
    t.intermediate_size = 384
    t.num_hidden_layers = 4
    t.full_attention_interval = 4
    t.num_attention_heads = 4
    t.num_key_value_heads = 2
    t.head_dim = 32
    t.linear_num_key_heads = 2
    t.linear_num_value_heads = 4
    t.linear_key_head_dim = 32
    t.linear_value_head_dim = 32
    t.mtp_num_hidden_layers = 0
    c.model.vision_start_token_id = vocab
    c.model.vision_end_token_id = vocab + 1
    c.model.image_token_id = vocab + 2
    c.model.video_token_id = vocab + 3
    v = c.model.vision_config
    v.depth = 2
    v.hidden_size = 64
    v.intermediate_size = 128
    v.num_heads = 2
    v.out_hidden_size = 128
    v.patch_size = 8
    v.temporal_patch_size = 2
    v.spatial_merge_size = 2
    v.num_position_embeddings = 256
    c.runtime.gdn_chunk_size = 32

    c.train.steps = 1000
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.log_every = 50
    c.train.mtp_lambda = 0.0
    c.train.prompts = ()
    c.train.completion_tokens = 0
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 2
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.05
    c.mesh.fsdp = 1
    c.mesh.data = -1
    c.data.kind = "image_jsonl"
    c.data.vocab_size = 1024
    c.data.patches_per_row = 256
    c.data.images_per_row = 4
    return c
