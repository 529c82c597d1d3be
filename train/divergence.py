"""What the loop does with non-finite steps: skip a few, stop a divergence, save only sound states.

The step (step.py) never lets NaN/Inf into the state: a step whose loss, gradient or update is
not finite leaves params and optimizer moments unchanged and counts as skipped. Here, per
finished step (read one step late, as the other metrics):

    nan_policy="stop"   the first skipped step stops the run (`NonFiniteLossError`)
    nan_policy="skip"   a skipped step is tolerated; `train.max_skips_in_a_row` (default 10)
                        skipped steps in a row mean the run has diverged and stops
                        (`DivergedError`), naming the first bad step and the last checkpoint to
                        resume from with a lower lr

`can_save()` is False while the newest finished step was skipped: a checkpoint written then
would hold the state every following batch has failed on, and enough of those would rotate the
last good checkpoints out (`checkpoint.keep`). The loop skips such saves; the next finite step's
saves go ahead.
"""

from __future__ import annotations

import math
from typing import Any


class NonFiniteLossError(RuntimeError):
    """nan_policy="stop" met a NaN/Inf loss, gradient or update; the last checkpoint is intact."""


class DivergedError(RuntimeError):
    """train.max_skips_in_a_row consecutive steps were skipped; nothing after the last good step
    was saved."""


def cause(metrics: dict[str, Any]) -> str:
    """Why a step was skipped, from its (host) metrics."""
    loss_ok = math.isfinite(float(metrics["objective"])) and math.isfinite(
        float(metrics["grad_norm"])
    )
    if loss_ok and not bool(metrics.get("update_finite", True)):
        return "the update would make the parameters or optimizer moments NaN/Inf"
    return "non-finite loss or gradient"


def skipped_save_note(last_ckpt: int | None) -> str:
    """What the end-of-run line says when the final save was skipped (last step not finite)."""
    where = f"step {last_ckpt}" if last_ckpt is not None else "none yet"
    return f"not saved (the last step was skipped as non-finite); latest checkpoint: {where}"


class DivergenceMonitor:
    """Counts skipped steps in a row and applies `nan_policy`."""

    def __init__(self, nan_policy: str, max_in_a_row: int):
        self.nan_policy = nan_policy
        self.max_in_a_row = max_in_a_row
        self.first_bad: int | None = None  # first step of the current run of skipped steps
        self.in_a_row = 0

    def can_save(self) -> bool:
        """Whether the newest finished step left a state worth a checkpoint."""
        return self.in_a_row == 0

    def record(
        self,
        step: int,
        finite: bool,
        metrics: dict[str, Any] | None = None,
        last_ckpt: int | None = None,
    ) -> None:
        """Notes finished step `step` (`metrics`: its host metrics, needed when not finite);
        raises when the run must stop (see the module doc)."""
        if finite:
            self.first_bad, self.in_a_row = None, 0
            return
        if self.first_bad is None:
            self.first_bad = step
        self.in_a_row += 1
        if self.nan_policy == "stop":
            raise NonFiniteLossError(
                f"step {step}: {cause(metrics)} (NaN/Inf, train.nan_policy='stop'); stopping "
                f"without saving; {_resume_hint(last_ckpt)}"
            )
        if self.in_a_row >= self.max_in_a_row:
            raise DivergedError(
                f"training diverged at step {self.first_bad}: {cause(metrics)} in each of the "
                f"{self.in_a_row} steps {self.first_bad}-{step}, all skipped "
                f"(train.nan_policy='skip', train.max_skips_in_a_row={self.max_in_a_row}); no "
                f"checkpoint was written from step {self.first_bad} on; {_resume_hint(last_ckpt)}"
            )


def _resume_hint(last_ckpt: int | None) -> str:
    fix = "rerun with a lower --config.optimizer.lr (or optimizer.clip_norm)"
    if last_ckpt is None:
        return f"no checkpoint exists yet: {fix} to start over"
    return f"the last checkpoint (step {last_ckpt}) is intact and finite: {fix} to resume from it"
