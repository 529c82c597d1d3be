"""Side-by-side comparison of training runs: a table (markdown + CSV) and the loss curves (PNG).

    python -m train.compare DIR [DIR ...] [--out OUT]

Each DIR is a run's workdir (it holds metrics.jsonl) or a sweep directory (launch/sweep.py: its
sweep.json lists the runs, else every sub-directory holding metrics.jsonl, by name). OUT defaults
to the sweep directory, or the first DIR. Written there:

    comparison.md    one row per run: the config fields that differ between the runs (from each
                     run's config.json, dotted keys), final train loss (mean of the last logging
                     interval), final and best held-out loss (eval_loss), multimodal runs' final
                     eval_accuracy (exact captions), median tokens/s and MFU, parameters,
                     steps, wall time (run_summary.json: all invocations)
    comparison.csv   the same, full precision
    comparison.png   train loss and held-out loss against the step, every run on shared axes
                     (matplotlib, the `plots` extra; without it the tables are still written and
                     one line says so)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from typing import Any, NamedTuple

TABLE = "comparison.md"


class RunData(NamedTuple):
    name: str
    directory: str
    config: dict[str, Any]  # flattened: dotted key -> value
    rows: list[dict[str, Any]]  # metrics.jsonl
    summary: dict[str, Any]  # run_summary.json (may be empty: an interrupted run)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_rows(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
    return rows


def load_run(directory: str, name: str | None = None) -> RunData:
    return RunData(
        name or os.path.basename(os.path.normpath(directory)),
        directory,
        _flatten(_read_json(os.path.join(directory, "config.json"))),
        _read_rows(os.path.join(directory, "metrics.jsonl")),
        _read_json(os.path.join(directory, "run_summary.json")),
    )


def find_runs(directory: str) -> list[RunData]:
    """The runs of a run dir or a sweep dir (see the module docstring); ValueError if none."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: no such directory")
    if os.path.isfile(os.path.join(directory, "metrics.jsonl")):
        return [load_run(directory)]
    names = [r["name"] for r in _read_json(os.path.join(directory, "sweep.json")).get("runs", [])]
    names = names or sorted(os.listdir(directory))
    runs = [
        load_run(os.path.join(directory, n), n)
        for n in names
        if os.path.isfile(os.path.join(directory, n, "metrics.jsonl"))
    ]
    if not runs:
        raise ValueError(
            f"{directory}: no metrics.jsonl in it or its sub-directories (give run workdirs or a "
            "sweep directory)"
        )
    return runs


def differing_fields(runs: list[RunData]) -> list[str]:
    """Config keys whose values are not the same in every run (missing counts as a value)."""
    keys = sorted(set().union(*(r.config for r in runs)))
    marker = object()
    return [
        k for k in keys if len({json.dumps(r.config.get(k, marker), default=str) for r in runs}) > 1
    ]


def run_row(run: RunData, fields: list[str]) -> dict[str, Any]:
    """The table row of one run (numbers unrounded; None where unknown)."""
    rows = run.rows
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    out: dict[str, Any] = {"run": run.name}
    out.update({f: run.config.get(f) for f in fields})
    out.update(
        final_loss=rows[-1].get("loss") if rows else None,
        final_eval_loss=evals[-1] if evals else None,
        best_eval_loss=min(evals) if evals else None,
        tokens_per_s=statistics.median(rates) if rates else None,
        mfu=statistics.median(mfus) if mfus else None,
        parameters=run.summary.get("parameters"),
        steps=rows[-1]["step"] if rows else 0,
        wall_seconds=run.summary.get("wall_seconds"),
    )
    accuracy = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    if accuracy:  # multimodal: exact captions (evaluation.py)
        out["final_eval_accuracy"] = accuracy[-1]
    return out


def _with_accuracy(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with a final_eval_accuracy column (None when the run logged none) after the losses."""
    out = {}
    for key, value in row.items():
        if key != "final_eval_accuracy":
            out[key] = value
        if key == "best_eval_loss":
            out["final_eval_accuracy"] = row.get("final_eval_accuracy")
    return out


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("mfu", "final_eval_accuracy"):
        return f"{100 * value:.1f}%"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if key == "parameters":
        return f"{value:,}"
    if key == "wall_seconds":
        return f"{value:.0f}s"
    if isinstance(value, float):
        return f"{value:.4f}" if key.endswith("loss") else f"{value:g}"
    return str(value)


def markdown(table: list[dict[str, Any]]) -> str:
    keys = list(table[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(k, row[k]) for k in keys) + " |" for row in table]
    return "\n".join(lines) + "\n"


def write_csv(path: str, table: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def plot(path: str, runs: list[RunData]) -> bool:
    """Train and held-out loss curves (two panels, shared step axis); False without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for run in runs:
        train = [(r["step"], r["loss"]) for r in run.rows if "loss" in r]
        held = [(r["step"], r["eval_loss"]) for r in run.rows if "eval_loss" in r]
        line = ax_train.plot(*zip(*train, strict=True), label=run.name)[0] if train else None
        if held:
            color = line.get_color() if line else None
            ax_eval.plot(*zip(*held, strict=True), marker="o", color=color, label=run.name)
    ax_train.set(title="train loss", xlabel="step", ylabel="nats/token")
    ax_eval.set(title="held-out loss (eval_loss)", xlabel="step")
    ax_train.legend(fontsize=8)
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare(dirs: list[str], out: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Writes the table, CSV and plot of the runs in `dirs` into `out`; (out, table rows)."""
    runs = [run for d in dirs for run in find_runs(d)]
    out = out or dirs[0]
    os.makedirs(out, exist_ok=True)
    fields = differing_fields(runs)
    table = [run_row(r, fields) for r in runs]
    if any("final_eval_accuracy" in row for row in table):  # a column for every run then
        table = [_with_accuracy(row) for row in table]
    with open(os.path.join(out, TABLE), "w") as f:
        f.write(markdown(table))
    write_csv(os.path.join(out, "comparison.csv"), table)
    plotted = plot(os.path.join(out, "comparison.png"), runs)
    if not plotted:
        print("matplotlib is not installed (pip install '.[plots]'): no plot, tables written")
    return out, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", help="run workdirs or sweep directories")
    p.add_argument("--out", default=None, help="where to write (default: the sweep dir / DIR)")
    args = p.parse_args(argv)
    try:
        out, table = compare(args.dirs, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(table), end="")
    written = [TABLE, "comparison.csv"]
    written += ["comparison.png"] if os.path.isfile(os.path.join(out, "comparison.png")) else []
    print(f"written in {out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
