"""One run per workdir: `<workdir>/.lock` names the holder while a run uses the workdir.

    {"host": "...", "pid": 1234, "started": "2026-11-30T00:00:00Z", "processes": 2}

Only process 0 of a run takes the lock (the processes of one multi-process run share their
workdir and never refuse each other). The file is created exclusively (`O_CREAT | O_EXCL`), so of
two runs starting together exactly one gets it; it is removed when the run ends (also on error,
SIGTERM or Ctrl-C). A second run finding it is refused in one line naming the holder. A lock
whose holder is gone (same host, the pid no longer runs: a SIGKILL, a crash) is taken over with
a message; a holder on another host cannot be checked from here, so the message says which file
to remove once that run is known to be dead.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator

from qwen35_jax.convert.orbax_layout import process_alive

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(workdir: str, processes: int = 1) -> str:
    """Creates the lock (taking over a dead holder's); returns its path or raises
    `WorkdirLockedError` naming the holder."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "processes": processes,
    }
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            host, pid = holder.get("host"), holder.get("pid")
            if host == me["host"] and isinstance(pid, int) and not process_alive(pid):
                print(
                    f"taking over {path}: its holder (pid {pid} on {host}) is no longer running",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            who = f"pid {pid} on {host}" if host else "an unknown process (unreadable lock)"
            since = f" since {holder['started']}" if "started" in holder else ""
            raise WorkdirLockedError(
                f"--workdir={workdir}: another run ({who}{since}) is using it; wait for it to "
                f"end, or remove {path} if that run is dead"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise WorkdirLockedError(f"--workdir={workdir}: could not take {path}")


def release(path: str) -> None:
    """Removes the lock if this process holds it."""
    if _holder(path).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, *, process_index: int = 0, processes: int = 1) -> Iterator[None]:
    """The lock for the body, on process 0 only (see the module docstring)."""
    if process_index != 0:
        yield
        return
    path = acquire(workdir, processes)
    try:
        yield
    finally:
        release(path)
