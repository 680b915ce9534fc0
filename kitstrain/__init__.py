"""kitstrain: 2D U-Net training, scoring and prediction from a kitsprep slice store."""

__version__ = "0.1.0"
