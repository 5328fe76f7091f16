"""Classifier metrics on plain arrays: no files, no stores, no models.

The paper reports one confusion matrix at threshold 0.5. These functions add what a user
needs to trust (or distrust) a run: bootstrap confidence intervals, a threshold chosen on
the validation split, temperature scaling, purity/completeness in bins of redshift, S/N and
magnitude, paired tests between runs scored on the same rows, and precision/recall
corrected by visual-inspection verdicts. Inputs are labels 0/1 and probabilities or logits;
everything is vectorised so that 1000 bootstrap resamples of 100k spectra take seconds.
A metric that is undefined on the given data (PR AUC without positives, precision without
predicted positives) is None, never a number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from spectransfer.errors import EvaluateError
from spectransfer.ml.refine import CATASTROPHIC_KMS, redshift_metrics, velocity_offset_kms

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


def _stats_under_weights(w: np.ndarray, ys: np.ndarray, starts: np.ndarray, preds: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
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
    for i_t in range(len(thresholds)):
        out.append(
            {
                "precision": _interval(stats[f"precision@{i_t}"], confidence),
                "recall": _interval(stats[f"recall@{i_t}"], confidence),
                "f1": _interval(stats[f"f1@{i_t}"], confidence),
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
    """Logistic function in float64, without overflow (the package's one sigmoid)."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def calibrated_probability(logits: Any, temperature: float | None = None) -> np.ndarray:
    """P(QSO) as every output stores it: float32 sigmoid(logit / T), T = 1 when None.

    evaluate's predictions, discover and classify all call this, so one spectrum scored by
    one engine gets the same stored P(QSO) everywhere.
    """
    z = np.asarray(logits, dtype=np.float64)
    if temperature is not None:
        z = z / float(temperature)
    return sigmoid(z).astype(np.float32)


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


def summarise_verdicts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-spectrum verdict summary from verdict rows (see VERDICT_RULE).

    ``rows`` has columns spectrum_id, verdict, z, inspector, created_at (one per verdict, as
    ``VerdictDB.rows()`` gives them). Returns a DataFrame indexed by spectrum_id with columns
    n_qso, n_not_qso, n_unsure, confirmed_qso (bool), rejected (bool: more not_qso than qso),
    verdict_z (latest z given).
    """
    df = rows[rows["verdict"].isin(["qso", "not_qso", "unsure"])]
    if df.empty:
        empty = pd.DataFrame(columns=["n_qso", "n_not_qso", "n_unsure", "confirmed_qso", "rejected", "verdict_z"])
        return empty.rename_axis("spectrum_id")
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


# ---- redshifts -----------------------------------------------------------------------------------

Z_BREAKDOWN_EDGES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 7.0)
# The share of quasars whose redshift the network doubts most, set apart when judging its
# uncertainty (Bayesian SZNet quotes its catastrophic rate after dropping the 10% most uncertain).
FLAGGED_FRACTION = 0.1


def redshift_report(
    z_pred: Any, z_true: Any, snr: Any = None, n_resamples: int = 200, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Redshift accuracy of ``z_pred`` against ``z_true`` (catalogue quasars): catastrophic fraction
    (|Δv| > 3000 km/s), median |Δv| [km/s] and NMAD of Δz/(1+z) (``ml.refine.redshift_metrics``),
    each with a percentile-bootstrap interval, and the same by catalogue z and by S/N quartile."""
    z_pred = np.asarray(z_pred, dtype=np.float64).ravel()
    z_true = np.asarray(z_true, dtype=np.float64).ravel()
    keep = np.isfinite(z_true)
    z_pred, z_true = z_pred[keep], z_true[keep]
    out: dict[str, Any] = dict(redshift_metrics(z_pred, z_true))
    n = z_true.size
    if n >= 2 and n_resamples > 0:
        rng = np.random.default_rng(seed)
        stats = np.array(
            [list(redshift_metrics(z_pred[i], z_true[i]).values())[1:] for i in rng.integers(0, n, size=(n_resamples, n))]
        )
        for k, col in zip(("catastrophic_fraction", "median_abs_dv_kms", "nmad"), stats.T):
            out[f"{k}_interval"] = _interval(col, confidence)
    out["by_z"] = _z_bins(z_pred, z_true, z_true, Z_BREAKDOWN_EDGES, ".1f")
    if snr is not None:
        s = np.asarray(snr, dtype=np.float64).ravel()[keep]
        fin = s[np.isfinite(s)]
        if fin.size >= 8:
            edges = np.unique(np.quantile(fin, [0, 0.25, 0.5, 0.75, 1.0]))
            out["by_snr"] = _z_bins(z_pred, z_true, s, edges, ".1f")
    return out


def _z_bins(
    z_pred: np.ndarray, z_true: np.ndarray, var: np.ndarray, edges: Sequence[float] | np.ndarray, fmt: str
) -> list[dict[str, Any]]:
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = (var >= lo) & ((var < hi) if i < len(edges) - 2 else (var <= hi))
        if sel.any():
            rows.append({"bin": _bin_label(lo, hi, fmt), **redshift_metrics(z_pred[sel], z_true[sel])})
    return rows


def catastrophic(z_pred: Any, z_true: Any) -> np.ndarray:
    """Per pair: |Δv| > 3000 km/s, a NaN prediction counted as catastrophic (as in
    ``ml.refine.redshift_metrics``)."""
    dv = np.abs(velocity_offset_kms(z_pred, z_true))
    return ~(np.nan_to_num(dv, nan=np.inf) <= CATASTROPHIC_KMS)


def flagged_catastrophic(
    z_pred: Any,
    z_true: Any,
    score: Any,
    lowest: bool = True,
    fraction: float = FLAGGED_FRACTION,
    n_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Does a per-quasar score single out the catastrophic redshifts? The ceil(fraction·n)
    quasars with the lowest ``score`` (a probability of being right; ``lowest=False``: the
    highest, a predicted error) are flagged: catastrophic fraction of the flagged and of the
    rest, and the flagged share of all catastrophic ones, with percentile-bootstrap intervals
    (the flagged set chosen again in every resample). A NaN score ranks as most doubtful;
    pairs without a finite ``z_true`` are left out. None without any pair."""
    z_true = np.asarray(z_true, dtype=np.float64).ravel()
    keep = np.isfinite(z_true)
    cat = catastrophic(np.asarray(z_pred, dtype=np.float64).ravel()[keep], z_true[keep])
    s = np.asarray(score, dtype=np.float64).ravel()[keep]
    n = cat.size
    if n == 0:
        return None
    doubt = np.nan_to_num(-s if lowest else s, nan=np.inf)
    k = min(n, max(1, int(np.ceil(round(fraction * n, 9)))))
    order = np.argsort(-doubt, kind="stable")  # most doubtful first
    flagged, rest, share = _flag_stats(cat[order][None, :], k)
    out: dict[str, Any] = {
        "fraction": fraction,
        "n": n,
        "n_flagged": k,
        "flag_cut": _finite_or_none(float(s[order[k - 1]])),
        "n_catastrophic": int(cat.sum()),
        "catastrophic_flagged": _finite_or_none(flagged[0]),
        "catastrophic_rest": _finite_or_none(rest[0]),
        "share_of_catastrophic": _finite_or_none(share[0]),
    }
    if n >= 2 and n_resamples > 0:
        rng = np.random.default_rng(seed)
        parts = []
        for b in _chunks(n, n_resamples):
            idx = rng.integers(0, n, size=(b, n))
            o = np.argsort(-doubt[idx], axis=1, kind="stable")
            parts.append(np.array(_flag_stats(np.take_along_axis(cat[idx], o, axis=1), k)))
        stats = np.concatenate(parts, axis=1)
        for key, col in zip(("catastrophic_flagged", "catastrophic_rest", "share_of_catastrophic"), stats):
            out[f"{key}_interval"] = _interval(col, confidence)
    return out


def _flag_stats(cat_sorted: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of (b, n) catastrophic flags, most doubtful first: catastrophic fraction of the
    first k, of the others, and the first k's share of all (NaN where undefined)."""
    n = cat_sorted.shape[1]
    cf = cat_sorted[:, :k].sum(axis=1).astype(np.float64)
    cr = cat_sorted[:, k:].sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rest = cr / (n - k) if n > k else np.full(cf.shape, np.nan)
        return cf / k, rest, cf / (cf + cr)
