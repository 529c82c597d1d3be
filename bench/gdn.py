"""Benchmark: chunkwise gated delta rule (qwen35_jax) vs transformers' torch reference, on CPU.

Run: ``python bench/gdn.py`` (T in 1024, 4096, 16384) or ``python bench/gdn.py --quick``
(T in 1024, 4096). Shapes: B=1, H=4, K=V=128, chunk 64, float32.

Every measurement runs in its own subprocess so that peak-memory numbers do not mix:
- time: median wall time of a few runs after one warm-up (JAX: jitted and compiled ahead),
  the same number of runs and warm-ups on both sides (`_policy`); a speed-up whose runs spread
  by more than NOISY (max/min of either side's runs) is printed as "noisy", not as a result;
  fwd = outputs only; fwd+bwd = outputs and the vector-Jacobian product for a fixed cotangent
  (JAX ``jax.vjp`` inside ``jit``; torch ``autograd`` ``backward(do)``) w.r.t. q, k, v, g, beta.
- memory, JAX: XLA compiled ``memory_analysis()`` temp + output bytes of the jitted function.
- memory, both: ``ru_maxrss`` of the subprocess after the first measured call minus its value
  just before it (inputs built, libraries imported, JAX program compiled); a lower bound when an
  earlier phase (e.g. compilation) already reached a higher peak.
The transformers function is the pure-torch fallback (`torch_chunk_gated_delta_rule`), the one
Qwen3.5 uses without flash-linear-attention.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

B, H, K, V, C = 1, 4, 128, 128, 64
NOISY = 1.5


def _inputs(T: int):
    import numpy as np

    rng = np.random.default_rng(0)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.normal(size=(B, T, H, K)))
    k = unit(rng.normal(size=(B, T, H, K)))
    v = rng.normal(size=(B, T, H, V))
    g = -rng.uniform(0.0, 1.0, size=(B, T, H))
    beta = rng.uniform(0.0, 1.0, size=(B, T, H))
    do = rng.normal(size=(B, T, H, V))
    return [x.astype(np.float32) for x in (q, k, v, g, beta, do)]


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _time_runs(fn, runs: int, warmup: bool) -> dict:
    """Median wall and process-CPU seconds, and the ru_maxrss delta of the first call."""
    rss0 = _maxrss_bytes()
    walls, cpus = [], []
    for i in range(runs + int(warmup)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if i == 0:
            rss_delta = _maxrss_bytes() - rss0
        if i > 0 or not warmup:
            walls.append(wall)
            cpus.append(cpu)
    return {
        "spread": max(walls) / min(walls),  # 1.0 for a single run
        "seconds": statistics.median(walls),
        "cpu_seconds": statistics.median(cpus),
        "rss_delta": rss_delta,
        "runs": len(walls),
    }


def _worker_jax(mode: str, T: int, runs: int) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from qwen35_jax.ops import gated_delta_rule

    q, k, v, g, beta, do = (jnp.asarray(x) for x in _inputs(T))
    if mode == "fwd":

        def f(q, k, v, g, beta, do):
            return gated_delta_rule(q, k, v, g, beta, chunk_size=C)

    else:

        def f(q, k, v, g, beta, do):
            o, vjp = jax.vjp(lambda *a: gated_delta_rule(*a, chunk_size=C), q, k, v, g, beta)
            return vjp(do)

    compiled = jax.jit(f).lower(q, k, v, g, beta, do).compile()
    mem = compiled.memory_analysis()
    xla_bytes = mem.temp_size_in_bytes + mem.output_size_in_bytes

    def run():
        jax.block_until_ready(compiled(q, k, v, g, beta, do))

    return dict(_time_runs(run, *_policy(mode, T, runs)), xla_bytes=xla_bytes)


def _worker_torch(mode: str, T: int, runs: int) -> dict:
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    arrays = _inputs(T)
    q, k, v, g, beta = (torch.tensor(x, requires_grad=mode != "fwd") for x in arrays[:5])
    do = torch.tensor(arrays[5])

    def run():
        if mode == "fwd":
            with torch.no_grad():
                torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=C)
        else:
            for x in (q, k, v, g, beta):
                x.grad = None
            o, _ = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=C)
            o.backward(do)

    return _time_runs(run, *_policy(mode, T, runs))


def _policy(mode: str, T: int, runs: int) -> tuple[int, bool]:
    """(timed runs, warm-up) for one measurement, the same for both implementations.

    torch fwd+bwd is quadratic in T (see the table): beyond 4096 tokens every implementation is
    timed over one run after one warm-up run, to keep the benchmark under ten minutes."""
    if mode != "fwd" and T > 4096:
        return 1, True
    return runs, True


def _measure(impl: str, mode: str, T: int, runs: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, mode, str(T), str(runs)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T in 1024, 4096 only")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, mode, T, runs = args.worker
        fn = _worker_jax if impl == "jax" else _worker_torch
        print(json.dumps(fn(mode, int(T), int(runs))))
        return

    Ts = (1024, 4096) if args.quick else (1024, 4096, 16384)
    print(
        f"B={B} H={H} K={K} V={V} chunk={C} float32, CPU cores={os.cpu_count()}, "
        f"load avg at start={os.getloadavg()[0]:.1f}, median of {args.runs} runs"
    )
    results = {}
    for T in Ts:
        for mode in ("fwd", "fwd+bwd"):
            for impl in ("jax", "torch"):
                results[impl, mode, T] = _measure(impl, mode, T, args.runs)
                r = results[impl, mode, T]
                print(
                    f"  measured {impl:5s} {mode:7s} T={T:6d}: wall {r['seconds']:.3f} s, "
                    f"cpu {r['cpu_seconds']:.3f} s, runs {r['runs']}",
                    flush=True,
                )

    header = (
        f"{'T':>6} {'mode':>8} | {'jax tok/s':>10} {'torch tok/s':>11} {'speedup':>8} | "
        f"{'jax XLA MiB':>11} {'jax rss MiB':>11} {'torch rss MiB':>13}"
    )
    print()
    print(header)
    print("-" * len(header))
    for T in Ts:
        for mode in ("fwd", "fwd+bwd"):
            j, t = results["jax", mode, T], results["torch", mode, T]
            noisy = max(j["spread"], t["spread"]) > NOISY
            speedup = "noisy" if noisy else f"{t['seconds'] / j['seconds']:.1f}x"
            print(
                f"{T:6d} {mode:>8} | {T / j['seconds']:10.0f} {T / t['seconds']:11.0f} "
                f"{speedup:>8} | {_mib(j['xla_bytes']):>11} "
                f"{_mib(j['rss_delta']):>11} {_mib(t['rss_delta']):>13}"
            )
    print()
    for impl in ("jax", "torch"):
        for mode in ("fwd", "fwd+bwd"):
            parts = []
            for a, b in zip(Ts[:-1], Ts[1:], strict=True):
                ratio = results[impl, mode, b]["seconds"] / results[impl, mode, a]["seconds"]
                parts.append(f"t({b})/t({a})={ratio:.2f} (exponent {math.log(ratio, b / a):.2f})")
            print(f"time growth {impl:5s} {mode:7s}: " + ", ".join(parts))
    print(f"load avg at end={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
