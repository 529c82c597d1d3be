"""RL fine-tuning entry point (GRPO, DAPO, GSPO).

    python -m train.rl --workdir=DIR [--config=configs/rl_<x>.py] [--config.a.b=value ...]

The conventions of `python -m train.main` (train/main.py): every key can be overridden, a bad
key or value is refused naming it before any compute, the resolved config is written to
DIR/config.json, rerunning the same command resumes from the latest checkpoint, SIGTERM saves.
Without --config the embedded default runs: configs/rl_addition.py (first pretrain its model:
`python -m train.main --config=configs/addition_pretrain.py --workdir=/tmp/addition_pretrain`).
The `rl` keys are documented in train/rl/config.py.
"""

from __future__ import annotations

import os
import sys
import textwrap

from absl import app

_DEFAULT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs", "rl_addition.py"
)


def _argv_with_default(argv: list[str]) -> list[str]:
    if any(a.startswith("--config=") for a in argv[1:]):
        return argv
    return [argv[0], f"--config={_DEFAULT}", *argv[1:]]


# train.main's flags (shared: --config, --workdir, --check_config, --verbose) read the command
# line when they are defined, so the RL default config is put there first
sys.argv = _argv_with_default(sys.argv)
from train import main as train_main  # noqa: E402


def usage() -> str:
    """This module's docstring and the algorithm presets (what the None rl keys become)."""
    from train.rl.losses import PRESETS  # noqa: PLC0415

    lines = [__doc__.strip(), "", "rl keys left None take the preset of rl.algo:"]
    for algo, preset in PRESETS.items():
        text = f"{algo}: " + ", ".join(f"{k}={v!r}" for k, v in preset.items())
        lines += textwrap.wrap(text, 100, initial_indent="    ", subsequent_indent="      ")
    return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """train.main's flag parsing; --help describes train.rl."""
    return train_main.parse_flags(argv, usage=usage())


def _validate(config) -> None:
    from train import config_schema  # noqa: PLC0415
    from train.rl import config as rl_config  # noqa: PLC0415

    if "rl" not in config:
        raise config_schema.ConfigValueError("rl: the config has no `rl` section")
    rl_config.validate(config)


def _rl_loop():
    from train.rl import loop  # noqa: PLC0415

    return loop.run, ()


def main(argv: list[str]) -> None:
    """train.main's main() (validation, --check_config, distributed, lock, expected errors)
    around the RL loop."""
    train_main.cli_main(
        argv,
        _validate,
        lambda c: f"config ok: rl.algo={c.rl.algo}, train.steps={c.train.steps}",
        _rl_loop,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
