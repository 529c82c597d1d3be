"""Training-step benchmark: our jitted step against a transformers + torch AdamW step, and
compile time against depth.

    python -m bench.train_step            # prints the tables
    python -m bench.train_step --write    # and replaces the "## Training step (issue 5)" section
                                          # of bench/RESULTS.md (other sections untouched)

Throughput: the same tiny hybrid config (3 Gated DeltaNet + 1 attention layer per block; dense
and MoE variants; no MTP head, which transformers does not train), the same batch of random
tokens (B x T, one document per row), float32 on CPU, one full optimizer step each:
  ours    `train.step.make_train_step` (masked CE + MoE aux loss, global-norm clip, AdamW with the
          decay mask), jitted with donation
  torch   `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` (eager, torch's CPU kernels; its GDN is
          the pure-torch chunked fallback since flash-linear-attention is not installed),
          loss.backward(), clip_grad_norm_, torch.optim.AdamW
Steps alternate between the two (ours, torch, ours, ...) so that load from other processes on
shared cores hits both alike; the medians are reported.

Where the time goes (`--ablate`): the same comparison with our Gated DeltaNet kernel replaced by
a cheap stand-in (o = v scaled by q, k, g, beta, so gradients still reach every input): the
ratio it reaches bounds what any GDN kernel work could buy on this machine. A second row stubs
both kernels (transformers' `torch_chunk_gated_delta_rule` too, keeping its in-kernel q/k L2 norm
and head repeat): the ratio of everything except the GDN kernels.

Compile time: `jit(step).lower(...).compile()` of the MoE config at 8 and at 48 layers (the
faster of two alternating attempts each): the layer stack is a scan over 4-layer blocks, so
depth should barely change it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import qwen35_jax
from qwen35_jax import sharding
from qwen35_jax.hf_config import to_hf as config_to_hf
from train.config_schema import base_config
from train.optimizer import make_optimizer
from train.state import init_state
from train.step import make_train_step

SECTION = "## Training step (issue 5)"
RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def model_config(moe: bool, layers: int = 4) -> qwen35_jax.Qwen35Config:
    text = qwen35_jax.TextConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        tie_word_embeddings=True,
        full_attention_interval=4,
        rope_parameters=qwen35_jax.config.RopeParameters(rope_theta=10_000.0),
    )
    if moe:
        text = dataclasses.replace(
            text,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=128,
        )
    return qwen35_jax.Qwen35Config(text_config=text)  # the default runtime: GDN chunk 64


def train_config():
    c = base_config("tiny")
    c.train.mtp_lambda = 0.0
    c.optimizer.warmup_steps = 0
    return c


def ours(cfg, batch_np):
    """(step thunk, compile seconds) for our jitted step."""
    c = train_config()
    tx, schedule = make_optimizer(c.optimizer, 1000)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    holder = {"state": init_state(cfg, tx, mesh, jax.random.key(0))}
    batch = jax.tree.map(jnp.asarray, batch_np)
    with jax.set_mesh(mesh), sharding.axis_rules():
        t0 = time.perf_counter()
        step = jax.jit(make_train_step(cfg, tx, schedule, c.train), donate_argnums=0)
        step = step.lower(holder["state"], batch).compile()
        compile_s = time.perf_counter() - t0

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return run, compile_s


def _gdn_stand_in(q, k, v, g, beta, **_):
    """A near-free substitute for `gated_delta_rule` (for --ablate only): elementwise."""
    return v * (q[..., :1] + k[..., :1] + g[..., None] + beta[..., None])


def _torch_gdn_stand_in(query, key, value, g, beta, use_qk_l2norm_in_kernel=False, **_):
    """transformers' chunk kernel signature; the same elementwise stand-in (for --ablate only)."""
    import torch

    if use_qk_l2norm_in_kernel:  # as transformers' l2norm
        query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6)
        key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
    rep = value.shape[2] // key.shape[2]
    query, key = query.repeat_interleave(rep, dim=2), key.repeat_interleave(rep, dim=2)
    out = value * (query[..., :1] + key[..., :1] + g[..., None] + beta[..., None])
    return out, None


def torch_step(cfg, batch_np):
    import torch
    import transformers

    hf = config_to_hf(cfg)
    moe = cfg.is_moe
    conf_cls = transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig
    model_cls = transformers.Qwen3_5MoeForCausalLM if moe else transformers.Qwen3_5ForCausalLM
    keys = set(conf_cls().to_dict())
    conf = conf_cls(**{k: v for k, v in hf.items() if k in keys})
    if moe:
        conf.output_router_logits = True
    torch.manual_seed(0)
    model = model_cls(conf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.tensor(batch_np["tokens"], dtype=torch.long)

    def run():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)  # no decode cache in training
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def throughput(
    moe: bool, batch: int, seq: int, steps: int, stub_gdn: bool = False, stub_torch: bool = False
) -> dict:
    cfg = model_config(moe)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, cfg.text_config.vocab_size, size=(batch, seq)).astype(np.int32)
    batch_np = {
        "tokens": tok,
        "segment_ids": np.ones_like(tok),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tok.shape).copy(),
    }
    if stub_gdn:
        from unittest import mock

        from qwen35_jax.layers import gated_deltanet

        with mock.patch.object(gated_deltanet, "gated_delta_rule", _gdn_stand_in):
            run_ours, _ = ours(cfg, batch_np)  # traced and compiled under the patch
    else:
        run_ours, _ = ours(cfg, batch_np)
    run_torch = torch_step(cfg, batch_np)
    if stub_torch:
        import importlib
        from unittest import mock

        name = "qwen3_5_moe" if moe else "qwen3_5"
        hf_mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        # patched during every call of the step
        run_torch = mock.patch.object(hf_mod, "torch_chunk_gated_delta_rule", _torch_gdn_stand_in)(
            run_torch
        )
    for f in (run_ours, run_torch):  # warm-up
        f()
        f()
    times = {"ours": [], "torch": []}
    for _ in range(steps):
        for name, f in (("ours", run_ours), ("torch", run_torch)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch * seq
    return {
        "model": ("hybrid MoE (4 experts top-2 + shared)" if moe else "hybrid dense")
        + (", GDN kernels stubbed in both" if stub_torch else "")
        + (", our GDN kernel stubbed" if stub_gdn and not stub_torch else ""),
        "ours_tok_s": tokens / med["ours"],
        "torch_tok_s": tokens / med["torch"],
        "ratio": med["torch"] / med["ours"],
    }


def compile_seconds(layers: int, batch: int, seq: int) -> float:
    cfg = model_config(True, layers)
    tok = np.zeros((batch, seq), np.int32)
    batch_np = {
        "tokens": tok,
        "segment_ids": np.ones_like(tok),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tok.shape).copy(),
    }
    _, seconds = ours(cfg, batch_np)
    return seconds


def write_section(text: str, section: str = SECTION) -> None:
    """Replace (or append) one benchmark's section of RESULTS.md; other sections untouched."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section in old:
        head, rest = old.split(section, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1 :] if nxt >= 0 else ""
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--ablate", action="store_true", help="also time ours with the GDN stubbed")
    args = ap.parse_args()
    import torch

    rows = [throughput(moe, args.batch, args.seq, args.steps) for moe in (False, True)]
    if args.ablate:
        rows += [throughput(m, args.batch, args.seq, args.steps, True) for m in (False, True)]
        rows += [throughput(m, args.batch, args.seq, args.steps, True, True) for m in (False, True)]
    compiles = {8: [], 48: []}
    for _ in range(2):  # alternate depths, keep the faster of two compiles each
        for n in compiles:
            compiles[n].append(compile_seconds(n, args.batch, args.seq))
    compiles = {n: min(v) for n, v in compiles.items()}
    lines = [
        SECTION,
        "",
        f"One optimizer step, batch {args.batch} x seq {args.seq} tokens, width 128, 4 layers "
        "(3 GDN + 1 attention), vocab 1024, float32, CPU; median of "
        f"{args.steps} alternating steps after 2 warm-up steps each.",
        "",
        "| model | ours tok/s | transformers+torch tok/s | speed-up |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['ours_tok_s']:,.0f} | {r['torch_tok_s']:,.0f} | {r['ratio']:.2f}x |"
        for r in rows
    ]
    lines += [
        "",
        "| layers (MoE config) | compile s (lower + compile of the step, best of 2) |",
        "|---|---|",
    ]
    lines += [f"| {n} | {s:.1f} |" for n, s in compiles.items()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += [
        "",
        f"{platform.machine()} host, {os.cpu_count()} cores, jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), "
        f"{datetime.date.today().isoformat()}. `python -m bench.train_step`. Load average at "
        f"the end: {load:.1f} (shared cores).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
