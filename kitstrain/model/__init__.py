"""The network, its losses, and the presets that configure training."""
