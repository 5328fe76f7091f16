"""How a model trained only on simulated spectra does on real SDSS and LAMOST spectra.

Ingests every real file under DATA/sdss and DATA/lamost into a temporary store with the real
ingest code (no ZWARNING or coverage filter, so every readable file gets a row), scores them
with the run, and compares P(QSO) >= threshold with the files' own pipeline CLASS (QSO or
not; a file the pipeline left unclassified is listed but not counted). Prints one line per
file, counts per class, then one JSON line: real_qso_recall, real_precision, real_accuracy,
n_real, real_fp_rate_sdss, real_fp_rate_lamost.

    PYTHONPATH=src .venv/bin/python bench/sim_to_real.py [--run demo-output/runs/finetune] [--data DIR]

Edge cases among the shared real files (PROVENANCE.md), flagged in the per-file lines: a QSO
at z = 6.39 with ZWARNING = 5 (unreliable pipeline answer), a "QSO" at z = 0.0018, and an
spSpec whose target type was QSO but whose pipeline class is GALAXY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
EDGE_CASES = {
    "spec-7457-56746-0001.fits": "z=6.39 ZWARNING=5",
    "spec-8851-57460-0020.fits": "QSO at z=0.0018",
    "spSpec-51630-0266-638.fit": "target QSO, pipeline GALAXY",
}


def default_data() -> Path:
    env = os.environ.get("SPECTRANSFER_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


def score(run: Path, store_path: Path) -> np.ndarray:
    """P(QSO) of every live row of the store, in meta order (the one place that scores)."""
    from spectransfer.candidates.discover import sigmoid
    from spectransfer.data.store import open_store
    from spectransfer.ml.models import load_run
    from spectransfer.ml.score import score_store

    store = open_store(store_path)
    logits = score_store(run, store, rows=store.meta["row"].to_numpy(np.int64))
    temperature = load_run(run)[1].temperature
    return sigmoid(logits / temperature if temperature else logits)


def ingest_real(data: Path, store: Path) -> pd.DataFrame:
    """The real files' metadata rows (with their survey folder) after a filter-free ingest."""
    from spectransfer.data.ingest import ingest
    from spectransfer.data.store import open_store

    folders = [str(data / s) for s in ("sdss", "lamost") if (data / s).is_dir()]
    ingest(folders, store, workers=0, zwarning_filter=False, coverage_filter=False, quiet=True)
    st = open_store(store)
    if len(st.rejected):
        for _, r in st.rejected.iterrows():
            print(f"not ingested: {Path(str(r['source_file'])).name}: {r.get('reason', '')}")
    return st.meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "demo-output" / "runs" / "finetune")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    data = args.data or default_data()
    if not (args.run / "model.safetensors").exists():
        sys.exit(f"{args.run}: no trained run there (run `make demo` or pass --run RUN)")
    if not data.is_dir():
        sys.exit(f"{data}: no real data folder (pass --data DIR or set SPECTRANSFER_SHARED_DATA)")
    with tempfile.TemporaryDirectory() as tmp:
        meta = ingest_real(data, Path(tmp) / "store").reset_index(drop=True)
        p = score(args.run, Path(tmp) / "store")
    meta = meta.assign(p_qso=p, file=[Path(str(f)).name for f in meta["source_file"]])
    meta["folder"] = [Path(str(f)).parent.name for f in meta["source_file"]]
    meta["cls"] = meta["pipeline_class"].fillna("UNKNOWN").astype(str).str.upper()
    meta = meta.sort_values(["folder", "cls", "file"])
    for _, r in meta.iterrows():
        verdict = "n/a" if r["cls"] == "UNKNOWN" else ("ok " if (r["p_qso"] >= args.threshold) == (r["cls"] == "QSO") else "BAD")
        edge = f"  [edge: {EDGE_CASES[r['file']]}]" if r["file"] in EDGE_CASES else ""
        print(f"{r['folder']:7s} {r['cls']:8s} z={float(r['z']):8.4f} P(QSO)={r['p_qso']:.3f} {verdict} {r['file']}{edge}")
    for (folder, cls), g in meta.groupby(["folder", "cls"]):
        print(f"{folder} {cls}: {len(g)} files, {(g['p_qso'] >= args.threshold).sum()} called QSO, median P(QSO) {g['p_qso'].median():.3f}")
    # A file whose pipeline gave no class (LAMOST 'Unknown') has no truth: listed, not counted.
    known = meta[meta["cls"] != "UNKNOWN"]
    sdss = (known["folder"] == "sdss").to_numpy()
    lam = (known["folder"] == "lamost").to_numpy()
    truth = (known["cls"] == "QSO").to_numpy()
    called = (known["p_qso"] >= args.threshold).to_numpy()

    def frac(num: np.ndarray, den: np.ndarray) -> float | None:
        return float(num.sum() / den.sum()) if den.sum() else None

    out = {
        "run": str(args.run),
        "real_qso_recall": frac(called & truth, truth),
        "real_precision": frac(called & truth, called),
        "real_accuracy": float((called == truth).mean()) if len(truth) else None,
        "n_real": int(len(truth)),
        "n_real_qso": int(truth.sum()),
        "n_unknown_class": int(len(meta) - len(known)),
        "real_fp_rate_sdss": frac(called & ~truth & sdss, ~truth & sdss),
        "real_fp_rate_lamost": frac(called & ~truth & lam, ~truth & lam),
        "median_p_qso_real_non_qso": float(np.median(known["p_qso"][~truth])) if (~truth).any() else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
