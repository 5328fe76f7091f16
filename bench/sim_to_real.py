"""How a model trained only on simulated spectra does on real SDSS and LAMOST spectra.

Classifies every real file under DATA/sdss and DATA/lamost with the run (`classify`: the same
reading, cuts and resampling as ingest; `spectransfer.evaluation.reality`, the check the demo
runs on tests/data) and compares its IS_QSO decision (P(QSO) >= threshold, or the template
families where the network is unsure: --templates) with the files' own pipeline CLASS (a
file the pipeline left unclassified is listed but not counted); network_* figures judge
P(QSO) >= threshold alone. The real_* figures count the
files classify accepts (a pipeline ZWARNING is flagged, not refused); files its cut refuses (grid not covered) are scored
with the cuts off, marked "cut", and counted only in the all_files_* figures. Prints one line
per file, counts per class, then one JSON line: real_qso_recall, real_precision,
real_accuracy, n_real, real_fp_rate_sdss, real_fp_rate_lamost, real_z_within_3000_kms, n_cut
and the all_files_* figures.

    .venv/bin/python bench/sim_to_real.py [--run demo-output/runs/finetune] [--data DIR] [--templates none]
                                          [--depth 5,3,2,1.5 --draws 4]

``--depth``: the same files observed more shallowly (``reality.reality_at_depth``): real
surveys reach a median S/N of ~1 per pixel, most shared files are bright; the JSON line
then carries "depth": {level: recall and false-positive rates, decision and network alone}.

Edge cases among the shared real files (PROVENANCE.md), flagged in the per-file lines: a QSO
at z = 6.39 with ZWARNING = 5 (a sky fibre, listed and not counted), a "QSO" at z = 0.0018
(counted as the pipeline labels it, although its position is that of SN 2000ch, a luminous
blue variable star in NGC 3432: Wagner et al. 2004, PASP 116, 326), and an spSpec whose target
type was QSO but whose pipeline class is GALAXY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EDGE_CASES = {
    "spec-7457-56746-0001.fits": "a sky fibre: OBJTYPE SKY, ZWARNING=5 (SKY), pipeline QSO z=6.39",
    "spec-8851-57460-0020.fits": "pipeline QSO at z=0.0018, at the position of SN 2000ch, a luminous blue variable star in NGC 3432",
    "spSpec-51630-0266-638.fit": "target QSO, pipeline GALAXY",
    "spec-8958-57514-0135.fits": "pipeline QSO z=0.098 from one narrow line (sigma 265 km/s) at PSF r 22.4 (M_r ~ -16 at that z); its non-QSO answer: a galaxy at z=0.934 ([O II])",
}


def default_data() -> Path:
    env = os.environ.get("SPECTRANSFER_SHARED_DATA")
    full = Path(env) if env else (REPO.parent / "shared" / "data")
    return full if full.is_dir() else REPO / "tests" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "demo-output" / "runs" / "finetune")
    ap.add_argument(
        "--data", type=Path, default=None, help="folder with sdss/ and lamost/ (default ../shared/data, else tests/data)"
    )
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--engine", default="onnx")
    ap.add_argument(
        "--templates", default="all", help="all (classify's default), uncertain (discover's) or none: see classify --templates"
    )
    ap.add_argument(
        "--depth",
        default="",
        help="comma-separated median S/N levels (e.g. 5,3,2,1.5): also score every file made fainter to each (noise scaled up, --draws times) and report the figures per level",
    )
    ap.add_argument("--draws", type=int, default=4, help="noise draws per file and --depth level")
    args = ap.parse_args()
    data = args.data or default_data()
    if not (args.run / "model.safetensors").exists():
        sys.exit(f"{args.run}: no trained run there (run `make demo` or pass --run RUN)")
    if not data.is_dir():
        sys.exit(f"{data}: no real data folder (pass --data DIR or set SPECTRANSFER_SHARED_DATA)")
    from spectransfer.evaluation.reality import reality_check

    folders = [data / s for s in ("sdss", "lamost") if (data / s).is_dir()]
    rep = reality_check(args.run, folders, threshold=args.threshold, engine=args.engine, templates=args.templates)
    for r in sorted(rep["files"], key=lambda r: (str(r["survey"]), str(r["pipeline_class"]), r["file"])):
        verdict = "n/a" if r["right"] is None else ("ok " if r["right"] else "BAD")
        z = "   n/a  " if r["pipeline_z"] is None else f"{r['pipeline_z']:8.4f}"
        zp = (
            ""
            if r["z_pred"] is None
            else f" z_pred={r['z_pred']:.4f}" + ("" if r["dv_kms"] is None else f" (dv {r['dv_kms']:+.0f} km/s)")
        )
        edge = f"  [edge: {EDGE_CASES[r['file']]}]" if r["file"] in EDGE_CASES else ""
        if r.get("cut"):
            verdict, edge = "cut", f"{edge}  [not counted; classify refuses it: {r['cut']}]"
        tpl = f"{r['spectype'] or '-':6s}{'*' if r['decided_by'] == 'templates' else ' '}"
        print(
            f"{str(r['survey']):7s} {str(r['pipeline_class']):8s} z={z} P(QSO)={r['p_qso']:.3f} tpl={tpl} {verdict} {r['file']}{zp}{edge}"
        )
    for f in rep["not_scored"]:
        print(f"not scored: {f['file']}: {f['reason']}")
    for c, v in rep["per_class"].items():
        print(f"{c}: {v['right']} of {v['n']} right")
    keys = (
        "real_qso_recall",
        "real_precision",
        "real_accuracy",
        "n_real",
        "n_qso",
        "real_fp_rate_sdss",
        "real_fp_rate_lamost",
        "real_z_within_3000_kms",
        "n_cut",
        "all_files_qso_recall",
        "all_files_fp_rate_sdss",
        "all_files_fp_rate_lamost",
        "all_files_n",
        "network_real_qso_recall",
        "network_real_fp_rate_sdss",
        "network_real_fp_rate_lamost",
        "network_all_files_qso_recall",
        "network_all_files_fp_rate_sdss",
        "network_all_files_fp_rate_lamost",
        "templates",
        "run",
    )
    summary = {k: rep[k] for k in keys} | {"data": str(data)}
    if args.depth:
        from spectransfer.evaluation.reality import reality_at_depth

        levels = [float(v) for v in args.depth.split(",")]
        deep = reality_at_depth(args.run, folders, levels, args.draws, args.threshold, args.engine, args.templates)
        summary["depth"] = {}
        for level, fig in deep["levels"].items():
            keep = ("real_qso_recall", "real_fp_rate_sdss", "real_fp_rate_lamost")
            row = {k: fig[k] for k in keep} | {f"network_{k}": fig[f"network_{k}"] for k in keep} | {"fainter": fig["fainter"]}
            summary["depth"][level] = row
            print(
                f"median S/N {level:>4s} ({row['fainter']:.0%} of files made fainter, {args.draws} draws): "
                f"quasars found {_pct(row['real_qso_recall'])}, SDSS others called QSO {_pct(row['real_fp_rate_sdss'])}, "
                f"LAMOST called QSO {_pct(row['real_fp_rate_lamost'])}; network alone "
                f"{_pct(row['network_real_qso_recall'])}, {_pct(row['network_real_fp_rate_sdss'])}, {_pct(row['network_real_fp_rate_lamost'])}"
            )
    print(json.dumps(summary))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


if __name__ == "__main__":
    main()
