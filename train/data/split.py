"""The held-out split: a document is held out by a stable hash of its own bytes.

    u(doc) = int(blake2b(raw record bytes, 8 bytes), little-endian) / 2**64   in [0, 1)
    held out  <=>  u(doc) < data.eval_fraction

The verdict depends on the document alone: not on its position, file order, the number of
hosts, virtual shards or the seed, so an evaluation document is never trained on under any
topology, and every run with the same data and fraction holds out the same documents (identical
copies of a document fall on the same side). The training pipeline drops held-out records before
tokenizing (counted as `held_out`, not as skipped); evaluation.py reads only them; the
tokenizer a run trains and the statistics of data_stats.json (prepare.py) see the two sides
apart.

An image-text record (data/image_text.py: {"parts": [...], "line": raw JSON line}) is hashed by
its line, so a document is held out by its text and image names as written, not by where the
files lie; a record without a line (digits: their held-out split is data/digits.py's own) is
never held out.
"""

from __future__ import annotations

import hashlib


def unit_hash(raw: bytes | str | dict | None) -> float:
    """u(doc) in [0, 1); an unreadable record (None) maps to 1.0 (never held out)."""
    if isinstance(raw, dict):
        raw = raw.get("line")
    if raw is None:
        return 1.0
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    digest = hashlib.blake2b(raw, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def is_held_out(raw: bytes | str | dict | None, fraction: float) -> bool:
    """Whether the record belongs to the evaluation split of `fraction`."""
    return fraction > 0 and unit_hash(raw) < fraction


class SplitSide:
    """A picklable predicate on raw records: the training side (`held_out=False`) or the
    evaluation side of the hash split at `fraction`."""

    def __init__(self, fraction: float, held_out: bool):
        self.fraction, self.held_out = float(fraction), held_out

    def __call__(self, raw: bytes | str | dict | None) -> bool:
        return is_held_out(raw, self.fraction) == self.held_out
