"""Command line: convert checkpoints between Hugging Face safetensors and orbax.

    python -m qwen35_jax.convert hf-to-orbax --hf_dir DIR --out DIR [--dtype bfloat16|float32]
        [--mesh fsdp=64,expert=8]      # chunk the arrays so no chunk spans two devices' shards
    python -m qwen35_jax.convert orbax-to-hf --ckpt DIR --out DIR [--max_shard_bytes N]
        [--dtype bfloat16|float32]     # DIR: a converted checkpoint, or a train.main workdir
                                       # (its newest step) or step dir (WORKDIR/checkpoints/N)

Exits 0 on success; on a bad checkpoint or config prints one message (every missing,
unexpected or mis-shaped key, every unreadable shard by file name) and exits 1, leaving no
output directory behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run one conversion; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m qwen35_jax.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face safetensors -> orbax checkpoint")
    a.add_argument("--hf_dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="default: keep source"
    )
    a.add_argument(
        "--mesh",
        default=None,
        help="target mesh, e.g. fsdp=64,expert=8 (axes data, fsdp, tensor, expert, sequence, "
        "dcn_<axis>): chunks no larger than one device's shard",
    )
    a.add_argument("--no_progress", action="store_true")
    b = sub.add_parser("orbax-to-hf", help="orbax checkpoint -> Hugging Face safetensors")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--max_shard_bytes", type=int, default=None)
    b.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: the source dtypes (converted) or the stored float32 (train.main)",
    )
    b.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)

    from qwen35_jax.config import ConfigError
    from qwen35_jax.convert import orbax_io
    from qwen35_jax.convert.hf import CheckpointError
    from qwen35_jax.convert.safetensors_io import SafetensorsError
    from qwen35_jax.sharding import parse_mesh

    def stop(signum, frame):  # SIGTERM: unwind, so the partial output is removed
        del frame
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    try:
        if args.command == "hf-to-orbax":
            mesh = parse_mesh(args.mesh) if args.mesh else None
            out = orbax_io.hf_to_orbax(
                args.hf_dir,
                args.out,
                dtype=args.dtype,
                progress=not args.no_progress,
                mesh=mesh,
            )
        else:
            out = orbax_io.orbax_to_hf(
                args.ckpt,
                args.out,
                max_shard_bytes=args.max_shard_bytes or orbax_io.DEFAULT_SHARD_BYTES,
                progress=not args.no_progress,
                dtype=args.dtype,
            )
    except (
        CheckpointError,
        ConfigError,
        SafetensorsError,
        FileExistsError,
        OSError,
        ValueError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'Ctrl-C'}): the partial output was removed", file=sys.stderr)
        return 130
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
