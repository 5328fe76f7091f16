"""The inspection web application: a static page plus a small JSON API over candidates and verdicts.

Nothing a request sends is ever used as a path: spectra are looked up by a spectrum id that
must exist in the candidates table, and the file read is the one that table names. Every
malformed request gets a 4xx with a reason and changes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
import pandas as pd
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from spectransfer import __version__
from spectransfer.candidates.schema import CATEGORIES, COLUMNS
from spectransfer.data.store import LABEL_REFERENCE, label_mode
from spectransfer.inspect import InspectError
from spectransfer.inspect.verdicts import VERDICTS, VerdictDB
from spectransfer.loopback import host_header_name, is_loopback

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_POINTS = 5000
MAX_PAGE = 500

# Columns of the candidates contract this page uses; the first three are required.
REQUIRED = ("SPECTRUM_ID", "P_QSO", "CATEGORY")
OPTIONAL = tuple(c for c in COLUMNS if c not in REQUIRED)  # every column discover or classify writes, shown when present


# ---- candidates table -------------------------------------------------------------------------


def load_candidates(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a candidates table (the .parquet beside the FITS when present), sorted by P_QSO desc."""
    path = Path(path)
    parquet = path.with_suffix(".parquet")
    try:
        if path.suffix == ".parquet" or parquet.is_file():
            src = path if path.suffix == ".parquet" else parquet
            import pyarrow.parquet as pq

            names = pq.read_schema(src).names
            upper = {n.upper(): n for n in names}
            want = [upper[c] for c in REQUIRED + OPTIONAL if c in upper]
            df = pq.read_table(src, columns=want).to_pandas()
            df.columns = [c.upper() for c in df.columns]
        elif path.is_file():
            from astropy.table import Table

            t = Table.read(path, hdu="CANDIDATES")
            keep = [c for c in t.colnames if c.upper() in REQUIRED + OPTIONAL]
            t = t[keep]
            df = t.to_pandas()
            df.columns = [c.upper() for c in df.columns]
        else:
            raise InspectError(f"{path}: candidates table not found")
    except InspectError:
        raise
    except Exception as exc:  # unreadable file: name it and say why, never a traceback
        raise InspectError(f"{path}: cannot read candidates table ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise InspectError(f"{path}: candidates table lacks column(s) {', '.join(missing)}")
    return prepare_candidates(df, str(path))


def prepare_candidates(df: pd.DataFrame, name: str = "candidates") -> pd.DataFrame:
    """Normalise types (bytes -> str, blanks -> missing) and sort by P_QSO descending, then id."""
    df = df.copy()
    for col in df.columns:
        if pd.api.types.is_object_dtype(df[col]) or pd.api.types.is_string_dtype(df[col]) or df[col].dtype.kind == "S":
            df[col] = df[col].astype(object).map(_clean_str)
    if df["SPECTRUM_ID"].isna().any():
        raise InspectError(f"{name}: empty SPECTRUM_ID in the candidates table")
    if df["SPECTRUM_ID"].duplicated().any():
        dup = df.loc[df["SPECTRUM_ID"].duplicated(), "SPECTRUM_ID"].iloc[0]
        raise InspectError(f"{name}: SPECTRUM_ID {dup!r} appears more than once")
    df["P_QSO"] = pd.to_numeric(df["P_QSO"], errors="coerce").astype("f8")
    df = df.sort_values(["P_QSO", "SPECTRUM_ID"], ascending=[False, True], na_position="last", kind="stable")
    return df.set_index("SPECTRUM_ID", drop=False)


def _clean_str(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str):
        v = v.strip()
        return v if v else None
    return v


def _jsonable(v: Any) -> Any:
    """A table cell as JSON: numpy scalars -> Python, NaN/NA -> None."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _record(row: Any) -> dict[str, Any]:
    return {k.lower(): _jsonable(v) for k, v in row.items()}


# ---- the queue on disk ----------------------------------------------------------------------------
#
# The candidates are copied once, in blocks, into an SQLite file in queue order (P_QSO descending,
# then id), and every request filters, counts and pages there: the server holds one page, never
# the table, whatever the survey's size. The file sits beside the candidates table (or in a
# temporary folder when that is not writable) and is rebuilt when the table changes.

ORDERS = {"uncertainty": "pos_spread", "p_qso": "pos", "random": "pos_random"}  # --order -> the queue's position column
QUEUE_VERSION = 2  # 2: the uncertainty and random orders
BUILD_BLOCK = 8192


def _candidate_blocks(path: Path, block: int | None = None) -> Iterator[pd.DataFrame]:
    """The candidates table's columns of interest, a block at a time (the .parquet beside a FITS when
    present, read one row group at a time: ``data.ledger.parquet_batches``)."""
    block = block or BUILD_BLOCK
    parquet = path.with_suffix(".parquet")
    if path.suffix == ".parquet" or parquet.is_file():
        import pyarrow.parquet as pq

        from spectransfer.data.ledger import parquet_batches

        src_path = path if path.suffix == ".parquet" else parquet
        upper = {n.upper(): n for n in pq.ParquetFile(src_path).schema_arrow.names}
        want = [upper[c] for c in REQUIRED + OPTIONAL if c in upper]
        for batch in parquet_batches(src_path, block, want):
            df = batch.to_pandas()
            df.columns = [c.upper() for c in df.columns]
            yield df
    elif path.is_file():
        from astropy.io import fits
        from astropy.table import Table

        with fits.open(path, memmap=True) as hdul:
            data = hdul["CANDIDATES"].data
            keep = [c for c in data.columns.names if c.upper() in REQUIRED + OPTIONAL]
            for a in range(0, len(data), block):
                df = Table(data[a : a + block])[keep].to_pandas()
                df.columns = [c.upper() for c in df.columns]
                yield df
    else:
        raise InspectError(f"{path}: candidates table not found")


def _clean_block(df: pd.DataFrame) -> pd.DataFrame:
    """One block as ``prepare_candidates`` normalises the whole table (bytes -> str, blanks -> missing)."""
    df = df.copy()
    for col in df.columns:
        if pd.api.types.is_object_dtype(df[col]) or pd.api.types.is_string_dtype(df[col]) or df[col].dtype.kind == "S":
            df[col] = df[col].astype(object).map(_clean_str)
    df["P_QSO"] = pd.to_numeric(df["P_QSO"], errors="coerce").astype("f8")
    return df


def _kind(series: pd.Series) -> str:
    """How a column's cells come back from SQLite: bool, int, float or text."""
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    return "text"


_SQL_TYPE = {"bool": "INTEGER", "int": "INTEGER", "float": "REAL", "text": "TEXT"}


def _cell(v: Any) -> Any:
    """A cell for SQLite (NaN and missing -> NULL; numpy scalars -> Python)."""
    v = _jsonable(v)
    return None if isinstance(v, float) and not math.isfinite(v) else v


class CandidateQueue:
    """The candidates in queue order in an SQLite file: filter, count, page and look up without loading them."""

    def __init__(self, db_path: Path, tmpdir: Any = None) -> None:
        self.path = Path(db_path)
        self._tmpdir = tmpdir  # kept alive as long as the queue when the file lives in a temporary folder
        self._local = threading.local()
        self._lock = threading.Lock()  # one query at a time: answers leave in the order requests came
        info = json.loads(self._connect().execute("SELECT value FROM info WHERE key = 'info'").fetchone()[0])
        self.columns: list[str] = info["columns"]
        self.kinds: dict[str, str] = info["kinds"]
        self.n: int = info["n"]
        self.counts: dict[str, int] = info["counts"]
        self.classes: list[str] = info["classes"]
        self.has_spread: bool = bool(info.get("has_spread"))
        self.order = "p_qso"

    def resolve_order(self, order: str | None) -> str:
        """The queue order asked for, or the default: ``uncertainty`` (largest P_QSO_STD first, the
        most informative verdict next) when the table has MC-dropout spreads, else ``p_qso``."""
        if order is None:
            return "uncertainty" if self.has_spread else "p_qso"
        if order not in ORDERS:
            raise InspectError(f"--order must be one of {', '.join(ORDERS)}, not {order!r}")
        if order == "uncertainty" and not self.has_spread:
            raise InspectError("--order uncertainty needs P_QSO_STD: run discover with --mc-dropout N")
        return order

    # -- building --

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CandidateQueue:
        """The queue of a candidates table, built once beside it (rebuilt when the table changes)."""
        path = Path(path)
        src = path.with_suffix(".parquet") if path.suffix != ".parquet" and path.with_suffix(".parquet").is_file() else path
        if not src.is_file():
            raise InspectError(f"{path}: candidates table not found")
        st = src.stat()
        stamp = {"version": QUEUE_VERSION, "source": src.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        db, tmpdir = path.with_name(path.name + ".queue.sqlite"), None
        if db.is_file() and _stamp_of(db) == stamp:
            return cls(db)
        if not os.access(path.parent, os.W_OK):
            tmpdir = tempfile.TemporaryDirectory(prefix="spectransfer-queue-")
            db = Path(tmpdir.name) / "queue.sqlite"
        try:
            _build(_candidate_blocks(path), db, str(path), stamp)
        except InspectError:
            raise
        except Exception as exc:  # unreadable file: name it and say why, never a traceback
            raise InspectError(f"{path}: cannot read candidates table ({type(exc).__name__}: {exc})") from exc
        return cls(db, tmpdir)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, name: str = "candidates") -> CandidateQueue:
        """The queue of a table already in memory (in a temporary file)."""
        tmpdir = tempfile.TemporaryDirectory(prefix="spectransfer-queue-")
        db = Path(tmpdir.name) / "queue.sqlite"
        df = df.reset_index(drop=True)
        _build(
            (df.iloc[a : a + BUILD_BLOCK] for a in range(0, max(len(df), 1), BUILD_BLOCK)), db, name, {"version": QUEUE_VERSION}
        )
        return cls(db, tmpdir)

    # -- reading --

    def _connect(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True, check_same_thread=False)
            con.execute("PRAGMA temp_store = FILE")
            self._local.con = con
        return con

    def _row(self, values: Sequence[Any]) -> dict[str, Any]:
        out = {}
        for name, v in zip(self.columns, values):
            out[name] = bool(v) if v is not None and self.kinds[name] == "bool" else v
        return out

    def get(self, spectrum_id: str) -> dict[str, Any] | None:
        r = self._connect().execute(f"SELECT {self._cols} FROM queue WHERE SPECTRUM_ID = ?", (spectrum_id,)).fetchone()
        return None if r is None else self._row(r)

    @property
    def _cols(self) -> str:
        return ", ".join(f'"{c}"' for c in self.columns)

    def select(
        self, where: str, params: list[Any], done: Sequence[str], status: str, offset: int, limit: int
    ) -> tuple[int, int, list[dict[str, Any]]]:
        """(total, inspected, page rows) of the rows passing ``where``; ``done`` are the ids with a verdict."""
        with self._lock:
            return self._select(where, params, done, status, offset, limit)

    def _select(
        self, where: str, params: list[Any], done: Sequence[str], status: str, offset: int, limit: int
    ) -> tuple[int, int, list[dict[str, Any]]]:
        con = self._connect()
        con.execute("CREATE TEMP TABLE IF NOT EXISTS done (id TEXT PRIMARY KEY)")
        con.execute("DELETE FROM temp.done")
        con.executemany("INSERT OR IGNORE INTO temp.done VALUES (?)", ((d,) for d in done))
        has = "SPECTRUM_ID IN (SELECT id FROM temp.done)"
        inspected = con.execute(f"SELECT COUNT(*) FROM queue WHERE {where} AND {has}", params).fetchone()[0] if done else 0
        if status == "todo":
            where += f" AND NOT {has}"
        elif status == "done":
            where += f" AND {has}"
        total = con.execute(f"SELECT COUNT(*) FROM queue WHERE {where}", params).fetchone()[0]
        rows = con.execute(
            f"SELECT {self._cols} FROM queue WHERE {where} ORDER BY {ORDERS[self.order]} LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return int(total), int(inspected), [self._row(r) for r in rows]


def _stamp_of(db: Path) -> dict[str, Any] | None:
    try:
        con = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True)
        try:
            return json.loads(con.execute("SELECT value FROM info WHERE key = 'stamp'").fetchone()[0])
        finally:
            con.close()
    except (sqlite3.Error, TypeError, ValueError):
        return None


def _build(blocks: Iterator[pd.DataFrame], db: Path, name: str, stamp: dict[str, Any]) -> None:
    """Copy the blocks into ``db`` (written under a temporary name, then renamed), sorted into queue order."""
    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.execute("PRAGMA temp_store = FILE")
        con.execute("PRAGMA journal_mode = OFF")
        columns: list[str] | None = None
        kinds: dict[str, str] = {}
        for raw in blocks:
            if columns is None:
                missing = [c for c in REQUIRED if c not in raw.columns]
                if missing:
                    raise InspectError(f"{name}: candidates table lacks column(s) {', '.join(missing)}")
            df = _clean_block(raw)
            if columns is None:
                columns = list(df.columns)
                kinds = {c: _kind(df[c]) for c in columns}
                cols = ", ".join(f'"{c}" {_SQL_TYPE[kinds[c]]}' for c in columns)
                con.execute(f"CREATE TABLE staging ({cols})")
            if df["SPECTRUM_ID"].isna().any():
                raise InspectError(f"{name}: empty SPECTRUM_ID in the candidates table")
            marks = ", ".join("?" * len(columns))
            con.executemany(
                f"INSERT INTO staging VALUES ({marks})",
                ([_cell(v) for v in r] for r in df[columns].itertuples(index=False, name=None)),
            )
        if columns is None:
            raise InspectError(f"{name}: candidates table is empty")
        dup = con.execute("SELECT SPECTRUM_ID FROM staging GROUP BY SPECTRUM_ID HAVING COUNT(*) > 1 LIMIT 1").fetchone()
        if dup is not None:
            raise InspectError(f"{name}: SPECTRUM_ID {dup[0]!r} appears more than once")
        quoted = ", ".join(f'"{c}"' for c in columns)
        spread = '"P_QSO_STD"' if "P_QSO_STD" in columns else "NULL"
        # three orders, each a precomputed position: P_QSO, MC-dropout spread (no spread last),
        # and a fixed shuffle (a multiplicative hash of the row number: the same every build)
        con.execute(
            "CREATE TABLE queue AS SELECT ROW_NUMBER() OVER (ORDER BY P_QSO DESC, SPECTRUM_ID) AS pos, "
            f"ROW_NUMBER() OVER (ORDER BY COALESCE({spread}, -1.0) DESC, P_QSO DESC, SPECTRUM_ID) AS pos_spread, "
            f"ROW_NUMBER() OVER (ORDER BY (rowid * 2654435761) % 4294967296, SPECTRUM_ID) AS pos_random, {quoted} FROM staging"
        )
        con.execute("DROP TABLE staging")
        con.execute("CREATE UNIQUE INDEX queue_id ON queue (SPECTRUM_ID)")
        for col in ("pos", "pos_spread", "pos_random"):
            con.execute(f"CREATE INDEX queue_{col} ON queue ({col})")
        has_spread = spread != "NULL" and con.execute(f"SELECT COUNT(*) FROM queue WHERE {spread} IS NOT NULL").fetchone()[0] > 0
        counts = dict(con.execute("SELECT CATEGORY, COUNT(*) FROM queue GROUP BY CATEGORY").fetchall())
        classes = (
            [r[0] for r in con.execute('SELECT DISTINCT "CLASS" FROM queue WHERE "CLASS" IS NOT NULL')]
            if "CLASS" in columns
            else []
        )
        n = con.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
        info = {
            "columns": columns,
            "kinds": kinds,
            "n": n,
            "counts": counts,
            "classes": sorted(str(c) for c in classes),
            "has_spread": bool(has_spread),
        }
        con.execute("CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT)")
        con.executemany("INSERT INTO info VALUES (?, ?)", [("info", json.dumps(info)), ("stamp", json.dumps(stamp))])
        con.commit()
        con.execute("VACUUM")
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    os.replace(tmp, db)


# ---- spectra ------------------------------------------------------------------------------------


def downsample(
    wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Merge consecutive pixels (ivar-weighted flux, summed ivar) until at most ``max_points`` remain."""
    n = wave.shape[0]
    k = max(1, math.ceil(n / max_points))
    if k == 1:
        return wave, flux, ivar, 1
    starts = np.arange(0, n, k)
    counts = np.diff(np.append(starts, n))
    w = np.where(ivar > 0, ivar, 0.0)
    wsum = np.add.reduceat(w, starts)
    fw = np.add.reduceat(flux * w, starts)
    fmean = np.add.reduceat(flux, starts) / counts
    out_flux = np.where(wsum > 0, fw / np.where(wsum > 0, wsum, 1.0), fmean)
    out_wave = np.add.reduceat(wave, starts) / counts
    return out_wave, out_flux, wsum, k


def _finite_lists(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    wave = np.asarray(wave, dtype="f8")
    flux = np.asarray(flux, dtype="f8")
    ivar = np.asarray(ivar, dtype="f8")
    bad = ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar < 0)
    flux = np.where(bad, 0.0, flux)
    ivar = np.where(bad, 0.0, ivar)
    good = np.isfinite(wave)
    # 7 significant digits is far below the noise and halves the JSON.
    return (
        np.round(wave[good], 3).tolist(),
        [float(f"{x:.6g}") for x in flux[good]],
        [float(f"{x:.6g}") for x in ivar[good]],
    )


# ---- request bodies -----------------------------------------------------------------------------


class VerdictIn(BaseModel):
    """A verdict as the page (or a script) posts it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=200, description="spectrum id from the candidates table")
    verdict: Literal["qso", "not_qso", "unsure"]
    z: float | None = Field(default=None, ge=-0.1, le=10.0, allow_inf_nan=False, description="redshift the inspector set")
    inspector: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")


# ---- guards every response passes through ------------------------------------------------------

MAX_BODY = 1 << 20  # a verdict is ~100 bytes; anything near a megabyte is not one
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        b"form-action 'none'; frame-ancestors 'none'",
    ),
]


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guards:
    """ASGI middleware in front of the app: security headers on every response, request bodies
    capped at ``max_body`` bytes (by Content-Length and by bytes actually received, before the
    body is parsed), and with ``loopback_only`` a Host header that must name a loopback address
    (DNS-rebinding guard: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example).
    """

    def __init__(self, app: Any, loopback_only: bool = True, max_body: int = MAX_BODY) -> None:
        self.app, self.loopback_only, self.max_body = app, loopback_only, max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        refused = False  # a 413 went out while the app was reading: drop whatever it answers

        async def send_secured(message: dict[str, Any]) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {
                    **message,
                    "headers": [*message.get("headers", []), *(h for h in SECURITY_HEADERS if h[0] not in names)],
                }
            await send(message)

        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.loopback_only and not is_loopback(host_header_name(headers.get(b"host", b"").decode("latin-1"))):
            await _send_json(send_secured, 400, "invalid Host header: this page answers only to loopback names")
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
            await _send_json(send_secured, 413, f"request body larger than {self.max_body} bytes")
            return
        received = 0

        async def receive_limited() -> dict[str, Any]:
            # A body without Content-Length (chunked) is counted as it arrives; past the cap the
            # client gets its 413 and the app sees a disconnect, so it never holds the whole body.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body and not started:
                    await _send_json(send_secured, 413, f"request body larger than {self.max_body} bytes")
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, receive_limited, send_secured)


def _token_guard(token: str) -> Any:
    """HTTP middleware: every request must carry ``token`` (Bearer, X-Token or ?token=)."""
    if len(token) < 8:
        raise InspectError("--token must be at least 8 characters")

    async def require_token(request: Request, call_next: Any) -> Response:
        given = request.headers.get("x-token") or request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not secrets.compare_digest(given.encode(), token.encode()):
            return JSONResponse(
                {"detail": "missing or wrong token (send Authorization: Bearer, X-Token or ?token=)"}, status_code=401
            )
        return await call_next(request)

    return require_token


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Say where and why, without echoing the input back (it may not even be valid JSON: NaN)."""
    errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "invalid"))} for e in exc.errors()]
    return JSONResponse({"detail": errors or "invalid request"}, status_code=422)


# ---- what the routes share ----------------------------------------------------------------------


@dataclass
class InspectState:
    """Everything a request handler needs: the candidates queue, the store, the verdicts, the options."""

    queue: CandidateQueue
    store: Any
    db: VerdictDB
    dirs: list[Path]
    default_category: str | None
    index_html: str = ""
    order: str = "p_qso"

    def __post_init__(self) -> None:
        self.classes = self.queue.classes
        self.spectrum = lru_cache(maxsize=64)(self._load_spectrum)

    @property
    def label_reference(self) -> str:
        """What CAT_LABEL compares with: the store's quasar catalogues, its pipeline CLASS or nothing."""
        return LABEL_REFERENCE[label_mode(self.store)] if self.store is not None else LABEL_REFERENCE["catalog"]

    def lookup(self, spectrum_id: str) -> dict[str, Any]:
        row = self.queue.get(spectrum_id)
        if row is None:
            raise HTTPException(404, f"unknown spectrum id {spectrum_id[:200]!r}")
        return row

    def source_path(self, row: dict[str, Any]) -> Path | None:
        """The original file of a row: its SOURCE_FILE, or that name below one of ``dirs``."""
        src = _jsonable(row.get("SOURCE_FILE"))
        if not src:
            return None
        p = Path(str(src))
        if p.is_file():
            return p
        if not p.is_absolute():
            for d in self.dirs:
                if (d / p).is_file():
                    return d / p
        return None

    def _load_spectrum(self, spectrum_id: str) -> dict[str, Any]:
        row = self.lookup(spectrum_id)
        out: dict[str, Any] = {"id": spectrum_id, "candidate": _record(row)}
        out["candidate"]["id"] = spectrum_id
        out["z_pipeline"] = out["candidate"].get("z")
        # the lines go at the predicted z by default: the template fit, else the network's
        cand = out["candidate"]
        out["z_predicted"] = next((v for v in (cand.get("z_pred"), cand.get("z_net")) if _finite(v)), None)
        out["z_predicted_from"] = (
            "templates" if _finite(cand.get("z_pred")) else ("network" if _finite(cand.get("z_net")) else None)
        )
        note = None
        path = self.source_path(row)
        if path is not None:
            try:
                return {**out, **_original_spectrum(path)}
            except Exception as exc:  # unreadable or no reader: fall back to the store, say why
                note = f"original file unreadable ({type(exc).__name__}: {exc}); showing the resampled spectrum"
                log.warning("%s: %s", path, note)
        elif _jsonable(row.get("SOURCE_FILE")):
            note = "original file not found; showing the resampled spectrum"
        return {**out, **self._resampled_spectrum(spectrum_id, row, note)}

    def _resampled_spectrum(self, spectrum_id: str, row: dict[str, Any], note: str | None) -> dict[str, Any]:
        store = self.store
        if store is None or _jsonable(row.get("ROW")) is None:
            raise HTTPException(404, f"no spectrum available for {spectrum_id!r}" + (f": {note}" if note else ""))
        r = int(row["ROW"])
        if not 0 <= r < store.flux.shape[0]:
            raise HTTPException(404, f"row {r} of {spectrum_id!r} is outside the store ({store.flux.shape[0]} rows)")
        flux = np.asarray(store.flux[r], dtype="f8")
        ivar = np.asarray(store.ivar[r], dtype="f8")
        wave, flux, ivar, k = downsample(np.asarray(store.grid.centers, "f8"), flux, ivar)
        out: dict[str, Any] = dict(
            source="resampled", flux_unit="normalised", n_pixels=int(store.flux.shape[1]), binned_by=k, note=note
        )
        out["wave"], out["flux"], out["ivar"] = _finite_lists(wave, flux, ivar)
        return out


def _original_spectrum(path: Path) -> dict[str, Any]:
    from spectransfer.surveys import read_spectrum  # readers own the formats

    rec = read_spectrum(str(path))
    ivar = np.where(np.asarray(rec.mask) != 0, 0.0, np.asarray(rec.ivar, dtype="f8"))
    wave, flux, ivar, k = downsample(np.asarray(rec.wave, "f8"), np.asarray(rec.flux, "f8"), ivar)
    out: dict[str, Any] = dict(source="original", flux_unit=rec.flux_unit, n_pixels=rec.n_pixels, binned_by=k, file=path.name)
    out["wave"], out["flux"], out["ivar"] = _finite_lists(wave, flux, ivar)
    return out


def _state(request: Request) -> InspectState:
    return request.app.state.inspect


def _split(value: str | None, allowed: list[str] | tuple[str, ...], what: str) -> list[str] | None:
    if value is None or value == "":
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise HTTPException(422, f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(allowed) or 'none'}")
    return items


# ---- routes -------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(st: InspectState = Depends(_state)) -> HTMLResponse:
    return HTMLResponse(st.index_html, headers={"Cache-Control": "no-store"})


@router.get("/api/info")
def info(st: InspectState = Depends(_state)) -> dict[str, Any]:
    counts = st.queue.counts
    return {
        "version": __version__,
        "n_candidates": int(st.queue.n),
        "categories": {c: int(counts.get(c, 0)) for c in CATEGORIES},
        "pipeline_classes": st.classes,
        "default_category": st.default_category,
        "verdicts": list(VERDICTS),
        "has_store": st.store is not None,
        "max_page": MAX_PAGE,
        "quality_bits": _quality_bits(),
        "label_reference": st.label_reference,
        "order": st.order,
    }


def _selection(
    st: InspectState, category: str | None, pipeline_class: str | None, p_min: float, p_max: float
) -> tuple[str, list[Any]]:
    """SQL condition (and its parameters) of the rows that pass the category, class and P_QSO filters."""
    if p_min > p_max:
        raise HTTPException(422, f"p_min ({p_min}) is larger than p_max ({p_max})")
    where: list[str] = ["P_QSO >= ? AND P_QSO <= ?"]
    params: list[Any] = [float(p_min), float(p_max)]
    cats = _split(category, CATEGORIES, "category")
    if cats is not None:
        where.append(f"CATEGORY IN ({', '.join('?' * len(cats))})")
        params.extend(cats)
    pcs = _split(pipeline_class, [*st.classes, "none"], "pipeline class")
    if pcs is not None and "CLASS" in st.queue.columns:
        named = [c for c in pcs if c != "none"]
        either = [f'"CLASS" IN ({", ".join("?" * len(named))})'] if named else []
        if "none" in pcs:
            either.append('"CLASS" IS NULL')
        where.append("(" + " OR ".join(either) + ")")
        params.extend(named)
    return " AND ".join(where), params


@router.get("/api/candidates")
def list_candidates(
    st: InspectState = Depends(_state),
    category: str | None = Query(None, max_length=200, description="comma-separated categories"),
    pipeline_class: str | None = Query(None, max_length=200, description="comma-separated pipeline classes; 'none' = missing"),
    p_min: float = Query(0.0, ge=0.0, le=1.0, allow_inf_nan=False),
    p_max: float = Query(1.0, ge=0.0, le=1.0, allow_inf_nan=False),
    status: Literal["all", "todo", "done"] = Query("all", description="with or without a verdict (by `inspector` if given)"),
    inspector: str | None = Query(None, max_length=64),
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
) -> dict[str, Any]:
    where, params = _selection(st, category, pipeline_class, p_min, p_max)
    done = st.db.latest_by_spectrum(inspector or None)
    total, n_inspected, rows = st.queue.select(where, params, list(done), status, offset, limit)  # one page in memory
    items = []
    for row in rows:
        rec = _record(row)
        rec["id"] = row["SPECTRUM_ID"]
        rec["verdict"] = done.get(row["SPECTRUM_ID"])
        items.append(rec)
    return {"total": total, "inspected": n_inspected, "offset": offset, "limit": limit, "items": items}


# ``:path`` because survey ids may hold '/', which the page sends %2F-encoded and the router decodes.
@router.get("/api/spectrum/{spectrum_id:path}")
def spectrum(spectrum_id: str, st: InspectState = Depends(_state)) -> dict[str, Any]:
    st.lookup(spectrum_id)
    out = dict(st.spectrum(spectrum_id))
    out["verdicts"] = st.db.rows(spectrum_id=spectrum_id)
    return out


@router.post("/api/verdicts", status_code=201)
def post_verdict(body: VerdictIn, request: Request, st: InspectState = Depends(_state)) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("application/json"):
        raise HTTPException(415, "send the verdict as application/json")
    st.lookup(body.id)
    return st.db.record(body.id, body.verdict, body.inspector, body.z)


@router.get("/api/verdicts")
def get_verdicts(inspector: str | None = Query(None, max_length=64), st: InspectState = Depends(_state)) -> dict[str, Any]:
    rows = st.db.rows(inspector)
    return {"count": len(rows), "items": rows}


# ---- the application ----------------------------------------------------------------------------


def _index_html(token: str | None) -> str:
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if token is not None:  # the page's own assets load with the token the page was opened with
        q = "?token=" + quote(token, safe="")
        html = html.replace('static/app.js"', f'static/app.js{q}"').replace('static/style.css"', f'static/style.css{q}"')
    return html


def create_app(
    candidates: pd.DataFrame | str | os.PathLike[str],
    store: Any,
    db_path: str | os.PathLike[str],
    token: str | None = None,
    default_category: str | None = None,
    loopback_only: bool = True,
    search_dirs: list[str | os.PathLike[str]] | None = None,
    order: str | None = None,
) -> FastAPI:
    """Build the app.

    ``store`` is an opened store (``.flux``, ``.ivar``, ``.grid``) or None (original files only).
    With ``token`` set every request must carry it (``Authorization: Bearer``, ``X-Token`` or
    ``?token=``). ``loopback_only`` rejects requests whose Host header is not a loopback name
    (DNS-rebinding guard for a loopback binding). ``search_dirs`` are folders in which a
    relative SOURCE_FILE is looked up (the candidates' and the store's folders).
    """
    if default_category is not None and default_category not in CATEGORIES:
        raise InspectError(f"--category must be one of {', '.join(CATEGORIES)}, not {default_category!r}")
    if isinstance(candidates, pd.DataFrame):
        queue = CandidateQueue.from_frame(
            candidates.reset_index(drop=True) if candidates.index.name == "SPECTRUM_ID" else candidates
        )
    else:
        queue = CandidateQueue.from_file(candidates)
        search_dirs = [Path(candidates).parent, *(search_dirs or [])]
    queue.order = queue.resolve_order(order)
    state = InspectState(
        queue,
        store,
        VerdictDB(db_path),
        [Path(d) for d in (search_dirs or [])],
        default_category,
        index_html=_index_html(token),
        order=queue.order,
    )

    # No Swagger page: it would load its assets from a CDN. The schema stays for scripts.
    app = FastAPI(
        title="spectransfer inspect", version=__version__, docs_url=None, redoc_url=None, openapi_url="/api/openapi.json"
    )
    app.state.inspect = state
    app.state.queue = queue
    app.state.db = state.db
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    if token is not None:
        app.middleware("http")(_token_guard(token))
    app.add_middleware(Guards, loopback_only=loopback_only)  # added last = outermost
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _quality_bits() -> dict[str, int]:
    """Names of the QUALITY bits `discover` sets, so the page can spell them out."""
    try:
        from spectransfer.candidates.discover import QUALITY_BITS
    except Exception:  # discover unavailable: the page shows the raw number
        return {}
    return {str(k): int(v) for k, v in QUALITY_BITS.items()}
