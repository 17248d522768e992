"""The GRPO loop and what it needs: weights and precision, checkpoints, prompt sets, several processes, checks before launch, run health."""
