"""kitsprep: KiTS19 NIfTI volumes -> one chunked HDF5 slice store."""

__version__ = "0.1.0"
