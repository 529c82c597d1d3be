"""The grain input pipeline: sources, tokenizers, packing, per-host shards, iterator state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train.data.iterator import DataIterator
from train.data.pipeline import TokenizeRecord, build_dataset
from train.data.sources import FileSource, JsonlSource, decode_record, open_source
from train.data.tokenizers import load_tokenizer
from train.tokenizer import train_sentencepiece

EOS = 2


class CharTokenizer:
    """Token = 3 + byte value mod 250; eos 2. Enough to follow documents through packing."""

    vocab_size = 253
    eos_id = EOS

    def encode(self, text):
        return [3 + b % 250 for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)


def make_iterator(records, *, seq_len=16, rows=2, seed=0, shard=(0, 1), record_format="text"):
    tokenize = TokenizeRecord(
        lambda raw: decode_record(raw, record_format, "text"), CharTokenizer()
    )
    ds = build_dataset(
        records,
        tokenize,
        seq_len=seq_len,
        rows_per_shard=rows,
        seed=seed,
        shard_index=shard[0],
        shard_count=shard[1],
    )
    return DataIterator(ds, tokenize)


def docs(n=12):
    return [(f"doc{i:02d}:" + "x" * (3 * i + 1)).encode() for i in range(n)]


def rows_of(it, n):
    out = []
    for _ in range(n):
        b = next(it)
        out += [{k: v[i] for k, v in b.items()} for i in range(len(b["tokens"]))]
    return out


def test_packing_segment_ids_and_positions():
    records = docs()
    rows = rows_of(make_iterator(records, seq_len=16), 20)
    stream = []
    for row in rows:
        tok, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
        assert seg[0] == 1 and pos[0] == 0
        assert np.all(seg >= 1), "concat-then-split never pads"
        new = np.concatenate([[True], seg[1:] != seg[:-1]])
        assert np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
        # positions restart at every piece and count up inside it
        want_pos = np.zeros_like(pos)
        for t in range(1, len(pos)):
            want_pos[t] = 0 if new[t] else want_pos[t - 1] + 1
        np.testing.assert_array_equal(pos, want_pos)
        # a document piece ends at its eos unless it is cut by the end of the row
        ends = np.nonzero(np.concatenate([seg[1:] != seg[:-1], [False]]))[0]
        assert all(tok[e] == EOS for e in ends)
        stream.extend(tok.tolist())
    # the rows, concatenated, are the documents (each + eos) in some order, none cut or lost
    text_docs = {r.decode() for r in records}
    pieces = "".join(chr(t - 3) if t != EOS else "\n" for t in stream).split("\n")[:-1]
    assert set(pieces) <= text_docs
    assert set(pieces[: len(records)]) == text_docs, "the first epoch holds every document once"


def test_order_is_deterministic_from_the_seed():
    a = rows_of(make_iterator(docs(), seed=3), 5)
    b = rows_of(make_iterator(docs(), seed=3), 5)
    c = rows_of(make_iterator(docs(), seed=4), 5)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("after", [1, 2, 3, 7, 11])
def test_iterator_state_round_trip_repeats_and_skips_nothing(after):
    it = make_iterator(docs(), seq_len=12, rows=3)
    rows_of(it, after)
    state = it.get_state()
    assert isinstance(state, bytes)
    json.loads(state)  # what the checkpoint holds: plain JSON
    want = rows_of(it, 6)
    fresh = make_iterator(docs(), seq_len=12, rows=3)
    fresh.set_state(state)
    got = rows_of(fresh, 6)
    for x, y in zip(want, got, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert fresh.rows == it.rows


def test_unreadable_and_empty_records_are_skipped_and_counted():
    bad = [None, b"", b"   \n", b"\xff\xfe not utf-8", b"ok-1", b"ok-2"]
    it = make_iterator(bad, seq_len=4, rows=1)
    rows = rows_of(it, 4)
    text = "".join(chr(t - 3) if t != EOS else "|" for r in rows for t in r["tokens"])
    complete = text.split("|")[:-1]  # the last piece may be cut by the end of the rows
    assert complete and set(complete) <= {"ok-1", "ok-2"}
    assert it.skipped >= 4 and it.records >= 6
    state = json.loads(it.get_state())
    assert state["skipped"] == it.skipped


def test_json_records_skip_bad_json_and_missing_keys():
    records = [
        b'{"text": "alpha"}',
        b"{not json",
        b'{"other": 1}',
        b'{"text": 5}',
        b'{"text": "beta"}',
    ]
    it = make_iterator(records, seq_len=6, rows=1, record_format="json")
    rows = rows_of(it, 6)
    assert it.skipped >= 3
    # exactly the two string documents reach the rows ({"text": 5} is not a document)
    text = "".join(chr(t - 3) if t != EOS else "|" for r in rows for t in r["tokens"])
    complete = text.split("|")[1:-1]  # whole documents (the ends may be cut by the rows)
    assert complete and set(complete) <= {"alpha", "beta"}, complete
    assert [decode_record(r, "json", "text") for r in records] == [
        "alpha",
        None,
        None,
        None,
        "beta",
    ]


def test_per_host_shards_are_disjoint_and_cover_the_data():
    records = docs(10)
    seen = []
    for host in range(2):
        it = make_iterator(records, seq_len=8, rows=1, shard=(host, 2))
        text = "".join(
            chr(t - 3) if t != EOS else "\n" for r in rows_of(it, 40) for t in r["tokens"]
        )
        seen.append(set(text.split("\n")[:5]))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {r.decode() for r in records}


def test_sources_text_jsonl_arrayrecord(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    src = open_source("text", str(tmp_path / "*.txt"))
    assert isinstance(src, FileSource)
    assert [src[i] for i in range(len(src))] == [b"first file", b"second file"]

    lines = [{"text": "one"}, {"text": "two"}, {"text": "three"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    src = open_source("jsonl", str(tmp_path / "*.jsonl"))
    assert isinstance(src, JsonlSource) and len(src) == 3
    assert [decode_record(src[i], "json", "text") for i in range(3)] == ["one", "two", "three"]

    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "r.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for s in (b"rec one", b"rec two"):
        writer.write(s)
    writer.close()
    src = open_source("arrayrecord", path)
    assert len(src) == 2 and decode_record(src[1], "text", "text") == "rec two"
    with pytest.raises(FileNotFoundError, match="matches no files"):
        open_source("text", str(tmp_path / "nothing*"))


def test_sentencepiece_and_hf_tokenizers(tmp_path):
    text = "def add(a, b):\n    return a + b  # sum\n\n" * 40 + "class Foo:\n    pass\n" * 40
    model = train_sentencepiece([text], str(tmp_path / "spm.model"), vocab_size=300)
    sp = load_tokenizer("sentencepiece", model)
    sample = "def f(x):\n\treturn x  # ünïcode\n"
    assert sp.decode(sp.encode(sample)) == sample  # identity normalisation + byte fallback
    assert sp.eos_id == 2 and sp.vocab_size == 300

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer("hf", str(tmp_path))  # a checkpoint dir holding tokenizer.json
    assert hf.eos_id == 0 and hf.encode("hello world") == [2, 3]
