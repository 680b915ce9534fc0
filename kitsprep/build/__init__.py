"""`kitsprep build`: every case -> one store, in parallel, atomically, resumably.

How it stays correct when killed at any instant:
1. Headers are read first (cheap), so the whole layout is known before any voxel is decoded;
   `store.create_layout` creates every dataset with image chunks allocated up front, in
   `OUT.partial/store.h5`, and records the plan in `OUT.partial/manifest.json`.
2. Worker processes decode cases and write image slices with `pwrite` straight to their
   pre-allocated chunks (disjoint byte ranges; the HDF5 metadata is never touched), fsync,
   then drop the case's labels and counts in `OUT.partial/cases/<id>.npz` by atomic rename.
   That file is the case's commit record: `--resume` redoes every case without one.
3. The single writer (`store.finalize`) then writes labels, attributes and the index, and
   the store is renamed onto OUT. A file at OUT is therefore always complete.

One module a job: `config` (options, jobs, events, report), `plan` (headers -> layout,
changed sources), `resume` (the partial folder, commit records), `case` (one case: decode,
kernels, write, label checks), `workers` (this process or a pool), `lock`, `finish`
(edition, finalize, rename) and `run` (`build_store`, the driver).
"""

from kitsprep.build.config import AllowedLabels, BuildConfig, BuildReport, CaseEvent, CaseJob
from kitsprep.build.resume import partial_dir
from kitsprep.build.run import build_store, check_out_path

__all__ = [
    "AllowedLabels",
    "BuildConfig",
    "BuildReport",
    "CaseEvent",
    "CaseJob",
    "build_store",
    "check_out_path",
    "partial_dir",
]
