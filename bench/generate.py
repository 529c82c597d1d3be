"""Generation benchmark: our cached decode against transformers' `generate` and a no-cache loop.

    python -m bench.generate            # prints the table
    python -m bench.generate --write    # and replaces the "## Generation (issue 15)" section of
                                        # bench/RESULTS.md (other sections untouched)
    python -m bench.generate --context_only   # only the per-token time at 4,096 vs 256 (minutes)
    python -m bench.generate --model dense    # one model only (dense | moe | both)
    python -m bench.generate --speculative WORKDIR [--parts K]   # issue 16, see `speculative`

The same tiny hybrid model (width 256, 8 layers: 2 blocks of 3 Gated DeltaNet + 1 attention;
dense and MoE), the same weights in both frameworks (a perturbed random HF model written with
save_pretrained, read by our load_hf), float32 on CPU, batch 8, prompts of 128 random tokens:
  ours      `qwen35_jax.generate` (prefill + one jitted while_loop), greedy, no stop ids; the
            decode rate is (t(1 + n) - t(1)) / n per step (the prefill cancels), after a warm-up
            call that compiles
  hf        `model.generate(do_sample=False)` (eager torch; its GDN decode is the pure-torch
            recurrent fallback), tokens/s over the whole call minus its 1-token call
  no-cache  the end-of-run loop this replaced: every new token is a full jitted forward over a
            fixed [B, 128 + n] buffer (argmax at each row's last position); per-token time from
            a few steps (it is constant per step)
Context: our per-token decode time at prompt 4,096 against 256 (the GDN layers cost the same
per token; only the attention layers read a longer cache): `generate`'s decode loop
(`generate.decode_loop`) over `--context_tokens` (128) steps from a prefilled state.
Memory: the prefill's output buffers (XLA's memory analysis of the compiled prefill) against
`decode_state_bytes` + the [B, V] logits.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

import qwen35_jax as q
from bench.train_step import write_section
from qwen35_jax import decode

SECTION = "## Generation (issue 15)"
WIDTH = dict(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    intermediate_size=768,
)
MOE = dict(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=256,
)


def build(moe: bool, smoke: bool = False):
    """(HF model, our config, our params) with the same weights (smoke: hf_oracle's tiny
    widths, for the test that keeps this script running)."""
    from tests import hf_oracle  # noqa: PLC0415 (the perturbed-HF-model helper)

    model = hf_oracle.build(moe=moe, **({} if smoke else {**WIDTH, **(MOE if moe else {})}))
    config, params = q.load_hf(hf_oracle.save(model, tempfile.mkdtemp()))
    return model, config, params


def _time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ours_step_seconds(config, params, prompts, n: int) -> float:
    """Seconds per decode step of `generate` (all rows together)."""

    def run(k):
        out = q.generate(config, params, prompts, max_new_tokens=k)
        jax.block_until_ready(out)

    run(1), run(1 + n)  # compile both
    t1 = _time(lambda: run(1), 2)
    tn = _time(lambda: run(1 + n), 2)
    return (tn - t1) / n


def hf_step_seconds(model, prompts, n: int) -> float:
    ids = torch.tensor(prompts)

    def run(k):
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=k,
                min_new_tokens=k,
                eos_token_id=None,
                pad_token_id=0,
            )

    run(2)
    t1 = _time(lambda: run(1))
    tn = _time(lambda: run(1 + n))
    return (tn - t1) / n


def no_cache_step_seconds(config, params, prompts, n: int, steps: int = 4) -> float:
    """The replaced end-of-run loop: a full forward over [B, T + n] per token."""
    b, t = len(prompts), len(prompts[0])
    width = t + n
    ids = np.zeros((b, width), np.int32)
    ids[:, :t] = prompts
    lengths = np.full((b,), t, np.int32)

    @jax.jit
    def next_tokens(params, ids_BL, lengths_B):
        seg = (jnp.arange(width)[None, :] < lengths_B[:, None]).astype(jnp.int32)
        logits = q.apply(config, params, ids_BL, segment_ids=seg).logits
        last = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last, axis=-1)

    np.asarray(next_tokens(params, ids, lengths))  # compile
    start = time.perf_counter()
    for _ in range(steps):
        tok = np.asarray(next_tokens(params, ids, lengths))
        ids[np.arange(b), lengths] = tok
        lengths = lengths + 1
    return (time.perf_counter() - start) / steps


def state_memory(config, params, batch: int, prompt: int, n: int) -> tuple[int, int]:
    """(XLA's output bytes of the compiled prefill, analytic state + logits bytes)."""
    from qwen35_jax.generate import prompt_bucket  # noqa: PLC0415

    bucket = prompt_bucket(prompt)
    ids = jnp.zeros((batch, bucket), jnp.int32)
    lengths = jnp.full((batch,), prompt, jnp.int32)
    compiled = (
        jax.jit(decode.prefill, static_argnums=(0, 4))
        .lower(config, params, ids, lengths, bucket + n)
        .compile()
    )
    measured = int(compiled.memory_analysis().output_size_in_bytes)
    analytic = q.decode_state_bytes(config, batch, bucket + n) + batch * 4 * (
        config.text_config.vocab_size
    )
    return measured, analytic


def context_scaling(
    config, params, rng, batch: int, long_context: int, n: int, rounds: int = 3
) -> tuple:
    """Seconds per decode step after prompts of 256 and of `long_context` tokens: `generate`'s
    own decode loop (`decode_loop`: n steps of decode_step + sampling in one while_loop, caches
    of bucket + n + 1 slots as `generate` makes them) jitted alone and run from a prefilled
    state, so the prefill (seconds at 4,096 tokens, its noise larger than the difference being
    measured) is not in the timing; both sides compiled first, then timed round-robin (best
    of `rounds`) under the same load."""
    from qwen35_jax.generate import decode_loop, prompt_bucket  # noqa: PLC0415

    vocab = config.text_config.vocab_size
    loop = jax.jit(
        lambda params, state, logits, key: decode_loop(
            config,
            params,
            state,
            logits,
            key,
            max_new_tokens=n + 1,
            temperature=0.0,
            top_k=0,
            top_p=1.0,
            stop_token_ids=(),
        )
    )
    pre = jax.jit(decode.prefill, static_argnums=(0, 4))
    inputs = []
    for length in (min(256, long_context), long_context):
        ids = jnp.asarray(rng.randint(0, vocab, (batch, length)), jnp.int32)
        slots = prompt_bucket(length) + n + 1
        logits, state = pre(config, params, ids, jnp.full((batch,), length, jnp.int32), slots)
        inputs.append((params, state, logits, jax.random.key(0)))
    for args in inputs:
        jax.block_until_ready(loop(*args))  # compile
    best = [float("inf")] * len(inputs)
    for _ in range(rounds):
        for i, args in enumerate(inputs):
            best[i] = min(best[i], _time(lambda a=args: jax.block_until_ready(loop(*a))))
    return best[0] / n, best[1] / n


def measure(
    batch: int = 8,
    prompt: int = 128,
    n: int = 256,
    long_context: int = 4096,
    smoke=False,
    context_only=False,
    context_tokens: int = 128,
    model: str = "both",
) -> list[dict]:
    rows = []
    rng = np.random.RandomState(0)
    kinds = {"dense": (False,), "moe": (True,), "both": (False, True)}[model]
    for moe in (False,) if smoke else kinds:
        model, config, params = build(moe, smoke)
        if context_only:
            t_short, t_long = context_scaling(
                config, params, rng, batch, long_context, context_tokens
            )
            rows.append(
                dict(model="MoE" if moe else "dense", ms_256=1e3 * t_short, ms_4096=1e3 * t_long)
            )
            rows[-1]["ctx_ratio"] = t_long / t_short
            continue
        vocab = config.text_config.vocab_size
        prompts = rng.randint(0, vocab, (batch, prompt)).tolist()
        ours = ours_step_seconds(config, params, prompts, n)
        hf = hf_step_seconds(model, prompts, n)
        nocache = no_cache_step_seconds(config, params, prompts, n)
        ctx_n = 2 if smoke else context_tokens
        t_short, t_long = context_scaling(config, params, rng, batch, long_context, ctx_n)
        measured, analytic = state_memory(config, params, batch, prompt, n)
        rows.append(
            dict(
                model="MoE" if moe else "dense",
                ours_tok_s=batch / ours,
                hf_tok_s=batch / hf,
                nocache_tok_s=batch / nocache,
                vs_hf=hf / ours,
                vs_nocache=nocache / ours,
                ms_256=1e3 * t_short,
                ms_4096=1e3 * t_long,
                ctx_ratio=t_long / t_short,
                state_measured=measured,
                state_analytic=analytic,
            )
        )
    return rows


def report(rows: list[dict], batch: int, prompt: int, n: int) -> str:
    lines = [
        SECTION,
        "",
        f"`python -m bench.generate` ({datetime.date.today()}, {platform.machine()}, "
        f"{jax.devices()[0].platform}, {len(jax.devices())} device(s)): tiny hybrid model "
        f"(width 256, 8 layers), batch {batch}, prompts of {prompt} tokens, {n} new tokens, "
        "greedy, float32. Decode tokens/s over all rows; targets: >= 3x transformers, >= 20x the "
        "no-cache loop, per-token time at 4,096 <= 2x at 256, state memory = analytic (10%).",
        "",
        "| model | ours tok/s | transformers tok/s | ours / transformers | no-cache tok/s "
        "| ours / no-cache | ms/token @256 | ms/token @4096 | 4096 / 256 | prefill outputs "
        "(XLA) | state + logits (analytic) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {r['vs_hf']:.1f}x "
            f"| {r['nocache_tok_s']:.1f} | {r['vs_nocache']:.0f}x | {r['ms_256']:.2f} "
            f"| {r['ms_4096']:.2f} | {r['ctx_ratio']:.2f} | {r['state_measured'] / 2**20:.2f} MiB "
            f"| {r['state_analytic'] / 2**20:.2f} MiB |"
        )
    return "\n".join(lines) + "\n"


SPEC_SECTION = "## Speculative decoding (issue 16)"
SPEC_PROMPTS = (
    "def ",
    "import os\n",
    "class ",
    "    return ",
    "for i in range(",
    "if __name__ == ",
    "    def __init__(self",
    "from collections import ",
)


def speculative(
    workdir: str, n: int = 256, ks=(1, 2, 3), batches=(1, 8), rounds: int = 3
) -> list[dict]:
    """tokens/s of greedy `generate` with num_draft_tokens = k against k = 0, same process."""
    from qwen35_jax.generate.__main__ import load_checkpoint  # noqa: PLC0415

    config, runtime, params, tokenizer, _ = load_checkpoint(workdir)
    rows = []
    for batch in batches:
        load_start = os.getloadavg()[0]
        prompts = [tokenizer.encode(SPEC_PROMPTS[i % len(SPEC_PROMPTS)]) for i in range(batch)]

        def run(k, prompts=prompts):
            out = q.generate(
                config, params, prompts, max_new_tokens=n, runtime=runtime, num_draft_tokens=k
            )
            jax.block_until_ready(out)
            return out

        outs = {k: run(k) for k in (0, *ks)}  # compiles
        best = dict.fromkeys(outs, float("inf"))
        for _ in range(rounds):  # round-robin: every k sees the same machine load
            for k in outs:
                best[k] = min(best[k], _time(lambda k=k: run(k)))
        ref = np.asarray(outs[0].tokens)
        base = int(np.sum(np.asarray(outs[0].lengths))) / best[0]
        for k, out in outs.items():
            tok_s = int(np.sum(np.asarray(out.lengths))) / best[k]
            row = dict(batch=batch, k=k, tok_s=tok_s, speedup=tok_s / base)
            row["load"] = (load_start, os.getloadavg()[0])  # 1-minute load averages
            if k:
                steps = np.asarray(out.num_drafted) / k
                row.update(
                    acceptance=out.acceptance_rate,
                    mean_len=float(
                        np.mean(1 + np.asarray(out.num_accepted) / np.maximum(steps, 1))
                    ),
                    same=bool(np.array_equal(np.asarray(out.tokens), ref)),
                )
            rows.append(row)
            print(row, flush=True)
    return rows


def spec_parts(workdir: str, k: int, prompt: str = "def ", reps: int = 32, rounds: int = 3) -> dict:
    """ms per part of one speculative step at batch 1 against one plain decode step, each part
    jitted on its own and run `reps` times in a `fori_loop` (state carried in place, as in
    `generate`), best of `rounds` taken round-robin:
      plain      decode_step, 1 token
      verify     decode_step over k+1 tokens keeping every GDN position + keep_positions
      verify_chunked  the same k+1 tokens without per-position states (lower bound)
      draft      one MTP head call (1 token) + its cache write + the head's argmax
      catch_up   the MTP head over k+1 positions + cache write (its head on one position)
    A step costs ~ verify + (k-1) draft + catch_up + acceptance (small)."""
    from qwen35_jax.generate import speculative as spec  # noqa: PLC0415
    from qwen35_jax.generate.__main__ import load_checkpoint  # noqa: PLC0415

    config, rt, params, tokenizer, _ = load_checkpoint(workdir)
    ids = tokenizer.encode(prompt)
    t = max(16, 1 << (len(ids) - 1).bit_length())
    slots = t + reps * (k + 1) + 8
    ids_BT = jnp.asarray([ids + [0] * (t - len(ids))], jnp.int32)
    lengths_B = jnp.asarray([len(ids)], jnp.int32)
    _, state, h_BTD = jax.jit(
        lambda p: decode.prefill(
            config, p, ids_BT, lengths_B, slots, runtime=rt, return_hidden=True
        )
    )(params)
    ctx, _ = decode.prefill_context(config, lengths_B, t)
    _, _, new = spec._mtp(rt, config, params, h_BTD, ids_BT, ctx, None, True, False)
    mtp = tuple(decode.pad_slots(kv, slots) for kv in new)
    ones = lambda n: jnp.ones((1, n), jnp.int32)  # noqa: E731
    h1 = h_BTD[:, :1]

    def loop(body):
        return jax.jit(lambda p, c: lax.fori_loop(0, reps, lambda i, c: body(p, c), c))

    def plain(p, st):
        return decode.decode_step(config, p, st, ones(1), runtime=rt)[1]

    def verify(p, st):
        _, every, _ = decode.decode_step(
            config, p, st, ones(k + 1), runtime=rt, every_position=True, return_hidden=True
        )
        return decode.keep_positions(every, st.length_B * 0 + k + 1, k + 1)

    def verify_chunked(p, st):
        return decode.decode_step(config, p, st, ones(k + 1), runtime=rt)[1]

    def mtp_call(width):
        def body(p, c):  # a chain: each call reads the previous output and its draft
            caches, length, h_B1D, tok_B = c
            mctx, idx = decode.decode_context(config, length, length * 0, width, slots)
            h_BTD = jnp.repeat(h_B1D, width, axis=1)
            ids_BT = jnp.repeat(tok_B[:, None], width, axis=1)
            out, _, new = spec._mtp(rt, config, p, h_BTD, ids_BT, mctx, caches, False, False)
            o_BD = out[:, -1]
            draft_B = spec._draft(rt, config, p, o_BD)
            return spec._write(caches, new, idx), length + width, o_BD[:, None], draft_B

        return body

    parts = {
        "plain": (plain, state),
        "verify": (verify, state),
        "verify_chunked": (verify_chunked, state),
        "draft": (mtp_call(1), (mtp, lengths_B, h1, ids_BT[:, 0])),
        "catch_up": (mtp_call(k + 1), (mtp, lengths_B, h1, ids_BT[:, 0])),
    }
    fns = {name: loop(body) for name, (body, _) in parts.items()}
    for name, fn in fns.items():  # compile
        jax.block_until_ready(fn(params, parts[name][1]))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(
                best[name],
                _time(lambda f=fn, n=name: jax.block_until_ready(f(params, parts[n][1]))),
            )
    return {name: 1e3 * sec / reps for name, sec in best.items()}


def spec_report(rows: list[dict], workdir: str, n: int, rounds: int = 3) -> str:
    lines = [
        SPEC_SECTION,
        "",
        f"`python -m bench.generate --speculative {workdir}` ({datetime.date.today()}, "
        f"{platform.machine()}, {jax.devices()[0].platform}): greedy, {n} new tokens, no stop "
        "ids, float32; tokens/s over the whole `generate` call (prefill included, compiled "
        f"before), best of {rounds} rounds taken round-robin over k; k = num_draft_tokens "
        "(0 = plain decoding in the same run). "
        "Mean accepted length: tokens emitted per verification step (1 + accepted drafts). "
        "Load: the 1-minute load average before and after the batch's runs (2 cores).",
        "",
        "| batch | k | tok/s | vs k=0 | acceptance | mean accepted length | output = k=0 | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["k"]:
            extra = f"{r['acceptance']:.2f} | {r['mean_len']:.2f} | {'yes' if r['same'] else 'NO'}"
        else:
            extra = "- | 1 | -"
        lines.append(
            f"| {r['batch']} | {r['k']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {extra} "
            f"| {r['load'][0]:.1f}-{r['load'][1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--long_context", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="tiny model, dense only (tests)")
    ap.add_argument(
        "--context_only", action="store_true", help="only the per-token time at 256 vs long"
    )
    ap.add_argument("--context_tokens", type=int, default=128, help="decode steps timed there")
    ap.add_argument("--model", choices=("dense", "moe", "both"), default="both")
    ap.add_argument(
        "--parts",
        type=int,
        metavar="K",
        help="with --speculative: ms per part of one speculative step with K drafts at batch 1",
    )
    ap.add_argument(
        "--speculative",
        metavar="WORKDIR",
        help="instead: MTP speculative decoding (k=0..3, batch 1 and 8) of the model trained "
        "in WORKDIR by `python -m train.main` (with an MTP head)",
    )
    ap.add_argument(
        "--batches", default="1,8", help="with --speculative: comma-separated batch sizes"
    )
    ap.add_argument("--rounds", type=int, default=3, help="with --speculative: best of R")
    args = ap.parse_args()
    if args.speculative and args.parts:
        parts = spec_parts(args.speculative, args.parts)
        print(" | ".join(f"{name} {ms:.2f} ms" for name, ms in parts.items()))
        return
    if args.speculative:
        text = spec_report(
            speculative(
                args.speculative,
                args.new_tokens,
                batches=tuple(int(b) for b in args.batches.split(",")),
                rounds=args.rounds,
            ),
            args.speculative,
            args.new_tokens,
            args.rounds,
        )
        print(text)
        if args.write:
            write_section(text, SPEC_SECTION)
        return
    rows = measure(
        args.batch,
        args.prompt,
        args.new_tokens,
        args.long_context,
        args.smoke,
        args.context_only,
        args.context_tokens,
        args.model,
    )
    if args.context_only:
        for r in rows:
            print(
                f"{r['model']}: {r['ms_256']:.2f} ms/token @256, {r['ms_4096']:.2f} ms/token "
                f"@{args.long_context}: {r['ctx_ratio']:.2f}x ({args.context_tokens} steps each)"
            )
        return
    text = report(rows, args.batch, args.prompt, args.new_tokens)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
