"""Model FLOPs utilisation (MFU) of the pretraining step on the devices present (issue 5, item 9).

    python -m bench.mfu                          # qwen3.5-0.8b, seq 4096, bfloat16, all devices
    python -m bench.mfu --batch 16 --remat none  # other batch / remat policy
    python -m bench.mfu --smoke                  # a tiny model on CPU: checks that the script runs
    python -m bench.mfu --write                  # also records the table in bench/RESULTS.md

What it runs is the trainer's own step: the preset's config (`configs/qwen3_5_0_8b.py` unless
`--config` names another file: bfloat16 compute, float32 parameters and AdamW state, its remat
policy, MTP head trained with weight 0.3, z-loss), `train.state.init_state` (built through
`jax.eval_shape` and the sharding table), `train.step.make_train_step` jitted with the trainer's
shardings on a mesh over every device (the preset's mesh, `fsdp=-1`), donating its state. The
batch is random tokens packed as documents of `--doc_len` tokens (segment ids and per-document
positions, as the input pipeline makes them); no data pipeline or checkpointing is timed.

MFU = analytic model FLOPs of the step (`train.flops`: matmuls, causal attention, the chunked
Gated DeltaNet, active experts only, LM and MTP heads; remat not counted) / (median step time x
devices x peak FLOP/s per device). The peak comes from `train.flops.PEAK_FLOPS` by device kind
(H100/H200: 989 TFLOP/s dense bf16), `--peak_tflops` overrides it; on CPU it is the measured
float32 matmul rate, so the CPU figure is a smoke number, not an MFU claim.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import pathlib
import statistics
import time

import jax
import numpy as np

from qwen35_jax import sharding
from train import config_schema, flops
from train.optimizer import make_optimizer
from train.state import abstract_state, batch_shardings, init_state
from train.step import make_train_step

SECTION = "## Accelerator MFU (issue 5)"
RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(path: str, *args: str):
    """`get_config(*args)` of a configs/*.py file."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def shrink_for_smoke(c) -> None:
    """The tiny CPU model of configs/tiny_cpu.py (dense variant, MTP) in the preset's recipe."""
    tiny = load_config(str(ROOT / "configs" / "tiny_cpu.py"), "dense")
    c.model.text_config = tiny.model.text_config
    c.runtime.gdn_chunk_size = tiny.runtime.gdn_chunk_size


def packed_batch(batch: int, seq: int, doc_len: int, vocab: int, seed: int = 0) -> dict:
    """Random tokens; rows packed with documents of doc_len tokens (the last one cut)."""
    rng = np.random.default_rng(seed)
    pos = np.arange(seq, dtype=np.int32)
    return {
        "tokens": rng.integers(0, vocab, size=(batch, seq)).astype(np.int32),
        "segment_ids": np.broadcast_to(1 + pos // doc_len, (batch, seq)).astype(np.int32),
        "positions": np.broadcast_to(pos % doc_len, (batch, seq)).astype(np.int32),
    }


def measure(args: argparse.Namespace) -> dict:
    c = load_config(args.config)
    if args.smoke:
        shrink_for_smoke(c)
    c.train.batch_size = args.batch
    c.train.seq_len = args.seq
    if args.remat is not None:
        c.runtime.remat_policy = args.remat
    if args.chunk is not None:
        c.runtime.gdn_chunk_size = args.chunk
    model_cfg = config_schema.model_config(c)
    runtime = config_schema.runtime_config(c)
    mesh = sharding.mesh_from_config(c.mesh)
    tx, schedule = make_optimizer(c.optimizer, args.steps + args.warmup)
    abstract, state_shardings = abstract_state(model_cfg, tx, mesh, runtime=runtime)

    host = packed_batch(
        args.batch, args.seq, args.doc_len or args.seq, model_cfg.text_config.vocab_size
    )
    shapes = {k: v.shape for k, v in host.items()}
    in_shardings = batch_shardings(mesh, shapes)
    batch = {k: jax.device_put(v, in_shardings[k]) for k, v in host.items()}
    state = (
        abstract
        if args.compile_only
        else init_state(model_cfg, tx, mesh, jax.random.key(0), runtime=runtime)
    )
    with jax.set_mesh(mesh), sharding.axis_rules():
        t0 = time.perf_counter()
        step = jax.jit(
            make_train_step(model_cfg, tx, schedule, c.train, runtime=runtime),
            in_shardings=(state_shardings, in_shardings),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        if args.compile_only:
            m = compiled.memory_analysis()
            gib = {
                k: getattr(m, f"{k}_size_in_bytes") / 2**30
                for k in ("argument", "output", "temp", "generated_code")
            }
            print(
                f"compiled in {compile_s:.0f} s for {jax.devices()[0].platform}; GiB per device: "
                + ", ".join(f"{k} {v:.2f}" for k, v in gib.items())
            )
            return {}
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            loss = float(jax.device_get(metrics["loss"]))  # waits for the step
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)

    text = model_cfg.text_config
    with_mtp = text.mtp_num_hidden_layers > 0 and c.train.mtp_lambda > 0
    per_token = flops.train_flops_per_token(model_cfg, args.seq, with_mtp, runtime=runtime)
    step_flops = per_token * args.batch * args.seq
    peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops_per_device()
    step_s = statistics.median(times)
    n_dev = jax.device_count()
    mem = jax.devices()[0].memory_stats() or {}
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return {
        "device": f"{n_dev} x {jax.devices()[0].device_kind}",
        "preset": pathlib.Path(args.config).stem + (" (smoke: tiny)" if args.smoke else ""),
        "params": n_params,
        "mesh": dict(mesh.shape),
        "batch": args.batch,
        "seq": args.seq,
        "doc_len": args.doc_len or args.seq,
        "remat": runtime.remat_policy,
        "chunk": runtime.gdn_chunk_size,
        "dtype": runtime.compute_dtype,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_s": args.batch * args.seq / step_s,
        "tflops_per_device": step_flops / step_s / n_dev / 1e12,
        "mfu": step_flops / (step_s * n_dev * peak) if peak else float("nan"),
        "peak_tflops": peak / 1e12 if peak else float("nan"),
        "peak_mem_gib": mem.get("peak_bytes_in_use", float("nan")) / 2**30,
        "final_loss": loss,
    }


def report(r: dict) -> str:
    return "\n".join(
        [
            SECTION,
            "",
            f"`python -m bench.mfu` on {r['device']}, {datetime.date.today().isoformat()}, "
            f"jax {jax.__version__}.",
            "",
            "| preset | params | batch x seq (doc) | dtype | remat | GDN chunk | step s | tokens/s "
            "| TFLOP/s/device | MFU | peak mem GiB | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['preset']} | {r['params'] / 1e6:,.1f}M | {r['batch']} x {r['seq']} "
            f"({r['doc_len']}) | {r['dtype']} | {r['remat']} | {r['chunk']} | {r['step_s']:.3f} "
            f"| {r['tokens_s']:,.0f} | {r['tflops_per_device']:.3g} | {100 * r['mfu']:.1f}% "
            f"(of {r['peak_tflops']:.3g}) | {r['peak_mem_gib']:.1f} | {r['compile_s']:.0f} |",
            "",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "qwen3_5_0_8b.py"))
    ap.add_argument("--batch", type=int, default=None, help="global batch rows (8; smoke 2)")
    ap.add_argument("--seq", type=int, default=None, help="row length (4096; smoke 128)")
    ap.add_argument("--doc_len", type=int, default=0, help="document length (0: one per row)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (2; smoke 1)")
    ap.add_argument("--remat", default=None, help="override runtime.remat_policy")
    ap.add_argument("--chunk", type=int, default=None, help="override runtime.gdn_chunk_size")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="peak per device (0: table)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, for a CPU check")
    ap.add_argument(
        "--compile_only",
        action="store_true",
        help="lower + compile on abstract state, print the memory analysis, run nothing",
    )
    ap.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = ap.parse_args(argv)
    defaults = dict(batch=2, seq=128, steps=2, warmup=1) if args.smoke else {}
    defaults = {**dict(batch=8, seq=4096, steps=10, warmup=2), **defaults}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    result = measure(args)
    if not result:
        return
    text = report(result)
    print(text)
    if args.write:
        from bench.train_step import write_section

        write_section(text, SECTION)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    main()
