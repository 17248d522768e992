"""Sampling from checkpoints, reward and LongText evaluation, reports, ablations."""
