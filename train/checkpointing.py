"""Checkpoints with orbax: async saves, keep-k, resume from the latest complete one, SIGTERM.

Layout: `<workdir>/<checkpoint.dir>/<step>/{state, data, integrity}`: `state` is the TrainState
(params, optimizer state, step, skipped count; orbax StandardSave), `data` the input iterator
state (train/data/iterator.py's handler: one JSON file per process, restored from all of them,
so a checkpoint resumes on another process count), both captured at the moment `save` is
called, and `integrity` (JSON) the per-array checksums of `state` (train/integrity.py).

Safety:
  * orbax writes a step into a temporary directory and renames it when complete, and deletes
    old steps (beyond `keep`) only after a new one is complete, so a save that fails or is cut
    short by a crash never touches the last good checkpoint.
  * On start, leftovers of interrupted saves (`*.orbax-checkpoint-tmp-*`) and step directories
    that do not restore are moved to `<dir>.incomplete/` with a warning, and the run resumes
    from the newest step that restores. If no step restores the run stops with an error rather
    than silently starting over (the likely cause is a changed model config).
  * A state with NaN/Inf is never saved (`NonFiniteStateError`). After a restore the checksums
    are recomputed on the devices: a step whose arrays no longer match what was saved (bytes
    flipped on disk that still decode), or that holds NaN/Inf, is moved to `<dir>.corrupt/`
    with one warning line and the run falls back to the previous step. Steps are only ever
    moved aside after an older one has restored intact, so the last good checkpoint stays.
  * `PreemptionGuard` turns SIGTERM and Ctrl-C (SIGINT) into a flag; the loop then saves and
    exits cleanly; with several processes they agree to stop together (train/step_gate.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from train import integrity
from train.data.iterator import DataLayoutError, DataRestore, DataSave, StateSnapshot

_TMP_MARKER = ".orbax-checkpoint-tmp"
_INTEGRITY = "integrity"


class NonFiniteStateError(RuntimeError):
    """A save was asked for a state holding NaN/Inf; nothing was written."""


class NoUsableCheckpointError(RuntimeError):
    """The workdir holds checkpoints but none restores (changed config, or all corrupt)."""


class Checkpointer:
    """Async orbax CheckpointManager over `directory` for (TrainState, data iterator)."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._keep = keep
        self._async = async_save
        self._last_saved: int | None = None
        os.makedirs(self.directory, exist_ok=True)
        for name in sorted(os.listdir(self.directory)):
            if _TMP_MARKER in name:
                logging.warning(
                    "checkpoint %s was left incomplete (interrupted save); skipped", name
                )
                self._set_aside(name)
        self._mngr = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, enable_async_checkpointing=self._async, create=True
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def _set_aside(self, name: str, kind: str = "incomplete") -> None:
        if jax.process_index() != 0:
            return
        aside = f"{self.directory}.{kind}"
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, name)
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.move(os.path.join(self.directory, name), target)

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore_latest(self, abstract_state: Any, data_iter: Any) -> tuple[Any, int] | None:
        """(state, step) from the newest step that restores (data_iter set too), else None.

        Steps newer than the one restored are unreadable: they are set aside with a warning.
        """
        steps = sorted(self._mngr.all_steps(), reverse=True)
        failed: list[tuple[int, str]] = []
        corrupt: list[int] = []
        for step in steps:
            items = {
                "state": ocp.args.StandardRestore(abstract_state),
                "data": DataRestore(data_iter),
            }
            has_sums = os.path.isdir(os.path.join(self.directory, str(step), _INTEGRITY))
            if has_sums:
                items[_INTEGRITY] = ocp.args.JsonRestore()
            mismatch = _stored_shapes_differ(
                os.path.join(self.directory, str(step), "state"), abstract_state
            )
            if mismatch:  # refused from the metadata: no read is started (none left abandoned)
                logging.warning("checkpoint step %d cannot restore, skipped: %s", step, mismatch)
                failed.append((step, mismatch))
                continue
            try:
                restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
            except DataLayoutError:
                raise  # readable, but this run's data layout cannot continue it
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                logging.warning(
                    "checkpoint step %d is incomplete or unreadable, skipped: %s", step, _short(e)
                )
                failed.append((step, _short(e)))
                continue
            problem = _verify(restored.state, restored[_INTEGRITY] if has_sums else None)
            if problem:
                warn(
                    f"warning: checkpoint step {step} is corrupt ({problem}); moved to "
                    f"{self.directory}.corrupt/{step}, falling back to an older step"
                )
                failed.append((step, problem))
                corrupt.append(step)
                continue
            for bad, _ in failed:
                self._set_aside(str(bad), "corrupt" if bad in corrupt else "incomplete")
            if failed:
                self._mngr = self._manager()
            return restored.state, step
        if failed:
            raise NoUsableCheckpointError(
                f"no checkpoint in {self.directory} restores (tried steps "
                f"{[s for s, _ in failed]}); the newest failed with: {failed[0][1]}. A changed "
                "model or optimizer config cannot resume these; use a new workdir."
            )
        return None

    def save(self, step: int, state: Any, data_iter: Any) -> None:
        """Starts an async save of `state` and the iterator's current position at `step`."""
        if step == self._last_saved or step in self._mngr.all_steps():
            return
        finite, sums = integrity.digest(state)
        if not finite:
            raise NonFiniteStateError(
                f"step {step}: the train state holds NaN/Inf; not saved (the last checkpoint, "
                f"step {self.latest_step()}, is kept)"
            )
        self._last_saved = step
        snapshot = StateSnapshot(data_iter.get_state())  # orbax may write it later (async)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=DataSave(snapshot),
            **{_INTEGRITY: ocp.args.JsonSave({"finite": finite, "checksums": sums})},
        )
        self._mngr.save(step, args=args, force=True)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def warn(line: str) -> None:
    """One line on stderr (process 0): a recoverable problem the user should know about."""
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def _verify(state: Any, saved: dict | None) -> str | None:
    """What is wrong with a restored state (None: sound): NaN/Inf, or checksums that differ
    from the ones written at save time (`saved`; None for checkpoints written without)."""
    finite, sums = integrity.digest(state)
    if saved is not None:
        bad = integrity.mismatches(saved["checksums"], sums)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            return f"checksum mismatch in {', '.join(bad[:3])}{more}"
    if not finite:
        return "NaN/Inf in the restored arrays"
    return None


def _stored_shapes_differ(state_dir: str, abstract_state: Any) -> str | None:
    """A description of how the stored arrays' shapes differ from this run's state, or None
    (also when the metadata cannot be read: the restore then reports what is wrong)."""
    try:
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    except Exception:  # noqa: BLE001
        return None
    tree = getattr(meta, "tree", meta)
    stored = sorted(
        tuple(x.shape) for x in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    )
    wanted = sorted(tuple(x.shape) for x in jax.tree.leaves(abstract_state))
    if stored == wanted:
        return None
    only_stored = sorted(set(stored) - set(wanted))[:2]
    only_wanted = sorted(set(wanted) - set(stored))[:2]
    return (
        f"stored array shapes differ from this run's ({len(stored)} vs {len(wanted)} arrays; "
        f"stored only {only_stored}, this run only {only_wanted})"
    )


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 300 else text[:300] + "..."


def checkpoint_step_dir(path: str) -> str:
    """A step directory: `path` itself if it holds `state`, else its newest numeric subdir."""
    if os.path.isdir(os.path.join(path, "state")):
        return path
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    if not steps:
        raise FileNotFoundError(f"{path!r} is neither a checkpoint step dir nor holds any")
    return os.path.join(path, str(max(steps)))


class PreemptionGuard:
    """Context manager: SIGTERM or Ctrl-C (SIGINT) sets `requested` (the loop saves and exits)
    instead of killing; a second Ctrl-C interrupts at once (KeyboardInterrupt)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self._signals = signals
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        warn(f"received {name}: saving a checkpoint after this step and exiting")
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
