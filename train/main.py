"""Pretraining entry point.

    python -m train.main --workdir=DIR [--config=configs/<file>.py] [--config.a.b=value ...]

Without --config the embedded default runs (configs/default.py: a tiny hybrid MoE with MTP on
the Python standard library's sources, a few minutes on a CPU). Every key of the config can be
overridden; a misspelled key or a value of the wrong type or range is refused before any compute,
naming the key. Rerunning the same command in the same workdir resumes from the latest complete
checkpoint. The keys are documented in train/config_schema.py.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import logging as std_logging
import os
import runpy
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.py")
# the flags, also read by `python -m train.rl` (train/rl/__main__.py)
CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training config file (see configs/).", lock_config=True
)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
CHECK_CONFIG = flags.DEFINE_bool(
    "check_config", False, "Validate the config and overrides, print one line and exit (no JAX)."
)
VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Expected failures also print their traceback (and library logs)."
)


def unknown_override(argv: list[str]) -> str | None:
    """The first `--config.<path>` override whose path is not a key, with a suggestion."""
    default = None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        if default is None:
            config_path = next(
                (a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), _DEFAULT_CONFIG
            )
            file, _, arg = config_path.partition(":")
            get_config = runpy.run_path(file)["get_config"]
            default = get_config(arg) if arg else get_config()
        from train.config_schema import moved_key  # noqa: PLC0415

        if moved_key(path):
            return moved_key(path)
        node = default
        for i, part in enumerate(path.split(".")):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                prefix = ".".join(path.split(".")[:i])
                close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
                dotted = f"{prefix}." if prefix else ""
                hint = f"; did you mean {dotted}{close[0]}?" if close else ""
                return f"unknown config key {path!r}{hint}"
            node = node[part]
    return None


def _config_file_and_variant(argv: list[str]) -> tuple[str, str]:
    path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    file, _, variant = (path or _DEFAULT_CONFIG).partition(":")
    return file, variant


def check_variant(argv: list[str]) -> str | None:
    """Why `--config=FILE:VARIANT` names no variant of FILE (its `VARIANTS`), else None."""
    file, variant = _config_file_and_variant(argv)
    if not variant or not os.path.isfile(file):
        return None
    module = runpy.run_path(file)
    known = module.get("VARIANTS")
    if not inspect.signature(module["get_config"]).parameters:
        return f"--config={file}:{variant}: {file} has no variants (drop ':{variant}')"
    if known is not None and variant not in known:
        return f"--config={file}:{variant}: unknown variant {variant!r}; known: {', '.join(known)}"
    return None


def config_help(argv: list[str], usage: str | None = None) -> str:
    """`usage` (default: this module's docstring), then every config key with its default (the
    chosen --config file's values), grouped by section."""
    file, variant = _config_file_and_variant(argv)
    get_config = runpy.run_path(file)["get_config"]
    config = get_config(variant) if variant else get_config()
    lines = [(usage or __doc__).strip(), "", f"Config keys (defaults of {os.path.relpath(file)}"]
    lines[-1] += f":{variant}):" if variant else "):"

    def walk(node: Any, prefix: str) -> None:
        for key in sorted(node.keys()):
            value = node[key]
            if hasattr(value, "keys") and value is not None:
                if not prefix:
                    lines.append(f"  [{key}]")
                walk(value, f"{prefix}{key}.")
            else:
                lines.append(f"    --config.{prefix}{key}={value!r}")

    walk(config, "")
    lines += ["", "Flags: --workdir=DIR (required), --config=FILE[:VARIANT], --check_config,"]
    lines += ["       --verbose (tracebacks of expected failures)"]
    return "\n".join(lines)


def parse_flags(argv: list[str], usage: str | None = None) -> list[str]:
    """absl flag parsing that reports bad config overrides as one clean line; --help prints
    `config_help(argv, usage)` and exits 0."""
    if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in argv[1:]):
        print(config_help([a for a in argv if a not in ("--help", "-h")], usage))
        sys.exit(0)
    bad_variant = check_variant(argv)
    if bad_variant:
        sys.exit(f"error: {bad_variant}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        reason = unknown_override(argv) or f"bad config override: {e}"
        sys.exit(f"error: {reason}")


def _quiet_abandoned_coroutines(unraisable: Any) -> None:
    """Drops the "Exception ignored in: <coroutine ...>" tracebacks of orbax's reads left behind
    by a failed restore (reported once by the checkpointer); other ones print as usual."""
    if inspect.iscoroutine(unraisable.object):
        return
    sys.__unraisablehook__(unraisable)


def disk_full(e: BaseException | None) -> OSError | BaseException | None:
    """The exception in `e`'s chain that says the disk (or quota) is full, else None: an OSError
    with ENOSPC / EDQUOT, or a tensorstore error whose text says so."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if any(s in str(e) for s in ("No space left on device", "Disk quota exceeded")):
            return e
        e = e.__cause__ or e.__context__
    return None


def _drop_disk_full_tracebacks(record: std_logging.LogRecord) -> bool:
    """Orbax logs the traceback of a failed background save before train.main says it in one
    line (the disk is full: an expected failure)."""
    return not (record.exc_info and disk_full(record.exc_info[1]))


def _exit_now(line: str) -> None:
    """Prints `line` and exits 1 without interpreter teardown: orbax/tensorstore reads abandoned
    by a failed restore would otherwise print "Event loop is closed" tracebacks from their
    threads while Python shuts down (nothing is left to save or flush on these paths)."""
    print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def cli_main(
    argv: list[str],
    validate: Callable[[Any], Any],
    check_line: Callable[[Any], str],
    runner: Callable[[], tuple[Callable[[Any, str], Any], tuple[type[BaseException], ...]]],
) -> None:
    """An entry point's main() (this module's, and `python -m train.rl`'s): quiet library logs,
    the flags' checks, `validate(config)` before any compute (--check_config prints
    `check_line(config)`), jax.distributed, the mesh's device count, the workdir lock, then
    `run(config, workdir)` where `runner() -> (run, expected errors)` imports the loop only now.
    Expected failures (those, a bad config, an unusable checkpoint, a held workdir, a full disk)
    print one line (their traceback with --verbose)."""
    if not flags.FLAGS["verbosity"].present and not VERBOSE.value:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        # a failed restore leaves orbax's sibling reads as "Task exception was never
        # retrieved" tracebacks; the checkpointer reports the failure itself, in one line
        std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
        sys.unraisablehook = _quiet_abandoned_coroutines
        logging.get_absl_logger().addFilter(_drop_disk_full_tracebacks)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if "://" in WORKDIR.value:
        sys.exit(
            f"error: --workdir={WORKDIR.value!r}: object-store URLs are not supported (config, "
            "metrics, data statistics and the tokenizer are written with local file APIs; this "
            f"would create a local directory {WORKDIR.value.split('://')[0] + ':'!r} on every "
            "host). Use a path every host shares: a gcsfuse mount of the bucket (e.g. "
            "/gcs/BUCKET/run), Filestore or NFS."
        )
    # Everything is validated before JAX does any work.
    from train import config_schema  # noqa: PLC0415

    config = CONFIG.value
    try:
        validate(config)
        if CHECK_CONFIG.value:
            print(check_line(config))
            return
        import jax  # noqa: PLC0415

        from qwen35_jax import distributed  # noqa: PLC0415

        distributed.initialize_distributed()  # joins the other processes of a multi-host job
        jax.config.update("jax_threefry_partitionable", True)
        config_schema.mesh_devices_check(config, jax.device_count())
    except config_schema.ConfigValueError as e:
        sys.exit(f"error: invalid config: {e}")

    from train import workdir_lock  # noqa: PLC0415
    from train.checkpointing import NoUsableCheckpointError  # noqa: PLC0415

    run, expected = runner()
    try:
        with workdir_lock.hold(
            WORKDIR.value, process_index=jax.process_index(), processes=jax.process_count()
        ):
            run(config, WORKDIR.value)
    except (
        *expected,
        config_schema.ConfigValueError,
        NoUsableCheckpointError,
        workdir_lock.WorkdirLockedError,
    ) as e:
        if VERBOSE.value:
            raise
        _exit_now(f"error: {e}")
    except Exception as e:
        full = disk_full(e)
        if full is None or VERBOSE.value:
            raise
        where = getattr(full, "filename", None) or "to the workdir"
        _exit_now(
            f"error: no space left writing {where}; the last complete checkpoint is kept: free "
            "space and rerun the same command to resume"
        )
    except KeyboardInterrupt:
        sys.exit("interrupted (second Ctrl-C): not saved; the last checkpoint is kept")


def _pretraining():
    from train import loop  # noqa: PLC0415

    return loop.run, (loop.NonFiniteLossError, loop.DivergedError)


def main(argv: list[str]) -> None:
    from train import config_schema  # noqa: PLC0415

    def check_line(config) -> str:
        return (
            f"config ok: {config.model.text_config.num_hidden_layers} layers, "
            f"train.steps={config.train.steps}, workdir {WORKDIR.value}"
        )

    cli_main(argv, config_schema.validate, check_line, _pretraining)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
