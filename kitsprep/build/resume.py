"""What makes a build resumable: the partial build's folder (`OUT.partial`) and each
case's commit record in it, written atomically once the case's slices are on disk
(`--resume` redoes every case without one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kitsprep.files import atomic_path
from kitsprep.geometry import InPlane
from kitsprep.store.format import CaseMeta, CaseWritten


def partial_dir(out: Path) -> Path:
    """Where a build of ``out`` lives until it is complete (and where --resume finds it)."""
    return out.with_name(out.name + ".partial")


def save_record(path: Path, w: CaseWritten) -> None:
    meta = {
        **w.meta.__dict__,
        "affine": w.meta.affine.tolist(),
        "in_plane": w.meta.in_plane.as_dict(),
    }
    chunks = w.label_chunks or []
    lengths = np.array([len(c) for c in chunks], np.int64)
    blob = np.frombuffer(b"".join(chunks), np.uint8)
    # The record is the case's commit: atomic, so --resume never trusts half of one.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            meta=json.dumps(meta),
            counts=w.counts,
            lengths=lengths,
            blob=blob,
            labelled=w.label_chunks is not None,
            top=w.max_label,
            crc=w.image_crc,
        )


def load_record(path: Path) -> CaseWritten:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        meta["affine"] = np.asarray(meta["affine"])
        meta["in_plane"] = InPlane(**meta["in_plane"])
        for k in ("source_shape", "spacing", "axes"):
            meta[k] = tuple(meta[k])
        chunks = None
        if bool(z["labelled"]):
            ends = np.cumsum(z["lengths"])
            blob = z["blob"].tobytes()
            chunks = [blob[e - n : e] for e, n in zip(ends, z["lengths"], strict=True)]
        return CaseWritten(CaseMeta(**meta), z["counts"], chunks, int(z["top"]), z["crc"])


def record_fingerprint(path: Path) -> dict:
    with np.load(path) as z:
        fp = json.loads(str(z["meta"]))["fingerprint"]
    return {k: fp[k] for k in ("imaging", "segmentation") if k in fp}
