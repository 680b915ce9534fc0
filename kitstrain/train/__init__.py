"""The training loop, GPU memory, the optimizer and the distributed context. The run directory
is `kitstrain.core.rundir`, shared with the rooms that read runs."""
