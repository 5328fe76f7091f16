"""The evaluation report: one self-contained HTML page with every table and plot embedded.

Plots are drawn with matplotlib's Agg backend and embedded as base64 PNG, so the page opens
from a file, offline, with nothing beside it. ``write_report`` reads what ``evaluate`` wrote
(metrics document + per-run predictions.parquet) and the store (for the spectra gallery).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectransfer.candidates.decision import describe
from spectransfer.evaluation.metrics import pr_curve_points, roc_curve_points
from spectransfer.provenance import write_text_atomic

log = logging.getLogger(__name__)

# Rest-frame vacuum wavelengths (Angstrom) of the broad and narrow lines that make a quasar.
QSO_LINES: tuple[tuple[str, float], ...] = (
    ("Lyα", 1215.67),
    ("C IV", 1549.06),
    ("C III]", 1908.73),
    ("Mg II", 2798.75),
    ("Hβ", 4862.68),
    ("[O III]", 5008.24),
    ("Hα", 6564.61),
)
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_MAX_CURVE_POINTS = 4000


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int = 90) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    w = f' style="max-width:{width}px"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"{w}>'


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= _MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.r_[np.linspace(0, x.size - 1, _MAX_CURVE_POINTS).astype(int), x.size - 1])
    return x[keep], y[keep]


# ---- plots ------------------------------------------------------------------------------------


def plot_roc_pr(curves: dict[str, tuple[np.ndarray, np.ndarray]], doc: dict[str, Any]) -> Any:
    """ROC (left) and precision-recall (right) curves of every run, overlaid."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    prevalence = None
    for k, (name, (y, p)) in enumerate(curves.items()):
        color = _COLORS[k % len(_COLORS)]
        entry = doc["runs"][name]
        if y.any() and not y.all():
            fpr, tpr = roc_curve_points(y, p)
            fpr, tpr = _thin(fpr, tpr)
            ax1.plot(fpr, tpr, color=color, lw=1.6, label=f"{name} (AUC {_fmt(entry.get('roc_auc'), 4)})")
        if y.any():
            rec, prec, _ = pr_curve_points(y, p)
            rec, prec = _thin(rec, prec)
            ax2.step(rec, prec, where="post", color=color, lw=1.6, label=f"{name} (AP {_fmt(entry.get('pr_auc'), 4)})")
            prevalence = y.mean()
        for ax, (xk, yk) in ((ax1, ("fpr", "recall")), (ax2, ("recall", "precision"))):
            m = entry
            if m.get("precision") is None or m.get("recall") is None:
                continue
            if xk == "fpr":
                fp, tn = m["fp"], m["tn"]
                xv = fp / (fp + tn) if fp + tn else None
            else:
                xv = m["recall"]
            if xv is not None:
                ax.plot([xv], [m[yk]], "o", color=color, ms=6, mec="k")
    ax1.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate (recall)", title="ROC", xlim=(-0.01, 1), ylim=(0, 1.01))
    if prevalence is not None:
        ax2.axhline(prevalence, ls=":", color="grey", lw=1, label=f"chance ({prevalence:.3f})")
    ax2.set(xlabel="recall (completeness)", ylabel="precision (purity)", title="Precision-recall", xlim=(0, 1.01), ylim=(0, 1.01))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax1 else "lower left", fontsize=8)
    fig.text(0.5, -0.02, "dots: threshold 0.5", ha="center", fontsize=8, color="grey")
    fig.tight_layout()
    return fig


def plot_reliability(doc: dict[str, Any]) -> Any:
    """Reliability diagram per run: observed QSO fraction vs mean P(QSO), before/after scaling."""
    plt = _plt()
    names = list(doc["runs"])
    n = len(names)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.5, 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        cal = doc["runs"][name]["calibration"]
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        for key, label, color, marker in (
            ("reliability_before", f"raw (ECE {_fmt(cal.get('ece_before'), 4)})", "#d62728", "o"),
            ("reliability_after", f"T = {_fmt(cal.get('temperature'), 3)} (ECE {_fmt(cal.get('ece_after'), 4)})", "#1f77b4", "s"),
        ):
            rel = cal.get(key)
            if not rel:
                continue
            mp = np.array([np.nan if v is None else v for v in rel["mean_probability"]], dtype=float)
            fr = np.array([np.nan if v is None else v for v in rel["fraction_qso"]], dtype=float)
            cnt = np.asarray(rel["count"], dtype=float)
            ok = cnt > 0
            ax.plot(mp[ok], fr[ok], marker=marker, color=color, lw=1.3, label=label)
        ax.set(xlabel="mean predicted P(QSO) in bin", ylabel="fraction of QSOs in bin", title=name, xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability (15 equal-width bins; temperature fitted on the validation split)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_breakdown(doc: dict[str, Any], variable: str) -> Any:
    """Purity and completeness per bin of one variable, one line per run, Wilson 95% bars."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    labels: list[str] = []
    for k, (name, entry) in enumerate(doc["runs"].items()):
        bd = entry.get("breakdowns", {}).get(variable)
        if not bd:
            continue
        bins = bd["bins"]
        labels = [b["bin"] for b in bins]
        x = np.arange(len(bins)) + (k - (len(doc["runs"]) - 1) / 2) * 0.08
        for ax, key in zip(axes, ("purity", "completeness")):
            val = np.array([np.nan if b[key] is None else b[key] for b in bins], dtype=float)
            lo = np.array([np.nan if b[key + "_interval"] is None else b[key + "_interval"][0] for b in bins], dtype=float)
            hi = np.array([np.nan if b[key + "_interval"] is None else b[key + "_interval"][1] for b in bins], dtype=float)
            err = np.vstack([np.clip(val - lo, 0, None), np.clip(hi - val, 0, None)])
            ax.errorbar(x, val, yerr=err, marker="o", ms=4, capsize=3, lw=1.3, color=_COLORS[k % len(_COLORS)], label=name)
    desc = next(
        (e["breakdowns"][variable]["description"] for e in doc["runs"].values() if variable in e.get("breakdowns", {})), variable
    )
    for ax, key in zip(axes, ("purity (precision)", "completeness (recall)")):
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=key, xlabel=f"{variable}: {desc}", ylim=(-0.02, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Purity and completeness by {variable} (threshold 0.5, Wilson 95% intervals)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_learning_curve(lc: dict[str, Any]) -> Any:
    """F1 and PR AUC against the number of training labels, mean ± std over seeds, log x."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    summary = lc.get("summary", [])
    modes = sorted({s["mode"] for s in summary})
    styles = {"finetune": ("#1f77b4", "o", "fine-tuned from source run"), "scratch": ("#d62728", "s", "from scratch")}
    for k, mode in enumerate(modes):
        rows = sorted((s for s in summary if s["mode"] == mode), key=lambda s: s["n_train_labels"])
        color, marker, label = styles.get(mode, (_COLORS[k % len(_COLORS)], "^", mode))
        # Modes side by side at each x (a few per cent apart on the log axis) so bars stay visible.
        n = np.array([s["n_train_labels"] for s in rows], dtype=float) * (1 + 0.05 * (k - (len(modes) - 1) / 2))
        for ax, key in zip(axes, ("f1", "pr_auc")):
            mean = np.array([np.nan if s.get(f"{key}_mean") is None else s[f"{key}_mean"] for s in rows], dtype=float)
            std = np.array([0.0 if s.get(f"{key}_std") is None else s[f"{key}_std"] for s in rows], dtype=float)
            ax.errorbar(n, mean, yerr=std, marker=marker, capsize=3, lw=1.5, color=color, label=label)
    for cell in lc.get("cells", []):
        if cell.get("status") != "done":
            continue
        color = styles.get(cell["mode"], ("grey",))[0]
        k = modes.index(cell["mode"]) if cell["mode"] in modes else 0
        x = cell["n_train_labels"] * (1 + 0.05 * (k - (len(modes) - 1) / 2))
        for ax, key in zip(axes, ("f1", "pr_auc")):
            if cell.get(key) is not None:
                ax.plot([x], [cell[key]], ".", color=color, alpha=0.35, ms=4)
    zs = lc.get("zero_shot")
    if zs:
        for ax, key in zip(axes, ("f1", "pr_auc")):
            if zs.get(key) is not None:
                ax.axhline(zs[key], color="0.4", ls="--", lw=1.2, label=f"zero-shot source run ({zs[key]:.3f})")
    for ax, key in zip(axes, ("F1 (threshold 0.5)", "PR AUC (average precision)")):
        ax.set_xscale("log")
        ax.set(xlabel="number of training labels (target survey)", ylabel=f"test {key}", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Learning curve: where transfer learning pays (mean ± std over seeds; dots = single seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_spectrum(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray | None, z: float | None, title: str) -> Any:
    """One resampled spectrum with quasar emission lines marked at redshift ``z``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 2.6))
    f = np.asarray(flux, dtype=float)
    if ivar is not None:
        bad = np.asarray(ivar) <= 0
        f = np.where(bad, np.nan, f)
        if bad.any():
            ax.fill_between(wave, -1.05, 1.05, where=bad, color="0.85", step="mid", lw=0, label="no data")
    ax.plot(wave, f, lw=0.6, color="k")
    if z is not None and np.isfinite(z):
        last, row = 1e-30, 0
        span = np.log10(wave[-1] / wave[0])
        for name, rest in QSO_LINES:
            obs = rest * (1 + z)
            if wave[0] <= obs <= wave[-1]:
                ax.axvline(obs, color="#d62728", lw=0.8, ls="--", alpha=0.8)
                # Lines closer than ~4% of the axis (Hβ / [O III]) get their labels on two rows.
                row = 1 - row if np.log10(obs / last) < 0.04 * span else 0
                last = obs
                ax.text(
                    obs,
                    1.01 + 0.09 * row,
                    name,
                    color="#d62728",
                    fontsize=7,
                    ha="center",
                    va="bottom",
                    transform=ax.get_xaxis_transform(),
                )
    ax.set_xlim(wave[0], wave[-1])
    ax.set_ylim(-1.08, 1.08)
    ax.set_xlabel("wavelength [Å]", fontsize=8)
    ax.set_ylabel("normalised flux", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=8, pad=14)
    fig.tight_layout()
    return fig


# ---- page -------------------------------------------------------------------------------------


UNDEFINED = "undefined"  # how a metric that the data cannot define is shown (never as a number)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return UNDEFINED
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _ci(v: Any, iv: Sequence[float] | None, digits: int = 3) -> str:
    if v is None:
        return UNDEFINED
    s = f"{v:.{digits}f}"
    if iv:
        s += f' <span class="ci">[{iv[0]:.{digits}f}, {iv[1]:.{digits}f}]</span>'
    return s


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _metrics_table(doc: dict[str, Any], which: str) -> str:
    header = ["run", "model", "threshold", "TP", "FN", "FP", "TN", "precision", "recall", "F1", "ROC AUC", "PR AUC"]
    rows = []
    for name, e in doc["runs"].items():
        m = e["thresholds"][which]
        iv = m.get("intervals") or {}
        (tp, fn), (fp, tn) = m["confusion_matrix"]
        rows.append(
            [
                f"<b>{html.escape(name)}</b>",
                _fmt(e.get("model_name")),
                f"{m['threshold']:.4g}",
                str(tp),
                str(fn),
                str(fp),
                str(tn),
                _ci(m.get("precision"), iv.get("precision"), 4),
                _ci(m.get("recall"), iv.get("recall"), 4),
                _ci(m.get("f1"), iv.get("f1"), 4),
                _ci(m.get("roc_auc"), iv.get("roc_auc"), 4),
                _ci(m.get("pr_auc"), iv.get("pr_auc"), 4),
            ]
        )
    return _table(header, rows)


def _confusion_html(cm: Sequence[Sequence[int]]) -> str:
    (tp, fn), (fp, tn) = cm
    return (
        '<table class="cm"><tr><th></th><th>pred. QSO</th><th>pred. Other</th></tr>'
        f"<tr><th>true QSO</th><td>{tp}</td><td>{fn}</td></tr>"
        f"<tr><th>true Other</th><td>{fp}</td><td>{tn}</td></tr></table>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f3f4f6}td:first-child,th:first-child{text-align:left}.ci{color:#777;font-size:11px}
.note{color:#555;font-size:13px}.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;font-size:13px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:10px}
.gallery figure{margin:0;border:1px solid #eee;padding:4px}.gallery figcaption{font-size:12px;color:#444}
img{max-width:100%;height:auto}.cms{display:flex;gap:24px;flex-wrap:wrap}.cms div{font-size:13px}
table.cm td{min-width:70px}
"""


def _origin_note(doc: dict[str, Any]) -> str:
    """Say plainly whether each model was trained on simulated spectra and whether the test
    spectra are simulated or real: a figure measured on a simulation is a hypothesis about the sky."""
    evaluated = doc.get("store_origin", "unknown")
    trained = doc.get("trained_on") or {}
    sim = sorted(n for n, o in trained.items() if o == "simulated")
    words = {
        "simulated": "simulated spectra (spectransfer simulate)",
        "real": "real survey spectra",
        "mixed": "a mix of simulated and real spectra",
        "unknown": "spectra of unrecorded origin",
    }
    text = f"Evaluated on {words.get(evaluated, evaluated)}. "
    if trained:
        text += "Trained on: " + "; ".join(f"{html.escape(n)}: {words.get(o, o)}" for n, o in trained.items()) + ". "
    if sim and evaluated == "simulated":
        text += (
            "These figures measure the model on its own simulation; only real spectra "
            "(`spectransfer classify`, bench/sim_to_real.py) say how it does on the sky."
        )
    cls = "warn" if sim else "note"
    return f'<p class="{cls}"><b>Data origin.</b> {text}</p>'


def write_report(
    out_dir: str | Path,
    doc: dict[str, Any],
    *,
    store: Any = None,
    meta: pd.DataFrame | None = None,
    learning_curve: dict[str, Any] | None = None,
    gallery: int = 6,
) -> Path:
    """Write OUT_DIR/report.html from the metrics document and the per-run predictions."""
    out = Path(out_dir)
    parts: list[str] = []
    title = f"spectransfer evaluation — {doc.get('split', '?')} split"
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append(
        '<p class="note">'
        f"store <code>{html.escape(str(doc.get('store', '?')))}</code>"
        f"{' (survey ' + html.escape(str(doc['survey'])) + ')' if doc.get('survey') else ''}; "
        f"{doc['n_rows']} spectra, {doc['n_qso']} catalogue quasars; {len(doc['runs'])} run(s); "
        f"scored with engine <code>{html.escape(str(doc.get('engine', 'torch')))}</code>"
        f"{_int8_note(doc.get('int8_calibration'))}; "
        f"created {html.escape(str(doc.get('created', '')))}.<br>"
        f"Confusion matrices: {html.escape(doc['confusion_matrix_layout'])}. Intervals: "
        f"{doc['bootstrap']['confidence']:.0%} percentile bootstrap, {doc['bootstrap']['n_resamples']} resamples.</p>"
    )
    parts.append(_origin_note(doc))
    for w in doc.get("warnings", []):
        parts.append(f'<p class="warn">{html.escape(w)}</p>')
    for name, e in doc["runs"].items():
        for w in e.get("warnings", []):
            parts.append(f'<p class="warn">{html.escape(name)}: {html.escape(w)}</p>')

    parts.append("<h2>Metrics at threshold 0.5</h2>")
    parts.append(_metrics_table(doc, "default"))
    parts.append(
        '<div class="cms">'
        + "".join(f"<div><b>{html.escape(n)}</b>{_confusion_html(e['confusion_matrix'])}</div>" for n, e in doc["runs"].items())
        + "</div>"
    )
    parts.append("<h2>Metrics at the threshold chosen on the validation split</h2>")
    rules = {e["thresholds"]["validation"].get("rule") for e in doc["runs"].values()}
    parts.append(f'<p class="note">Rule: {html.escape("; ".join(sorted(r for r in rules if r)))}.</p>')
    parts.append(_metrics_table(doc, "validation"))

    if any("verdicts" in e for e in doc["runs"].values()):
        parts.append(_verdicts_section(doc))

    if doc.get("comparisons"):
        parts.append(_comparison_section(doc))

    curves = _load_curves(out, doc)
    if curves:
        parts.append("<h2>ROC and precision-recall curves</h2>")
        parts.append(_img(figure_png(plot_roc_pr(curves, doc)), "ROC and PR curves"))

    parts.append("<h2>Calibration</h2>")
    rows = []
    for name, e in doc["runs"].items():
        c = e["calibration"]
        rec = c.get("recorded") or {}
        applied = (
            (
                f"{rec['temperature']:.4f} ({html.escape(str(rec.get('split')))}, n = {rec.get('n_spectra')}, "
                f"{html.escape(str(rec.get('engine')))}{', written now' if c.get('written') else ''})"
            )
            if rec
            else "none"
        )
        rows.append(
            [
                f"<b>{html.escape(name)}</b>",
                _fmt(c.get("temperature"), 4),
                _fmt(c.get("ece_before"), 4),
                _fmt(c.get("ece_after"), 4),
                _fmt(c.get("nll_before"), 4),
                _fmt(c.get("nll_after"), 4),
                applied,
            ]
        )
    parts.append(
        _table(
            [
                "run",
                "temperature T",
                "ECE raw",
                "ECE scaled",
                "NLL raw",
                "NLL scaled",
                "RUN/calibration.json (applied by discover/classify)",
            ],
            rows,
        )
    )
    parts.append(
        f'<p class="note">{html.escape(doc.get("ece_definition", ""))}. Scaled: P = sigmoid(logit / T), '
        "T fitted on the validation split; RUN/calibration.json is written only by "
        "<code>spectransfer calibrate</code> or <code>evaluate --calibrate</code>.</p>"
    )
    parts.append(_img(figure_png(plot_reliability(doc)), "reliability diagram"))

    variables: list[str] = []
    for e in doc["runs"].values():
        for v in e.get("breakdowns", {}):
            if v not in variables:
                variables.append(v)
    if variables:
        parts.append("<h2>Purity and completeness by redshift, S/N and magnitude</h2>")
        for v in variables:
            parts.append(f"<h3>{html.escape(v)}</h3>")
            parts.append(_img(figure_png(plot_breakdown(doc, v)), f"breakdown by {v}"))
            parts.append(_breakdown_table(doc, v))

    parts.append(_redshift_section(out, doc))
    parts.append(_real_section(out))

    if learning_curve is not None:
        parts.append("<h2>Learning curve</h2>")
        parts.append(_img(figure_png(plot_learning_curve(learning_curve)), "learning curve"))
        parts.append(_learning_curve_table(learning_curve))

    if gallery > 0 and store is not None:
        parts.append(_gallery_section(out, doc, store, gallery))

    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n"
    )
    path = out / "report.html"
    write_text_atomic(path, page)
    log.info("wrote %s", path)
    return path


def plot_redshifts(points: dict[str, tuple[np.ndarray, np.ndarray]]) -> Any:
    """Predicted against catalogue z, one panel per method (three to a row), the ±3000 km/s band shaded."""
    plt = _plt()
    ncols = min(3, len(points))
    nrows = -(-len(points) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(points) :]:
        ax.set_visible(False)
    for ax, (name, (z_true, z_pred)) in zip(axes.ravel(), points.items()):
        top = float(np.nanmax(np.concatenate([z_true, z_pred[np.isfinite(z_pred)]]))) * 1.05 + 0.1
        zz = np.linspace(0, top, 50)
        band = 3000.0 / 299792.458 * (1 + zz)
        ax.fill_between(zz, zz - band, zz + band, color="0.85", label="±3000 km/s")
        ax.scatter(z_true, np.nan_to_num(z_pred, nan=-0.1), s=6, alpha=0.6)
        ax.set(xlim=(0, top), ylim=(-0.2, top), xlabel="catalogue z", ylabel="predicted z", title=name)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def _redshift_section(out: Path, doc: dict[str, Any]) -> str:
    """Redshift accuracy on the split's catalogue quasars per run: the network's z and Z_PRED
    (the templates as discover fits them), and how the z head's doubt singles out the failures."""
    rows, flagged, points = [], [], {}
    for name, e in doc["runs"].items():
        rz = e.get("redshift") or {}
        for method in ("network", "templates"):
            m = rz.get(method)
            if m:
                rows.append([html.escape(name), _z_method(method, rz), str(m["n"]), *_z_figures(m)])
        flagged += _flagged_rows(name, rz)
        f = out / e.get("predictions_file", "")
        if f.is_file() and rz:
            pr = pd.read_parquet(f)
            q = (pr["label"] == 1) & np.isfinite(pd.to_numeric(pr.get("catalog_z"), errors="coerce"))
            for col, what in (("z_net", "network"), ("z_pred", "Z_PRED")):
                if col in pr:
                    points[f"{name}: {what}"] = (pr.loc[q, "catalog_z"].to_numpy(float), pr.loc[q, col].to_numpy(float))
    if not rows:
        return ""
    parts = [
        "<h2>Redshifts</h2>",
        '<p class="note">On every catalogue quasar of the split: the network\'s z head (runs that have one) and '
        "Z_PRED, the DR16Q quasar templates fitted as discover and classify fit their positives (window: "
        "±0.0784(1+z) around the network's z, z 0-7 where its Z_NET_PROB is below 0.7 or the run has no z head; "
        "full: z 0-7). Catastrophic: |Δv| > 3000 km/s, Δv = c·Δz/(1+z); NMAD of Δz/(1+z). 95% bootstrap intervals.</p>",
        _table(["run", "method", "quasars", "catastrophic", "median |Δv| [km/s]", "NMAD"], rows),
    ]
    if flagged:
        parts.append(
            '<p class="note">Does the z head know when its z is wrong? The 10% of those quasars it doubts most '
            "against the other 90%: catastrophic rate of the network's z in each, and the share of all its "
            "catastrophic redshifts that the 10% hold.</p>"
        )
        header = ["run", "flagged by", "flagged", "catastrophic, flagged", "catastrophic, rest", "share held"]
        parts.append(_table(header, flagged))
    if points:
        parts.append(_img(figure_png(plot_redshifts(points)), "predicted against catalogue redshift"))
    return "\n".join(parts)


def _z_method(method: str, rz: dict[str, Any]) -> str:
    return f"Z_PRED ({html.escape(str(rz.get('refine', 'full')))})" if method == "templates" else method


def _z_figures(m: dict[str, Any]) -> list[str]:
    return [
        _ci(m["catastrophic_fraction"], m.get("catastrophic_fraction_interval")),
        _ci(m["median_abs_dv_kms"], m.get("median_abs_dv_kms_interval"), 0),
        _ci(m["nmad"], m.get("nmad_interval"), 4),
    ]


def _flagged_rows(name: str, rz: dict[str, Any]) -> list[list[str]]:
    """Rows of the uncertainty table for one run: the network's z (none without a z head; the
    same figures for Z_PRED are in metrics.json)."""
    rows = []
    for key, what in (("lowest_z_net_prob", "lowest Z_NET_PROB"), ("largest_z_net_err", "largest Z_NET_ERR/(1+Z_NET)")):
        m = ((rz.get("uncertainty") or {}).get(key) or {}).get("network")
        if m:
            rows.append(
                [
                    html.escape(name),
                    what,
                    f"{m['n_flagged']} of {m['n']}",
                    _ci(m["catastrophic_flagged"], m.get("catastrophic_flagged_interval")),
                    _ci(m["catastrophic_rest"], m.get("catastrophic_rest_interval")),
                    _ci(m["share_of_catastrophic"], m.get("share_of_catastrophic_interval")) + f" of {m['n_catastrophic']}",
                ]
            )
    return rows


def _real_section(out: Path) -> str:
    """The run judged on real spectra (REPORT_DIR/real_check.json, written by the demo or
    `evaluation.reality`), when there is one: the figures that say how it does on the sky."""
    f = out / "real_check.json"
    if not f.is_file():
        return ""
    rep = json.loads(f.read_text())
    if not rep.get("n_real"):
        return f'<h2>Real spectra</h2><p class="warn">Not checked: {html.escape(str(rep.get("skipped", "no real files")))}</p>'
    rows = [
        [
            html.escape(str(r["file"])),
            html.escape(str(r.get("pipeline_class"))),
            _fmt(r.get("pipeline_z"), 4),
            _fmt(r["p_qso"], 3),
            html.escape(str(r.get("spectype") or "")) + (" (decides)" if r.get("decided_by") == "templates" else ""),
            "yes" if r["is_qso"] else "no",
            ("not counted: " + html.escape(str(r["cut"])))
            if r.get("cut")
            else ("" if r.get("right") is None else ("right" if r["right"] else "WRONG")),
            _fmt(r.get("z_pred"), 4),
        ]
        for r in rep["files"]
    ]
    head = (
        f'<p class="note">Run <code>{html.escape(str(rep["run"]))}</code> on {rep["n_real"]} real files judged by their '
        f"own pipeline class (IS_QSO: {html.escape(describe(rep.get('templates', 'none'), rep['threshold']))}): "
        f"quasar recall {_fmt(rep['real_qso_recall'])}, precision "
        f"{_fmt(rep['real_precision'])}, SDSS non-quasars called quasars {_fmt(rep['real_fp_rate_sdss'])}, LAMOST "
        f"{_fmt(rep['real_fp_rate_lamost'])}; template z within 3000 km/s of the pipeline's for "
        f"{_fmt(rep['real_z_within_3000_kms'])} of the quasars found. "
        f"{rep.get('n_cut', 0)} file(s) that classify refuses (grid not covered, ZWARNING set) are scored with the "
        f"cuts off and listed, not counted; with them: quasar recall {_fmt(rep.get('all_files_qso_recall'))}, SDSS "
        f"{_fmt(rep.get('all_files_fp_rate_sdss'))}, LAMOST {_fmt(rep.get('all_files_fp_rate_lamost'))}. "
        f"The network alone (P_QSO &ge; {rep['threshold']}): quasar recall {_fmt(rep.get('network_real_qso_recall'))}, "
        f"SDSS {_fmt(rep.get('network_real_fp_rate_sdss'))}, LAMOST {_fmt(rep.get('network_real_fp_rate_lamost'))}.</p>"
    )
    return (
        "<h2>Real spectra</h2>"
        + head
        + _table(["file", "pipeline class", "pipeline z", "P_QSO", "template family", "quasar?", "", "Z_PRED"], rows)
    )


def _load_curves(out: Path, doc: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    curves = {}
    for name, e in doc["runs"].items():
        f = out / e.get("predictions_file", "")
        if not f.is_file():
            continue
        df = pd.read_parquet(f, columns=["label", "probability"])
        curves[name] = (df["label"].to_numpy().astype(bool), df["probability"].to_numpy(dtype=np.float64))
    return curves


def _verdicts_section(doc: dict[str, Any]) -> str:
    parts = ["<h2>Precision and recall with visual-inspection verdicts</h2>"]
    rows = []
    rule = ""
    for name, e in doc["runs"].items():
        v = e.get("verdicts")
        if not v:
            continue
        rule = v["rule"]
        for a in v["at"]:
            c, r = a["catalogue"], a["verdict_corrected"]
            rows.append(
                [
                    f"<b>{html.escape(name)}</b>",
                    f"{a['threshold']:.4g}",
                    f"{a['false_positives_inspected']} / {a['false_positives_confirmed_qso']}",
                    _fmt(c["precision"], 4),
                    _fmt(r["precision"], 4),
                    _fmt(c["recall"], 4),
                    _fmt(r["recall"], 4),
                    _fmt(c["f1"], 4),
                    _fmt(r["f1"], 4),
                ]
            )
    parts.append(
        _table(
            [
                "run",
                "threshold",
                "FPs inspected / confirmed QSO",
                "precision (catalogue)",
                "precision (+verdicts)",
                "recall (catalogue)",
                "recall (+verdicts)",
                "F1 (catalogue)",
                "F1 (+verdicts)",
            ],
            rows,
        )
    )
    parts.append(
        f'<p class="note">Rule: {html.escape(rule)}. '
        f"Verdicts file: <code>{html.escape(str(doc.get('verdicts_file')))}</code>.</p>"
    )
    return "\n".join(parts)


def _comparison_section(doc: dict[str, Any]) -> str:
    rows = []
    for c in doc["comparisons"]:
        m = c["threshold_0.5"]["mcnemar"]
        mv = c["validation_threshold"]["mcnemar"]
        pb = c.get("paired_bootstrap") or {}
        df1 = pb.get("delta_f1") or {}
        dap = pb.get("delta_pr_auc") or {}
        rows.append(
            [
                f"<b>{html.escape(c['a'])}</b> vs <b>{html.escape(c['b'])}</b>",
                f"{m['b_a_right_b_wrong']} / {m['c_a_wrong_b_right']}",
                _pval(m["p_exact"]),
                _pval(m["p_chi2"]),
                _pval(mv["p_exact"]),
                _ci(df1.get("observed"), df1.get("interval"), 4),
                _pval(df1.get("p_bootstrap")),
                _ci(dap.get("observed"), dap.get("interval"), 4),
                _pval(dap.get("p_bootstrap")),
            ]
        )
    return (
        "<h2>Paired comparison of runs on the same spectra</h2>"
        + _table(
            [
                "A vs B",
                "only A right / only B right (t=0.5)",
                "McNemar exact p",
                "McNemar χ² p",
                "McNemar exact p (val. thresholds)",
                "ΔF1 = A − B (t=0.5)",
                "p",
                "ΔPR AUC",
                "p",
            ],
            rows,
        )
        + '<p class="note">McNemar: two-sided exact binomial test on the spectra where exactly one run is right '
        "(χ² with continuity correction alongside). Δ: paired bootstrap over the same resampled spectra for both runs.</p>"
    )


def _int8_note(calib: dict[str, Any] | None) -> str:
    if not calib:
        return ""
    return (
        f" (int8 ranges set on {int(calib['n_spectra'])} spectra of store <code>{html.escape(str(calib.get('store_id')))}</code>)"
    )


def _pval(p: Any) -> str:
    if p is None:
        return UNDEFINED
    return "&lt; 0.001" if p < 1e-3 else f"{p:.3f}"


def _breakdown_table(doc: dict[str, Any], variable: str) -> str:
    rows = []
    for name, e in doc["runs"].items():
        bd = e.get("breakdowns", {}).get(variable)
        if not bd:
            continue
        for b in bd["bins"]:
            rows.append(
                [
                    html.escape(name),
                    html.escape(b["bin"]),
                    str(b["n"]),
                    str(b["n_qso"]),
                    str(b["n_predicted_qso"]),
                    _ci(b["purity"], b["purity_interval"]),
                    _ci(b["completeness"], b["completeness_interval"]),
                ]
            )
    return _table(["run", "bin", "spectra", "QSOs", "predicted QSOs", "purity", "completeness"], rows)


def _learning_curve_table(lc: dict[str, Any]) -> str:
    rows = []
    for s in sorted(lc.get("summary", []), key=lambda s: (s["fraction"], s["mode"])):
        rows.append(
            [
                html.escape(s["mode"]),
                f"{s['fraction']:g}",
                f"{s['n_train_labels']:.0f}",
                str(s.get("n_seeds", "")),
                f"{_fmt(s.get('f1_mean'))} ± {_fmt(s.get('f1_std'))}",
                f"{_fmt(s.get('pr_auc_mean'))} ± {_fmt(s.get('pr_auc_std'))}",
            ]
        )
    return _table(["mode", "fraction", "training labels", "seeds", "F1", "PR AUC"], rows)


def _gallery_section(out: Path, doc: dict[str, Any], store: Any, k: int) -> str:
    parts = [
        "<h2>Gallery: most confident false positives and false negatives</h2>",
        '<p class="note">Resampled, normalised flux from the store (grey: no data); dashed red lines: '
        "quasar emission lines ("
        + ", ".join(html.escape(n) for n, _ in QSO_LINES)
        + ") at the pipeline redshift. False positives: highest P(QSO) among catalogue non-quasars; "
        "false negatives: lowest P(QSO) among catalogue quasars (threshold 0.5).</p>",
    ]
    wave = store.grid.centers
    for name, e in doc["runs"].items():
        f = out / e.get("predictions_file", "")
        if not f.is_file():
            continue
        df = pd.read_parquet(f)
        fp = df[(df["label"] == 0) & (df["probability"] >= 0.5)].sort_values("probability", ascending=False).head(k)
        fn = df[(df["label"] == 1) & (df["probability"] < 0.5)].sort_values("probability").head(k)
        for kind, sel in (("false positives", fp), ("false negatives", fn)):
            parts.append(
                f"<h3>{html.escape(name)}: {kind} ({len(sel)} shown of "
                f"{e['errors']['n_false_positives' if kind == 'false positives' else 'n_false_negatives']})</h3>"
            )
            if sel.empty or "row" not in sel.columns:
                parts.append('<p class="note">none</p>')
                continue
            rows = sel["row"].to_numpy(dtype=np.int64)
            order = np.argsort(rows)
            flux = np.empty((rows.size, wave.size), dtype=np.float32)
            ivar = np.empty_like(flux)
            flux[order] = store.flux.get_orthogonal_selection((rows[order], slice(None)))
            ivar[order] = store.ivar.get_orthogonal_selection((rows[order], slice(None)))
            figs = []
            for i, (_, r) in enumerate(sel.iterrows()):
                z = r.get("z")
                z = None if z is None or pd.isna(z) else float(z)
                cls = r.get("pipeline_class")
                cls = "?" if cls is None or pd.isna(cls) else str(cls)
                title = f"{r['spectrum_id']}  P(QSO)={r['probability']:.3f}  pipeline {cls} z={_fmt(z, 3)}"
                png = figure_png(plot_spectrum(wave, flux[i], ivar[i], z, ""), dpi=80)
                figs.append(f"<figure>{_img(png, str(r['spectrum_id']))}<figcaption>{html.escape(title)}</figcaption></figure>")
            parts.append('<div class="gallery">' + "".join(figs) + "</div>")
    return "\n".join(parts)
