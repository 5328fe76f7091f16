"""Honest evaluation of quasar classifiers: metrics with intervals, calibration, breakdowns.

The paper reports one confusion matrix at threshold 0.5. This module adds what a user needs
to trust (or distrust) a run: bootstrap confidence intervals, a threshold chosen on the
validation split, temperature scaling, purity/completeness in bins of redshift, S/N and
magnitude, the lists of false positives/negatives, paired tests between runs scored on the
same rows, and precision/recall corrected by visual-inspection verdicts.

The metric functions work on plain arrays (labels 0/1, probabilities) and are vectorised so
that 1000 bootstrap resamples of 100k spectra take seconds; ``evaluate_runs`` ties them to a
store and run folders and writes ``metrics.json``, per-run ``predictions.parquet`` and the
HTML report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from spectransfer.errors import EvaluateError
from spectransfer.provenance import atomic_path, dependency_versions, write_text_atomic

log = logging.getLogger(__name__)

CONFUSION_LAYOUT = (
    "rows = true class [QSO, Other], columns = predicted class [QSO, Other], "
    "i.e. [[TP, FN], [FP, TN]] (the paper's layout); predicted QSO means probability >= threshold"
)
ECE_BINS = 15
ECE_DEFINITION = (
    "expected calibration error of P(QSO): sum over 15 equal-width probability bins of "
    "(bin count / n) * |fraction of QSOs in bin - mean predicted P(QSO) in bin|"
)
VERDICT_RULE = (
    "latest verdict per (spectrum, inspector); a spectrum is a visually confirmed quasar when it "
    "has more 'qso' than 'not_qso' verdicts ('unsure' does not count); confirmed quasars count as "
    "positives in addition to the catalogue's (a false positive confirmed by eye becomes a true "
    "positive, as in the paper's 99.6%/98.9%); catalogue labels are never demoted"
)
ID_COLUMNS = ("survey", "plate", "mjd", "fiberid", "obsid", "lmjd", "planid", "spid", "object_id", "ra", "dec")
_CHUNK_ELEMENTS = 4_000_000  # resample-matrix elements per chunk (bounds memory at ~100 MB)


# ---- plain metrics on arrays -----------------------------------------------------------------


def _as_labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise EvaluateError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise EvaluateError("labels must be 0 (Other) or 1 (QSO)")
    return y.astype(bool)


def _as_scores(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise EvaluateError(f"scores must have shape ({n},), got {s.shape}")
    if not np.isfinite(s).all():
        raise EvaluateError("scores contain NaN or infinite values")
    return s


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def confusion_matrix(labels: Any, probabilities: Any, threshold: float = 0.5) -> np.ndarray:
    """2x2 counts in the paper's layout: [[TP, FN], [FP, TN]] (rows true QSO/Other)."""
    y = _as_labels(labels)
    pred = _as_scores(probabilities, y.size) >= threshold
    tp = int(np.count_nonzero(y & pred))
    fn = int(np.count_nonzero(y & ~pred))
    fp = int(np.count_nonzero(~y & pred))
    tn = int(np.count_nonzero(~y & ~pred))
    return np.array([[tp, fn], [fp, tn]], dtype=np.int64)


def threshold_metrics(labels: Any, probabilities: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Confusion matrix, precision, recall, F1 and accuracy at one threshold (None = undefined)."""
    cm = confusion_matrix(labels, probabilities, threshold)
    (tp, fn), (fp, tn) = cm.tolist()
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "threshold": float(threshold),
        "confusion_matrix": cm.tolist(),
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "tn": tn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    }


def _grouped(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort ascending by score; return (order, group starts of tied scores, sorted labels)."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts, labels[order]


def _ranking_from_groups(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision from per-threshold positive/negative weights.

    ``pos``/``neg`` have shape (B, G): the (resampled) weight of positives and negatives at
    each distinct score, in ascending score order. AUC is the Mann-Whitney statistic with ties
    counted half (equal to the trapezoidal ROC area); AP is sum_n (R_n - R_{n-1}) P_n over
    thresholds in descending order, as scikit-learn defines it.
    """
    cp = np.cumsum(pos, axis=1)
    cn = np.cumsum(neg, axis=1)
    P = cp[:, -1].copy()
    N = cn[:, -1].copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        # Negatives strictly below each positive's score, ties counted half.
        auc = np.einsum("ij,ij->i", pos, cn - 0.5 * neg) / (P * N)
        # Called positive at threshold s_k: every row with score >= s_k.
        tp = P[:, None] - cp + pos
        called = tp + (N[:, None] - cn + neg)
        # Groups without positives add nothing (and may have called == 0 under resampling).
        ap = np.einsum("ij,ij->i", pos, tp / np.maximum(called, 1e-300)) / P
    auc = np.where((P > 0) & (N > 0), auc, np.nan)
    ap = np.where(P > 0, ap, np.nan)
    return auc, ap


def ranking_metrics(labels: Any, scores: Any) -> dict[str, float | None]:
    """ROC AUC and PR AUC (average precision); None where undefined (one class only)."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    if y.size == 0:
        return {"roc_auc": None, "pr_auc": None}
    order, starts, ys = _grouped(y, s)
    pos = np.add.reduceat(ys.astype(np.float64), starts)[None, :]
    neg = np.add.reduceat((~ys).astype(np.float64), starts)[None, :]
    auc, ap = _ranking_from_groups(pos, neg)
    return {"roc_auc": _finite_or_none(auc[0]), "pr_auc": _finite_or_none(ap[0])}


def roc_curve_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0,0) to (1,1)."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    _, starts, ys = _grouped(y, s)
    pos = np.add.reduceat(ys.astype(np.float64), starts)[::-1]
    neg = np.add.reduceat((~ys).astype(np.float64), starts)[::-1]
    tpr = np.r_[0.0, np.cumsum(pos)] / max(pos.sum(), 1)
    fpr = np.r_[0.0, np.cumsum(neg)] / max(neg.sum(), 1)
    return fpr, tpr


def pr_curve_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, threshold) at every distinct threshold, highest threshold first."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    order, starts, ys = _grouped(y, s)
    thresholds = s[order][starts][::-1]
    pos = np.add.reduceat(ys.astype(np.float64), starts)[::-1]
    neg = np.add.reduceat((~ys).astype(np.float64), starts)[::-1]
    tp = np.cumsum(pos)
    fp = np.cumsum(neg)
    recall = tp / max(pos.sum(), 1)
    precision = tp / (tp + fp)
    return recall, precision, thresholds


def choose_threshold(
    labels: Any,
    probabilities: Any,
    target_precision: float | None = None,
    target_recall: float | None = None,
) -> dict[str, Any]:
    """Pick a threshold on (validation) predictions.

    Default: the threshold with the highest F1. With ``target_precision``: the lowest
    threshold whose precision reaches the target (most recall at that purity). With
    ``target_recall``: the highest threshold whose recall reaches the target.
    Returns {"threshold", "rule", "achieved": metrics on these predictions} or raises
    EvaluateError when the split cannot support the choice.
    """
    if target_precision is not None and target_recall is not None:
        raise EvaluateError("give at most one of --target-precision and --target-recall")
    y = _as_labels(labels)
    p = _as_scores(probabilities, y.size)
    if y.size == 0 or not y.any():
        raise EvaluateError("cannot choose a threshold: the validation split has no quasars")
    recall, precision, thresholds = pr_curve_points(y, p)
    if target_precision is not None:
        if not 0 < target_precision <= 1:
            raise EvaluateError(f"--target-precision must be in (0, 1], got {target_precision}")
        ok = np.flatnonzero(precision >= target_precision)
        if ok.size == 0:
            raise EvaluateError(f"no threshold reaches precision {target_precision} on the validation split")
        i = ok[-1]  # thresholds descend: the last qualifying one is the lowest
        rule = f"lowest threshold with validation precision >= {target_precision}"
    elif target_recall is not None:
        if not 0 < target_recall <= 1:
            raise EvaluateError(f"--target-recall must be in (0, 1], got {target_recall}")
        i = int(np.flatnonzero(recall >= target_recall)[0])
        rule = f"highest threshold with validation recall >= {target_recall}"
    else:
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
        i = int(np.argmax(f1))
        rule = "maximum F1 on the validation split"
    t = float(thresholds[i])
    return {"threshold": t, "rule": rule, "achieved": threshold_metrics(y, p, t)}


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# ---- bootstrap ---------------------------------------------------------------------------------


def _resample_weights(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """(b, n) matrix of how often each row appears in each of b resamples with replacement."""
    idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _chunks(n: int, n_resamples: int) -> Iterable[int]:
    per = max(1, _CHUNK_ELEMENTS // max(n, 1))
    done = 0
    while done < n_resamples:
        b = min(per, n_resamples - done)
        yield b
        done += b


def _stats_under_weights(
    w: np.ndarray, ys: np.ndarray, starts: np.ndarray, preds: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Metrics of every resample; ``w``, ``ys`` and ``preds`` are all in ascending-score order."""
    pos_rows = w * ys
    if starts.size == ys.size:  # no tied scores: every row is its own threshold group
        pos, neg = pos_rows, w - pos_rows
    else:
        pos = np.add.reduceat(pos_rows, starts, axis=1)
        neg = np.add.reduceat(w, starts, axis=1) - pos
    auc, ap = _ranking_from_groups(pos, neg)
    out: dict[str, np.ndarray] = {"roc_auc": auc, "pr_auc": ap}
    for k, pred in enumerate(preds):
        tp = w @ (ys & pred).astype(np.float64)
        fp = w @ (~ys & pred).astype(np.float64)
        fn = w @ (ys & ~pred).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"precision@{k}"] = tp / (tp + fp)
            out[f"recall@{k}"] = tp / (tp + fn)
            out[f"f1@{k}"] = 2 * tp / (2 * tp + fp + fn)
    return out


def _interval(values: np.ndarray, confidence: float) -> list[float] | None:
    v = values[np.isfinite(values)]
    if v.size < 2:
        return None
    a = (1 - confidence) / 2
    lo, hi = np.quantile(v, [a, 1 - a])
    return [float(lo), float(hi)]


def bootstrap_intervals(
    labels: Any,
    probabilities: Any,
    thresholds: Sequence[float] = (0.5,),
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict[str, list[float] | None]]:
    """Percentile bootstrap intervals for precision, recall, F1 (per threshold), ROC and PR AUC.

    Rows are resampled with replacement ``n_resamples`` times (vectorised as a matrix of
    per-row multiplicities, in chunks that bound memory). Returns one dict per threshold,
    each {"precision": [lo, hi], "recall": ..., "f1": ..., "roc_auc": ..., "pr_auc": ...};
    None where the statistic is undefined in (almost) every resample.
    """
    y = _as_labels(labels)
    p = _as_scores(probabilities, y.size)
    if y.size == 0 or n_resamples < 2:
        return [dict.fromkeys(("precision", "recall", "f1", "roc_auc", "pr_auc")) for _ in thresholds]
    # Resampling is exchangeable, so the multiplicity matrix can be drawn directly in the
    # ascending-score order of the rows: no per-resample sort or gather.
    order, starts, ys = _grouped(y, p)
    ps = p[order]
    preds = [ps >= t for t in thresholds]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {}
    for b in _chunks(y.size, n_resamples):
        w = _resample_weights(rng, y.size, b)
        for k, v in _stats_under_weights(w, ys, starts, preds).items():
            parts.setdefault(k, []).append(v)
    stats = {k: np.concatenate(v) for k, v in parts.items()}
    out = []
    for k in range(len(thresholds)):
        out.append(
            {
                "precision": _interval(stats[f"precision@{k}"], confidence),
                "recall": _interval(stats[f"recall@{k}"], confidence),
                "f1": _interval(stats[f"f1@{k}"], confidence),
                "roc_auc": _interval(stats["roc_auc"], confidence),
                "pr_auc": _interval(stats["pr_auc"], confidence),
            }
        )
    return out


# ---- paired comparison --------------------------------------------------------------------------


def mcnemar_test(labels: Any, pred_a: Any, pred_b: Any) -> dict[str, Any]:
    """McNemar's test on the rows where exactly one of two classifiers is right.

    b = A right and B wrong, c = A wrong and B right. The exact p-value is the two-sided
    binomial test of b out of b + c at 1/2; the chi-square version uses the continuity
    correction (|b - c| - 1)^2 / (b + c) with one degree of freedom.
    """
    from scipy import stats

    y = _as_labels(labels)
    a = np.asarray(pred_a, dtype=bool)
    bb = np.asarray(pred_b, dtype=bool)
    if a.shape != y.shape or bb.shape != y.shape:
        raise EvaluateError("McNemar: predictions and labels differ in length")
    a_ok = a == y
    b_ok = bb == y
    b = int(np.count_nonzero(a_ok & ~b_ok))
    c = int(np.count_nonzero(~a_ok & b_ok))
    n = b + c
    if n == 0:
        return {"b_a_right_b_wrong": b, "c_a_wrong_b_right": c, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    p_exact = float(stats.binomtest(b, n, 0.5, alternative="two-sided").pvalue)
    chi2 = (abs(b - c) - 1) ** 2 / n
    return {
        "b_a_right_b_wrong": b,
        "c_a_wrong_b_right": c,
        "p_exact": min(1.0, p_exact),
        "chi2": float(chi2),
        "p_chi2": float(stats.chi2.sf(chi2, 1)),
    }


def paired_bootstrap(
    labels: Any,
    prob_a: Any,
    prob_b: Any,
    threshold_a: float = 0.5,
    threshold_b: float = 0.5,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Bootstrap of ΔF1 = F1(A) - F1(B) and ΔPR-AUC on the same resampled rows for both runs.

    Returns for each delta the observed value, the percentile interval and a two-sided
    bootstrap p-value (twice the smaller tail mass on either side of zero).
    """
    y = _as_labels(labels)
    pa = _as_scores(prob_a, y.size)
    pb = _as_scores(prob_b, y.size)
    if y.size == 0:
        raise EvaluateError("paired bootstrap on an empty split")
    order_a, starts_a, ys_a = _grouped(y, pa)
    order_b, starts_b, ys_b = _grouped(y, pb)
    preda, predb = pa[order_a] >= threshold_a, pb[order_b] >= threshold_b
    # w is drawn in A's score order; the same multiplicities seen in B's order:
    inv_a = np.empty_like(order_a)
    inv_a[order_a] = np.arange(order_a.size)
    a_to_b = inv_a[order_b]
    rng = np.random.default_rng(seed)
    d_f1: list[np.ndarray] = []
    d_ap: list[np.ndarray] = []
    for b in _chunks(y.size, n_resamples):
        w = _resample_weights(rng, y.size, b)
        sa = _stats_under_weights(w, ys_a, starts_a, [preda])
        sb = _stats_under_weights(w[:, a_to_b], ys_b, starts_b, [predb])
        d_f1.append(sa["f1@0"] - sb["f1@0"])
        d_ap.append(sa["pr_auc"] - sb["pr_auc"])
    if not d_f1:  # no resamples asked for: observed deltas only
        d_f1, d_ap = [np.zeros(0)], [np.zeros(0)]
    observed_f1 = _diff(threshold_metrics(y, pa, threshold_a)["f1"], threshold_metrics(y, pb, threshold_b)["f1"])
    observed_ap = _diff(ranking_metrics(y, pa)["pr_auc"], ranking_metrics(y, pb)["pr_auc"])
    return {
        "delta_f1": _delta_summary(observed_f1, np.concatenate(d_f1), confidence),
        "delta_pr_auc": _delta_summary(observed_ap, np.concatenate(d_ap), confidence),
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _delta_summary(observed: float | None, deltas: np.ndarray, confidence: float) -> dict[str, Any]:
    d = deltas[np.isfinite(deltas)]
    p = None
    if d.size:
        p = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
    return {"observed": observed, "interval": _interval(d, confidence), "p_bootstrap": p}


# ---- calibration ----------------------------------------------------------------------------


def sigmoid(x: Any) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def nll(labels: Any, logits: Any, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / temperature)."""
    y = _as_labels(labels).astype(np.float64)
    z = _as_scores(logits, y.size) / temperature
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(labels: Any, logits: Any) -> float:
    """Temperature T > 0 minimising the NLL of sigmoid(logit / T) (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar

    y = _as_labels(labels)
    z = _as_scores(logits, y.size)
    if y.size == 0 or y.all() or not y.any():
        raise EvaluateError("cannot fit a temperature: the validation split needs both classes")
    res = minimize_scalar(lambda lt: nll(y, z, math.exp(lt)), bounds=(-6.0, 6.0), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))


def reliability(labels: Any, probabilities: Any, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Equal-width bins of P(QSO): counts, mean probability and fraction of QSOs; plus ECE."""
    y = _as_labels(labels).astype(np.float64)
    p = _as_scores(probabilities, y.size)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = sum_p / count
        frac = sum_y / count
    ece = float(np.nansum(count / max(y.size, 1) * np.abs(frac - mean_p))) if y.size else None
    return {
        "n_bins": n_bins,
        "count": count.astype(int).tolist(),
        "mean_probability": [_finite_or_none(v) for v in mean_p],
        "fraction_qso": [_finite_or_none(v) for v in frac],
        "ece": ece,
    }


def expected_calibration_error(labels: Any, probabilities: Any, n_bins: int = ECE_BINS) -> float | None:
    """ECE over ``n_bins`` equal-width bins of P(QSO) (see ECE_DEFINITION)."""
    return reliability(labels, probabilities, n_bins)["ece"]


# ---- breakdowns -----------------------------------------------------------------------------

Z_EDGES = (-np.inf, 0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, np.inf)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval for a binomial proportion k/n."""
    from scipy import stats

    if n == 0:
        return None
    zq = stats.norm.ppf(0.5 + confidence / 2)
    p = k / n
    den = 1 + zq**2 / n
    centre = (p + zq**2 / (2 * n)) / den
    half = zq * math.sqrt(p * (1 - p) / n + zq**2 / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _bin_label(lo: float, hi: float, fmt: str) -> str:
    if not np.isfinite(lo):
        return f"< {hi:{fmt}}"
    if not np.isfinite(hi):
        return f">= {lo:{fmt}}"
    return f"{lo:{fmt}}-{hi:{fmt}}"


def breakdown(
    labels: Any, probabilities: Any, values: Any, edges: Sequence[float], threshold: float = 0.5, fmt: str = ".2f"
) -> list[dict[str, Any]]:
    """Purity (precision) and completeness (recall) in bins of ``values`` (NaN rows skipped).

    Bins are [edges[i], edges[i+1]); the last one also holds values equal to its upper edge.
    """
    y = _as_labels(labels)
    p = _as_scores(probabilities, y.size)
    v = np.asarray(values, dtype=np.float64)
    pred = p >= threshold
    rows = []
    edges = list(edges)
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        last = i == len(edges) - 2
        sel = (v >= lo) & ((v <= hi) if last else (v < hi))
        n = int(np.count_nonzero(sel))
        if n == 0:
            continue
        tp = int(np.count_nonzero(sel & y & pred))
        fp = int(np.count_nonzero(sel & ~y & pred))
        fn = int(np.count_nonzero(sel & y & ~pred))
        rows.append(
            {
                "bin": _bin_label(lo, hi, fmt),
                "lo": _finite_or_none(lo),
                "hi": _finite_or_none(hi),
                "n": n,
                "n_qso": tp + fn,
                "n_predicted_qso": tp + fp,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "purity": _ratio(tp, tp + fp),
                "purity_interval": wilson_interval(tp, tp + fp),
                "completeness": _ratio(tp, tp + fn),
                "completeness_interval": wilson_interval(tp, tp + fn),
            }
        )
    return rows


def breakdown_variables(meta: pd.DataFrame) -> dict[str, tuple[np.ndarray, list[float], str, str]]:
    """The variables to break metrics down by, with their bin edges, as the store has them.

    redshift: the catalogue redshift where known, else the pipeline z (false positives have no
    catalogue z); fixed edges. snr and mag: quintiles of the evaluated rows.
    Returns {name: (values, edges, description, format)}.
    """
    out: dict[str, tuple[np.ndarray, list[float], str, str]] = {}
    z = _column(meta, "catalog_z")
    zp = _column(meta, "z")
    if z is not None or zp is not None:
        zz = z if z is not None else np.full(len(meta), np.nan)
        if zp is not None:
            zz = np.where(np.isfinite(zz), zz, zp)
        if np.isfinite(zz).any():
            out["redshift"] = (zz, list(Z_EDGES), "catalogue z where known, else pipeline z", ".1f")
    for name, desc, fmt in (("snr", "median S/N per pixel (quintiles)", ".1f"), ("mag", "magnitude (quintiles)", ".2f")):
        v = _column(meta, name)
        if v is None or np.count_nonzero(np.isfinite(v)) < 2:
            continue
        edges = np.unique(np.quantile(v[np.isfinite(v)], np.linspace(0, 1, 6)))
        if edges.size < 2:
            continue
        out[name] = (v, edges.tolist(), desc, fmt)
    return out


def _column(meta: pd.DataFrame, name: str) -> np.ndarray | None:
    if name not in meta.columns:
        return None
    v = pd.to_numeric(meta[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return v if np.isfinite(v).any() else None


# ---- visual-inspection verdicts ---------------------------------------------------------------


def read_verdicts(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Per-spectrum verdict summary from the inspection SQLite file (see VERDICT_RULE).

    Returns a DataFrame indexed by spectrum_id with columns n_qso, n_not_qso, n_unsure,
    confirmed_qso (bool), rejected (bool: more not_qso than qso), verdict_z (latest z given).
    """
    p = Path(path)
    if not p.is_file():
        raise EvaluateError(f"{p}: verdicts file not found")
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            df = pd.read_sql_query("SELECT spectrum_id, verdict, z, inspector, created_at FROM verdicts", con)
        finally:
            con.close()
    except (sqlite3.Error, pd.errors.DatabaseError) as exc:
        raise EvaluateError(f"{p}: not a verdicts database ({exc})") from None
    bad = ~df["verdict"].isin(["qso", "not_qso", "unsure"])
    if bad.any():
        log.warning("%s: ignoring %d verdicts outside qso/not_qso/unsure", p, int(bad.sum()))
        df = df[~bad]
    df = df.sort_values("created_at").drop_duplicates(["spectrum_id", "inspector"], keep="last")
    counts = pd.crosstab(df["spectrum_id"], df["verdict"]).reindex(columns=["qso", "not_qso", "unsure"], fill_value=0)
    counts.columns = ["n_qso", "n_not_qso", "n_unsure"]
    counts["confirmed_qso"] = counts["n_qso"] > counts["n_not_qso"]
    counts["rejected"] = counts["n_not_qso"] > counts["n_qso"]
    zlast = df.dropna(subset=["z"]).groupby("spectrum_id")["z"].last()
    counts["verdict_z"] = zlast.reindex(counts.index)
    return counts


def verdict_corrected(
    spectrum_ids: Sequence[str], labels: Any, probabilities: Any, thresholds: Sequence[float], verdicts: pd.DataFrame
) -> dict[str, Any]:
    """Precision/recall with visually confirmed quasars counted as positives (see VERDICT_RULE)."""
    y = _as_labels(labels)
    p = _as_scores(probabilities, y.size)
    ids = pd.Index(np.asarray(spectrum_ids, dtype=object))
    v = verdicts.reindex(ids)
    confirmed = v["confirmed_qso"].fillna(False).to_numpy(dtype=bool)
    rejected = v["rejected"].fillna(False).to_numpy(dtype=bool)
    inspected = v["n_qso"].notna().to_numpy()
    y2 = y | confirmed
    out: dict[str, Any] = {
        "rule": VERDICT_RULE,
        "n_inspected": int(inspected.sum()),
        "n_confirmed_qso": int(confirmed.sum()),
        "n_promoted_to_qso": int((confirmed & ~y).sum()),
        "n_catalog_qso_called_not_qso": int((rejected & y).sum()),
        "at": [],
    }
    for t in thresholds:
        pred = p >= t
        fp_ids = ~y & pred
        cat = threshold_metrics(y, p, t)
        cor = threshold_metrics(y2, p, t)
        out["at"].append(
            {
                "threshold": float(t),
                "false_positives_inspected": int((fp_ids & inspected).sum()),
                "false_positives_confirmed_qso": int((fp_ids & confirmed).sum()),
                "catalogue": {k: cat[k] for k in ("confusion_matrix", "precision", "recall", "f1")},
                "verdict_corrected": {k: cor[k] for k in ("confusion_matrix", "precision", "recall", "f1")},
            }
        )
    return out


# ---- runs on a store ------------------------------------------------------------------------


@dataclass
class RunScores:
    """Scores of one run on the evaluated split (and the validation split when available)."""

    name: str
    run_dir: Path
    logits: np.ndarray
    val_logits: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name beside ``path``, then rename."""
    write_text_atomic(path, text)


def _atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_calibration(run_dir: Path, temperature: float, meta: dict[str, Any] | None = None) -> None:
    """Write RUN/calibration.json {"temperature": T, ...} atomically (read by models.load_run)."""
    doc = {"temperature": float(temperature)}
    doc.update(meta or {})
    atomic_write_text(Path(run_dir) / "calibration.json", json.dumps(doc, indent=2) + "\n")


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


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Distinct display names for run folders (folder name, parent prefixed on collisions)."""
    names = [Path(r).resolve().name for r in run_dirs]
    out = []
    for r, n in zip(run_dirs, names):
        if names.count(n) > 1:
            rr = Path(r).resolve()
            n = f"{rr.parent.name}/{rr.name}"
        while n in out:
            n = n + "'"
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
    write_calibration_files: bool = True,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics, intervals, calibration, breakdowns, error lists and comparisons for scored runs.

    ``meta`` holds the evaluated rows (with ``label`` and ``spectrum_id``), each run's
    ``logits`` are aligned to it. Writes REPORT_DIR/<run>/predictions.parquet and
    false_positives.csv / false_negatives.csv, and returns the metrics document (the caller
    writes metrics.json and the report).
    """
    if len(meta) == 0:
        raise EvaluateError(f"the {split} split is empty: nothing to evaluate")
    y = _as_labels(meta["label"].to_numpy())
    doc_warnings: list[str] = []
    if not y.any() or y.all():
        only = "QSO" if y.all() else "Other"
        msg = f"the {split} split holds one class only ({only}): ROC AUC and PR AUC are undefined (null)"
        if not y.any():
            msg = f"the {split} split holds one class only ({only}): precision, recall, F1, ROC AUC and PR AUC are undefined (null)"
        log.warning(msg)
        doc_warnings.append(msg)
    breakdown_vars = breakdown_variables(meta)
    doc: dict[str, Any] = {
        "format": "spectransfer-metrics",
        "format_version": 1,
        "versions": dependency_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
    id_cols = ["spectrum_id"] + [c for c in ID_COLUMNS if c in meta.columns]
    extra_cols = [c for c in ("row", "pipeline_class", "z", "catalog_z", "snr", "mag") if c in meta.columns]
    chosen: dict[str, float] = {}
    probs: dict[str, np.ndarray] = {}
    for r in runs:
        entry, p, t_sel = _evaluate_one(
            r, y, meta, val_labels, breakdown_vars, target_precision, target_recall, n_resamples, confidence, seed,
            verdicts, write_calibration_files, split,
        )
        probs[r.name] = p
        chosen[r.name] = t_sel
        run_out = Path(out_dir) / _safe_name(r.name)
        preds = meta[id_cols].copy()
        preds["label"] = y.astype(np.int8)
        preds["probability"] = p.astype(np.float32)
        preds["logit"] = r.logits.astype(np.float32)
        T = entry["calibration"]["temperature"]
        if T is not None:
            preds["probability_calibrated"] = sigmoid(r.logits / T).astype(np.float32)
        preds["split"] = split
        for c in extra_cols:
            preds[c] = meta[c].to_numpy()
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
            comp["paired_bootstrap"] = paired_bootstrap(
                y, probs[a], probs[b], 0.5, 0.5, n_resamples=n_resamples, confidence=confidence, seed=seed
            ) if y.any() else None
            doc["comparisons"].append(comp)
    return _json_clean(doc)


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
    write_calibration_files: bool,
    split: str,
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
    entry.update({k: at05[k] for k in ("threshold", "confusion_matrix", "tp", "fn", "fp", "tn", "precision", "recall", "f1", "accuracy")})
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
        if write_calibration_files:
            write_calibration(r.run_dir, T, {"fitted_on": "val", "n_val": int(vy.size) if vy is not None else 0})
    else:
        cal.update({"ece_after": None, "nll_after": None, "reliability_after": None})
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
        raise EvaluateError(
            f"{run_dir}: run was trained on grid {grid.to_dict()} but the store uses {store.grid.to_dict()}"
        )
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
) -> dict[str, Any]:
    """Score every run on ``split`` of the store and write metrics.json, predictions and report.html."""
    from spectransfer.progress import progress_bar
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
    from spectransfer.ml.score import score_store

    scored: list[RunScores] = []
    total = len(run_dirs) * (rows.size + val_rows.size)
    with progress_bar("scoring", total=total, quiet=quiet) as bar:
        for name, r, info in zip(names, run_dirs, infos):
            logits = _score(score_store, r, store, rows, batch_size, engine)
            bar.advance(rows.size)
            vlogits = _score(score_store, r, store, val_rows, batch_size, engine) if val_rows.size else None
            bar.advance(val_rows.size)
            scored.append(RunScores(name, Path(r), logits, vlogits, info))
    context = {
        "store": str(store_path),
        "store_id": (store.info or {}).get("store_id") if hasattr(store, "info") else None,
        "survey": survey,
        "n_val_rows": int(val_rows.size),
        "verdicts_file": str(verdicts_path) if verdicts_path is not None else None,
    }
    doc = evaluate_predictions(
        meta, scored, val_labels, out, split=split, target_precision=target_precision, target_recall=target_recall,
        n_resamples=n_resamples, confidence=confidence, seed=seed, verdicts=verdicts, context=context,
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


def _score(score_store: Any, run_dir: Any, store: Any, rows: np.ndarray, batch_size: int, engine: str) -> np.ndarray:
    try:
        logits = score_store(run_dir, store, rows, batch_size=batch_size, engine=engine)
    except EvaluateError:
        raise
    except Exception as exc:
        raise EvaluateError(f"{run_dir}: scoring failed ({type(exc).__name__}: {exc})") from None
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if logits.size != rows.size:
        raise EvaluateError(f"{run_dir}: scoring returned {logits.size} logits for {rows.size} rows")
    if not np.isfinite(logits).all():
        raise EvaluateError(f"{run_dir}: the model produced NaN/inf logits")
    return logits
