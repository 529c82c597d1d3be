"""Ablation sweeps: one `train.main` run per combination of config overrides.

    python -m launch.sweep --config=configs/default.py --workdir=DIR \
        --sweep 'optimizer.lr=1e-3,3e-3' --sweep 'model.text_config.full_attention_interval=2,4' \
        [--zip] [--dry-run] [--launcher=local|tpu_pod|slurm] [--launcher_args='...'] [--submit] \
        [-- other train.main flags, e.g. --config.train.steps=200]
    python -m launch.sweep --sweep_file=configs/sweeps/default_ablation.py --workdir=DIR

Each `--sweep KEY=V1,V2,...` is one axis (values split at top-level commas: `(1,2),(3,4)` is two
tuples). The runs are the cartesian product of the axes (`--zip`: the i-th values together; the
axes must then have equal lengths). Run i trains in `DIR/<name>`, its name made from its
overrides: the key's last part (the whole key where two axes share it) `=` the value, joined by
`_`, e.g. `lr=1e-3_full_attention_interval=2`. TensorBoard on DIR shows the runs under these
names; `python -m train.compare DIR` tabulates and plots them.

Before anything runs, every run's config is built as train.main builds it (the config file, its
overrides, the `--config.*` flags after `--`) and validated: a bad key or value in any run refuses
the whole sweep, naming the run and the key. DIR/sweep.json records the runs.

Launchers:
    local    (default) the runs one after another in this machine's Python: a finished run
             (DIR/<name>/run_summary.json at train.steps) is skipped, an interrupted one resumes
             from its checkpoints (train.main does); the sweep goes on after a failed run and
             exits 1 naming the failed ones.
    tpu_pod  prints one `launch/tpu_pod.sh LAUNCHER_ARGS -- <train.main flags>` per run
    slurm    prints one `sbatch --job-name=<name> LAUNCHER_ARGS launch/gpu_slurm.sbatch ...`
             per run
    With --submit the pod/cluster commands are run (one after another), not only printed.
--dry-run prints what each run would do (and its command), runs nothing.

A sweep file (configs/sweeps/*.py) holds the same grammar as module constants:
    CONFIG = "configs/default.py"; SWEEP = ["optimizer.lr=1e-3,3e-3", ...]; ZIP = False;
    FLAGS = ["--config.train.steps=150", ...]  (train.main flags for every run)
Flags given on the command line add to (and for --config, replace) the file's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from typing import Any, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.relpath(os.path.join(ROOT, "configs", "default.py"))
LAUNCHERS = ("local", "tpu_pod", "slurm")


class SweepError(ValueError):
    """A sweep that cannot run; the message names the run, axis or key."""


class Run(NamedTuple):
    name: str
    overrides: tuple[tuple[str, str], ...]  # (dotted key, value as written)

    def flags(self) -> list[str]:
        return [f"--config.{k}={v}" for k, v in self.overrides]


def split_values(text: str) -> list[str]:
    """`a,b,(c,d),"e,f"` -> ['a', 'b', '(c,d)', '"e,f"']: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_axis(spec: str) -> tuple[str, list[str]]:
    """'optimizer.lr=1e-3,3e-3' -> ('optimizer.lr', ['1e-3', '3e-3'])."""
    key, sep, values = spec.partition("=")
    key = key.strip().removeprefix("--config.").removeprefix("config.")
    if not sep or not key or not values.strip():
        raise SweepError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. optimizer.lr=1e-3,3e-3)")
    vals = split_values(values)
    if any(v == "" for v in vals):
        raise SweepError(f"--sweep {spec!r}: an empty value")
    if len(set(vals)) != len(vals):
        raise SweepError(f"--sweep {spec!r}: a value is repeated")
    return key, vals


def _name_part(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", value.strip("\"'")) or "x"


def make_runs(axes: list[tuple[str, list[str]]], zipped: bool = False) -> list[Run]:
    """The runs of the axes (cartesian product, or zipped), each with its readable name."""
    if not axes:
        raise SweepError("no --sweep axis (or SWEEP in the sweep file): nothing to vary")
    keys = [k for k, _ in axes]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SweepError(f"--sweep: key {dup[0]} is swept twice")
    lasts = [k.split(".")[-1] for k in keys]
    short = [last if lasts.count(last) == 1 else k for k, last in zip(keys, lasts, strict=True)]
    if zipped:
        lengths = {len(v) for _, v in axes}
        if len(lengths) > 1:
            shown = ", ".join(f"{k}: {len(v)}" for k, v in axes)
            raise SweepError(f"--zip needs axes of one length ({shown})")
        combos = list(zip(*(v for _, v in axes), strict=True))
    else:
        combos = list(itertools.product(*(v for _, v in axes)))
    runs = []
    for combo in combos:
        name = "_".join(f"{s}={_name_part(v)}" for s, v in zip(short, combo, strict=True))
        runs.append(Run(name, tuple(zip(keys, combo, strict=True))))
    names = [r.name for r in runs]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise SweepError(f"two runs would share the directory name {clash[0]!r}; change a value")
    return runs


def build_config(config_path: str, flags_: list[str]) -> Any:
    """The config train.main would run with `--config=config_path` and `flags_` (--config.*)."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    argv = ["sweep", f"--config={config_path}", *flags_]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", config_path, "config", flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config


def validate_runs(config_path: str, runs: list[Run], extra: list[str]) -> dict[str, Any]:
    """Every run's config, validated; the first bad one raises SweepError naming run and key."""
    from train import config_schema  # noqa: PLC0415
    from train.main import unknown_override  # noqa: PLC0415

    file = config_path.partition(":")[0]
    if not os.path.isfile(file):
        raise SweepError(f"--config={config_path}: no such file")
    config_flags_ = [f for f in extra if f.startswith("--config.")]
    configs = {}
    for run in runs:
        flags_ = [*config_flags_, *run.flags()]
        try:
            config = build_config(config_path, flags_)
            config_schema.validate(config)
        except config_schema.ConfigValueError as e:
            raise SweepError(f"run {run.name}: invalid config: {e}") from None
        except Exception as e:  # noqa: BLE001 - absl / ml_collections parse errors, named
            argv = ["sweep", f"--config={config_path}", *flags_]
            reason = unknown_override(argv) or f"bad config override: {e}"
            raise SweepError(f"run {run.name}: {reason}") from None
        configs[run.name] = config
    return configs


def is_finished(run_dir: str, steps: int) -> bool:
    """Whether the run in `run_dir` reached `steps` (its run_summary.json, train/loop.py)."""
    try:
        with open(os.path.join(run_dir, "run_summary.json")) as f:
            summary = json.load(f)
        return int(summary.get("step", 0)) >= steps and not summary.get("preempted")
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def train_command(config_path: str, run_dir: str, run: Run, extra: list[str]) -> list[str]:
    """The train.main flags of one run (after `python -m train.main`)."""
    return [f"--config={config_path}", f"--workdir={run_dir}", *run.flags(), *extra]


def launcher_command(
    launcher: str, launcher_args: list[str], run: Run, flags_: list[str]
) -> list[str]:
    if launcher == "local":
        return [sys.executable, "-m", "train.main", *flags_]
    if launcher == "tpu_pod":
        return ["launch/tpu_pod.sh", *launcher_args, "--", *flags_]
    return ["sbatch", f"--job-name={run.name}", *launcher_args, "launch/gpu_slurm.sbatch", *flags_]


def parse_args(argv: list[str]) -> argparse.Namespace:
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m launch.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    p.add_argument("--config", default=None, help=f"config file (default {DEFAULT_CONFIG})")
    p.add_argument("--workdir", required=True, help="sweep directory: one run dir per run")
    p.add_argument("--sweep", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
    p.add_argument("--sweep_file", default=None, help="configs/sweeps/*.py")
    p.add_argument("--zip", action="store_true", help="zip the axes instead of their product")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS)
    p.add_argument("--launcher_args", default="", help="flags for tpu_pod.sh / sbatch (quoted)")
    p.add_argument("--submit", action="store_true", help="run the pod/cluster commands")
    args = p.parse_args(argv)
    args.extra = rest
    return args


def _from_file(args: argparse.Namespace) -> tuple[str, list[str], bool, list[str]]:
    config, axes, zipped, extra = args.config, list(args.sweep), args.zip, list(args.extra)
    if args.sweep_file:
        try:
            module = runpy.run_path(args.sweep_file)
        except OSError as e:
            raise SweepError(f"--sweep_file={args.sweep_file}: {e.strerror}") from None
        if not isinstance(module.get("SWEEP", None), (list, tuple)):
            raise SweepError(f"--sweep_file={args.sweep_file}: no SWEEP list of 'KEY=V1,V2' axes")
        config = config or module.get("CONFIG")
        if config and not os.path.isfile(config.partition(":")[0]):  # relative to the checkout
            config = os.path.relpath(os.path.join(ROOT, config))
        axes = [*module["SWEEP"], *axes]
        zipped = zipped or bool(module.get("ZIP", False))
        extra = [*module.get("FLAGS", []), *extra]
    return config or DEFAULT_CONFIG, axes, zipped, extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config_path, specs, zipped, extra = _from_file(args)
        if any(f.startswith(("--workdir", "--config=")) for f in extra):
            raise SweepError("give --workdir and --config to the sweep, not after `--`")
        runs = make_runs([parse_axis(s) for s in specs], zipped)
        configs = validate_runs(config_path, runs, extra)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sweep_dir = os.path.abspath(args.workdir)
    launcher_args = shlex.split(args.launcher_args)
    print(f"sweep: {len(runs)} runs of {config_path} in {sweep_dir} (all configs valid)")
    if not args.dry_run:
        os.makedirs(sweep_dir, exist_ok=True)
        record = {
            "config": config_path,
            "flags": extra,
            "runs": [{"name": r.name, "overrides": dict(r.overrides)} for r in runs],
        }
        with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
            json.dump(record, f, indent=1)
    failed = []
    for i, run in enumerate(runs, 1):
        run_dir = os.path.join(sweep_dir, run.name)
        cmd = launcher_command(
            args.launcher, launcher_args, run, train_command(config_path, run_dir, run, extra)
        )
        head = f"[{i}/{len(runs)}] {run.name}"
        if args.launcher == "local":
            if is_finished(run_dir, configs[run.name].train.steps):
                print(f"{head}: finished, skipped")
                continue
            state = "resumes" if os.path.isdir(run_dir) else "starts"
            print(f"{head}: {state}" + (f": {shlex.join(cmd)}" if args.dry_run else ""), flush=True)
            if args.dry_run:
                continue
            if subprocess.run(cmd).returncode != 0:
                failed.append(run.name)
                print(f"{head}: failed", flush=True)
        else:
            print(shlex.join(cmd), flush=True)
            if args.submit and not args.dry_run and subprocess.run(cmd).returncode:
                failed.append(run.name)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if args.launcher == "local" and not args.dry_run:
        print(f"sweep done: python -m train.compare {sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
