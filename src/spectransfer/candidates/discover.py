"""Score every spectrum of a store and write the candidate catalogue (FITS + parquet).

The paper's aim is the quasars the catalogues miss. Every spectrum of the store gets a row
(none dropped: a QUALITY bitmask says what is doubtful), a probability P_QSO and a CATEGORY
comparing the model with the catalogue label. Scoring streams over row blocks, so memory is
bounded by one block; finished blocks are saved under ``OUT.parts/`` so a killed run resumes
where it stopped. With ``workers``/``scheduler`` the blocks are scored by Dask workers.

Engines: ``torch`` (eager fp32), ``onnx`` (onnxruntime fp32) and ``onnx-int8`` (onnxruntime
with int8 weights and activations, statically calibrated on spectra of the store being
scored; about 4x faster than fp32 on AVX2 CPUs, see bench/discover.py for its speed and its
ROC AUC change against fp32).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from spectransfer.errors import EvaluateError, StoreError
from spectransfer.progress import progress_bar
from spectransfer.provenance import atomic_path, provenance_cards

log = logging.getLogger(__name__)

CATEGORIES = ("new_candidate", "missed_by_model", "agree_qso", "agree_other")
ENGINES = ("torch", "onnx", "onnx-int8")
CALIBRATION_SPECTRA = 512  # spectra that set the int8 activation ranges

# QUALITY bits: a row is kept and flagged, never dropped.
QUALITY_BITS = {
    "LOW_SNR": 0,  # median S/N on the grid below LOW_SNR
    "NO_PIPELINE_CLASS": 1,  # the pipeline gave no class (missing, or LAMOST 'Unknown')
    "NO_PIPELINE_Z": 2,  # the pipeline gave no redshift (LAMOST z = -9999 is stored as null)
    "ZWARNING": 3,  # the pipeline's redshift warning flag is set (kept with --no-zwarning-filter)
}
LOW_SNR = 2.0

# meta column -> (FITS column, unit or None); order is the table's order.
_ID_COLUMNS = [
    ("spectrum_id", "SPECTRUM_ID", None),
    ("row", "ROW", None),
    ("survey", "SURVEY", None),
    ("plate", "PLATE", None),
    ("mjd", "MJD", None),
    ("fiberid", "FIBERID", None),
    ("obsid", "OBSID", None),
    ("lmjd", "LMJD", None),
    ("planid", "PLANID", None),
    ("spid", "SPID", None),
    ("ra", "RA", "deg"),
    ("dec", "DEC", "deg"),
    ("pipeline_class", "CLASS", None),
    ("pipeline_subclass", "SUBCLASS", None),
    ("z", "Z", None),
    ("zwarning", "ZWARNING", None),
    ("label", "CAT_LABEL", None),
    ("label_source", "LABEL_SOURCE", None),
    ("catalog_name", "CATALOG_NAME", None),
    ("catalog_z", "CATALOG_Z", None),
    ("snr", "SNR", None),
    ("mag", "MAG", "mag"),
    ("object_id", "OBJECT_ID", None),
    ("split", "SPLIT", None),
    ("source_file", "SOURCE_FILE", None),
]
_F8_COLUMNS = ("RA", "DEC", "Z", "CATALOG_Z")


@dataclass
class DiscoverResult:
    """What `discover` wrote and the counts its summary table shows."""

    fits_path: Path
    parquet_path: Path
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


# ---- categories and quality ------------------------------------------------------------------


def categorise(p_qso: np.ndarray, label: np.ndarray, threshold: float) -> np.ndarray:
    """CATEGORY per spectrum from the model's probability and the catalogue label (1/0).

    Positive means ``p_qso >= threshold``: new_candidate (positive, not in the catalogue),
    missed_by_model (catalogue quasar, negative), agree_qso, agree_other.
    """
    p_qso = np.asarray(p_qso)
    label = np.asarray(label)
    if p_qso.shape != label.shape or p_qso.ndim != 1:
        raise ValueError(f"p_qso and label must be 1-D of equal length, got {p_qso.shape} and {label.shape}")
    pos = p_qso >= threshold
    lab = label.astype(bool)
    out = np.empty(p_qso.shape[0], dtype=object)
    out[pos & ~lab] = "new_candidate"
    out[~pos & lab] = "missed_by_model"
    out[pos & lab] = "agree_qso"
    out[~pos & ~lab] = "agree_other"
    return out


def quality_bits(meta: pd.DataFrame) -> np.ndarray:
    """QUALITY bitmask per row (see QUALITY_BITS); 0 = nothing doubtful."""
    n = len(meta)
    q = np.zeros(n, dtype=np.int32)
    if "snr" in meta:
        snr = pd.to_numeric(meta["snr"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        q |= np.where(~(snr >= LOW_SNR), 1 << QUALITY_BITS["LOW_SNR"], 0).astype(np.int32)
    if "pipeline_class" in meta:
        cls = meta["pipeline_class"].astype("string").str.strip().str.upper()
        missing = (cls.isna() | cls.isin(["", "UNKNOWN"])).to_numpy(dtype=bool)
        q |= np.where(missing, 1 << QUALITY_BITS["NO_PIPELINE_CLASS"], 0).astype(np.int32)
    if "z" in meta:
        z = pd.to_numeric(meta["z"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        q |= np.where(~np.isfinite(z) | (z == -9999.0), 1 << QUALITY_BITS["NO_PIPELINE_Z"], 0).astype(np.int32)
    if "zwarning" in meta:
        zw = pd.to_numeric(meta["zwarning"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
        q |= np.where(zw != 0, 1 << QUALITY_BITS["ZWARNING"], 0).astype(np.int32)
    return q


def pipe_not_qso(p_qso: np.ndarray, pipeline_class: pd.Series, threshold: float) -> np.ndarray:
    """Positives (p >= threshold) that the survey pipeline classes as STAR or GALAXY."""
    cls = pipeline_class.astype("string").str.strip().str.upper().fillna("").to_numpy(dtype=object)
    return (np.asarray(p_qso) >= threshold) & np.isin(cls, ["STAR", "GALAXY"])


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic of float logits, without overflow warnings."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out.astype(np.float32)


# ---- engines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker needs to build the scorer: plain strings, so it pickles for Dask."""

    run_dir: str
    engine: str
    onnx_path: str | None  # prepared ONNX file for the onnx engines
    threads: int
    in_channels: int


def default_threads(workers: int | None) -> int:
    """Intra-op threads per scoring process: the cores shared among the workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers or 1))


def read_block(store: Any, rows: np.ndarray, in_channels: int = 1) -> np.ndarray:
    """Network input (len(rows), in_channels, n_bins) float32 for sorted ``rows``, one read per chunk."""
    return _read_rows(store.flux, store.ivar if in_channels == 2 else None, rows, in_channels)


def _read_rows(flux: Any, ivar: Any, rows: np.ndarray, in_channels: int) -> np.ndarray:
    # ``flux``/``ivar`` are the opened zarr arrays: opening them costs far more than a chunk read.
    from spectransfer.ml.dataset import make_input

    rows = np.asarray(rows, dtype=np.int64)
    chunk = int(flux.chunks[0])
    parts = []
    for c in np.unique(rows // chunk):
        sel = rows[(rows >= c * chunk) & (rows < (c + 1) * chunk)]
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        f = np.asarray(flux[lo:hi])[sel - lo]
        iv = np.asarray(ivar[lo:hi])[sel - lo] if in_channels == 2 else None
        parts.append(make_input(f, iv, in_channels))
    if not parts:
        return np.zeros((0, in_channels, int(flux.shape[1])), np.float32)
    return np.ascontiguousarray(np.concatenate(parts))


def build_scorer(spec: EngineSpec) -> Callable[[np.ndarray], np.ndarray]:
    """A function input (B, C, n_bins) float32 -> (B,) float32 logits for ``spec.engine``."""
    if spec.engine == "torch":
        import torch

        from spectransfer.ml.models import load_run

        torch.set_num_threads(spec.threads)
        model, _info = load_run(spec.run_dir)

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).float().numpy().reshape(-1)

        return run_torch
    if spec.engine in ("onnx", "onnx-int8"):
        from spectransfer.ml.score import onnx_session

        if spec.onnx_path is None or not Path(spec.onnx_path).is_file():
            raise EvaluateError(f"engine {spec.engine}: prepared ONNX file {spec.onnx_path} is missing")
        session = onnx_session(spec.onnx_path, spec.threads)
        name = session.get_inputs()[0].name

        def run_onnx(x: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {name: x})[0], dtype=np.float32).reshape(-1)

        return run_onnx
    raise EvaluateError(f"--engine must be one of {', '.join(ENGINES)}, got {spec.engine!r}")


def calibration_rows(rows: np.ndarray, n: int = CALIBRATION_SPECTRA) -> np.ndarray:
    """``n`` rows spread evenly over ``rows`` (deterministic), to set int8 activation ranges."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size <= n:
        return rows
    return np.unique(rows[np.linspace(0, rows.size - 1, n).round().astype(np.int64)])


def prepare_onnx(run_dir: str | Path, engine: str, target: str | Path, store: Any = None,
                 rows: np.ndarray | None = None, model: Any = None) -> Path:
    """Write the ONNX model ``engine`` runs to ``target`` (fp32 export, or int8 quantised).

    ``onnx-int8`` quantises weights per channel (int8) and activations (uint8, QDQ format)
    with ranges measured on up to CALIBRATION_SPECTRA spectra of ``rows`` of ``store``: the
    survey being scored. The first convolution stays fp32: its input is the spectrum itself,
    and 256 levels of normalised flux wash out the lines (measured: ROC AUC -0.035 with it
    quantised, -0.001 without, on a simulated survey); so does the 1024 -> 1 output layer.
    Both are ~0.2% of the network's multiply-adds.
    """
    from spectransfer.ml.models import load_run
    from spectransfer.ml.score import export_onnx

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, _info = load_run(run_dir)
    if engine == "onnx":
        with atomic_path(target) as tmp:
            export_onnx(model, tmp)
        return target
    if engine != "onnx-int8":
        raise EvaluateError(f"engine {engine!r} has no ONNX model")
    if store is None or rows is None or len(rows) == 0:
        raise EvaluateError("onnx-int8 needs spectra of the store to calibrate the int8 ranges")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = read_block(store, calibration_rows(rows), model.config.in_channels)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"flux": calib[i : i + 64]} for i in range(0, calib.shape[0], 64)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    import onnx

    fp32 = target.with_name(target.stem + ".fp32.onnx")
    pre = target.with_name(target.stem + ".pre.onnx")
    try:
        export_onnx(model, fp32)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        nodes = onnx.load(str(pre)).graph.node
        convs = [n.name for n in nodes if n.op_type == "Conv"]
        dense = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
        with atomic_path(target) as tmp:
            quantize_static(
                str(pre), str(tmp), _Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=convs[:1] + dense[-1:],
            )
    finally:
        fp32.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
    return target


def score_rows(scorer: Callable[[np.ndarray], np.ndarray], store: Any, rows: np.ndarray, batch_size: int,
               in_channels: int = 1, progress: Any = None) -> np.ndarray:
    """float32 logits of sorted ``rows``: read a store chunk span at a time, run in batches."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(rows.size, dtype=np.float32)
    flux = store.flux
    ivar = store.ivar if in_channels == 2 else None
    span = max(batch_size, int(flux.chunks[0]))
    for a in range(0, rows.size, span):
        x = _read_rows(flux, ivar, rows[a : a + span], in_channels)
        for b in range(0, x.shape[0], batch_size):
            out[a + b : a + b + batch_size] = scorer(x[b : b + batch_size])
            if progress is not None:
                progress.advance(min(batch_size, x.shape[0] - b))
    return out


# ---- the block work (here or in a Dask worker) -------------------------------------------------

_SCORERS: dict[EngineSpec, Callable[[np.ndarray], np.ndarray]] = {}


def _score_block(spec: EngineSpec, store_path: str, rows: np.ndarray, out_file: str, batch_size: int) -> int:
    """Score one block of rows and save its logits atomically; the scorer is cached per process."""
    from spectransfer.data.store import open_store

    scorer = _SCORERS.get(spec)
    if scorer is None:
        _SCORERS.clear()
        scorer = _SCORERS[spec] = build_scorer(spec)
    logits = score_rows(scorer, open_store(store_path), rows, batch_size, spec.in_channels)
    with atomic_path(out_file) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, logits)
    return int(rows.shape[0])


# ---- resumable parts ---------------------------------------------------------------------------


def parts_dir(out: Path) -> Path:
    """Folder of finished blocks beside the output (removed once the catalogue is written)."""
    return out.with_name(out.name + ".parts")


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


def _rows_digest(rows: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


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
) -> DiscoverResult:
    """Score every spectrum of ``store_path`` with the run and write ``out`` (.fits) + .parquet.

    ``workers`` > 1 or ``scheduler`` score blocks on Dask workers; otherwise in this process.
    A killed call resumes from the blocks saved under ``OUT.parts/`` when called again with
    the same run, store, engine and block size.
    """
    import time

    t0 = time.perf_counter()
    run_dir, store_path, out = Path(run_dir), Path(store_path), Path(out)
    if out.suffix.lower() not in (".fits", ".fit"):
        raise EvaluateError(f"{out}: the candidate catalogue must end in .fits (a .parquet is written beside it)")
    if not 0.0 < threshold < 1.0:
        raise EvaluateError(f"threshold {threshold} must lie strictly between 0 and 1")
    if engine not in ENGINES:
        raise EvaluateError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if batch_size < 1 or block_size < 1:
        raise EvaluateError("--batch-size and --block-size must be >= 1")
    if workers is not None and workers < 0:
        raise EvaluateError(f"--workers must be >= 0, got {workers}")
    if workers and scheduler:
        raise EvaluateError("give --workers or --scheduler, not both")
    from spectransfer.ml.models import load_run  # torch: imported once the arguments are known good
    from spectransfer.data.store import open_store

    store = open_store(store_path)
    model, info = load_run(run_dir)
    if info.grid != store.grid:
        raise EvaluateError(f"{run_dir}: run was trained on grid {info.grid.to_dict()} but store {store_path} uses {store.grid.to_dict()}")
    meta = store.meta
    if survey is not None:
        meta = meta[meta["survey"] == survey]
    meta = meta.sort_values("row").reset_index(drop=True)
    if len(meta) == 0:
        raise StoreError(f"{store_path}: no spectra to score" + (f" for survey {survey!r}" if survey else ""))
    rows = meta["row"].to_numpy(dtype=np.int64)
    use_dask = bool(scheduler) or (workers is not None and workers > 1)
    threads = int(threads) if threads else default_threads(workers if use_dask and not scheduler else 1)

    identity = {
        "model_sha256": info.sha256,
        "store_id": store.info.get("store_id"),
        "rows_sha256": _rows_digest(rows),
        "n_rows": int(rows.shape[0]),
        "block_size": int(block_size),
        "engine": engine,
    }
    parts = parts_dir(out)
    resumed = _prepare_parts(parts, identity)
    onnx_path = None
    t_prep = time.perf_counter()
    if engine != "torch":
        onnx_path = parts / f"model-{engine}.onnx"
        if not onnx_path.is_file():
            log.info("preparing the %s model", engine)
            prepare_onnx(run_dir, engine, onnx_path, store=store, rows=rows, model=model)
    prepare_s = time.perf_counter() - t_prep
    spec = EngineSpec(str(run_dir.resolve()), engine, str(onnx_path.resolve()) if onnx_path else None, threads,
                      model.config.in_channels)
    del model

    blocks = [rows[i : i + block_size] for i in range(0, rows.shape[0], block_size)]
    part_files = [parts / f"block-{i:06d}.npy" for i in range(len(blocks))]
    todo = [i for i, f in enumerate(part_files) if not f.is_file()]
    done_rows = int(rows.shape[0] - sum(blocks[i].shape[0] for i in todo))
    if resumed and done_rows:
        log.info("resuming: %d of %d spectra already scored in %s", done_rows, rows.shape[0], parts)

    t_score = time.perf_counter()
    with progress_bar("discover", total=rows.shape[0], unit="spectra", quiet=quiet) as bar:
        bar.advance(done_rows)
        if todo and use_dask:
            from dask.distributed import as_completed

            from spectransfer.cluster import dask_client

            with dask_client(workers=workers, scheduler=scheduler) as client:
                futures = [
                    client.submit(_score_block, spec, str(store_path.resolve()), blocks[i], str(part_files[i].resolve()),
                                  batch_size, key=f"discover-{identity['rows_sha256'][:12]}-{i}", pure=False)
                    for i in todo
                ]
                for fut in as_completed(futures):
                    bar.advance(fut.result())
        else:
            for i in todo:
                bar.advance(_score_block(spec, str(store_path), blocks[i], str(part_files[i]), batch_size))

    score_s = time.perf_counter() - t_score
    logits = np.concatenate([np.load(f) for f in part_files])
    if logits.shape[0] != rows.shape[0] or not np.isfinite(logits).all():
        raise EvaluateError(f"{parts}: scored blocks are inconsistent (delete the folder and run again)")
    temperature = info.temperature
    p_qso = sigmoid(logits / temperature if temperature else logits)
    label = meta["label"].fillna(0).to_numpy(dtype=np.int8)
    category = categorise(p_qso, label, threshold)
    flag = pipe_not_qso(p_qso, meta["pipeline_class"], threshold)

    table = candidate_table(meta, logits, p_qso, category, flag, quality_bits(meta))
    header = {
        "THRESH": (float(threshold), "P_QSO threshold for a positive"),
        "TEMPER": (float(temperature) if temperature else 1.0, "temperature dividing the logits (1 = none)"),
        "CALIBR": (bool(temperature), "P_QSO calibrated by temperature scaling"),
        "MODELSHA": (info.sha256, ""),  # 64 hex digits: no room for a comment
        "MODEL": (info.model_name, "network"),
        "RUNMODE": (info.mode, "training mode of the run"),
        "RUN": (run_dir.name, "run folder name"),
        "STOREID": (str(store.info.get("store_id")), "store.json store_id"),
        "STORE": (store_path.name, "store folder name"),
        "SURVEY": (survey or "all", "surveys scored"),
        "NSPEC": (int(rows.shape[0]), "spectra scored (one row each)"),
        "GRIDN": (store.grid.n_bins, "grid bins"),
        "GRIDMIN": (float(store.grid.wave_min), "[Angstrom] grid start"),
        "GRIDMAX": (float(store.grid.wave_max), "[Angstrom] grid end"),
        "GRIDLOG": (True, "grid bins are logarithmically spaced"),
        "ENGINE": (engine, "scoring engine"),
        "DATE": (datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "UTC creation time"),
    }
    fits_path, parquet_path = write_outputs(table, header, out)
    shutil.rmtree(parts, ignore_errors=True)

    counts = {c: int((category == c).sum()) for c in CATEGORIES}
    new = category == "new_candidate"
    cls = meta["pipeline_class"].astype("string").str.strip().str.upper().fillna("").to_numpy(dtype=object)
    by_class = {c: int((new & (cls == c)).sum()) for c in ("STAR", "GALAXY")}
    return DiscoverResult(
        fits_path=fits_path,
        parquet_path=parquet_path,
        n_spectra=int(rows.shape[0]),
        counts=counts,
        n_pipe_not_qso=int(flag.sum()),
        pipe_not_qso_by_class=by_class,
        threshold=threshold,
        engine=engine,
        calibrated=bool(temperature),
        resumed_spectra=done_rows if resumed else 0,
        seconds=time.perf_counter() - t0,
        extra={"prepare_s": prepare_s, "score_s": score_s},
    )


# ---- output ------------------------------------------------------------------------------------


def candidate_table(
    meta: pd.DataFrame,
    logits: np.ndarray,
    p_qso: np.ndarray,
    category: np.ndarray,
    pipe_flag: np.ndarray,
    quality: np.ndarray,
) -> pd.DataFrame:
    """The catalogue as a DataFrame with the FITS column names, in the table's order."""
    cols: dict[str, Any] = {}
    for src, dst, _unit in _ID_COLUMNS:
        if src in meta:
            cols[dst] = meta[src].to_numpy()
    cols["LOGIT"] = np.asarray(logits, dtype=np.float32)
    cols["P_QSO"] = np.asarray(p_qso, dtype=np.float32)
    cols["CATEGORY"] = np.asarray(category).astype(str)
    cols["PIPE_NOT_QSO"] = np.asarray(pipe_flag, dtype=bool)
    cols["QUALITY"] = np.asarray(quality, dtype=np.int32)
    df = pd.DataFrame(cols)
    for src, dst, _unit in _ID_COLUMNS:  # keep the store's nullable dtypes (Int64, string)
        if dst in df and src in meta:
            df[dst] = meta[src].reset_index(drop=True)
    return df


def _fits_column(name: str, values: pd.Series) -> np.ndarray:
    """A FITS-friendly array: strings fixed width ('' = missing), ints -1 = missing, floats NaN."""
    if pd.api.types.is_bool_dtype(values) and not values.isna().any():
        return values.to_numpy(dtype=bool)
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        arr = values.astype("string").fillna("").to_numpy(dtype=object).astype(str)
        return arr.astype(f"S{max(1, max((len(s.encode()) for s in arr), default=1))}") if arr.size else arr.astype("S1")
    if pd.api.types.is_integer_dtype(values):
        if name == "CAT_LABEL":
            return values.fillna(0).to_numpy(dtype=np.int16)
        if name == "QUALITY":
            return values.to_numpy(dtype=np.int32)
        return values.fillna(-1).to_numpy(dtype=np.int64)
    if name in _F8_COLUMNS:
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    return values.to_numpy(dtype=np.float32, na_value=np.nan)


def write_outputs(table: pd.DataFrame, header: dict[str, tuple[Any, str]], out: Path) -> tuple[Path, Path]:
    """Write ``out`` (FITS, EXTNAME CANDIDATES) and ``out`` .parquet, each under a temporary name first."""
    from astropy.io import fits

    units = {dst: unit for _src, dst, unit in _ID_COLUMNS if unit}
    columns = []
    for name in table.columns:
        arr = _fits_column(name, table[name])
        if arr.dtype.kind == "S":
            fmt = f"{arr.dtype.itemsize}A"
        elif arr.dtype == bool:
            fmt = "L"
        else:
            fmt = {np.dtype(np.int16): "I", np.dtype(np.int32): "J", np.dtype(np.int64): "K",
                   np.dtype(np.float32): "E", np.dtype(np.float64): "D"}[arr.dtype]
        null = -1 if fmt == "K" else None
        columns.append(fits.Column(name=name, format=fmt, array=arr, unit=units.get(name), null=null))
    hdu = fits.BinTableHDU.from_columns(columns, name="CANDIDATES")
    for key, (value, comment) in header.items():
        hdu.header[key] = (value, comment)
    for key, value, comment in provenance_cards():
        hdu.header[key] = (value, comment)
    for name, bit in QUALITY_BITS.items():
        hdu.header[f"QBIT{bit}"] = (name, "QUALITY bit meaning")
    hdu.header["CATEGS"] = (",".join(CATEGORIES), "")
    primary = fits.PrimaryHDU()
    for key, value, comment in provenance_cards():
        primary.header[key] = (value, comment)
    with atomic_path(out) as tmp:
        fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True, checksum=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_path = out.with_suffix(".parquet")
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    doc = {k: v[0] for k, v in header.items()}
    doc["provenance"] = {k: v for k, v, _c in provenance_cards()}
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"spectransfer": json.dumps(doc, default=str).encode()})
    with atomic_path(parquet_path) as tmp:
        pq.write_table(arrow, tmp)
    return out, parquet_path
