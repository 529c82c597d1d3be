"""train.compare on fixture runs: the differing config fields, the numbers of the table (markdown
and CSV), the PNG, and the tables without matplotlib."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from train import compare


def _run(directory, lr, interval, eval_losses, wall=12.5):
    directory.mkdir(parents=True)
    config = {
        "optimizer": {"lr": lr, "b1": 0.9},
        "model": {"text_config": {"full_attention_interval": interval, "hidden_size": 128}},
    }
    (directory / "config.json").write_text(json.dumps(config))
    rows = []
    for i, step in enumerate((10, 20, 30)):
        row = {"step": step, "loss": 5.0 - i - lr, "tokens_per_s": 1000.0 * (i + 1), "mfu": 0.1}
        if i:
            row["eval_loss"] = eval_losses[i - 1]
        rows.append(row)
    text = "\n".join(json.dumps(r) for r in rows) + "\n" + '{"step": 4'  # a line cut by a crash
    (directory / "metrics.jsonl").write_text(text)
    summary = {"step": 30, "parameters": 1234, "wall_seconds": wall}
    (directory / "run_summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep_dir(tmp_path):
    _run(tmp_path / "lr=0.1_full_attention_interval=2", 0.1, 2, [4.5, 4.25])
    _run(tmp_path / "lr=0.2_full_attention_interval=4", 0.2, 4, [4.0, 4.125])
    runs = ["lr=0.1_full_attention_interval=2", "lr=0.2_full_attention_interval=4"]
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": [{"name": n} for n in runs]}))
    (tmp_path / "not_a_run").mkdir()
    return tmp_path


def test_the_table_holds_the_differing_fields_and_each_runs_numbers(sweep_dir, capsys):
    assert compare.main([str(sweep_dir)]) == 0
    md = (sweep_dir / "comparison.md").read_text().splitlines()
    assert md[0] == (
        "| run | model.text_config.full_attention_interval | optimizer.lr | final_loss | "
        "final_eval_loss | best_eval_loss | tokens_per_s | mfu | parameters | steps | "
        "wall_seconds |"
    )
    assert md[2] == (
        "| lr=0.1_full_attention_interval=2 | 2 | 0.1 | 2.9000 | 4.2500 | 4.2500 | 2,000 | "
        "10.0% | 1,234 | 30 | 12s |"
    )
    assert md[3].split(" | ")[3:6] == ["2.8000", "4.1250", "4.0000"]
    with open(sweep_dir / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [
        "lr=0.1_full_attention_interval=2",
        "lr=0.2_full_attention_interval=4",
    ]
    assert float(rows[1]["best_eval_loss"]) == 4.0 and float(rows[1]["final_eval_loss"]) == 4.125
    png = (sweep_dir / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "written in" in capsys.readouterr().out


def test_run_dirs_given_one_by_one_and_out(sweep_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    dirs = [str(p) for p in sorted(sweep_dir.glob("lr=*"))]
    assert compare.main([*dirs, f"--out={out}"]) == 0
    assert len((out / "comparison.md").read_text().splitlines()) == 4


def test_without_matplotlib_the_tables_are_still_written(sweep_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert compare.main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and (sweep_dir / "comparison.csv").exists()
    assert not (sweep_dir / "comparison.png").exists()


def test_a_directory_without_runs_is_refused_in_one_line(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no metrics.jsonl" in err and err.count("\n") == 1


def test_multimodal_runs_get_a_final_eval_accuracy_column(sweep_dir):
    run = sweep_dir / "lr=0.2_full_attention_interval=4"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[:3]]
    rows[1]["eval_accuracy"], rows[2]["eval_accuracy"] = 0.5, 0.75
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert compare.main([str(sweep_dir)]) == 0
    md = (sweep_dir / "comparison.md").read_text().splitlines()
    keys = md[0].split(" | ")
    column = keys.index("final_eval_accuracy")
    assert keys[column - 1] == "best_eval_loss"
    assert [md[i].split(" | ")[column] for i in (2, 3)] == ["-", "75.0%"]
