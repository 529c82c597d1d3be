"""Metrics out of the loop: a console line, `metrics.jsonl` and TensorBoard (tensorboard.py).

The loop hands over each logged step's metrics one step late (already fetched to the host, so
fetching never stalls the device). Every logged step becomes

    console   step 120/600 | loss 4.1230 | mtp 4.9012 | aux 1.0210 | lr 1.20e-03 | gnorm 0.83 |
              5,400 tok/s | mfu 12.3% | eta 2m13s
    jsonl     {"step": 120, "loss": 4.123, "mtp_loss": ..., "tokens_per_s": ..., "mfu": ...,
               "expert_load": [per-expert share, mean over layers], "dropped_tokens": ...,
               "mtp_aux_loss": ..., "mtp_expert_load": [...] (MoE MTP head), ...}
              "loss" is the mean main loss over the steps since the last logged step (finite
              ones), "loss_last" that of the logged step alone; the other values are the
              logged step's own
    events    the same scalars under their names, expert loads as expert_load/<e> (and
              mtp_expert_load/<e>); the resolved config as text (tag "config")
    held-out  a step that ran an evaluation (evaluation.py) adds eval_loss, eval_mtp_loss,
              eval_tokens and eval_seconds to its row ("eval 3.9120 (mtp 4.4410) in 1.2s" on
              the console), multimodal data eval_accuracy and eval_documents ("eval 0.8123
              acc 64.3% in 0.9s"); the evaluation's time is left out of tokens/s
The console adds "mtp aux" for an MoE MTP head and "dropped N" when a capacity factor dropped
routed rows.

Throughput counts every position of every row (batch_size * seq_len per step) over the wall time
between two logged steps; the interval that contains compilation is not reported. MFU is model
FLOPs (flops.py) per second over the peak of all devices.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np

from train.tensorboard import TensorBoardWriter


def format_duration(seconds: float) -> str:
    """`seconds` as "1h02m" or "3m05s" ("?" when not finite): the console's ETA."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites `path` (atomically) without the rows of steps > `step`, when it has any."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    if len(keep) != len(lines):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


class MetricsLogger:
    """Writes logged steps to the console, `<workdir>/metrics.jsonl` and `<workdir>/tensorboard`."""

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        tokens_per_step: int,
        flops_per_step: float,
        peak_flops: float | None,
        enabled: bool = True,
        resume_step: int = 0,
        config_json: str | None = None,
    ):
        """`resume_step`: the step the run starts from; rows of later steps left by a run that
        crashed after its last checkpoint are dropped from metrics.jsonl (the steps are trained
        and logged again) and TensorBoard is told to supersede them."""
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.enabled = enabled
        self._last: tuple[int, float] | None = None  # (step, time) of the last logged step
        self._rate: float | None = None  # seconds per step
        if enabled:
            path = os.path.join(workdir, "metrics.jsonl")
            _drop_rows_after(path, resume_step)
            self._jsonl = open(path, "a")  # noqa: SIM115
            logdir = os.path.join(workdir, "tensorboard")
            restart = resume_step + 1 if os.path.isdir(logdir) else None
            self._events = TensorBoardWriter(logdir, purge_step=restart)
            if config_json is not None:
                indented = "\n".join("    " + line for line in config_json.splitlines())
                self._events.text("config", indented, step=resume_step)

    def log(
        self, step: int, metrics: dict[str, Any], extra: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """Records the (host) metrics of `step`; returns the row written to metrics.jsonl."""
        now = time.perf_counter()
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            value = np.asarray(value)
            if key in ("expert_load", "mtp_expert_load"):
                load_E = value.mean(axis=0)
                row[key] = [round(float(x), 5) for x in load_E]
                row[f"{key}_max"] = float(load_E.max())
                row[f"{key}_min"] = float(load_E.min())
            elif value.dtype == bool:
                row[key] = bool(value)
            else:
                row[key] = float(value) if value.dtype.kind == "f" else int(value)
        row.update(extra or {})
        if self._last is not None and step > self._last[0]:
            self._rate = (now - self._last[1]) / (step - self._last[0])
            row["tokens_per_s"] = self.tokens_per_step / self._rate
            if self.peak_flops:
                row["mfu"] = self.flops_per_step / self._rate / self.peak_flops
        self._last = (step, now)
        if self.enabled:
            self._write(row)
        return row

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (an evaluation) out of the time between two logged steps, so they
        do not count in tokens/s, MFU or the eta."""
        if self._last is not None:
            self._last = (self._last[0], self._last[1] + seconds)

    def restart_clock(self) -> None:
        """Forget the last timing point (e.g. after a checkpoint restore or a pause)."""
        self._last = None

    def _write(self, row: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for key in ("expert_load", "mtp_expert_load"):
            for e, load in enumerate(row.get(key, [])):
                scalars[f"{key}/{e}"] = load
        self._events.scalars(row["step"], scalars)
        print(self.console_line(row), flush=True)

    def console_line(self, row: dict[str, Any]) -> str:
        parts = [f"step {row['step']}/{self.total_steps}", f"loss {row['loss']:.4f}"]
        if "mtp_loss" in row:
            parts.append(f"mtp {row['mtp_loss']:.4f}")
        if "expert_load" in row:
            parts.append(f"aux {row['aux_loss']:.3f}")
            parts.append(f"load {row['expert_load_min']:.2f}-{row['expert_load_max']:.2f}")
        if "mtp_aux_loss" in row:
            parts.append(f"mtp aux {row['mtp_aux_loss']:.3f}")
        if row.get("dropped_tokens"):
            parts.append(f"dropped {row['dropped_tokens']:,.0f}")
        parts += [f"lr {row['lr']:.2e}", f"gnorm {row['grad_norm']:.3f}"]
        if row.get("skipped"):
            parts.append(f"skipped {row['skipped']}")
        if "eval_loss" in row:
            held_out = f"eval {row['eval_loss']:.4f}"
            if "eval_mtp_loss" in row:
                held_out += f" (mtp {row['eval_mtp_loss']:.4f})"
            if "eval_accuracy" in row:
                held_out += f" acc {100 * row['eval_accuracy']:.1f}%"
            parts.append(f"{held_out} in {row['eval_seconds']:.1f}s")
        if "tokens_per_s" in row:
            parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
            parts.append(f"mfu {100 * row['mfu']:.1f}%" if "mfu" in row else "mfu -")
            eta = (self.total_steps - row["step"]) * (self._rate or float("nan"))
            parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._events.close()
