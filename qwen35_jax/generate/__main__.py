"""Command line: continue a prompt with a checkpoint, streaming the text.

    python -m qwen35_jax.generate --checkpoint DIR --prompt "..." [--image PATH ...] [--chat]
        [--max_new_tokens 128] [--temperature 0] [--top_k 0] [--top_p 1.0] [--seed 0]
        [--num_draft_tokens K]   (K >= 1: MTP speculative decoding; the text is printed at the
                                  end with the acceptance rate, not streamed)

DIR is one of
  * a Hugging Face checkpoint directory (config.json + *.safetensors; `load_hf`),
  * a converted checkpoint (`python -m qwen35_jax.convert hf-to-orbax` output: convert.json),
  * a training workdir (`python -m train.main`: its config.json, the latest checkpoint under
    its checkpoint dir, its tokenizer: `data.tokenizer_path`, the `init.from_hf` checkpoint's
    tokenizer.json, or the sentencepiece model in <workdir>/tokenizer/).
The checkpoint's tokenizer.json (HF, converted) tokenizes the prompt. `--chat` renders the
prompt as one user message with the chat template of tokenizer_config.json (jinja2, as
transformers does, generation prompt added). `--image` (repeatable) puts the images before the
prompt text (vision_start, placeholders expanded to the processed grid, vision_end).
Generation stops at the checkpoint's eos ids (config, tokenizer, generation_config.json).
Prints the text as it is generated, then the decode rate in tokens/s. Bad input (a missing or
unreadable checkpoint, a prompt longer than the context, an unreadable image) prints one
`error: ...` line naming it and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CliError(f"{path}: cannot read JSON ({e})") from None


def _workdir_tokenizer(workdir: str, cfg: dict):
    from train.data.tokenizers import load_tokenizer  # noqa: PLC0415 (workdirs only)

    data = cfg.get("data", {})
    if data.get("tokenizer_path"):
        return load_tokenizer(data.get("tokenizer", "sentencepiece"), data["tokenizer_path"])
    from_hf = cfg.get("init", {}).get("from_hf")
    if from_hf:
        return load_tokenizer("hf", from_hf)
    spm = os.path.join(workdir, "tokenizer", "spm.model")
    if not os.path.exists(spm):
        raise CliError(f"--checkpoint {workdir}: training workdir without a tokenizer ({spm})")
    return load_tokenizer("sentencepiece", spm)


def load_checkpoint(path: str):
    """(config, runtime, params, tokenizer, directory holding tokenizer_config.json or None)."""
    import jax  # noqa: PLC0415

    import qwen35_jax as q  # noqa: PLC0415
    from qwen35_jax.convert import orbax_io  # noqa: PLC0415
    from qwen35_jax.convert.orbax_layout import is_converted_checkpoint  # noqa: PLC0415

    if not os.path.isdir(path):
        raise CliError(f"--checkpoint {path}: no such directory")
    cfg_path = os.path.join(path, "config.json")
    if is_converted_checkpoint(path):
        config, params = orbax_io.restore_params(path)
        return config, q.Runtime(), params, _hf_tokenizer(path), path
    if not os.path.isfile(cfg_path):
        raise CliError(
            f"--checkpoint {path}: no config.json (expected a Hugging Face checkpoint, a "
            "converted checkpoint or a training workdir)"
        )
    cfg = _read_json(cfg_path)
    if "model" in cfg and "train" in cfg:  # a training workdir
        from train.init import params_from_training_checkpoint  # noqa: PLC0415

        config = q.Qwen35Config.from_dict(cfg["model"])
        runtime = q.Runtime.from_dict(cfg.get("runtime", {}))
        ckpt_dir = os.path.join(path, cfg.get("checkpoint", {}).get("dir", "checkpoints"))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(lambda: q.init_params(config, jax.random.key(0), runtime=runtime)),
        )
        try:
            params = params_from_training_checkpoint(ckpt_dir, abstract)
        except FileNotFoundError as e:
            raise CliError(f"--checkpoint {path}: {e}") from None
        return config, runtime, params, _workdir_tokenizer(path, cfg), None
    config, params = q.load_hf(path)
    return config, q.Runtime(), params, _hf_tokenizer(path), path


def _hf_tokenizer(path: str):
    from train.data.tokenizers import HFTokenizer  # noqa: PLC0415

    tok = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok):
        raise CliError(f"--checkpoint {path}: no tokenizer.json")
    try:
        return HFTokenizer(tok)
    except Exception as e:  # noqa: BLE001 (any parse failure is the file's fault)
        raise CliError(f"{tok}: cannot load the tokenizer ({e})") from None


def chat_prompt(tokenizer_dir: str | None, text: str, num_images: int) -> str:
    """The prompt rendered by the checkpoint's chat template (one user message)."""
    import jinja2  # noqa: PLC0415

    where = os.path.join(tokenizer_dir or "", "tokenizer_config.json")
    if tokenizer_dir is None or not os.path.isfile(where):
        raise CliError(f"--chat needs the checkpoint's tokenizer_config.json ({where} is missing)")
    tc = _read_json(where)
    template = tc.get("chat_template")
    if not template:
        raise CliError(f"--chat: {where} has no chat_template")
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]

    def raise_exception(message):
        raise CliError(f"--chat: the chat template refused the prompt: {message}")

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {k: tc.get(k) for k in ("bos_token", "eos_token")}
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in special.items()}
    return env.from_string(template).render(
        messages=[{"role": "user", "content": content if num_images else text}],
        add_generation_prompt=True,
        **special,
    )


def _load_image(path: str) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise CliError(f"--image {path}: cannot read the image ({e})") from None


def _pixel_options(checkpoint_dir: str | None) -> dict:
    """min/max pixels, mean and std from the checkpoint's preprocessor_config.json, if any."""
    path = os.path.join(checkpoint_dir or "", "preprocessor_config.json")
    if checkpoint_dir is None or not os.path.isfile(path):
        return {}
    pc = _read_json(path)
    size = pc.get("size") or {}
    opts = {
        "min_pixels": pc.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": pc.get("max_pixels", size.get("longest_edge")),
        "image_mean": pc.get("image_mean"),
        "image_std": pc.get("image_std"),
    }
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items() if v is not None}


def _stop_ids(config, tokenizer, tokenizer_dir: str | None) -> tuple[int, ...]:
    ids = {config.text_config.eos_token_id, getattr(tokenizer, "eos_id", None)}
    gen = os.path.join(tokenizer_dir or "", "generation_config.json")
    if tokenizer_dir and os.path.isfile(gen):
        eos = _read_json(gen).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(int(i) for i in ids if i is not None))


def run(args: argparse.Namespace) -> dict:
    """Generates for the parsed arguments; prints the text; returns a summary."""
    import jax  # noqa: PLC0415

    import qwen35_jax as q  # noqa: PLC0415

    if args.num_draft_tokens < 0:
        raise CliError(f"--num_draft_tokens {args.num_draft_tokens}: must be >= 0 (0 = plain)")
    config, runtime, params, tokenizer, tok_dir = load_checkpoint(args.checkpoint)
    if args.num_draft_tokens and not config.text_config.mtp_num_hidden_layers:
        raise CliError(
            f"--num_draft_tokens {args.num_draft_tokens}: the checkpoint {args.checkpoint} has "
            "no MTP head (mtp_num_hidden_layers=0); use 0"
        )
    images = [_load_image(p) for p in args.image]
    text = chat_prompt(tok_dir, args.prompt, len(images)) if args.chat else args.prompt
    vision = {}
    if images:
        if config.vision_config is None:
            raise CliError(f"--image: the checkpoint {args.checkpoint} has no vision tower")
        v = config.vision_config
        try:
            processed = q.process_images(
                images,
                patch_size=v.patch_size,
                temporal_patch_size=v.temporal_patch_size,
                merge_size=v.spatial_merge_size,
                **_pixel_options(tok_dir),
            )
        except ValueError as e:
            raise CliError(f"--image: {e}") from None
        vision = dict(
            pixel_values=processed["pixel_values"], image_grid_thw=processed["image_grid_thw"]
        )
    ids = tokenizer.encode(text)
    if images:
        marker = [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]
        if not args.chat:  # the chat template places the image markers itself
            ids = marker * len(images) + ids
        ids = q.expand_placeholders(
            ids,
            image_grid_thw=vision["image_grid_thw"],
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            merge_size=config.vision_config.spatial_merge_size,
        )
    if not ids:
        raise CliError("--prompt is empty after tokenization")
    stops = _stop_ids(config, tokenizer, tok_dir)
    seen: list[int] = []
    printed = [""]
    times: list[float] = []

    def stream(i, tokens_B, done_B):
        times.append(time.perf_counter())
        if bool(done_B[0]):
            return
        seen.append(int(tokens_B[0]))
        shown = tokenizer.decode([t for t in seen if t not in stops])
        print(shown[len(printed[0]) :], end="", flush=True)
        printed[0] = shown

    k = args.num_draft_tokens
    if k:  # speculative: rows advance by several tokens per step; printed when done
        stream = None
        start = time.perf_counter()
    try:
        out = q.generate(
            config,
            params,
            [ids],
            max_new_tokens=args.max_new_tokens,
            rng=jax.random.key(args.seed),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_token_ids=stops,
            stream=stream,
            runtime=runtime,
            num_draft_tokens=k,
            **vision,
        )
        jax.block_until_ready(out)
    except ValueError as e:
        raise CliError(f"--prompt: {e}") from None
    n = int(out.lengths[0])
    if k:
        seen[:] = np.asarray(out.tokens[0, :n]).tolist()
        printed[0] = tokenizer.decode([t for t in seen if t not in stops])
        print(printed[0], end="", flush=True)
        rate = n / (time.perf_counter() - start)
        print(
            f"\n[{n} tokens, {rate:.1f} tokens/s including prefill and compile; "
            f"{k} draft tokens, acceptance {out.acceptance_rate:.2f}]",
            file=sys.stderr,
            flush=True,
        )
        return {"tokens": seen, "text": printed[0], "acceptance_rate": out.acceptance_rate}
    rate = (n - 1) / (times[n - 1] - times[0]) if n > 1 and times[n - 1] > times[0] else 0.0
    print(f"\n[{n} tokens, decode {rate:.1f} tokens/s]", file=sys.stderr, flush=True)
    return {"tokens": np.asarray(out.tokens[0, :n]).tolist(), "text": printed[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen35_jax.generate", description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_draft_tokens",
        type=int,
        default=0,
        help="k >= 1: MTP speculative decoding with k drafts per step (0: plain)",
    )
    args = parser.parse_args(argv)
    try:
        run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 (checkpoint readers raise many kinds; name them)
        from qwen35_jax.config import ConfigError  # noqa: PLC0415
        from qwen35_jax.convert.hf import CheckpointError  # noqa: PLC0415

        if isinstance(e, (CheckpointError, ConfigError)):
            print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
