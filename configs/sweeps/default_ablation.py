"""The embedded ablation demo: MTP head on/off x full attention every 2nd/4th layer, on the
embedded default (configs/default.py), 150 steps of 8 x 64 tokens each with held-out evaluation
(10% of the stdlib files by hash, 8 batches of 8 x 64 tokens), then the comparison table and
plot; about 6 min of CPU time in all (346 s measured: 2.9 min of the 2 cores; README):

    python -m launch.sweep --sweep_file=configs/sweeps/default_ablation.py --workdir=/tmp/ablation
    python -m train.compare /tmp/ablation
    tensorboard --logdir /tmp/ablation          # the four runs side by side, by name

A sweep file holds launch.sweep's flags as constants: CONFIG (the config file), SWEEP (the
`--sweep KEY=V1,V2` axes), ZIP (zip the axes instead of their product) and FLAGS (train.main
flags for every run).
"""

CONFIG = "configs/default.py"
SWEEP = [
    "model.text_config.mtp_num_hidden_layers=0,1",
    "model.text_config.full_attention_interval=2,4",
]
ZIP = False
FLAGS = [
    "--config.train.steps=150",
    "--config.train.log_every=25",
    "--config.train.eval_every=50",
    "--config.train.eval_batches=8",
    "--config.data.eval_fraction=0.1",
    "--config.train.seq_len=64",
    "--config.data.max_bytes=1000000",
    "--config.optimizer.warmup_steps=15",
    "--config.checkpoint.every_steps=150",
    "--config.train.completion_tokens=0",
]
