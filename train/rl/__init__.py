"""RL fine-tuning of the GRPO family (GRPO, DAPO, GSPO): `python -m train.rl`.

advantages.py   group_advantages (grpo / drgrpo / rloo)
losses.py       policy_loss (clipped ratio per token or per sequence, k3 KL, aggregations)
"""
