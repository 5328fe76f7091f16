"""Visual-inspection verdicts in SQLite, so several people (and threads) can record them safely.

One row per (spectrum, inspector): a second verdict by the same person replaces the first,
other people's verdicts are kept. The database runs in WAL mode with a busy timeout, so the
web server's worker threads and a reader such as ``evaluate --verdicts`` never block each
other for long. The table layout below is a contract: ``evaluate`` reads it as is.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spectransfer.inspect import InspectError

log = logging.getLogger(__name__)

VERDICTS: tuple[str, ...] = ("qso", "not_qso", "unsure")
BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    spectrum_id TEXT NOT NULL,
    verdict     TEXT NOT NULL CHECK (verdict IN ('qso', 'not_qso', 'unsure')),
    z           REAL,
    inspector   TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (spectrum_id, inspector)
)
"""

_UPSERT = """
INSERT INTO verdicts (spectrum_id, verdict, z, inspector, created_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (spectrum_id, inspector) DO UPDATE SET
    verdict = excluded.verdict, z = excluded.z, created_at = excluded.created_at
"""

_COLUMNS = ("spectrum_id", "verdict", "z", "inspector", "created_at")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class VerdictDB:
    """A verdict database file; every call opens its own short-lived connection (thread safe)."""

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InspectError(f"{self.path}: verdict database not found")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as con:
                if create:
                    con.execute(SCHEMA)
                cols = [r[1] for r in con.execute("PRAGMA table_info(verdicts)")]
        except sqlite3.DatabaseError as exc:
            raise InspectError(f"{self.path}: not a usable SQLite database ({exc})") from exc
        if tuple(cols) != _COLUMNS:
            raise InspectError(f"{self.path}: table 'verdicts' has columns {cols}, expected {list(_COLUMNS)}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":  # e.g. a read-only file system: still usable, just slower
                log.debug("%s: journal mode is %s, not WAL", self.path, mode)
            yield con
        finally:
            con.close()

    def record(self, spectrum_id: str, verdict: str, inspector: str, z: float | None = None) -> dict[str, Any]:
        """Insert or replace ``inspector``'s verdict on ``spectrum_id``; returns the stored row."""
        if verdict not in VERDICTS:
            raise InspectError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        if not spectrum_id or not inspector:
            raise InspectError("spectrum_id and inspector must be non-empty")
        if z is not None and not math.isfinite(z):
            raise InspectError(f"z must be a finite number, not {z!r}")
        row = (spectrum_id, verdict, None if z is None else float(z), inspector, _now())
        with self._connect() as con:
            con.execute(_UPSERT, row)
        return dict(zip(_COLUMNS, row))

    def rows(self, inspector: str | None = None, spectrum_id: str | None = None) -> list[dict[str, Any]]:
        """All verdicts (of one inspector and/or on one spectrum if given), oldest first."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM verdicts"
        where, args = [], []
        if inspector is not None:
            where.append("inspector = ?")
            args.append(inspector)
        if spectrum_id is not None:
            where.append("spectrum_id = ?")
            args.append(spectrum_id)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, spectrum_id, inspector"
        with self._connect() as con:
            return [dict(zip(_COLUMNS, r)) for r in con.execute(sql, args)]

    def latest_by_spectrum(self, inspector: str | None = None) -> dict[str, str]:
        """spectrum_id -> verdict: this inspector's, or (no inspector) the most recent of anyone's."""
        out: dict[str, str] = {}
        for r in self.rows(inspector):  # ordered by time, so later verdicts overwrite earlier
            out[r["spectrum_id"]] = r["verdict"]
        return out

    def count(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])


def export_fits(db_path: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = True) -> int:
    """Write every verdict as a FITS binary table (EXTNAME VERDICTS), atomically; returns the row count."""
    import numpy as np
    from astropy.io import fits

    from spectransfer import __version__
    from spectransfer.provenance import atomic_path, provenance_cards

    out = Path(out)
    if out.exists() and not overwrite:
        raise InspectError(f"{out}: exists (use --overwrite)")
    rows = VerdictDB(db_path, create=False).rows()

    def strcol(name: str, key: str) -> fits.Column:
        # FITS strings are ASCII: other characters (a name like "zoë") become \x.. escapes.
        values = [r[key].encode("ascii", "backslashreplace") for r in rows]
        width = max([1] + [len(v) for v in values])
        return fits.Column(name=name, format=f"{width}A", array=np.array(values, dtype=f"S{width}"))

    z = np.array([np.nan if r["z"] is None else r["z"] for r in rows], dtype="f8")
    cols = [
        strcol("SPECTRUM_ID", "spectrum_id"),
        strcol("VERDICT", "verdict"),
        fits.Column(name="Z", format="D", array=z),
        strcol("INSPECTOR", "inspector"),
        strcol("CREATED_AT", "created_at"),
    ]
    hdu = fits.BinTableHDU.from_columns(cols, name="VERDICTS")
    h = hdu.header
    # Z is a redshift (dimensionless); CREATED_AT is ISO 8601 UTC. NaN Z = no redshift given.
    h.comments["TTYPE1"] = "spectrum id as in the store and candidates"
    h.comments["TTYPE2"] = "qso | not_qso | unsure"
    h.comments["TTYPE3"] = "redshift set by the inspector; NaN = none given"
    h.comments["TTYPE4"] = "inspector name; non-ASCII as \\x.. escapes"
    h.comments["TTYPE5"] = "ISO 8601 UTC time of the verdict"
    h["SRCDB"] = (Path(db_path).name, "verdict database this was exported from")
    h["NVERDICT"] = (len(rows), "number of verdict rows")
    h["VERDICTS"] = (",".join(VERDICTS), "allowed verdict values")
    for key, value, comment in provenance_cards():
        h[key] = (value, comment)
    primary = fits.PrimaryHDU()
    primary.header["STVER"] = (__version__, "spectransfer version")
    with atomic_path(out) as tmp:
        fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True, checksum=True)
    log.info("wrote %d verdicts to %s", len(rows), out)
    return len(rows)
