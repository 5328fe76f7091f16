"""The `spectransfer` command line: each command is a thin wrapper over a library module.

Heavy imports (torch, dask, astropy) happen inside the command bodies so that `--help` and
argument errors answer at once. Errors of this package become one line on stderr and exit
code 2 (bad input) or 1 (some inputs failed), never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

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
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
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


# ---- commands -------------------------------------------------------------------------------
# Each command lives in its own block below; keep heavy imports inside the function body.

# ---- fetch (issue 9) ------------------------------------------------------------------------
fetch_app = typer.Typer(
    help="Download SDSS/LAMOST spectra and quasar catalogues: concurrent, resumable, verified (manifest DEST/manifest.jsonl).",
    no_args_is_help=True,
)
app.add_typer(fetch_app, name="fetch")

_FETCH_JOBS = typer.Option(8, "--jobs", "-j", help="Parallel downloads (also the bound on open connections).")
_FETCH_RETRIES = typer.Option(5, "--retries", help="Retries per file after 5xx, timeouts or dropped connections (404 is never retried).")
_FETCH_TIMEOUT = typer.Option(60.0, "--timeout", help="Seconds to wait for a connection or for the next bytes before retrying.")
_FETCH_BACKOFF = typer.Option(1.0, "--backoff", help="Base of the exponential backoff between retries, in seconds (plus random jitter).")
_FETCH_CHECKSUMS = typer.Option(None, "--checksums", help="sha256sum-style file ('SHA256  PATH' lines); downloads must match it.")
_FETCH_QUICK = typer.Option(False, "--quick-skip", help="Skip files whose size matches the manifest without re-hashing them.")
_FETCH_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def _fetch_run(items: list, dest: Path, jobs: int, retries: int, timeout: float, backoff: float, checksums: Optional[Path], quick_skip: bool, quiet: bool) -> None:
    from spectransfer.fetch import fetch

    summary = fetch(items, dest, jobs=jobs, retries=retries, timeout=timeout, backoff=backoff, checksums=checksums, quick_skip=quick_skip, quiet=quiet)
    typer.echo(summary.line())
    if summary.failed:
        raise typer.Exit(1)


@fetch_app.command("sdss")
def fetch_sdss(
    list_path: Path = typer.Option(..., "--list", help="CSV/FITS/Parquet table with plate, mjd, fiberid columns (any case; RUN2D used when present), e.g. a DR16Q or specObj cut."),
    dest: Path = typer.Option(..., "--dest", help="Folder that receives the files in the SAS layout (RELEASE/eboss|sdss/spectro/redux/RUN2D/spectra/lite/PLATE/...)."),
    release: str = typer.Option("dr16", "--release", help="SDSS data release: dr14 (eBOSS run2d v5_10_0), dr16 (v5_13_0) or dr17 (v5_13_2); SDSS-I/II plates use run2d 26 (then 103, 104)."),
    base_url: str = typer.Option("https://data.sdss.org/sas", "--base-url", help="Root of the Science Archive Server or of a mirror with the same tree below 'sas/'."),
    jobs: int = _FETCH_JOBS,
    retries: int = _FETCH_RETRIES,
    timeout: float = _FETCH_TIMEOUT,
    backoff: float = _FETCH_BACKOFF,
    checksums: Optional[Path] = _FETCH_CHECKSUMS,
    quick_skip: bool = _FETCH_QUICK,
    quiet: bool = _FETCH_QUIET,
) -> None:
    """Fetch SDSS spec-lite files (spec-PLATE-MJD-FIBER.fits) listed in a table. Exit 1 if any failed."""
    from spectransfer.fetch import sdss_items

    _fetch_run(sdss_items(list_path, release=release, base_url=base_url), dest, jobs, retries, timeout, backoff, checksums, quick_skip, quiet)


@fetch_app.command("lamost")
def fetch_lamost(
    list_path: Path = typer.Option(..., "--list", help="CSV/FITS/Parquet table with an obsid column, or a text file of bare obsids."),
    dest: Path = typer.Option(..., "--dest", help="Folder that receives DEST/lamost/OBSID.fits (or .fits.gz when the body is gzip)."),
    base_url: str = typer.Option(..., "--base-url", help="LAMOST release root, files at BASE/spectrum/fits/OBSID (or a URL template with {obsid}). "
        "Per the pylamost client: DR6+ https://www.lamost.org/drN/vX.Y, DR4-5 http://drN.lamost.org/vX; not verified against the live site here."),
    token: Optional[str] = typer.Option(None, "--token", envvar="LAMOST_TOKEN", help="LAMOST access token (registration required), sent as ?token=; default env LAMOST_TOKEN. Never written to the manifest."),
    jobs: int = _FETCH_JOBS,
    retries: int = _FETCH_RETRIES,
    timeout: float = _FETCH_TIMEOUT,
    backoff: float = _FETCH_BACKOFF,
    checksums: Optional[Path] = _FETCH_CHECKSUMS,
    quick_skip: bool = _FETCH_QUICK,
    quiet: bool = _FETCH_QUIET,
) -> None:
    """Fetch LAMOST low-resolution spectra by obsid. Exit 1 if any failed."""
    from spectransfer.fetch import lamost_items

    _fetch_run(lamost_items(list_path, base_url=base_url, token=token), dest, jobs, retries, timeout, backoff, checksums, quick_skip, quiet)


@fetch_app.command("catalog")
def fetch_catalog(
    name: str = typer.Argument(..., help="dr16q (DR16Q_v4.fits), dr14q (DR14Q_v4_4.fits) or specobj (specObj-dr16.fits)."),
    dest: Path = typer.Option(..., "--dest", help="Folder that receives the file in the SAS layout (e.g. dr16/eboss/qso/DR16Q/DR16Q_v4.fits)."),
    base_url: str = typer.Option("https://data.sdss.org/sas", "--base-url", help="Root of the Science Archive Server or of a mirror with the same tree."),
    retries: int = _FETCH_RETRIES,
    timeout: float = _FETCH_TIMEOUT,
    backoff: float = _FETCH_BACKOFF,
    checksums: Optional[Path] = _FETCH_CHECKSUMS,
    quiet: bool = _FETCH_QUIET,
) -> None:
    """Fetch a quasar or spectroscopic catalogue (large: DR16Q ~1.7 GB, specObj-dr16 several GB; resumable)."""
    from spectransfer.fetch import catalog_items

    _fetch_run(catalog_items(name.lower(), base_url=base_url), dest, 1, retries, timeout, backoff, checksums, False, quiet)


# ---- end of commands ------------------------------------------------------------------------


def main() -> None:
    try:
        app()
    except SpectransferError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
