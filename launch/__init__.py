"""Launchers (local multi-process, TPU pods, SLURM GPU clusters) and the memory planner."""
