"""The experiment the paper did not run: transfer vs scratch vs zero-shot, and active learning, in one report.

``spectransfer experiment --out DIR`` (``make experiment``) simulates a LAMOST-like and an
SDSS-like survey, ingests both, pretrains the source run on LAMOST, then

* the learning curve (:mod:`spectransfer.evaluation.learning_curve`): fine-tuned vs trained
  from scratch on growing shares of the SDSS-like training labels (about 0.5% to 100%),
  several seeds, with the pretrained run used as it is (zero-shot) as the floor;
* the active-learning curve (:mod:`spectransfer.evaluation.active_learning`): uncertainty vs
  random inspection with the simulation's truth as the inspector;

and writes ``DIR/experiment.html`` with both figures, tables with 95% intervals over seeds,
and links to the JSON behind each. Every stage is resumable: rerun the same command after a
kill and finished stages, cells and rounds are read back, never repeated.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from spectransfer.demo import FULL as DEMO_FULL
from spectransfer.errors import EvaluateError
from spectransfer.evaluation.active_learning import inspections_to_match, interval95, run_active_learning
from spectransfer.evaluation.learning_curve import run_learning_curve, transfer_gain
from spectransfer.evaluation.report import _plt, figure_png
from spectransfer.provenance import atomic_path, dependency_versions, write_text_atomic
from spectransfer.simulate import CATALOG_NAME, simulate_survey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentSize:
    """Survey sizes, training lengths and the two curves' grids; saved in experiment.json."""

    n_lamost: int
    n_sdss: int
    lamost_qso_fraction: float
    pretrain_epochs: int
    train_batch: int
    max_steps: int  # per learning-curve cell and per active-learning round
    eval_every: int
    patience: int
    fractions: tuple[float, ...]
    seeds: int
    al_rounds: int
    al_per_round: int
    label_noise: float
    precision: str = "fp32"  # train --precision of every run (auto: bf16 where the device has it)


# DEFAULT is sized for <= 45 min on an idle 2-core CPU from per-step times measured with TINY
# (see the README's experiment section: an estimate until a full run is timed).
DEFAULT = ExperimentSize(
    n_lamost=4000,
    n_sdss=4000,
    lamost_qso_fraction=0.05,
    pretrain_epochs=2,
    train_batch=64,
    max_steps=30,
    eval_every=10,
    patience=2,
    fractions=(0.005, 0.02, 0.1, 0.3, 1.0),
    seeds=3,
    al_rounds=4,
    al_per_round=40,
    label_noise=0.05,
)
TINY = ExperimentSize(
    n_lamost=400,
    n_sdss=400,
    lamost_qso_fraction=0.1,
    pretrain_epochs=1,
    train_batch=32,
    max_steps=4,
    eval_every=2,
    patience=1,
    fractions=(0.1, 1.0),
    seeds=2,
    al_rounds=1,
    al_per_round=10,
    label_noise=0.05,
)
# CONVERGED is DEFAULT on the demo's surveys, every cell and round as deep as the demo's fine-tuning (at most 600 steps of
# 64, early stopping on val F1), so the curves describe trained networks: ~57 runs of ~230 s on
# an idle 2-core Xeon with bf16 (~3.6 h), minutes on a GPU (`--device cuda`).
CONVERGED = replace(
    DEFAULT,
    n_lamost=DEMO_FULL.n_lamost,
    n_sdss=DEMO_FULL.n_sdss,
    lamost_qso_fraction=DEMO_FULL.lamost_qso_fraction,
    max_steps=600,
    eval_every=60,
    patience=6,
    precision="auto",
)
SIZES = {"default": DEFAULT, "tiny": TINY, "converged": CONVERGED}
# The two figures (relative to OUT) and the JSON behind each; --docs copies both pairs.
FIGURES = {"learning_curve": "figures/learning_curve.png", "active_learning": "active_learning/active_learning.png"}
DATA = {"learning_curve": "learning_curve/learning_curve.json", "active_learning": "active_learning/active_learning.json"}


def _cpu() -> float:
    """CPU seconds of this process and its finished children (wall time on a shared machine says little)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _stage(out: Path, name: str, timings: dict[str, dict[str, float]], fn: Any) -> None:
    """Run ``fn`` unless OUT/stages/NAME.done says it finished; record its wall and CPU seconds."""
    done = out / "stages" / f"{name}.done"
    if done.is_file():
        timings[name] = json.loads(done.read_text())
        return
    t0, c0 = time.perf_counter(), _cpu()
    fn()
    timings[name] = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}
    write_text_atomic(done, json.dumps(timings[name]) + "\n")
    log.info("experiment stage %s done in %.1f s", name, timings[name]["wall_s"])


def _simulate(out: Path, size: ExperimentSize, seed: int) -> None:
    for name, n, q, s in (("lamost", size.n_lamost, size.lamost_qso_fraction, seed + 1), ("sdss", size.n_sdss, None, seed + 2)):
        if not (out / "surveys" / name / "truth.parquet").is_file():  # simulate writes a survey only when complete
            simulate_survey(name, n, out / "surveys" / name, seed=s, qso_fraction=q, overwrite=True)


def _ingest(out: Path, name: str, quiet: bool) -> None:
    from spectransfer.data.ingest import ingest  # dask

    folder = out / "surveys" / name
    spectra = [d for d in sorted(folder.iterdir()) if d.is_dir()]
    ingest(spectra, out / "stores" / name, survey=name, catalogs=[folder / CATALOG_NAME[name]], workers=0, quiet=quiet)


def _train_options(size: ExperimentSize, device: str = "cpu") -> dict[str, Any]:
    # pos-weight: a few dozen steps of plain BCE keep every probability below 0.5 (see demo.py).
    return {
        "max_steps": size.max_steps,
        "eval_every": size.eval_every,
        "patience": size.patience,
        "batch_size": size.train_batch,
        "imbalance": "pos-weight",
        "precision": size.precision,
        "device": device,
        "num_workers": 0,
    }


def _pretrain(out: Path, size: ExperimentSize, seed: int, device: str = "cpu") -> None:
    from spectransfer.ml.train import TrainConfig, train

    run = out / "runs" / "pretrain"
    # the cells' options, but epochs instead of a step budget and twice the patience
    opts = {**_train_options(size, device), "patience": size.patience * 2}
    del opts["max_steps"]
    cfg = TrainConfig(
        store=str(out / "stores" / "lamost"), out=str(run), mode="scratch", seed=seed, max_epochs=size.pretrain_epochs, **opts
    )
    if not (run / "summary.json").is_file():
        train(cfg, resume=(run / "checkpoints" / "last.pt").exists(), quiet=True)


def prune_checkpoints(runs: Path) -> int:
    """Delete checkpoints/ of finished runs (summary.json and cell.json written): ~110 MB each, only a resume reads them."""
    n = 0
    for cell in sorted(runs.glob("*/cell.json")):
        ck = cell.parent / "checkpoints"
        if (cell.parent / "summary.json").is_file() and ck.is_dir():
            shutil.rmtree(ck, ignore_errors=True)
            n += 1
    return n


def learning_curve_intervals(lc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (mode, fraction): mean and 95% t-interval over seeds of F1 and PR AUC (learning_curve.json's cells)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in lc.get("cells", []):
        if c.get("status") == "done":
            groups.setdefault((c["mode"], c["fraction"]), []).append(c)
    rows = []
    for (mode, frac), cs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append(
            {
                "mode": mode,
                "fraction": frac,
                "n_train_labels": sum(c["n_train_labels"] for c in cs) / len(cs),
                "f1": interval95([c.get("f1") for c in cs]),
                "pr_auc": interval95([c.get("pr_auc") for c in cs]),
            }
        )
    return rows


def plot_learning_curve_intervals(lc: dict[str, Any]) -> Any:
    """F1 and PR AUC against the number of training labels: mean and 95% t-interval band per mode, single seeds as dots."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"finetune": ("#1f77b4", "o", "fine-tuned from source run"), "scratch": ("#d62728", "s", "from scratch")}
    for ax, key, title in zip(axes, ("f1", "pr_auc"), ("F1 (threshold 0.5)", "PR AUC (average precision)")):
        rows = transfer_gain(lc.get("cells", []), key)["per_fraction"]
        x = np.array([r["n_train_labels"] for r in rows], dtype=float)
        for mode, (color, marker, label) in styles.items():
            mean, lo, hi = (
                np.array([np.nan if r[mode][k] is None else r[mode][k] for r in rows], dtype=float) for k in ("mean", "lo", "hi")
            )
            ax.plot(x, mean, marker=marker, color=color, label=label, lw=1.5)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15)
            dots = [(c["n_train_labels"], c[key]) for c in lc.get("cells", []) if c.get("status") == "done" and c["mode"] == mode]
            if dots:
                ax.plot(*zip(*dots), ".", color=color, alpha=0.4, ms=4)
        for r in rows:
            if r["separated"]:
                ax.annotate("*", (r["n_train_labels"], 1.0), ha="center", va="top", fontsize=14)
        zs = (lc.get("zero_shot") or {}).get(key)
        if zs is not None:
            ax.axhline(zs, color="0.4", ls="--", lw=1.2, label=f"zero-shot source run ({zs:.3f})")
        ax.set_xscale("log")
        ax.set(xlabel="number of training labels (target survey)", ylabel=f"test {title}", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    n_seeds = len(lc.get("seeds", [])) or "?"
    fig.suptitle(
        f"Learning curve: mean and 95% t-interval over {n_seeds} seeds (dots = single seeds; * = the two intervals separate)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def answers(lc: dict[str, Any], al: dict[str, Any]) -> dict[str, Any]:
    """The issue's two questions, computed from the two JSON documents, with one sentence each."""
    gain = {key: transfer_gain(lc.get("cells", []), key) for key in ("f1", "pr_auc")}
    match = inspections_to_match(al.get("rounds", []))
    text = []
    r, per_round = match["ratio"], al.get("settings", {}).get("per_round")
    if r["mean"] is None:
        text.append("Active learning: no seed has both curves finished yet; no ratio.")
    else:
        n_ref = match["per_seed"][0]["n_reference"]
        verdict = (
            "met" if r["hi"] <= 0.5 else "met on the mean only (the interval reaches past 50%)" if r["mean"] <= 0.5 else "not met"
        )
        missed = (
            f" In {match['n_not_reached']} of {match['n_seeds']} seeds uncertainty sampling never reached it, so this is a lower bound."
            if match["n_not_reached"]
            else ""
        )
        if match["n_reference_no_gain"]:
            missed += (
                f" In {match['n_reference_no_gain']} of {match['n_seeds']} seeds random sampling's final F1 was no higher than "
                "the start (round 0, nothing inspected), so there the ratio is 0 trivially."
            )
        text.append(
            f"Active learning: uncertainty sampling reached random sampling's final test F1 (after {n_ref} inspections) "
            f"with {_pct(r['mean'])} of its inspections (95% t-interval over {r['n_seeds']} seeds: {_pct(r['lo'])} to {_pct(r['hi'])}; "
            f"resolution one round = {_pct(per_round / n_ref if per_round else None)}); target <= 50%: {verdict}.{missed}"
        )
    for key, name in (("f1", "F1"), ("pr_auc", "PR AUC")):
        first = gain[key]["first_separated"]
        fr = gain[key]["per_fraction"]
        if not fr:
            text.append(f"Transfer vs scratch ({name}): no fraction has both modes finished yet.")
        elif first is None:
            text.append(
                f"Transfer vs scratch ({name}): the 95% intervals over seeds overlap at every label fraction "
                f"({', '.join(format(r['fraction'], 'g') for r in fr)}); they never separate."
            )
        else:
            g = first["gain"]
            text.append(
                f"Transfer vs scratch ({name}): the smallest label fraction where the 95% intervals separate is {first['fraction']:g} "
                f"({first['n_train_labels']:.0f} labels): {'transfer' if first['winner'] == 'finetune' else 'scratch'} wins, "
                f"fine-tuned {_ci(first['finetune'])} vs scratch {_ci(first['scratch'])}; transfer's gain {g['mean']:+.3f} "
                f"(paired over seeds, 95% t-interval [{g['lo']:+.3f}, {g['hi']:+.3f}]). Separated at: "
                f"{', '.join(format(r['fraction'], 'g') + ' (' + r['winner'] + ')' for r in fr if r['separated'])}."
            )
    return {"transfer_gain": gain, "inspections_to_match": match, "text": text}


def _ci(iv: dict[str, Any]) -> str:
    if iv.get("mean") is None:
        return "–"
    return f"{iv['mean']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p>({html.escape(alt)}: no figure yet)</p>"
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" style="max-width:100%" src="data:image/png;base64,{b64}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_experiment_html(out: Path, doc: dict[str, Any], lc: dict[str, Any], al: dict[str, Any]) -> Path:
    """OUT/experiment.html: both figures embedded, tables with 95% intervals, links to the JSON."""
    zs = lc.get("zero_shot") or {}
    lc_rows = [
        [
            html.escape(r["mode"]),
            f"{r['fraction']:g}",
            f"{r['n_train_labels']:.0f}",
            str(r["f1"]["n_seeds"]),
            _ci(r["f1"]),
            _ci(r["pr_auc"]),
        ]
        for r in doc["learning_curve_intervals"]
    ]
    lc_rows.append(
        [
            "zero-shot (source run as it is)",
            "–",
            "0",
            "–",
            f"{zs.get('f1', float('nan')):.3f}",
            f"{zs.get('pr_auc', float('nan')):.3f}",
        ]
    )
    strategies = al["settings"]["strategies"]
    al_rows = [
        [str(i), "–" if n is None else str(n)]
        + [_ci({k: al[f"{m}_{s}"][k][i] for k in ("mean", "lo", "hi")}) for s in strategies for m in ("f1", "pr_auc")]
        for i, n in enumerate(al["n_inspected"])
    ]
    al_head = ["round", "inspected"] + [f"{m} {s}" for s in strategies for m in ("F1", "PR AUC")]
    size = doc["size"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>spectransfer experiment</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.note{color:#555}</style></head><body>",
        "<h1>Transfer vs scratch vs zero-shot, and active learning</h1>",
        f"<p class='note'>Simulated LAMOST-like survey ({size['n_lamost']} spectra) as the source, SDSS-like ({size['n_sdss']}) as "
        f"the target; test split of {lc.get('n_test', '?')} spectra ({lc.get('n_test_qso', '?')} catalogue quasars). "
        f"Every run trains at most {size['max_steps']} steps of {size['train_batch']} spectra (equal budget for every cell). "
        f"Intervals: 95% Student-t over {size['seeds']} seeds. {'Complete.' if doc['complete'] else 'INCOMPLETE: rerun to finish.'}</p>",
        "<h2>Answers</h2>",
        "<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in doc.get("answers", {}).get("text", [])) + "</ul>",
        "<h2>Learning curve</h2>",
        "<p class='note'>Test F1 at 0.5 and PR AUC against the number of SDSS-like training labels (catalogue labels). "
        "Data: <a href='learning_curve/learning_curve.json'>learning_curve/learning_curve.json</a>.</p>",
        _img(out / FIGURES["learning_curve"], "learning curve"),
        _table(["mode", "fraction", "training labels", "seeds", "F1 (95% CI)", "PR AUC (95% CI)"], lc_rows),
        "<h2>Active learning</h2>",
        f"<p class='note'>Training labels: the SDSS-like catalogue ({al.get('n_catalog_wrong_train', '?')} wrong in the training split: "
        f"quasars it left out) with {al['settings']['label_noise']:g} of them flipped; each round {al['settings']['per_round']} "
        "spectra are inspected (the simulation's truth gives their label through <code>spectransfer label</code>), chosen by "
        "uncertainty (P(QSO) of the previous round's model closest to 0.5) or at random; each round fine-tunes the source run "
        "again; test metrics against the true classes. "
        "Data: <a href='active_learning/active_learning.json'>active_learning/active_learning.json</a>.</p>",
        _img(out / FIGURES["active_learning"], "active learning"),
        _table(al_head, al_rows),
        "<h2>Run</h2>",
        f"<p class='note'>Stage wall and CPU seconds: {html.escape(json.dumps({k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in doc['timings'].items()}))}. "
        f"Settings and versions: <a href='experiment.json'>experiment.json</a>.</p>",
        "</body></html>",
    ]
    path = out / "experiment.html"
    write_text_atomic(path, "\n".join(parts))
    return path


def portable(obj: Any, root: Path) -> Any:
    """``obj`` (JSON data) with every string path under ``root`` made relative to it: no machine paths in docs/."""
    if isinstance(obj, dict):
        return {k: portable(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, root) for v in obj]
    if isinstance(obj, str) and (obj == str(root) or obj.startswith(str(root) + os.sep)):
        return os.path.relpath(obj, root)
    return obj


def write_docs(
    out: Path,
    docs: Path,
    doc: dict[str, Any],
    lc: dict[str, Any],
    al: dict[str, Any],
    parts: tuple[str, ...] = ("learning_curve", "active_learning"),
) -> list[Path]:
    """DOCS/{learning_curve,active_learning}.{png,json} (those of ``parts``): each figure with the JSON it is drawn from.

    The JSON is the curve's own document (paths made relative to OUT) plus ``answers`` (the
    numbers the README quotes) and ``experiment`` (size, seed, stage timings). Only these
    files are written, each atomically; nothing else in DOCS is touched.
    """
    docs.mkdir(parents=True, exist_ok=True)
    run = {k: doc[k] for k in ("size", "seed", "timings", "complete", "versions")}
    extra = {
        "learning_curve": {"intervals_95": doc["learning_curve_intervals"], "answers": doc["answers"]["transfer_gain"]},
        "active_learning": {"answers": doc["answers"]["inspections_to_match"]},
    }
    written = []
    for name, data in (("learning_curve", lc), ("active_learning", al)):
        if name not in parts:
            continue
        body = dict(portable(data, out), **extra[name], answer_text=doc["answers"]["text"], experiment=run)
        write_text_atomic(docs / f"{name}.json", json.dumps(body, indent=2) + "\n")
        with atomic_path(docs / f"{name}.png") as tmp:
            shutil.copyfile(out / FIGURES[name], tmp)
        written += [docs / f"{name}.png", docs / f"{name}.json"]
    return written


def run_experiment(
    out_dir: str | os.PathLike[str],
    size: str | ExperimentSize = "default",
    seed: int = 0,
    quiet: bool = False,
    docs: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run (or resume) every stage; write OUT/experiment.json and OUT/experiment.html; return the document.

    ``device``: where every run trains (cpu, cuda); not part of the experiment's identity.

    With ``docs``, each finished curve also writes its figure and the JSON behind it there
    (:func:`write_docs`): the learning curve always (the stage returns only when every cell
    is recorded), the active-learning curve only when every round finished (``docs_written``).
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise EvaluateError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
        size = SIZES[size]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sfile = out / "size.json"
    size_dict: dict[str, Any] = asdict(size)
    size_dict["fractions"] = list(size.fractions)
    want = {"size": size_dict, "seed": seed}
    if sfile.is_file() and json.loads(sfile.read_text()) != want:
        raise EvaluateError(f"{out}: holds an experiment of another size or seed ({sfile}); choose a new --out")
    write_text_atomic(sfile, json.dumps(want, indent=2) + "\n")
    timings: dict[str, dict[str, float]] = {}
    opts = _train_options(size, device)
    source, sdss = out / "runs" / "pretrain", out / "stores" / "sdss"
    _stage(out, "simulate", timings, lambda: _simulate(out, size, seed))
    _stage(out, "ingest-lamost", timings, lambda: _ingest(out, "lamost", quiet))
    _stage(out, "ingest-sdss", timings, lambda: _ingest(out, "sdss", quiet))
    _stage(out, "pretrain", timings, lambda: _pretrain(out, size, seed, device))
    results: dict[str, Any] = {}
    # the two curves resume cell by cell themselves; their stage marks only time the finished call
    _stage(
        out,
        "learning-curve",
        timings,
        lambda: results.update(
            lc=run_learning_curve(
                source, sdss, out / "learning_curve", size.fractions, size.seeds, train_options=opts, batch_size=512, quiet=quiet
            )
        ),
    )
    _stage(
        out,
        "active-learning",
        timings,
        lambda: results.update(
            al=run_active_learning(
                source,
                sdss,
                out / "surveys" / "sdss" / "truth.parquet",
                out / "active_learning",
                rounds=size.al_rounds,
                per_round=size.al_per_round,
                seeds=size.seeds,
                label_noise=size.label_noise,
                train_options=opts,
                batch_size=512,
                quiet=quiet,
            )
        ),
    )
    prune_checkpoints(out / "learning_curve" / "runs")
    lc = results.get("lc") or json.loads((out / "learning_curve" / "learning_curve.json").read_text())
    al = results.get("al") or json.loads((out / "active_learning" / "active_learning.json").read_text())
    doc = {
        "format": "spectransfer-experiment",
        "format_version": 1,
        "versions": dependency_versions(),
        **want,
        "timings": timings,
        "complete": bool(al.get("complete")),
        "learning_curve_intervals": learning_curve_intervals(lc),
        "answers": answers(lc, al),
        "files": {
            "learning_curve": DATA["learning_curve"],
            "active_learning": DATA["active_learning"],
            "learning_curve_png": FIGURES["learning_curve"],
            "active_learning_png": FIGURES["active_learning"],
        },
    }
    if learning_curve_intervals(lc):
        with atomic_path(out / FIGURES["learning_curve"]) as tmp:
            tmp.write_bytes(figure_png(plot_learning_curve_intervals(lc), dpi=110))
    write_text_atomic(out / "experiment.json", json.dumps(doc, indent=2) + "\n")
    write_experiment_html(out, doc, lc, al)
    doc["docs_written"] = []
    if docs is not None:
        parts = ("learning_curve", "active_learning") if doc["complete"] else ("learning_curve",)
        if not doc["complete"]:
            log.warning("%s: active learning incomplete, its figure not written to %s (rerun to finish)", out, docs)
        doc["docs_written"] = [str(p) for p in write_docs(out, Path(docs), doc, lc, al, parts)]
    return doc
