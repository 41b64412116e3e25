"""One training run: the driver that launches Ray Train, the per-worker loop, checkpoints and teachers."""
