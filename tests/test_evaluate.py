"""Evaluation metrics against scikit-learn, bootstrap coverage, calibration, tests, verdicts, CLI."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics as skm

from spectransfer.errors import EvaluateError
from spectransfer.evaluation import metrics as M
from spectransfer.evaluation import runner as R
from spectransfer.evaluation.calibration import read_calibration


def _predictions(n: int, seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    if n >= 2:
        y[0], y[1] = 0, 1  # both classes present
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    if ties:
        p = np.round(p, 1)  # many tied scores, some exactly at the threshold
    return y, p


@pytest.mark.parametrize("n,seed,ties", [(2, 0, False), (17, 1, True), (500, 2, False), (3000, 3, True)])
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.7])
def test_every_metric_equals_sklearn(n: int, seed: int, ties: bool, threshold: float) -> None:
    y, p = _predictions(n, seed, ties)
    pred = (p >= threshold).astype(int)
    m = M.threshold_metrics(y, p, threshold)
    r = M.ranking_metrics(y, p)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[1, 0]).tolist()
    if pred.any():
        assert m["precision"] == pytest.approx(skm.precision_score(y, pred), abs=1e-12)
    else:
        assert m["precision"] is None
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred), abs=1e-12)
    assert r["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert r["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)


def test_curves_equal_sklearn() -> None:
    y, p = _predictions(800, 5, ties=True)
    fpr, tpr = M.roc_curve_points(y, p)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    rec, prec, thr = M.pr_curve_points(y, p)
    sk_prec, sk_rec, sk_thr = skm.precision_recall_curve(y, p)
    # sklearn lists thresholds ascending and appends the (recall 0, precision 1) end point.
    np.testing.assert_allclose(prec, sk_prec[:-1][::-1])
    np.testing.assert_allclose(rec, sk_rec[:-1][::-1])
    np.testing.assert_allclose(thr, sk_thr[::-1])


def test_bootstrap_interval_brackets_the_point_estimate() -> None:
    y, p = _predictions(300, 7, ties=False)
    iv = M.bootstrap_intervals(y, p, (0.5,), n_resamples=400, seed=1)[0]
    point = {**M.threshold_metrics(y, p), **M.ranking_metrics(y, p)}
    for key in ("precision", "recall", "f1", "roc_auc", "pr_auc"):
        lo, hi = iv[key]
        assert lo < point[key] < hi, key
        assert hi - lo < 0.3


def test_bootstrap_intervals_cover_the_truth_at_the_nominal_rate() -> None:
    # Population: y ~ Bernoulli(pi); logit | y ~ N(mu_y, 1). Truths in closed form.
    # 200 synthetic test sets of 1000 spectra, 400 resamples each. Across other seeds the
    # percentile intervals cover 0.92-0.95 at this size (slightly under nominal, as percentile
    # intervals do at small n); a gross error (e.g. intervals half as wide) gives ~0.7.
    pi, mu0, mu1, n, reps = 0.3, -1.0, 1.2, 1000, 200
    recall = stats.norm.cdf(mu1)  # P(logit >= 0 | QSO)
    fpr = stats.norm.cdf(mu0)
    precision = pi * recall / (pi * recall + (1 - pi) * fpr)
    f1 = 2 * precision * recall / (precision + recall)
    auc = stats.norm.cdf((mu1 - mu0) / math.sqrt(2))
    truth = {"precision": precision, "recall": recall, "f1": f1, "roc_auc": auc}
    rng = np.random.default_rng(2024)
    hits = {k: 0 for k in truth}
    for rep in range(reps):
        y = (rng.random(n) < pi).astype(int)
        z = rng.normal(np.where(y == 1, mu1, mu0), 1.0)
        iv = M.bootstrap_intervals(y, M.sigmoid(z), (0.5,), n_resamples=400, seed=rep)[0]
        for k, t in truth.items():
            hits[k] += iv[k][0] <= t <= iv[k][1]
    coverage = {k: v / reps for k, v in hits.items()}
    for k, c in coverage.items():
        assert abs(c - 0.95) <= 0.04, (k, coverage)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(3)
    true_logit = rng.normal(-1.0, 2.0, 40000)
    y = (rng.random(true_logit.size) < M.sigmoid(true_logit)).astype(int)
    logits = 4.0 * true_logit  # four times too confident
    val, test = slice(0, 20000), slice(20000, None)
    T = M.fit_temperature(y[val], logits[val])
    assert T == pytest.approx(4.0, rel=0.1)
    before = M.expected_calibration_error(y[test], M.sigmoid(logits[test]))
    after = M.expected_calibration_error(y[test], M.sigmoid(logits[test] / T))
    assert before > 0.05
    assert after < before / 3
    assert M.nll(y[test], logits[test], T) < M.nll(y[test], logits[test])


def test_ece_by_hand() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.01, 0.02, 0.95, 0.97, 1.0])
    # bin 0: p mean .015, frac .5 (2 rows); bin 14: p mean .973.., frac 2/3 (3 rows)
    want = 2 / 5 * abs(0.5 - 0.015) + 3 / 5 * abs(2 / 3 - (0.95 + 0.97 + 1.0) / 3)
    assert M.expected_calibration_error(y, p) == pytest.approx(want)
    rel = M.reliability(y, p)
    assert rel["count"][0] == 2 and rel["count"][14] == 3 and sum(rel["count"]) == 5


def test_mcnemar_exact_and_chi2_by_hand() -> None:
    y = np.array([1] * 12 + [0] * 8)
    a = y.copy()
    b = y.copy()
    b[:7] = 1 - b[:7]  # 7 rows: A right, B wrong
    a[12:14] = 1 - a[12:14]  # 2 rows: A wrong, B right
    res = M.mcnemar_test(y, a, b)
    assert (res["b_a_right_b_wrong"], res["c_a_wrong_b_right"]) == (7, 2)
    hand = 2 * sum(math.comb(9, k) for k in range(3)) / 2**9  # = 92/512
    assert res["p_exact"] == pytest.approx(hand)
    assert res["p_exact"] == pytest.approx(stats.binomtest(7, 9, 0.5).pvalue)
    assert res["chi2"] == pytest.approx(16 / 9)
    assert res["p_chi2"] == pytest.approx(stats.chi2.sf(16 / 9, 1))


def test_paired_bootstrap_sign_and_null() -> None:
    y, p = _predictions(2000, 11, ties=False)
    same = M.paired_bootstrap(y, p, p, n_resamples=200)
    assert same["delta_f1"]["interval"] == [0.0, 0.0]
    assert same["delta_f1"]["p_bootstrap"] == 1.0
    worse = np.clip(p + np.random.default_rng(0).normal(0, 0.3, p.size), 0, 1)
    d = M.paired_bootstrap(y, p, worse, n_resamples=300)
    obs = M.threshold_metrics(y, p)["f1"] - M.threshold_metrics(y, worse)["f1"]
    assert d["delta_f1"]["observed"] == pytest.approx(obs)
    assert d["delta_f1"]["interval"][0] > 0
    assert d["delta_pr_auc"]["interval"][0] > 0
    assert d["delta_f1"]["p_bootstrap"] < 0.01


def test_choose_threshold_rules() -> None:
    y, p = _predictions(1000, 13, ties=True)
    best = M.choose_threshold(y, p)
    brute = max(np.unique(p), key=lambda t: skm.f1_score(y, p >= t))
    assert best["threshold"] == pytest.approx(brute)
    tp = M.choose_threshold(y, p, target_precision=0.8)
    assert tp["achieved"]["precision"] >= 0.8
    lower = np.unique(p)[np.unique(p) < tp["threshold"]]
    assert all(
        skm.precision_score(y, p >= t, zero_division=0) < 0.8 or skm.recall_score(y, p >= t) <= tp["achieved"]["recall"]
        for t in lower
    )
    tr = M.choose_threshold(y, p, target_recall=0.9)
    assert tr["achieved"]["recall"] >= 0.9
    higher = np.unique(p)[np.unique(p) > tr["threshold"]]
    assert all(skm.recall_score(y, p >= t) < 0.9 for t in higher)
    with pytest.raises(EvaluateError):
        M.choose_threshold(y, p, target_precision=1.5)


def test_breakdown_counts_by_hand() -> None:
    y = np.array([1, 1, 0, 1, 0, 0])
    p = np.array([0.9, 0.2, 0.8, 0.7, 0.1, 0.6])
    z = np.array([0.3, 0.4, 0.05, 2.2, np.nan, 2.5])
    rows = {r["bin"]: r for r in M.breakdown(y, p, z, [0, 1, 3])}
    lo, hi = rows["0.00-1.00"], rows["1.00-3.00"]
    assert (lo["tp"], lo["fp"], lo["fn"]) == (1, 1, 1)
    assert (hi["tp"], hi["fp"], hi["fn"]) == (1, 1, 0)
    assert lo["purity"] == 0.5 and lo["completeness"] == 0.5 and hi["completeness"] == 1.0
    assert lo["n"] + hi["n"] == 5  # the NaN row is in no bin
    k, n = 7, 20
    w = M.wilson_interval(k, n)
    # the Wilson interval inverts the score test: both ends have |z| = 1.96
    for end in w:
        assert abs(k / n - end) / math.sqrt(end * (1 - end) / n) == pytest.approx(stats.norm.ppf(0.975), rel=1e-9)


def _verdict_db(path: Path, rows: list[tuple[str, str, float | None, str, str]]) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE verdicts (spectrum_id TEXT, verdict TEXT, z REAL, inspector TEXT, created_at TEXT)")
    con.executemany("INSERT INTO verdicts VALUES (?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    return path


def test_verdicts_reproduce_the_papers_corrected_precision_and_recall(tmp_path: Path) -> None:
    # The paper's SDSS test confusion matrix; 1164 of the 1223 false positives confirmed by eye.
    tp, fn, fp, tn = 14277, 170, 1223, 84330
    y = np.r_[np.ones(tp + fn, int), np.zeros(fp + tn, int)]
    p = np.r_[np.full(tp, 0.9), np.full(fn, 0.1), np.full(fp, 0.8), np.full(tn, 0.05)]
    ids = np.array([f"s{i}" for i in range(y.size)])
    fp_ids = ids[tp + fn : tp + fn + fp]
    rows = [(s, "qso", None, "alice", "2026-01-01T00:00:00") for s in fp_ids[:1164]]
    rows += [(s, "not_qso", None, "alice", "2026-01-01T00:00:00") for s in fp_ids[1164:]]
    db = _verdict_db(tmp_path / "v.sqlite", rows)
    res = M.verdict_corrected(ids, y, p, [0.5], R.read_verdicts(db))
    at = res["at"][0]
    assert at["catalogue"]["precision"] == pytest.approx(0.921, abs=5e-4)
    assert at["catalogue"]["recall"] == pytest.approx(0.988, abs=5e-4)
    assert at["verdict_corrected"]["precision"] == pytest.approx(0.996, abs=5e-4)
    assert at["verdict_corrected"]["recall"] == pytest.approx(0.989, abs=5e-4)
    assert at["verdict_corrected"]["confusion_matrix"] == [[tp + 1164, fn], [fp - 1164, tn]]
    assert res["n_promoted_to_qso"] == 1164 and at["false_positives_inspected"] == fp


def test_verdict_rule_latest_per_inspector_then_majority(tmp_path: Path) -> None:
    rows = [
        ("a", "not_qso", None, "ann", "2026-01-01T10:00:00"),
        ("a", "qso", 1.5, "ann", "2026-01-02T10:00:00"),  # ann changed her mind: qso
        ("a", "unsure", None, "bob", "2026-01-01T11:00:00"),
        ("b", "qso", None, "ann", "2026-01-01T10:00:00"),
        ("b", "not_qso", None, "bob", "2026-01-01T10:00:00"),  # tie: not confirmed
        ("c", "qso", None, "ann", "2026-01-01T10:00:00"),
        ("c", "qso", None, "bob", "2026-01-01T10:00:00"),
        ("c", "not_qso", None, "cy", "2026-01-01T10:00:00"),
    ]
    v = R.read_verdicts(_verdict_db(tmp_path / "v.sqlite", rows))
    assert v.loc["a", "confirmed_qso"] and v.loc["a", "n_not_qso"] == 0 and v.loc["a", "verdict_z"] == 1.5
    assert not v.loc["b", "confirmed_qso"] and not v.loc["b", "rejected"]
    assert v.loc["c", "confirmed_qso"]
    with pytest.raises(EvaluateError, match="not a usable SQLite database"):
        (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 10)
        R.read_verdicts(tmp_path / "junk.sqlite")


def _meta(y: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"spectrum_id": [f"id{i}" for i in range(y.size)], "label": y, "z": np.linspace(0, 3, y.size)})


def test_one_class_split_gives_defined_metrics_and_warnings(tmp_path: Path) -> None:
    y = np.zeros(50, int)
    logits = np.random.default_rng(0).normal(-2, 1, 50)
    run = R.RunScores("r", tmp_path / "run", logits, None)
    doc = R.evaluate_predictions(_meta(y), [run], None, tmp_path / "rep", n_resamples=50)
    e = doc["runs"]["r"]
    assert e["roc_auc"] is None and e["pr_auc"] is None and e["precision"] is None
    assert e["confusion_matrix"][1][0] + e["confusion_matrix"][1][1] == 50
    assert e["ece"] is not None
    assert any("one class" in w for w in doc["warnings"])
    assert json.loads(json.dumps(doc))  # strict JSON: no NaN
    with pytest.raises(EvaluateError, match="empty"):
        R.evaluate_predictions(_meta(np.zeros(0, int)), [run], None, tmp_path / "rep")


def test_evaluate_predictions_writes_predictions_and_calibrates_only_when_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    y = (rng.random(400) < 0.3).astype(int)
    yv = (rng.random(300) < 0.3).astype(int)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "calibration.json").write_text('{"temperature": 3.5}')
    before = (run_dir / "calibration.json").read_bytes()
    runs = [R.RunScores("r", run_dir, 3 * (2 * y - 1) + rng.normal(0, 3, y.size), 3 * (2 * yv - 1) + rng.normal(0, 3, yv.size))]
    runs[0].recorded = read_calibration(run_dir)
    doc = R.evaluate_predictions(_meta(y), runs, yv, tmp_path / "rep", n_resamples=100)
    assert (run_dir / "calibration.json").read_bytes() == before, "evaluate must not overwrite calibration.json"
    assert doc["runs"]["r"]["calibration"]["written"] is False
    assert doc["runs"]["r"]["calibration"]["recorded"]["temperature"] == 3.5
    p_qso = pd.read_parquet(tmp_path / "rep" / "r" / "predictions.parquet")["p_qso"].to_numpy(np.float64)
    np.testing.assert_allclose(p_qso, 1 / (1 + np.exp(-runs[0].logits / 3.5)), rtol=1e-6)

    doc = R.evaluate_predictions(
        _meta(y), runs, yv, tmp_path / "rep", n_resamples=100, calibrate=True, context={"store_id": "st-1", "engine": "onnx"}
    )
    cal = json.loads((run_dir / "calibration.json").read_text())
    T = cal["temperature"]
    assert T == pytest.approx(doc["runs"]["r"]["calibration"]["temperature"]) and T != 3.5
    assert T == pytest.approx(M.fit_temperature(yv, runs[0].val_logits))
    assert (cal["store_id"], cal["split"], cal["n_spectra"], cal["n_qso"], cal["engine"]) == (
        "st-1",
        "val",
        300,
        int(yv.sum()),
        "onnx",
    )
    assert cal["date"][:4].isdigit()
    pred = pd.read_parquet(tmp_path / "rep" / "r" / "predictions.parquet")
    assert list(pred["spectrum_id"]) == [f"id{i}" for i in range(400)]
    assert pred["label"].tolist() == y.tolist()
    assert np.allclose(pred["probability"], M.sigmoid(runs[0].logits), atol=1e-6)
    assert set(pred["split"]) == {"test"}
    fps = pd.read_csv(tmp_path / "rep" / "r" / "false_positives.csv")
    assert len(fps) == doc["runs"]["r"]["fp"] and (fps["label"] == 0).all() and (fps["probability"] >= 0.5).all()


# ---- end to end through the CLI on a tiny store ------------------------------------------------


def _tiny_store(path: Path, grid, n: int = 120, seed: int = 0):
    from spectransfer.data.store import write_store

    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int8)
    flux = rng.uniform(-1, 1, (n, grid.n_bins)).astype(np.float32)
    meta = pd.DataFrame(
        {
            "spectrum_id": [f"sdss-1-5000{i // 640}-{i:04d}" for i in range(n)],
            "survey": "sdss",
            "label": y,
            "z": np.where(y == 1, rng.uniform(0.2, 3, n), 0.0),
            "snr": rng.uniform(1, 30, n).astype(np.float32),
            "split": np.array(["train", "val", "test"])[np.arange(n) % 3],
            "object_id": [f"o{i}" for i in range(n)],
        }
    )
    return write_store(path, flux, np.ones_like(flux), meta, grid=grid)


def _untrained_run(path: Path, grid, seed: int = 0) -> Path:
    import torch

    from spectransfer.ml.models import ModelConfig, build_model, save_weights

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="vgg-a", n_bins=grid.n_bins))
    save_weights(model, path / "model.safetensors", grid, mode="scratch")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectransfer", *args], capture_output=True, text=True, timeout=300)


def test_cli_evaluate_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("spectransfer.ml.score")
    from spectransfer.config import Grid
    from spectransfer.data.store import open_store
    from spectransfer.ml.score import score_store

    grid = Grid(n_bins=128)
    _tiny_store(tmp_path / "store", grid)
    a = _untrained_run(tmp_path / "a", grid, 0)
    b = _untrained_run(tmp_path / "b", grid, 1)
    db = _verdict_db(tmp_path / "v.sqlite", [("sdss-1-50000-0002", "qso", None, "ann", "2026-01-01")])
    res = _cli(
        "evaluate",
        str(a),
        str(b),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "rep"),
        "--bootstrap",
        "50",
        "--gallery",
        "2",
        "--verdicts",
        str(db),
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert set(doc["runs"]) == {"a", "b"} and len(doc["comparisons"]) == 1
    st = open_store(tmp_path / "store")
    rows = st.rows(split="test")
    want = M.sigmoid(np.asarray(score_store(a, st, rows), dtype=np.float64))
    pred = pd.read_parquet(tmp_path / "rep" / "a" / "predictions.parquet")
    np.testing.assert_allclose(pred["probability"], want, rtol=1e-5, atol=1e-6)
    y = pred["label"].to_numpy()
    assert doc["runs"]["a"]["confusion_matrix"] == skm.confusion_matrix(y, want >= 0.5, labels=[1, 0]).tolist()
    assert not (a / "calibration.json").exists() and not (b / "calibration.json").exists(), "evaluate calibrates only when asked"
    assert doc["engine"] == "torch" and doc["runs"]["a"]["engine"] == "torch"
    assert "verdicts" in doc["runs"]["a"]
    assert (tmp_path / "rep" / "report.html").stat().st_size > 10000
    assert "a: P " in res.stdout


def test_cli_refuses_a_run_on_another_grid(tmp_path: Path) -> None:
    from spectransfer.config import Grid

    _tiny_store(tmp_path / "store", Grid(n_bins=128), n=30)
    run = _untrained_run(tmp_path / "run", Grid(n_bins=256))
    res = _cli("evaluate", str(run), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "rep"), "--quiet")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "grid" in lines[0] and str(run) in lines[0]
    assert not (tmp_path / "rep" / "metrics.json").exists()


def test_cli_refuses_an_empty_split(tmp_path: Path) -> None:
    from spectransfer.config import Grid
    from spectransfer.data.store import write_store

    grid = Grid(n_bins=128)
    meta = pd.DataFrame(
        {"spectrum_id": ["x1", "x2"], "survey": "sdss", "label": [0, 1], "split": ["train", "val"], "object_id": ["o1", "o2"]}
    )
    write_store(tmp_path / "store", np.zeros((2, 128), np.float32), np.ones((2, 128), np.float32), meta, grid=grid)
    run = _untrained_run(tmp_path / "run", grid)
    res = _cli("evaluate", str(run), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "rep"), "--quiet")
    assert res.returncode == 2
    assert "test split" in res.stderr and "empty" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_evaluate_onnx_int8_names_the_engine_and_its_calibration_data(tmp_path: Path) -> None:
    from spectransfer.config import Grid
    from spectransfer.data.store import open_store

    grid = Grid(n_bins=128)
    _tiny_store(tmp_path / "store", grid)
    a = _untrained_run(tmp_path / "a", grid, 0)
    res = _cli(
        "evaluate",
        str(a),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "rep"),
        "--bootstrap",
        "20",
        "--gallery",
        "0",
        "--engine",
        "onnx-int8",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert doc["engine"] == "onnx-int8" and doc["runs"]["a"]["engine"] == "onnx-int8"
    st = open_store(tmp_path / "store")
    cal = doc["int8_calibration"]
    assert cal["store_id"] == st.info["store_id"] and cal["n_spectra"] == st.rows().size == 120
    assert "onnx-int8" in (tmp_path / "rep" / "report.html").read_text()
    assert not (a / "calibration.json").exists()
    assert "engine: onnx-int8" in res.stdout


def test_undefined_metrics_are_shown_as_undefined(tmp_path: Path) -> None:
    from spectransfer.evaluation.report import write_report

    y = np.zeros(60, int)
    run = R.RunScores("r", tmp_path / "run", np.random.default_rng(1).normal(-1, 1, 60), None)
    doc = R.evaluate_predictions(_meta(y), [run], None, tmp_path / "rep", n_resamples=20)
    assert doc["runs"]["r"]["pr_auc"] is None and doc["runs"]["r"]["roc_auc"] is None
    write_report(tmp_path / "rep", doc)
    page = (tmp_path / "rep" / "report.html").read_text()
    import re

    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "undefined" in text and not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_one_run_named_twice_gets_a_readable_second_name(tmp_path: Path) -> None:
    from spectransfer.evaluation.runner import run_names

    a = tmp_path / "x" / "run"
    b = tmp_path / "y" / "run"
    assert run_names([a, a]) == ["x/run", "x/run (2)"]
    assert run_names([a, b]) == ["x/run", "y/run"]
    assert run_names([a, a, a])[2] == "x/run (3)"
