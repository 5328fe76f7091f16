"""Active learning on a simulated survey: which spectra should a person inspect to improve the model?

Visual inspection is the bottleneck of quasar searches (the method paper's authors inspected
1,223 false positives by hand), and DESI's QuasarNET retrained on 5,600 actively chosen,
visually inspected spectra matched its BOSS-trained weights with under a tenth of the data
(Green et al. 2025). This experiment measures the same loop on a simulated survey, where the
simulation's truth plays the inspector:

* the training labels are the target store's catalogue labels (the simulator leaves ~3% of
  true quasars out of its catalogue), optionally with ``label_noise``: that share of the
  training split's labels flipped (both ways; per seed, validation and test left alone);
* round 0 fine-tunes the source run on those labels;
* each later round "inspects" ``per_round`` more training spectra, chosen either by
  *uncertainty* (P(QSO) of the previous round's model closest to 0.5) or at *random*; every
  inspected spectrum gets its true label through the same path a person's verdicts take
  (a verdicts table applied with :func:`spectransfer.data.labels.apply_verdicts`);
* every round fine-tunes the *source run* again (not the previous round's weights, so each
  point depends on the inspected set only, not on the path of earlier trainings) and is
  scored on the test split against the *true* labels.

Each finished round writes ``round.json`` atomically (its picks are written before it
trains), so a killed experiment resumes: finished rounds are read back, never repeated, and
an interrupted training continues from its checkpoint. ``active_learning.json`` holds the
curves (mean and 95% t-interval over seeds per point, clipped to [0, 1]) and ``active_learning.png`` draws them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from spectransfer.data.labels import apply_verdicts, set_catalog_labels
from spectransfer.data.store import open_store, write_table
from spectransfer.errors import EvaluateError, TrainError
from spectransfer.evaluation.report import _plt, figure_png
from spectransfer.evaluation.runner import check_run_matches_store, ranking_metrics, sigmoid, threshold_metrics
from spectransfer.progress import progress_bar
from spectransfer.provenance import atomic_path, dependency_versions, write_text_atomic

log = logging.getLogger(__name__)

STRATEGIES = ("uncertainty", "random")
# The simulation's truth table (simulate writes truth.parquet): the only columns read here.
TRUTH_ID, TRUTH_CLASS, TRUTH_QSO = "spectrum_id", "true_class", "QSO"
FORMAT = "spectransfer-active-learning"


def true_labels(truth_path: str | os.PathLike[str], spectrum_ids: Sequence[str]) -> np.ndarray:
    """1 where the simulation's truth says quasar, 0 otherwise, aligned with ``spectrum_ids``."""
    path = Path(truth_path)
    try:
        truth = pd.read_parquet(path, columns=[TRUTH_ID, TRUTH_CLASS])
    except Exception as exc:  # noqa: BLE001 - arrow raises many types for a missing file or column
        raise EvaluateError(f"{path}: cannot read {TRUTH_ID}/{TRUTH_CLASS} from the simulation's truth ({exc})") from None
    cls = truth.drop_duplicates(TRUTH_ID).set_index(TRUTH_ID)[TRUTH_CLASS].reindex(pd.Index(list(spectrum_ids)))
    if cls.isna().any():
        raise EvaluateError(
            f"{path}: {int(cls.isna().sum())} spectra of the store are not in the truth table (first: {cls.index[cls.isna()][0]})"
        )
    return (cls.astype(str).str.upper() == TRUTH_QSO).to_numpy(dtype=np.int8)


def score_logits(run_dir: Path, store: Any, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Float64 logits of ``rows``: the one place this module calls the scorer."""
    from spectransfer.ml.score import score_store

    return np.asarray(score_store(run_dir, store, rows, batch_size=batch_size, engine="torch"), dtype=np.float64)


def select_uncertain(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` probabilities closest to 0.5 (ties: lower index first)."""
    return np.argsort(np.abs(np.asarray(p, dtype=np.float64) - 0.5), kind="stable")[:k]


def select_random(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def interval95(values: Sequence[float | None], bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Mean and 95% Student-t interval of the mean over seeds, clipped to ``bounds`` (F1 and PR AUC
    live in [0, 1]; with 2-3 seeds t is 12.7 or 4.3 and the raw interval easily leaves it)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n_seeds": 0}
    mean = float(v.mean())
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return {"mean": mean, "lo": max(bounds[0], mean - half), "hi": min(bounds[1], mean + half), "n_seeds": int(v.size)}


# ---- the working store: the target's spectra, this experiment's labels -------------------------


def _working_store(out: Path, target: Any) -> Path:
    """OUT/store: a link to the target's spectra.zarr with its own store.json and meta.parquet."""
    work = out / "store"
    if (work / "store.json").is_file():
        return work
    tmp = out / ".store.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "spectra.zarr").symlink_to((target.path / "spectra.zarr").resolve(), target_is_directory=True)
    write_table(target.meta, tmp / "meta.parquet", target.schema)
    info = dict(target.info, active_learning_of=str(target.path))
    write_text_atomic(tmp / "store.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, work)
    return work


def _set_labels(work: Path, base: np.ndarray, verdicts: pd.DataFrame | None, vfile: Path | None) -> None:
    """Catalogue labels ``base`` (noise included), then the inspections as verdicts on top."""
    store = open_store(work)
    set_catalog_labels(store, base, reason="active-learning experiment (catalogue labels with label noise)")
    if verdicts is not None and len(verdicts) and vfile is not None:
        with atomic_path(vfile) as tmp:
            verdicts.to_parquet(tmp, index=False)
        apply_verdicts(work, vfile)


def _verdicts(ids: Sequence[str], truth: Sequence[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "spectrum_id": list(ids),
            "verdict": ["qso" if t else "not_qso" for t in truth],
            "inspector": "simulation-truth",
            "created_at": "1970-01-01T00:00:00",
        }
    )


# ---- one round ----------------------------------------------------------------------------------


def _train_and_score(ctx: dict[str, Any], run_dir: Path, seed: int) -> dict[str, Any]:
    from spectransfer.ml.train import TrainConfig, train

    cfg = TrainConfig(
        store=str(ctx["work"]),
        out=str(run_dir),
        survey=ctx["survey"],
        mode="finetune",
        init=str(ctx["source"]),
        seed=seed,
        **ctx["train_options"],
    )
    if not (run_dir / "summary.json").exists():
        train(cfg, resume=(run_dir / "checkpoints" / "last.pt").exists(), quiet=True)
    store = open_store(ctx["work"])
    p = sigmoid(score_logits(run_dir, store, ctx["test_rows"], ctx["batch_size"]))
    m = threshold_metrics(ctx["test_truth"], p, 0.5)
    return {k: m[k] for k in ("precision", "recall", "f1", "confusion_matrix")} | ranking_metrics(ctx["test_truth"], p)


def _pick(ctx: dict[str, Any], strategy: str, seed: int, rnd: int, inspected: np.ndarray, prev_run: Path) -> np.ndarray:
    """Pool positions (into ctx['pool_rows']) to inspect this round."""
    pool = np.flatnonzero(~inspected)
    k = min(ctx["per_round"], pool.size)
    if strategy == "random":
        return pool[select_random(pool.size, k, np.random.default_rng([seed, 2, rnd]))]
    store = open_store(ctx["work"])
    p = sigmoid(score_logits(prev_run, store, ctx["pool_rows"][pool], ctx["batch_size"]))
    return pool[select_uncertain(p, k)]


def _run_round(ctx: dict[str, Any], seed: int, strategy: str, rnd: int, prev: dict[str, Any] | None) -> dict[str, Any]:
    """Pick (unless already picked), relabel the working store, fine-tune, score; write round.json."""
    sdir = ctx["out"] / f"seed-{seed}"
    rdir = sdir / "round-0" if rnd == 0 else sdir / strategy / f"round-{rnd}"
    n_pool = ctx["pool_rows"].size
    inspected = np.zeros(n_pool, dtype=bool)
    picks: list[int] = []
    if rnd > 0:
        assert prev is not None
        inspected[np.asarray(prev["inspected_positions"], dtype=np.int64)] = True
        pick_file = rdir / "picks.json"
        if pick_file.is_file():
            picks = json.loads(pick_file.read_text())["positions"]
        else:
            picks = [int(i) for i in _pick(ctx, strategy, seed, rnd, inspected, ctx["out"] / prev["run_dir"])]
            write_text_atomic(pick_file, json.dumps({"positions": picks}) + "\n")
        inspected[np.asarray(picks, dtype=np.int64)] = True
    base = ctx["noisy"][seed]
    pos = np.flatnonzero(inspected)
    ids = ctx["pool_ids"][pos]
    truth = ctx["pool_truth"][pos]
    labels_now = base.copy()
    labels_now[ctx["pool_meta_index"][pos]] = truth
    _set_labels(ctx["work"], base, _verdicts(ids, truth) if pos.size else None, rdir / "verdicts.parquet")
    record: dict[str, Any] = {
        "seed": seed,
        "strategy": "both" if rnd == 0 else strategy,
        "round": rnd,
        "n_inspected": int(pos.size),
        "run_dir": str((rdir / "run").relative_to(ctx["out"])),
        "inspected_positions": [int(i) for i in pos],
        "n_picked_qso": int(ctx["pool_truth"][picks].sum()) if picks else 0,
        "n_corrected_this_round": int((base[ctx["pool_meta_index"][picks]] != ctx["pool_truth"][picks]).sum()) if picks else 0,
        "n_wrong_train_labels": int((labels_now[ctx["pool_meta_index"]] != ctx["pool_truth"]).sum()),
    }
    try:
        record.update(_train_and_score(ctx, rdir / "run", seed))
        record["status"] = "done"
    except TrainError as exc:
        record.update({"status": "skipped", "reason": str(exc)})
        log.warning("round %s skipped: %s", rdir, exc)
    write_text_atomic(rdir / "round.json", json.dumps(record, indent=2) + "\n")
    # last.pt (model + Adam state, ~110 MB for VGG-A) only serves a resume; the round is final now
    shutil.rmtree(rdir / "run" / "checkpoints", ignore_errors=True)
    return record


# ---- the experiment -----------------------------------------------------------------------------


def _context(source: Path, store_path: Path, truth: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    target = open_store(store_path)
    meta = target.meta.reset_index(drop=True)
    survey = settings["survey"]
    in_survey = np.ones(len(meta), dtype=bool) if survey is None else (meta["survey"] == survey).to_numpy()
    split = meta["split"].to_numpy(dtype=object)
    pool_idx = np.flatnonzero(in_survey & (split == "train"))
    pool_idx = pool_idx[np.argsort(meta["row"].to_numpy()[pool_idx])]
    test_idx = np.flatnonzero(in_survey & (split == "test"))
    test_idx = test_idx[np.argsort(meta["row"].to_numpy()[test_idx])]
    if pool_idx.size == 0 or test_idx.size == 0:
        raise EvaluateError(f"{store_path}: the train and test splits must both hold spectra")
    all_truth = true_labels(truth, meta["spectrum_id"].astype(str).tolist())
    catalog = meta["label"].to_numpy(dtype=np.int8)
    noisy = {}
    for seed in range(settings["seeds"]):
        lab = catalog.copy()
        n_flip = int(round(settings["label_noise"] * pool_idx.size))
        flip = np.random.default_rng([seed, 1]).choice(pool_idx, size=n_flip, replace=False) if n_flip else np.zeros(0, np.int64)
        lab[flip] = 1 - lab[flip]
        noisy[seed] = lab
    return {
        "out": out,
        "source": source,
        "survey": survey,
        "work": _working_store(out, target),
        "train_options": settings["train_options"],
        "batch_size": settings["batch_size"],
        "per_round": settings["per_round"],
        "pool_rows": meta["row"].to_numpy(dtype=np.int64)[pool_idx],
        "pool_ids": meta["spectrum_id"].astype(str).to_numpy()[pool_idx],
        "pool_truth": all_truth[pool_idx],
        "pool_meta_index": pool_idx,
        "noisy": noisy,
        "test_rows": meta["row"].to_numpy(dtype=np.int64)[test_idx],
        "test_truth": all_truth[test_idx],
        "catalog_wrong_train": int((catalog[pool_idx] != all_truth[pool_idx]).sum()),
    }


def summarise(records: Sequence[dict[str, Any]], strategies: Sequence[str], rounds: int) -> dict[str, Any]:
    """The curves: per round, n_inspected and mean/95% interval over seeds of F1 and PR AUC per strategy."""
    done = [r for r in records if r.get("status") == "done"]
    out: dict[str, Any] = {"round": list(range(rounds + 1)), "n_inspected": []}
    for rnd in range(rounds + 1):
        at = [r for r in done if r["round"] == rnd]
        out["n_inspected"].append(int(np.median([r["n_inspected"] for r in at])) if at else None)
    for key in ("f1", "pr_auc"):
        for strategy in strategies:
            pts = [
                interval95([r.get(key) for r in done if r["round"] == rnd and r["strategy"] in (strategy, "both")])
                for rnd in range(rounds + 1)
            ]
            out[f"{key}_{strategy}"] = {k: [p[k] for p in pts] for k in ("mean", "lo", "hi", "n_seeds")}
    return out


def inspections_to_match(
    records: Sequence[dict[str, Any]], strategy: str = "uncertainty", reference: str = "random", key: str = "f1"
) -> dict[str, Any]:
    """How many inspections ``strategy`` needs to reach ``reference``'s final ``key``, as a share of the reference's.

    Per seed: the target is the reference strategy's ``key`` at its last finished round (its
    whole inspection budget); ``n_needed`` is the fewest inspections of the first ``strategy``
    round (round 0, the shared start, included) whose ``key`` is at least the target; the
    ratio is ``n_needed`` over the reference's inspections. The resolution is one round
    (``per_round`` inspections). A seed where ``strategy`` never reaches the target has ratio
    None and counts in ``n_not_reached``; ``ratio`` is the mean and 95% t-interval over the
    seeds that reached it (a lower bound when any did not). ``n_reference_no_gain`` counts the
    seeds whose reference ended no higher than round 0 (there the ratio is 0 trivially).
    """
    done = [r for r in records if r.get("status") == "done" and r.get(key) is not None]
    per_seed = []
    for seed in sorted({r["seed"] for r in done}):
        ref = sorted((r for r in done if r["seed"] == seed and r["strategy"] in (reference, "both")), key=lambda r: r["round"])
        own = sorted((r for r in done if r["seed"] == seed and r["strategy"] in (strategy, "both")), key=lambda r: r["round"])
        if not ref or ref[-1]["round"] == 0 or ref[-1]["n_inspected"] <= 0:
            continue  # the reference inspected nothing: no budget to compare with
        target, n_ref = float(ref[-1][key]), int(ref[-1]["n_inspected"])
        hit = next((r for r in own if r[key] >= target), None)
        n_needed = None if hit is None else int(hit["n_inspected"])
        per_seed.append(
            {
                "seed": seed,
                "start": float(ref[0][key]) if ref[0]["round"] == 0 else None,
                "target": target,
                "n_reference": n_ref,
                "n_needed": n_needed,
                "ratio": None if n_needed is None else n_needed / n_ref,
            }
        )
    ratios = [s["ratio"] for s in per_seed if s["ratio"] is not None]
    return {
        "strategy": strategy,
        "reference": reference,
        "metric": key,
        "per_seed": per_seed,
        "n_seeds": len(per_seed),
        "n_not_reached": sum(s["ratio"] is None for s in per_seed),
        # seeds where the reference ended no higher than the shared start: matched with 0 inspections, trivially
        "n_reference_no_gain": sum(s["start"] is not None and s["target"] <= s["start"] for s in per_seed),
        "ratio": interval95(ratios, bounds=(0.0, float("inf"))),
    }


def plot_active_learning(doc: dict[str, Any]) -> Any:
    """Test F1 and PR AUC against the number of inspected spectra, one band per strategy."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"uncertainty": ("#1f77b4", "o", "uncertainty (P(QSO) closest to 0.5)"), "random": ("#d62728", "s", "random")}
    x = np.array([np.nan if v is None else v for v in doc["n_inspected"]], dtype=float)
    for ax, key, title in zip(axes, ("f1", "pr_auc"), ("F1 (threshold 0.5)", "PR AUC (average precision)")):
        for strategy in doc["settings"]["strategies"]:
            c = doc.get(f"{key}_{strategy}")
            if not c:
                continue
            color, marker, label = styles.get(strategy, ("grey", "^", strategy))
            mean, lo, hi = (np.array([np.nan if v is None else v for v in c[k]], dtype=float) for k in ("mean", "lo", "hi"))
            ax.plot(x, mean, marker=marker, color=color, label=label, lw=1.5)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15)
        ax.set(xlabel="spectra inspected (true label given)", ylabel=f"test {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    s = doc["settings"]
    fig.suptitle(
        f"Active learning: {s['per_round']} inspections per round, label noise {s['label_noise']:g}, "
        f"mean and 95% interval over {s['seeds']} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _write(out: Path, doc: dict[str, Any], records: list[dict[str, Any]]) -> None:
    doc["rounds"] = sorted(records, key=lambda r: (r["seed"], r["round"], r["strategy"]))
    doc.update(summarise(records, doc["settings"]["strategies"], doc["settings"]["rounds"]))
    write_text_atomic(out / "active_learning.json", json.dumps(doc, indent=2) + "\n")


def run_active_learning(
    source_run: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rounds: int = 4,
    per_round: int = 50,
    seeds: int = 3,
    strategies: Sequence[str] = STRATEGIES,
    label_noise: float = 0.0,
    survey: str | None = None,
    train_options: dict[str, Any] | None = None,
    batch_size: int = 1024,
    stop_after: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the experiment; write OUT/active_learning.json and .png; return the document.

    ``stop_after`` ends this call after that many newly finished rounds (the rest is left for
    a rerun, as after a kill).
    """
    source, out = Path(source_run), Path(out_dir)
    if not (source / "model.safetensors").is_file():
        raise EvaluateError(f"{source}: not a run folder (no model.safetensors)")
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise EvaluateError(f"--strategies must be among {', '.join(STRATEGIES)}, got {', '.join(strategies) or 'nothing'}")
    if rounds < 1 or per_round < 1 or seeds < 1:
        raise EvaluateError(f"--rounds, --per-round and --seeds must be >= 1 (got {rounds}, {per_round}, {seeds})")
    if not 0.0 <= label_noise < 0.5:
        raise EvaluateError(f"--label-noise must be in [0, 0.5), got {label_noise}")
    settings = {
        "source_run": str(source.resolve()),
        "store": str(Path(store_path).resolve()),
        "truth": str(Path(truth_path).resolve()),
        "rounds": rounds,
        "per_round": per_round,
        "seeds": seeds,
        "strategies": list(strategies),
        "label_noise": label_noise,
        "survey": survey,
        "train_options": dict(train_options or {}),
        "batch_size": batch_size,
        "finetune_from": "source run, every round",
        "selection_model": "previous round's model",
        "metric_threshold": 0.5,
        "test_labels": "simulation truth",
    }
    out.mkdir(parents=True, exist_ok=True)
    sfile = out / "settings.json"
    if sfile.is_file() and json.loads(sfile.read_text()) != settings:
        raise EvaluateError(f"{out}: holds an experiment with other settings ({sfile}); choose a new --out")
    write_text_atomic(sfile, json.dumps(settings, indent=2) + "\n")
    check_run_matches_store(source, open_store(store_path))
    ctx = _context(source, Path(store_path), Path(truth_path), out, settings)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1,
        "versions": dependency_versions(),
        "settings": settings,
        "n_train_pool": int(ctx["pool_rows"].size),
        "n_test": int(ctx["test_rows"].size),
        "n_test_qso": int(ctx["test_truth"].sum()),
        "n_catalog_wrong_train": ctx["catalog_wrong_train"],
        "complete": False,
    }
    plan = [(seed, "both", 0) for seed in range(seeds)] + [
        (seed, s, r) for seed in range(seeds) for s in strategies for r in range(1, rounds + 1)
    ]
    plan.sort(key=lambda t: (t[0], t[2], t[1]))
    records: dict[tuple[int, str, int], dict[str, Any]] = {}
    new = 0
    with progress_bar("active learning", total=len(plan), unit="rounds", quiet=quiet) as bar:
        for seed, strategy, rnd in plan:
            rdir = out / f"seed-{seed}" / ("round-0" if rnd == 0 else f"{strategy}/round-{rnd}")
            if (rdir / "round.json").is_file():
                records[(seed, strategy, rnd)] = json.loads((rdir / "round.json").read_text())
                bar.advance(1)
                continue
            if stop_after is not None and new >= stop_after:
                break
            prev = None if rnd == 0 else records.get((seed, "both", 0) if rnd == 1 else (seed, strategy, rnd - 1))
            if rnd > 0 and (prev is None or prev.get("status") != "done"):
                log.warning("round %s not run: the round before it did not finish", rdir)
                continue
            records[(seed, strategy, rnd)] = _run_round(ctx, seed, strategy, rnd, prev)
            new += 1
            _write(out, doc, list(records.values()))
            bar.advance(1)
    doc["complete"] = len(records) == len(plan)
    _write(out, doc, list(records.values()))
    if any(r.get("status") == "done" for r in records.values()):
        with atomic_path(out / "active_learning.png") as tmp:
            tmp.write_bytes(figure_png(plot_active_learning(doc), dpi=110))
    log.info("wrote %s (%d of %d rounds done)", out / "active_learning.json", len(records), len(plan))
    return doc
