"""The networks and their losses. `networks` builds a network by name (`NETWORKS`; the
U-Net of `unet` is the first) and says what it takes and gives (`contract`); `layers` holds
what networks share (`NORMS`, input padding); `losses` is the loss registry (`LOSSES`);
`load` rebuilds a trained run's network. Training options and presets are
`kitstrain.core.config`."""
