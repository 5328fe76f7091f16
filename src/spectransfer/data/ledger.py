"""The ingest ledger and plan, on disk (SQLite), so an ingest's memory is one batch's, not the survey's.

``STORE/ledger.sqlite`` holds, per source file, the newest record the store has of it (its
stamp, content hash, status, reason, batch and spectrum id), and the plan of the running
ingest (its batches, their rows and files). The metadata tables stay the store's contract
(meta.parquet, rejected.parquet); the ledger is what ingest looks files up in and what its
resume state is. Files are keyed relative to the store's data root (``store.json``
``data_root``) when they lie under it, so a moved survey folder keeps its keys; files outside
it, and stores written before the data root existed, keep absolute keys.

A store without a ledger (written by an older version, or whose ledger was deleted) gets one
rebuilt from its tables and its ``pending.json`` plan, if any.
"""

from __future__ import annotations

import json
import os
import posixpath
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from spectransfer.errors import StoreError

LEDGER_NAME = "ledger.sqlite"
SQL_VARS = 900  # keys per IN (...) query: below SQLite's oldest default limit of 999 variables

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    key TEXT PRIMARY KEY,
    file_stamp TEXT, stamp_batch TEXT,
    content_hash TEXT, status TEXT, reason TEXT, batch_id TEXT, spectrum_id TEXT
);
CREATE INDEX IF NOT EXISTS files_spectrum ON files (spectrum_id);
CREATE TABLE IF NOT EXISTS plan (batch_id TEXT PRIMARY KEY, row_start INTEGER, capacity INTEGER, files TEXT);
CREATE TABLE IF NOT EXISTS planned (key TEXT PRIMARY KEY, batch_id TEXT);
CREATE TABLE IF NOT EXISTS live (key TEXT PRIMARY KEY, batch_id TEXT);
"""


# The newest batch's record of a file wins; its stamp unless an 'unchanged' record of a later batch refreshed it.
_UPSERT = """INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET
    content_hash = excluded.content_hash, status = excluded.status, reason = excluded.reason,
    batch_id = excluded.batch_id, spectrum_id = excluded.spectrum_id,
    file_stamp = CASE WHEN COALESCE(files.stamp_batch, '') > excluded.stamp_batch THEN files.file_stamp ELSE excluded.file_stamp END,
    stamp_batch = MAX(COALESCE(files.stamp_batch, ''), excluded.stamp_batch)
    WHERE COALESCE(files.batch_id, '') <= excluded.stamp_batch"""


class Keys:
    """Source file path <-> ledger key, relative to a data root (absolute when outside it, or no root)."""

    def __init__(self, root: str | None) -> None:
        self.root = root.rstrip("/") if root else None

    def key(self, path: str) -> str:
        if self.root is None or not posixpath.isabs(path):
            return path
        if path == self.root:
            return "."
        if path.startswith(self.root + "/"):
            return path[len(self.root) + 1 :]
        return path

    def path(self, key: str) -> str:
        if self.root is None or posixpath.isabs(key) or key.startswith("id:"):
            return key
        return posixpath.join(self.root, key)


def absolute_sources(values: Sequence[Any], root: str | None) -> list[Any]:
    """``source_file`` values as paths: relative ones joined to ``root`` (None and absolute ones kept)."""
    if not root:
        return list(values)
    keys = Keys(root)
    return [v if v is None or (isinstance(v, float)) else keys.path(str(v)) for v in values]


class Ledger:
    """The ledger of one store (one connection; the ingest lock keeps other writers out)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None)
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path}: cannot open the ingest ledger ({exc}); delete it to rebuild it from the store's tables"
            ) from exc

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- lookups ----

    def known(self, keys: Sequence[str]) -> dict[str, tuple[str | None, str | None]]:
        """key -> (file stamp, content hash) of the keys the ledger has a record of."""
        out: dict[str, tuple[str | None, str | None]] = {}
        for a in range(0, len(keys), SQL_VARS):
            part = list(keys[a : a + SQL_VARS])
            q = f"SELECT key, file_stamp, content_hash FROM files WHERE key IN ({','.join('?' * len(part))})"
            out.update({k: (s, h) for k, s, h in self.db.execute(q, part)})
        return out

    def planned(self, keys: Sequence[str]) -> set[str]:
        """The keys that a batch of the plan already holds."""
        out: set[str] = set()
        for a in range(0, len(keys), SQL_VARS):
            part = list(keys[a : a + SQL_VARS])
            q = f"SELECT key FROM planned WHERE key IN ({','.join('?' * len(part))})"
            out.update(k for (k,) in self.db.execute(q, part))
        return out

    def sample_keys(self, n: int = 20) -> list[str]:
        """Up to ``n`` relative file keys (for checking that a data root holds the store's files)."""
        q = "SELECT key FROM files WHERE key NOT LIKE '/%' AND key NOT LIKE 'id:%' ORDER BY key LIMIT ?"
        return [k for (k,) in self.db.execute(q, (n,))]

    def n_files(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM files").fetchone()[0])

    # ---- the plan ----

    def pending(self) -> Iterator[dict[str, Any]]:
        """The plan's batches in batch order (one at a time)."""
        ids = [b for (b,) in self.db.execute("SELECT batch_id FROM plan ORDER BY batch_id")]
        for b in ids:
            row_start, capacity, files = self.db.execute(
                "SELECT row_start, capacity, files FROM plan WHERE batch_id=?", (b,)
            ).fetchone()
            yield {"batch_id": b, "row_start": int(row_start), "capacity": int(capacity), "files": json.loads(files)}

    def n_pending(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM plan").fetchone()[0])

    def plan_end(self) -> int:
        """The row after the last one any batch of the plan uses (0 for no plan)."""
        return int(self.db.execute("SELECT COALESCE(MAX(row_start + capacity), 0) FROM plan").fetchone()[0])

    def add_batch(self, batch: dict[str, Any]) -> None:
        """Put a batch in the plan (files as [path, stamp, old hash, key]) in one transaction."""
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO plan VALUES (?, ?, ?, ?)",
                (batch["batch_id"], batch["row_start"], batch["capacity"], json.dumps(batch["files"])),
            )
            planned = [(f[3], batch["batch_id"]) for f in batch["files"] if _encodable(f[3])]  # others: dropped on resume
            self.db.executemany("INSERT OR REPLACE INTO planned VALUES (?, ?)", planned)

    def clear_plan(self) -> None:
        with self._tx():
            self.db.execute("DELETE FROM plan")
            self.db.execute("DELETE FROM planned")

    # ---- records ----

    def fold(self, records: Iterable[dict[str, Any]]) -> None:
        """Apply records (a part file's) in one transaction: the newest batch's record of a file
        wins; an 'unchanged' record (same bytes, new stamp) only refreshes the stamp. Repeatable."""
        real, same = [], []
        for r in records:
            batch = r["batch_id"] or ""
            if r["status"] == "unchanged":
                same.append((r["file_stamp"], batch, r["key"], batch))
            else:
                real.append(
                    (
                        r["key"],
                        r["file_stamp"],
                        batch,
                        r.get("content_hash"),
                        r["status"],
                        r.get("reason"),
                        r["batch_id"],
                        r.get("spectrum_id"),
                    )
                )
        with self._tx():
            self.db.executemany(_UPSERT, real)
            self.db.executemany(
                "UPDATE files SET file_stamp=?, stamp_batch=? WHERE key=? AND COALESCE(stamp_batch, '') <= ?", same
            )

    def rekey(self, keys: Keys) -> int:
        """Turn absolute keys under ``keys.root`` into relative ones (a store that gains a data root)."""
        if keys.root is None:
            return 0
        rows = self.db.execute("SELECT key FROM files WHERE key LIKE '/%'").fetchall()
        moved = [(keys.key(k), k) for (k,) in rows if keys.key(k) != k]
        with self._tx():
            self.db.executemany("UPDATE OR REPLACE files SET key=? WHERE key=?", moved)
        return len(moved)

    def choose_live(self) -> None:
        """Fill ``live``: per spectrum id the accepted file of the oldest batch (ties by key)."""
        with self._tx():
            self.db.execute("DELETE FROM live")
            self.db.execute(
                """INSERT INTO live SELECT key, COALESCE(batch_id, '') FROM (
                     SELECT key, batch_id, ROW_NUMBER() OVER (PARTITION BY spectrum_id ORDER BY COALESCE(batch_id, ''), key) AS rn
                     FROM files WHERE status = 'accepted') WHERE rn = 1"""
            )

    def live_batches(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for a in range(0, len(keys), SQL_VARS):
            part = list(keys[a : a + SQL_VARS])
            q = f"SELECT key, batch_id FROM live WHERE key IN ({','.join('?' * len(part))})"
            out.update(dict(self.db.execute(q, part).fetchall()))
        return out

    def rejected(self, block: int = 65536) -> Iterator[pd.DataFrame]:
        """Rejected records by key: files whose newest record is a rejection, and accepted files
        whose spectrum another file gave first (duplicates, with the reason naming that file)."""
        cur = self.db.execute(
            """SELECT f.key AS source_file,
                      CASE WHEN f.status = 'rejected' THEN f.reason
                           ELSE 'duplicate: ' || f.spectrum_id || ' already ingested from ' || (
                               SELECT g.key FROM files g JOIN live l ON l.key = g.key WHERE g.spectrum_id = f.spectrum_id)
                      END AS reason,
                      f.content_hash, f.file_stamp, f.batch_id
               FROM files f
               WHERE f.status = 'rejected' OR (f.status = 'accepted' AND f.key NOT IN (SELECT key FROM live))
               ORDER BY f.key"""
        )
        cols = [d[0] for d in cur.description]
        while rows := cur.fetchmany(block):
            yield pd.DataFrame(rows, columns=cols)

    def n_duplicates(self) -> int:
        q = "SELECT COUNT(*) FROM files WHERE status = 'accepted' AND key NOT IN (SELECT key FROM live)"
        return int(self.db.execute(q).fetchone()[0])

    def _tx(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def ledger_path(store_path: Path) -> Path:
    return store_path / LEDGER_NAME


def open_ledger(store_path: Path, keys: Keys, schema_reader: Any) -> Ledger:
    """The store's ledger; built from meta.parquet, rejected.parquet and pending.json when absent.

    ``schema_reader(path)`` yields a table's rows as frames (block by block). The rebuild goes to
    a temporary file renamed into place, so a crash during it leaves no half ledger.
    """
    path = ledger_path(store_path)
    if path.exists():
        led = Ledger(path)
        _import_plan(store_path, led, keys)
        return led
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    with Ledger(tmp) as led:
        for table, status in (("meta.parquet", "accepted"), ("rejected.parquet", "rejected")):
            if not (store_path / table).exists():
                continue
            for frame in schema_reader(store_path / table):
                led.fold(_records(frame, status, keys))
        _import_plan(store_path, led, keys)
    os.replace(tmp, path)
    return Ledger(path)


def _records(frame: pd.DataFrame, status: str, keys: Keys) -> Iterator[dict[str, Any]]:
    cols = {
        c: frame[c].tolist() if c in frame.columns else [None] * len(frame)
        for c in ("source_file", "spectrum_id", "file_stamp", "content_hash", "batch_id", "reason")
    }
    for i in range(len(frame)):
        src, sid = cols["source_file"][i], cols["spectrum_id"][i]
        yield {
            "key": keys.key(str(src)) if src is not None else f"id:{sid}",
            "file_stamp": cols["file_stamp"][i],
            "content_hash": cols["content_hash"][i],
            "status": status,
            "reason": cols["reason"][i],
            "batch_id": cols["batch_id"][i],
            "spectrum_id": sid,
        }


def part_records(frame: pd.DataFrame, keys: Keys) -> Iterator[dict[str, Any]]:
    """A part file's records for :meth:`Ledger.fold` (its status column kept)."""
    for rec, status in zip(_records(frame, "", keys), frame["status"].tolist()):
        rec["status"] = status
        yield rec


def _import_plan(store_path: Path, led: Ledger, keys: Keys) -> None:
    """An older version's pending.json (an interrupted ingest) joins the ledger's plan (again after a
    crash: the same batches, replaced; consolidation removes the file)."""
    p = store_path / "pending.json"
    if not p.exists():
        return
    try:
        plan = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{p}: cannot read the pending ingest plan ({exc})") from exc
    for b in plan.get("batches", []):
        files = [[f[0], f[1], f[2], keys.key(f[0])] for f in b["files"]]
        led.add_batch({**b, "files": files})


def parquet_batches(path: Path, block: int = 65536, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    """A parquet file's rows (``columns``, or all) as record batches of at most ``block`` rows, read
    one row group at a time. ``ParquetFile.iter_batches`` over the whole file pre-buffers the row
    groups ahead of the reader (pyarrow 26: 65,536-row batches of a 186 MB file peaked at 243 MB of
    arrow memory, 80 MB at a tenth of the size; one row group at a time, 11 MB at both)."""
    f = pq.ParquetFile(path, pre_buffer=False)
    cols = None if columns is None else list(columns)
    for i in range(f.num_row_groups):
        yield from f.iter_batches(batch_size=block, row_groups=[i], columns=cols, use_threads=False)


def parquet_blocks(path: Path, block: int = 65536) -> Iterator[pd.DataFrame]:
    """A parquet file's rows as frames of at most ``block`` rows (:func:`parquet_batches`)."""
    try:
        for batch in parquet_batches(path, block):
            yield batch.to_pandas()
    except Exception as exc:  # noqa: BLE001 - any parquet failure means a damaged store
        raise StoreError(f"{path}: cannot read ({exc})") from exc
