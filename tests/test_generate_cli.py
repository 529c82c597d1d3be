"""`python -m qwen35_jax.generate` on a Hugging Face checkpoint, its converted (orbax) copy and a
training workdir:
the streamed text is the tokenizer's decoding of `generate`'s tokens; bad input gives one named
`error:` line (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import qwen35_jax as q
from qwen35_jax.convert.orbax_io import hf_to_orbax
from qwen35_jax.generate.__main__ import chat_prompt, main
from tests import hf_oracle
from tests.test_speculative import checkpoint_with_mtp

EOS = "<|endoftext|>"


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer.json: w0 .. w{V-2} and the eos last."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {EOS: vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    template = (
        "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
        "{% if add_generation_prompt %}w3{% endif %}"
    )
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "eos_token": EOS}, f)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = hf_oracle.build(num_hidden_layers=4, seed=11)
    path = hf_oracle.save(model, tmp_path_factory.mktemp("hf"))
    write_tokenizer(path, model.config.vocab_size)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expected_text(path: str, prompt: str, n: int) -> str:
    config, params = q.load_hf(path)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    ids = tok.encode(prompt, add_special_tokens=False).ids
    out = q.generate(config, params, [ids], max_new_tokens=n, stop_token_ids=(95,))
    tokens = [t for t in np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist() if t != 95]
    return tok.decode(tokens)


def test_hf_and_converted_checkpoints_stream_the_generated_text(checkpoint, tmp_path, capsys):
    prompt = "w5 w17 w9 w40"
    want = expected_text(checkpoint, prompt, 7)
    code, out, err = run_cli(
        capsys, "--checkpoint", checkpoint, "--prompt", prompt, "--max_new_tokens", "7"
    )
    assert code == 0, err
    assert out.strip() == want.strip() and want.strip()
    assert "tokens/s]" in err
    converted = str(tmp_path / "orbax")
    hf_to_orbax(checkpoint, converted)
    code, out2, err = run_cli(
        capsys, "--checkpoint", converted, "--prompt", prompt, "--max_new_tokens", "7"
    )
    assert code == 0, err
    assert out2 == out


def test_chat_template_and_sampling_flags(checkpoint, capsys):
    assert chat_prompt(checkpoint, "w8 w9", 0) == "w1 w8 w9 w2 w3"
    code, out, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--prompt",
        "w8 w9",
        "--chat",
        "--max_new_tokens",
        "4",
        "--temperature",
        "0.7",
        "--top_p",
        "0.9",
        "--seed",
        "3",
    )
    assert code == 0, err
    assert out.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--checkpoint", "/nonexistent/ckpt"],
            "--checkpoint /nonexistent/ckpt: no such directory",
        ),
        (["--max_new_tokens", "300000"], "exceeds the model's context"),
        (["--image", "/nonexistent/cat.png"], "--image /nonexistent/cat.png: cannot read"),
    ],
)
def test_bad_input_is_one_named_error(checkpoint, capsys, args, message):
    argv = ["--checkpoint", checkpoint, "--prompt", "w1 w2"] + args
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_num_draft_tokens_prints_the_plain_greedy_text(checkpoint, tmp_path, capsys):
    """--num_draft_tokens 2 on a checkpoint with mtp.* tensors: the same text as plain greedy
    decoding, the acceptance rate reported; on one without an MTP head: a named error."""
    path = str(tmp_path / "mtp")
    os.makedirs(path)
    model, _, _ = checkpoint_with_mtp(path)
    write_tokenizer(path, model.config.vocab_size)
    argv = ["--checkpoint", path, "--prompt", "w5 w17 w9 w40", "--max_new_tokens", "9"]
    code, plain, err = run_cli(capsys, *argv)
    assert code == 0, err
    code, spec, err = run_cli(capsys, *argv, "--num_draft_tokens", "2")
    assert code == 0, err
    assert spec.strip() == plain.strip() and plain.strip()
    assert "2 draft tokens, acceptance" in err
    code, _, err = run_cli(
        capsys, "--checkpoint", checkpoint, "--prompt", "w1", "--num_draft_tokens", "2"
    )
    assert code == 2 and err.startswith("error: --num_draft_tokens 2: ") and "no MTP head" in err


def test_directory_without_a_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--checkpoint", str(tmp_path), "--prompt", "w1")
    assert code == 2 and "no config.json" in err


def test_training_workdir(tmp_path, capsys):
    """A 2-step run of configs/tiny_cpu.py: its latest checkpoint and sentencepiece tokenizer."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=root)
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "train.main",
        f"--workdir={workdir}",
        f"--config={os.path.join(root, 'configs', 'tiny_cpu.py')}",
        "--config.train.steps=2",
        "--config.train.completion_tokens=0",
    ]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    code, out, err = run_cli(
        capsys, "--checkpoint", workdir, "--prompt", "def main(", "--max_new_tokens", "6"
    )
    assert code == 0, err
    assert "tokens/s]" in err
