"""Store reader -> splits, samplers, augmentation -> training and validation loaders."""
