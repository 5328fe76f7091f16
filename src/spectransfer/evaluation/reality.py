"""Real spectra decide: how a run does on real survey files, judged by their own pipeline class.

A model trained on simulated spectra is a hypothesis about the sky until real spectra confirm
it. This classifies real files (``classify``, the same reading and resampling as ingest) and
compares its IS_QSO (P(QSO) >= threshold weighed with the template families' evidence, or the
family where its fit is decisive; the network alone is reported beside it) with the class the survey
pipeline gave each file (QSO or not; a
file the pipeline left unclassified, or flagged as a sky fibre, is listed but not counted). The headline figures count the
files the tool itself classifies, i.e. those that pass classify's cuts (the paper's coverage of
the grid; a pipeline ZWARNING is flagged, not refused): a spectrum whose blue end is lost is
refused with that reason by ``classify`` and ``ingest``, not called a quasar or a star (a blue
end the early LAMOST pipeline zeroed for low signal is given back by the reader and counts). Those
files are still scored with the cuts off, listed with their reason, and counted in the
``all_files_*`` figures. Used by
``spectransfer demo`` on the real files shipped in ``tests/data`` and by
``bench/sim_to_real.py`` on the fuller set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectransfer.candidates.classify import _read, classify, score_spectra
from spectransfer.data.ingest import IngestOptions, find_files
from spectransfer.data.resample import scale_noise
from spectransfer.evaluation.calibration import read_calibration
from spectransfer.ml.refine import velocity_offset_kms


def reality_check(
    run: str | Path,
    paths: Sequence[str | Path],
    threshold: float = 0.5,
    engine: str = "onnx",
    refine: str = "window",
    templates: str = "all",
) -> dict[str, Any]:
    """Per-file answers and per-class counts of ``run`` on the real files under ``paths``.

    The headline figures judge IS_QSO, the tool's decision (with ``templates``, see
    ``candidates.decision``); the ``network_*`` figures judge P_QSO >= threshold alone."""
    kw: dict[str, Any] = {"threshold": threshold, "engine": engine, "refine": refine, "templates": templates}
    res = classify(run, paths, **kw)
    cut = [f for f, reason in res.failed if reason.startswith("fails filter")]
    cut_reason = dict(res.failed)
    tables = [res.table.assign(_cut=None)]
    if cut:  # what the model would have said about the files the cuts refuse
        more = classify(run, cut, **kw, zwarning_filter=False, coverage_filter=False)
        tables.append(more.table.assign(_cut=[cut_reason.get(str(f)) for f in more.table["SOURCE_FILE"]]))
    t = pd.concat([x for x in tables if len(x)], ignore_index=True) if any(len(x) for x in tables) else res.table
    if "_cut" not in t:
        t = t.assign(_cut=None)
    rows = [_file_row(r) for _, r in t.iterrows()]
    counted = np.array([r["cut"] is None for r in rows], dtype=bool)
    out: dict[str, Any] = {
        "run": str(run),
        "threshold": threshold,
        "engine": engine,
        "templates": templates,
        "n_files": res.n_files,
    }
    out.update(_figures(rows, counted, prefix="real_"))
    out.update(_figures(rows, np.ones(len(rows), dtype=bool), prefix="all_files_"))
    alone = _network_alone(rows, threshold)
    out.update(_figures(alone, counted, prefix="network_real_"))
    out.update(_figures(alone, np.ones(len(rows), dtype=bool), prefix="network_all_files_"))
    out["per_class"] = _per_class(rows, counted)
    out["n_cut"] = len(cut)
    out["files"] = rows
    out["not_scored"] = [{"file": f, "reason": r} for f, r in res.failed if f not in set(cut)]
    return out


def reality_at_depth(
    run: str | Path,
    paths: Sequence[str | Path],
    snr_levels: Sequence[float],
    draws: int = 4,
    threshold: float = 0.5,
    engine: str = "onnx",
    templates: str = "all",
    seed: int = 0,
) -> dict[str, Any]:
    """The reality check on the same real files observed more shallowly.

    Real survey spectra reach a median S/N of ~1 per pixel (BOSS's galaxies and quasars,
    LAMOST's faint stars), while the shared real files are mostly bright. Each file classify
    accepts, with a known pipeline class, is scored ``draws`` times at each median S/N of
    ``snr_levels`` (noise scaled up by k = S/N / level, ``data.resample.scale_noise``; a
    file already fainter than the level is scored as it is), and judged like the headline
    figures: IS_QSO and, beside it, the network alone. Returns, per level, the figures of
    ``_figures`` over all its draws, with the share of files that were made fainter.
    """
    from spectransfer.ml.models import load_run

    files, _ = find_files(paths)
    loaded = load_run(Path(run))
    cal = read_calibration(Path(run))
    meta, flux, ivar, _ = _read(files, loaded[1].grid, None, IngestOptions(zwarning_filter=False))
    snr = pd.to_numeric(meta["snr"], errors="coerce").to_numpy(dtype=np.float64) if len(meta) else np.zeros(0)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"run": str(run), "draws": draws, "templates": templates, "levels": {}}
    for level in snr_levels:
        k = np.where(np.isfinite(snr) & (snr > level), snr / level, 1.0)
        noisy = [scale_noise(flux, ivar, k, rng, loaded[1].grid) for _ in range(draws)]  # every draw scored in one call
        t = score_spectra(
            Path(run),
            loaded,
            cal,
            pd.concat([meta] * draws, ignore_index=True),
            np.concatenate([f for f, _ in noisy]),
            np.concatenate([iv for _, iv in noisy]),
            threshold=threshold,
            engine=engine,
            refine="none",
            templates=templates,
        )
        rows = [_file_row(r) for _, r in t.iterrows()]
        use = np.ones(len(rows), dtype=bool)
        fig = _figures(rows, use, prefix="real_")
        alone = _network_alone(rows, threshold)
        fig.update({f"network_{k_}": v for k_, v in _figures(alone, use, prefix="real_").items() if k_.startswith("real_")})
        fig["fainter"] = float(np.mean(k > 1.0)) if k.size else 0.0
        out["levels"][f"{level:g}"] = fig
    return out


# SDSS ZWARNING bit 0, SKY: the fibre was placed on blank sky. The pipeline still fits it and
# names a class (a BOSS sky fibre in the shared files: CLASS QSO at z 6.39, S/N 0.26, OBJTYPE
# SKY), but that class names no object, so such a file is listed and not counted; so is a DR7
# spSpec whose SPEC_CLN says sky (5), for the same reason.
ZWARNING_SKY = 1
NO_OBJECT = (None, "", "UNKNOWN", "SKY")  # pipeline classes that name no object


def _file_row(r: pd.Series) -> dict[str, Any]:
    cls = r.get("CLASS")
    cls = None if cls is None or pd.isna(cls) else str(cls).strip().upper()
    zwarning = r.get("ZWARNING")
    sky = zwarning is not None and not pd.isna(zwarning) and int(zwarning) >= 0 and bool(int(zwarning) & ZWARNING_SKY)
    known = cls not in NO_OBJECT and not sky
    truth = cls == "QSO"
    said = bool(r["IS_QSO"])
    z_pred, z_pipe = r.get("Z_PRED"), r.get("Z")
    dv = float(velocity_offset_kms(np.array([z_pred]), np.array([z_pipe]))[0]) if truth else float("nan")
    return {
        "file": Path(str(r["SOURCE_FILE"])).name,
        "survey": r.get("SURVEY"),
        "pipeline_class": cls if known else None,
        "pipeline_z": _num(z_pipe),
        "p_qso": float(r["P_QSO"]),
        "is_qso": said,
        "spectype": str(r.get("SPECTYPE") or "") or None,
        "decided_by": r.get("DECIDED_BY"),
        "right": None if not known else bool(said == truth),
        "z_pred": _num(z_pred),
        "dv_kms": None if not np.isfinite(dv) else dv,
        "cut": r.get("_cut"),
    }


def _network_alone(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """The rows as the network without the templates would have called them (P_QSO >= threshold)."""
    return [{**r, "is_qso": r["p_qso"] >= threshold} for r in rows]


def _figures(rows: list[dict[str, Any]], use: np.ndarray, prefix: str) -> dict[str, Any]:
    """Recall, precision, accuracy and false-positive rates over the rows in ``use``."""
    k = use & np.array([r["pipeline_class"] is not None for r in rows], dtype=bool)
    truth = np.array([r["pipeline_class"] == "QSO" for r in rows], dtype=bool)
    said = np.array([r["is_qso"] for r in rows], dtype=bool)
    survey = np.array([str(r["survey"]) for r in rows])
    q, o = k & truth, k & ~truth
    qz = [r["dv_kms"] for r, u in zip(rows, q & said) if u]
    return {
        f"{prefix}qso_recall": _ratio(said[q].sum(), q.sum()),
        f"{prefix}precision": _ratio((said & q).sum(), (said & k).sum()),
        f"{prefix}accuracy": _ratio((said[k] == truth[k]).sum(), k.sum()),
        f"{prefix}fp_rate_sdss": _ratio((said & o & (survey == "sdss")).sum(), (o & (survey == "sdss")).sum()),
        f"{prefix}fp_rate_lamost": _ratio((said & o & (survey == "lamost")).sum(), (o & (survey == "lamost")).sum()),
        f"{prefix}z_within_3000_kms": _ratio(sum(1 for v in qz if v is not None and abs(v) <= 3000), len(qz)),
        "n_real" if prefix == "real_" else f"{prefix}n": int(k.sum()),
        "n_qso" if prefix == "real_" else f"{prefix}n_qso": int(q.sum()),
        "n_other" if prefix == "real_" else f"{prefix}n_other": int(o.sum()),
    }


def _per_class(rows: list[dict[str, Any]], counted: np.ndarray) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r, use in zip(rows, counted):
        if use and r["pipeline_class"] is not None:
            c = out.setdefault(r["pipeline_class"], {"n": 0, "right": 0})
            c["n"] += 1
            c["right"] += int(bool(r["right"]))
    return dict(sorted(out.items()))


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if b else None
