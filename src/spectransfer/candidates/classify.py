"""Score spectrum files directly with a trained run: no store, same preparation as ingest.

A user with a handful of SDSS/LAMOST files wants P(QSO) for each without building a store.
The files go through exactly the reading, quality cuts, resampling and normalisation of
``spectransfer.data.ingest`` (``read_checked``, ``grid_records``), then through the one
scorer, then the run's recorded temperature: so a file gets the P(QSO) that ingest +
discover would give it with the same engine. Files that cannot be read or fail a cut are
listed with their reason; the others are still scored. One cut of ingest is off by default
here: ZWARNING != 0 is a doubt about the pipeline's redshift, which decides whether a
spectrum's *label* can train a network, not whether the spectrum can be classified; such
files are scored and flagged (ZWARNING, QUALITY bit 3), ``zwarning_filter=True`` refuses them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectransfer.candidates.decision import QSO_CHI2, check_templates, decide, template_cards
from spectransfer.candidates.redshifts import DEFAULT_REFINE, check_refine, redshift_columns
from spectransfer.candidates.schema import classify_columns, from_meta, header_cards, output_format, quality_bits, write_table
from spectransfer.data.ingest import IngestOptions, _meta_row, find_files, grid_records, read_checked
from spectransfer.errors import EvaluateError
from spectransfer.evaluation.calibration import NO_CALIBRATION_CARDS, Calibration, read_calibration
from spectransfer.evaluation.metrics import calibrated_probability
from spectransfer.ml.dataset import make_input
from spectransfer.ml.score import build_scorer, check_engine, prepare_engine, score_array

log = logging.getLogger(__name__)

CLASSIFY_ENGINES = ("torch", "onnx")  # onnx-int8 needs a store's spectra to set its ranges


@dataclass
class ClassifyResult:
    """The scored table (one row per accepted file), the files not scored and their reasons."""

    table: pd.DataFrame
    failed: list[tuple[str, str]]
    n_files: int
    threshold: float
    engine: str
    calibrated: bool
    out: Path | None = None
    header: list[tuple[str, Any, str]] = field(default_factory=list)


def _read(
    files: Sequence[str],
    grid: Any,
    progress: Any,
    options: IngestOptions | None = None,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Meta rows, normalised flux and ivar on ``grid`` of the files that pass, and the failures."""
    options = options or IngestOptions()
    records: list[dict[str, Any]] = []
    good: list[tuple[dict[str, Any], Any]] = []
    for path in files:
        rec, reason = read_checked(path, options, grid)
        if rec is None:
            records.append({"source_file": path, "status": "rejected", "reason": reason})
        else:
            good.append(({"source_file": path}, rec))
        if progress is not None:
            progress.advance(1)
    flux = ivar = np.zeros((0, grid.n_bins), np.float32)
    rows = []
    if good:
        flux, ivar, snr, good = grid_records(good, records, grid)
        rows = [{**base, **_meta_row(rec, float(snr[i]))} for i, (base, rec) in enumerate(good)]
    failed = [(r["source_file"], str(r["reason"])) for r in records if r.get("status") == "rejected"]
    return pd.DataFrame(rows), np.asarray(flux, np.float32), np.asarray(ivar, np.float32), failed


def classify(
    run_dir: str | Path,
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    threshold: float = 0.5,
    engine: str = "torch",
    batch_size: int = 256,
    threads: int | None = None,
    progress: Any = None,
    refine: str = DEFAULT_REFINE,
    mc_samples: int = 0,
    zwarning_filter: bool = False,
    coverage_filter: bool = True,
    templates: str = "all",
) -> ClassifyResult:
    """P(QSO) for every spectrum file under ``paths`` (files or folders); writes ``out`` if given.

    ``progress`` is an optional object with ``advance(n)``, told of every file read.
    ``templates``: which spectra the template families may decide (``candidates.decision``).
    """
    run_dir = Path(run_dir)
    if not 0.0 < threshold < 1.0:
        raise EvaluateError(f"threshold {threshold} must lie strictly between 0 and 1")
    check_engine(engine)
    check_refine(refine)
    check_templates(templates)
    if engine not in CLASSIFY_ENGINES:
        raise EvaluateError(
            f"--engine {engine}: int8 ranges are set on a store's spectra; classify runs "
            f"{' or '.join(CLASSIFY_ENGINES)} (use discover for onnx-int8)"
        )
    if out is not None:
        output_format(out)
    files, skipped = find_files(paths)  # the one folder walker: what it passes over is reported
    from spectransfer.ml.models import load_run  # torch: once the arguments are known good

    model, info = load_run(run_dir)
    options = IngestOptions(zwarning_filter=zwarning_filter, coverage_filter=coverage_filter)
    meta, flux, ivar, failed = _read(files, info.grid, progress, options)
    failed = [*skipped, *failed]
    for path, reason in failed:
        log.warning("%s: not scored (%s)", path, reason)
    cal = read_calibration(run_dir)
    table = score_spectra(
        run_dir,
        (model, info),
        cal,
        meta,
        flux,
        ivar,
        threshold=threshold,
        engine=engine,
        batch_size=batch_size,
        threads=threads,
        refine=refine,
        mc_samples=mc_samples,
        templates=templates,
    )
    header: dict[str, tuple[Any, str]] = {
        "THRESH": (float(threshold), "P_QSO threshold for IS_QSO"),
        "MODELSHA": (info.sha256, ""),
        "MODEL": (info.model_name, "network"),
        "RUNID": (info.sha256[:16], "run id: sha256 prefix of its weights"),
        "RUN": (run_dir.name, "run folder name"),
        "ENGINE": (engine, "scoring engine"),
        "ZREFINE": (refine, "Z_PRED fit: full, window or none"),
        **template_cards(templates),
        "MCDROP": (int(mc_samples), "MC-dropout passes behind P_QSO_STD (0 = off)"),
        "NFILES": (len(files), "spectrum files given"),
        "NSPEC": (len(table), "spectra scored (one row each)"),
        "NFAILED": (len(failed), "files not scored (unreadable or failing a cut)"),
        "GRIDN": (info.grid.n_bins, "grid bins"),
        "DATE": (datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"), "UTC creation time"),
    }
    for key, value, comment in cal.header_cards() if cal else NO_CALIBRATION_CARDS:
        header[key] = (value, comment)
    cards = header_cards(header)
    res = ClassifyResult(table, failed, len(files), threshold, engine, cal is not None, header=cards)
    if out is not None:
        res.out = write_table(table, cards, out)
    return res


def score_spectra(
    run_dir: Path,
    loaded: tuple[Any, Any],
    cal: Calibration | None,
    meta: pd.DataFrame,
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    threshold: float = 0.5,
    engine: str = "torch",
    batch_size: int = 256,
    threads: int | None = None,
    refine: str = DEFAULT_REFINE,
    mc_samples: int = 0,
    templates: str = "all",
) -> pd.DataFrame:
    """Classify's table for spectra already on the run's grid (``_read``'s meta, flux, ivar):
    the network's calibrated P_QSO, the template decision, the redshift columns.
    ``loaded``: (model, info) of ``models.load_run(run_dir)``; ``cal``: its
    ``read_calibration`` (None: uncalibrated). A call prepares the engine once (an ONNX export
    for onnx): score many spectra in one call rather than a call each."""
    model, info = loaded
    logits = np.zeros(0, np.float32)
    outputs: dict[str, np.ndarray] = {}
    if len(meta):
        with tempfile.TemporaryDirectory() as tmp:
            spec = prepare_engine(
                run_dir,
                engine,
                tmp,
                model=model,
                threads=threads,
                mc_samples=mc_samples,
                temperature=cal.temperature if cal else None,
            )
            x = make_input(flux, ivar if spec.in_channels == 2 else None, spec.in_channels)
            outputs = score_array(build_scorer(spec, model=model), np.ascontiguousarray(x), batch_size)
            logits = outputs["logit"]
    p_qso = calibrated_probability(logits, cal.temperature if cal else None)
    cols = from_meta(meta, classify_columns()) if len(meta) else {}
    surveys = meta["survey"].to_numpy(dtype=object) if len(meta) else None
    decision = decide(p_qso, threshold, flux, ivar, templates, info.grid, survey=surveys)
    outputs[QSO_CHI2] = decision.pop(QSO_CHI2)  # the quasar family's χ² guides the redshift fit
    cols.update({k: pd.Series(v) for k, v in decision.items()})
    cols.update(
        {
            "P_QSO": pd.Series(p_qso),
            "LOGIT": pd.Series(np.asarray(logits, np.float32)),
            "QUALITY": pd.Series(quality_bits(meta)),
        }
    )
    if len(meta):  # the same redshift columns as discover: network z, templates on the positives
        z = redshift_columns(outputs, decision["IS_QSO"], flux, ivar, check_refine(refine), info.grid)
        cols.update({k: pd.Series(v) for k, v in z.items()})
        cols["P_QSO_STD"] = pd.Series(outputs.get("p_qso_std", np.full(len(meta), np.nan)).astype(np.float32))
    return pd.DataFrame({k: cols[k] for k in classify_columns() if k in cols})
