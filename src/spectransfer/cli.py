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
