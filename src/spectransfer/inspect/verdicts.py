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
from datetime import UTC, datetime
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
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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


# Output formats by file name ending. '.csv' is written as ECSV with comma delimiters: a CSV
# whose '#' header lines carry each column's unit and description and the provenance, which
# astropy reads back (format 'ascii' or 'ascii.ecsv') and pandas reads with comment='#'.
EXPORT_FORMATS = {
    ".fits": "fits",
    ".fit": "fits",
    ".fits.gz": "fits",
    ".parquet": "parquet",
    ".csv": "csv",
    ".ecsv": "csv",
    ".vot": "votable",
    ".votable": "votable",
    ".xml": "votable",
}

# column -> (unit or None, description); the description becomes TCOMMn in FITS.
_EXPORT_COLUMNS: dict[str, tuple[str | None, str]] = {
    "SPECTRUM_ID": (None, "spectrum id as in the store and candidates"),
    "VERDICT": (None, "qso | not_qso | unsure"),
    "Z": (None, "redshift set by the inspector; NaN = none given"),
    "INSPECTOR": (None, "inspector name"),
    "CREATED_AT": (None, "ISO 8601 UTC time of the verdict"),
    "RA": ("deg", "right ascension (J2000) from the candidates; NaN = not in them"),
    "DEC": ("deg", "declination (J2000) from the candidates; NaN = not in them"),
    "P_QSO": (None, "discover's quasar probability; NaN = not in the candidates"),
    "CATEGORY": (None, "discover's category (new_candidate, ...); empty = not in the candidates"),
}


def export_format(out: str | os.PathLike[str]) -> str:
    """'fits', 'parquet', 'csv' or 'votable' from the output's name; InspectError for any other ending."""
    name = Path(out).name.lower()
    for ending, fmt in sorted(EXPORT_FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(ending):
            return fmt
    raise InspectError(
        f"{out}: unknown table format {Path(out).suffix or '(no extension)'!r}; use one of {', '.join(EXPORT_FORMATS)}"
    )


def _candidate_columns(path: Path) -> dict[str, dict[str, Any]]:
    """SPECTRUM_ID -> {RA, DEC, P_QSO, CATEGORY} from a discover candidates table (FITS or Parquet)."""
    from astropy.table import Table

    try:
        if path.name.lower().endswith(".parquet"):
            t = Table.read(path, format="parquet")
        else:
            t = Table.read(path, hdu="CANDIDATES", format="fits")
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for a bad file
        raise InspectError(f"{path}: cannot read the candidates table ({exc})") from exc
    missing = [c for c in ("SPECTRUM_ID", "RA", "DEC", "P_QSO", "CATEGORY") if c not in t.colnames]
    if missing:
        raise InspectError(f"{path}: candidates table lacks column(s) {', '.join(missing)}")
    ids = [str(x).strip() for x in t["SPECTRUM_ID"]]
    return {
        i: {"RA": float(ra), "DEC": float(dec), "P_QSO": float(p), "CATEGORY": str(c).strip()}
        for i, ra, dec, p, c in zip(ids, t["RA"], t["DEC"], t["P_QSO"], t["CATEGORY"])
    }


def verdict_table(db_path: str | os.PathLike[str], candidates: str | os.PathLike[str] | None = None) -> Any:
    """Every verdict as an astropy Table (units, descriptions, provenance in ``meta``), joined with the candidates when given."""
    import numpy as np
    from astropy.table import Table

    from spectransfer.provenance import provenance_cards, sha256_file

    rows = VerdictDB(db_path, create=False).rows()
    t = Table()
    t["SPECTRUM_ID"] = np.array([r["spectrum_id"] for r in rows], dtype=str)
    t["VERDICT"] = np.array([r["verdict"] for r in rows], dtype=str)
    t["Z"] = np.array([np.nan if r["z"] is None else r["z"] for r in rows], dtype="f8")
    t["INSPECTOR"] = np.array([r["inspector"] for r in rows], dtype=str)
    t["CREATED_AT"] = np.array([r["created_at"] for r in rows], dtype=str)
    meta: dict[str, Any] = {"SRCDB": Path(db_path).name, "NVERDICT": len(rows), "VERDICTS": ",".join(VERDICTS)}
    if candidates is not None:
        cand_path = Path(candidates)
        cand = _candidate_columns(cand_path)
        none = {"RA": np.nan, "DEC": np.nan, "P_QSO": np.nan, "CATEGORY": ""}
        got = [cand.get(r["spectrum_id"], none) for r in rows]
        t["RA"] = np.array([g["RA"] for g in got], dtype="f8")
        t["DEC"] = np.array([g["DEC"] for g in got], dtype="f8")
        t["P_QSO"] = np.array([g["P_QSO"] for g in got], dtype="f4")
        t["CATEGORY"] = np.array([g["CATEGORY"] for g in got], dtype=str)
        meta.update({"SRCCAND": cand_path.name, "CANDSHA": sha256_file(cand_path), "NNOCAND": sum(g is none for g in got)})
    for name in t.colnames:
        unit, doc = _EXPORT_COLUMNS[name]
        t[name].unit = unit
        t[name].description = doc
    meta["DATE"] = _now()[:19]
    for key, value, _ in provenance_cards():
        meta[key] = value
    t.meta.update(meta)
    return t


_META_COMMENTS = {
    "SRCDB": "verdict database this was exported from",
    "NVERDICT": "number of verdict rows",
    "VERDICTS": "allowed verdict values",
    "SRCCAND": "candidates joined (RA, DEC, P_QSO, CATEGORY)",
    "CANDSHA": "",  # its sha256: 64 hex digits leave no room for a comment "NNOCAND": "verdicts whose spectrum is not in the candidates",
    "DATE": "UTC time of the export",
}


def _write_fits(t: Any, tmp: Path) -> None:
    """FITS binary table EXTNAME VERDICTS: TUNITn where a unit exists, TCOMMn on every column, provenance cards."""
    import numpy as np
    from astropy.io import fits

    from spectransfer import __version__
    from spectransfer.provenance import provenance_cards

    cols = []
    for name in t.colnames:
        a = np.asarray(t[name])
        if a.dtype.kind == "U":  # FITS strings are ASCII: other characters (a name like "zoë") become \x.. escapes
            values = [str(v).encode("ascii", "backslashreplace") for v in a]
            width = max([1] + [len(v) for v in values])
            cols.append(fits.Column(name=name, format=f"{width}A", array=np.array(values, dtype=f"S{width}")))
        else:
            cols.append(
                fits.Column(
                    name=name, format="D" if a.dtype.itemsize == 8 else "E", array=a, unit=t[name].unit and str(t[name].unit)
                )
            )
    hdu = fits.BinTableHDU.from_columns(cols, name="VERDICTS")
    h = hdu.header
    for i, name in enumerate(t.colnames, start=1):
        h.insert(f"TUNIT{i}" if f"TUNIT{i}" in h else f"TFORM{i}", (f"TCOMM{i}", t[name].description), after=True)
    comments = {**{k: c for k, _, c in provenance_cards()}, **_META_COMMENTS}
    for key, value in t.meta.items():
        h[key] = (value, comments.get(key, ""))
    primary = fits.PrimaryHDU()
    primary.header["STVER"] = (__version__, "spectransfer version")
    fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True, checksum=True)


def _write_votable(t: Any, tmp: Path) -> None:
    """VOTable with units and DESCRIPTIONs on the FIELDs and the provenance as INFO elements."""
    from astropy.io.votable import from_table
    from astropy.io.votable.tree import Info

    vot = from_table(t)
    table = vot.get_first_table()
    table.name = "VERDICTS"
    for key, value in t.meta.items():
        table.infos.append(Info(name=key, value=str(value)))
    vot.to_xml(str(tmp))


def export_table(
    db_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    candidates: str | os.PathLike[str] | None = None,
    overwrite: bool = True,
) -> int:
    """Write every verdict to ``out`` in the format its name says (see EXPORT_FORMATS), atomically; returns the row count.

    With ``candidates`` (discover's FITS or Parquet), each verdict gets its spectrum's RA, DEC,
    P_QSO and CATEGORY. Columns carry units and descriptions (FITS TUNITn/TCOMMn, VOTable
    unit/DESCRIPTION, ECSV and Parquet astropy metadata); the provenance goes in the header.
    """
    from spectransfer.provenance import atomic_path

    out = Path(out)
    fmt = export_format(out)
    if out.exists() and not overwrite:
        raise InspectError(f"{out}: exists (use --overwrite)")
    t = verdict_table(db_path, candidates)
    with atomic_path(out) as tmp:
        if fmt == "fits":
            _write_fits(t, tmp)
        elif fmt == "votable":
            _write_votable(t, tmp)
        elif fmt == "parquet":
            t.write(tmp, format="parquet", overwrite=True)
        else:
            t.write(tmp, format="ascii.ecsv", delimiter=",", overwrite=True)
    log.info("wrote %d verdicts to %s (%s)", len(t), out, fmt)
    return len(t)


def export_fits(db_path: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = True) -> int:
    """Write every verdict as a FITS binary table (EXTNAME VERDICTS), atomically, whatever ``out`` is named; returns the row count."""
    from spectransfer.provenance import atomic_path

    out = Path(out)
    if out.exists() and not overwrite:
        raise InspectError(f"{out}: exists (use --overwrite)")
    t = verdict_table(db_path)
    with atomic_path(out) as tmp:
        _write_fits(t, tmp)
    log.info("wrote %d verdicts to %s", len(t), out)
    return len(t)
