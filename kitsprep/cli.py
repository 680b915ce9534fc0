"""`kitsprep`: thin click commands over the library (synth, build, info, verify)."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

from kitsprep import __version__
from kitsprep.errors import KitsError
from kitsprep.labels import EDITIONS
from kitsprep.progress import Progress
from kitsprep.synth import SYNTH_EDITIONS
from kitsprep.window import DEFAULT_WINDOW, WINDOW_PRESETS


def _fail(exc: Exception) -> None:
    click.echo(f"Error: {exc}", err=True)
    sys.exit(1)


class KitsGroup(click.Group):
    """Turns KitsError, and the machine's refusals (full disk, no permission), into one
    line and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; a user error or the machine's refusal ends in one line."""
        try:
            return super().invoke(ctx)
        except KitsError as exc:
            _fail(exc)
        except OSError as exc:
            if exc.errno not in _OS_FIXES:
                raise  # anything else is a bug: keep its traceback
            _fail(os_error(exc))


_OS_FIXES = {
    errno.ENOSPC: "free space on that disk (or write elsewhere), then rerun; a build or fit "
    "continues with --resume",
    errno.EDQUOT: "free space within your quota (or write elsewhere), then rerun; a build or "
    "fit continues with --resume",
    errno.EFBIG: "the file passed the size limit of this file system or shell (ulimit -f); "
    "write elsewhere or raise the limit, then rerun; a build or fit continues with --resume",
    errno.EIO: "the disk reported an I/O error; check it (or write elsewhere), then rerun; a "
    "build or fit continues with --resume",
    errno.EACCES: "choose a location you can write to, or fix its permissions",
    errno.EPERM: "choose a location you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder, where a file is expected; name a file",
    errno.EEXIST: "a file is in the way of a folder of that name; choose another path",
    errno.ENOENT: "a folder in the path does not exist (or cannot be made there); choose "
    "another path",
}


def os_error(exc: OSError) -> KitsError:
    """One line for an OSError the machine raised: the file, the reason, the fix."""
    where = f"{exc.filename}: " if exc.filename else ""
    return KitsError(f"{where}{exc.strerror or exc}; {_OS_FIXES.get(exc.errno, 'check the path')}")


def _window_help() -> str:
    """The --window help, from the presets themselves."""
    shown = []
    for name, w in WINDOW_PRESETS.items():
        style = "-> [0,1]" if w.offset == w.lo else "z-score"
        default = "default: " if name == DEFAULT_WINDOW else ""
        shown.append(f"{name} ({default}clip {w.lo:g}..{w.hi:g}, {style})")
    return "HU window preset: " + " or ".join(shown) + "."


# kitstrain's default U-Net halves the slice this many times (kitstrain/model/presets.py); kitsprep
# does not import kitstrain, so the build-time warning keeps its own copy
COMPILE_NOTE_S = 2.0  # kernel compile time worth a mention (loading the cache takes less)
DEFAULT_DEPTH = 4
DEFAULT_DIVISOR = 2**DEFAULT_DEPTH


def _warn_misnamed(src: Path) -> None:
    """Entries skipped for their name, or because they cannot be opened: said once."""
    from kitsprep.cases import misnamed_case_folders, unusable_case_entries

    unusable = unusable_case_entries(src)
    if unusable:
        shown = ", ".join(unusable[:5]) + (
            f" and {len(unusable) - 5} more" if len(unusable) > 5 else ""
        )
        click.echo(
            f"warning: skipping {len(unusable)} case entr{'y' if len(unusable) == 1 else 'ies'} "
            f"in {src} that are not folders one can open: {shown}; fix or remove them",
            err=True,
        )
    odd = misnamed_case_folders(src)
    if odd:
        shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        click.echo(
            f"warning: skipping {len(odd)} folder(s) in {src} not named case_XXXXX "
            f"(five digits): {shown}; rename them to include them",
            err=True,
        )


@click.group(cls=KitsGroup)
@click.version_option(__version__, prog_name="kitsprep")
def main() -> None:
    """KiTS19 NIfTI volumes -> one chunked HDF5 slice store."""


@main.command()
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder to write case_XXXXX/ into (KiTS19 layout).",
)
@click.option("--cases", default=10, show_default=True, type=click.IntRange(1, 99999))
@click.option(
    "--size",
    default=128,
    show_default=True,
    type=click.IntRange(16, 1024),
    help="In-plane size of the square cases.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--edition",
    type=click.Choice(SYNTH_EDITIONS),
    default=SYNTH_EDITIONS[0],
    show_default=True,
    help="kits23 adds renal cysts (label 3) and writes kits23.json beside the cases.",
)
def synth(out: Path, cases: int, size: int, seed: int, edition: str) -> None:
    """Write a synthetic KiTS-layout cohort (the embedded default data set)."""
    from kitsprep.synth import SynthConfig, write_cohort

    if out.exists() and any(out.glob("case_*")):
        raise KitsError(f"{out} already holds case folders; choose an empty --out or delete it")
    progress = Progress(sys.stderr).start(cases, "synth", unit="case")

    def on_case(cid: str) -> None:
        progress.item_done(f"synth {cid}")
        progress.advance(1)

    try:
        ids = write_cohort(
            SynthConfig(cases=cases, size=size, seed=seed, edition=edition), out, on_case=on_case
        )
    finally:
        progress.close()
    click.echo(f"wrote {len(ids)} cases to {out}")


@main.command()
@click.option(
    "--src",
    type=click.Path(path_type=Path),
    required=True,
    help="KiTS data folder of case_XXXXX/ folders (KiTS19, KiTS21 or KiTS23 layout), an "
    "nnU-Net raw dataset folder (dataset.json, imagesTr/, labelsTr/, imagesTs/), or a MONAI "
    "datalist .json (its folds become the store's recorded splits).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Store to write.")
@click.option(
    "--size",
    default=512,
    show_default=True,
    type=click.IntRange(16, 2048),
    help="In-plane size of every stored slice (aspect kept, padded with air).",
)
@click.option(
    "--spacing",
    default="none",
    show_default=True,
    metavar="auto|MM|none",
    help="In-plane mm per stored pixel: auto (the median spacing of the cases built), a "
    "number, or none (the whole slice resized to --size). With a spacing, each case is "
    "cropped to its body and padded to --size; one that does not fit is resized further "
    "down (reported), never cutting a labelled voxel.",
)
@click.option(
    "--window",
    "window_name",
    default=None,
    help=_window_help(),
)
@click.option(
    "--window-range",
    nargs=2,
    type=float,
    default=None,
    metavar="LO HI",
    help="Clip range in HU (overrides the preset's limits).",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(1, 256),
    help="Decoding processes [default: all cores].",
)
@click.option(
    "--cases", "case_spec", default=None, help="Cases to include: 0-19,50-54, case ids, or @file."
)
@click.option("--resume", is_flag=True, help="Continue an interrupted build of --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option(
    "--skip-bad", is_flag=True, help="Record bad cases in the store's attributes and go on."
)
@click.option(
    "--no-fsync",
    is_flag=True,
    help="Skip per-case fsync (faster; a power cut may then lose finished cases).",
)
@click.option(
    "--edition",
    type=click.Choice(["auto", *EDITIONS]),
    default="auto",
    show_default=True,
    help="KiTS edition whose labels the masks hold; auto: what the source declares "
    "(an nnU-Net dataset.json's labels, kits23.json, kits21.json, KiTS21's "
    "aggregated_MAJ_seg.nii.gz), else kits23 "
    "when a mask holds a cyst (label 3), else kits19.",
)
def build(
    src: Path,
    out: Path,
    size: int,
    spacing: str,
    window_name: str | None,
    window_range: tuple[float, float] | None,
    workers: int | None,
    case_spec: str | None,
    resume: bool,
    overwrite: bool,
    skip_bad: bool,
    no_fsync: bool,
    edition: str,
) -> None:
    """Build one chunked HDF5 slice store from every NIfTI case in --src."""
    from kitsprep.build import BuildConfig, CaseEvent, build_store
    from kitsprep.spacing import parse_spacing
    from kitsprep.window import resolve_window

    spacing = parse_spacing(spacing)
    window = resolve_window(window_name, tuple(window_range) if window_range else None)
    _warn_misnamed(src)
    if size % DEFAULT_DIVISOR:
        click.echo(
            f"warning: --size {size} cannot be halved {DEFAULT_DEPTH} times, so "
            f"`kitstrain fit` (default depth {DEFAULT_DEPTH}) will refuse this store; "
            f"use a multiple of {DEFAULT_DIVISOR} (e.g. --size "
            f"{max(DEFAULT_DIVISOR, round(size / DEFAULT_DIVISOR) * DEFAULT_DIVISOR)}), or "
            "train with a smaller --depth",
            err=True,
        )
    cfg = BuildConfig(
        src=src,
        out=out,
        window=window,
        size=size,
        workers=workers or os.cpu_count() or 1,
        cases=case_spec,
        resume=resume,
        overwrite=overwrite,
        skip_bad=skip_bad,
        fsync=not no_fsync,
        edition=edition,
        spacing=spacing,
    )
    progress = Progress(sys.stderr)
    cases = {"total": 0, "done": 0}

    def on_start(n_cases: int, n_slices: int) -> None:
        cases["total"] = n_cases
        progress.start(n_slices, "build", unit="slice")

    def on_case(ev: CaseEvent) -> None:
        cases["done"] += 1
        if ev.error:
            progress.note(f"skipped {ev.case_id}: {ev.error}")
        elif ev.resumed:
            progress.item_done(f"{ev.case_id}: done in an earlier run")
        else:
            progress.item_done(f"{ev.case_id}: {ev.slices} slices in {ev.seconds:.2f}s")
        # After item_done: on a terminal the bar's postfix counts cases.
        progress.advance(ev.slices, postfix=f"{cases['done']}/{cases['total']} cases")

    try:
        report = build_store(cfg, on_case=on_case, on_start=on_start, on_note=progress.note)
    finally:
        progress.close()
    click.echo(
        f"built {report.out}: {report.cases} cases, {report.slices} slices, "
        f"{report.bytes / 2**20:.1f} MiB in {report.seconds:.1f}s "
        f"({report.slices_per_s:.0f} slices/s)"
        + (
            f", {report.resumed_cases} cases from the interrupted run"
            if report.resumed_cases
            else ""
        )
        + (f", {len(report.bad_cases)} bad cases skipped" if report.bad_cases else "")
        + (
            f"; plus {report.compile_seconds:.1f}s compiling the kernels (once: they "
            "are cached for later builds)"
            if report.compile_seconds >= COMPILE_NOTE_S
            else ""
        )
    )
    click.echo(f"edition {report.edition} ({report.edition_reason})")
    if report.spacing.mm is not None:
        click.echo(
            f"spacing {report.spacing.mm:.4g} mm per pixel (--spacing {report.spacing.option})"
            + _shrunk_note(report.shrunk)
        )


def _shrunk_note(shrunk: dict[str, float]) -> str:
    """The cases resized beyond the target spacing to fit the square, in a few words."""
    if not shrunk:
        return ""
    shown = ", ".join(f"{c} x{f:.3g}" for c, f in list(shrunk.items())[:10])
    more = f" and {len(shrunk) - 10} more" if len(shrunk) > 10 else ""
    return (
        f"; {len(shrunk)} case(s) resized further to fit --size: {shown}{more} "
        "(a larger --size or --spacing keeps them at the target)"
    )


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(store: Path, as_json: bool) -> None:
    """What a store holds: cases, slices, size on disk, window, foreground share."""
    from kitsprep.store.info import open_store, summarise

    summary = summarise(open_store(store))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    w = summary["window"]
    click.echo(
        f"store        {summary['path']}  (format v{summary['format_version']}, "
        f"kitsprep {summary['kitsprep_version']})"
    )
    why = "; ".join(
        f"{n}: {r}" if len(summary["unlabelled_reasons"]) > 1 else r
        for r, n in summary["unlabelled_reasons"].items()
    )
    click.echo(
        f"cases        {summary['cases']} ({summary['labelled_cases']} labelled, "
        f"{summary['unlabelled_cases']} unlabelled" + (f": {why})" if why else ")")
    )
    click.echo(f"slices       {summary['slices']} of {summary['size']}x{summary['size']}")
    if summary["target_spacing"] is None:
        click.echo("spacing      none (each slice resized whole to the size)")
    else:
        click.echo(
            f"spacing      {summary['target_spacing']:.4g} mm per pixel "
            f"(--spacing {summary['spacing']})" + _shrunk_note(summary["shrunk"])
        )
    reason = f" ({summary['edition_reason']})" if summary["edition_reason"] else ""
    click.echo(
        f"labels       {summary['edition']}{reason}: 0 background, "
        + ", ".join(f"{v} {n}" for n, v in summary["labels"].items())
    )
    click.echo(f"on disk      {summary['bytes'] / 2**20:.1f} MiB")
    click.echo(
        f"window       {w['name']}: clip {w['lo']:g}..{w['hi']:g} HU, "
        f"(v - {w['offset']:g}) / {w['divisor']:g}"
    )
    shares = ", ".join(f"{n} {100 * v:.2f}%" for n, v in summary["pixel_share"].items())
    click.echo(
        f"foreground   {100 * summary['fg_slice_share']:.1f}% of labelled slices hold "
        f"a foreground label; {shares} of labelled pixels"
    )
    if summary["folds"]:
        click.echo(
            f"folds        {summary['folds']} recorded by the source (kitstrain fit --fold K)"
        )
    if summary["bad_cases"]:
        click.echo(f"bad cases    {len(summary['bad_cases'])} skipped at build:")
        for cid, why in summary["bad_cases"].items():
            click.echo(f"  {cid}: {why}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--src",
    type=click.Path(path_type=Path),
    default=None,
    help="Also check labels against the source masks here (any --src that build reads).",
)
def verify(store: Path, src: Path | None) -> None:
    """Integrity: cases complete, index consistent; with --src, labels equal the source."""
    from kitsprep.verify import verify_store

    report = verify_store(store, src, on_case=lambda c: None)
    if not report.ok:
        for p in report.problems[:20]:
            click.echo(f"FAIL {p}", err=True)
        raise KitsError(
            f"{store}: {len(report.problems)} problem(s) found; rebuild the store "
            "with `kitsprep build --overwrite`"
        )
    extra = " and labels equal the source masks" if report.checked_src else ""
    click.echo(f"ok: {report.cases} cases, {report.slices} slices consistent{extra}")


if __name__ == "__main__":
    main()
