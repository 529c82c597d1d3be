"""TensorBoard event files through tensorboardX (a kept, pure-Python writer; no TensorFlow).

    writer = TensorBoardWriter("<workdir>/tensorboard", purge_step=None)
    writer.text("config", "<the resolved config as JSON>")    a text summary (step 0)
    writer.scalars(step, {"loss": 2.5, "eval_loss": 2.7})     one scalar summary per tag
    writer.close()

`purge_step` (a resumed run): TensorBoard drops the earlier files' events of steps >= it (a
SessionLog START at that step), since a run resumed from its checkpoint logs those steps again.
Every call is flushed, so a crash loses nothing already logged. TensorBoard pointed at a sweep
directory shows each run under its own directory name (launch/sweep.py names them readably).
"""

from __future__ import annotations

import itertools
import os
import time

from tensorboardX import SummaryWriter

_WRITERS = itertools.count()  # tensorboardX names files by second and host: add pid and a count


class TensorBoardWriter:
    """Scalars and text into a fresh events file in `logdir`."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        # tensorboard reads a directory's files in name order, and the name starts with the
        # second: nanoseconds, pid and a zero-padded count keep a resumed run's file after the
        # one it supersedes (an unpadded count put writer 10 before writer 9)
        suffix = f".{time.time_ns()}.{os.getpid()}.{next(_WRITERS):06d}"
        self._w = SummaryWriter(
            logdir=logdir, purge_step=purge_step, flush_secs=10**6, filename_suffix=suffix
        )
        self._w.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._w.add_scalar(tag, float(value), global_step=int(step))
        self._w.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text summary; markdown in TensorBoard, so JSON is shown as a code block."""
        self._w.add_text(tag, text, global_step=step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()
