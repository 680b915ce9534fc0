"""What every room needs and no room owns: device, precision, the training options, the
run directory and its record. Imports nothing of kitstrain above it."""
