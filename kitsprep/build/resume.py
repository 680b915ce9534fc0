"""What makes a build resumable: the partial build's folder (`OUT.partial`) and each
case's commit record in it, written atomically once the case's slices are on disk
(`--resume` redoes every case without one)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kitsprep.files import atomic_path
from kitsprep.geometry import InPlane
from kitsprep.store.format import CaseMeta, CaseWritten


def partial_dir(out: Path) -> Path:
    """Where a build of ``out`` lives until it is complete (and where --resume finds it)."""
    return out.with_name(out.name + ".partial")


def save_record(path: Path, w: CaseWritten, fsync: bool = True) -> None:
    meta = {
        **w.meta.__dict__,
        "affine": w.meta.affine.tolist(),
        "in_plane": w.meta.in_plane.as_dict(),
    }
    chunks = w.label_chunks or []
    lengths = np.array([len(c) for c in chunks], np.int64)
    blob = np.frombuffer(b"".join(chunks), np.uint8)
    # The record is the case's commit: atomic and (unless --no-fsync) durable before its
    # rename, so --resume never trusts half of one.
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
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


def readable_records(
    records: dict[str, Path], note: Callable[[str], None]
) -> dict[str, CaseWritten]:
    """The commit records that load, by case; one that does not (emptied or cut short by a
    crash or a full disk) is removed with a line naming it, and its case is redone."""
    out = {}
    for cid, path in records.items():
        if not path.is_file():
            continue
        try:
            out[cid] = load_record(path)
        except Exception as exc:  # noqa: BLE001 - zip, npz and JSON errors of a torn file
            reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            note(
                f"warning: the commit record {path} is unreadable "
                f"({reason or type(exc).__name__}); redoing {cid}"
            )
            path.unlink(missing_ok=True)
    return out


def record_fingerprint(path: Path) -> dict:
    with np.load(path) as z:
        fp = json.loads(str(z["meta"]))["fingerprint"]
    return {k: fp[k] for k in ("imaging", "segmentation") if k in fp}
