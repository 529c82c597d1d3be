"""Export a `train.main` checkpoint to a Hugging Face directory (`orbax-to-hf --ckpt WORKDIR`).

    python -m qwen35_jax.convert orbax-to-hf --ckpt WORKDIR[/checkpoints/STEP] --out DIR \
        [--dtype bfloat16|float32]

Input: a run's workdir (its newest complete step under `<workdir>/<checkpoint.dir>/`, as the
trainer would resume) or one step directory. The run's `config.json` (written by the trainer
beside `checkpoints/`) gives the model (`model`), the checkpoint directory and the tokenizer.

Output, written into `<out>.tmp-XXXX` and renamed when complete:

    config.json          `config_to_hf(config)` of the run's model, with `dtype` and the eos id
    model-*.safetensors  the parameters `params/...` of the TrainState (the optimizer moments
                         are not read), split into the Hugging Face tensors (`hf_names.hf_rules`;
                         experts fused as transformers writes them; `model.language_model.` and
                         `model.visual.` prefixes for a vision model), shards of at most
                         `--max_shard_bytes`; dtype: the stored one (float32) or `--dtype`
    tokenizer            a Hugging Face tokenizer (`init.from_hf` or `data.tokenizer="hf"`):
                         its tokenizer.json and side files; a sentencepiece model (trained into
                         `<workdir>/tokenizer/spm.model` or `data.tokenizer_path`): the model
                         file as `tokenizer.model` and TOKENIZER.md saying how to load it

Streaming: each leaf of the trainer's OCDBT checkpoint is opened with tensorstore and read one
stacked entry (layer, expert) at a time, as `orbax_to_hf` does for converted checkpoints: host
memory is about one output shard plus one stored chunk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np

from qwen35_jax.config import ConfigError, Qwen35Config
from qwen35_jax.convert.hf import CheckpointError
from qwen35_jax.convert.hf_names import hf_rules
from qwen35_jax.convert.orbax_io import Progress, write_hf_shards
from qwen35_jax.convert.orbax_layout import (
    SIDE_FILES,
    Path,
    atomic_dir,
    finish,
    leaf_shapes,
)
from qwen35_jax.hf_config import to_hf as config_to_hf

_NOTE = """# Tokenizer of this checkpoint

The run that trained these weights used a sentencepiece model: `tokenizer.model` here.
Documents were encoded without special tokens, each followed by the eos piece (id {eos}); the
model's vocabulary has {vocab} rows, the tokenizer {pieces} pieces.

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file="tokenizer.model")
    ids = sp.encode("def ")            # no bos; append {eos} to end a document

transformers' `AutoTokenizer` cannot read it without a tokenizer class in tokenizer_config.json;
load it as above and pass the ids to the model.
"""


def find_step(path: str) -> tuple[str, str]:
    """(workdir, step directory) of a trainer checkpoint: `path` is a workdir (its newest
    complete step) or a step directory `<workdir>/<checkpoint.dir>/<step>`."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(os.path.dirname(path)), path
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise CheckpointError(
            f"--ckpt {path}: neither a converted checkpoint (convert.json), a train.main workdir "
            "(config.json) nor a step directory (state/)"
        )
    ckpt_dir = os.path.join(path, _run_config(path).get("checkpoint", {}).get("dir", "checkpoints"))
    steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
    complete = [s for s in steps if os.path.isdir(os.path.join(ckpt_dir, str(s), "state"))]
    if not complete:
        raise CheckpointError(f"--ckpt {path}: no complete checkpoint step in {ckpt_dir}")
    return path, os.path.join(ckpt_dir, str(max(complete)))


def _run_config(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing (the run's config, written by train.main)"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise CheckpointError(f"{path}: no 'model' section: not a train.main config.json")
    return d


def run_model(run: dict[str, Any], path: str) -> Qwen35Config:
    """The run's Qwen35Config from its config.json `model` section (fields this version does
    not know, e.g. runtime settings moved elsewhere, are ignored)."""
    known = {f.name for f in dataclasses.fields(Qwen35Config)}
    model = {k: v for k, v in run["model"].items() if k in known}
    try:
        return Qwen35Config.from_dict(model)
    except ConfigError as e:
        raise CheckpointError(f"{path}: model: {e}") from None


def _open_leaf(state_dir: str):
    import tensorstore as ts  # noqa: PLC0415

    def open_leaf(path: Path) -> Any:
        spec = {
            "driver": "zarr",
            "kvstore": {
                "driver": "ocdbt",
                "base": f"file://{state_dir}",
                "path": "params." + ".".join(path) + "/",
            },
        }
        try:
            return ts.open(spec, open=True, read=True).result()
        except ValueError as e:
            raise CheckpointError(
                f"{state_dir}: leaf params/{'/'.join(path)} unreadable: {str(e).splitlines()[0]}"
            ) from None

    return open_leaf


def _tokenizer_files(run: dict[str, Any], workdir: str, tmp: str, config: Qwen35Config) -> None:
    """Copies the run's tokenizer into `tmp` (see the module docstring)."""
    data, init = run.get("data", {}), run.get("init", {})
    kind, path = data.get("tokenizer"), data.get("tokenizer_path") or ""
    if data.get("kind") == "digits":
        return  # a built-in word list (train/data/tokenizers.WordTokenizer), no file
    hf_dir = None
    if path and kind == "hf":
        hf_dir = path if os.path.isdir(path) else os.path.dirname(path)
        tok_json = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    elif not path and init.get("from_hf"):
        hf_dir = init["from_hf"]
        tok_json = os.path.join(hf_dir, "tokenizer.json")
    if hf_dir is not None:
        if not os.path.isfile(tok_json):
            raise CheckpointError(f"{tok_json}: the run's tokenizer is missing")
        shutil.copy(tok_json, os.path.join(tmp, "tokenizer.json"))
        for name in SIDE_FILES[1:]:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy(os.path.join(hf_dir, name), os.path.join(tmp, name))
        return
    spm_path = path or os.path.join(workdir, "tokenizer", "spm.model")
    if not os.path.isfile(spm_path):
        raise CheckpointError(f"{spm_path}: the run's sentencepiece tokenizer is missing")
    shutil.copy(spm_path, os.path.join(tmp, "tokenizer.model"))
    import sentencepiece as spm  # noqa: PLC0415

    sp = spm.SentencePieceProcessor(model_file=spm_path)
    note = _NOTE.format(
        eos=sp.eos_id(), vocab=config.text_config.vocab_size, pieces=sp.get_piece_size()
    )
    with open(os.path.join(tmp, "TOKENIZER.md"), "w") as f:
        f.write(note)


def _eos_id(tmp: str) -> int | None:
    if os.path.isfile(os.path.join(tmp, "tokenizer.model")):
        import sentencepiece as spm  # noqa: PLC0415

        return int(
            spm.SentencePieceProcessor(model_file=os.path.join(tmp, "tokenizer.model")).eos_id()
        )
    return None


def export(ckpt: str, out: str, max_shard_bytes: int, progress: bool, dtype: str | None) -> str:
    """Writes the Hugging Face directory `out` from a train.main checkpoint (module docstring)."""
    workdir, step_dir = find_step(ckpt)
    run = _run_config(workdir)
    config = run_model(run, os.path.join(workdir, "config.json"))
    state_dir = os.path.join(step_dir, "state")
    if not os.path.isfile(os.path.join(state_dir, "_METADATA")):
        raise CheckpointError(f"{state_dir}: incomplete checkpoint (no _METADATA)")
    with open(os.path.join(state_dir, "_METADATA")) as f:
        tree = json.load(f)["tree_metadata"]
    stored = {tuple(str(k["key"]) for k in v["key_metadata"]) for v in tree.values()}
    missing = sorted("/".join(p) for p in leaf_shapes(config) if ("params", *p) not in stored)
    if missing:
        raise CheckpointError(
            f"{state_dir}: the run's config.json model does not match the checkpoint; missing "
            f"params {missing[:5]}"
        )
    vision = config.vision_config is not None
    rule_list = hf_rules(
        config,
        multimodal_prefix=vision,
        fused_experts=True,
        vision_prefix="model.visual." if vision else None,
    )
    cast = np.dtype(dtype) if dtype else None
    total = sum(int(np.prod(r.shape)) * (cast or np.dtype("f4")).itemsize for r in rule_list)
    bar = Progress("orbax-to-hf", len(rule_list), total) if progress else None
    tmp = atomic_dir(out)
    try:
        out_dtype: list[str] = []

        def dtype_of(key: str, joined: np.ndarray) -> np.dtype:
            d = cast or joined.dtype
            out_dtype.append(str(d))
            return d

        write_hf_shards(tmp, rule_list, _open_leaf(state_dir), dtype_of, max_shard_bytes, bar)
        _tokenizer_files(run, workdir, tmp, config)
        hf = config_to_hf(config)
        hf["dtype"] = "bfloat16" if "bfloat16" in out_dtype else "float32"
        eos = _eos_id(tmp)
        if eos is not None:
            hf["eos_token_id"] = eos
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(out)
