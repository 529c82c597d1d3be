"""RL fine-tuning of the GRPO family (GRPO, DAPO, GSPO): `python -m train.rl`.

The modules (WORKSPACE.md has the map): advantages.py (group_advantages), losses.py
(policy_loss, PRESETS), config.py (the `rl` section), tasks.py (prompts: built-in addition,
JSON lines), rewards.py, envs.py (multi-turn episodes), rollout.py (generate -> rewards ->
batch), update.py (the jitted policy update), loop.py (run), __main__.py (the CLI).
"""
