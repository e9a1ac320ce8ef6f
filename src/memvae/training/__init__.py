"""Training: trainer and loop, the non-finite guard, checkpoints, run directories and their lock, evaluation, metrics."""
