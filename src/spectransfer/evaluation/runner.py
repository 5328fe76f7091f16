"""Evaluate runs on a store: score the split, compute the metrics, write metrics.json and the report.

The orchestration half of evaluation: open the store and the runs, score the requested
split (and the validation split, for the threshold and temperature choices) with the one
scorer of ``spectransfer.ml.score``, hand the arrays to ``spectransfer.evaluation.metrics``,
and write metrics.json, per-run predictions.parquet, the error lists and report.html.
A run's calibration.json is written only by ``calibrate`` (``evaluation.calibration``),
never as a side effect of evaluating.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectransfer.candidates.redshifts import DEFAULT_REFINE, check_refine, redshift_columns
from spectransfer.errors import EvaluateError
from spectransfer.evaluation.calibration import Calibration, fit_calibration, read_calibration, write_calibration
from spectransfer.evaluation.metrics import (
    CONFUSION_LAYOUT,
    ECE_DEFINITION,
    FLAGGED_FRACTION,
    _as_labels,
    _as_scores,
    bootstrap_intervals,
    breakdown,
    breakdown_variables,
    calibrated_probability,
    choose_threshold,
    fit_temperature,
    flagged_catastrophic,
    mcnemar_test,
    nll,
    paired_bootstrap,
    ranking_metrics,
    redshift_report,
    reliability,
    sigmoid,
    summarise_verdicts,
    threshold_metrics,
    verdict_corrected,
)
from spectransfer.ml.score import EngineSpec, build_scorer, check_engine, prepare_engine, read_arrays, score_rows
from spectransfer.progress import progress_bar
from spectransfer.provenance import atomic_path, dependency_versions, write_text_atomic
from spectransfer.surveys import id_columns

log = logging.getLogger(__name__)


def id_columns_of(meta: pd.DataFrame) -> list[str]:
    """The id columns copied beside each prediction: the survey, every registered survey's own
    ids (from the reader registry), the object id and the position."""
    ids = [c for c, _ in id_columns()]
    return [c for c in ("survey", *ids, "object_id", "ra", "dec") if c in meta.columns]


def read_verdicts(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-spectrum verdict summary of an inspection database, read through ``VerdictDB``."""
    from spectransfer.inspect import InspectError
    from spectransfer.inspect.verdicts import VerdictDB

    try:
        rows = VerdictDB(path, create=False).rows()
    except InspectError as exc:
        raise EvaluateError(str(exc)) from None
    df = pd.DataFrame(rows, columns=["spectrum_id", "verdict", "z", "inspector", "created_at"])
    return summarise_verdicts(df)


@dataclass
class RunScores:
    """Scores of one run on the evaluated split (and the validation split when available)."""

    name: str
    run_dir: Path
    logits: np.ndarray
    val_logits: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    recorded: Calibration | None = None  # the run's calibration.json, applied to ``p_qso``
    z_net: np.ndarray | None = None  # the z head's redshift on the evaluated rows (None: no head)
    z_net_err: np.ndarray | None = None  # its 68% half-width
    z_net_prob: np.ndarray | None = None  # the head's probability that z_net is within 3000 km/s
    z_pred: np.ndarray | None = None  # Z_PRED as discover gives it with this run (catalogue quasars; NaN elsewhere)

    def z_outputs(self) -> dict[str, np.ndarray]:
        """The z head's columns under the scorer's names (empty for a run without one)."""
        named = (("z_net", self.z_net), ("z_net_err", self.z_net_err), ("z_net_prob", self.z_net_prob))
        return {k: v for k, v in named if v is not None}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name beside ``path``, then rename."""
    write_text_atomic(path, text)


def _atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def training_origin(run_dir: Path) -> str:
    """'simulated', 'real', 'mixed' or 'unknown': what the run's training store was built from
    (ingest records it in store.json as ``origin``; the run's config.toml names the store)."""
    try:
        with open(run_dir / "config.toml", "rb") as fh:
            store = tomllib.load(fh).get("store", {})
        if store.get("origin"):
            return str(store["origin"])
        info = json.loads((Path(store["path"]) / "store.json").read_text())
        return str(info.get("origin", "unknown"))
    except (OSError, KeyError, ValueError, TypeError):
        return "unknown"


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Distinct display names for run folders (folder name, parent prefixed on collisions)."""
    names = [Path(r).resolve().name for r in run_dirs]
    out = []
    for r, n in zip(run_dirs, names):
        if names.count(n) > 1:
            rr = Path(r).resolve()
            n = f"{rr.parent.name}/{rr.name}"
        base, k = n, 2
        while n in out:  # the same folder named twice: "run", "run (2)"
            n = f"{base} ({k})"
            k += 1
        out.append(n)
    return out


def evaluate_predictions(
    meta: pd.DataFrame,
    runs: Sequence[RunScores],
    val_labels: np.ndarray | None,
    out_dir: Path,
    *,
    split: str = "test",
    target_precision: float | None = None,
    target_recall: float | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    verdicts: pd.DataFrame | None = None,
    calibrate: bool = False,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics, intervals, calibration, breakdowns, error lists and comparisons for scored runs.

    ``meta`` holds the evaluated rows (with ``label`` and ``spectrum_id``), each run's
    ``logits`` are aligned to it. Writes REPORT_DIR/<run>/predictions.parquet and
    false_positives.csv / false_negatives.csv, and returns the metrics document (the caller
    writes metrics.json and the report). With ``calibrate`` the temperature fitted on the
    validation rows is written to RUN/calibration.json (refused below MIN_SPECTRA); without,
    no run folder is touched. ``context`` (store_id, engine, ...) goes into the document; its
    ``refine`` names the mode that gave each run's ``z_pred``.
    """
    if len(meta) == 0:
        raise EvaluateError(f"the {split} split is empty: nothing to evaluate")
    y = _as_labels(meta["label"].to_numpy())
    doc_warnings: list[str] = []
    if not y.any() or y.all():
        only = "QSO" if y.all() else "Other"
        msg = f"the {split} split holds one class only ({only}): ROC AUC and PR AUC are undefined (null)"
        if not y.any():
            msg = (
                f"the {split} split holds one class only ({only}): precision, recall, F1, ROC AUC and PR AUC are undefined (null)"
            )
        log.warning(msg)
        doc_warnings.append(msg)
    breakdown_vars = breakdown_variables(meta)
    doc: dict[str, Any] = {
        "format": "spectransfer-metrics",
        "format_version": 1,
        "versions": dependency_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "split": split,
        "n_rows": int(y.size),
        "n_qso": int(y.sum()),
        "confusion_matrix_layout": CONFUSION_LAYOUT,
        "ece_definition": ECE_DEFINITION,
        "bootstrap": {"n_resamples": n_resamples, "confidence": confidence, "method": "percentile", "seed": seed},
        "breakdown_threshold": 0.5,
        "warnings": doc_warnings,
        "runs": {},
        "comparisons": [],
    }
    doc.update(context or {})
    id_cols = ["spectrum_id", *id_columns_of(meta)]
    extra_cols = [c for c in ("row", "pipeline_class", "z", "catalog_z", "snr", "mag") if c in meta.columns]
    chosen: dict[str, float] = {}
    probs: dict[str, np.ndarray] = {}
    for r in runs:
        entry, p, t_sel = _evaluate_one(
            r,
            y,
            meta,
            val_labels,
            breakdown_vars,
            target_precision,
            target_recall,
            n_resamples,
            confidence,
            seed,
            verdicts,
            calibrate,
            split,
            context or {},
        )
        probs[r.name] = p
        chosen[r.name] = t_sel
        run_out = Path(out_dir) / _safe_name(r.name)
        preds = meta[id_cols].copy()
        preds["label"] = y.astype(np.int8)
        preds["probability"] = p.astype(np.float32)
        preds["logit"] = r.logits.astype(np.float32)
        # what discover and classify write for this spectrum with the same engine
        preds["p_qso"] = calibrated_probability(r.logits, r.recorded.temperature if r.recorded else None)
        T = entry["calibration"]["temperature"]
        if T is not None:
            preds["probability_calibrated"] = calibrated_probability(r.logits, T)
        preds["split"] = split
        for c in extra_cols:
            preds[c] = meta[c].to_numpy()
        refine = (context or {}).get("refine", DEFAULT_REFINE)
        entry["redshift"] = _redshift_entry(r, y, meta, refine, n_resamples, confidence, seed)
        for k, v in r.z_outputs().items():
            preds[k] = v.astype(np.float64)
        if r.z_pred is not None:
            preds["z_pred"] = r.z_pred
        _atomic_write_parquet(preds, run_out / "predictions.parquet")
        fp = preds[(preds["label"] == 0) & (p >= 0.5)].sort_values("probability", ascending=False)
        fn = preds[(preds["label"] == 1) & (p < 0.5)].sort_values("probability", ascending=True)
        for df, fname in ((fp, "false_positives.csv"), (fn, "false_negatives.csv")):
            atomic_write_text(run_out / fname, df.to_csv(index=False))
        entry["errors"] = {
            "threshold": 0.5,
            "n_false_positives": int(len(fp)),
            "n_false_negatives": int(len(fn)),
            "false_positives_file": f"{_safe_name(r.name)}/false_positives.csv",
            "false_negatives_file": f"{_safe_name(r.name)}/false_negatives.csv",
            "top_false_positives": _top(fp),
            "top_false_negatives": _top(fn),
        }
        entry["predictions_file"] = f"{_safe_name(r.name)}/predictions.parquet"
        doc["runs"][r.name] = entry
    names = [r.name for r in runs]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = names[i], names[j]
            comp: dict[str, Any] = {"a": a, "b": b}
            for key, ta, tb in (("threshold_0.5", 0.5, 0.5), ("validation_threshold", chosen[a], chosen[b])):
                comp[key] = {
                    "threshold_a": ta,
                    "threshold_b": tb,
                    "mcnemar": mcnemar_test(y, probs[a] >= ta, probs[b] >= tb),
                }
            comp["paired_bootstrap"] = (
                paired_bootstrap(y, probs[a], probs[b], 0.5, 0.5, n_resamples=n_resamples, confidence=confidence, seed=seed)
                if y.any()
                else None
            )
            doc["comparisons"].append(comp)
    return _json_clean(doc)


def _redshift_entry(
    r: RunScores,
    y: np.ndarray,
    meta: pd.DataFrame,
    refine: str,
    n_resamples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any] | None:
    """Redshift metrics on the catalogue quasars of the split: the network's z (a run with a z
    head), Z_PRED as discover and classify give it with this run (``refine``: the DR16Q
    templates in a window around the network's z, or over the whole range), and whether the
    head's own doubt points at the catastrophic ones (``uncertainty``)."""
    if "catalog_z" not in meta.columns:
        return None
    z_true = pd.to_numeric(meta["catalog_z"], errors="coerce").to_numpy(dtype=np.float64)
    q = (y == 1) & np.isfinite(z_true)
    if not q.any():
        return None
    snr = meta["snr"].to_numpy(dtype=np.float64)[q] if "snr" in meta.columns else None
    boot = min(n_resamples, 200)
    out: dict[str, Any] = {"n_quasars": int(q.sum()), "catastrophic_kms": 3000.0, "refine": refine}
    out["network"] = redshift_report(r.z_net[q], z_true[q], snr, boot, confidence, seed) if r.z_net is not None else None
    out["templates"] = redshift_report(r.z_pred[q], z_true[q], snr, boot, confidence, seed) if r.z_pred is not None else None
    out["uncertainty"] = _uncertainty_entry(r, q, z_true, boot, confidence, seed)
    return out


def _uncertainty_entry(
    r: RunScores, q: np.ndarray, z_true: np.ndarray, n_resamples: int, confidence: float, seed: int
) -> dict[str, Any] | None:
    """The catastrophic rate of the FLAGGED_FRACTION of quasars the z head doubts most (lowest
    Z_NET_PROB; largest Z_NET_ERR/(1+Z_NET), the predicted error in velocity) against the
    rest, for the network's z and for Z_PRED. None for a run without a z head."""
    if r.z_net is None or r.z_net_prob is None:
        return None
    methods = [(m, z) for m, z in (("network", r.z_net), ("templates", r.z_pred)) if z is not None]

    def flagged(score: np.ndarray, lowest: bool) -> dict[str, Any]:
        return {
            m: flagged_catastrophic(z[q], z_true[q], score, lowest, FLAGGED_FRACTION, n_resamples, confidence, seed)
            for m, z in methods
        }

    out: dict[str, Any] = {"fraction": FLAGGED_FRACTION, "lowest_z_net_prob": flagged(r.z_net_prob[q], True)}
    if r.z_net_err is not None:
        out["largest_z_net_err"] = flagged(r.z_net_err[q] / (1 + r.z_net[q]), False)
    return out


def _top(df: pd.DataFrame, k: int = 20) -> list[dict[str, Any]]:
    cols = [c for c in ("spectrum_id", "probability", "pipeline_class", "z", "catalog_z") if c in df.columns]
    return _json_clean(df[cols].head(k).to_dict(orient="records"))


def _safe_name(name: str) -> str:
    return "".join(c if (c.isalnum() or c in "-_.") else "_" for c in name)


def _evaluate_one(
    r: RunScores,
    y: np.ndarray,
    meta: pd.DataFrame,
    val_labels: np.ndarray | None,
    breakdown_vars: dict[str, tuple[np.ndarray, list[float], str, str]],
    target_precision: float | None,
    target_recall: float | None,
    n_resamples: int,
    confidence: float,
    seed: int,
    verdicts: pd.DataFrame | None,
    calibrate: bool,
    split: str,
    context: dict[str, Any],
) -> tuple[dict[str, Any], np.ndarray, float]:
    z = _as_scores(r.logits, y.size)
    p = sigmoid(z)
    run_warnings: list[str] = []
    entry: dict[str, Any] = {"name": r.name, "run_dir": str(r.run_dir), **r.info, "n": int(y.size), "n_qso": int(y.sum())}
    at05 = threshold_metrics(y, p, 0.5)
    rank = ranking_metrics(y, p)
    # Validation-chosen threshold and temperature.
    t_sel, sel_rule, T = 0.5, "no usable validation split: threshold 0.5", None
    vy = None if val_labels is None else _as_labels(val_labels)
    if vy is None or r.val_logits is None or vy.size == 0:
        run_warnings.append("no validation rows: threshold stays 0.5 and no temperature is fitted")
    else:
        vp = sigmoid(r.val_logits)
        try:
            ch = choose_threshold(vy, vp, target_precision, target_recall)
            t_sel, sel_rule = ch["threshold"], ch["rule"]
        except EvaluateError as exc:
            if target_precision is not None or target_recall is not None:
                raise EvaluateError(f"run {r.name}: {exc}") from None
            run_warnings.append(f"{exc}; threshold stays 0.5")
        try:
            T = fit_temperature(vy, r.val_logits)
        except EvaluateError as exc:
            run_warnings.append(str(exc))
    at_sel = threshold_metrics(y, p, t_sel)
    iv05, ivsel = bootstrap_intervals(y, p, (0.5, t_sel), n_resamples, confidence, seed)
    entry.update(
        {k: at05[k] for k in ("threshold", "confusion_matrix", "tp", "fn", "fp", "tn", "precision", "recall", "f1", "accuracy")}
    )
    entry.update(rank)
    entry["intervals"] = iv05
    entry["thresholds"] = {
        "default": {**at05, **rank, "intervals": iv05},
        "validation": {**at_sel, **rank, "rule": sel_rule, "intervals": ivsel},
    }
    rel_before = reliability(y, p)
    cal: dict[str, Any] = {
        "temperature": T,
        "fitted_on": "val" if T is not None else None,
        "ece_before": rel_before["ece"],
        "nll_before": nll(y, z),
        "reliability_before": rel_before,
    }
    if T is not None:
        pc = sigmoid(z / T)
        rel_after = reliability(y, pc)
        cal.update({"ece_after": rel_after["ece"], "nll_after": nll(y, z, T), "reliability_after": rel_after})
    else:
        cal.update({"ece_after": None, "nll_after": None, "reliability_after": None})
    cal["recorded"] = asdict(r.recorded) if r.recorded else None
    cal["written"] = False
    if calibrate:
        if vy is None or r.val_logits is None:
            raise EvaluateError(f"run {r.name}: cannot calibrate without validation rows")
        fitted, fit = fit_calibration(
            vy.astype(np.int64),
            r.val_logits,
            store_id=context.get("store_id"),
            split="val",
            engine=context.get("engine", "torch"),
        )
        write_calibration(r.run_dir, fitted, {"model_sha256": r.info.get("sha256"), **fit})
        cal["recorded"], cal["written"] = asdict(fitted), True
    entry["calibration"] = cal
    entry["ece"] = cal["ece_before"]
    entry["ece_calibrated"] = cal["ece_after"]
    entry["breakdowns"] = {
        name: {"description": desc, "threshold": 0.5, "bins": breakdown(y, p, vals, edges, 0.5, fmt)}
        for name, (vals, edges, desc, fmt) in breakdown_vars.items()
    }
    if verdicts is not None:
        entry["verdicts"] = verdict_corrected(meta["spectrum_id"].to_numpy(), y, p, (0.5, t_sel), verdicts)
    for key in ("precision", "recall", "f1"):
        if at05[key] is None:
            run_warnings.append(f"{key} at threshold 0.5 is undefined (no predicted or no true quasars)")
    if rank["roc_auc"] is None:
        run_warnings.append(f"ROC AUC is undefined on a one-class {split} split")
    for w in run_warnings:
        log.warning("%s: %s", r.name, w)
    entry["warnings"] = run_warnings
    return entry, p, t_sel


def _split_rows(store: Any, split: str, survey: str | None) -> np.ndarray:
    try:
        return np.asarray(store.rows(survey=survey, split=split), dtype=np.int64)
    except Exception as exc:  # the store's own error names the problem
        raise EvaluateError(f"cannot select the {split} split: {exc}") from None


def _meta_for(store: Any, rows: np.ndarray) -> pd.DataFrame:
    meta = store.meta
    if "row" in meta.columns:
        meta = meta.set_index("row", drop=False)
        return meta.loc[rows].reset_index(drop=True)
    return meta.iloc[rows].reset_index(drop=True)


def check_run_matches_store(run_dir: Path, store: Any) -> dict[str, Any]:
    """Load the run's description and refuse it when its grid differs from the store's."""
    from spectransfer.ml.models import load_run

    try:
        _model, info = load_run(run_dir)
    except EvaluateError:
        raise
    except Exception as exc:
        raise EvaluateError(f"{run_dir}: cannot load run ({exc})") from None
    grid = getattr(info, "grid", None)
    if grid is not None and grid != store.grid:
        raise EvaluateError(f"{run_dir}: run was trained on grid {grid.to_dict()} but the store uses {store.grid.to_dict()}")
    mconf = getattr(info, "model_config", None)
    n_in = getattr(mconf, "n_bins", None)
    if n_in is not None and int(n_in) != store.grid.n_bins:
        raise EvaluateError(f"{run_dir}: model takes {n_in} input bins but the store has {store.grid.n_bins}")
    return {
        "model_name": getattr(info, "model_name", None),
        "sha256": getattr(info, "sha256", None),
        "grid": grid.to_dict() if grid is not None else None,
    }


def evaluate_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    store_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    split: str = "test",
    survey: str | None = None,
    target_precision: float | None = None,
    target_recall: float | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    verdicts_path: str | os.PathLike[str] | None = None,
    learning_curve_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 1024,
    engine: str = "torch",
    gallery: int = 6,
    quiet: bool = False,
    write_report: bool = True,
    calibrate: bool = False,
    refine: str = DEFAULT_REFINE,
) -> dict[str, Any]:
    """Score every run on ``split`` of the store and write metrics.json, predictions and report.html.

    ``engine`` scores every run (named in metrics.json and the report); ``calibrate`` also
    writes each run's calibration.json from its validation scores (see ``evaluate_predictions``).
    ``refine``: the Z_PRED fit judged, as discover's ``--refine`` (default the same as discover's).
    """
    from spectransfer.data.store import open_store

    if not run_dirs:
        raise EvaluateError("give at least one run folder")
    out = Path(out_dir)
    try:
        store = open_store(store_path)
    except EvaluateError:
        raise
    except Exception as exc:
        raise EvaluateError(f"{store_path}: cannot open store ({exc})") from None
    verdicts = read_verdicts(verdicts_path) if verdicts_path is not None else None
    rows = _split_rows(store, split, survey)
    if rows.size == 0:
        where = f" for survey {survey}" if survey else ""
        raise EvaluateError(f"{store_path}: the {split} split{where} is empty")
    val_rows = _split_rows(store, "val", survey) if split != "val" else rows
    meta = _meta_for(store, rows)
    if "label" not in meta.columns or meta["label"].isna().any():
        raise EvaluateError(f"{store_path}: the {split} split has rows without a label")
    val_labels = _meta_for(store, val_rows)["label"].to_numpy() if val_rows.size else None
    names = run_names([Path(r) for r in run_dirs])
    infos = []
    for r in run_dirs:
        if not Path(r).is_dir():
            raise EvaluateError(f"{r}: run folder not found")
        infos.append(check_run_matches_store(Path(r), store))
    check_engine(engine)
    check_refine(refine)
    scored: list[RunScores] = []
    int8: dict[str, Any] | None = None
    total = len(run_dirs) * (rows.size + val_rows.size)
    with progress_bar("scoring", total=total, quiet=quiet) as bar:
        for name, r, info in zip(names, run_dirs, infos):
            (logits, vlogits), zo, spec = _score_run(Path(r), store, [rows, val_rows], batch_size, engine, bar)
            if spec.int8_calibration is not None:
                int8 = spec.int8_calibration.to_dict()
            info = {**info, "engine": engine}
            val = vlogits if val_rows.size else None
            scored.append(RunScores(name, Path(r), logits, val, info, read_calibration(r), **zo))
    guide_free: dict[str, np.ndarray | None] = {}  # the Z_PRED of runs that give no window: the same for all
    for s in scored:
        s.z_pred = _chain_redshifts(store, rows, meta, s, refine, quiet, guide_free)
    context = {
        "engine": engine,
        "store_origin": str((store.info or {}).get("origin", "unknown")) if hasattr(store, "info") else "unknown",
        "trained_on": {name: training_origin(Path(r)) for name, r in zip(names, run_dirs)},
        "int8_calibration": int8,
        "store": str(store_path),
        "store_id": (store.info or {}).get("store_id") if hasattr(store, "info") else None,
        "survey": survey,
        "n_val_rows": int(val_rows.size),
        "refine": refine,
        "verdicts_file": str(verdicts_path) if verdicts_path is not None else None,
    }
    doc = evaluate_predictions(
        meta,
        scored,
        val_labels,
        out,
        split=split,
        target_precision=target_precision,
        target_recall=target_recall,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        verdicts=verdicts,
        context=context,
        calibrate=calibrate,
    )
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
    if write_report:
        from spectransfer.evaluation.report import write_report as _write_report

        lc = None
        if learning_curve_dir is not None:
            lc_path = Path(learning_curve_dir) / "learning_curve.json"
            if not lc_path.is_file():
                raise EvaluateError(f"{lc_path}: learning curve file not found")
            lc = json.loads(lc_path.read_text())
        _write_report(out, doc, store=store, meta=meta, learning_curve=lc, gallery=gallery)
    log.info("wrote %s", out / "metrics.json")
    return doc


Z_OUTPUTS = ("z_net", "z_net_err", "z_net_prob")  # the scorer's z head columns
REFINE_BLOCK = 4096  # quasars read and fitted at a time: memory bounded by the block


def _chain_redshifts(
    store: Any, rows: np.ndarray, meta: pd.DataFrame, run: RunScores, refine: str, quiet: bool, guide_free: dict
) -> np.ndarray | None:
    """Z_PRED of every catalogue quasar among ``rows`` as discover gives it with ``run``: the
    same ``redshift_columns`` on the run's z head outputs with ``refine``; NaN elsewhere, None
    when nothing is fitted. A run without z head (or ``refine`` full) gets the whole-range fit,
    which is the same for every such run and kept in ``guide_free``."""
    if "catalog_z" not in meta.columns or "label" not in meta.columns or refine == "none":
        return None
    z_true = pd.to_numeric(meta["catalog_z"], errors="coerce").to_numpy(dtype=np.float64)
    q = np.flatnonzero((meta["label"].to_numpy() == 1) & np.isfinite(z_true))
    if q.size == 0:
        return None
    outputs = run.z_outputs()
    shared = "z_net" not in outputs or refine == "full"
    if shared and "z_pred" in guide_free:
        return guide_free["z_pred"]
    out = np.full(rows.size, np.nan)
    with progress_bar("redshifts", total=int(q.size), quiet=quiet) as bar:
        for start in range(0, q.size, REFINE_BLOCK):
            idx = q[start : start + REFINE_BLOCK]
            idx = idx[np.argsort(rows[idx])]  # the store is read in row order
            flux, ivar = read_arrays(store.flux, store.ivar, rows[idx])
            part = {k: v[idx] for k, v in outputs.items()}
            cols = redshift_columns(part, np.ones(idx.size, bool), flux, ivar, refine, store.grid)
            out[idx] = cols["Z_PRED"]
            bar.advance(idx.size)
    if shared:
        guide_free["z_pred"] = out
    return out


def _score_run(
    run_dir: Path, store: Any, row_sets: list[np.ndarray], batch_size: int, engine: str, bar: Any
) -> tuple[list[np.ndarray], dict[str, np.ndarray], EngineSpec]:
    """Float64 logits of each row set and the z head's outputs on the first (z_net, z_net_err,
    z_net_prob; empty without a z head), the engine prepared once for the run (one ONNX export)."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = prepare_engine(run_dir, engine, tmp, store=store)
            scorer = build_scorer(spec)
            out = []
            z_out: dict[str, np.ndarray] = {}
            for k, rows in enumerate(row_sets):
                uniq = np.unique(rows)
                got = score_rows(scorer, store, uniq, batch_size, spec.in_channels, progress=bar)
                where = np.searchsorted(uniq, rows)
                out.append(np.asarray(got["logit"], dtype=np.float64)[where])
                if k == 0:
                    z_out = {c: np.asarray(got[c], dtype=np.float64)[where] for c in Z_OUTPUTS if c in got}
    except EvaluateError:
        raise
    except Exception as exc:
        raise EvaluateError(f"{run_dir}: scoring failed ({type(exc).__name__}: {exc})") from None
    for logits, rows in zip(out, row_sets):
        if logits.size != rows.size:
            raise EvaluateError(f"{run_dir}: scoring returned {logits.size} logits for {rows.size} rows")
        if not np.isfinite(logits).all():
            raise EvaluateError(f"{run_dir}: the model produced NaN/inf logits")
    return out, z_out, spec
