"""MoE dispatch benchmark on 8 simulated CPU devices: all-to-all expert parallelism vs
replicated experts vs a dense per-expert loop, forward + backward of one routed-expert layer.

    python -m bench.moe                 # prints the table
    python -m bench.moe --write         # and replaces the "## MoE dispatch (issue 4)" section
                                        # of bench/RESULTS.md (other sections untouched)

Variants (same routing, same weights, tokens split 8 ways in all of them):
  all_to_all EP   mesh expert=8: 1/8 of the experts per device, rows travel by all-to-all,
                  dropless (worst-case static buffer of P*m rows per device)
  ... cf=1.25     the same with a capacity factor (buffer ceil(cf*m/P) rows per device pair)
  replicated      mesh data=8: every device holds every expert and runs its own tokens
                  (`moe_dispatch` with P = 1: what `auto` does without an expert axis)
  GSPMD local     mesh data=8, `moe.grouped_experts` left to sharding propagation (mode=local):
                  the global sort by expert makes the compiler replicate the expert work
  dense loop      mesh data=8: for each expert, all tokens through it, masked by the routing
Times are medians over --repeats runs after one warm-up; the ratio column is against the dense
loop measured in the same run. On XLA:CPU `ragged_dot` lowers to a masked dense product over all
groups, so the grouped variants do k times the dense loop's work there; the figures
measure dispatch overhead on simulated devices (one host, shared cores), not accelerator speed.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from qwen35_jax import sharding  # noqa: E402
from qwen35_jax.layers import moe, moe_dispatch  # noqa: E402

SECTION = "## MoE dispatch (issue 4)"
RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def dense_loop(x_ND, weights_Nk, experts_Nk, wg_EDI, wu_EDI, wd_EID):
    """Reference: every expert on every token, weighted by the token's routing (0 if unrouted)."""
    y_ND = jnp.zeros_like(x_ND)
    for e in range(wg_EDI.shape[0]):
        combine_N = jnp.sum(jnp.where(experts_Nk == e, weights_Nk, 0.0), axis=-1)
        h_NI = jax.nn.silu(x_ND @ wg_EDI[e]) * (x_ND @ wu_EDI[e])
        y_ND = y_ND + combine_N[:, None].astype(x_ND.dtype) * (h_NI @ wd_EID[e])
    return y_ND


def build(args):
    b, t, d, e, i, k = args.batch, args.seq, args.dim, args.experts, args.width, args.top_k
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (b, t, d))
    router = jax.random.normal(keys[1], (d, e))
    w = tuple(
        jax.random.normal(kk, s) * d**-0.5
        for kk, s in zip(keys[2:], [(e, d, i), (e, d, i), (e, i, d)], strict=True)
    )
    _, weights, experts = moe.route(x.reshape(-1, d), router, k)
    weights, experts = weights.reshape(b, t, k), experts.reshape(b, t, k)
    valid = jnp.ones((b, t), bool)

    def flat(fn):
        def run(x, weights, experts, *w):
            return fn(x.reshape(-1, d), weights.reshape(-1, k), experts.reshape(-1, k), *w)

        return lambda *a: run(*a).reshape(b, t, d)

    def ep(cf):
        def run(x, weights, experts, *w):
            layout = moe_dispatch.resolve_mode("all_to_all", b, t, w[0].shape, w[2].shape)
            return moe_dispatch.expert_parallel(x, weights, experts, valid, *w, layout, cf)[0]

        return run

    ep_mesh = sharding.make_mesh(fsdp=1, expert=8)
    dp_mesh = sharding.make_mesh(data=8, fsdp=1)
    variants = [
        ("all_to_all EP, dropless", ep_mesh, ep(None)),
        (f"all_to_all EP, cf={args.capacity_factor}", ep_mesh, ep(args.capacity_factor)),
        ("replicated experts", dp_mesh, ep(None)),
        ("replicated, GSPMD (mode=local)", dp_mesh, flat(moe.grouped_experts)),
        ("dense loop", dp_mesh, flat(dense_loop)),
    ]
    return (x, weights, experts, *w), variants


def step_fn(fn, mesh, args_):
    """jit of value-and-grad (x and the three weights) with the table's shardings."""
    tok = sharding.logical_spec(("batch", "length"), args_[0].shape[:2], mesh)
    tok3 = NamedSharding(mesh, P(*tok, None))
    w_in = NamedSharding(
        mesh, sharding.logical_spec(("experts", "embed", "mlp"), args_[3].shape, mesh)
    )
    w_out = NamedSharding(
        mesh, sharding.logical_spec(("experts", "mlp", "embed"), args_[5].shape, mesh)
    )
    shardings = (tok3, tok3, tok3, w_in, w_in, w_out)

    def loss(x, weights, experts, *w):
        y = fn(x, weights, experts, *w)
        return jnp.sum(y * y), y

    grad = jax.value_and_grad(loss, argnums=(0, 3, 4, 5), has_aux=True)
    with sharding.use_mesh(mesh):
        jitted = jax.jit(grad, in_shardings=shardings)
        placed = jax.device_put(args_, shardings)
        compiled = jitted.lower(*placed).compile()
    return compiled, placed


def measure(compiled, placed, repeats):
    out = compiled(*placed)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*placed))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


NOTES = """Reading it: on XLA:CPU `ragged_dot` is a masked dense product over every group, so a
grouped matmul over R rows costs R x (local experts) expert-rows. Dropless all-to-all receives
the worst case P*m rows per device on E/P experts: the same work as replicated experts (m rows
on E experts), i.e. k times the dense loop (N tokens on E experts), plus the exchange. The capacity
buffer (1.25*m rows) removes that padding, hence its lead. `mode=local` under GSPMD replicates
the global sort and all expert work on every device (~8x): `auto` therefore never uses it on
a multi-device mesh. On TPU/GPU the grouped matmul skips empty rows and the ranking changes;
these CPU figures check overheads and correctness, not accelerator speed."""


def table(args, rows) -> str:
    ref = next(r for r in rows if r[0] == "dense loop")[1]
    lines = [
        f"{args.batch * args.seq} tokens (batch {args.batch} x seq {args.seq}), D={args.dim}, "
        f"E={args.experts}, top-{args.top_k}, expert width {args.width}, float32, "
        f"forward+backward, 8 simulated CPU devices, median of {args.repeats}",
        "",
        "| variant | step ms | vs dense loop | max rel. diff of y | dropped rows |",
        "|---|---|---|---|---|",
    ]
    for name, sec, diff, dropped in rows:
        lines.append(f"| {name} | {sec * 1e3:.1f} | {ref / sec:.2f}x | {diff:.1e} | {dropped} |")
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md; other sections untouched."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    body = f"{SECTION}\n\n{text}\n"
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        nxt = rest.find("\n## ")
        tail = "" if nxt < 0 else rest[nxt + 1 :]
        new = head + body + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--capacity_factor", type=float, default=1.25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = ap.parse_args()
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 simulated devices, found {jax.device_count()}")

    inputs, variants = build(args)
    rows, outs = [], {}
    for name, mesh, fn in variants:
        compiled, placed = step_fn(fn, mesh, inputs)
        sec, ((_, y), _) = measure(compiled, placed, args.repeats)
        outs[name] = y
        print(f"{name:28s} {sec * 1e3:9.1f} ms", flush=True)
        rows.append([name, sec, 0.0, "-"])
    ref = outs["dense loop"]
    scale = float(jnp.max(jnp.abs(ref)))
    for row in rows:
        row[2] = float(jnp.max(jnp.abs(outs[row[0]] - ref))) / scale
        if "dropless" in row[0] or row[0] == "replicated experts":
            row[3] = "0"
        elif "cf=" in row[0]:
            row[3] = _dropped_count(args, inputs)
    text = table(args, rows)
    stamp = datetime.date.today().isoformat()
    text += f"\n\n{platform.machine()} host, jax {jax.__version__}, {stamp}. `python -m bench.moe`."
    text += f" Load average at the end: {os.getloadavg()[0]:.1f} (shared cores).\n\n{NOTES}"
    print()
    print(text)
    if args.write:
        write_section(text)
        print(f"\nwrote {RESULTS}")


def _dropped_count(args, inputs) -> str:
    x, weights, experts, *w = inputs
    b, t = x.shape[:2]
    valid = jnp.ones((b, t), bool)
    mesh = sharding.make_mesh(fsdp=1, expert=8)
    with sharding.use_mesh(mesh):
        layout = moe_dispatch.resolve_mode("all_to_all", b, t, w[0].shape, w[2].shape)
        _, dropped = jax.jit(
            lambda *a: moe_dispatch.expert_parallel(*a, valid, *w, layout, args.capacity_factor)
        )(x, weights, experts)
    total = b * t * args.top_k
    return f"{int(dropped)} of {total} ({100 * int(dropped) / total:.1f}%)"


if __name__ == "__main__":
    main()
