"""The training config: keys, defaults and validation (one ml_collections ConfigDict).

`base_config` holds every key with its default, documented where it is set; the files in
configs/ start from it and override (configs/common.py holds the shared pod recipe). Sections:
train, checkpoint, mesh, optimizer, data, model (the architecture: a preset's
`Qwen35Config.to_dict()`, Hugging Face field names), runtime (`qwen35_jax.Runtime`: how the model
runs), init.

`validate` turns every bad value into a `ConfigValueError` naming the dotted key, before any
compute; `main.py` reports it as a usage error. The mesh rules (axes, sizes against the devices
present, the batch axes) are those of `qwen35_jax.mesh` and `qwen35_jax.sharding`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections
from ml_collections import config_dict

import qwen35_jax
from qwen35_jax import sharding
from qwen35_jax.mesh import MESH_AXES, mesh_sizes

NAN_POLICIES = ("skip", "stop")
SCHEDULES = ("cosine", "wsd")
MULTIMODAL_KINDS = ("digits", "image_jsonl")
DATA_KINDS = ("stdlib", "text", "jsonl", "arrayrecord", "parquet", *MULTIMODAL_KINDS)
TOKENIZERS = ("sentencepiece", "hf")
_OPTIONAL_INTS = ("pad_token_id", "bos_token_id", "eos_token_id")


class ConfigValueError(ValueError):
    """A config value that cannot run; the message starts with the dotted key."""


def model_section(
    model: str | qwen35_jax.Qwen35Config, *, keep_vision: bool = False
) -> ml_collections.ConfigDict:
    """`config.model`: a preset (name or config) as a ConfigDict of its `to_dict()` form.

    Lists become tuples and optional token ids typed placeholders, so every field can be
    overridden from the command line. The vision tower is dropped (text pretraining) unless
    `keep_vision` (multimodal data).
    """
    cfg = qwen35_jax.get_config(model) if isinstance(model, str) else model
    d = (cfg if keep_vision else cfg.replace(vision_config=None)).to_dict()

    def convert(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        return tuple(x) if isinstance(x, list) else x

    d = convert(d)
    section = ml_collections.ConfigDict(d)
    for name in _OPTIONAL_INTS:
        if d["text_config"][name] is None:
            section.text_config[name] = config_dict.placeholder(int)
    return section


def base_config(model: str = "tiny-moe", *, keep_vision: bool = False) -> ml_collections.ConfigDict:
    """Every key with its default; the files in configs/ start from this and override."""
    c = ml_collections.ConfigDict()
    c.train = dict(
        steps=100,
        batch_size=8,  # global rows per step
        seq_len=256,
        grad_accum=1,  # micro-batches per step
        log_every=10,
        seed=0,
        # "skip": a non-finite step leaves the state unchanged and is counted; "stop": the run
        # also stops, without saving
        nan_policy="skip",
        # "skip": this many skipped steps in a row mean the run diverged: it stops (exit 1)
        # naming the first bad step; nothing is saved while steps are being skipped
        max_skips_in_a_row=10,
        mtp_lambda=0.3,  # weight of the MTP loss
        z_loss=0.0,  # coefficient of mean logsumexp^2
        peak_tflops_per_device=0.0,  # MFU denominator; 0 = from the device kind (CPU: measured)
        prompts=("def ", "import "),  # greedy completions printed at the end of the run
        completion_tokens=32,  # 0 = no completions
        # stop after this many steps of this invocation, with a checkpoint (as a job with a time
        # limit would); 0 = no limit
        run_steps=0,
        # > 0: the heads' cross-entropies over chunks of that many positions per row, never
        # holding the [B, T, vocab] logits; 0 = whole logits
        loss_chunk=0,
        # held-out evaluation (train/evaluation.py, on data.eval_path or data.eval_fraction;
        # digits: their own held-out images): every eval_every steps (0 = only once, at the end
        # of the run; digits: none) over eval_batches fixed batches of batch_size rows
        eval_every=0,
        eval_batches=4,
    )
    # dir is relative to the workdir
    c.checkpoint = dict(every_steps=100, keep=3, dir="checkpoints", async_save=True)
    # sizes of the mesh axes (qwen35_jax.mesh); one may be -1 (the remaining devices).
    # dcn_<axis>: the same axis across slices / nodes (the mesh axis is then dcn_x * x)
    c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1, sequence=1)
    c.mesh.update({f"dcn_{a}": 1 for a in MESH_AXES})
    c.optimizer = dict(
        lr=3e-4,
        schedule="cosine",  # or "wsd" (warmup, stable, decay)
        warmup_steps=100,
        decay_fraction=0.2,  # WSD: the final fraction of steps that decays
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        clip_norm=1.0,  # 0 = off
    )
    c.data = dict(
        # "stdlib" (the embedded corpus) | "text" | "jsonl" | "arrayrecord" | "digits" (scikit-
        # learn's handwritten digits, captioned "digit 7"; needs the `digits` extra; its word
        # tokenizer is built in) | "image_jsonl" (JSON-lines image-text documents at `path`, see
        # train/data/image_text.py) | "parquet" (column `text_key` of Parquet files; the
        # `parquet` extra: pyarrow)
        kind="stdlib",
        path="",  # comma-separated globs (mounted paths, not URLs)
        record_format="text",  # ArrayRecord records: "text" | "json"
        text_key="text",  # the text field of JSON records, the text column of Parquet files
        max_bytes=3_000_000,  # the stdlib corpus cap
        tokenizer="sentencepiece",  # or "hf" (a tokenizer.json)
        # "" = train a sentencepiece model of vocab_size pieces into the workdir
        tokenizer_path="",
        vocab_size=1024,
        read_threads=1,
        # virtual data shards, each feeding batch_size / num_shards rows: a fixed number, so the
        # batches do not depend on the process count and a checkpoint resumes on another
        # topology (train/data/iterator.py); a process builds the shards behind its rows, so on
        # many hosts make it a multiple of the host count (each host then reads only its rows)
        num_shards=1,
        # multimodal kinds: the fixed patch budget of a row (P_row), grid rows per row (G_row)
        patches_per_row=0,
        images_per_row=0,
        image_size=32,  # digits: upscaled to image_size x image_size
        images_per_doc=1,  # digits: 1 = image-caption pairs; k = k images with their captions
        eval_examples=0,  # digits: held-out images captioned at the end (accuracy); 0 = none
        # held-out evaluation data: eval_path, comma-separated globs of the same kind as `path`;
        # or eval_fraction, the share of documents held out of `path` by a hash of their bytes
        # (train/data/split.py: never trained on, whatever the topology); not for digits
        eval_path="",
        eval_fraction=0.0,
        # several sources sampled in proportion: "KIND:PATH:WEIGHT;..." (e.g.
        # "stdlib::3;jsonl:/data/*.jsonl:1"), replacing kind/path (train/data/mixture.py)
        mixture="",
    )
    # the architecture: a preset's Qwen35Config.to_dict() (Hugging Face names, e.g.
    # model.text_config.num_hidden_layers, ...full_attention_interval, ...num_experts); text-only
    # unless keep_vision (multimodal kinds)
    c.model = model_section(model, keep_vision=keep_vision)
    # how the model runs: qwen35_jax.Runtime's fields (compute_dtype, param_dtype, remat_policy,
    # gdn_chunk_size, moe_dispatch, moe_capacity_factor, attention_blocked_min_length,
    # attention_block_q, attention_block_k; documented in qwen35_jax/runtime.py). The former
    # model.<field> keys are refused, naming the new key. Never replaced by init.*
    c.runtime = qwen35_jax.Runtime().to_dict()
    c.init = dict(
        # a Hugging Face checkpoint dir: its weights and config.json replace `model`; its
        # tokenizer.json is used unless data.tokenizer_path is set; fresh optimizer and step
        from_hf=config_dict.placeholder(str),
        # a converted checkpoint (`hf-to-orbax` output), or one of our orbax checkpoints (a step
        # dir or a checkpoint dir: its latest step); params only
        from_checkpoint=config_dict.placeholder(str),
    )
    return c


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigValueError(f"{key}={value!r} {expected}")


def _choice(c: ml_collections.ConfigDict, key: str, choices: tuple[str, ...]) -> None:
    value = get_key(c, key)
    if value not in choices:
        _fail(key, value, f"must be one of {choices}")


def _positive(c: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = get_key(c, key)
        if not (value >= 0 if allow_zero else value > 0):
            _fail(key, value, "must be >= 0" if allow_zero else "must be > 0")


def get_key(c: ml_collections.ConfigDict, key: str) -> Any:
    """The value of a dotted key, e.g. get_key(config, "data.num_shards")."""
    for part in key.split("."):
        c = c[part]
    return c


RUNTIME_KEYS = tuple(qwen35_jax.Runtime().to_dict())


def moved_key(path: str) -> str | None:
    """For a dotted key that moved (`model.remat_policy`), the message naming its new key."""
    section, _, name = path.partition(".")
    if section == "model" and name in RUNTIME_KEYS:
        return f"{path} moved to runtime.{name}"
    return None


def model_config(config: ml_collections.ConfigDict) -> qwen35_jax.Qwen35Config:
    """`config.model` as a validated Qwen35Config (ConfigValueError naming `model.<key>`)."""
    for name in config.model:
        if moved_key(f"model.{name}"):
            raise ConfigValueError(moved_key(f"model.{name}"))
    try:
        return qwen35_jax.Qwen35Config.from_dict(config.model.to_dict())
    except qwen35_jax.ConfigError as e:
        raise ConfigValueError(f"model.{e}") from None


def runtime_config(config: ml_collections.ConfigDict) -> qwen35_jax.Runtime:
    """`config.runtime` as a validated Runtime (ConfigValueError naming `runtime.<key>`)."""
    try:
        return qwen35_jax.Runtime.from_dict(config.runtime.to_dict())
    except qwen35_jax.ConfigError as e:
        raise ConfigValueError(str(e)) from None


def validate(config: ml_collections.ConfigDict) -> qwen35_jax.Qwen35Config:
    """Checks every section (no compute, no files read); returns the model config."""
    t = config.train
    _positive(
        config,
        "train.steps",
        "train.batch_size",
        "train.seq_len",
        "train.grad_accum",
        "train.log_every",
        "train.eval_batches",
        "train.max_skips_in_a_row",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "optimizer.lr",
        "data.vocab_size",
        "data.read_threads",
        "data.num_shards",
    )
    _positive(
        config,
        "train.mtp_lambda",
        "train.z_loss",
        "train.peak_tflops_per_device",
        "train.completion_tokens",
        "train.seed",
        "train.run_steps",
        "train.loss_chunk",
        "train.eval_every",
        "optimizer.warmup_steps",
        "optimizer.weight_decay",
        "optimizer.clip_norm",
        "optimizer.eps",
        "optimizer.min_lr_ratio",
        "data.max_bytes",
        "data.eval_examples",
        allow_zero=True,
    )
    if t.batch_size % config.data.num_shards:
        _fail(
            "data.num_shards",
            config.data.num_shards,
            f"must divide train.batch_size={t.batch_size}",
        )
    if t.batch_size % t.grad_accum:
        _fail(
            "train.batch_size",
            t.batch_size,
            f"must be divisible by train.grad_accum={t.grad_accum}",
        )
    _choice(config, "train.nan_policy", NAN_POLICIES)
    _choice(config, "optimizer.schedule", SCHEDULES)
    _choice(config, "data.kind", DATA_KINDS)
    _choice(config, "data.tokenizer", TOKENIZERS)
    _choice(config, "data.record_format", ("text", "json"))
    for key in ("optimizer.b1", "optimizer.b2"):
        if not 0.0 <= get_key(config, key) < 1.0:
            _fail(key, get_key(config, key), "must be in [0, 1)")
    for key in ("optimizer.decay_fraction", "optimizer.min_lr_ratio"):
        if not 0.0 <= get_key(config, key) <= 1.0:
            _fail(key, get_key(config, key), "must be in [0, 1]")
    sizes = [config.mesh[a] for a in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes, strict=True):
        if size == 0 or size < -1:
            _fail(f"mesh.{axis}", size, "must be a positive size or -1 (the remaining devices)")
    for axis in MESH_AXES:
        if config.mesh[f"dcn_{axis}"] < 1:
            _fail(f"mesh.dcn_{axis}", config.mesh[f"dcn_{axis}"], "must be >= 1")
    if sizes.count(-1) > 1:
        _fail("mesh", dict(zip(MESH_AXES, sizes, strict=True)), "may have at most one -1 axis")
    if config.data.kind in MULTIMODAL_KINDS:
        _multimodal_checks(config)
    if config.data.kind not in ("stdlib", "digits") and not config.data.path:
        _fail("data.path", config.data.path, f"must be set for data.kind={config.data.kind!r}")
    if "://" in config.data.path:
        _fail(
            "data.path",
            config.data.path,
            "must be a local or mounted path: URLs are not read (mount a bucket with gcsfuse, "
            "e.g. /gcs/BUCKET/data/*.array_record)",
        )
    if config.data.tokenizer == "hf" and not config.data.tokenizer_path and not config.init.from_hf:
        _fail("data.tokenizer_path", "", "must be set for data.tokenizer='hf'")
    if config.init.from_hf and config.init.from_checkpoint:
        _fail(
            "init.from_checkpoint",
            config.init.from_checkpoint,
            "cannot be combined with init.from_hf",
        )
    _eval_checks(config)
    if config.data.mixture:
        _mixture_checks(config)
    runtime = runtime_config(config)
    model = model_config(config)
    check_seq_len_has_targets(config, model)
    parallel_split_check(config, model, runtime)
    return model


def _mixture_checks(config: ml_collections.ConfigDict) -> None:
    from train.data.mixture import parse_mixture  # noqa: PLC0415 - data imports this module

    if config.data.kind in MULTIMODAL_KINDS:
        _fail("data.mixture", config.data.mixture, "is for text kinds (data.kind is multimodal)")
    if "://" in config.data.mixture:
        _fail("data.mixture", config.data.mixture, "must hold local or mounted paths")
    try:
        parse_mixture(config.data.mixture)
    except ValueError as e:
        _fail("data.mixture", config.data.mixture, str(e))


def _eval_checks(config: ml_collections.ConfigDict) -> None:
    """Held-out evaluation: one source of evaluation data (digits: their own), a fraction in
    [0, 1)."""
    d = config.data
    if not 0.0 <= d.eval_fraction < 1.0:
        _fail("data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
    if d.eval_fraction and d.eval_path:
        _fail("data.eval_fraction", d.eval_fraction, "cannot be combined with data.eval_path")
    wanted = d.eval_fraction or d.eval_path
    if wanted and d.kind == "digits":
        key = "data.eval_path" if d.eval_path else "data.eval_fraction"
        _fail(
            key,
            get_key(config, key),
            "is not for data.kind='digits' (its held-out images are built in: set "
            "train.eval_every)",
        )
    if config.train.eval_every and not wanted and d.kind != "digits":
        _fail(
            "train.eval_every",
            config.train.eval_every,
            "needs evaluation data: set data.eval_path or data.eval_fraction",
        )
    if "://" in d.eval_path:
        _fail("data.eval_path", d.eval_path, "must be a local or mounted path")


def check_seq_len_has_targets(
    config: ml_collections.ConfigDict, model: qwen35_jax.Qwen35Config
) -> None:
    """train.seq_len must leave a target for every head in use: the next token (offset 1) and,
    with an MTP head (model.text_config.mtp_num_hidden_layers > 0, train.mtp_lambda > 0), the
    token after it (offset 2): seq_len >= 2, or >= 3 with MTP."""
    with_mtp = model.text_config.mtp_num_hidden_layers > 0 and config.train.mtp_lambda > 0
    need = 3 if with_mtp else 2
    if config.train.seq_len < need:
        heads = "next-token and MTP (token after next)" if with_mtp else "next-token"
        _fail(
            "train.seq_len",
            config.train.seq_len,
            f"leaves no targets for the {heads} head{'s' * with_mtp}: must be >= {need}"
            + (" (or set train.mtp_lambda=0)" if with_mtp else ""),
        )


def parallel_split_check(
    config: ml_collections.ConfigDict,
    model: qwen35_jax.Qwen35Config,
    runtime: qwen35_jax.Runtime,
) -> None:
    """Refuses shapes that the parallel layers cannot split (they would run replicated):
    train.seq_len over mesh.sequence (Gated DeltaNet slices of >= conv width - 1 tokens) and
    model.text_config.num_experts over mesh.expert (expert-parallel MoE). Axes given as -1 are
    checked by the layers once the device count is known."""
    seq = config.mesh.sequence * config.mesh.dcn_sequence
    if config.mesh.sequence > 0 and seq > 1:
        t, halo = config.train.seq_len, model.text_config.linear_conv_kernel_dim - 1
        if t % seq or t // seq < halo:
            _fail(
                "train.seq_len",
                t,
                f"must split over mesh.sequence={seq} (x dcn_sequence) into equal slices of at "
                f"least {halo} tokens (the Gated DeltaNet conv halo)",
            )
    experts = config.mesh.expert * config.mesh.dcn_expert
    e = model.text_config.num_experts
    expert_parallel = config.mesh.expert > 0 and runtime.moe_dispatch != "local"
    if expert_parallel and experts > 1 and e and e % experts:
        _fail(
            "model.text_config.num_experts",
            e,
            f"must be divisible by mesh.expert={experts} (x dcn_expert) for "
            f"runtime.moe_dispatch={runtime.moe_dispatch!r} (expert-parallel MoE)",
        )


def _multimodal_checks(config: ml_collections.ConfigDict) -> None:
    """Multimodal data needs the budgets, a vision tower and special ids inside the vocabulary."""
    _positive(
        config,
        "data.patches_per_row",
        "data.images_per_row",
        "data.image_size",
        "data.images_per_doc",
    )
    m = config.model
    if m.get("vision_config") is None:
        _fail(
            "model.vision_config",
            None,
            f"must be set for data.kind={config.data.kind!r} (base_config(..., keep_vision=True))",
        )
    vocab = m.text_config.vocab_size
    for name in (
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
    ):
        if not 0 <= m[name] < vocab:
            _fail(f"model.{name}", m[name], f"must be below model.text_config.vocab_size={vocab}")


def mesh_devices_check(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The mesh must cover `num_devices` and the micro-batch must split over the batch axes."""
    ici = {a: config.mesh[a] for a in MESH_AXES}
    dcn = {a: config.mesh[f"dcn_{a}"] for a in MESH_AXES}
    try:
        sizes = mesh_sizes(ici, dcn, num_devices)
    except ValueError:
        shown = {**ici, **{f"dcn_{a}": n for a, n in dcn.items() if n != 1}}
        _fail("mesh", shown, f"does not fit the {num_devices} devices present")
    axes = sharding.mesh_axes_of("batch")
    batch_ways = math.prod(sizes[a] for a in axes)
    micro = config.train.batch_size // config.train.grad_accum
    if micro % batch_ways:
        _fail(
            "train.batch_size",
            config.train.batch_size,
            f"/ train.grad_accum={config.train.grad_accum} must be divisible by the "
            f"{batch_ways} batch shards (mesh {'*'.join(axes)})",
        )


def resolved_json(config: ml_collections.ConfigDict, model: qwen35_jax.Qwen35Config) -> str:
    """The config as run (JSON), with `model` the model actually built (e.g. from init.from_hf)."""
    d = config.to_dict()
    d["model"] = model.to_dict()
    return json.dumps(d, indent=2, sort_keys=True, default=str)
