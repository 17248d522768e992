"""Decoding and scoring rollouts: the reward worker, the in-process and Ray pools, the scoring rules."""
