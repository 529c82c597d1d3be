"""The embedded default corpus: the Python standard library's own *.py sources.

Every Python ships them (`sysconfig.get_paths()["stdlib"]`): several megabytes of English prose
(docstrings, comments) and code. Installed third-party packages (site-packages, dist-packages),
bytecode caches, the test suites (test, tests, idle_test: half the bytes, full of deliberately
odd code) and the codec tables (encodings: mostly hex tables) are excluded. The file list is
shuffled with a fixed seed and cut at `max_bytes`, so the same installation always yields the
same corpus (a resumed run reads the same documents) and tokenizer training plus data
preparation stay well under a minute.
"""

from __future__ import annotations

import os
import random
import sysconfig

_EXCLUDED_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "encodings",
}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None, *, max_bytes: int = 0, seed: int = 0) -> list[str]:
    """The *.py files under `root` (default: the stdlib) in seeded order, cut at `max_bytes`
    (0: no cap)."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no *.py files under {root!r}")
    random.Random(seed).shuffle(files)
    if max_bytes <= 0:
        return files
    chosen, total = [], 0
    for path in files:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            continue
        chosen.append(path)
        total += size
    return chosen
