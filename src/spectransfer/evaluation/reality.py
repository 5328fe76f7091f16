"""Real spectra decide: how a run does on real survey files, judged by their own pipeline class.

A model trained on simulated spectra is a hypothesis about the sky until real spectra confirm
it. This classifies real files (``classify``, the same reading and resampling as ingest, no
quality cut so every readable file gets an answer) and compares P(QSO) >= threshold with the
class the survey pipeline gave each file (QSO or not; a file the pipeline left unclassified is
listed but not counted). Used by ``spectransfer demo`` on the real files shipped in
``tests/data`` and by ``bench/sim_to_real.py`` on the fuller set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectransfer.candidates.classify import classify
from spectransfer.ml.refine import velocity_offset_kms


def reality_check(
    run: str | Path, paths: Sequence[str | Path], threshold: float = 0.5, engine: str = "onnx", refine: str = "full"
) -> dict[str, Any]:
    """Per-file answers and per-class counts of ``run`` on the real files under ``paths``."""
    res = classify(run, paths, threshold=threshold, engine=engine, refine=refine, zwarning_filter=False, coverage_filter=False)
    t = res.table
    cls = t["CLASS"].astype("string").str.strip().str.upper() if "CLASS" in t else pd.Series(pd.NA, index=t.index)
    known = cls.notna() & (cls != "") & (cls != "UNKNOWN")
    truth = (cls == "QSO").fillna(False).to_numpy(bool)
    said = t["IS_QSO"].to_numpy(bool)
    rows = []
    for i, r in t.iterrows():
        z_pred, z_pipe = r.get("Z_PRED"), r.get("Z")
        dv = float(velocity_offset_kms(np.array([z_pred]), np.array([z_pipe]))[0]) if truth[i] else float("nan")
        rows.append(
            {
                "file": Path(str(r["SOURCE_FILE"])).name,
                "survey": r.get("SURVEY"),
                "pipeline_class": None if not known[i] else str(cls[i]),
                "pipeline_z": _num(z_pipe),
                "p_qso": float(r["P_QSO"]),
                "is_qso": bool(said[i]),
                "right": None if not known[i] else bool(said[i] == truth[i]),
                "z_pred": _num(z_pred),
                "dv_kms": None if not np.isfinite(dv) else dv,
            }
        )
    k = known.to_numpy(bool)
    per_class: dict[str, dict[str, int]] = {}
    for c in sorted(set(cls[known].tolist())):
        sel = k & (cls == c).fillna(False).to_numpy(bool)
        per_class[c] = {"n": int(sel.sum()), "right": int((said[sel] == truth[sel]).sum())}
    q, o = k & truth, k & ~truth
    sdss, lamost = (t["SURVEY"] == "sdss").to_numpy(bool), (t["SURVEY"] == "lamost").to_numpy(bool)
    qz = [r["dv_kms"] for r in rows if r["pipeline_class"] == "QSO" and r["is_qso"]]
    return {
        "run": str(run),
        "threshold": threshold,
        "engine": engine,
        "n_files": res.n_files,
        "n_real": int(k.sum()),
        "n_qso": int(q.sum()),
        "n_other": int(o.sum()),
        "real_qso_recall": _ratio(said[q].sum(), q.sum()),
        "real_precision": _ratio((said & q).sum(), (said & k).sum()),
        "real_accuracy": _ratio((said[k] == truth[k]).sum(), k.sum()),
        "real_fp_rate_sdss": _ratio((said & o & sdss).sum(), (o & sdss).sum()),
        "real_fp_rate_lamost": _ratio((said & o & lamost).sum(), (o & lamost).sum()),
        "real_z_within_3000_kms": _ratio(sum(1 for v in qz if v is not None and abs(v) <= 3000), len(qz)),
        "per_class": per_class,
        "files": rows,
        "not_scored": [{"file": f, "reason": r} for f, r in res.failed],
    }


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if b else None
