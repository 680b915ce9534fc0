"""The training loop, the run directory, GPU memory and the distributed context."""
