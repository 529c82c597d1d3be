"""Pretraining for the Qwen3.5 family: the `python -m train.main` entry point and its parts.

main.py            absl entry point: flags, config validation, then `loop.run`
config_schema.py   the training config (sections, defaults) and its validation
prepare.py         corpus, tokenizer and unigram-entropy preparation in the workdir
data/              grain input pipeline: sources, tokenizers, packing, iterator state
state.py           TrainState, built abstractly (eval_shape) with mesh shardings
step.py            the jitted train step (grad accumulation, NaN/Inf guard)
losses.py          masked next-token CE, z-loss, MTP CE (token t+2)
optimizer.py       AdamW with decay mask, schedules (cosine, WSD), clipping
checkpointing.py   orbax async checkpoints, resume, incomplete checkpoints, SIGTERM
metrics.py         console line, metrics.jsonl, TensorBoard (tensorboard.py: tensorboardX)
evaluation.py      held-out evaluation: fixed batches, one jitted loss pass, no gradient
compare.py         `python -m train.compare`: table and loss curves of several runs
flops.py           analytic training FLOPs per token for MFU
sampling.py        greedy completions for the end of a run
tokenizer.py       `python -m train.tokenizer`: train a sentencepiece model
loop.py            the training loop that ties these together
"""
