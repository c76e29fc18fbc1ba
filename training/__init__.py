"""The training loop's plumbing: processes, optimiser groups, checkpoints and RNG, progress, COCO scoring."""
