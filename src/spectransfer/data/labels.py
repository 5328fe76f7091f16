"""Visual-inspection verdicts become training labels, beside the catalogue's, and back again.

A person's verdict on a spectrum (``qso`` / ``not_qso``) is better evidence than a catalogue
that left the quasar out, so ``spectransfer label STORE --verdicts FILE`` makes it the
spectrum's ``label`` (``label_source`` 'verdict') while ``meta.parquet`` keeps the catalogue's
own label in ``catalog_label`` / ``catalog_label_source``. Training reads ``label`` only, so
``train --init RUN --mode finetune`` then learns from the verdicts with no other change.

Rules (VERDICT_LABEL_RULE): each inspector's latest verdict on a spectrum counts once;
``unsure`` counts for nothing; the majority of ``qso`` vs ``not_qso`` decides; a tie (or only
``unsure``) leaves the catalogue label. Every application starts again from the catalogue
labels, so applying a file twice is applying it once, and applying a second file replaces
the first (export every verdict from one database to combine sessions). ``revert`` restores
the catalogue labels exactly. ``store.json`` records under ``verdict_labels`` which file
(sha256) was applied and when, and keeps a short history.

An ``ingest`` into the store relabels every spectrum from the catalogues and rewrites
``meta.parquet`` without the two catalogue columns: run ``label`` again afterwards.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from spectransfer.data.store import Store, conform, open_store
from spectransfer.errors import StoreError
from spectransfer.provenance import atomic_path, sha256_file

log = logging.getLogger(__name__)

VERDICT_LABEL_RULE = (
    "each inspector's latest verdict counts once; 'unsure' counts for nothing; more 'qso' than "
    "'not_qso' -> label 1, more 'not_qso' than 'qso' -> label 0; a tie keeps the catalogue label"
)
CATALOG_COLUMNS = ("catalog_label", "catalog_label_source")
CATALOG_LABEL_FIELDS = (pa.field("catalog_label", pa.int8()), pa.field("catalog_label_source", pa.string()))
VERDICT_VALUES = ("qso", "not_qso", "unsure")
HISTORY_KEEP = 20


@dataclass(frozen=True)
class LabelResult:
    """What one ``label`` call did (also what store.json records under ``verdict_labels``)."""

    action: str  # applied | unchanged | reverted | nothing-to-revert
    verdict_file: str | None = None
    sha256: str | None = None
    applied_at: str | None = None
    n_verdicts: int = 0
    n_spectra_inspected: int = 0
    n_labelled: int = 0  # spectra whose label now comes from a verdict
    n_changed: int = 0  # of those, how many differ from the catalogue label
    n_promoted: int = 0  # catalogue 0 -> verdict 1
    n_demoted: int = 0  # catalogue 1 -> verdict 0
    n_ties: int = 0  # qso and not_qso verdicts in equal number (>0): label unchanged
    n_unsure_only: int = 0
    n_unknown_ids: int = 0  # verdicts on spectra this store does not hold
    rule: str = VERDICT_LABEL_RULE


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- reading verdicts -------------------------------------------------------------------------


def read_verdict_file(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Verdict rows (spectrum_id, verdict, inspector, created_at) from .sqlite/.db, .fits, .parquet, .csv/.ecsv or .vot."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"{p}: verdict file not found")
    name = p.name.lower()
    try:
        if name.endswith((".sqlite", ".sqlite3", ".db")):
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                df = pd.read_sql_query("SELECT * FROM verdicts", con)
            finally:
                con.close()
        elif name.endswith(".parquet"):
            df = pq.read_table(p).to_pandas()
        elif name.endswith((".csv", ".ecsv")):
            df = pd.read_csv(p, comment="#", dtype=str)
        elif name.endswith((".fits", ".fit", ".fits.gz", ".vot", ".xml")):
            from astropy.table import Table

            df = Table.read(p, format="votable" if name.endswith((".vot", ".xml")) else "fits").to_pandas()
        else:
            raise StoreError(f"{p}: unknown verdict file type; use .sqlite, .fits, .parquet, .csv or .vot")
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - sqlite, arrow, astropy and pandas raise many types
        raise StoreError(f"{p}: cannot read verdicts ({exc})") from None
    return _normalise(df, p)


def _text(series: pd.Series) -> pd.Series:
    return series.map(lambda v: v.decode() if isinstance(v, bytes) else ("" if v is None or v is pd.NA else str(v))).str.strip()


def _normalise(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    cols = {str(c).lower(): c for c in df.columns}
    missing = [c for c in ("spectrum_id", "verdict") if c not in cols]
    if missing:
        raise StoreError(f"{path}: verdict table lacks column(s) {', '.join(missing)}")
    out = pd.DataFrame(
        {
            "spectrum_id": _text(df[cols["spectrum_id"]]),
            "verdict": _text(df[cols["verdict"]]).str.lower(),
            "inspector": _text(df[cols["inspector"]]) if "inspector" in cols else "",
            "created_at": _text(df[cols["created_at"]]) if "created_at" in cols else "",
        }
    )
    bad = ~out["verdict"].isin(VERDICT_VALUES)
    if bad.any():
        raise StoreError(
            f"{path}: {int(bad.sum())} verdict(s) are not qso, not_qso or unsure (first: {out['verdict'][bad].iloc[0]!r})"
        )
    return out


def decide(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Per spectrum_id: n_qso, n_not_qso, n_unsure and ``decision`` (1, 0, or -1 = leave the label)."""
    latest = verdicts.sort_values("created_at", kind="stable").drop_duplicates(["spectrum_id", "inspector"], keep="last")
    counts = pd.crosstab(latest["spectrum_id"], latest["verdict"]).reindex(columns=list(VERDICT_VALUES), fill_value=0)
    counts.columns = ["n_qso", "n_not_qso", "n_unsure"]
    q, n = counts["n_qso"].to_numpy(), counts["n_not_qso"].to_numpy()
    counts["decision"] = np.where(q > n, 1, np.where(n > q, 0, -1)).astype(np.int8)
    return counts


# ---- the store's labels -----------------------------------------------------------------------


def _read_raw_meta(store: Store) -> pd.DataFrame:
    path = store.path / "meta.parquet"
    try:
        return pq.read_table(path).to_pandas()
    except Exception as exc:  # noqa: BLE001 - any parquet failure means a damaged store
        raise StoreError(f"{path}: cannot read ({exc})") from None


def _write_meta(store: Store, meta: pd.DataFrame, with_catalog: bool) -> None:
    schema = store.schema
    base = conform(meta, schema)
    if with_catalog:
        base["catalog_label"] = meta["catalog_label"].to_numpy(dtype=np.int8)
        base["catalog_label_source"] = [
            None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else str(v)
            for v in meta["catalog_label_source"].tolist()
        ]
        for f in CATALOG_LABEL_FIELDS:
            schema = schema.append(f)
    table = pa.Table.from_pandas(base, schema=schema, preserve_index=False)
    with atomic_path(store.path / "meta.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _record(store: Store, result: LabelResult) -> None:
    info = store.info
    entry = {k: v for k, v in asdict(result).items() if k != "rule"}
    info["verdict_labels_history"] = (info.get("verdict_labels_history") or [])[-(HISTORY_KEEP - 1) :] + [entry]
    if result.action == "applied":
        info["verdict_labels"] = asdict(result)
    else:
        info.pop("verdict_labels", None)
    store.save_info()


def applied(store_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What store.json says was applied (None when the store holds catalogue labels only)."""
    return open_store(store_path).info.get("verdict_labels")


def apply_verdicts(store_path: str | os.PathLike[str], verdict_path: str | os.PathLike[str]) -> LabelResult:
    """Make the verdicts of ``verdict_path`` the store's labels (see the module docstring); idempotent."""
    store = open_store(store_path)
    vpath = Path(verdict_path)
    digest = sha256_file(vpath) if vpath.is_file() else None
    verdicts = read_verdict_file(vpath)
    raw = _read_raw_meta(store)
    has_catalog = all(c in raw.columns for c in CATALOG_COLUMNS)
    if not has_catalog:
        raw["catalog_label"] = pd.to_numeric(raw["label"], errors="coerce").fillna(0).astype(np.int8)
        raw["catalog_label_source"] = raw["label_source"]
    cat = raw["catalog_label"].to_numpy(dtype=np.int8)
    counts = decide(verdicts)
    ids = raw["spectrum_id"].astype(str)
    per_row = counts.reindex(ids)
    decision = per_row["decision"].fillna(-1).to_numpy(dtype=np.int8)
    use = decision >= 0
    label = np.where(use, decision, cat).astype(np.int8)
    source = np.where(use, "verdict", raw["catalog_label_source"].to_numpy(dtype=object))
    known = counts.index.isin(set(ids))
    result = LabelResult(
        action="applied",
        verdict_file=str(vpath.resolve()),
        sha256=digest,
        applied_at=_now(),
        n_verdicts=int(len(verdicts)),
        n_spectra_inspected=int(known.sum()),
        n_labelled=int(use.sum()),
        n_changed=int((use & (label != cat)).sum()),
        n_promoted=int((use & (label == 1) & (cat == 0)).sum()),
        n_demoted=int((use & (label == 0) & (cat == 1)).sum()),
        n_ties=int(((counts["decision"] == -1) & (counts["n_qso"] > 0) & known).sum()),
        n_unsure_only=int(((counts["n_qso"] + counts["n_not_qso"] == 0) & known).sum()),
        n_unknown_ids=int((~known).sum()),
    )
    same_labels = (
        has_catalog
        and np.array_equal(raw["label"].to_numpy(dtype=np.int8), label)
        and list(raw["label_source"].astype(object)) == list(source)
    )
    prev = store.info.get("verdict_labels") or {}
    if same_labels and prev.get("sha256") == digest:
        log.info("%s: verdicts %s are already applied; nothing changed", store.path, vpath)
        return LabelResult(**{**prev, "action": "unchanged"})
    if result.n_unknown_ids:
        log.warning(
            "%s: %d inspected spectra are not in the store %s; their verdicts are ignored",
            vpath,
            result.n_unknown_ids,
            store.path,
        )
    raw["label"] = label
    raw["label_source"] = source
    _write_meta(store, raw, with_catalog=True)
    _record(store, result)
    log.info(
        "%s: %d labels from verdicts (%d changed: %d promoted to quasar, %d demoted); %d ties left as they were",
        store.path,
        result.n_labelled,
        result.n_changed,
        result.n_promoted,
        result.n_demoted,
        result.n_ties,
    )
    return result


def revert_verdicts(store_path: str | os.PathLike[str]) -> LabelResult:
    """Restore the catalogue labels exactly and drop the two catalogue columns."""
    store = open_store(store_path)
    raw = _read_raw_meta(store)
    if not all(c in raw.columns for c in CATALOG_COLUMNS):
        if store.info.get("verdict_labels"):
            log.warning("%s: store.json records verdict labels but meta.parquet holds none (re-ingested?)", store.path)
            _record(store, LabelResult(action="nothing-to-revert", applied_at=_now()))
        return LabelResult(action="nothing-to-revert")
    restored = raw["label"].to_numpy(dtype=np.int8) != raw["catalog_label"].to_numpy(dtype=np.int8)
    raw["label"] = raw["catalog_label"].to_numpy(dtype=np.int8)
    raw["label_source"] = raw["catalog_label_source"]
    _write_meta(store, raw.drop(columns=list(CATALOG_COLUMNS)), with_catalog=False)
    result = LabelResult(action="reverted", applied_at=_now(), n_changed=int(restored.sum()))
    _record(store, result)
    log.info("%s: catalogue labels restored (%d labels changed back)", store.path, result.n_changed)
    return result


def set_catalog_labels(store: Store, labels: np.ndarray, reason: str) -> None:
    """Replace the store's catalogue labels (e.g. the active-learning experiment's label noise), dropping verdict labels."""
    raw = _read_raw_meta(store)
    if len(labels) != len(raw):
        raise StoreError(f"{store.path}: {len(labels)} labels for {len(raw)} spectra")
    raw["label"] = np.asarray(labels, dtype=np.int8)
    _write_meta(store, raw.drop(columns=[c for c in CATALOG_COLUMNS if c in raw.columns]), with_catalog=False)
    store.info.pop("verdict_labels", None)
    store.info["catalog_labels_changed"] = reason
    store.save_info()
    store.reload()
