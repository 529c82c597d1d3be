"""Never hang on data: a source without one usable record is refused before any tokenizer is
trained or step taken, naming the path and why (which key was missing in how many records); a
directory as data.path asks for a glob; a bad data_stats.json is named and recomputed; the console
`data:` line says how many records were skipped and why; an init.from_hf checkpoint without
tokenizer.json is named."""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import subprocess
import sys

import pytest

from train import config_schema, prepare
from train.data.stdlib import stdlib_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.py")


def config(**data):
    c = runpy.run_path(TINY)["get_config"]()
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_wrong_text_key_is_refused_naming_path_key_and_count(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": f"doc {i}"} for i in range(7)])
    c = config(kind="jsonl", path=path)
    with pytest.raises(config_schema.ConfigValueError) as e:
        prepare.prepare_data(c, str(tmp_path / "run"))
    msg = str(e.value)
    assert f"data.path={path!r}" in msg and "no usable records" in msg
    assert "7 records: no key 'text'" in msg and "data.text_key='text'" in msg
    assert not os.path.exists(tmp_path / "run" / "tokenizer"), "refused before training one"


def test_binary_file_read_as_text_is_refused(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)
    c = config(kind="text", path=str(tmp_path / "*.bin"))
    with pytest.raises(config_schema.ConfigValueError, match="1 record: not UTF-8"):
        prepare.prepare_data(c, str(tmp_path / "run"))


def test_a_directory_as_data_path_asks_for_a_glob(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    c = config(kind="jsonl", path=str(tmp_path))
    with pytest.raises(config_schema.ConfigValueError, match=r"is a directory; give a glob"):
        prepare.prepare_data(c, str(tmp_path / "run"))


def test_skipped_records_are_counted_by_reason_and_shown(tmp_path):
    files = stdlib_files(None, max_bytes=600_000)[:40]
    rows = [{"text": pathlib.Path(f).read_text("utf-8", errors="replace")} for f in files]
    assert len(rows) == 40
    rows += [{"text": 5}, {"body": "x"}, {"body": "y"}, {"text": "   "}, [1, 2]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    c = config(kind="jsonl", path=path)
    prepared = prepare.prepare_data(c, str(tmp_path / "run"))
    s = prepared.stats
    assert (s["records"], s["documents_read"], s["records_skipped"]) == (46, 40, 6)
    assert s["skip_reasons"] == {
        "'text' is not a string": 1,
        "no key 'text'": 2,
        "empty": 1,
        "not a JSON object": 1,
        "not JSON": 1,
    }
    line = prepare.describe(s)
    assert line.startswith("data: 46 records (6 skipped: 2 records: no key 'text', "), line
    assert "1 record: 'text' is not a string" in line


def test_a_bad_data_stats_json_is_named_and_recomputed(tmp_path, capsys):
    c = config()  # the stdlib corpus
    run = tmp_path / "run"
    first = prepare.prepare_data(c, str(run)).stats
    (run / "data_stats.json").write_text("")
    again = prepare.prepare_data(c, str(run)).stats
    out = capsys.readouterr().out
    assert f"warning: {run / 'data_stats.json'} is unreadable" in out
    assert again == first
    assert json.loads((run / "data_stats.json").read_text()) == first


def test_init_from_hf_without_tokenizer_json_is_named(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    c = config(kind="jsonl", path=path)
    c.init.from_hf = str(hf)
    with pytest.raises(config_schema.ConfigValueError) as e:
        prepare.prepare_data(c, str(tmp_path / "run"))
    assert str(hf / "tokenizer.json") in str(e.value) and "init.from_hf" in str(e.value)


def test_cli_refuses_unusable_data_in_one_line_without_hanging(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": f"doc {i}"} for i in range(5)])
    cmd = [sys.executable, "-m", "train.main", f"--workdir={tmp_path / 'run'}", f"--config={TINY}"]
    cmd += ["--config.data.kind=jsonl", f"--config.data.path={path}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "5 records: no key 'text'" in errors[0], r.stderr[-3000:]


def test_a_corrupt_array_record_file_is_named(tmp_path):
    bad = tmp_path / "b.array_record"
    bad.write_bytes(bytes(range(256)) * 20)
    c = config(kind="arrayrecord", path=str(tmp_path / "*.array_record"))
    with pytest.raises(config_schema.ConfigValueError, match="not a readable ArrayRecord file"):
        try:
            prepare.prepare_data(c, str(tmp_path / "run"))
        except config_schema.ConfigValueError as e:
            assert str(bad) in str(e)
            raise
