"""Score every spectrum of a store and write the candidate catalogue.

The paper's aim is the quasars the catalogues miss. Every spectrum of the store gets a row
(none dropped: a QUALITY bitmask says what is doubtful), a probability P_QSO and a CATEGORY
comparing the model with the catalogue label (columns, bits and writers: ``schema``).
Scoring streams over row blocks through the one scorer (``spectransfer.ml.score``), so
memory is bounded by one block; finished blocks are saved under ``OUT.parts/`` so a killed
run resumes where it stopped. With ``workers``/``scheduler`` the blocks are scored by Dask
workers. The steps: ``plan`` (check arguments, open run and store), ``prepare`` (resumable
parts folder, engine), ``score`` (the blocks), ``finish`` (probabilities, categories, table).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from spectransfer.candidates.decision import QSO_CHI2, check_templates, decide, template_cards, to_fit
from spectransfer.candidates.redshifts import DEFAULT_REFINE, REDSHIFT_COLUMNS, check_refine, redshift_columns
from spectransfer.candidates.schema import (
    CATEGORIES,
    QUALITY_BITS,
    categorise,
    discover_columns,
    from_meta,
    header_cards,
    output_format,
    pipe_not_qso,
    quality_bits,
    write_blocks,
)
from spectransfer.data.store import label_mode, open_store
from spectransfer.errors import EvaluateError, StoreError
from spectransfer.evaluation.calibration import NO_CALIBRATION_CARDS, Calibration, read_calibration
from spectransfer.evaluation.metrics import calibrated_probability
from spectransfer.ml.score import (
    ENGINES,
    EngineSpec,
    build_scorer,
    check_engine,
    default_threads,
    prepare_engine,
    read_arrays,
    rows_digest,
    score_rows,
)
from spectransfer.progress import progress_bar
from spectransfer.provenance import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES",
    "QUALITY_BITS",
    "ENGINES",
    "DiscoverResult",
    "discover",
    "parts_dir",
    "categorise",
    "quality_bits",
    "pipe_not_qso",
]


@dataclass
class DiscoverResult:
    """What `discover` wrote and the counts its summary table shows."""

    fits_path: Path  # the catalogue (named for history: any supported format)
    parquet_path: Path | None  # written beside a .fits catalogue
    n_spectra: int
    counts: dict[str, int]
    n_pipe_not_qso: int
    pipe_not_qso_by_class: dict[str, int]
    threshold: float
    engine: str
    calibrated: bool
    resumed_spectra: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spectra_per_s(self) -> float:
        return self.n_spectra / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class _Job:
    """One discover call as it moves through the steps."""

    run_dir: Path
    store_path: Path
    out: Path
    threshold: float
    engine: str
    batch_size: int
    block_size: int
    workers: int | None
    scheduler: str | None
    survey: str | None
    refine: str = DEFAULT_REFINE
    mc_samples: int = 0
    templates: str = "uncertain"
    store: Any = None
    info: Any = None
    model: Any = None
    meta: pd.DataFrame | None = None  # the selected meta in row order, only when meta.parquet is not in row order
    rows: np.ndarray | None = None
    threads: int = 1
    use_dask: bool = False
    identity: dict[str, Any] = field(default_factory=dict)
    spec: EngineSpec | None = None
    blocks: list[np.ndarray] = field(default_factory=list)
    part_files: list[Path] = field(default_factory=list)
    resumed: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def parts_dir(out: Path) -> Path:
    """Folder of finished blocks beside the output (removed once the catalogue is written)."""
    return out.with_name(out.name + ".parts")


# ---- steps ---------------------------------------------------------------------------------------


def _plan(job: _Job, threads: int | None) -> None:
    """Check the arguments, open the store and the run, choose the rows."""
    output_format(job.out)
    if not 0.0 < job.threshold < 1.0:
        raise EvaluateError(f"threshold {job.threshold} must lie strictly between 0 and 1")
    check_engine(job.engine)
    if job.batch_size < 1 or job.block_size < 1:
        raise EvaluateError("--batch-size and --block-size must be >= 1")
    if job.workers is not None and job.workers < 0:
        raise EvaluateError(f"--workers must be >= 0, got {job.workers}")
    if job.workers and job.workers > 1 and job.scheduler:
        raise EvaluateError("give --workers or --scheduler, not both")
    from spectransfer.ml.models import load_run  # torch: imported once the arguments are known good

    job.store = open_store(job.store_path)
    job.model, job.info = load_run(job.run_dir)
    if job.info.grid != job.store.grid:
        raise EvaluateError(
            f"{job.run_dir}: run was trained on grid {job.info.grid.to_dict()} but store "
            f"{job.store_path} uses {job.store.grid.to_dict()}"
        )
    rows = job.store.live_rows(job.survey)
    if rows.shape[0] == 0:
        raise StoreError(f"{job.store_path}: no spectra to score" + (f" for survey {job.survey!r}" if job.survey else ""))
    if np.all(np.diff(rows) > 0):  # meta.parquet in row order (as ingest writes it): read it block by block later
        job.rows = rows
    else:
        meta = job.store.meta
        if job.survey is not None:
            meta = meta[meta["survey"] == job.survey]
        job.meta = meta.sort_values("row").reset_index(drop=True)
        job.rows = job.meta["row"].to_numpy(dtype=np.int64)
    job.use_dask = bool(job.scheduler) or (job.workers is not None and job.workers > 1)
    job.threads = int(threads) if threads else default_threads(job.workers if job.use_dask and not job.scheduler else 1)


def _prepare(job: _Job) -> None:
    """Reuse finished blocks of an identical earlier call; export/quantise the engine's model."""
    job.identity = {
        "model_sha256": job.info.sha256,
        "store_id": job.store.info.get("store_id"),
        "rows_sha256": rows_digest(job.rows),
        "n_rows": int(job.rows.shape[0]),
        "block_size": int(job.block_size),
        "engine": job.engine,
        "mc_samples": int(job.mc_samples),
    }
    parts = parts_dir(job.out)
    resumed = _prepare_parts(parts, job.identity)
    t0 = time.perf_counter()
    cal = read_calibration(job.run_dir)
    job.spec = prepare_engine(
        job.run_dir,
        job.engine,
        parts,
        store=job.store,
        model=job.model,
        threads=job.threads,
        mc_samples=job.mc_samples,
        temperature=cal.temperature if cal else None,
    )
    job.timings["prepare_s"] = time.perf_counter() - t0
    # the metadata reads above (the rows, the int8 calibration's choice) leave arrow's pool holding
    # freed pages: ~0.03 KB a spectrum (100 MB at 4M) that the rest of the run would carry
    pa.default_memory_pool().release_unused()
    job.blocks = [job.rows[i : i + job.block_size] for i in range(0, job.rows.shape[0], job.block_size)]
    job.part_files = [parts / f"block-{i:06d}.npy" for i in range(len(job.blocks))]
    todo = sum(b.shape[0] for b, f in zip(job.blocks, job.part_files) if not f.is_file())
    job.resumed = int(job.rows.shape[0] - todo) if resumed else 0
    if job.resumed:
        log.info("resuming: %d of %d spectra already scored in %s", job.resumed, job.rows.shape[0], parts)


def _score(job: _Job, quiet: bool) -> dict[str, np.ndarray]:
    """Score the blocks not yet saved (here or on Dask workers); return every output in row order."""
    todo = [i for i, f in enumerate(job.part_files) if not f.is_file()]
    t0 = time.perf_counter()
    with progress_bar("discover", total=job.rows.shape[0], unit="spectra", quiet=quiet) as bar:
        bar.advance(job.resumed)
        if todo and job.use_dask:
            _score_on_dask(job, todo, bar.advance)
        else:
            scorer = build_scorer(job.spec, model=job.model)
            for i in todo:
                bar.advance(_score_block(job.spec, job.store, job.blocks[i], job.part_files[i], job.batch_size, scorer))
    job.timings["score_s"] = time.perf_counter() - t0
    stacked = _stack_parts(job)
    if stacked.shape[0] != job.rows.shape[0] or not np.isfinite(stacked[:, 0]).all():
        raise EvaluateError(f"{parts_dir(job.out)}: scored blocks are inconsistent (delete the folder and run again)")
    cols = {name: stacked[:, i] for i, name in enumerate(BLOCK_OUTPUTS[: stacked.shape[1]])}
    return {k: v for k, v in cols.items() if k == "logit" or not np.isnan(v).all()}  # heads the run has


def _stack_parts(job: _Job) -> np.ndarray:
    """The saved blocks' outputs in row order, filled into one array (never two copies at once:
    each block is read, copied and dropped; mapped files would keep every page read resident)."""
    heads = [np.load(f, mmap_mode="r") for f in job.part_files]  # shapes: only the headers are read
    if not heads:
        return np.zeros((0, 1), np.float32)
    if len({h.shape[1:] for h in heads}) > 1 or heads[0].ndim != 2:
        raise EvaluateError(f"{parts_dir(job.out)}: scored blocks are inconsistent (delete the folder and run again)")
    out = np.empty((sum(h.shape[0] for h in heads), heads[0].shape[1]), heads[0].dtype)
    at = 0
    for f, h in zip(job.part_files, heads):
        out[at : at + h.shape[0]] = np.load(f)
        at += h.shape[0]
    return out


def _score_on_dask(job: _Job, todo: list[int], advance: Callable[[int], Any]) -> None:
    from dask.distributed import as_completed

    from spectransfer.cluster import dask_client

    store = str(job.store_path.resolve())
    with dask_client(workers=job.workers, scheduler=job.scheduler) as client:
        futures = [
            client.submit(
                _score_block_in_worker,
                job.spec,
                store,
                job.blocks[i],
                str(job.part_files[i].resolve()),
                job.batch_size,
                key=f"discover-{job.identity['rows_sha256'][:12]}-{i}",
                pure=False,
            )
            for i in todo
        ]
        for fut in as_completed(futures):
            advance(fut.result())


def _finish(
    job: _Job,
    outputs: dict[str, np.ndarray],
    quiet: bool = True,
) -> tuple[Callable[[], Iterator[pd.DataFrame]], list[tuple[str, Any, str]], dict[str, Any]]:
    """Probabilities, categories, flags and redshifts; the table (as its row blocks) and header; the summary counts."""
    cal = read_calibration(job.run_dir)
    logits = outputs["logit"]
    p_qso = np.empty(logits.size, np.float32)  # float32, as stored; a block at a time: no survey-long float64
    for a in range(0, logits.size, job.block_size):
        p_qso[a : a + job.block_size] = calibrated_probability(logits[a : a + job.block_size], cal.temperature if cal else None)
    t0 = time.perf_counter()
    extra: dict[str, Any] = dict(_decision(job, p_qso, quiet))
    job.timings["templates_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    extra.update(_redshifts(job, {**outputs, QSO_CHI2: extra.pop(QSO_CHI2)}, extra["IS_QSO"], quiet))
    extra["P_QSO_STD"] = _Filled(outputs.get("p_qso_std"), np.float32(np.nan), np.float32, logits.size)
    job.timings["refine_s"] = time.perf_counter() - t0
    counts = dict.fromkeys(CATEGORIES, 0)
    by_class = {"STAR": 0, "GALAXY": 0}
    n_flag = 0
    for block in _table_blocks(job, logits, p_qso, extra):
        cat = block["CATEGORY"].to_numpy()
        for c in CATEGORIES:
            counts[c] += int((cat == c).sum())
        n_flag += int(block["PIPE_NOT_QSO"].sum())
        cls = (
            block["CLASS"].astype("string").str.strip().str.upper().fillna("").to_numpy(dtype=object)
            if "CLASS" in block
            else np.array([""] * len(block), dtype=object)
        )
        for c in by_class:
            by_class[c] += int(((cat == "new_candidate") & (cls == c)).sum())
    summary = {"counts": counts, "n_pipe_not_qso": n_flag, "by_class": by_class, "calibrated": cal is not None}
    return (lambda: _table_blocks(job, logits, p_qso, extra)), _header(job, cal), summary


def _meta_blocks(job: _Job) -> Iterator[pd.DataFrame]:
    """The selected spectra's metadata in row order, a block at a time."""
    if job.meta is not None:
        for a in range(0, len(job.meta), job.block_size):
            yield job.meta.iloc[a : a + job.block_size].reset_index(drop=True)
        return
    for meta in job.store.iter_meta(job.block_size):
        if job.survey is not None:
            meta = meta[meta["survey"] == job.survey].reset_index(drop=True)
        if len(meta):
            yield meta


def _table_blocks(job: _Job, logits: np.ndarray, p_qso: np.ndarray, extra: dict[str, Any]) -> Iterator[pd.DataFrame]:
    """The catalogue's rows, one block at a time (so writing it needs one block's memory);
    ``extra`` holds further per-spectrum columns (redshifts, MC-dropout spread) in row order,
    each an array or a :class:`_Filled` (sliced ``[a:b]`` either way)."""
    a = 0
    for meta in _meta_blocks(job):
        b = a + len(meta)
        if not np.array_equal(meta["row"].to_numpy(dtype=np.int64), job.rows[a:b]):
            raise StoreError(f"{job.store_path}: meta.parquet changed while the catalogue was written; run discover again")
        p = p_qso[a:b]
        pos = extra["IS_QSO"][a:b]
        label = meta["label"].fillna(0).to_numpy(dtype=np.int8)
        cols = from_meta(meta, discover_columns())
        cols.update(
            {
                "LOGIT": pd.Series(logits[a:b].astype(np.float32)),
                "P_QSO": pd.Series(p),
                "CATEGORY": pd.Series(categorise(p, label, job.threshold, pos).astype(str)),
                "PIPE_NOT_QSO": pd.Series(pipe_not_qso(p, meta["pipeline_class"], job.threshold, pos)),
                "QUALITY": pd.Series(quality_bits(meta)),
            }
        )
        cols.update({k: pd.Series(v[a:b]) for k, v in extra.items()})
        a = b
        yield pd.DataFrame({k: cols[k] for k in discover_columns() if k in cols})
    if a != job.rows.shape[0]:
        raise StoreError(f"{job.store_path}: meta.parquet changed while the catalogue was written; run discover again")


def _decision(job: _Job, p_qso: np.ndarray, quiet: bool) -> dict[str, np.ndarray]:
    """IS_QSO and the template columns: the spectra the network is unsure of are read and fitted."""
    n_fit = int(to_fit(p_qso, job.templates).size)

    def read(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return read_arrays(job.store.flux, job.store.ivar, job.rows[idx])

    surveys = _surveys(job) if n_fit else None
    with progress_bar("templates", total=n_fit, unit="spectra", quiet=quiet or n_fit == 0) as bar:
        return decide(p_qso, job.threshold, read, None, job.templates, job.store.grid, bar.advance, surveys)


def _surveys(job: _Job) -> str | pd.Categorical:
    """Each scored spectrum's survey in row order (its calibration terms): the one asked for, or
    the store's survey column alone (a byte a spectrum), in the order ``job.rows`` has."""
    if job.survey is not None:
        return job.survey
    if job.meta is not None:  # rows re-sorted in memory (see _plan)
        return pd.Categorical(job.meta["survey"].astype(str))
    return job.store.live_surveys()  # job.rows = live_rows(): meta.parquet's file order


def _redshifts(job: _Job, outputs: dict[str, np.ndarray], positive: np.ndarray, quiet: bool) -> dict[str, Any]:
    """The redshift columns: refinement reads and fits the positives a block at a time.

    Kept as the network's outputs (``Z_NET``...) and the fitted positives' values only
    (``Z_PRED``...), each filled in a block at a time as the table is written: 45 bytes a
    spectrum less than full columns (~0.4 GB at 9M spectra)."""
    n = positive.size
    fit = np.flatnonzero(positive) if job.refine != "none" else np.zeros(0, np.int64)
    net = {"Z_NET": "z_net", "Z_NET_ERR": "z_net_err", "Z_NET_PROB": "z_net_prob"}
    cols: dict[str, Any] = {k: _Filled(outputs.get(v), np.float32(np.nan), np.float32, n) for k, v in net.items()}
    got: dict[str, list[np.ndarray]] = {k: [] for k in REDSHIFT_COLUMNS if k not in net}
    with progress_bar("redshifts", total=int(fit.size), unit="spectra", quiet=quiet or fit.size == 0) as bar:
        for start in range(0, fit.size, REFINE_BLOCK):
            idx = fit[start : start + REFINE_BLOCK]
            flux, ivar = read_arrays(job.store.flux, job.store.ivar, job.rows[idx])
            mask = np.ones(idx.size, bool)
            part = redshift_columns({k: v[idx] for k, v in outputs.items()}, mask, flux, ivar, job.refine, job.store.grid)
            for k in got:
                got[k].append(part[k])
            bar.advance(idx.size)
    # the values a spectrum not fitted gets (what redshift_columns gives the non-positives)
    empty = redshift_columns({}, np.zeros(1, bool), None, None, "none", job.store.grid)
    for k, parts in got.items():
        values = np.concatenate(parts) if parts else np.zeros(0, empty[k].dtype)
        cols[k] = _Filled(values, empty[k][0], empty[k].dtype, n, at=fit)
    return cols


class _Filled:
    """A per-spectrum column held as the values it has (``values`` at rows ``at``, sorted; or
    ``values`` for every row; or none) and ``fill`` elsewhere: ``col[a:b]`` gives rows a..b-1
    as a ``dtype`` array, so a column that is mostly fill costs memory only where it is not."""

    def __init__(self, values: np.ndarray | None, fill: Any, dtype: Any, n: int, at: np.ndarray | None = None) -> None:
        self.values, self.fill, self.dtype, self.n, self.at = values, fill, np.dtype(dtype), n, at

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.n)
        if self.values is not None and self.at is None:
            return np.asarray(self.values[a:b], dtype=self.dtype)
        out = np.full(max(b - a, 0), self.fill, dtype=self.dtype)
        if self.values is not None and self.at is not None:
            lo, hi = np.searchsorted(self.at, [a, b])
            out[self.at[lo:hi] - a] = self.values[lo:hi]
        return out


def _header(job: _Job, cal: Calibration | None) -> list[tuple[str, Any, str]]:
    grid = job.store.grid
    header: dict[str, tuple[Any, str]] = {
        "THRESH": (float(job.threshold), "P_QSO threshold for a positive"),
        "MODELSHA": (job.info.sha256, ""),  # 64 hex digits: no room for a comment
        "MODEL": (job.info.model_name, "network"),
        "RUNID": (job.info.sha256[:16], "run id: sha256 prefix of its weights"),
        "RUNMODE": (job.info.mode, "training mode of the run"),
        "RUN": (job.run_dir.name, "run folder name"),
        "STOREID": (str(job.store.info.get("store_id")), "store.json store_id"),
        "STORE": (job.store_path.name, "store folder name"),
        "LABELS": (label_mode(job.store), "CAT_LABEL from: catalog, pipeline or none"),
        "SURVEY": (job.survey or "all", "surveys scored"),
        "NSPEC": (int(job.rows.shape[0]), "spectra scored (one row each)"),
        "GRIDN": (grid.n_bins, "grid bins"),
        "GRIDMIN": (float(grid.wave_min), "[Angstrom] grid start"),
        "GRIDMAX": (float(grid.wave_max), "[Angstrom] grid end"),
        "GRIDLOG": (True, "grid bins are logarithmically spaced"),
        "ENGINE": (job.engine, "scoring engine"),
        "ZREFINE": (job.refine, "Z_PRED fit: full, window or none"),
        **template_cards(job.templates),
        "MCDROP": (int(job.mc_samples), "MC-dropout passes behind P_QSO_STD (0 = off)"),
        "DATE": (datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "UTC creation time"),
    }
    for key, value, comment in cal.header_cards() if cal else NO_CALIBRATION_CARDS:
        header[key] = (value, comment)
    if job.spec is not None and job.spec.int8_calibration is not None:
        for key, value, comment in job.spec.int8_calibration.header_cards():
            header[key] = (value, comment)
    return header_cards(header)


# ---- the command -------------------------------------------------------------------------------


def discover(
    run_dir: str | Path,
    store_path: str | Path,
    out: str | Path,
    threshold: float = 0.5,
    engine: str = "onnx",
    batch_size: int = 512,
    block_size: int = 16384,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int | None = None,
    survey: str | None = None,
    quiet: bool = False,
    refine: str = DEFAULT_REFINE,
    mc_samples: int = 0,
    templates: str = "uncertain",
) -> DiscoverResult:
    """Score every spectrum of ``store_path`` with the run and write the catalogue ``out``.

    The format follows ``out``'s extension (.fits, .parquet, .csv, .vot); a .fits catalogue
    gets a .parquet copy beside it (what `inspect` reads fastest). ``workers`` > 1 or
    ``scheduler`` score blocks on Dask workers; otherwise in this process. A killed call
    resumes from the blocks saved under ``OUT.parts/`` when called again with the same run,
    store, engine and block size. ``templates`` says which spectra the template families may
    decide (``candidates.decision``; P_QSO stays the network's).
    """
    t0 = time.perf_counter()
    job = _Job(
        Path(run_dir),
        Path(store_path),
        Path(out),
        threshold,
        engine,
        batch_size,
        block_size,
        workers,
        scheduler,
        survey,
        check_refine(refine),
        int(mc_samples),
        check_templates(templates),
    )
    _plan(job, threads)
    _prepare(job)
    outputs = _score(job, quiet)
    blocks, cards, summary = _finish(job, outputs, quiet)
    write_blocks(blocks, cards, job.out)
    parquet = None
    if output_format(job.out) == "fits":
        parquet = write_blocks(blocks, cards, job.out.with_suffix(".parquet"))
    shutil.rmtree(parts_dir(job.out), ignore_errors=True)
    return DiscoverResult(
        fits_path=job.out,
        parquet_path=parquet,
        n_spectra=int(job.rows.shape[0]),
        counts=summary["counts"],
        n_pipe_not_qso=summary["n_pipe_not_qso"],
        pipe_not_qso_by_class=summary["by_class"],
        threshold=threshold,
        engine=engine,
        calibrated=summary["calibrated"],
        resumed_spectra=job.resumed,
        seconds=time.perf_counter() - t0,
        extra=dict(job.timings),
    )


# ---- the block work (here or in a Dask worker) -------------------------------------------------

_SCORERS: dict[EngineSpec, Any] = {}
BLOCK_OUTPUTS = ("logit", "z_net", "z_net_err", "p_qso_std", "z_net_prob")  # the columns of a saved block, in order
REFINE_BLOCK = 4096  # positives read and fitted at a time: memory bounded by the block


def _score_block(spec: EngineSpec, store: Any, rows: np.ndarray, out_file: Path, batch_size: int, scorer: Any) -> int:
    """Score one block of rows and save its outputs atomically (logit; z_net, z_net_err with a z head)."""
    got = score_rows(scorer, store, rows, batch_size, spec.in_channels)
    nan = np.full(rows.shape[0], np.nan, np.float32)
    block = np.stack([got.get(k, nan) for k in BLOCK_OUTPUTS], axis=1)
    with atomic_path(out_file) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, block)
    return int(rows.shape[0])


def _score_block_in_worker(spec: EngineSpec, store_path: str, rows: np.ndarray, out_file: str, batch_size: int) -> int:
    """``_score_block`` on a Dask worker: the scorer is built once per worker process."""
    scorer = _SCORERS.get(spec)
    if scorer is None:
        _SCORERS.clear()
        scorer = _SCORERS[spec] = build_scorer(spec)
    return _score_block(spec, open_store(store_path), rows, Path(out_file), batch_size, scorer)


# ---- resumable parts ---------------------------------------------------------------------------


def _prepare_parts(parts: Path, identity: dict[str, Any]) -> bool:
    """Reuse finished blocks only when they were scored by the same model on the same rows.

    Returns True when earlier blocks are kept (a resume)."""
    manifest = parts / "manifest.json"
    if parts.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if old == identity:
            for stale in parts.glob(".*.tmp"):  # half-written files of a killed run
                stale.unlink(missing_ok=True)
            return True
        log.info("discarding partial results in %s (different model, store or settings)", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(identity, sort_keys=True))
    return False
