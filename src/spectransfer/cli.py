"""The `spectransfer` command line: each command is a thin wrapper over a library module.

Heavy imports (torch, dask, astropy) happen inside the command bodies so that `--help` and
argument errors answer at once. Errors of this package become one line on stderr and exit
code 2 (bad input) or 1 (some inputs failed), never a traceback.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from spectransfer import __version__
from spectransfer.errors import SpectransferError

app = typer.Typer(
    name="spectransfer",
    help="Find quasars in large spectroscopic surveys (SDSS, LAMOST) with a 1-D ConvNet and transfer learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spectransfer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# ---- option validation ------------------------------------------------------------------------
# Typer callbacks shared by every command: each checks one kind of value and answers with one
# line naming the option (never click's boxed usage message, never a traceback later on).


def _checked(test: Callable[[Any], bool], wants: str) -> Callable[..., Any]:
    def callback(param: typer.CallbackParam, value: Any) -> Any:
        if value is not None and not test(value):
            fail(f"{param.opts[0]} must be {wants}, got {value}")
        return value

    return callback


positive_int = _checked(lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
non_negative_float = _checked(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fraction = _checked(lambda v: math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]")


def _probed(check: Callable[[Path], Any]) -> Callable[..., Any]:
    """A typer callback that runs a provenance writability probe on an output path (creates nothing)."""

    def callback(param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
        if value is not None:
            try:
                check(value)
            except SpectransferError as exc:
                fail(f"{param.opts[0]} {exc}")
        return value

    return callback


def writable_dir(param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """An output folder: existing and writable, or creatable below a writable folder. Creates nothing."""
    from spectransfer.provenance import check_writable_dir

    return _probed(check_writable_dir)(param, value)


def writable_file(param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """An output file: a regular file or a new name (a symlink counts as its target), in a writable folder."""
    from spectransfer.provenance import check_writable_file

    return _probed(check_writable_file)(param, value)


def existing_file(param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    if value is not None and not value.is_file():
        fail(f"{param.opts[0]} {value}: {'is not a file' if value.exists() else 'not found'}")
    return value


def available_device(param: typer.CallbackParam, value: str) -> str:
    """auto, cpu or cuda; cuda only where torch sees a CUDA device."""
    if value not in ("auto", "cpu", "cuda"):
        fail(f"{param.opts[0]} must be auto, cpu or cuda, got {value!r}")
    if value == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail(f"{param.opts[0]} cuda: no CUDA device is available to torch {torch.__version__} here (use auto or cpu)")
    return value


# ---- commands -------------------------------------------------------------------------------
# Each command lives in its own block below; keep heavy imports inside the function body.

# ---- fetch ----------------------------------------------------------------------------------
fetch_app = typer.Typer(
    help="Download SDSS/LAMOST spectra and quasar catalogues: concurrent, resumable, verified (manifest DEST/manifest.jsonl).",
    no_args_is_help=True,
)
app.add_typer(fetch_app, name="fetch", rich_help_panel="1. Data")

_FETCH_JOBS = typer.Option(
    8, "--jobs", "-j", callback=positive_int, help="Parallel downloads (also the bound on open connections)."
)
_FETCH_RETRIES = typer.Option(
    5,
    "--retries",
    callback=non_negative_int,
    help="Retries per file after 5xx, timeouts or dropped connections (404 is never retried).",
)
_FETCH_TIMEOUT = typer.Option(
    60.0, "--timeout", callback=positive_float, help="Seconds to wait for a connection or for the next bytes before retrying."
)
_FETCH_BACKOFF = typer.Option(
    1.0,
    "--backoff",
    callback=non_negative_float,
    help="Base of the exponential backoff between retries, in seconds (plus random jitter).",
)
_FETCH_CHECKSUMS = typer.Option(
    None, "--checksums", callback=existing_file, help="sha256sum-style file ('SHA256  PATH' lines); downloads must match it."
)
_FETCH_QUICK = typer.Option(False, "--quick-skip", help="Skip files whose size matches the manifest without re-hashing them.")
_FETCH_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def _fetch_run(
    items: list,
    dest: Path,
    jobs: int,
    retries: int,
    timeout: float,
    backoff: float,
    checksums: Optional[Path],
    quick_skip: bool,
    quiet: bool,
    missing_fails: bool = False,
) -> None:
    """Fetch and print the summary; exit 1 when a file failed (or, for one named file, was missing)."""
    from spectransfer.data.fetch import fetch

    summary = fetch(
        items,
        dest,
        jobs=jobs,
        retries=retries,
        timeout=timeout,
        backoff=backoff,
        checksums=checksums,
        quick_skip=quick_skip,
        quiet=quiet,
    )
    typer.echo(summary.line())
    if summary.failed or (missing_fails and summary.missing):
        for r in summary.results:
            if r.status in ("failed", "missing"):
                typer.echo(f"error: {r.url or r.key}: {r.status} ({r.error})", err=True)
        raise typer.Exit(1)


@fetch_app.command("sdss")
def fetch_sdss(
    list_path: Path = typer.Option(
        ...,
        "--list",
        callback=existing_file,
        help="CSV/FITS/Parquet table with plate, mjd, fiberid columns (any case; RUN2D used when present), e.g. a DR16Q or specObj cut.",
    ),
    dest: Path = typer.Option(
        ...,
        "--dest",
        callback=writable_dir,
        help="Folder that receives the files in the SAS layout (RELEASE/eboss|sdss/spectro/redux/RUN2D/spectra/lite/PLATE/...).",
    ),
    release: str = typer.Option(
        "dr16",
        "--release",
        help="SDSS data release: dr14 (eBOSS run2d v5_10_0), dr16 (v5_13_0) or dr17 (v5_13_2); SDSS-I/II plates use run2d 26 (then 103, 104).",
    ),
    base_url: str = typer.Option(
        "https://data.sdss.org/sas",
        "--base-url",
        help="Root of the Science Archive Server or of a mirror with the same tree below 'sas/'.",
    ),
    jobs: int = _FETCH_JOBS,
    retries: int = _FETCH_RETRIES,
    timeout: float = _FETCH_TIMEOUT,
    backoff: float = _FETCH_BACKOFF,
    checksums: Optional[Path] = _FETCH_CHECKSUMS,
    quick_skip: bool = _FETCH_QUICK,
    quiet: bool = _FETCH_QUIET,
) -> None:
    """Fetch SDSS spec-lite files (spec-PLATE-MJD-FIBER.fits) listed in a table. Exit 1 if any failed."""
    from spectransfer.data.fetch import sdss_items

    _fetch_run(
        sdss_items(list_path, release=release, base_url=base_url),
        dest,
        jobs,
        retries,
        timeout,
        backoff,
        checksums,
        quick_skip,
        quiet,
    )


@fetch_app.command("lamost")
def fetch_lamost(
    list_path: Path = typer.Option(
        ..., "--list", callback=existing_file, help="CSV/FITS/Parquet table with an obsid column, or a text file of bare obsids."
    ),
    dest: Path = typer.Option(
        ...,
        "--dest",
        callback=writable_dir,
        help="Folder that receives DEST/lamost/OBSID.fits (or .fits.gz when the body is gzip).",
    ),
    base_url: str = typer.Option(
        ...,
        "--base-url",
        help="LAMOST release root, files at BASE/spectrum/fits/OBSID (or a URL template with {obsid}). "
        "Per the pylamost client: DR6+ https://www.lamost.org/drN/vX.Y, DR4-5 http://drN.lamost.org/vX; not verified against the live site here.",
    ),
    token: Optional[str] = typer.Option(
        None,
        "--token",
        envvar="LAMOST_TOKEN",
        help="LAMOST access token (registration required), sent as ?token=; default env LAMOST_TOKEN. Never written to the manifest.",
    ),
    jobs: int = _FETCH_JOBS,
    retries: int = _FETCH_RETRIES,
    timeout: float = _FETCH_TIMEOUT,
    backoff: float = _FETCH_BACKOFF,
    checksums: Optional[Path] = _FETCH_CHECKSUMS,
    quick_skip: bool = _FETCH_QUICK,
    quiet: bool = _FETCH_QUIET,
) -> None:
    """Fetch LAMOST low-resolution spectra by obsid. Exit 1 if any failed."""
    from spectransfer.data.fetch import lamost_items

    _fetch_run(
        lamost_items(list_path, base_url=base_url, token=token),
        dest,
        jobs,
        retries,
        timeout,
        backoff,
        checksums,
        quick_skip,
        quiet,
    )


@fetch_app.command("catalog")
def fetch_catalog(
    name: str = typer.Argument(..., help="dr16q (DR16Q_v4.fits), dr14q (DR14Q_v4_4.fits) or specobj (specObj-dr16.fits)."),
    dest: Path = typer.Option(
        ...,
        "--dest",
        callback=writable_dir,
        help="Folder that receives the file in the SAS layout (e.g. dr16/eboss/qso/DR16Q/DR16Q_v4.fits).",
    ),
    base_url: str = typer.Option(
        "https://data.sdss.org/sas", "--base-url", help="Root of the Science Archive Server or of a mirror with the same tree."
    ),
    retries: int = _FETCH_RETRIES,
    timeout: float = _FETCH_TIMEOUT,
    backoff: float = _FETCH_BACKOFF,
    checksums: Optional[Path] = _FETCH_CHECKSUMS,
    quiet: bool = _FETCH_QUIET,
) -> None:
    """Fetch a quasar or spectroscopic catalogue (large: DR16Q ~1.7 GB, specObj-dr16 several GB; resumable)."""
    from spectransfer.data.fetch import catalog_items

    _fetch_run(
        catalog_items(name.lower(), base_url=base_url),
        dest,
        1,
        retries,
        timeout,
        backoff,
        checksums,
        False,
        quiet,
        missing_fails=True,
    )


# ---- inspect + verdicts ---------------------------------------------------------------------
@app.command("inspect", rich_help_panel="3. Find and confirm quasars")
def inspect_cmd(
    candidates: Path = typer.Argument(
        ..., help="Candidates table from `discover` (FITS, EXTNAME CANDIDATES; the .parquet beside it is used when present)."
    ),
    store: Optional[Path] = typer.Option(
        None,
        "--store",
        help="Store the candidates were scored from; supplies the resampled spectrum when the original file is unreadable.",
    ),
    db: Optional[Path] = typer.Option(
        None, "--db", help="SQLite file for the verdicts (created if missing). Default: verdicts.sqlite beside CANDIDATES."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback requires --token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0 picks a free one)."),
    token: Optional[str] = typer.Option(
        None,
        "--token",
        envvar="SPECTRANSFER_TOKEN",
        help="Secret every request must carry (Authorization: Bearer, X-Token or ?token=). Env: SPECTRANSFER_TOKEN.",
    ),
    category: Optional[str] = typer.Option(
        None,
        "--category",
        help="Category the queue starts with: new_candidate, missed_by_model, agree_qso or agree_other (default: all).",
    ),
    order: Optional[str] = typer.Option(
        None,
        "--order",
        help="Queue order: uncertainty (largest P_QSO_STD first: the most informative verdict next; the default when discover ran with --mc-dropout), p_qso (most probable first; the default otherwise) or random (a fixed shuffle).",
    ),
) -> None:
    """Open a local web page to look at candidates and record verdicts (q / n / u)."""
    from spectransfer.inspect.app import create_app
    from spectransfer.inspect.server import check_bind, serve
    from spectransfer.loopback import is_loopback

    check_bind(host, token)
    opened = None
    if store is not None:
        from spectransfer.data.store import open_store

        opened = open_store(store)
    db_path = db if db is not None else candidates.parent / "verdicts.sqlite"
    dirs = [candidates.parent] + ([store, store.parent] if store is not None else [])
    web = create_app(
        candidates,
        opened,
        db_path,
        token=token,
        default_category=category,
        loopback_only=is_loopback(host),
        search_dirs=dirs,
        order=order,
    )

    def ready(url: str) -> None:
        typer.echo(f"Inspecting {web.state.queue.n:,} candidates at {url}  (verdicts -> {db_path}; Ctrl-C to stop)")

    serve(web, host=host, port=port, token=token, on_ready=ready)


verdicts_app = typer.Typer(help="Work with the verdicts recorded by `spectransfer inspect`.", no_args_is_help=True)
app.add_typer(verdicts_app, name="verdicts", rich_help_panel="3. Find and confirm quasars")


@verdicts_app.command("export")
def verdicts_export(
    db: Path = typer.Option(..., "--db", callback=existing_file, help="Verdict database written by `spectransfer inspect`."),
    out: Path = typer.Option(
        ...,
        "--out",
        callback=writable_file,
        help="Table to write, in the format its name says: .fits (EXTNAME VERDICTS), .parquet, .csv (ECSV: units and provenance in '#' lines) or .vot; written to a temporary name, then renamed.",
    ),
    candidates: Optional[Path] = typer.Option(
        None,
        "--candidates",
        callback=existing_file,
        help="Candidates table from `discover` (FITS or Parquet): adds each spectrum's RA, DEC, P_QSO and CATEGORY.",
    ),
) -> None:
    """Write every verdict (one row per spectrum and inspector) as a table with units, descriptions and provenance."""
    from spectransfer.inspect.verdicts import export_table

    n = export_table(db, out, candidates=candidates)
    typer.echo(f"wrote {n} verdicts to {out}")


@verdicts_app.command("summary")
def verdicts_summary(
    db: Path = typer.Option(..., "--db", callback=existing_file, help="Verdict database written by `spectransfer inspect`."),
) -> None:
    """Count verdicts per inspector and kind."""
    from collections import Counter

    from spectransfer.inspect.verdicts import VERDICTS, VerdictDB

    rows = VerdictDB(db, create=False).rows()
    per: dict[str, Counter] = {}
    for r in rows:
        per.setdefault(r["inspector"], Counter())[r["verdict"]] += 1
    typer.echo(f"{len(rows)} verdicts on {len({r['spectrum_id'] for r in rows})} spectra by {len(per)} inspector(s)")
    for who, c in sorted(per.items()):
        typer.echo(f"  {who}: " + ", ".join(f"{v} {c.get(v, 0)}" for v in VERDICTS))


# ---- ingest + stats -------------------------------------------------------------------------
@app.command("ingest", rich_help_panel="1. Data")
def ingest_cmd(
    inputs: list[Path] = typer.Argument(..., help="Survey FITS files or folders (searched recursively)."),
    store: Path = typer.Option(
        ..., "--store", callback=writable_dir, help="Store folder; created if missing, appended to otherwise."
    ),
    survey: str = typer.Option(
        "auto", "--survey", help="sdss, lamost or auto; with sdss/lamost, files of the other survey are rejected."
    ),
    catalog: list[Path] = typer.Option(
        [],
        "--catalog",
        help="Catalogue to label with (repeatable; remembered for later ingests): a quasar catalogue (DR14Q, DR16Q, LAMOST DR*Q, known by their columns) labels all its rows, a table with a class column (specObj CLASS, specClass, objtype...) only its QSO rows; any other table is refused (see --qso-catalog).",
    ),
    qso_catalog: list[Path] = typer.Option(
        [],
        "--qso-catalog",
        help="A table every row of which is a quasar, though nothing in its columns says so (repeatable; remembered).",
    ),
    labels: Optional[str] = typer.Option(
        None,
        "--labels",
        help="catalog: label by the catalogues (default); pipeline: label by the survey pipeline's own CLASS == QSO (label_source 'pipeline'). Default: the store's mode.",
    ),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        callback=non_negative_int,
        help="Worker processes of a local Dask cluster (default 2; 0 = no Dask, run in this process).",
    ),
    scheduler: Optional[str] = typer.Option(
        None,
        "--scheduler",
        help="Address of an existing Dask scheduler (tcp://HOST:PORT); its workers must see the files and the store.",
    ),
    batch_size: int = typer.Option(
        256,
        "--batch-size",
        callback=positive_int,
        help="Files per Dask task (rounded up to the store's chunk rows; the chunk size of a new store).",
    ),
    no_zwarning_filter: bool = typer.Option(False, "--no-zwarning-filter", help="Keep SDSS spectra with ZWARNING != 0."),
    no_coverage_filter: bool = typer.Option(
        False,
        "--no-coverage-filter",
        help="Keep spectra that do not cover the grid (SDSS WAVEMIN <= 3839.7244, WAVEMAX >= 8914.597).",
    ),
    split_seed: Optional[int] = typer.Option(
        None, "--split-seed", help="Seed of the object-level split hash (default: the store's, else 0)."
    ),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help="Validation fraction for surveys of <= 1M spectra (default 0.1)."
    ),
    test_fraction: Optional[float] = typer.Option(
        None, "--test-fraction", help="Test fraction for surveys of <= 1M spectra (default 0.1)."
    ),
    val_size: Optional[int] = typer.Option(
        None, "--val-size", help="Validation spectra for surveys of > 1M spectra (default 50000, the paper's)."
    ),
    test_size: Optional[int] = typer.Option(
        None, "--test-size", help="Test spectra for surveys of > 1M spectra (default 100000, the paper's)."
    ),
    resplit: bool = typer.Option(
        False, "--resplit", help="Allow split settings that differ from the store's (moves spectra between train, val and test)."
    ),
    data_root: Optional[Path] = typer.Option(
        None,
        "--data-root",
        help="Folder the store records source files relative to (default: the store's, else the folder the inputs share); give the new place after moving the survey folder, and its files are found unchanged.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Read survey files, filter, label, resample and append them to a store (Dask, resumable)."""
    import json as _json

    from spectransfer.data.ingest import ingest as run_ingest
    from spectransfer.data.splits import SplitConfig
    from spectransfer.data.store import open_store

    split_config = None
    overrides = {
        k: v
        for k, v in dict(
            seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction, val_size=val_size, test_size=test_size
        ).items()
        if v is not None
    }
    if overrides:
        base: dict = {}
        if (store / "store.json").exists():
            base = open_store(store).info.get("splits", {}).get("config", {})
        try:
            split_config = SplitConfig.from_dict({**base, **overrides})
        except ValueError as exc:
            fail(str(exc))
    if workers is not None and scheduler is not None:
        fail("give --workers or --scheduler, not both")
    summary = run_ingest(
        [str(p) for p in inputs],
        store,
        survey=survey.lower(),
        catalogs=[str(c) for c in catalog],
        qso_catalogs=[str(c) for c in qso_catalog],
        labels=None if labels is None else labels.lower(),
        resplit=resplit,
        workers=0 if scheduler is not None else (2 if workers is None else workers),
        scheduler=scheduler,
        batch_size=batch_size,
        zwarning_filter=not no_zwarning_filter,
        coverage_filter=not no_coverage_filter,
        split_config=split_config,
        data_root=data_root,
        quiet=quiet or as_json,
    )
    if as_json:
        typer.echo(_json.dumps(summary.to_dict()))
        return
    s = summary
    typer.echo(
        f"{s.store}: {s.files_seen} files seen, {s.skipped_unchanged} unchanged skipped, {s.files_processed} read "
        f"({s.accepted} accepted, {s.rejected} rejected, {s.unchanged_content} same bytes) in {s.seconds:.1f} s "
        f"({s.spectra_per_s:,.1f} spectra/s)"
    )
    if s.resumed_batches:
        typer.echo(f"resumed {s.resumed_batches} unfinished batches of an interrupted ingest")
    if s.duplicates:
        typer.echo(f"{s.duplicates} files held a spectrum already in the store (rejected as duplicates)")
    typer.echo(
        f"store: {s.live_rows} spectra ({s.rows_allocated} array rows); splits "
        + ", ".join(f"{k} {v}" for k, v in sorted(s.splits.items()))
    )
    if s.rejected_by_kind:
        typer.echo("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(s.rejected_by_kind.items())))
    _echo_labels(s.labels)
    if s.resplit_moved:
        typer.echo(f"re-split: {s.resplit_moved} spectra changed split")
    for w in s.split_warnings:
        typer.echo(f"warning: {w}", err=True)
    lk = s.leakage
    if lk:
        typer.echo(
            f"object-level split: {lk.get('repeat_spectra', 0)} spectra are repeats ({lk.get('repeat_objects', 0)} objects); "
            f"a per-spectrum random split would have leaked {lk.get('leaked_per_spectrum_split', 0)} of them across splits "
            f"({lk.get('eval_spectra_with_train_twin', 0)} val/test spectra with a train twin)"
        )


def _echo_labels(labels: dict) -> None:
    """One line on how the labels were made, and per catalogue its rows per class."""
    mode = labels.get("mode")
    if mode == "pipeline":
        typer.echo(
            f"labels: pipeline CLASS, {labels.get('quasars', 0)} quasars ("
            + ", ".join(f"{k} {v}" for k, v in labels.get("class_counts", {}).items())
            + ")"
        )
    elif mode == "none":
        typer.echo("labels: none (no --catalog; every spectrum is 'other'; give --catalog FILE or --labels pipeline)")
    elif mode == "catalog":
        c = labels.get("counts", {})
        typer.echo(f"labels: catalogues, {c.get('id', 0)} quasars by id, {c.get('position', 0)} by position")
        for cat in labels.get("catalogs", []):
            per = ", ".join(f"{k} {v}" for k, v in cat.get("class_counts", {}).items())
            typer.echo(
                f"  {cat['name']}: {cat.get('rows', 0)} rows, {cat['quasars']} quasars ({cat.get('rule')}{': ' + per if per else ''})"
            )


def print_store_stats(store_path: Path, as_json: bool = False) -> None:
    """Print per-survey, class, label-source, split and rejection counts of a store (rich tables)."""
    import json as _json

    from rich.console import Console
    from rich.table import Table

    from spectransfer.data.store import open_store, store_stats

    st = store_stats(open_store(store_path))
    if as_json:
        typer.echo(_json.dumps(st))
        return
    console = Console()
    console.print(
        f"[bold]{st['path']}[/bold]  {st['n_live']} spectra, {st['n_rows_allocated']} array rows "
        f"({st['n_dead_rows']} not live), {st['n_rejected']} rejected files"
    )
    for key, title in (
        ("survey", "survey"),
        ("pipeline_class", "pipeline class"),
        ("label", "catalogue label"),
        ("label_source", "label source"),
        ("rejected", "rejection reason"),
    ):
        table = Table(title=title, title_justify="left")
        table.add_column(title)
        table.add_column("count", justify="right")
        for k, v in st[key].items():
            table.add_row(k, f"{v:,}")
        console.print(table)
    table = Table(title="split", title_justify="left")
    for col in ("split", "spectra", "objects", "quasars"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for k, v in st["split"].items():
        table.add_row(k, f"{v['spectra']:,}", f"{v['objects']:,}", f"{v['quasars']:,}")
    console.print(table)
    lk = st.get("leakage") or {}
    if lk:
        console.print(
            f"repeat spectra {lk.get('repeat_spectra', 0)} in {lk.get('repeat_objects', 0)} objects; a per-spectrum split "
            f"would leak {lk.get('leaked_per_spectrum_split', 0)} across splits"
        )


@app.command("stats", rich_help_panel="1. Data")
def stats_cmd(
    store: Path = typer.Argument(..., help="Store folder written by `spectransfer ingest`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Counts per survey, pipeline class, label source, split and rejection reason of a store."""
    print_store_stats(store, as_json)


# ---- info -----------------------------------------------------------------------------------
@app.command("info", rich_help_panel="1. Data")
def info(
    files: list[Path] = typer.Argument(
        ..., help="Spectrum files (FITS, .gz too) or folders searched recursively for *.fits, *.fit, *.fits.gz, *.fit.gz."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="One JSON object per line with the keys path, survey, format, ids, ra, dec, class, subclass, z, zwarning, n_pixels, wave_min, wave_max and cuts ({pass, reason}: whether `ingest` would keep it).",
    ),
) -> None:
    """Describe survey spectrum files: one line per file, ending with whether ingest's quality cuts keep it and why not.

    A file that cannot be used (not FITS, truncated, missing column, no finite flux, all-zero ivar, unknown format) is reported on stderr as 'error: FILE: reason' and the rest are still shown, so stdout holds only the good files' lines (valid JSON lines with --json). Exit code 1 when any file failed.
    """
    import json

    from spectransfer.data.ingest import passes_cuts
    from spectransfer.errors import SpectrumError
    from spectransfer.surveys import read_spectrum, walk_spectrum_files

    walk = walk_spectrum_files(files)
    n_failed = len(walk.skipped)
    for path, reason in walk.skipped:
        typer.echo(f"error: {path}: {reason}", err=True)
    for p in files:
        if p.is_dir() and not any(f.is_relative_to(p) for f in walk.files):
            n_failed += 1
            typer.echo(f"error: {p}: no spectrum files in this folder", err=True)
    for path in walk.files:
        try:
            rec = read_spectrum(path)
            summary = rec.summary()
        except SpectrumError as exc:
            n_failed += 1
            typer.echo(f"error: {exc}", err=True)
            continue
        ok, why = passes_cuts(rec)
        if as_json:
            typer.echo(json.dumps({"path": str(path), **summary, "cuts": {"pass": ok, "reason": why}}))
        else:
            ids = " ".join(f"{k}={v}" for k, v in summary["ids"].items())
            z = "None" if summary["z"] is None else f"{summary['z']:.5f}"
            ra = "None" if summary["ra"] is None else f"{summary['ra']:.5f}"
            dec = "None" if summary["dec"] is None else f"{summary['dec']:+.5f}"
            typer.echo(
                f"{path}: {summary['survey']} {summary['format']} {ids} ra={ra} dec={dec} "
                f"class={summary['class']} subclass={summary['subclass']} z={z} zwarning={summary['zwarning']} "
                f"n_pixels={summary['n_pixels']} wave={summary['wave_min']:.1f}-{summary['wave_max']:.1f} A "
                f"cuts: {why}"
            )
    if n_failed:
        raise typer.Exit(1)


# ---- train ----------------------------------------------------------------------------------
@app.command("train", rich_help_panel="2. Train and evaluate")
def train_cmd(
    store: Path = typer.Option(..., "--store", help="Store folder to train on (rows with split train; val for early stopping)."),
    out: Path = typer.Option(
        ...,
        "--out",
        callback=writable_dir,
        help="Run folder to write (config.toml, model.safetensors, checkpoints/, metrics.jsonl, tb/).",
    ),
    survey: Optional[str] = typer.Option(
        None, "--survey", help="Use only the store rows of this survey (sdss, lamost); default all."
    ),
    mode: str = typer.Option(
        "scratch",
        "--mode",
        help="scratch: fresh Xavier weights. finetune: load all weights from --init, train all layers with a fresh optimizer. freeze-conv: load --init, train only the dense head.",
    ),
    init: Optional[Path] = typer.Option(
        None, "--init", help="Pretrained run folder for finetune / freeze-conv (same model and grid)."
    ),
    model: str = typer.Option("vgg-a", "--model", help="Network: vgg-a (the paper's), vgg-b, vgg-d or vgg-e."),
    input_: str = typer.Option(
        "flux", "--input", help="Network input: flux (the paper's) or flux+ivar (a second channel sqrt(ivar)/max)."
    ),
    max_epochs: int = typer.Option(
        50, "--max-epochs", callback=positive_int, help="Upper bound on passes over the training rows."
    ),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps", callback=positive_int, help="Upper bound on optimisation steps (default: no bound)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, data order, dropout and --train-fraction subsets."),
    devices: int = typer.Option(
        1,
        "--devices",
        callback=positive_int,
        help="Processes on this machine (DDP; one per GPU, or CPU processes with gloo). Under torchrun the world comes from torchrun.",
    ),
    device: str = typer.Option("auto", "--device", callback=available_device, help="auto (CUDA when present), cpu or cuda."),
    batch_size: int = typer.Option(256, "--batch-size", callback=positive_int, help="Spectra per step and process."),
    lr: float = typer.Option(1e-3, "--lr", callback=positive_float, help="Adam learning rate."),
    eval_every: int = typer.Option(
        1000,
        "--eval-every",
        callback=positive_int,
        help="Evaluate on the validation rows (and checkpoint) every this many steps.",
    ),
    patience: int = typer.Option(
        10, "--patience", callback=non_negative_int, help="Stop after this many evaluations without improvement."
    ),
    early_stop: str = typer.Option(
        "f1", "--early-stop", help="Early-stopping metric: f1 (validation F1 at p=0.5) or loss (validation BCE)."
    ),
    imbalance: str = typer.Option(
        "none",
        "--imbalance",
        help="none | pos-weight | balanced. "
        + "none (the paper): plain BCE. pos-weight: BCE pos_weight = n_neg/n_pos, raises recall at 0.5 and lowers precision, probabilities shift up (calibrate with evaluate). balanced: stream resampled to ~half quasars per batch (positives repeat); same effect on probabilities.",
    ),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="fp32 or bf16 (torch.amp autocast, also on CPU); auto = bf16 on GPU and on CPUs with bf16 instructions (AVX512-BF16, AMX), fp32 elsewhere (bf16 is emulated and slower there).",
    ),
    train_fraction: Optional[float] = typer.Option(
        None,
        "--train-fraction",
        callback=fraction,
        help="Train on this fraction of the training rows (deterministic subset by --seed).",
    ),
    train_limit: Optional[int] = typer.Option(
        None,
        "--train-limit",
        callback=positive_int,
        help="Train on at most this many training rows (deterministic subset by --seed).",
    ),
    workers: int = typer.Option(
        2,
        "--workers",
        callback=non_negative_int,
        help="DataLoader worker processes reading the store (0 = read in the training process).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from checkpoints/last.pt with its saved settings."
    ),
    debug_rows: bool = typer.Option(
        False, "--debug-rows", help="Log the row ids each process consumed and its final weights to RUN/debug/."
    ),
    z_head: bool = typer.Option(
        True,
        "--z-head/--no-z-head",
        help="Also learn the quasar redshift: a second head (a distribution over 300 bins in ln(1+z), 0-7) trained on the catalogue z of the training quasars. --no-z-head: the paper's classifier alone.",
    ),
    z_weight: float = typer.Option(
        0.6,
        "--z-weight",
        help="Weight of the redshift cross-entropy (quasars with a catalogue z) added to the classification BCE (every spectrum).",
    ),
    z_head_kind: str = typer.Option(
        "shift",
        "--z-head-kind",
        help="The redshift head: shift (one learnt rest-frame pattern correlated with the trunk's features at every redshift, since a redshift is a shift on the log grid) or dense (8192 -> 256 -> 300 bins).",
    ),
    z_shift: int = typer.Option(
        256,
        "--z-shift",
        help="Redshift augmentation: each training quasar is also shown to the z head moved by up to this many grid bins, at most an eighth of the grid (a shift of k bins is the spectrum at (1+z)*10**(k*log_step)); 0 = off. The classifier sees only the unshifted spectra.",
    ),
    depth_augment: float = typer.Option(
        0.0,
        "--depth-augment",
        help="Depth augmentation: this fraction of the training spectra is shown each epoch as a shorter exposure would record it (noise scaled up to a median S/N drawn log-uniformly between 1 and the spectrum's own, then normalised again), so that the simulation's brighter galaxies and stars do not teach 'noisy means quasar'. 0 = off (default): on the shared real files made fainter (bench/sim_to_real.py --depth) 0.5 gave no consistent gain over 3 seeds (S/N 2: quasars found 87% vs 83%, SDSS others called quasars 13% vs 6%), while the simulated test F1 rose (0.97 vs 0.95).",
    ),
    ema: float = typer.Option(
        0.0,
        "--ema",
        help="Weight averaging: keep an exponential moving average of the weights with this decay per step (0.99: over ~100 steps; warmed up from the initial weights) and validate, early-stop on and save it instead of the weights as stepped; 0 = off (default). The checkpoint holds both, so --resume continues the average.",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train the 1-D VGG on a store: pretrain, fine-tune (--init) or the scratch baseline."""
    import os

    from spectransfer.ml.train import TrainConfig, train

    if input_ not in ("flux", "flux+ivar"):
        fail(f"--input must be flux or flux+ivar, got {input_!r}")
    cfg = TrainConfig(
        store=str(store),
        out=str(out),
        survey=survey,
        mode=mode,
        init=str(init) if init else None,
        model=model,
        in_channels=2 if input_ == "flux+ivar" else 1,
        max_epochs=max_epochs,
        max_steps=max_steps,
        seed=seed,
        devices=devices,
        device=device,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
        patience=patience,
        early_stop=early_stop,
        imbalance=imbalance,
        precision=precision,
        train_fraction=train_fraction,
        train_limit=train_limit,
        num_workers=workers,
        debug_rows=debug_rows,
        z_head=z_head,
        z_weight=z_weight,
        z_shift=z_shift,
        z_head_kind=z_head_kind,
        depth_augment=depth_augment,
        ema=ema,
    )
    summary = train(cfg, resume=resume, quiet=quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    typer.echo(
        f"{out}: best {summary['metric']} {summary['best']:.4f} at step {summary['best_step']} "
        f"({summary['steps']} steps{', stopped early' if summary['stopped_early'] else ''})"
    )


# ---- evaluate + learning-curve --------------------------------------------------------------
@app.command("evaluate", rich_help_panel="2. Train and evaluate")
def evaluate_cmd(
    runs: list[Path] = typer.Argument(
        ...,
        help="Run folders to evaluate and compare on the same spectra (e.g. transfer, scratch, and the pretrained run as zero-shot).",
    ),
    store: Path = typer.Option(..., "--store", help="Store whose split is scored (its grid must be the runs' grid)."),
    out: Path = typer.Option(
        ...,
        "--out",
        callback=writable_dir,
        help="Report folder: metrics.json, report.html, RUN-NAME/predictions.parquet and false_positives/negatives.csv.",
    ),
    split: str = typer.Option(
        "test",
        "--split",
        help="Split to evaluate: test (default), val or train. Thresholds and temperatures are always fitted on val.",
    ),
    survey: Optional[str] = typer.Option(
        None, "--survey", help="Evaluate only the spectra of this survey (sdss, lamost); default all."
    ),
    target_precision: Optional[float] = typer.Option(
        None,
        "--target-precision",
        help="Choose the threshold on val as the lowest one reaching this precision (default: maximum F1).",
    ),
    target_recall: Optional[float] = typer.Option(
        None, "--target-recall", help="Choose the threshold on val as the highest one reaching this recall (default: maximum F1)."
    ),
    bootstrap: int = typer.Option(
        1000, "--bootstrap", help="Bootstrap resamples for the 95% intervals and paired tests (0 = no intervals)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
    verdicts: Optional[Path] = typer.Option(
        None,
        "--verdicts",
        help="Verdicts SQLite from `spectransfer inspect`: also report precision/recall with visually confirmed quasars counted as positives.",
    ),
    learning_curve: Optional[Path] = typer.Option(
        None, "--learning-curve", help="Folder written by `spectransfer learning-curve`; its curve is added to the report."
    ),
    gallery: int = typer.Option(
        6, "--gallery", help="False positives and false negatives per run shown as spectra in the report (0 = none)."
    ),
    batch_size: int = typer.Option(1024, "--batch-size", help="Spectra per scoring batch."),
    engine: str = typer.Option(
        "torch",
        "--engine",
        help="Scoring engine: torch (eager fp32), onnx (onnxruntime fp32) or onnx-int8 (int8 ranges set on 512 spectra spread over the store, recorded in metrics.json); named in metrics.json and the report.",
    ),
    calibrate: bool = typer.Option(
        False,
        "--calibrate",
        help="Also write each run's calibration.json from the temperature fitted on val (same as `spectransfer calibrate`); without it no run folder is changed.",
    ),
    refine: str = typer.Option(
        "window",
        "--refine",
        help="How the redshift metrics fit Z_PRED to the split's catalogue quasars, as discover and classify do: window (default), full or none.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Score runs on a split: metrics with intervals, calibration, breakdowns, paired tests, HTML report."""
    from spectransfer.errors import EvaluateError
    from spectransfer.evaluation.runner import evaluate_runs

    if split not in ("train", "val", "test"):
        raise EvaluateError(f"--split must be train, val or test, got {split!r}")
    if engine not in ("torch", "onnx", "onnx-int8"):
        raise EvaluateError(f"--engine must be torch, onnx or onnx-int8, got {engine!r}")
    if bootstrap < 0 or batch_size < 1 or gallery < 0:
        raise EvaluateError("--bootstrap and --gallery must be >= 0, --batch-size >= 1")
    doc = evaluate_runs(
        runs,
        store,
        out,
        split=split,
        survey=survey,
        target_precision=target_precision,
        target_recall=target_recall,
        n_resamples=bootstrap,
        seed=seed,
        verdicts_path=verdicts,
        learning_curve_dir=learning_curve,
        batch_size=batch_size,
        engine=engine,
        gallery=gallery,
        quiet=quiet,
        calibrate=calibrate,
        refine=refine,
    )

    def f(v: object) -> str:
        return "undefined" if v is None else f"{v:.4f}"

    for name, e in doc["runs"].items():
        typer.echo(
            f"{name}: P {f(e['precision'])} R {f(e['recall'])} F1 {f(e['f1'])} ROC AUC {f(e['roc_auc'])} "
            f"PR AUC {f(e['pr_auc'])} (threshold 0.5, {e['n']} spectra, {e['n_qso']} QSO)"
        )
        for a in (e.get("verdicts") or {}).get("at", [])[:1]:
            c = a["verdict_corrected"]
            typer.echo(f"{name}: with verdicts P {f(c['precision'])} R {f(c['recall'])} F1 {f(c['f1'])}")
    typer.echo(f"engine: {engine}")
    typer.echo(f"report: {out / 'report.html'}")


@app.command("calibrate", rich_help_panel="2. Train and evaluate")
def calibrate_cmd(
    run: Path = typer.Argument(..., help="Run folder whose calibration.json is (re)written."),
    store: Path = typer.Option(
        ..., "--store", help="Store whose split the temperature is fitted on (its grid must be the run's)."
    ),
    split: str = typer.Option("val", "--split", help="Split to fit on: val (default; never the test split you report)."),
    survey: Optional[str] = typer.Option(
        None, "--survey", help="Fit only on the spectra of this survey (sdss, lamost); default all."
    ),
    engine: str = typer.Option(
        "torch", "--engine", help="Engine that scores the split: torch, onnx or onnx-int8 (recorded with T)."
    ),
    batch_size: int = typer.Option(1024, "--batch-size", help="Spectra per scoring batch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fit the temperature T of P(QSO) = sigmoid(logit / T) on a split; write RUN/calibration.json with its provenance."""
    from spectransfer.evaluation.calibration import MIN_PER_CLASS, MIN_SPECTRA, calibrate_run

    if split not in ("train", "val", "test"):
        fail(f"--split must be train, val or test, got {split!r}")
    if batch_size < 1:
        fail("--batch-size must be >= 1")
    doc = calibrate_run(run, store, split=split, engine=engine, survey=survey, batch_size=batch_size, quiet=quiet)
    typer.echo(
        f"T = {doc['temperature']:.4f} fitted on {doc['n_spectra']} {split} spectra ({doc['n_qso']} QSO; "
        f"minimum {MIN_SPECTRA}, {MIN_PER_CLASS} per class) of store {doc['store_id']} with engine {engine}; "
        f"NLL {doc['nll_before']:.4f} -> {doc['nll_after']:.4f}"
    )
    typer.echo(f"calibration: {run / 'calibration.json'}")


@app.command("learning-curve", rich_help_panel="2. Train and evaluate")
def learning_curve_cmd(
    source_run: Path = typer.Option(
        ..., "--source-run", help="Pretrained run (e.g. on LAMOST) that the finetune cells start from."
    ),
    store: Path = typer.Option(..., "--store", help="Store holding the target survey's train/val/test splits."),
    out: Path = typer.Option(
        ...,
        "--out",
        callback=writable_dir,
        help="Folder for learning_curve.json, learning_curve.png and runs/MODE-fF-sS/ (resumable).",
    ),
    fractions: str = typer.Option(
        "0.001,0.01,0.1,1", "--fractions", help="Comma-separated fractions of the training labels to train on."
    ),
    seeds: int = typer.Option(
        3, "--seeds", help="Seeds per fraction and mode (0..N-1): different subsets, weights and data order."
    ),
    survey: Optional[str] = typer.Option(
        None, "--survey", help="Target survey (sdss, lamost) whose rows are used; default all rows of the store."
    ),
    modes: str = typer.Option(
        "finetune,scratch", "--modes", help="Comma-separated training modes: finetune (from --source-run) and/or scratch."
    ),
    max_epochs: int = typer.Option(50, "--max-epochs", callback=positive_int, help="Upper bound on epochs per cell."),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps", callback=positive_int, help="Upper bound on optimisation steps per cell."
    ),
    eval_every: int = typer.Option(
        1000, "--eval-every", callback=positive_int, help="Validation (early stopping) every this many steps."
    ),
    patience: int = typer.Option(
        10, "--patience", callback=non_negative_int, help="Stop a cell after this many evaluations without improvement."
    ),
    train_batch_size: int = typer.Option(256, "--train-batch-size", help="Spectra per training step."),
    device: str = typer.Option("auto", "--device", callback=available_device, help="auto (CUDA when present), cpu or cuda."),
    workers: int = typer.Option(
        2, "--workers", callback=non_negative_int, help="DataLoader worker processes per cell (0 = in process)."
    ),
    batch_size: int = typer.Option(1024, "--batch-size", help="Spectra per scoring batch on the test split."),
    engine: str = typer.Option("torch", "--engine", help="Engine that scores the test split: torch, onnx or onnx-int8."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fine-tune vs scratch on growing fractions of the labels: test F1 / PR AUC vs number of labels."""
    from spectransfer.evaluation.learning_curve import parse_fractions, run_learning_curve

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    opts = {
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "eval_every": eval_every,
        "patience": patience,
        "batch_size": train_batch_size,
        "device": device,
        "num_workers": workers,
    }
    doc = run_learning_curve(
        source_run,
        store,
        out,
        parse_fractions(fractions),
        seeds,
        survey=survey,
        modes=mode_list,
        train_options=opts,
        batch_size=batch_size,
        engine=engine,
        quiet=quiet,
    )

    def f(v: object) -> str:
        return "undefined" if v is None else f"{v:.4f}"

    for s in doc["summary"]:
        typer.echo(
            f"{s['mode']:8s} fraction {s['fraction']:<8g} labels {s['n_train_labels']:>10.0f}  "
            f"F1 {f(s['f1_mean'])} ± {f(s['f1_std'])}  PR AUC {f(s['pr_auc_mean'])} ± {f(s['pr_auc_std'])}"
        )
    typer.echo(f"learning curve: {out / 'learning_curve.json'}")
    cells = doc.get("cells", [])
    if cells and all(c.get("status") == "skipped" for c in cells):
        fail(f"{out}: every cell was skipped (first reason: {cells[0].get('reason')}); no learning curve to show")


# ---- simulate ---------------------------------------------------------------------------------
@app.command("simulate", rich_help_panel="1. Data")
def simulate_cmd(
    survey: str = typer.Option(..., "--survey", help="Which survey to imitate: sdss (spec-lite files) or lamost (DR5 files)."),
    n: int = typer.Option(..., "--n", help="Number of spectrum files to write (> 0)."),
    out: Path = typer.Option(
        ..., "--out", callback=writable_dir, help="Folder to create; spectra go below it in the survey's own layout."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed writes the same bytes."),
    qso_fraction: Optional[float] = typer.Option(
        None, "--qso-fraction", help="Share of quasar spectra in [0, 1] (default: SDSS 0.14, LAMOST 0.0035)."
    ),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes that write files (default: up to 2)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT if it exists and is not empty (only once the new survey is complete)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write a simulated survey: FITS spectra in the native format, a quasar catalogue and truth.parquet."""
    from spectransfer.progress import progress_bar
    from spectransfer.simulate import check_arguments, simulate_survey

    check_arguments(survey.lower(), n, qso_fraction, 1 if workers is None else workers)
    with progress_bar(f"simulate {survey}", total=n, unit="files", quiet=quiet) as bar:
        result = simulate_survey(
            survey.lower(),
            n,
            out,
            seed=seed,
            qso_fraction=qso_fraction,
            workers=workers,
            overwrite=overwrite,
            progress=bar.advance,
        )
    c = result.counts
    typer.echo(
        f"{result.n_files} {result.survey} spectra in {result.out} (QSO {c['QSO']}, GALAXY {c['GALAXY']}, STAR {c['STAR']}; "
        f"{result.n_repeats} repeats; {result.n_catalog_missing} of {result.n_quasar_objects} quasars left out of "
        f"{result.catalog.name})"
    )


# ---- discover + demo --------------------------------------------------------------------------
@app.command("discover", rich_help_panel="3. Find and confirm quasars")
def discover_cmd(
    run: Path = typer.Argument(
        ...,
        help="Run folder to score with (its calibration.json, written by `calibrate`, calibrates P_QSO; the header says which).",
    ),
    store: Path = typer.Option(..., "--store", help="Store whose every spectrum is scored."),
    out: Path = typer.Option(
        ...,
        "--out",
        callback=writable_file,
        help="Candidate catalogue; the format follows the extension: .fits (EXTNAME CANDIDATES, with a .parquet copy beside it), .parquet, .csv or .vot.",
    ),
    threshold: float = typer.Option(
        0.5,
        "--threshold",
        help="P_QSO at or above which a spectrum counts as a quasar (where the templates do not decide; their evidence short of that is added to its log-odds, see --templates).",
    ),
    engine: str = typer.Option(
        "onnx-int8",
        "--engine",
        help="torch (eager fp32), onnx (onnxruntime fp32) or onnx-int8 (int8 calibrated on this store; fastest, see bench/discover.py).",
    ),
    refine: str = typer.Option(
        "window",
        "--refine",
        help="Redshifts of the positives with the DR16Q quasar templates (Z_PRED): window (default: DESI's ±0.0784(1+z) around the network's Z_NET, the whole range where Z_NET_PROB < 0.7 or the run has no z head), full (scan z 0-7 for every positive; ~2-3x slower) or none.",
    ),
    mc_dropout: int = typer.Option(
        0,
        "--mc-dropout",
        callback=non_negative_int,
        help="MC-dropout passes of the dense head for P_QSO_STD, the spread that `inspect --order uncertainty` sorts by (0 = off, as fast as without; 10-20 is usual; see bench/discover.py for its cost).",
    ),
    templates: str = typer.Option(
        "uncertain",
        "--templates",
        help="Which spectra the real-spectrum template families (quasar, galaxy, star: redrock's DR16Q/BOSS templates) are asked about: uncertain (default: those with 0.02 <= P_QSO <= 0.98), all, or none (the network alone). Where a family fits decisively it decides IS_QSO; elsewhere its evidence (DCHI2_QSO over the decisive margin) is added to the network's log-odds. P_QSO stays the network's; SPECTYPE, DCHI2_QSO and DECIDED_BY say what the templates said.",
    ),
    workers: int = typer.Option(
        0,
        "--workers",
        help="Processes of a local Dask cluster scoring blocks in parallel (0 or 1 = score in this process with all cores).",
    ),
    scheduler: Optional[str] = typer.Option(
        None,
        "--scheduler",
        help="Address of an existing Dask scheduler (tcp://HOST:PORT); its workers must see the run, the store and the output folder.",
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Intra-op threads per scoring process (default: the cores divided among the workers)."
    ),
    batch_size: int = typer.Option(512, "--batch-size", help="Spectra per network call."),
    block_size: int = typer.Option(
        16384, "--block-size", help="Spectra per resumable block (one task; saved under OUT.parts/ when done)."
    ),
    survey: Optional[str] = typer.Option(
        None, "--survey", help="Score only the spectra of this survey (sdss, lamost); default all."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Score every spectrum of a store; write the candidate catalogue (resumable: rerun after a kill)."""
    from rich.console import Console
    from rich.table import Table

    from spectransfer.candidates.discover import discover
    from spectransfer.candidates.schema import CATEGORIES, category_meaning

    if engine not in ("torch", "onnx", "onnx-int8"):
        fail(f"--engine must be torch, onnx or onnx-int8, got {engine!r}")
    if workers < 0 or batch_size < 1 or block_size < 1 or (threads is not None and threads < 1):
        fail("--workers must be >= 0; --batch-size, --block-size and --threads >= 1")
    if workers > 1 and scheduler is not None:
        fail("give --workers or --scheduler, not both")
    from spectransfer.locks import OutputLock

    with OutputLock(out.parent / f".{out.name}.lock", "a discover run"):  # one discover per catalogue
        res = discover(
            run,
            store,
            out,
            threshold=threshold,
            engine=engine,
            batch_size=batch_size,
            block_size=block_size,
            workers=workers,
            scheduler=scheduler,
            threads=threads,
            survey=survey,
            quiet=quiet,
            refine=refine,
            mc_samples=mc_dropout,
            templates=templates,
        )
    from spectransfer.data.store import label_mode, open_store

    meaning = category_meaning(label_mode(open_store(store)))  # the wording follows how the store was labelled
    table = Table(
        title=f"{res.n_spectra:,} spectra scored (P_QSO >= {res.threshold:g}"
        f"{', calibrated' if res.calibrated else ''}; engine {res.engine})",
        title_justify="left",
    )
    for col, just in (("category", "left"), ("spectra", "right"), ("share", "right"), ("meaning", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in CATEGORIES:
        n = res.counts[c]
        table.add_row(c, f"{n:,}", f"{n / max(res.n_spectra, 1):.2%}", meaning[c])
    console = Console()
    console.print(table)
    by = res.pipe_not_qso_by_class
    console.print(
        f"new candidates the pipeline calls STAR: {by.get('STAR', 0):,}, GALAXY: {by.get('GALAXY', 0):,} "
        f"(PIPE_NOT_QSO, all positives: {res.n_pipe_not_qso:,})"
    )
    if res.resumed_spectra:
        console.print(f"resumed: {res.resumed_spectra:,} spectra were already scored by an interrupted run")
    console.print(f"{res.seconds:.1f} s ({res.spectra_per_s:,.0f} spectra/s)")
    typer.echo(f"candidates: {res.fits_path}")
    if res.parquet_path is not None:
        typer.echo(f"candidates: {res.parquet_path}")


@app.command("classify", rich_help_panel="3. Find and confirm quasars")
def classify_cmd(
    run: Path = typer.Argument(..., help="Trained run folder; its calibration.json (from `calibrate`) calibrates P_QSO."),
    paths: list[Path] = typer.Argument(
        ..., help="Spectrum files (SDSS spec/spSpec, LAMOST; .fits, .fit, .fits.gz) or folders searched for them."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Also write the table; format by extension: .fits (EXTNAME CANDIDATES), .parquet, .csv or .vot."
    ),
    threshold: float = typer.Option(
        0.5,
        "--threshold",
        help="P_QSO at or above which IS_QSO is true (where the templates do not decide; their evidence short of that is added to its log-odds, see --templates).",
    ),
    engine: str = typer.Option(
        "torch", "--engine", help="torch (eager fp32) or onnx (onnxruntime fp32); onnx-int8 needs a store: use discover."
    ),
    refine: str = typer.Option(
        "window",
        "--refine",
        help="Redshifts of the positives with the DR16Q quasar templates (Z_PRED): window (default: DESI's ±0.0784(1+z) around the network's Z_NET, the whole range where Z_NET_PROB < 0.7 or the run has no z head), full (scan z 0-7 for every positive; ~2-3x slower) or none.",
    ),
    mc_dropout: int = typer.Option(
        0,
        "--mc-dropout",
        callback=non_negative_int,
        help="MC-dropout passes of the dense head for P_QSO_STD, the spread that `inspect --order uncertainty` sorts by (0 = off, as fast as without; 10-20 is usual; see bench/discover.py for its cost).",
    ),
    templates: str = typer.Option(
        "all",
        "--templates",
        help="Which spectra the real-spectrum template families (quasar, galaxy, star: redrock's DR16Q/BOSS templates) are asked about: all (default here: a handful of files costs ~1/60 s each), uncertain (discover's default: those with 0.02 <= P_QSO <= 0.98) or none (the network alone). Where a family fits decisively it decides IS_QSO; elsewhere its evidence (DCHI2_QSO over the decisive margin) is added to the network's log-odds. P_QSO stays the network's; SPECTYPE, DCHI2_QSO and DECIDED_BY say what the templates said.",
    ),
    zwarning_filter: bool = typer.Option(
        False,
        "--zwarning-filter/--no-zwarning-filter",
        help="Refuse SDSS spectra whose pipeline set ZWARNING != 0, as ingest does for training labels. Off by default: the network and the templates do not use the pipeline's redshift, so such files are scored and flagged (ZWARNING column, QUALITY bit 3).",
    ),
    no_coverage_filter: bool = typer.Option(
        False, "--no-coverage-filter", help="Also score spectra that do not cover the whole grid (missing bins are empty)."
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Spectra per network call."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (rows and failed files) instead of the table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """P(QSO) for spectrum files, no store needed: same reading, cuts and resampling as ingest.

    Unlike ingest, a pipeline ZWARNING != 0 is flagged, not refused (--zwarning-filter refuses it). Files that cannot be read or fail the grid-coverage cut are listed with their reason and the others still scored; the exit code is then 1 (0 when every file was scored, 2 on bad arguments).
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from spectransfer.candidates.classify import classify
    from spectransfer.progress import progress_bar

    if batch_size < 1:
        fail("--batch-size must be >= 1")
    with progress_bar("classify", total=None, unit="files", quiet=quiet or as_json) as bar:
        res = classify(
            run,
            paths,
            out=out,
            threshold=threshold,
            engine=engine,
            batch_size=batch_size,
            progress=bar,
            refine=refine,
            mc_samples=mc_dropout,
            templates=templates,
            zwarning_filter=zwarning_filter,
            coverage_filter=not no_coverage_filter,
        )
    t = res.table
    if as_json:
        rows = json.loads(t.to_json(orient="records"))
        typer.echo(
            json.dumps(
                {
                    "engine": res.engine,
                    "threshold": res.threshold,
                    "calibrated": res.calibrated,
                    "rows": rows,
                    "failed": [{"source_file": f, "reason": r} for f, r in res.failed],
                }
            )
        )
    else:
        table = Table(
            title=f"{len(t)} of {res.n_files} files scored (P_QSO{' calibrated' if res.calibrated else ', not calibrated'}; "
            f"engine {res.engine}; IS_QSO = P_QSO >= {res.threshold:g} weighed with the templates, or their family where decisive)",
            title_justify="left",
        )
        for col in ("file", "spectrum", "class", "z", "P_QSO", "templates", "is_qso", "z_pred"):
            table.add_column(col, justify="right" if col in ("z", "P_QSO", "z_pred") else "left")

        def _z(v: object) -> str:
            return "" if v is None or v != v else f"{float(v):.4f}"  # type: ignore[arg-type]

        for _, r in t.iterrows():
            table.add_row(
                Path(str(r["SOURCE_FILE"])).name,
                str(r["SPECTRUM_ID"]),
                str(r.get("CLASS") or ""),
                _z(r.get("Z")),
                f"{float(r['P_QSO']):.4f}",
                str(r.get("SPECTYPE") or "") + ("*" if r.get("DECIDED_BY") == "templates" else ""),
                str(bool(r["IS_QSO"])),
                _z(r.get("Z_PRED")),
            )
        console = Console()
        console.print(table)
        if "DECIDED_BY" in t and (t["DECIDED_BY"] == "templates").any():
            typer.echo(
                "templates: the best-fitting template family; * = it decided IS_QSO or turned the network's call (see --templates)"
            )
        for f, reason in res.failed:
            typer.echo(f"not scored: {f}: {reason}")
    if res.out is not None and not as_json:
        typer.echo(f"table: {res.out}")
    if res.failed:
        raise typer.Exit(1)


@app.command("demo", rich_help_panel="0. Start here")
def demo_cmd(
    out: Path = typer.Option(
        Path("demo-output"),
        "--out",
        callback=writable_dir,
        help="Folder for everything the demo writes (surveys/, stores/, runs/, report/, candidates.fits); a new or earlier demo folder.",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Small surveys and short training (about 3 minutes on 2 cores) instead of the full demo (about 15).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulated surveys and of training."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars in the stages."),
) -> None:
    """Simulate LAMOST- and SDSS-like surveys, ingest, pretrain, fine-tune, train from scratch, evaluate, discover."""
    from spectransfer.demo import print_summary, run_demo

    summary = run_demo(out, quick=quick, seed=seed, quiet=quiet)
    print_summary(summary)


# ---- verdicts as labels, active learning, the experiment report ------------------------------
@app.command("label", rich_help_panel="3. Find and confirm quasars")
def label_cmd(
    store: Path = typer.Argument(
        ..., help="Store whose labels the verdicts replace (meta.parquet keeps the catalogue's in catalog_label)."
    ),
    verdicts: Optional[Path] = typer.Option(
        None, "--verdicts", help="Verdicts: the inspection database (.sqlite) or its export (.fits, .parquet, .csv, .vot)."
    ),
    revert: bool = typer.Option(False, "--revert", help="Restore the catalogue labels exactly (drops every verdict label)."),
) -> None:
    """Make visual-inspection verdicts the store's training labels (majority of inspectors; unsure and ties change nothing)."""
    from spectransfer.data.labels import apply_verdicts, revert_verdicts

    if revert == (verdicts is not None):
        fail("give --verdicts FILE or --revert (one of them)")
    res = revert_verdicts(store) if revert else apply_verdicts(store, verdicts)  # type: ignore[arg-type]
    if res.action == "nothing-to-revert":
        typer.echo(f"{store}: labels are the catalogue's already; nothing to revert")
    elif res.action == "reverted":
        typer.echo(f"{store}: catalogue labels restored ({res.n_changed} labels changed back)")
    else:
        again = " (already applied: nothing changed)" if res.action == "unchanged" else ""
        typer.echo(
            f"{store}: {res.n_labelled} labels from {res.n_verdicts} verdicts on {res.n_spectra_inspected} spectra{again}; "
            f"{res.n_changed} differ from the catalogue ({res.n_promoted} now quasar, {res.n_demoted} no longer); "
            f"{res.n_ties} ties and {res.n_unsure_only} unsure-only left as they were; "
            f"{res.n_unknown_ids} verdicts on spectra not in the store"
        )


@app.command("active-learning", rich_help_panel="2. Train and evaluate")
def active_learning_cmd(
    source_run: Path = typer.Option(..., "--source-run", help="Pretrained run every round fine-tunes from (e.g. on LAMOST)."),
    store: Path = typer.Option(
        ..., "--store", help="Store of a SIMULATED target survey (its catalogue labels are the imperfect starting labels)."
    ),
    truth: Path = typer.Option(
        ...,
        "--truth",
        help="The simulation's truth.parquet (spectrum_id, true_class): it plays the inspector and labels the test split.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder for active_learning.json/.png, the working store and seed-S/.../round-R/ (resumable)."
    ),
    rounds: int = typer.Option(4, "--rounds", help="Rounds of inspection after round 0 (round 0 = catalogue labels only)."),
    per_round: int = typer.Option(50, "--per-round", help="Spectra inspected per round (K)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds (0..N-1): label noise, random picks, training order and weights."),
    strategies: str = typer.Option(
        "uncertainty,random", "--strategies", help="Comma-separated: uncertainty (P(QSO) closest to 0.5) and/or random."
    ),
    label_noise: float = typer.Option(
        0.0,
        "--label-noise",
        help="Share of the training split's labels flipped (both ways) before round 0, per seed; val/test untouched.",
    ),
    survey: Optional[str] = typer.Option(
        None, "--survey", help="Target survey (sdss, lamost) whose rows are used; default all rows."
    ),
    max_epochs: int = typer.Option(50, "--max-epochs", help="Upper bound on epochs per round."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Upper bound on optimisation steps per round."),
    eval_every: int = typer.Option(1000, "--eval-every", help="Validation (early stopping) every this many steps."),
    patience: int = typer.Option(
        10, "--patience", help="Stop a round's training after this many evaluations without improvement."
    ),
    train_batch_size: int = typer.Option(256, "--train-batch-size", help="Spectra per training step."),
    imbalance: str = typer.Option("none", "--imbalance", help="none, pos-weight or balanced (see train --help)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes per training (0 = in process)."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Spectra per scoring batch."),
    stop_after: Optional[int] = typer.Option(
        None, "--stop-after", help="Stop after this many newly finished rounds (rerun to continue)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Which spectra should a person inspect? Uncertainty vs random inspection on a simulated survey: test F1 / PR AUC vs inspections."""
    from spectransfer.evaluation.active_learning import run_active_learning

    opts = {
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "eval_every": eval_every,
        "patience": patience,
        "batch_size": train_batch_size,
        "imbalance": imbalance,
        "device": device,
        "num_workers": workers,
    }
    doc = run_active_learning(
        source_run,
        store,
        truth,
        out,
        rounds=rounds,
        per_round=per_round,
        seeds=seeds,
        strategies=[s.strip() for s in strategies.split(",") if s.strip()],
        label_noise=label_noise,
        survey=survey,
        train_options={k: v for k, v in opts.items() if v is not None},
        batch_size=batch_size,
        stop_after=stop_after,
        quiet=quiet,
    )
    for i, n in enumerate(doc["n_inspected"]):
        parts = []
        for s in doc["settings"]["strategies"]:
            f1, pr = doc[f"f1_{s}"]["mean"][i], doc[f"pr_auc_{s}"]["mean"][i]
            parts.append(f"{s} F1 {'-' if f1 is None else f'{f1:.3f}'} PR AUC {'-' if pr is None else f'{pr:.3f}'}")
        typer.echo(f"round {i}: {'-' if n is None else n} inspected  " + "  ".join(parts))
    typer.echo(f"active learning{'' if doc['complete'] else ' (incomplete: rerun to continue)'}: {out / 'active_learning.json'}")


@app.command("experiment", rich_help_panel="2. Train and evaluate")
def experiment_cmd(
    out: Path = typer.Option(
        Path("experiment-output"),
        "--out",
        help="Folder for surveys/, stores/, runs/, learning_curve/, active_learning/, experiment.html (resumable).",
    ),
    size: str = typer.Option(
        "default",
        "--size",
        help="default (sized for <= 45 min on an idle 2-core CPU; an estimate, see README), converged (every cell and round trained as deep as the demo's fine-tuning, up to 600 steps: ~3.6 h on 2 CPU cores, minutes with --device cuda) or tiny (a smoke test of every stage).",
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        callback=available_device,
        help="Where every run trains: cpu (default) or cuda (auto: CUDA when present).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulated surveys and of pretraining."),
    docs: Optional[Path] = typer.Option(
        None,
        "--docs",
        help="Also write the two figures and the JSON behind each here (learning_curve.png/.json, "
        "active_learning.png/.json; the README's come from --docs docs), each once its curve is complete.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Simulate, pretrain, then the transfer/scratch/zero-shot learning curve and the active-learning curve in one HTML report."""
    from spectransfer.evaluation.experiment import run_experiment

    doc = run_experiment(out, size=size, seed=seed, quiet=quiet, docs=docs, device=device)
    for r in doc["learning_curve_intervals"]:
        f1 = r["f1"]
        typer.echo(
            f"{r['mode']:8s} fraction {r['fraction']:<6g} labels {r['n_train_labels']:>7.0f}  F1 {f1['mean']:.3f} [{f1['lo']:.3f}, {f1['hi']:.3f}]"
        )
    for line in doc["answers"]["text"]:
        typer.echo(line)
    typer.echo("stage wall/CPU s: " + ", ".join(f"{k} {v['wall_s']:.0f}/{v['cpu_s']:.0f}" for k, v in doc["timings"].items()))
    typer.echo(f"report: {out / 'experiment.html'}")
    if docs is not None:
        typer.echo(f"figures and JSON: {', '.join(doc['docs_written'])}")


# ---- end of commands ------------------------------------------------------------------------


# --help lists the commands in the order of the workflow, panel by panel.
_ORDER = [
    "demo",
    "fetch",
    "info",
    "simulate",
    "ingest",
    "stats",
    "train",
    "evaluate",
    "calibrate",
    "learning-curve",
    "discover",
    "classify",
    "inspect",
    "verdicts",
    "label",
    "active-learning",
    "experiment",
]
app.registered_commands.sort(key=lambda c: _ORDER.index(c.name) if c.name in _ORDER else len(_ORDER))


def main() -> None:
    try:
        app()
    except SpectransferError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a read-only folder, a full disk, ... met where no layer expected it
        where = exc.filename if exc.filename is not None else "output"
        typer.echo(f"error: {where}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
