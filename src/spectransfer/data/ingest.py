"""Survey files -> store, as Dask tasks that each own a row range; resumable and idempotent.

How an ingest runs (and why it survives ``kill -9`` at any moment), holding one batch at a
time on the driver, never the survey:

1. Walk the inputs (streamed, in path order) and look each file up in the ledger
   (``STORE/ledger.sqlite``, :mod:`spectransfer.data.ledger`) by its path relative to the
   store's data root and a size:mtime stamp. Unchanged files are skipped without being opened.
2. Group the remaining files into batches as the walk goes. Each batch gets a row range
   aligned to the arrays' chunk boundaries, after every row used before, so no two tasks ever
   touch the same chunk; the arrays are grown to fit it and the batch goes into the ledger's
   plan before its task is submitted (a few tasks in flight at a time).
3. Each task (one per batch, on a Dask worker) hashes, reads, filters, resamples and
   normalises its files, writes its rows into the zarr arrays, and only then writes
   ``STORE/parts/BATCH.parquet`` (temporary name, then rename). A batch is done iff its part
   file exists; a rerun after a crash resubmits only the planned batches without one, to the
   same rows (writing the same bytes again is harmless), then walks on.
4. When every batch is done the parts are folded into the ledger (the newest record of each
   file wins: a changed file supersedes its old row, which stays in the arrays as a dead
   row), and ``meta.parquet`` and ``rejected.parquet`` are rewritten block by block:
   catalogue labels per block, object-level splits from the few columns they need. Then the
   plan and the parts are removed.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from spectransfer.config import DEFAULT_GRID, LOGLAM_STEP, SIMULATE_MARKER, Grid
from spectransfer.data.catalogs import label_spectra, load_catalog
from spectransfer.data.ledger import Keys, Ledger, open_ledger, parquet_batches, parquet_blocks, part_records
from spectransfer.data.resample import SCALING, normalise, resample_batch
from spectransfer.data.split_columns import parquet_column_blocks, split_columns
from spectransfer.data.splits import SPLITS, SplitConfig
from spectransfer.data.store import (
    LABEL_MODES,
    META_ROW_GROUP,
    REJECTED_SCHEMA,
    Store,
    conform,
    create_store,
    meta_columns,
    meta_schema,
    open_store,
    schema_id_columns,
)
from spectransfer.data.store import (
    label_mode as label_mode_of,
)
from spectransfer.errors import SpectrumError, StoreError
from spectransfer.locks import OutputLock
from spectransfer.progress import progress_bar
from spectransfer.provenance import atomic_path, sha256_file
from spectransfer.surveys import (
    coverage_limits,
    get_survey,
    id_columns,
    iter_walk,
    printable_path,
    read_spectrum,
    record_coverage,
    survey_names,
    walk_spectrum_files,
)
from spectransfer.surveys.base import SPECTRUM_SUFFIXES

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256
# Test hook: seconds each batch sleeps between writing its rows and writing its part file,
# so a test can kill an ingest in the middle of a run.
DELAY_ENV = "SPECTRANSFER_INGEST_BATCH_DELAY"


@dataclass(frozen=True)
class IngestOptions:
    """What a batch task needs to know besides its files (pickled to the workers)."""

    survey: str = "auto"  # a registered survey's name, or "auto"
    zwarning_filter: bool = True
    coverage_filter: bool = True


@dataclass
class IngestSummary:
    """What an ingest did; the CLI prints it and store.json keeps it in ``ingests``."""

    store: str
    files_seen: int = 0
    skipped_unchanged: int = 0
    resumed_batches: int = 0
    batches: int = 0
    files_processed: int = 0
    accepted: int = 0
    rejected: int = 0
    unchanged_content: int = 0
    duplicates: int = 0
    live_rows: int = 0
    rows_allocated: int = 0
    rejected_by_kind: dict[str, int] = field(default_factory=dict)
    leakage: dict[str, int] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)  # label mode, and per catalogue its rows per class
    split_warnings: list[str] = field(default_factory=list)
    resplit_moved: int = 0  # spectra whose split changed because of --resplit
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # end to end, cluster start and consolidation included
    compute_seconds: float = 0.0  # first task submitted to last result
    task_seconds: float = 0.0  # sum over tasks of their wall time
    task_cpu_seconds: float = 0.0  # sum over tasks of their CPU time (low vs wall = waiting for a core or I/O)
    worker_pids: list[int] = field(default_factory=list)

    @property
    def spectra_per_s(self) -> float:
        return self.files_processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spectra_per_s"] = round(self.spectra_per_s, 2)
        return d


# ---- per-file work (runs on the workers) ------------------------------------------------------


def file_stamp(path: str) -> str:
    """Cheap change detector: size and modification time in ns."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def spectrum_id(rec: Any) -> str:
    """Unique id of a spectrum from its survey ids (the store's ``spectrum_id`` column),
    built by the survey's declared pattern (:class:`spectransfer.surveys.Survey`)."""
    try:
        survey = get_survey(rec.survey)
    except KeyError as exc:
        raise SpectrumError(rec.path, str(exc.args[0])) from None
    try:
        return survey.format_id(rec.ids or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise SpectrumError(rec.path, f"cannot build a {rec.survey} spectrum id from ids {rec.ids} ({exc})") from None


def reason_kind(reason: str) -> str:
    """Group a rejection reason for counting: 'fails filter: zwarning=4' -> 'fails filter: zwarning'."""
    head, _, rest = reason.partition(":")
    if head == "fails filter":
        word = rest.strip().replace("=", " ").split(" ")[0]
        return f"{head}: {word}"
    return head


def quality_failure(rec: Any, options: IngestOptions, grid: Grid = DEFAULT_GRID) -> str | None:
    """The paper's quality cuts, as the record's survey declares them; returns the rejection
    reason or None when the spectrum passes.

    SDSS: WAVEMIN <= 3839.7244, WAVEMAX >= 8914.597 and ZWARNING == 0. LAMOST: the spectrum
    covers the same range (every LAMOST LRS spectrum should; the cut catches truncated ones).
    """
    if options.survey != "auto" and rec.survey != options.survey:
        return f"wrong survey: {rec.survey} (expected {options.survey})"
    survey = get_survey(rec.survey)
    if survey.zwarning_cut and options.zwarning_filter:
        if rec.zwarning is None:
            return "fails filter: zwarning missing"
        if int(rec.zwarning) != 0:
            return f"fails filter: zwarning={int(rec.zwarning)}"
    if options.coverage_filter:
        lo, hi = coverage_limits(survey.name, grid)
        wmin, wmax = record_coverage(rec)
        if not (wmin <= lo):
            return f"fails filter: wavemin {wmin:.1f} > {lo}"
        if not (wmax >= hi):
            return f"fails filter: wavemax {wmax:.1f} < {hi}"
    return None


def passes_cuts(rec: Any, options: IngestOptions | None = None, grid: Grid = DEFAULT_GRID) -> tuple[bool, str]:
    """(passes, why) for one record under the ingest cuts: :func:`quality_failure` itself, plus the
    coverage it judged (pipeline WAVEMIN/WAVEMAX where stated, else the pixels with data, and how
    many of those the reader restored), so ``info`` and ``ingest`` can never disagree."""
    failure = quality_failure(rec, options or IngestOptions(), grid)
    wmin, wmax = record_coverage(rec)
    cov = f"data cover {wmin:.1f}-{wmax:.1f} A"
    restored = rec.extra.get("restored_pixels")
    if restored:  # early LAMOST files: pixels the pipeline zeroed for low signal, given back by the reader
        cov += f" ({restored} zeroed low-signal pixels restored)"
    if failure is None:
        return True, f"passes; {cov}"
    return False, f"{failure}; {cov}"


def _meta_row(rec: Any, snr: float) -> dict[str, Any]:
    ids = rec.ids or {}
    extra = rec.extra or {}
    mag = extra.get("mag_r", extra.get("mag"))
    return {
        "spectrum_id": spectrum_id(rec),
        "survey": rec.survey,
        **{col: ids.get(col) for col, _ in id_columns()},
        "ra": rec.ra,
        "dec": rec.dec,
        "pipeline_class": rec.cls,
        "pipeline_subclass": rec.subclass,
        "z": rec.z,
        "zwarning": rec.zwarning,
        "snr": snr,
        "mag": mag,
        "mag_source": extra.get("mag_r_source") if mag is not None else None,
    }


def _median_snr(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Median S/N per spectrum over the grid bins that have data (NaN when none do)."""
    sn = np.where(ivar > 0, np.abs(flux) * np.sqrt(np.clip(ivar, 0, None)), np.nan)
    with np.errstate(all="ignore"):
        out = np.nanmedian(sn, axis=1) if sn.size else np.zeros(0)
    return out


def read_checked(path: str, options: IngestOptions, grid: Grid = DEFAULT_GRID) -> tuple[Any, str | None]:
    """Read one spectrum file and apply the quality cuts: (record, None) or (None, reason).

    Never raises for a bad file (ingest and classify both list the reason and go on).
    """

    try:
        rec = read_spectrum(path)
        spectrum_id(rec)
    except SpectrumError as exc:
        return None, f"unreadable: {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - a reader bug must not lose the other files
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    failure = quality_failure(rec, options, grid)
    return (None, failure) if failure is not None else (rec, None)


def grid_records(good: list, records: list, grid: Grid = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Resampled, normalised flux and ivar, median S/N and the kept (base, record) pairs.

    ``good`` holds (base row, record) pairs; one that cannot be resampled is appended to
    ``records`` as rejected (with its reason) and left out, the others kept.
    """
    from spectransfer.data.resample import normalise

    try:
        f, iv = resample_records([rec for _, rec in good], grid)
        snr = _median_snr(f, iv)
        fn, ivn = normalise(f, iv, grid)
    except Exception:  # noqa: BLE001 - find the one bad spectrum rather than lose the batch
        f, iv, fn, ivn, snr, good = _resample_one_by_one(good, records, grid)
    return fn, ivn, snr, good


def process_batch(task: dict[str, Any]) -> dict[str, Any]:
    """Read, filter, resample and normalise one batch of files; write its rows, then its part file.

    Never raises for a bad file: each one becomes a rejected record with a reason. Returns
    counts for the progress bar.
    """
    t0 = time.perf_counter()
    c0 = time.process_time()
    store_path = Path(task["store"])
    part_path = store_path / "parts" / f"{task['batch_id']}.parquet"
    n_files = len(task["files"])
    if part_path.exists():  # done by an earlier (killed) run's worker
        return {
            "batch_id": task["batch_id"],
            "n_files": n_files,
            "accepted": 0,
            "rejected": 0,
            "unchanged": 0,
            "seconds": 0.0,
            "skipped": True,
        }
    options = IngestOptions(**task["options"])
    grid = Grid.from_dict(task["grid"])
    records: list[dict[str, Any]] = []
    good: list[tuple[dict[str, Any], Any]] = []
    for path, stamp, prev_hash, *key in task["files"]:
        base = {"source_file": key[0] if key else path, "file_stamp": stamp, "batch_id": task["batch_id"]}
        try:
            digest = "sha256:" + sha256_file(path)
        except OSError as exc:
            records.append({**base, "status": "rejected", "content_hash": None, "reason": f"unreadable: {exc.strerror or exc}"})
            continue
        base["content_hash"] = digest
        if prev_hash is not None and digest == prev_hash:
            records.append({**base, "status": "unchanged"})
            continue
        rec, failure = read_checked(path, options, grid)
        if rec is None:
            records.append({**base, "status": "rejected", "reason": failure})
            continue
        good.append((base, rec))

    capacity = int(task["capacity"])
    flux_block = np.zeros((capacity, grid.n_bins), dtype=np.float32)
    ivar_block = np.zeros((capacity, grid.n_bins), dtype=np.float32)
    if good:
        fn, ivn, snr, good = grid_records(good, records, grid)
        flux_block[: len(good)] = fn
        ivar_block[: len(good)] = ivn
        for i, (base, rec) in enumerate(good):
            records.append({**base, **_meta_row(rec, float(snr[i])), "status": "accepted", "row": int(task["row_start"]) + i})

    flux, ivar = _open_arrays(store_path / "spectra.zarr")
    sl = slice(int(task["row_start"]), int(task["row_start"]) + capacity)
    flux[sl] = flux_block
    ivar[sl] = ivar_block

    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)

    frame = pd.DataFrame(records)
    _write_part(frame, part_path)
    counts = frame["status"].value_counts() if len(frame) else pd.Series(dtype=int)
    return {
        "batch_id": task["batch_id"],
        "n_files": n_files,
        "accepted": int(counts.get("accepted", 0)),
        "rejected": int(counts.get("rejected", 0)),
        "unchanged": int(counts.get("unchanged", 0)),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "skipped": False,
        "pid": os.getpid(),
    }


def _open_arrays(path: Path, tries: int = 5) -> tuple[Any, Any]:
    """The store's flux and ivar arrays for writing. The driver grows them (rewriting their
    metadata) while tasks run, so a read that catches the metadata half written is retried."""
    for attempt in range(tries):
        try:
            group = zarr.open_group(str(path), mode="r+")
            return group["flux"], group["ivar"]
        except Exception:  # noqa: BLE001 - retried; the last try raises
            if attempt == tries - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


# Survey spectra on a logarithmic wavelength grid with steps of LOGLAM_STEP = 1e-4 in
# log10(lambda) (SDSS, most LAMOST files) are all subsets of one global grid. Placing each on
# a common window of it (ivar 0 where a spectrum has no pixel) lets a whole batch share one
# overlap matrix: one sparse product per batch instead of one matrix build per file.
_ALIGN_TOL = 0.02  # in pixels: float32 loglam columns round the ideal grid by < 0.003 pixel


def _loglam_window(grid: Grid) -> tuple[int, np.ndarray]:
    """First global pixel index and wavelengths of the window covering the grid (3 pixels margin)."""
    lo = int(np.floor(np.log10(grid.edges[0]) / LOGLAM_STEP)) - 3
    hi = int(np.ceil(np.log10(grid.edges[-1]) / LOGLAM_STEP)) + 3
    return lo, 10.0 ** (LOGLAM_STEP * np.arange(lo, hi + 1))


def _aligned_index(wave: np.ndarray) -> int | None:
    """Global pixel index of ``wave[0]`` when ``wave`` lies on the 1e-4 log grid, else None."""
    if wave.size < 2:
        return None
    k = np.log10(wave) / LOGLAM_STEP
    k0 = np.rint(k[0])
    if abs(k[0] - k0) > _ALIGN_TOL or abs(k[-1] - (k0 + wave.size - 1)) > _ALIGN_TOL:
        return None
    if np.max(np.abs(k - (k0 + np.arange(wave.size)))) > _ALIGN_TOL:
        return None
    return int(k0)


def resample_records(recs: list[Any], grid: Grid = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Resample records onto ``grid``: log-grid ones through one shared window, others one by one."""
    n = len(recs)
    out_f = np.zeros((n, grid.n_bins))
    out_iv = np.zeros((n, grid.n_bins))
    lo, window = _loglam_window(grid)
    w = window.size
    aligned = [(i, _aligned_index(np.asarray(r.wave))) for i, r in enumerate(recs)]
    on_grid = [(i, k) for i, k in aligned if k is not None]
    others = [i for i, k in aligned if k is None]
    if on_grid:
        fl = np.zeros((len(on_grid), w))
        iv = np.zeros((len(on_grid), w))
        mk = np.zeros((len(on_grid), w), dtype=np.uint32)
        for j, (i, k) in enumerate(on_grid):
            r = recs[i]
            a, b = k - lo, k - lo + r.wave.size  # window positions of the spectrum's pixels
            s0, s1 = max(0, -a), r.wave.size - max(0, b - w)
            if s1 <= s0:
                continue
            fl[j, a + s0 : a + s1] = r.flux[s0:s1]
            iv[j, a + s0 : a + s1] = r.ivar[s0:s1]
            mk[j, a + s0 : a + s1] = r.mask[s0:s1]
        f, v = resample_batch(window, fl, iv, mk, grid)
        idx = np.array([i for i, _ in on_grid])
        out_f[idx], out_iv[idx] = f, v
    if others:
        f, v = resample_batch(
            [recs[i].wave for i in others],
            [recs[i].flux for i in others],
            [recs[i].ivar for i in others],
            [recs[i].mask for i in others],
            grid,
        )
        idx = np.array(others)
        out_f[idx], out_iv[idx] = f, v
    return out_f, out_iv


def _resample_one_by_one(good: list, records: list, grid: Grid) -> tuple:
    kept, fs, ivs = [], [], []
    for base, rec in good:
        try:
            f, iv = resample_batch([rec.wave], [rec.flux], [rec.ivar], [rec.mask], grid)
        except Exception as exc:  # noqa: BLE001
            records.append({**base, "status": "rejected", "reason": f"unreadable: cannot resample ({exc})"})
            continue
        kept.append((base, rec))
        fs.append(f[0])
        ivs.append(iv[0])
    f = np.array(fs).reshape(-1, grid.n_bins)
    iv = np.array(ivs).reshape(-1, grid.n_bins)
    fn, ivn = normalise(f, iv, grid)
    return f, iv, fn, ivn, _median_snr(f, iv), kept


def part_columns() -> list[str]:
    """Columns of a batch's part file: the metadata's, then status and reason."""
    return meta_columns() + ["status", "reason"]


def _write_part(frame: pd.DataFrame, path: Path) -> None:
    schema = meta_schema().append(pa.field("status", pa.string())).append(pa.field("reason", pa.string()))
    if "row" not in frame.columns:
        frame["row"] = -1
    frame["row"] = frame["row"].fillna(-1)
    table = pa.Table.from_pandas(conform(frame, schema), schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ---- planning and consolidation (main process) ----------------------------------------------


def find_files(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Absolute paths of the spectrum files named by ``inputs`` (files or folders), sorted, unique;
    and the entries the walk passed over, each with its reason (a name that is not UTF-8, a
    broken link, an unlistable folder, ...)."""
    for p in inputs:
        if not os.path.lexists(p):
            raise StoreError(f"{printable_path(p)}: no such file or folder")
    walk = walk_spectrum_files([Path(p) for p in inputs])
    for path, reason in walk.skipped:
        log.warning("%s: %s; recorded as rejected", path, reason)
    found = {str(Path(p).resolve()) for p in walk.files}
    if not found and not walk.skipped:
        raise StoreError(f"no spectrum files (*.fits, *.fit, *.fits.gz) in {', '.join(printable_path(p) for p in inputs)}")
    return sorted(found), walk.skipped


def _record_skipped(store: Store, batch_id: str, skipped: list[tuple[str, str]], keys: Keys) -> None:
    """Entries the walk passed over become rejected records (a part file like a batch's)."""
    rows = [
        {
            "source_file": keys.key(path),
            "file_stamp": None,
            "batch_id": batch_id,
            "status": "rejected",
            "content_hash": None,
            "reason": f"unreadable: {reason}",
        }
        for path, reason in skipped
    ]
    _write_part(pd.DataFrame(rows, columns=part_columns()), store.path / "parts" / f"{batch_id}.parquet")


def _is_simulated(path: Path) -> bool:
    return any((p / SIMULATE_MARKER).is_file() for p in [path, *path.parents])


def _record_origin(store: Store, inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Remember whether the store's inputs came from `spectransfer simulate` (its marker in a folder at
    or above them) or are real survey files, so every model trained on the store, and every report,
    can say plainly whether it was trained or evaluated on simulated spectra."""
    origins = dict(store.info.get("input_origins", {}))
    for p in inputs:
        path = Path(p).resolve()
        origins[printable_path(path)] = "simulated" if _is_simulated(path if path.is_dir() else path.parent) else "real"
    kinds = set(origins.values())
    origin = kinds.pop() if len(kinds) == 1 else "mixed"
    if origins != store.info.get("input_origins") or origin != store.info.get("origin"):
        store.info["input_origins"] = origins
        store.info["origin"] = origin
        store.save_info()


def _drop_unencodable(batches: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> None:
    """Take files whose names cannot be written to the metadata out of pending batches.

    A plan written before such names were caught would otherwise fail on every rerun.
    """
    for b in batches:
        bad = [f for f in b["files"] if printable_path(f[0]) != f[0]]
        for f in bad:
            skipped.append((printable_path(f[0]), "file name is not valid UTF-8 (rename it)"))
        b["files"] = [f for f in b["files"] if printable_path(f[0]) == f[0]]


def _catalogs(store: Store, new: Sequence[str | os.PathLike[str]], key: str = "catalogs") -> list[str]:
    """Catalogue paths to label with: those of earlier ingests (if still there) plus the new ones."""
    paths = [str(Path(p).resolve()) for p in store.info.get(key, [])]
    for p in new:
        rp = str(Path(p).resolve())
        if not Path(rp).exists():
            raise StoreError(f"{p}: catalogue file does not exist")
        if rp not in paths:
            paths.append(rp)
    present = [p for p in paths if Path(p).exists()]
    for p in set(paths) - set(present):
        log.warning("catalogue %s used by an earlier ingest is gone; labels from it are dropped", p)
    return present


def _label(
    meta: pd.DataFrame,
    catalog_paths: list[str],
    mode: str = "catalog",
    qso_paths: Sequence[str] = (),
    loaded: dict[str, Any] | None = None,
    warn: bool = True,
) -> pd.DataFrame:
    """Labels by ``mode``; ``result.attrs['label_report']`` says how (what store.json keeps under 'labels')."""
    if mode == "pipeline":
        return _pipeline_labels(meta)
    if not catalog_paths:
        meta = meta.copy()
        meta["label"] = 0
        meta["label_source"] = "none"
        meta["catalog_name"] = None
        meta["catalog_z"] = np.nan
        if len(meta) and warn:
            log.warning("no quasar catalogue: every spectrum is labelled 'other'; give --catalog FILE or --labels pipeline")
        meta.attrs["label_report"] = {"mode": "none"}
        return meta
    cats = _load_catalogs(catalog_paths, qso_paths, loaded)
    base = meta.drop(columns=[c for c in ("label", "label_source", "catalog_name", "catalog_z") if c in meta.columns])
    out = label_spectra(base, cats, radius_arcsec=1.5)
    out.attrs["label_report"] = {
        "mode": "catalog",
        "catalogs": [c.summary() for c in cats],
        "counts": out.attrs.get("label_counts", {}),
    }
    return out


def _load_catalogs(paths: Sequence[str], qso_paths: Sequence[str] = (), loaded: dict[str, Any] | None = None) -> list[Any]:
    """The catalogues at ``paths`` (those in ``qso_paths`` taken as all quasars), reusing ``loaded`` ones."""
    qso = {str(Path(p).resolve()) for p in qso_paths}
    loaded = loaded or {}
    return [loaded.get(p) or load_catalog(p, all_quasars=str(Path(p).resolve()) in qso) for p in paths]


PIPELINE_CATALOG_NAME = "pipeline CLASS"


def _pipeline_labels(meta: pd.DataFrame) -> pd.DataFrame:
    """Label by the survey pipeline's own class: QSO -> 1 (label_source 'pipeline'); no class -> 'none'."""
    out = meta.copy()
    cls = out["pipeline_class"].astype("string").str.strip().str.upper()
    is_qso = (cls == "QSO").fillna(False).to_numpy(dtype=bool)
    known = cls.notna().to_numpy()
    out["label"] = is_qso.astype(np.int8)
    out["label_source"] = np.where(known, "pipeline", "none").astype(object)
    out["catalog_name"] = [PIPELINE_CATALOG_NAME if q else None for q in is_qso]
    out["catalog_z"] = np.where(is_qso, pd.to_numeric(out["z"], errors="coerce").to_numpy(dtype=np.float64), np.nan)
    counts = {str(k): int(v) for k, v in cls.fillna("(none)").value_counts().items()}
    log.info("labels from the pipeline's CLASS: %d quasars; rows per class %s", int(is_qso.sum()), counts)
    out.attrs["label_report"] = {"mode": "pipeline", "quasars": int(is_qso.sum()), "class_counts": counts}
    return out


def consolidate(
    store: Store,
    ledger: Ledger,
    keys: Keys,
    catalog_paths: list[str],
    split_config: SplitConfig,
    *,
    label_mode: str = "catalog",
    qso_paths: Sequence[str] = (),
    loaded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fold part files into the ledger, then write meta.parquet / rejected.parquet block by block
    (relabelled, re-split); safe to repeat. Memory: a block of rows and the split's few columns."""
    parts_dir = store.path / "parts"
    parts = sorted(p for p in parts_dir.glob("*.parquet") if not p.name.startswith(".")) if parts_dir.is_dir() else []
    for p in parts:
        ledger.fold(part_records(_read_part(p), keys))
    ledger.choose_live()
    cats = _load_catalogs(catalog_paths, qso_paths, loaded)
    loaded_all = dict(zip(catalog_paths, cats))
    unsplit = store.path / ".meta-unsplit.parquet"
    label_report = _write_labelled(store, ledger, keys, parts, unsplit, (catalog_paths, label_mode, qso_paths, loaded_all))
    report, moved, n_live, splits = _write_split(store, unsplit, split_config)
    rejected_kinds = _write_rejected(store, ledger)

    # Order matters for crash safety: tables first (each atomic), then store.json, then the
    # plan and parts go. A crash in between leaves parts that fold in again identically.
    store.info["catalogs"] = catalog_paths
    store.info["qso_catalogs"] = [p for p in catalog_paths if p in set(qso_paths)]
    store.info["labels"] = label_report
    store.info["splits"] = report
    store.info["n_rows"] = store.n_rows
    store.info["n_live"] = n_live
    store.save_info()
    ledger.clear_plan()
    (store.path / "pending.json").unlink(missing_ok=True)  # an older version's plan, now in the ledger
    for p in parts_dir.iterdir() if parts_dir.is_dir() else []:
        p.unlink(missing_ok=True)
    unsplit.unlink(missing_ok=True)
    store.reload()
    return {
        "duplicates": ledger.n_duplicates(),
        "leakage": report.get("leakage", {}),
        "splits": splits,
        "rejected_by_kind": rejected_kinds,
        "labels": label_report,
        "split_warnings": report.get("warnings", []),
        "moved": moved,
    }


def _read_part(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except Exception as exc:  # noqa: BLE001 - any parquet failure means a damaged store
        raise StoreError(f"{path}: cannot read a finished batch's records ({exc}); delete it and run the ingest again") from exc


def _meta_blocks(store: Store, parts: list[Path]) -> Iterator[pd.DataFrame]:
    """Every metadata row that may be live, in row order, in blocks of about META_ROW_GROUP rows:
    meta.parquet's (less those of the parts, if an earlier consolidation was cut short after
    writing it), then the parts' accepted ones."""
    folded = {p.stem for p in parts}
    path = store.path / "meta.parquet"
    if path.exists():
        for frame in parquet_blocks(path, META_ROW_GROUP):
            yield frame[~frame["batch_id"].isin(folded)] if folded else frame
    pending: list[pd.DataFrame] = []
    size = 0
    for p in parts:
        frame = _read_part(p)
        pending.append(frame[frame["status"] == "accepted"].drop(columns=["status", "reason"]))
        size += len(pending[-1])
        if size >= META_ROW_GROUP:
            yield pd.concat(pending, ignore_index=True)
            pending, size = [], 0
    if size:
        yield pd.concat(pending, ignore_index=True)


@contextmanager
def _table_writer(path: Path, schema: pa.Schema) -> Iterator[Callable[[pd.DataFrame], None]]:
    """Write frames (conformed to ``schema``) one after the other as one parquet file, atomically,
    with pandas' metadata as :func:`write_table`'s files have it (so readers get the same dtypes)."""
    with atomic_path(path) as tmp:
        writer: pq.ParquetWriter | None = None

        def write(df: pd.DataFrame) -> None:
            nonlocal writer
            table = pa.Table.from_pandas(conform(df, schema), schema=schema, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)

        try:
            yield write
            if writer is None:
                write(pd.DataFrame())
        finally:
            if writer is not None:
                writer.close()


def _write_labelled(store: Store, ledger: Ledger, keys: Keys, parts: list[Path], out: Path, how: tuple) -> dict[str, Any]:
    """The live rows (each file's newest accepted record, the first file of each spectrum), labelled, to ``out``."""
    catalog_paths, label_mode, qso_paths, loaded = how
    schema = store.schema
    report: dict[str, Any] = {}
    with _table_writer(out, schema) as write:
        for frame in _meta_blocks(store, parts):
            if not len(frame):
                continue
            src = frame["source_file"].tolist()
            fkeys = [keys.key(str(s)) if s is not None else f"id:{sid}" for s, sid in zip(src, frame["spectrum_id"].tolist())]
            live = ledger.live_batches(fkeys)
            batch = frame["batch_id"].fillna("").astype(str).tolist()
            keep = np.array([live.get(k) == b for k, b in zip(fkeys, batch)], dtype=bool)
            frame = frame.assign(source_file=[None if s is None else k for s, k in zip(src, fkeys)])[keep]
            if not len(frame):
                continue
            labelled = _label(frame.reset_index(drop=True), catalog_paths, label_mode, qso_paths, loaded, warn=not report)
            report = _merge_counts(report, labelled.attrs.get("label_report", {}))
            write(labelled)
    if not report:
        report = _label(
            pd.DataFrame(columns=list(schema.names)), catalog_paths, label_mode, qso_paths, loaded, warn=False
        ).attrs.get("label_report", {})
    return report


def _merge_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two blocks' label reports as one: counts added, everything else taken from either."""
    out = dict(a)
    for k, v in b.items():
        if k in out and isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _merge_counts(out[k], v)
        elif k in out and isinstance(v, int) and isinstance(out[k], int) and not isinstance(v, bool):
            out[k] = out[k] + v
        else:
            out.setdefault(k, v)
    return out


def _write_split(store: Store, unsplit: Path, cfg: SplitConfig) -> tuple[dict[str, Any], int, int, dict[str, int]]:
    """Object ids and splits for every live row (read column by column, block by block, keeping a
    few bytes a row: :func:`split_columns`), then meta.parquet rewritten block by block with them:
    (split report, spectra whose split changed, live rows, rows per split)."""
    n = pq.read_metadata(unsplit).num_rows
    object_ids, split, report = split_columns(parquet_column_blocks(unsplit), n, cfg)
    names = np.asarray(SPLITS, dtype=object)
    schema = store.schema
    a = moved = 0
    with _table_writer(store.path / "meta.parquet", schema) as write:
        for frame in parquet_blocks(unsplit, META_ROW_GROUP):
            new = split[a : a + len(frame)]
            was = pc.index_in(pa.array(frame["split"], pa.string()), value_set=pa.array(SPLITS)).fill_null(-1)
            was_np = was.to_numpy(zero_copy_only=False)
            moved += int(np.sum((was_np >= 0) & (was_np != new)))
            ids = object_ids.block(a, pa.array(frame["spectrum_id"], pa.string()), pa.array(frame["object_id"], pa.string()))
            frame["object_id"] = ids.to_pylist()
            frame["split"] = names[new]
            a += len(frame)
            write(frame)
    store.info["id_columns"] = schema_id_columns(schema)
    counts = {str(names[k]): int(v) for k, v in enumerate(np.bincount(split, minlength=len(SPLITS))) if v}
    return report, moved, int(len(split)), counts


def _write_rejected(store: Store, ledger: Ledger) -> dict[str, int]:
    """rejected.parquet from the ledger, block by block; returns the rows per reason kind."""
    kinds: dict[str, int] = {}
    with _table_writer(store.path / "rejected.parquet", REJECTED_SCHEMA) as write:
        for frame in ledger.rejected(META_ROW_GROUP):
            frame["reason_kind"] = [reason_kind(str(r)) for r in frame["reason"]]
            for k, v in frame["reason_kind"].value_counts().items():
                kinds[str(k)] = kinds.get(str(k), 0) + int(v)
            write(frame)
    return kinds


# ---- the data root -----------------------------------------------------------------------------


def _common_root(paths: Sequence[str]) -> str | None:
    """The folder ``paths`` share: a folder itself, a file's folder, their common parent."""
    dirs = []
    for p in paths:
        path = Path(p)
        is_file = path.is_file() or (not path.exists() and path.name.lower().endswith(SPECTRUM_SUFFIXES))
        dirs.append(str(path.parent if is_file else path))
    try:
        common = os.path.commonpath(dirs) if dirs else None
    except ValueError:
        return None
    return None if common in (None, os.sep) else common  # nothing shared but "/": absolute paths


def _check_root_holds(ledger: Ledger, keys: Keys, what: str) -> None:
    """Refuse a data root under which none of the store's (relative) source files is found."""
    sample = ledger.sample_keys()
    if sample and not any(os.path.lexists(keys.path(k)) for k in sample):
        raise StoreError(
            f"{what} {keys.root}: holds none of the store's source files (e.g. {sample[0]}); give the folder that does with --data-root"
        )


def _data_root(store: Store, ledger: Ledger, inputs: Sequence[str], data_root: str | os.PathLike[str] | None) -> Keys:
    """The data root source files are keyed relative to (recorded in store.json ``data_root``).

    ``data_root`` given: that folder (a moved survey). Else the recorded one while it exists;
    when it is gone (the survey folder moved), or the store has none yet, the folder the inputs
    share. A store written before data roots keyed files by absolute path: its keys under the
    folder its recorded inputs share become relative on the way.
    """
    recorded = store.info.get("data_root")
    if recorded is None:
        legacy = _common_root(list(store.info.get("input_origins", {})))
        if legacy is not None and ledger.n_files():
            ledger.rekey(Keys(legacy))
            recorded = legacy
    if data_root is not None:
        root = Path(data_root).resolve()
        if not root.is_dir():
            raise StoreError(f"--data-root {printable_path(data_root)}: no such folder")
        keys = Keys(str(root))
        if str(root) != recorded:
            _check_root_holds(ledger, keys, "--data-root")
    elif recorded is not None and Path(recorded).is_dir():
        keys = Keys(recorded)
    else:
        keys = Keys(_common_root(inputs))
        if recorded is not None:
            log.warning("the store's data root %s is gone; looking for its files under %s", recorded, keys.root)
            _check_root_holds(ledger, keys, f"data root {recorded} is gone and")
    if keys.root != store.info.get("data_root"):
        store.info["data_root"] = keys.root
        store.save_info()
    return keys


# ---- planning: folder walk -> batches, on disk ------------------------------------------------


@dataclass
class _Planner:
    """Turns the streamed folder walk into batches: each checked against the ledger, given a
    chunk-aligned row range after every row ever used, and put in the on-disk plan before its task runs."""

    store: Store
    ledger: Ledger
    keys: Keys
    batch_size: int
    seq: int
    summary: IngestSummary
    next_row: int = 0
    n_batches: int = 0
    n_skipped_parts: int = 0
    todo: list[list[Any]] = field(default_factory=list)
    todo_keys: set[str] = field(default_factory=set)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        chunk = self.store.chunk_rows
        row = max(self.store.n_rows, self.ledger.plan_end())
        self.next_row = (row + chunk - 1) // chunk * chunk

    def batches(self, entries: Iterator[tuple[str, str | None]], exclude: set[str]) -> Iterator[dict[str, Any]]:
        chunk: list[str] = []
        for path, reason in entries:
            if reason is not None:
                self.skipped.append((path, reason))
                if len(self.skipped) >= self.batch_size:
                    self._flush_skipped()
                continue
            if path in exclude:
                continue
            chunk.append(path)
            if len(chunk) >= self.batch_size:
                yield from self._check(chunk)
                chunk = []
        yield from self._check(chunk)
        if self.todo:
            yield self._batch()
        self._flush_skipped()

    def _check(self, paths: list[str]) -> Iterator[dict[str, Any]]:
        """New or changed files among ``paths`` (same size and mtime = unchanged, counted and skipped)."""
        self.summary.files_seen += len(paths)
        keyed = [(p, self.keys.key(p)) for p in paths]
        known = self.ledger.known([k for _, k in keyed])
        planned = self.ledger.planned([k for _, k in keyed])
        for path, key in keyed:
            if key in planned or key in self.todo_keys:
                continue
            try:
                stamp = file_stamp(path)
            except OSError as exc:
                raise StoreError(f"{path}: cannot stat ({exc.strerror})") from exc
            old_stamp, old_hash = known.get(key, (None, None))
            if key in known and old_stamp == stamp:
                self.summary.skipped_unchanged += 1
                continue
            self.todo.append([path, stamp, old_hash if key in known else None, key])
            self.todo_keys.add(key)
            if len(self.todo) >= self.batch_size:
                yield self._batch()

    def _batch(self) -> dict[str, Any]:
        chunk = self.store.chunk_rows
        files, self.todo = self.todo[: self.batch_size], self.todo[self.batch_size :]
        self.todo_keys = {f[3] for f in self.todo}
        capacity = (len(files) + chunk - 1) // chunk * chunk
        batch = {
            "batch_id": f"{self.seq:06d}-{self.n_batches:07d}",
            "row_start": self.next_row,
            "capacity": capacity,
            "files": files,
        }
        self.store.resize(self.next_row + capacity)  # rows first: a crash now leaves dead rows, never a batch without rows
        self.ledger.add_batch(batch)
        self.next_row += capacity
        self.n_batches += 1
        return batch

    def _flush_skipped(self) -> None:
        if self.skipped:
            self.summary.files_seen += len(self.skipped)
            self.summary.rejected += len(self.skipped)
            _record_skipped(self.store, f"{self.seq:06d}-skipped{self.n_skipped_parts:05d}", self.skipped, self.keys)
            self.n_skipped_parts += 1
            self.skipped = []


def _walk(inputs: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """The folder walk of ``inputs``, refusing (before anything is written) inputs that hold no spectrum file."""
    for p in inputs:
        if not os.path.lexists(p):
            raise StoreError(f"{printable_path(p)}: no such file or folder")
    entries = iter_walk(inputs)
    first = next(entries, None)
    if first is None:
        raise StoreError(f"no spectrum files (*.fits, *.fit, *.fits.gz) in {', '.join(printable_path(p) for p in inputs)}")
    if first[1] is not None:
        log.warning("%s: %s; recorded as rejected", *first)
    return itertools.chain([first], _logged(entries))


def _logged(entries: Iterator[tuple[str, str | None]]) -> Iterator[tuple[str, str | None]]:
    for path, reason in entries:
        if reason is not None:
            log.warning("%s: %s; recorded as rejected", path, reason)
        yield path, reason


def _run_tasks(
    tasks: Iterator[dict[str, Any]], workers: int, scheduler: str | None, quiet: bool, summary: IngestSummary
) -> float:
    """Run the batch tasks as the planner makes them, a few in flight at a time (so neither the
    driver nor the scheduler holds the survey's plan); tallies their results into ``summary``
    and returns the seconds from the first submit to the last result."""
    pids: set[int] = set()
    t0 = None
    with progress_bar("ingest", total=None, unit="spectra", quiet=quiet) as bar:
        if scheduler is None and workers == 0:
            for t in tasks:
                t0 = t0 or time.perf_counter()
                res = process_batch(t)
                _tally(res, summary, pids)
                bar.advance(res["n_files"])
            return time.perf_counter() - t0 if t0 else 0.0
        from dask.distributed import as_completed

        from spectransfer.cluster import dask_client

        with dask_client(workers=workers, scheduler=scheduler) as client:
            window = 2 * max(len(client.scheduler_info().get("workers", {})), workers, 1) + 2
            pending = as_completed()

            def submit(n: int) -> None:
                for t in itertools.islice(tasks, n):
                    pending.add(client.submit(process_batch, t, key=f"ingest-{t['batch_id']}", pure=False))

            t0 = time.perf_counter()
            submit(window)
            for fut in pending:
                try:
                    res = fut.result()
                except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: the finished batches stay done
                    raise StoreError(
                        f"ingest task {fut.key} failed ({type(exc).__name__}: {exc}); run the same command again to resume"
                    ) from exc
                _tally(res, summary, pids)
                bar.advance(res["n_files"])
                submit(1)
            compute = time.perf_counter() - t0
    summary.worker_pids = sorted(pids)
    return compute


def _ingest_unguarded(
    inputs: Sequence[str | os.PathLike[str]],
    store_path: str | os.PathLike[str],
    *,
    survey: str = "auto",
    catalogs: Sequence[str | os.PathLike[str]] = (),
    qso_catalogs: Sequence[str | os.PathLike[str]] = (),
    labels: str | None = None,
    resplit: bool = False,
    loaded_catalogs: dict[str, Any] | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    zwarning_filter: bool = True,
    coverage_filter: bool = True,
    split_config: SplitConfig | None = None,
    grid: Grid = DEFAULT_GRID,
    data_root: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> IngestSummary:
    """Add the spectra in ``inputs`` (files or folders) to the store at ``store_path``.

    Creates the store if needed. Files already in the store with the same size and mtime are
    skipped; files whose bytes changed are read again and replace their old row. An ingest
    interrupted in any way is finished by the next call. ``workers=0`` runs in this process
    (no Dask); ``scheduler`` is the address of an existing Dask cluster whose workers see the
    same filesystem. ``data_root``: the folder source files are recorded relative to (see
    :func:`_data_root`; give it when the survey folder moved).
    """
    t0 = time.perf_counter()
    if survey != "auto" and survey not in survey_names():
        raise StoreError(f"--survey must be {', '.join(survey_names())} or auto, got {survey!r}")
    if workers < 0:
        raise StoreError(f"--workers must be >= 0, got {workers}")
    if batch_size < 1:
        raise StoreError(f"batch size must be >= 1, got {batch_size}")
    roots = [str(Path(p).resolve()) if _utf8_path(p) else os.fspath(p) for p in inputs]
    entries = _walk(roots)
    store_path = Path(store_path)
    store = _open_or_create(store_path, grid, batch_size, split_config, resplit)
    # A catalogue often sits beside the spectra (the simulator puts it at the top of the
    # survey folder): it is an input of labelling, not a spectrum to reject -- also when the
    # store remembers it from an earlier ingest and this one does not name it.
    catalog_files = {str(Path(c).resolve()) for c in [*catalogs, *qso_catalogs, *store.info.get("catalogs", [])]}
    chunk = store.chunk_rows
    batch_size = max(chunk, (batch_size + chunk - 1) // chunk * chunk)
    summary = IngestSummary(store=str(store_path))
    options = IngestOptions(survey=survey, zwarning_filter=zwarning_filter, coverage_filter=coverage_filter)

    with OutputLock(store_path / "ingest.lock", "an ingest"), _open_ledger(store) as ledger:
        store.reload()
        root_before = store.info.get("data_root")
        keys = _data_root(store, ledger, roots, data_root)
        if split_config is None:
            prior = store.info.get("splits", {}).get("config")
            split_config = SplitConfig.from_dict(prior) if prior else SplitConfig()
        catalog_paths = _catalogs(store, [*catalogs, *qso_catalogs])
        qso_paths = _catalogs(store, qso_catalogs, key="qso_catalogs")
        label_mode = labels or store.info.get("labels", {}).get("mode") or "catalog"
        label_mode = "catalog" if label_mode == "none" else label_mode

        parts_dir = store.path / "parts"
        had_parts = parts_dir.is_dir() and any(parts_dir.glob("*.parquet"))
        seq = max([int(store.info.get("last_run_seq", 0))] + [int(b[:6]) for b in _plan_ids(ledger)]) + 1
        store.info["last_run_seq"] = seq
        store.save_info()
        planner = _Planner(store, ledger, keys, batch_size, seq, summary)
        tasks = _tasks(_resumed(ledger, summary, planner), planner.batches(entries, catalog_files), store, options, grid)
        t_run = time.perf_counter()
        summary.compute_seconds = _run_tasks(tasks, workers=workers, scheduler=scheduler, quiet=quiet, summary=summary)
        run_seconds = time.perf_counter() - t_run
        summary.batches = planner.n_batches + summary.resumed_batches

        needs_consolidation = (
            bool(summary.batches or planner.n_skipped_parts or had_parts or catalogs or qso_catalogs)
            or keys.root != root_before
            or _effective_mode(label_mode, catalog_paths) != label_mode_of(store)
            or not (store.path / "meta.parquet").exists()
            or store.info.get("splits", {}).get("config") != split_config.to_dict()
        )
        if needs_consolidation:
            result = consolidate(
                store,
                ledger,
                keys,
                catalog_paths,
                split_config,
                label_mode=label_mode,
                qso_paths=qso_paths,
                loaded=loaded_catalogs,
            )
            summary.duplicates = result["duplicates"]
            summary.split_warnings = result["split_warnings"]
            summary.resplit_moved = result["moved"]
        store.reload()
        _record_origin(store, inputs)
        _finish_summary(store, summary, t0)
        _record_history(store, summary, seq, workers if scheduler is None else scheduler, run_seconds)
        _check_some_readable(store, summary, seq)
    return summary


def _utf8_path(p: str | os.PathLike[str]) -> bool:
    return printable_path(p) == os.fspath(p)


def _open_ledger(store: Store) -> Ledger:
    return open_ledger(store.path, Keys(store.info.get("data_root")), parquet_blocks)


def _plan_ids(ledger: Ledger) -> list[str]:
    return [b for (b,) in ledger.db.execute("SELECT batch_id FROM plan")]


def _resumed(ledger: Ledger, summary: IngestSummary, planner: _Planner) -> Iterator[dict[str, Any]]:
    """The unfinished batches of an interrupted ingest (those without a part file), one at a time."""
    parts_dir = planner.store.path / "parts"
    n = 0
    for b in ledger.pending():
        if (parts_dir / f"{b['batch_id']}.parquet").exists():
            continue
        skipped: list[tuple[str, str]] = []
        _drop_unencodable([b], skipped)
        planner.skipped.extend(skipped)
        if n == 0:
            log.info("resuming the unfinished batches of an interrupted ingest")
        n += 1
        summary.resumed_batches = n
        yield b


def _tasks(
    resumed: Iterator[dict[str, Any]], new: Iterator[dict[str, Any]], store: Store, options: IngestOptions, grid: Grid
) -> Iterator[dict[str, Any]]:
    """The batch tasks: the resumed batches first, then those the walk makes."""
    base = {"store": str(store.path.resolve()), "options": asdict(options), "grid": grid.to_dict()}
    for b in itertools.chain(resumed, new):
        yield {**base, **b}


def _tally(res: dict[str, Any], summary: IngestSummary, pids: set[int]) -> None:
    summary.files_processed += res["n_files"]
    summary.accepted += res["accepted"]
    summary.rejected += res["rejected"]
    summary.unchanged_content += res["unchanged"]
    summary.task_seconds += res.get("seconds", 0.0)
    summary.task_cpu_seconds += res.get("cpu_seconds", 0.0)
    if "pid" in res:
        pids.add(res["pid"])
    summary.worker_pids = sorted(pids)


def _column_counts(path: Path, column: str) -> dict[str, int]:
    """Rows per value of one column of a store table (read a row group at a time)."""
    if not path.exists():
        return {}
    counts: dict[str, int] = {}
    for batch in parquet_batches(path, columns=[column]):
        vc = batch.column(0).value_counts()
        for k, v in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            if k is not None:
                counts[str(k)] = counts.get(str(k), 0) + int(v)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _finish_summary(store: Store, summary: IngestSummary, t0: float) -> None:
    """What the consolidated store now holds: rows, rejections by kind, splits, labels, leakage."""
    meta = store.path / "meta.parquet"
    summary.live_rows = pq.read_metadata(meta).num_rows if meta.exists() else 0
    summary.rows_allocated = store.n_rows
    summary.rejected_by_kind = _column_counts(store.path / "rejected.parquet", "reason_kind")
    summary.leakage = store.info.get("splits", {}).get("leakage", {})
    summary.labels = store.info.get("labels", {})
    if not summary.split_warnings:
        summary.split_warnings = list(store.info.get("splits", {}).get("warnings", []))
    summary.splits = _column_counts(meta, "split")
    summary.seconds = time.perf_counter() - t0


def _open_or_create(store_path: Path, grid: Grid, batch_size: int, split_config: SplitConfig | None, resplit: bool) -> Store:
    """The store to add to: opened (same grid; a change of split settings only with ``resplit``) or new."""
    if not (store_path / "store.json").exists():
        return create_store(store_path, grid=grid, chunk_rows=batch_size)
    store = open_store(store_path, mode="r+", warn_scaling=False)  # refused below, in one message
    if store.grid != grid:
        raise StoreError(f"{store_path}: store grid {store.grid} differs from the requested {grid}")
    if store.scaling != SCALING:
        raise StoreError(
            f"{store_path}: its spectra were scaled by an earlier rule ({store.scaling}), "
            f"new ones would be scaled {SCALING}; ingest into a new store folder"
        )
    _check_resplit(store, split_config, resplit)
    return store


def _record_history(store: Store, summary: IngestSummary, seq: int, workers: Any, run_seconds: float) -> None:
    """Append this run to store.json's ``ingests`` (the last 50 kept)."""
    history = store.info.setdefault("ingests", [])
    history.append(
        {
            "run_seq": seq,
            "finished": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
            "files_seen": summary.files_seen,
            "files_processed": summary.files_processed,
            "accepted": summary.accepted,
            "rejected": summary.rejected,
            "unchanged_content": summary.unchanged_content,
            "skipped_unchanged": summary.skipped_unchanged,
            "workers": workers,
            "seconds": round(summary.seconds, 3),
            "tasks_seconds": round(run_seconds, 3),
            "compute_seconds": round(summary.compute_seconds, 3),
        }
    )
    del history[:-50]
    store.save_info()


def _effective_mode(mode: str, catalog_paths: Sequence[str]) -> str:
    return "none" if mode == "catalog" and not catalog_paths else mode


def _check_resplit(store: Store, split_config: SplitConfig | None, resplit: bool) -> None:
    """Refuse split settings that differ from the store's unless ``resplit``: a re-split moves spectra between splits."""
    prior = store.info.get("splits", {}).get("config")
    if split_config is None or not prior or SplitConfig.from_dict(prior) == split_config or resplit:
        return
    old = SplitConfig.from_dict(prior).to_dict()
    diff = ", ".join(f"{k} {old[k]} -> {v}" for k, v in split_config.to_dict().items() if old.get(k) != v)
    raise StoreError(
        f"{store.path}: the split settings differ from the store's ({diff}); re-splitting moves spectra between "
        "train, val and test: add --resplit to do it"
    )


def _check_some_readable(store: Store, summary: IngestSummary, seq: int) -> None:
    """An ingest that read files but could use none of them is an error (the reasons, counted, in one line)."""
    if summary.files_processed == 0 or summary.accepted > 0 or summary.unchanged_content > 0:
        return
    rej = store.rejected
    mine = rej[rej["batch_id"].fillna("").str.startswith(f"{seq:06d}-")]
    kinds = mine["reason_kind"].value_counts()
    why = ", ".join(f"{k} {v}" for k, v in kinds.items()) or "no reason recorded"
    example = f"; e.g. {mine['source_file'].iloc[0]}: {mine['reason'].iloc[0]}" if len(mine) else ""
    raise StoreError(f"{store.path}: none of the {summary.files_processed} spectrum files read could be used ({why}){example}")


def _useful(store_path: Path) -> bool:
    """Whether a store holds work worth keeping: live spectra, or finished batches of a resumable ingest."""
    parts = store_path / "parts"
    if parts.is_dir() and any(p.suffix == ".parquet" for p in parts.iterdir()):
        return True
    meta = store_path / "meta.parquet"
    try:
        return meta.exists() and pq.read_metadata(meta).num_rows > 0
    except Exception:  # noqa: BLE001 - a damaged table is not worth keeping either
        return False


def _remove_created(store_path: Path, existed: bool) -> None:
    """Remove what an ingest that created ``store_path`` wrote (the folder too unless it was there before)."""
    if not store_path.is_dir():
        return
    if not existed:
        shutil.rmtree(store_path, ignore_errors=True)
        return
    for p in store_path.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def ingest(inputs: Sequence[str | os.PathLike[str]], store_path: str | os.PathLike[str], **options: Any) -> IngestSummary:
    """Add the spectra in ``inputs`` (files or folders) to the store at ``store_path``.

    Options are those of :func:`_ingest_unguarded` (survey, catalogs, qso_catalogs, labels,
    workers, scheduler, batch_size, zwarning_filter, coverage_filter, split_config, resplit,
    grid, data_root, quiet). ``labels``: 'catalog' (quasar catalogues; the default) or 'pipeline' (the
    survey pipeline's CLASS == QSO); None keeps the store's. ``qso_catalogs``: tables every row
    of which is a quasar (no class column needed). Catalogues are read before anything is
    written, so a bad one leaves no store behind; when this call created the store and fails
    before any batch finished (or read files but could use none), what it created is removed.
    """
    labels = options.get("labels")
    if labels is not None and labels not in LABEL_MODES:
        raise StoreError(f"--labels must be {' or '.join(LABEL_MODES)}, got {labels!r}")
    store_path = Path(store_path)
    new_cats = [str(Path(c).resolve()) for c in options.get("catalogs", ())]
    new_qso = [str(Path(c).resolve()) for c in options.get("qso_catalogs", ())]
    for c in new_cats + new_qso:
        if not Path(c).is_file():
            raise StoreError(f"{c}: catalogue file does not exist")
    loaded = {p: c for p, c in zip(new_cats + new_qso, _load_catalogs(new_cats + new_qso, new_qso))}
    existed = store_path.exists()
    created = not (store_path / "store.json").exists()
    try:
        return _ingest_unguarded(inputs, store_path, loaded_catalogs=loaded, **options)
    except Exception:
        if created and not _useful(store_path):
            _remove_created(store_path, existed)
        raise
