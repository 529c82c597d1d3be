"""Every `python -m train.main` command in the README and in the configs' docstrings is run with
`--check_config` (the config file, variant and every override parsed and validated, as a real
run does before any compute), so a documented command cannot drift into one that fails. Paths
that are placeholders (DIR, ...) are replaced; the real runs of the small configs are the CLI
tests (test_train_cli.py, test_reliability*.py)."""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documented_commands() -> list[tuple[str, str]]:
    sources = [
        os.path.join(ROOT, "README.md"),
        *sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))),
    ]
    found = []
    for path in sources:
        with open(path) as f:
            text = f.read().replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"python3? -m train\.main (.*)", line)
            if not m or "<file>" in m.group(1) or "--config=..." in m.group(1):
                continue  # the synopsis lines: placeholders, not commands
            found.append((os.path.relpath(path, ROOT), m.group(1).strip()))
    return found


COMMANDS = documented_commands()


def test_the_commands_are_found():
    where = {w for w, _ in COMMANDS}
    assert "README.md" in where and "configs/tiny_cpu.py" in where and len(COMMANDS) >= 15


@pytest.mark.parametrize("where, args", COMMANDS, ids=[f"{w}:{a[:40]}" for w, a in COMMANDS])
def test_documented_command_is_valid(where, args, tmp_path):
    argv = [a.replace("DIR", str(tmp_path / "run")) for a in shlex.split(args)]
    argv = [a for a in argv if not a.startswith("#")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "train.main", *argv, "--check_config"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "config ok" in r.stdout, f"{where}: {args}\n{r.stderr[-2000:]}"
