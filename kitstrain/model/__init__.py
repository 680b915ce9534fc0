"""The network and its losses. Training options and presets are `kitstrain.core.config`."""
