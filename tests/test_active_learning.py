"""Active learning: uncertainty picks, true labels through verdicts, resumable and reproducible rounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectransfer.config import Grid
from spectransfer.data.store import open_store, write_store
from spectransfer.errors import EvaluateError
from spectransfer.evaluation.active_learning import (
    inspections_to_match,
    interval95,
    run_active_learning,
    select_uncertain,
    true_labels,
)

GRID = Grid(n_bins=64)
N = 150
OPTS = {
    "max_steps": 3,
    "eval_every": 3,
    "patience": 1,
    "batch_size": 16,
    "num_workers": 0,
    "device": "cpu",
    "eval_batch_size": 64,
}


def test_uncertainty_picks_closest_to_half_first() -> None:
    p = np.array([0.9, 0.52, 0.1, 0.45, 0.5, 0.49, 0.99, 0.55])
    assert select_uncertain(p, 4).tolist() == [4, 5, 1, 3]
    assert select_uncertain(p, 100).tolist()[:1] == [4] and len(select_uncertain(p, 100)) == p.size


def test_interval95_matches_scipy_t_interval() -> None:
    from scipy import stats

    v = [0.61, 0.7, 0.64]
    got = interval95(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert got["mean"] == pytest.approx(np.mean(v)) and got["lo"] == pytest.approx(lo) and got["hi"] == pytest.approx(hi)
    assert interval95([0.5]) == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n_seeds": 1}
    wide = interval95([0.1, 0.9])  # t(1) = 12.7: the raw interval leaves [0, 1]
    assert (wide["lo"], wide["hi"]) == (0.0, 1.0) and wide["mean"] == pytest.approx(0.5)


def _round_records(f1: dict[str, np.ndarray], per_round: int) -> list[dict]:
    """Round records as run_active_learning writes them: round 0 shared ('both'), then one per strategy and round."""
    recs = []
    for seed in range(f1["random"].shape[0]):
        recs.append(
            {"seed": seed, "strategy": "both", "round": 0, "n_inspected": 0, "status": "done", "f1": f1["random"][seed, 0]}
        )
        for strategy, v in f1.items():
            for rnd in range(1, v.shape[1]):
                recs.append(
                    {
                        "seed": seed,
                        "strategy": strategy,
                        "round": rnd,
                        "n_inspected": rnd * per_round,
                        "status": "done",
                        "f1": v[seed, rnd],
                    }
                )
    return recs


def test_inspections_to_match_equals_direct_numpy_computation() -> None:
    from scipy import stats

    rng = np.random.default_rng(5)  # seeds 0-3 reach the target at rounds 3, 2, 4, 3
    seeds, rounds, per_round = 5, 6, 40
    rand = np.cumsum(rng.uniform(0, 0.1, (seeds, rounds)), axis=1)
    unc = np.cumsum(rng.uniform(0, 0.2, (seeds, rounds)), axis=1)
    unc[:, 0] = rand[:, 0]  # round 0 is shared
    unc[4, 1:] = rand[4, -1] - 0.01  # seed 4 never reaches random's final F1
    got = inspections_to_match(_round_records({"uncertainty": unc, "random": rand}, per_round))
    # direct: first round index where uncertainty >= random's last value, as a share of random's inspections
    reached = (unc >= rand[:, -1:]).any(axis=1)
    first = np.argmax(unc >= rand[:, -1:], axis=1)
    ratio = first[reached] * per_round / ((rounds - 1) * per_round)
    assert [s["ratio"] for s in got["per_seed"]] == pytest.approx(
        [r if ok else None for r, ok in zip(first * per_round / ((rounds - 1) * per_round), reached)]
    )
    assert got["n_not_reached"] == int((~reached).sum()) == 1 and got["n_seeds"] == seeds
    assert got["n_reference_no_gain"] == int((rand[:, -1] <= rand[:, 0]).sum()) == 0
    lo, hi = stats.t.interval(0.95, ratio.size - 1, loc=ratio.mean(), scale=stats.sem(ratio))
    assert got["ratio"]["mean"] == pytest.approx(ratio.mean())
    assert got["ratio"]["lo"] == pytest.approx(max(0.0, lo)) and got["ratio"]["hi"] == pytest.approx(hi)
    # a strategy matched against itself needs exactly the reference's budget unless it got there earlier
    same = inspections_to_match(_round_records({"random": rand}, per_round), strategy="random")
    assert all(s["ratio"] <= 1 for s in same["per_seed"]) and same["n_not_reached"] == 0


def test_inspections_to_match_ignores_skipped_rounds_and_empty_budgets() -> None:
    recs = _round_records({"uncertainty": np.array([[0.2, 0.5]]), "random": np.array([[0.2, 0.4]])}, per_round=10)
    assert inspections_to_match(recs)["per_seed"][0]["ratio"] == pytest.approx(1.0)
    flat = _round_records({"uncertainty": np.array([[0.2, 0.5]]), "random": np.array([[0.2, 0.1]])}, per_round=10)
    got = inspections_to_match(flat)  # random ended below the start: matched at round 0, and flagged
    assert got["per_seed"][0]["ratio"] == 0 and got["n_reference_no_gain"] == 1
    recs[-1] = dict(recs[-1], status="skipped")  # random's only later round did not run
    got = inspections_to_match(recs)
    assert got["n_seeds"] == 0 and got["ratio"]["mean"] is None


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny store whose catalogue misses some quasars, its truth table and an untrained source run."""
    import torch

    from spectransfer.ml.models import ModelConfig, build_model, save_weights

    base = tmp_path_factory.mktemp("al")
    rng = np.random.default_rng(0)
    true = (rng.random(N) < 0.3).astype(np.int8)
    catalog = true.copy()
    catalog[np.flatnonzero(true)[:5]] = 0  # quasars the catalogue left out
    x = np.linspace(0, 1, GRID.n_bins)
    flux = (rng.normal(0, 0.3, (N, GRID.n_bins)) + true[:, None] * np.exp(-(((x - 0.5) / 0.05) ** 2))).astype(np.float32)
    ids = [f"sdss-{i:04d}" for i in range(N)]
    meta = pd.DataFrame(
        {
            "spectrum_id": ids,
            "survey": "sdss",
            "label": catalog,
            "label_source": np.where(catalog == 1, "id", "none"),
            "split": np.array(["train", "train", "val", "test"])[np.arange(N) % 4],
            "object_id": [f"o{i}" for i in range(N)],
        }
    )
    write_store(base / "store", flux, np.ones_like(flux), meta, grid=GRID, chunk_rows=32)
    pd.DataFrame({"spectrum_id": ids[::-1], "true_class": np.where(true == 1, "QSO", "STAR")[::-1]}).to_parquet(
        base / "truth.parquet"
    )
    torch.manual_seed(0)
    (base / "source").mkdir()
    save_weights(build_model(ModelConfig(n_bins=GRID.n_bins)), base / "source" / "model.safetensors", GRID, mode="scratch")
    return {
        "base": base,
        "store": base / "store",
        "truth": base / "truth.parquet",
        "source": base / "source",
        "true": true,
        "catalog": catalog,
    }


def _run(s: dict, out: Path, **kw) -> dict:
    args = {
        "rounds": 2,
        "per_round": 6,
        "seeds": 2,
        "label_noise": 0.1,
        "train_options": OPTS,
        "batch_size": 64,
        "quiet": True,
    } | kw
    return run_active_learning(s["source"], s["store"], s["truth"], out, **args)


def test_truth_lookup_aligns_by_id_and_refuses_unknown(survey: dict) -> None:
    ids = open_store(survey["store"]).meta["spectrum_id"].tolist()
    np.testing.assert_array_equal(true_labels(survey["truth"], ids), survey["true"])
    with pytest.raises(EvaluateError, match="not in the truth table"):
        true_labels(survey["truth"], ["nope"])


def test_resumed_experiment_equals_uninterrupted_and_never_repeats_a_round(survey: dict, tmp_path: Path) -> None:
    whole = _run(survey, tmp_path / "whole", rounds=1)
    assert whole["complete"] and len(whole["rounds"]) == 2 * (1 + 2 * 1)
    assert whole["n_inspected"] == [0, 6]
    for key in ("f1_uncertainty", "f1_random", "pr_auc_uncertainty", "pr_auc_random"):
        assert whole[key]["n_seeds"] == [2, 2]
        assert all(lo <= m <= hi for lo, m, hi in zip(whole[key]["lo"], whole[key]["mean"], whole[key]["hi"]))
    assert (tmp_path / "whole" / "active_learning.png").stat().st_size > 1000

    part = tmp_path / "part"
    first = _run(survey, part, rounds=1, stop_after=3)
    assert not first["complete"] and len(first["rounds"]) == 3
    done = sorted(part.glob("seed-*/**/round.json"))
    assert len(done) == 3
    stamps = {p: (p.stat().st_mtime_ns, p.read_text(), (p.parent / "run" / "metrics.jsonl").read_text()) for p in done}
    second = _run(survey, part, rounds=1)
    assert second["complete"]
    for p, (mtime, text, metrics) in stamps.items():  # finished rounds are read back, not run again
        assert p.stat().st_mtime_ns == mtime and p.read_text() == text
        assert (p.parent / "run" / "metrics.jsonl").read_text() == metrics
    # a seed-fixed experiment is reproducible: resumed and uninterrupted give the same document
    assert json.loads((part / "active_learning.json").read_text()) == json.loads(
        (tmp_path / "whole" / "active_learning.json").read_text()
    )

    with pytest.raises(EvaluateError, match="other settings"):
        _run(survey, part, rounds=1, per_round=7)


def test_rounds_give_true_labels_and_uncertainty_picks_the_least_certain(survey: dict, tmp_path: Path) -> None:
    import torch

    from spectransfer.ml.models import load_run

    out = tmp_path / "al"
    doc = _run(survey, out, rounds=1, seeds=1, strategies=["uncertainty"], label_noise=0.1)
    rec = {(r["strategy"], r["round"]): r for r in doc["rounds"]}
    store = open_store(survey["store"])
    meta = store.meta
    train = np.flatnonzero(meta["split"].to_numpy() == "train")
    rows = meta["row"].to_numpy()[train]
    order = np.argsort(rows)
    train, rows = train[order], rows[order]
    # the previous round's model, run by hand: the picks are the pool's probabilities closest to 0.5
    model, _ = load_run(out / rec[("both", 0)]["run_dir"])
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(np.asarray(store.flux[rows])))).numpy()
    picked = rec[("uncertainty", 1)]["inspected_positions"]
    dist = np.abs(p - 0.5)
    assert len(picked) == 6 and dist[picked].max() <= np.sort(dist)[6] + 1e-6
    # 10% of the pool flipped, plus the catalogue's own mistakes: what round 0 trained on
    n_noise = round(0.1 * train.size)
    assert rec[("both", 0)]["n_wrong_train_labels"] <= n_noise + int((survey["catalog"][train] != survey["true"][train]).sum())
    assert (
        rec[("uncertainty", 1)]["n_wrong_train_labels"]
        == rec[("both", 0)]["n_wrong_train_labels"] - rec[("uncertainty", 1)]["n_corrected_this_round"]
    )
    # the working store the last round trained on: inspected spectra carry their true label as a verdict
    work = open_store(out / "store").meta.set_index("spectrum_id")
    ids = meta["spectrum_id"].to_numpy()[train][picked]
    assert (work.loc[ids, "label_source"] == "verdict").all()
    np.testing.assert_array_equal(work.loc[ids, "label"].to_numpy(), survey["true"][train][picked])
    assert (work["label_source"] == "verdict").sum() == 6


@pytest.mark.slow
def test_tiny_experiment_writes_report_and_resumes(tmp_path: Path) -> None:
    from spectransfer.evaluation.experiment import run_experiment

    out = tmp_path / "exp"
    doc = run_experiment(out, size="tiny", quiet=True)
    assert doc["complete"] and {r["mode"] for r in doc["learning_curve_intervals"]} == {"finetune", "scratch"}
    page = (out / "experiment.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "learning_curve/learning_curve.json" in page
    assert not list((out / "learning_curve" / "runs").glob("*/checkpoints")), "finished runs keep no checkpoint"
    al = (out / "active_learning" / "active_learning.json").read_text()
    again = run_experiment(out, size="tiny", quiet=True, docs=tmp_path / "docs")  # every stage is read back
    assert again["timings"] == doc["timings"] and (out / "active_learning" / "active_learning.json").read_text() == al
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == [
        "active_learning.json",
        "active_learning.png",
        "learning_curve.json",
        "learning_curve.png",
    ]
    lc_doc = json.loads((tmp_path / "docs" / "learning_curve.json").read_text())
    assert str(tmp_path) not in json.dumps(lc_doc) and lc_doc["source_run"] == "runs/pretrain"
    assert lc_doc["answers"]["f1"]["per_fraction"] and again["answers"]["text"][0].startswith("Active learning")
    assert (tmp_path / "docs" / "active_learning.png").read_bytes() == (
        out / "active_learning" / "active_learning.png"
    ).read_bytes()
