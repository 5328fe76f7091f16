"""The spectral store: normalised spectra in zarr, one metadata row per spectrum in parquet.

A store is a folder that any number of ingests append to and that training, evaluation and
discovery read without loading it into memory::

    STORE/store.json        format, grid, versions, creation time, split settings, history
    STORE/spectra.zarr      zarr v3 group: ``flux`` and ``ivar``, float32 (N, n_bins), row chunks
    STORE/meta.parquet      one row per live spectrum; ``row`` indexes the arrays
    STORE/rejected.parquet  one row per rejected file with the reason
    STORE/ledger.sqlite     ingest's ledger and plan (:mod:`spectransfer.data.ledger`)

``source_file`` is recorded relative to the data root in store.json (``data_root``) when the
file lies under it, so the survey folder can move; :attr:`Store.meta`, :attr:`Store.rejected`
and :meth:`Store.iter_meta` give absolute paths.

The arrays may hold rows no live metadata row points to (a file that was re-read because its
content changed keeps its old row; files that fail a filter leave their slot of a batch
empty; an interrupted ingest may leave unused slots). Readers always go through
``meta.row``; ``stats`` reports how many array rows are dead.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from spectransfer.config import DEFAULT_GRID, Grid
from spectransfer.data.ledger import absolute_sources, parquet_batches
from spectransfer.data.resample import SCALING
from spectransfer.data.splits import SplitConfig, assign_splits
from spectransfer.errors import StoreError
from spectransfer.provenance import atomic_path, dependency_versions, write_text_atomic
from spectransfer.surveys import id_columns

log = logging.getLogger(__name__)

FORMAT = "spectransfer-store"
FORMAT_VERSION = 1
LEGACY_SCALING = "min-max over every bin"  # what a store.json without "scaling" holds (stores written before it)
DEFAULT_CHUNK_ROWS = 256
StoreMode = Literal["r", "r+"]  # read only; r+: ingest writes to the arrays

_ARROW_TYPES = {"int64": pa.int64(), "string": pa.string()}
# meta.parquet's own columns, before and after the survey id columns (which the surveys declare).
_HEAD_COLUMNS = [("row", pa.int64()), ("spectrum_id", pa.string()), ("survey", pa.string())]
_TAIL_COLUMNS = [
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("pipeline_class", pa.string()),
    ("pipeline_subclass", pa.string()),
    ("z", pa.float64()),
    ("zwarning", pa.int64()),
    ("snr", pa.float32()),
    ("mag", pa.float32()),
    ("mag_source", pa.string()),
    ("label", pa.int8()),
    ("label_source", pa.string()),
    ("catalog_name", pa.string()),
    ("catalog_z", pa.float64()),
    ("object_id", pa.string()),
    ("split", pa.string()),
    ("source_file", pa.string()),
    ("content_hash", pa.string()),
    ("file_stamp", pa.string()),
    ("batch_id", pa.string()),
]


def meta_schema(store_ids: Sequence[Sequence[str]] = ()) -> pa.Schema:
    """Column order and arrow types of meta.parquet (the contract other modules read).

    The id columns between ``survey`` and ``ra`` are those every registered survey declares
    (:func:`spectransfer.surveys.id_columns`: SDSS plate, mjd, fiberid; LAMOST obsid, lmjd,
    planid, spid, ...), so a new survey adds its columns without an edit here; then any
    ``store_ids`` ((name, dtype) a store was written with, :attr:`Store.schema`) that no
    registered survey declares now, so rewriting a store never drops a column.
    """
    ids = dict(id_columns())
    for name, dtype in store_ids:
        ids.setdefault(str(name), str(dtype))
    return pa.schema(_HEAD_COLUMNS + [(name, _ARROW_TYPES[dtype]) for name, dtype in ids.items()] + _TAIL_COLUMNS)


def schema_id_columns(schema: pa.Schema) -> list[list[str]]:
    """[name, dtype] of a meta schema's id columns (what store.json keeps as ``id_columns``)."""
    names = schema.names[len(_HEAD_COLUMNS) : len(schema) - len(_TAIL_COLUMNS)]
    return [[n, "int64" if pa.types.is_integer(schema.field(n).type) else "string"] for n in names]


def meta_columns() -> list[str]:
    return list(meta_schema().names)


REJECTED_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("reason", pa.string()),
        ("reason_kind", pa.string()),
        ("content_hash", pa.string()),
        ("file_stamp", pa.string()),
        ("batch_id", pa.string()),
    ]
)
REJECTED_COLUMNS = list(REJECTED_SCHEMA.names)


# How labels were made (store.json "labels" -> "mode"): from quasar catalogues, from the survey
# pipeline's own CLASS, or none at all (no catalogue given). Pages and summaries say what a
# label means with LABEL_REFERENCE[mode] ("not a quasar in {reference}").
LABEL_MODES = ("catalog", "pipeline")
LABEL_REFERENCE = {
    "catalog": "the quasar catalogues",
    "pipeline": "the survey pipeline's CLASS",
    "none": "no labels (ingested without a quasar catalogue)",
}


def label_mode(store: Store | dict[str, Any]) -> str:
    """'catalog', 'pipeline' or 'none': how the store's labels were made (older stores: by their catalogues)."""
    info = store if isinstance(store, dict) else store.info
    mode = (info.get("labels") or {}).get("mode")
    if mode in LABEL_REFERENCE:
        return str(mode)
    return "catalog" if info.get("catalogs") else "none"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def conform(df: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """Return ``df`` with exactly the schema's columns (missing ones null), in its order and dtypes.

    Integer columns become pandas nullable ``Int64`` (null where not applicable, e.g. ``plate``
    of a LAMOST spectrum), strings stay ``object`` with ``None`` for missing.
    """
    out = pd.DataFrame(index=df.index)
    for f in schema:
        col = df[f.name] if f.name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)
        if pa.types.is_integer(f.type):
            if f.name in ("row",):
                out[f.name] = col.astype("int64")
            elif f.name == "label":
                out[f.name] = pd.to_numeric(col, errors="coerce").fillna(0).astype("int8")
            else:
                out[f.name] = pd.to_numeric(col, errors="coerce").astype("Int64")
        elif pa.types.is_floating(f.type):
            dtype = "float32" if f.type == pa.float32() else "float64"
            out[f.name] = pd.to_numeric(col, errors="coerce").astype(dtype)
        else:
            values = [None if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA else str(v) for v in col.tolist()]
            out[f.name] = pd.Series(values, index=df.index, dtype=object)
    return out.reset_index(drop=True)


META_ROW_GROUP = 65536  # rows per parquet row group: what reading the metadata block by block holds at once


def write_table(df: pd.DataFrame, path: Path, schema: pa.Schema) -> None:
    """Write ``df`` (conformed to ``schema``) as parquet under a temporary name, then rename."""
    table = pa.Table.from_pandas(conform(df, schema), schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=META_ROW_GROUP)


def read_table(path: Path, schema: pa.Schema) -> pd.DataFrame:
    """Read a parquet file written by :func:`write_table` (empty frame with the schema if absent)."""
    if not path.exists():
        return conform(pd.DataFrame(), schema)
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as exc:  # noqa: BLE001 - any parquet failure means a damaged store
        raise StoreError(f"{path}: cannot read ({exc})") from exc
    return conform(df, schema)


def _compressor() -> Any:
    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)


@dataclass
class Store:
    """An opened store; arrays are zarr (read lazily), metadata is a pandas DataFrame."""

    path: Path
    info: dict[str, Any]
    mode: StoreMode = "r"
    _meta: pd.DataFrame | None = field(default=None, repr=False)
    _rejected: pd.DataFrame | None = field(default=None, repr=False)
    _group: Any = field(default=None, repr=False)

    @property
    def grid(self) -> Grid:
        return Grid.from_dict(self.info["grid"])

    @property
    def scaling(self) -> str:
        """How the rows were scaled (``data.resample.SCALING`` since it is recorded; earlier stores: LEGACY_SCALING)."""
        return str(self.info.get("scaling", LEGACY_SCALING))

    @property
    def group(self) -> Any:
        if self._group is None:
            self._group = zarr.open_group(str(self.path / "spectra.zarr"), mode=self.mode)
        return self._group

    @property
    def flux(self) -> Any:
        return self.group["flux"]

    @property
    def ivar(self) -> Any:
        return self.group["ivar"]

    @property
    def chunk_rows(self) -> int:
        return int(self.flux.chunks[0])

    @property
    def n_rows(self) -> int:
        """Rows allocated in the arrays (live or not)."""
        return int(self.flux.shape[0])

    @property
    def schema(self) -> pa.Schema:
        """meta.parquet's schema: the registered surveys' id columns and those the store was written with."""
        return meta_schema(self.info.get("id_columns", ()))

    def write_meta(self, meta: pd.DataFrame) -> None:
        """Write meta.parquet (atomically) and remember its id columns in the info (save_info writes it)."""
        schema = self.schema
        write_table(meta, self.path / "meta.parquet", schema)
        self.info["id_columns"] = schema_id_columns(schema)

    @property
    def data_root(self) -> str | None:
        """The folder source files are recorded relative to (None: absolute paths, older stores)."""
        root = self.info.get("data_root")
        return str(root) if root else None

    def _sources(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` with its ``source_file`` paths absolute (the tables keep them relative to the data root)."""
        if self.data_root and len(df):
            paths = absolute_sources(df["source_file"].tolist(), self.data_root)
            df["source_file"] = pd.Series(paths, index=df.index, dtype=object)
        return df

    @property
    def meta(self) -> pd.DataFrame:
        if self._meta is None:
            self._meta = self._sources(read_table(self.path / "meta.parquet", self.schema))
        return self._meta

    def _meta_in_memory(self) -> bool:
        """Whether meta is best taken from memory (already read, or no meta.parquet to stream)."""
        return self._meta is not None or not (self.path / "meta.parquet").exists()

    def _meta_columns(self, columns: list[str]) -> pa.Table:
        """Only ``columns`` of meta.parquet, in file order (``survey`` dictionary-encoded)."""
        path = self.path / "meta.parquet"
        try:
            return pq.read_table(path, columns=columns, read_dictionary=["survey"])
        except Exception as exc:  # noqa: BLE001 - any parquet failure means a damaged store
            raise StoreError(f"{path}: cannot read ({exc})") from exc

    def live_rows(self, survey: str | None = None) -> np.ndarray:
        """The ``row`` column of meta.parquet in file order (of one survey), without reading the rest."""
        if self._meta_in_memory():
            m = self.meta
            keep = (m["survey"] == survey).to_numpy() if survey is not None else slice(None)
            return m["row"].to_numpy(dtype=np.int64)[keep]
        import pyarrow.compute as pc

        t = self._meta_columns(["row", "survey"])
        rows = t.column("row")
        if survey is not None:
            rows = rows.filter(pc.fill_null(pc.equal(t.column("survey").cast(pa.string()), survey), False))
        return rows.to_numpy().astype(np.int64, copy=False)

    def live_surveys(self) -> pd.Categorical:
        """The ``survey`` of every row of meta.parquet in file order (as ``live_rows()`` orders
        them), a byte a spectrum, without reading the rest; a missing survey is ''."""
        col = (
            self.meta["survey"] if self._meta_in_memory() else self._meta_columns(["survey"]).column("survey").to_pandas()
        ).astype("category")
        if col.isna().any():
            if "" not in col.cat.categories:
                col = col.cat.add_categories([""])
            col = col.fillna("")
        return pd.Categorical(col)

    def iter_meta(self, batch_size: int = 65536) -> Iterator[pd.DataFrame]:
        """meta.parquet in file order as conformed frames of at most ``batch_size`` rows (memory: one batch)."""
        path = self.path / "meta.parquet"
        if self._meta_in_memory():
            meta = self.meta
            for a in range(0, len(meta), batch_size):
                yield meta.iloc[a : a + batch_size].reset_index(drop=True)
            return
        try:
            batches = parquet_batches(path, batch_size)
            for batch in batches:
                yield self._sources(conform(batch.to_pandas(), self.schema))
        except Exception as exc:  # noqa: BLE001 - any parquet failure means a damaged store
            raise StoreError(f"{path}: cannot read ({exc})") from exc

    @property
    def rejected(self) -> pd.DataFrame:
        if self._rejected is None:
            self._rejected = self._sources(read_table(self.path / "rejected.parquet", REJECTED_SCHEMA))
        return self._rejected

    def rows(self, survey: str | None = None, split: str | None = None) -> np.ndarray:
        """Sorted array-row indices of the live spectra, optionally of one survey and/or split."""
        m = self.meta
        keep = np.ones(len(m), dtype=bool)
        if survey is not None:
            keep &= (m["survey"] == survey).to_numpy()
        if split is not None:
            keep &= (m["split"] == split).to_numpy()
        return np.sort(m["row"].to_numpy(dtype=np.int64)[keep])

    def reload(self) -> None:
        self._meta = None
        self._rejected = None
        self._group = None
        self.info = _read_info(self.path)

    def save_info(self) -> None:
        write_text_atomic(self.path / "store.json", json.dumps(self.info, indent=2, sort_keys=True) + "\n")

    def resize(self, n_rows: int) -> None:
        """Grow (never shrink) both arrays to ``n_rows`` rows."""
        for name in ("flux", "ivar"):
            arr = self.group[name]
            if arr.shape[0] < n_rows:
                arr.resize((n_rows, arr.shape[1]))


def _read_info(path: Path) -> dict[str, Any]:
    info_path = path / "store.json"
    if not info_path.exists():
        raise StoreError(f"{path}: not a spectransfer store (no store.json)")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{info_path}: cannot read ({exc})") from exc
    if info.get("format") != FORMAT:
        raise StoreError(f"{info_path}: format is {info.get('format')!r}, expected {FORMAT!r}")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise StoreError(
            f"{info_path}: format_version {info['format_version']} is newer than this program reads ({FORMAT_VERSION})"
        )
    return info


def open_store(path: str | os.PathLike[str], mode: StoreMode = "r", *, warn_scaling: bool = True) -> Store:
    """Open an existing store (``mode="r+"`` to let ingest write to its arrays).

    A store scaled by an earlier rule is logged once; ``warn_scaling=False`` leaves that to a
    caller that refuses such a store itself (ingest), so the user reads one message."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file, not a store (a store is the folder that ingest writes)")
    if not path.is_dir():
        raise StoreError(f"{path}: store folder does not exist")
    store = Store(path=path, info=_read_info(path), mode=mode)
    if not (path / "spectra.zarr").is_dir():
        raise StoreError(f"{path}: store has no spectra.zarr")
    if warn_scaling and store.scaling != SCALING:
        _warn_scaling(str(path.resolve()), store.scaling)
    return store


@lru_cache(maxsize=64)
def _warn_scaling(path: str, scaling: str) -> None:
    """Once per store: its rows were scaled otherwise than this version scales new spectra."""
    log.warning(
        "%s: its spectra were scaled by an earlier rule (%s), this version scales %s (classify, new stores); "
        "ingest the files again into a new store folder to score and train on one scaling",
        path,
        scaling,
        SCALING,
    )


def create_store(path: str | os.PathLike[str], grid: Grid = DEFAULT_GRID, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Store:
    """Make an empty store folder (arrays of 0 rows); refuses a folder that holds anything else."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"{path}: folder exists and is not an empty store")
    if chunk_rows < 1:
        raise StoreError(f"chunk_rows must be >= 1, got {chunk_rows}")
    path.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path / "spectra.zarr"), mode="w", zarr_format=3)
    for name in ("flux", "ivar"):
        group.create_array(
            name,
            shape=(0, grid.n_bins),
            chunks=(chunk_rows, grid.n_bins),
            dtype="float32",
            fill_value=0.0,
            compressors=_compressor(),
            dimension_names=("row", "bin"),
        )
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "store_id": str(uuid.uuid4()),
        "grid": grid.to_dict(),
        "scaling": SCALING,
        "created": _now(),
        "versions": dependency_versions(),
    }
    # store.json last: a folder without it is not a store yet.
    write_text_atomic(path / "store.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return Store(path=path, info=info, mode="r+")


def write_store(
    path: str | Path,
    flux: np.ndarray,
    ivar: np.ndarray,
    meta: pd.DataFrame,
    grid: Grid = DEFAULT_GRID,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    seed: int = 0,
) -> Store:
    """Write a complete store in one go from arrays (e.g. for tests of the modules that read one).

    ``meta`` needs one row per array row; missing contract columns are filled with nulls,
    ``row`` with 0..N-1, ``spectrum_id`` with ``"row-i"``, ``label``/``label_source`` with
    0/'none', and ``object_id``/``split`` by the object-level split of :mod:`spectransfer.data.splits`.
    """
    flux = np.asarray(flux, dtype=np.float32)
    ivar = np.asarray(ivar, dtype=np.float32)
    if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape[1] != grid.n_bins:
        raise StoreError(f"flux and ivar must both be (N, {grid.n_bins}); got {flux.shape} and {ivar.shape}")
    if len(meta) != flux.shape[0]:
        raise StoreError(f"meta has {len(meta)} rows but the arrays have {flux.shape[0]}")
    store = create_store(path, grid=grid, chunk_rows=chunk_rows)
    n = flux.shape[0]
    store.resize(n)
    if n:
        store.flux[:] = flux
        store.ivar[:] = ivar
    meta = meta.copy().reset_index(drop=True)
    meta["row"] = np.arange(n, dtype=np.int64)
    if "spectrum_id" not in meta.columns:
        meta["spectrum_id"] = [f"row-{i}" for i in range(n)]
    if "label" not in meta.columns:
        meta["label"] = 0
    if "label_source" not in meta.columns:
        meta["label_source"] = "none"
    report: dict[str, Any] = {}
    if "split" not in meta.columns or meta["split"].isna().any():
        meta, report = assign_splits(meta, SplitConfig(seed=seed))
    elif "object_id" not in meta.columns:
        meta["object_id"] = meta["spectrum_id"]
    store.write_meta(meta)
    write_table(pd.DataFrame(), store.path / "rejected.parquet", REJECTED_SCHEMA)
    store.info["splits"] = report
    sources = set(meta["label_source"].dropna().astype(str))
    store.info["labels"] = {"mode": "pipeline" if "pipeline" in sources else "catalog" if (meta["label"] == 1).any() else "none"}
    store.save_info()
    store.reload()
    return store


def store_stats(store: Store) -> dict[str, Any]:
    """Counts a person wants before training: per survey, class, label source, split, rejection."""
    m = store.meta
    rej = store.rejected

    def counts(series: pd.Series) -> dict[str, int]:
        s = series.fillna("(missing)").astype(str)
        return {str(k): int(v) for k, v in s.value_counts().sort_index().items()}

    split_qso = {}
    if len(m):
        for split, part in m.groupby(m["split"].fillna("(missing)")):
            split_qso[str(split)] = {
                "spectra": int(len(part)),
                "quasars": int((part["label"] == 1).sum()),
                "objects": int(part["object_id"].nunique()),
            }
    return {
        "path": str(store.path),
        "store_id": store.info.get("store_id"),
        "n_live": int(len(m)),
        "n_rows_allocated": store.n_rows,
        "n_dead_rows": int(store.n_rows - len(m)),
        "n_rejected": int(len(rej)),
        "survey": counts(m["survey"]),
        "pipeline_class": counts(m["pipeline_class"]),
        "label": counts(m["label"].map({1: "quasar", 0: "other"})),
        "label_source": counts(m["label_source"]),
        "split": split_qso,
        "rejected": counts(rej["reason_kind"]),
        "leakage": store.info.get("splits", {}).get("leakage", {}),
        "label_mode": label_mode(store),
    }
