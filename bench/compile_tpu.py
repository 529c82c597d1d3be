"""The eight presets' pod recipes compiled by the TPU compiler on their slices (calibration).

    python bench/compile_tpu.py [--only 0_8b,2b] [--timeout 900]     # one subprocess each

For each configs/qwen3_5_<preset>.py on the slice its docstring names: the compiler's bytes per
chip (arguments + temporaries + outputs - aliased + code, `launch.compile`), the planner's
(`launch/plan.py`), their ratio, compile time and the collectives of one step per chip. One
markdown row per preset (bench/RESULTS.md). Run it `nice`d: each compile takes minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 1024**3
SLICES = {  # the slice each recipe is sized for (its docstring)
    "0_8b": "v5p-32",
    "2b": "v5p-64",
    "4b": "v5p-128",
    "9b": "v5p-256",
    "27b": "v5p-512",
    "35b_a3b": "v5p-256",
    "122b_a10b": "v5p-1024",
    "397b_a17b": "v5p-2048",
}


def one(preset: str) -> dict:
    """Compiles one preset's recipe in this process; its figures as a dict."""
    sys.argv = [sys.argv[0], f"--config={ROOT}/configs/qwen3_5_{preset}.py"]
    from absl import flags  # noqa: PLC0415

    from launch import compile as tpu_compile  # noqa: PLC0415
    from train import config_schema  # noqa: PLC0415
    from train import main as train_main  # noqa: PLC0415

    train_main.parse_flags(sys.argv)
    config = flags.FLAGS.config
    tpu_compile.fill_data_inputs(config)
    config_schema.validate(config)
    topology = tpu_compile.topology_of(SLICES[preset])
    devices = tpu_compile.tpu_devices(topology)
    result = tpu_compile.compile_step(config, devices)
    planned, _ = tpu_compile.planner_total(config, "v5p", len(devices))
    total = result.memory.total if result.memory else result.required
    return {
        "preset": preset,
        "slice": SLICES[preset],
        "chips": len(devices),
        "mesh": result.mesh,
        "batch": config.train.batch_size,
        "compiler_gib": total / GiB if total else None,
        "fits": result.memory is not None,
        "temp_gib": result.memory.temporaries / GiB if result.memory else None,
        "planner_gib": planned / GiB if planned else None,
        "compile_s": result.lower_s + result.compile_s,
        "collectives_gib": {k: c.bytes / GiB for k, c in result.collectives.items()},
        "collectives_n": {k: c.count for k, c in result.collectives.items()},
    }


def row(r: dict) -> str:
    ratio = r["compiler_gib"] / r["planner_gib"] if r["compiler_gib"] and r["planner_gib"] else 0
    comms = ", ".join(
        f"{k} {v:.1f}" for k, v in r["collectives_gib"].items() if r["collectives_n"][k]
    )
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
    fits = "fits" if r["fits"] else "**refused**"
    return (
        f"| {r['preset']} | {r['slice']} ({r['chips']}) | {mesh} | {r['batch']} | "
        f"{r['compiler_gib']:.1f} ({fits}) | {r['planner_gib']:.1f} | {ratio:.2f} | "
        f"{r['compile_s']:.0f} s | {comms or '-'} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SLICES), help="comma-separated presets")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per preset")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one)), flush=True)
        return
    print("| preset | slice (chips) | mesh | batch | compiler GiB/chip | planner GiB/chip | ratio "
          "| compile | collectives GiB/step/chip |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for preset in args.only.split(","):
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                [sys.executable, __file__, "--one", preset],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            print(f"| {preset} | {SLICES[preset]} | skipped: > {args.timeout:.0f} s |", flush=True)
            continue
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            err = (p.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {preset} | failed after {time.perf_counter() - t0:.0f} s: {err} |")
            continue
        print(row(json.loads(lines[0][len("RESULT ") :])), flush=True)


if __name__ == "__main__":
    main()
