"""Contracts and maths: the types that cross boundaries, seeds, the sampler, teacher-forced log-probs, the loss and the advantages."""
