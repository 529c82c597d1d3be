"""Every `python -m train.main` and `python -m train.rl` command in the README and in the configs'
docstrings is run with `--check_config` (the config file, variant and every override parsed and
validated, as a real run does before any compute), and every `python -m launch.sweep` command
with `--dry-run` (every run of the sweep validated, nothing started), so a documented command
cannot drift into one that fails. Paths
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
        *sorted(glob.glob(os.path.join(ROOT, "configs", "sweeps", "*.py"))),
    ]
    found = []
    for path in sources:
        with open(path) as f:
            text = f.read().replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"python3? -m (train\.main|train\.rl|launch\.sweep) (.*)", line)
            if not m or re.search(r"<file>|--config=\.\.\.|rl_X|--help|`", m.group(2)):
                continue  # the synopsis lines: placeholders, not commands
            found.append((os.path.relpath(path, ROOT), f"{m.group(1)} {m.group(2).strip()}"))
    return found


COMMANDS = documented_commands()


def test_the_commands_are_found():
    where = {w for w, _ in COMMANDS}
    assert "README.md" in where and "configs/tiny_cpu.py" in where and len(COMMANDS) >= 15
    modules = {a.split()[0] for _, a in COMMANDS}
    assert modules == {"train.main", "train.rl", "launch.sweep"}


@pytest.mark.parametrize("where, args", COMMANDS, ids=[f"{w}:{a[:40]}" for w, a in COMMANDS])
def test_documented_command_is_valid(where, args, tmp_path):
    module, *argv = shlex.split(args, comments=True)
    argv = [a.replace("DIR", str(tmp_path / "run")).replace("/tmp/", f"{tmp_path}/") for a in argv]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    if module == "launch.sweep":  # every run validated, none started; flags before the `--`
        cut = argv.index("--") if "--" in argv else len(argv)
        argv[cut:cut] = ["--dry-run"]
        expected = "all configs valid"
    else:
        argv.append("--check_config")
        expected = "config ok"
    cmd = [sys.executable, "-m", module, *argv]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and expected in r.stdout, f"{where}: {args}\n{r.stderr[-2000:]}"
