"""The slice store (one HDF5 file of preprocessed slices): both packages read and write it
through here. One module a job: `format` (what the bytes mean), `write` (layout, then
finalize), `superblock` (HDF5 header repair), `info` (open and summarise), `reader`
(positioned slice reads)."""

from kitsprep.store.format import (
    CRC_ON_READ,
    FORMAT,
    FORMAT_VERSION,
    LABEL_LEVEL,
    CaseMeta,
    CasePlan,
    CaseWritten,
    compress_label_slice,
    crc32,
    index_dtype,
)
from kitsprep.store.info import StoreInfo, file_size, open_store, summarise
from kitsprep.store.reader import SliceReader
from kitsprep.store.superblock import clear_write_flags
from kitsprep.store.write import create_layout, finalize, image_offsets

__all__ = [
    "CRC_ON_READ",
    "FORMAT",
    "FORMAT_VERSION",
    "LABEL_LEVEL",
    "CaseMeta",
    "CasePlan",
    "CaseWritten",
    "SliceReader",
    "StoreInfo",
    "clear_write_flags",
    "compress_label_slice",
    "crc32",
    "create_layout",
    "file_size",
    "finalize",
    "image_offsets",
    "index_dtype",
    "open_store",
    "summarise",
]
