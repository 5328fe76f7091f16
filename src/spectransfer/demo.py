"""The whole tool on simulated surveys, one command: what a new user runs first.

Each stage runs as the very `spectransfer` command a user would type (printed before it runs),
so the demo doubles as a worked example of the real-data workflow. Every number it prints
is read from what this run just produced: the report's metrics.json, the candidate catalogue
and the simulation's truth table.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spectransfer.errors import SpectransferError

log = logging.getLogger(__name__)

MARKER = ".spectransfer-demo"
_CPU: dict[str, float] = {}  # CPU seconds of each stage's process (with its children)
RUN_ROLES = {
    "finetune": "transfer (LAMOST -> SDSS)",
    "scratch": "from scratch (SDSS only)",
    "pretrain": "zero-shot (LAMOST only)",
}


@dataclass(frozen=True)
class DemoSize:
    """Survey sizes and training lengths; ``QUICK`` keeps the whole demo to a few minutes."""

    n_lamost: int
    n_sdss: int
    lamost_qso_fraction: float
    pretrain_epochs: int
    finetune_epochs: int
    eval_every: int
    patience: int
    bootstrap: int
    ingest_workers: int
    train_batch: int
    early_stop: str  # f1 (the paper's) or loss: with ~15 validation quasars, F1 at 0.5 is too coarse
    sdss_imbalance: str  # none (the paper's) or pos-weight (shifts every logit up by log(n_neg/n_pos))
    sdss_batch: int  # batch size of the SDSS runs (fine-tune and scratch)
    sdss_eval_every: int
    sdss_ema: float  # --ema of the SDSS runs (0 = off): their weights' moving average is what they validate and save


# Training dominates both (fp32; bf16 autocast is emulated, hence slower, on AVX2-only CPUs).
# QUICK measured at 317 CPU s for 1500 + 1200 spectra and 134 steps on 2 shared cores, cut to
# ~82 steps here. FULL with 3 pretraining epochs took 1391 s wall / 1673 CPU s on 2 shared
# cores (pretraining 609 CPU s of it, best at step 60); 2 epochs keep it near 1470 CPU s.
# Pretraining (2% quasars) keeps --imbalance pos-weight: fine-tuning retrains every layer, so
# the shifted bias it leaves is learnt away. The SDSS runs (14% quasars) use plain BCE
# (none, the paper's) at batch 64: four times the optimiser steps of batch 256 for the same
# passes, enough for plain BCE to cross 0.5; pos-weight (n_neg/n_pos ~ 6) adds log 6 to every
# logit, which temperature scaling cannot remove, and made most real non-quasars P ~ 0.6.
# QUICK (a smoke test) keeps pos-weight: with plain BCE it found no quasar; its SDSS survey
# is 1600 spectra since with 1000 it recovered none of the ~4 left-out quasars.
# FULL with these settings (8000 SDSS-like spectra, 6 fine-tuning epochs = 588 steps, bf16
# autocast on an AVX512-BF16/AMX Xeon): 1192 CPU s in all (pretrain 183, fine-tune 556 under
# load, scratch 331 for the same steps alone on the machine, 216 s wall). On the GPU machine a
# 5x larger simulation trained to early stopping scored better on the simulated test split
# (F1 0.952) but no better on the real files, so the demo keeps this budget.
# The SDSS runs validate and save the moving average of their weights (--ema 0.99): 6 epochs
# end while the weights still wander (validation F1 rising to the last step), and which real
# faint spectra a run calls quasars changed more between seeds than between settings. Four
# fine-tunes from one LAMOST run (seeds 0-3, 2-core Xeon), with and without it, on the shared
# real files (bench/sim_to_real.py --depth, 6 draws; quasars found / SDSS others / LAMOST
# stars called quasars, mean of the seeds): as they are 89% / 0% / 0% both; the network alone
# calls 0% of the SDSS others quasars with it, 4% without; at median S/N 2 84% / 6% / 11%
# against 84% / 8% / 13%, at 1.5 76% / 10% / 9% against 74% / 12% / 10%; simulated test F1
# 0.967 against 0.961. Small, every figure the same or better, no extra step of training.
FULL = DemoSize(
    n_lamost=12000,
    n_sdss=8000,
    lamost_qso_fraction=0.02,
    pretrain_epochs=2,
    finetune_epochs=6,
    eval_every=20,
    patience=6,
    bootstrap=300,
    ingest_workers=2,
    train_batch=256,
    early_stop="f1",
    sdss_imbalance="none",
    sdss_batch=64,
    sdss_eval_every=60,
    sdss_ema=0.99,
)
QUICK = DemoSize(
    n_lamost=1200,
    n_sdss=1600,
    lamost_qso_fraction=0.05,
    pretrain_epochs=2,
    finetune_epochs=2,
    eval_every=13,
    patience=3,
    bootstrap=100,
    ingest_workers=0,
    train_batch=64,
    early_stop="loss",
    sdss_imbalance="pos-weight",
    sdss_batch=64,
    sdss_eval_every=13,
    sdss_ema=0.0,
)


class DemoError(SpectransferError):
    """A demo stage failed; the message names the stage and its command."""


def _prepare(out: Path) -> None:
    """Make ``out`` a demo folder: new, empty, or written by an earlier demo (then cleared)."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} exists and is not a folder; choose a new --out")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise DemoError(f"{out} exists and is not a demo folder; choose an empty or new --out")
    for sub in ("surveys", "stores", "runs", "report", "candidates.fits", "candidates.parquet", "candidates.fits.parts"):
        p = out / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("folder written by `spectransfer demo`; safe to delete\n")


def _command(args: list[str]) -> str:
    return "spectransfer " + " ".join(shlex.quote(a) for a in args)


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(stage: str, args: list[str], quiet: bool) -> float:
    """Run one stage as ``python -m spectransfer ARGS`` (printed first); DemoError if it fails."""
    cmd = [sys.executable, "-m", "spectransfer", *args]
    shown = _command(args)
    print(f"\n[{stage}] $ {shown}", flush=True)
    t0, c0 = time.perf_counter(), _children_cpu()
    env = dict(os.environ, PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore::DeprecationWarning"))
    res = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE if quiet else None, text=True, env=env)
    if res.returncode != 0:
        tail = (res.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise DemoError(f"stage '{stage}' failed (exit {res.returncode}): {shown}" + (f": {tail[0]}" if tail else ""))
    dt = time.perf_counter() - t0
    _CPU[stage] = _children_cpu() - c0
    print(f"[{stage}] done in {dt:.1f} s ({_CPU[stage]:.1f} CPU s)", flush=True)
    return dt


def run_demo(out: str | Path = "demo-output", quick: bool = False, seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Simulate, ingest, pretrain, fine-tune, train from scratch, evaluate and discover; return the summary."""
    from spectransfer.simulate import CATALOG_NAME

    out = Path(out).resolve()
    size = QUICK if quick else FULL
    _prepare(out)
    q = ["--quiet"] if quiet else []
    surveys, stores, runs = out / "surveys", out / "stores", out / "runs"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    timings["simulate lamost"] = _run(
        "simulate a LAMOST-like survey",
        [
            "simulate",
            "--survey",
            "lamost",
            "--n",
            str(size.n_lamost),
            "--out",
            str(surveys / "lamost"),
            "--seed",
            str(seed + 1),
            "--qso-fraction",
            str(size.lamost_qso_fraction),
            *q,
        ],
        quiet,
    )
    timings["simulate sdss"] = _run(
        "simulate an SDSS-like survey",
        ["simulate", "--survey", "sdss", "--n", str(size.n_sdss), "--out", str(surveys / "sdss"), "--seed", str(seed + 2), *q],
        quiet,
    )

    for name in ("lamost", "sdss"):
        # the spectra sit in the survey's own layout below the folder, beside the catalogue
        spectra = [str(d) for d in sorted((surveys / name).iterdir()) if d.is_dir()]
        timings[f"ingest {name}"] = _run(
            f"ingest {name}",
            [
                "ingest",
                *spectra,
                "--store",
                str(stores / name),
                "--survey",
                name,
                "--catalog",
                str(surveys / name / CATALOG_NAME[name]),
                "--workers",
                str(size.ingest_workers),
                *q,
            ],
            quiet,
        )

    # auto: bf16 autocast where the CPU has bf16 instructions (~1.4x the fp32 steps per second
    # on 2 AVX512-BF16/AMX cores), fp32 where it would be emulated (AVX2).
    common = [
        "--precision",
        "auto",
        "--patience",
        str(size.patience),
        "--early-stop",
        size.early_stop,
        "--seed",
        str(seed),
        "--workers",
        "0",
        *q,
    ]
    lamost_batch = ["--batch-size", str(size.train_batch), "--eval-every", str(size.eval_every)]
    sdss_batch = ["--batch-size", str(size.sdss_batch), "--eval-every", str(size.sdss_eval_every), "--ema", str(size.sdss_ema)]
    timings["pretrain"] = _run(
        "pretrain on LAMOST",
        [
            "train",
            "--store",
            str(stores / "lamost"),
            "--out",
            str(runs / "pretrain"),
            "--mode",
            "scratch",
            "--max-epochs",
            str(size.pretrain_epochs),
            "--imbalance",
            "pos-weight",
            *lamost_batch,
            *common,
        ],
        quiet,
    )
    timings["finetune"] = _run(
        "fine-tune on SDSS",
        [
            "train",
            "--store",
            str(stores / "sdss"),
            "--out",
            str(runs / "finetune"),
            "--mode",
            "finetune",
            "--init",
            str(runs / "pretrain"),
            "--max-epochs",
            str(size.finetune_epochs),
            "--imbalance",
            size.sdss_imbalance,
            *sdss_batch,
            *common,
        ],
        quiet,
    )
    timings["scratch"] = _run(
        "train on SDSS from scratch",
        [
            "train",
            "--store",
            str(stores / "sdss"),
            "--out",
            str(runs / "scratch"),
            "--mode",
            "scratch",
            "--max-epochs",
            str(size.finetune_epochs),
            "--imbalance",
            size.sdss_imbalance,
            *sdss_batch,
            *common,
        ],
        quiet,
    )

    timings["real spectra"] = _real_check(runs / "finetune", out / "report" / REAL_CHECK)

    timings["evaluate"] = _run(
        "evaluate transfer vs scratch vs zero-shot",
        [
            "evaluate",
            str(runs / "finetune"),
            str(runs / "scratch"),
            str(runs / "pretrain"),
            "--store",
            str(stores / "sdss"),
            "--out",
            str(out / "report"),
            "--bootstrap",
            str(size.bootstrap),
            "--calibrate",
            *q,
        ],
        quiet,
    )
    timings["discover"] = _run(
        "discover on the whole SDSS-like survey",
        ["discover", str(runs / "finetune"), "--store", str(stores / "sdss"), "--out", str(out / "candidates.fits"), *q],
        quiet,
    )

    summary = summarise(out)
    summary["real_check"] = _read_json(out / "report" / REAL_CHECK)
    summary["timings_s"] = timings
    summary["cpu_s"] = dict(_CPU)
    summary["total_s"] = time.perf_counter() - t_start
    summary["size"] = asdict(size)
    summary["quick"] = quick
    write_summary(out, summary)
    return summary


REAL_CHECK = "real_check.json"  # beside metrics.json: the report shows it


def real_data_dir() -> Path | None:
    """The real SDSS/LAMOST files shipped with the repository (tests/data, with their provenance),
    or SPECTRANSFER_REAL_DATA; None when neither exists (an installed package without the tests)."""
    env = os.environ.get("SPECTRANSFER_REAL_DATA")
    here = Path(env) if env else Path(__file__).resolve().parents[2] / "tests" / "data"
    return here if (here / "sdss").is_dir() or (here / "lamost").is_dir() else None


def _real_check(run: Path, target: Path) -> float:
    """Classify the shipped real spectra with the fine-tuned model and judge it by their own
    pipeline class: the demo's models are trained on simulated spectra only, and this is
    the one figure of the demo measured on the sky."""
    from spectransfer.evaluation.reality import reality_check
    from spectransfer.provenance import write_text_atomic

    data = real_data_dir()
    t0 = time.perf_counter()
    if data is None:
        print("\n[real spectra] skipped: no real files (tests/data or SPECTRANSFER_REAL_DATA)", flush=True)
        result: dict[str, Any] = {"skipped": "no real files found"}
    else:
        folders = [str(data / s) for s in ("sdss", "lamost") if (data / s).is_dir()]
        print(
            f"\n[real spectra] $ {_command(['classify', str(run), *folders, '--engine', 'onnx'])}",
            flush=True,
        )
        result = reality_check(run, folders, engine="onnx")
        result["data"] = str(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, json.dumps(result, indent=2, default=str) + "\n")
    dt = time.perf_counter() - t0
    print(f"[real spectra] done in {dt:.1f} s", flush=True)
    return dt


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(out: str | Path) -> dict[str, Any]:
    """Read back the report's metrics, the candidate catalogue and the simulation's truth."""
    import numpy as np
    import pandas as pd

    out = Path(out)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    runs = {}
    for name, e in metrics["runs"].items():
        key = Path(name).name
        runs[key] = {k: e.get(k) for k in ("precision", "recall", "f1", "roc_auc", "pr_auc", "n", "n_qso")}
        runs[key]["redshift"] = e.get("redshift")
        runs[key]["role"] = RUN_ROLES.get(key, key)
    cand = pd.read_parquet(
        out / "candidates.parquet",
        columns=[
            "SPECTRUM_ID",
            "PLATE",
            "MJD",
            "FIBERID",
            "CATEGORY",
            "PIPE_NOT_QSO",
            "CLASS",
            "P_QSO",
            "IS_QSO",
            "DECIDED_BY",
            "SPLIT",
        ],
    )
    truth = pd.read_parquet(
        out / "surveys" / "sdss" / "truth.parquet", columns=["plate", "mjd", "fiberid", "true_class", "in_catalog"]
    )
    joined = join_truth(cand, truth)
    is_new = (joined["CATEGORY"] == "new_candidate").to_numpy()
    true_qso = (joined["true_class"] == "QSO").to_numpy()
    left_out = true_qso & ~joined["in_catalog"].fillna(True).to_numpy(dtype=bool)
    non_qso = (joined["true_class"].notna() & (joined["true_class"] != "QSO")).to_numpy()
    n_left_out_truth = int(((truth["true_class"] == "QSO") & ~truth["in_catalog"]).sum())

    def rate(mask: np.ndarray) -> float | None:
        return float(is_new[mask].mean()) if mask.any() else None

    new_by_truth = joined.loc[is_new, "true_class"].fillna("(not in truth)").value_counts().to_dict()
    test = (joined["SPLIT"] == "test").to_numpy() & joined["true_class"].notna().to_numpy()

    def scores(pred: np.ndarray) -> dict[str, float | None]:
        tp, fp, fn = (
            int((pred & true_qso & test).sum()),
            int((pred & ~true_qso & test).sum()),
            int((~pred & true_qso & test).sum()),
        )
        return {
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        }

    decision = {
        "n_test": int(test.sum()),
        "tool": scores(joined["IS_QSO"].to_numpy(dtype=bool)),
        "network": scores(joined["P_QSO"].to_numpy() >= 0.5),
        "decided_by_templates": int(((joined["DECIDED_BY"] == "templates").to_numpy() & test).sum()),
    }
    return {
        "decision_test_truth": decision,
        "out": str(out),
        "runs": runs,
        "categories": {
            c: int((cand["CATEGORY"] == c).sum()) for c in ("new_candidate", "missed_by_model", "agree_qso", "agree_other")
        },
        "n_spectra": int(len(cand)),
        "new_pipe_star": int((is_new & (cand["CLASS"].astype("string").str.upper() == "STAR").to_numpy(dtype=bool)).sum()),
        "new_pipe_galaxy": int((is_new & (cand["CLASS"].astype("string").str.upper() == "GALAXY").to_numpy(dtype=bool)).sum()),
        "left_out_quasars_simulated": n_left_out_truth,
        "left_out_quasars_in_store": int(left_out.sum()),
        "left_out_recovered": int((is_new & left_out).sum()),
        "left_out_recall": rate(left_out),
        "new_candidate_rate_true_non_qso": rate(non_qso),
        "new_candidates_by_true_class": {str(k): int(v) for k, v in new_by_truth.items()},
        "report": str(out / "report" / "report.html"),
        "candidates": str(out / "candidates.fits"),
        "candidates_parquet": str(out / "candidates.parquet"),
        "inspect_command": _command(
            ["inspect", str(out / "candidates.fits"), "--store", str(out / "stores" / "sdss"), "--category", "new_candidate"]
        ),
    }


def join_truth(cand: Any, truth: Any) -> Any:
    """The SDSS-like candidates with the simulation's truth, matched by (plate, mjd, fiberid)."""
    keys = ["plate", "mjd", "fiberid"]
    right = truth.astype({k: "int64" for k in keys})
    left = cand.assign(**{k: cand[k.upper()].astype("int64") for k in keys})
    return left.merge(right, on=keys, how="left", validate="one_to_one")


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    from spectransfer.provenance import write_text_atomic

    write_text_atomic(out / "demo_summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def print_summary(summary: dict[str, Any]) -> None:
    """The demo's closing tables: test metrics per run, categories, left-out quasar recall, paths."""
    from rich.console import Console
    from rich.table import Table

    from spectransfer.candidates.decision import describe

    console = Console(width=max(Console().width, 120))

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    table = Table(title="SDSS-like test split (threshold 0.5; from report/metrics.json)", title_justify="left")
    for col in ("run", "what", "precision", "recall", "F1", "ROC AUC", "PR AUC", "spectra", "quasars"):
        table.add_column(col, justify="left" if col in ("run", "what") else "right")
    for name in ("finetune", "scratch", "pretrain"):
        r = summary["runs"].get(name)
        if r is None:
            continue
        table.add_row(
            name,
            r["role"],
            f(r["precision"]),
            f(r["recall"]),
            f(r["f1"]),
            f(r["roc_auc"]),
            f(r["pr_auc"]),
            f"{r['n']:,}",
            f"{r['n_qso']:,}",
        )
    console.print(table)

    console.print(f"candidate catalogue: {summary['n_spectra']:,} spectra (every spectrum of the SDSS-like store)")
    cats = Table()
    cats.add_column("category")
    cats.add_column("spectra", justify="right")
    for c, n in summary["categories"].items():
        cats.add_row(c, f"{n:,}")
    console.print(cats)
    console.print(f"new candidates the pipeline calls STAR: {summary['new_pipe_star']:,}, GALAXY: {summary['new_pipe_galaxy']:,}")
    rec = summary["left_out_recall"]
    console.print(
        f"quasars the simulation left out of the catalogue: {summary['left_out_quasars_simulated']} simulated, "
        f"{summary['left_out_quasars_in_store']} passed ingest; {summary['left_out_recovered']} found as new candidates "
        f"(recall {'n/a' if rec is None else f'{rec:.1%}'}; new-candidate rate among true non-quasars "
        f"{'n/a' if summary['new_candidate_rate_true_non_qso'] is None else format(summary['new_candidate_rate_true_non_qso'], '.2%')})"
    )
    console.print(
        "new candidates by true class: " + ", ".join(f"{k} {v}" for k, v in summary["new_candidates_by_true_class"].items())
    )
    z = (summary["runs"].get("finetune") or {}).get("redshift") or {}
    for method, what in (("network", "the network's z head"), ("templates", "DR16Q templates (Z_PRED)")):
        m = z.get(method)
        if m:
            console.print(
                f"redshifts of the {z.get('n_quasars')} test quasars, {what}: catastrophic (|dv| > 3000 km/s) "
                f"{f(m.get('catastrophic_fraction'))}, median |dv| {f(m.get('median_abs_dv_kms'))} km/s, "
                f"NMAD {f(m.get('nmad'))}"
            )
    u = ((z.get("uncertainty") or {}).get("lowest_z_net_prob") or {}).get("network")
    if u:
        console.print(
            f"the {u['n_flagged']} of them with the lowest Z_NET_PROB: network z catastrophic {f(u['catastrophic_flagged'])} "
            f"(the other {u['n'] - u['n_flagged']}: {f(u['catastrophic_rest'])}), holding {f(u['share_of_catastrophic'])} "
            f"of its {u['n_catastrophic']} catastrophic redshifts"
        )
    dec = summary.get("decision_test_truth")
    if dec and dec.get("n_test"):
        console.print(
            f"the tool's decision on the {dec['n_test']} test spectra, against the simulation's truth: IS_QSO (the template "
            f"families decide or turn {dec['decided_by_templates']} calls where the network is unsure) F1 {f(dec['tool']['f1'])} "
            f"(precision {f(dec['tool']['precision'])}, recall {f(dec['tool']['recall'])}); the network alone "
            f"(P_QSO >= 0.5) F1 {f(dec['network']['f1'])}"
        )
    real = summary.get("real_check") or {}
    console.print("[bold]Every model above was trained on simulated spectra only.[/bold]")
    if real.get("n_real"):
        pc = real["per_class"]
        console.print(
            f"real spectra ({real['n_real']} files in {real.get('data')}, judged by their own pipeline class; "
            f"fine-tuned model; IS_QSO: {describe(real.get('templates', 'none'), real['threshold'])}): "
            + ", ".join(f"{c} {v['right']}/{v['n']} right" for c, v in pc.items())
            + f"; quasar recall {f(real['real_qso_recall'])}, SDSS others called quasars {f(real['real_fp_rate_sdss'])}, "
            f"LAMOST {f(real['real_fp_rate_lamost'])}; template z within 3000 km/s {f(real['real_z_within_3000_kms'])}; "
            f"{real.get('n_cut', 0)} file(s) refused by classify's cuts (not counted; with them: recall "
            f"{f(real.get('all_files_qso_recall'))}, LAMOST others called quasars {f(real.get('all_files_fp_rate_lamost'))}); "
            f"the network alone: recall {f(real.get('network_real_qso_recall'))}, SDSS others called quasars "
            f"{f(real.get('network_real_fp_rate_sdss'))}, LAMOST {f(real.get('network_real_fp_rate_lamost'))}"
        )
    elif real:
        console.print(f"real spectra: {real.get('skipped', 'not checked')}")
    if "total_s" in summary:
        console.print(
            f"demo finished in {summary['total_s']:.0f} s ({sum(summary.get('cpu_s', {}).values()):.0f} CPU s): "
            + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items())
        )
    console.print(f"report:     {summary['report']}")
    console.print(f"candidates: {summary['candidates']} (+ {Path(summary['candidates_parquet']).name})")
    console.print(f"look at them: {summary['inspect_command']}")
