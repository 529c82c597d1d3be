"""TensorBoard through tensorboardX: TensorBoard's own reader gets back every scalar the metrics
logger wrote, the resolved config as text, and a resumed run supersedes the replayed steps."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from train.metrics import MetricsLogger  # noqa: E402


def _logger(workdir, resume_step=0, config_json=None):
    return MetricsLogger(
        str(workdir),
        total_steps=10,
        tokens_per_step=64,
        flops_per_step=1e6,
        peak_flops=1e9,
        resume_step=resume_step,
        config_json=config_json,
    )


def _read(workdir) -> EventAccumulator:
    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_every_logged_scalar_reads_back_with_tensorboards_reader(tmp_path):
    config = json.dumps({"optimizer": {"lr": 0.003}, "train": {"steps": 10}}, indent=2)
    log = _logger(tmp_path, config_json=config)
    written = []
    for step in (2, 4, 6):
        metrics = {"loss": 4.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5, "skipped": 0}
        extra = {"eval_loss": 5.0 / step, "eval_seconds": 0.25} if step == 6 else {}
        written.append(log.log(step, metrics, extra))
    log.close()
    acc = _read(tmp_path)
    expected: dict[str, dict[int, float]] = {}
    for row in written:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                expected.setdefault(key, {})[row["step"]] = float(value)
    assert "eval_loss" in expected and "tokens_per_s" in expected and "mfu" in expected
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got.keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert math.isclose(got[step], value, rel_tol=1e-6), (tag, step)
    (text,) = acc.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert json.loads(shown) == json.loads(config)


def test_a_resumed_run_supersedes_the_replayed_steps(tmp_path):
    log = _logger(tmp_path)
    for step in (1, 2, 3, 4):
        log.log(step, {"loss": float(step), "lr": 0.1, "grad_norm": 1.0})
    log.close()
    log = _logger(tmp_path, resume_step=2)  # the checkpoint was at step 2: steps 3, 4 again
    for step in (3, 4):
        log.log(step, {"loss": 10.0 + step, "lr": 0.1, "grad_norm": 1.0})
    log.close()
    got = [(e.step, e.value) for e in _read(tmp_path).Scalars("loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    from tensorboard.backend.event_processing.event_file_loader import (  # noqa: PLC0415
        EventFileLoader,
    )
    from tensorboard.compat.proto.event_pb2 import SessionLog  # noqa: PLC0415

    starts = [
        (path.name, event.step)
        for path in sorted((tmp_path / "tensorboard").iterdir())
        for event in EventFileLoader(str(path)).Load()
        if event.HasField("session_log") and event.session_log.status == SessionLog.START
    ]
    assert [step for _, step in starts] == [3]  # the resumed writer's file only
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
