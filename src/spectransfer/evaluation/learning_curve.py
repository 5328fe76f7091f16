"""Learning curves: test F1 / PR AUC against the number of target-survey labels, transfer vs scratch.

This is the figure that shows *when* transfer learning pays: for each fraction of the target
survey's training labels and several seeds, one run fine-tuned from the pretrained source run
and one trained from scratch, each scored on the test split. Every finished cell is recorded
in its own folder (``cell.json``), so an interrupted curve resumes where it stopped: finished
cells are skipped, a cell whose training was cut off resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spectransfer.errors import EvaluateError, TrainError
from spectransfer.evaluation.metrics import ranking_metrics, sigmoid, threshold_metrics
from spectransfer.evaluation.runner import check_run_matches_store
from spectransfer.provenance import atomic_path, dependency_versions, write_text_atomic

log = logging.getLogger(__name__)

MODES = ("finetune", "scratch")


def parse_fractions(text: str) -> list[float]:
    """'0.001,0.01,0.1,1' -> sorted unique fractions in (0, 1]; EvaluateError otherwise."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            f = float(part)
        except ValueError:
            raise EvaluateError(f"--fractions: {part!r} is not a number") from None
        if not 0 < f <= 1 or not math.isfinite(f):
            raise EvaluateError(f"--fractions: {f} is not in (0, 1]")
        out.append(f)
    if not out:
        raise EvaluateError("--fractions: give at least one fraction, e.g. 0.01,0.1,1")
    return sorted(set(out))


def cell_name(mode: str, fraction: float, seed: int) -> str:
    return f"{mode}-f{fraction:g}-s{seed}"


def _test_metrics(
    run_dir: Path, store: Any, rows: np.ndarray, labels: np.ndarray, batch_size: int, engine: str
) -> dict[str, Any]:
    from spectransfer.ml.score import score_store

    logits = np.asarray(score_store(run_dir, store, rows, batch_size=batch_size, engine=engine), dtype=np.float64)
    p = sigmoid(logits)
    m = threshold_metrics(labels, p, 0.5)
    r = ranking_metrics(labels, p)
    return {k: m[k] for k in ("precision", "recall", "f1", "confusion_matrix")} | r


def summarise(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of each (mode, fraction)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in cells:
        if c.get("status") == "done":
            groups.setdefault((c["mode"], c["fraction"]), []).append(c)
    out = []
    for (mode, frac), cs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row: dict[str, Any] = {
            "mode": mode,
            "fraction": frac,
            "n_seeds": len(cs),
            "n_train_labels": float(np.mean([c["n_train_labels"] for c in cs])),
            "n_train_qso": float(np.mean([c["n_train_qso"] for c in cs])),
        }
        for key in ("f1", "pr_auc", "precision", "recall", "roc_auc"):
            v = np.array([c[key] for c in cs if c.get(key) is not None], dtype=float)
            row[f"{key}_mean"] = float(v.mean()) if v.size else None
            row[f"{key}_std"] = float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else None)
        out.append(row)
    return out


def transfer_gain(cells: Sequence[dict[str, Any]], key: str = "f1") -> dict[str, Any]:
    """Fine-tuned vs scratch per label fraction: 95% intervals over seeds, whether they separate, the gain.

    For each fraction with both modes done: each mode's mean and 95% t-interval over seeds
    (:func:`~spectransfer.evaluation.active_learning.interval95`), ``separated`` when the two
    intervals do not overlap (never with fewer than 2 seeds in a mode), ``winner`` (``finetune``, ``scratch`` or None when they
    overlap), and ``gain``: fine-tuned minus scratch paired by seed (a seed draws the same
    label subset for both modes), its mean and 95% t-interval. ``first_separated`` is the
    row of the smallest fraction whose intervals separate, None when none does.
    """
    from spectransfer.evaluation.active_learning import interval95

    done = [c for c in cells if c.get("status") == "done" and c.get(key) is not None]
    rows = []
    for frac in sorted({c["fraction"] for c in done}):
        by_mode = {m: {c["seed"]: float(c[key]) for c in done if c["fraction"] == frac and c["mode"] == m} for m in MODES}
        if not by_mode["finetune"] or not by_mode["scratch"]:
            continue
        ft, sc = (interval95(list(by_mode[m].values())) for m in MODES)
        paired = sorted(set(by_mode["finetune"]) & set(by_mode["scratch"]))
        gain = interval95([by_mode["finetune"][s] - by_mode["scratch"][s] for s in paired], bounds=(-1.0, 1.0))
        # one seed has no interval (lo = hi = mean): never call that separated
        both = ft["n_seeds"] > 1 and sc["n_seeds"] > 1
        winner = None if not both else "finetune" if ft["lo"] > sc["hi"] else "scratch" if sc["lo"] > ft["hi"] else None
        n_labels = float(np.mean([c["n_train_labels"] for c in done if c["fraction"] == frac]))
        rows.append(
            {
                "fraction": frac,
                "n_train_labels": n_labels,
                "finetune": ft,
                "scratch": sc,
                "separated": winner is not None,
                "winner": winner,
                "gain": gain,
            }
        )
    first = next((r for r in rows if r["separated"]), None)
    return {"metric": key, "per_fraction": rows, "first_separated": first}


def run_learning_curve(
    source_run: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fractions: Sequence[float],
    seeds: int,
    *,
    survey: str | None = None,
    modes: Sequence[str] = MODES,
    train_options: dict[str, Any] | None = None,
    batch_size: int = 1024,
    engine: str = "torch",
    quiet: bool = False,
) -> dict[str, Any]:
    """Train and score every (mode, fraction, seed) cell not yet done; write DIR/learning_curve.json + .png."""
    from spectransfer.data.store import open_store
    from spectransfer.evaluation.report import figure_png, plot_learning_curve
    from spectransfer.ml.dataset import select
    from spectransfer.ml.train import TrainConfig, train
    from spectransfer.progress import progress_bar

    out = Path(out_dir)
    source = Path(source_run)
    if seeds < 1:
        raise EvaluateError(f"--seeds must be >= 1, got {seeds}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise EvaluateError(f"--modes must be among {', '.join(MODES)}, got {', '.join(modes) or 'nothing'}")
    if "finetune" in modes and not (source / "model.safetensors").is_file():
        raise EvaluateError(f"{source}: not a run folder (no model.safetensors)")
    store = open_store(store_path)
    if "finetune" in modes:
        check_run_matches_store(source, store)
    test_rows = np.asarray(store.rows(survey=survey, split="test"), dtype=np.int64)
    if test_rows.size == 0:
        raise EvaluateError(f"{store_path}: the test split{' of survey ' + survey if survey else ''} is empty")
    test_labels = select(store, survey, "test").labels.astype(np.int8)
    train_all = select(store, survey, "train")
    if len(train_all) == 0:
        raise EvaluateError(f"{store_path}: the training split{' of survey ' + survey if survey else ''} is empty")
    opts = dict(train_options or {})

    doc_path = out / "learning_curve.json"
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "format": "spectransfer-learning-curve",
        "format_version": 1,
        "versions": dependency_versions(),
        "source_run": str(source),
        "store": str(store_path),
        "store_id": store.info.get("store_id"),
        "survey": survey,
        "fractions": list(fractions),
        "seeds": list(range(seeds)),
        "modes": list(modes),
        "train_options": opts,
        "n_test": int(test_rows.size),
        "n_test_qso": int(test_labels.sum()),
        "n_train_available": len(train_all),
        "metric_threshold": 0.5,
        "cells": [],
    }
    if "finetune" in modes:
        zs_file = out / "zero_shot.json"
        if zs_file.is_file():
            doc["zero_shot"] = json.loads(zs_file.read_text())
        else:
            zs = _test_metrics(source, store, test_rows, test_labels, batch_size, engine)
            write_text_atomic(zs_file, json.dumps(zs, indent=2) + "\n")
            doc["zero_shot"] = zs

    plan = [(m, f, s) for f in fractions for s in range(seeds) for m in modes]
    cells: list[dict[str, Any]] = []
    with progress_bar("learning curve", total=len(plan), unit="runs", quiet=quiet) as bar:
        for mode, frac, seed in plan:
            cdir = out / "runs" / cell_name(mode, frac, seed)
            cfile = cdir / "cell.json"
            if cfile.is_file():
                cells.append(json.loads(cfile.read_text()))
                log.info("skipping finished cell %s", cdir.name)
                bar.advance(1)
                continue
            sub = train_all.subset(frac, None, seed)
            cell: dict[str, Any] = {
                "mode": mode,
                "fraction": frac,
                "seed": seed,
                "run_dir": str(cdir.relative_to(out)),
                "n_train_labels": len(sub),
                "n_train_qso": sub.n_pos,
            }
            cfg = TrainConfig(
                store=str(store_path),
                out=str(cdir),
                survey=survey,
                mode=mode,
                init=str(source) if mode == "finetune" else None,
                seed=seed,
                train_fraction=frac if frac < 1 else None,
                **opts,
            )
            try:
                resume = (cdir / "checkpoints" / "last.pt").exists() and not (cdir / "summary.json").exists()
                if not (cdir / "summary.json").exists():
                    train(cfg, resume=resume, quiet=True)
                cell.update(_test_metrics(cdir, store, test_rows, test_labels, batch_size, engine))
                cell["status"] = "done"
            except TrainError as exc:
                # A deterministic refusal (e.g. a tiny fraction with no quasar): record, do not retry.
                cell.update({"status": "skipped", "reason": str(exc)})
                log.warning("cell %s skipped: %s", cdir.name, exc)
            write_text_atomic(cfile, json.dumps(cell, indent=2) + "\n")
            cells.append(cell)
            doc["cells"] = cells
            doc["summary"] = summarise(cells)
            write_text_atomic(doc_path, json.dumps(doc, indent=2) + "\n")
            bar.advance(1)
    doc["cells"] = cells
    doc["summary"] = summarise(cells)
    write_text_atomic(doc_path, json.dumps(doc, indent=2) + "\n")
    if doc["summary"]:
        with atomic_path(out / "learning_curve.png") as tmp:
            tmp.write_bytes(figure_png(plot_learning_curve(doc), dpi=110))
    log.info("wrote %s", doc_path)
    return doc
