"""Learning curve: every (mode, fraction, seed) cell is trained, scored, summarised, and resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectransfer.config import Grid
from spectransfer.errors import EvaluateError
from spectransfer.evaluation.learning_curve import parse_fractions, summarise, transfer_gain

GRID = Grid(n_bins=64)


def test_parse_fractions() -> None:
    assert parse_fractions("1, 0.1,0.01,0.1") == [0.01, 0.1, 1.0]
    for bad in ("0", "1.5", "a", ""):
        with pytest.raises(EvaluateError):
            parse_fractions(bad)


def test_summary_mean_and_sample_std() -> None:
    cells = [
        {
            "mode": "scratch",
            "fraction": 0.1,
            "seed": s,
            "status": "done",
            "n_train_labels": 10,
            "n_train_qso": 3,
            "f1": f,
            "pr_auc": 0.5,
            "precision": 0.5,
            "recall": 0.5,
            "roc_auc": None,
        }
        for s, f in enumerate((0.2, 0.4, 0.9))
    ] + [{"mode": "scratch", "fraction": 0.1, "seed": 3, "status": "skipped", "n_train_labels": 10, "n_train_qso": 0}]
    (row,) = summarise(cells)
    assert row["n_seeds"] == 3
    assert row["f1_mean"] == pytest.approx(0.5)
    assert row["f1_std"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert row["roc_auc_mean"] is None


def test_transfer_gain_equals_direct_t_intervals_and_paired_differences() -> None:
    from scipy import stats

    rng = np.random.default_rng(1)
    fracs, seeds = (0.01, 0.1, 1.0), 4
    f1 = {"finetune": rng.uniform(0.3, 0.5, (3, seeds)), "scratch": rng.uniform(0.0, 0.4, (3, seeds))}
    f1["finetune"][1] += 0.4  # 0.1: far apart, the first separated fraction
    f1["scratch"][2] = f1["finetune"][2] + rng.normal(0, 0.02, seeds)  # 1.0: the same
    cells = [
        {"mode": m, "fraction": f, "seed": s, "status": "done", "n_train_labels": int(f * 1000), "f1": f1[m][i, s]}
        for m in f1
        for i, f in enumerate(fracs)
        for s in range(seeds)
    ]
    cells.append({"mode": "scratch", "fraction": 0.01, "seed": 9, "status": "skipped", "n_train_labels": 10})
    got = transfer_gain(cells)

    def t95(v: np.ndarray) -> tuple[float, float]:
        return stats.t.interval(0.95, v.size - 1, loc=v.mean(), scale=stats.sem(v))

    for i, row in enumerate(got["per_fraction"]):
        ft, sc, d = f1["finetune"][i], f1["scratch"][i], f1["finetune"][i] - f1["scratch"][i]
        assert row["fraction"] == fracs[i] and row["n_train_labels"] == int(fracs[i] * 1000)
        for name, v in (("finetune", ft), ("scratch", sc)):
            lo, hi = t95(v)
            assert row[name]["mean"] == pytest.approx(v.mean())
            assert (row[name]["lo"], row[name]["hi"]) == pytest.approx((max(lo, 0), min(hi, 1)))
        lo, hi = t95(d)
        assert (row["gain"]["mean"], row["gain"]["lo"], row["gain"]["hi"]) == pytest.approx((d.mean(), lo, hi))
        disjoint = min(hi_ for _, hi_ in (t95(ft), t95(sc))) < max(lo_ for lo_, _ in (t95(ft), t95(sc)))
        assert row["separated"] == disjoint
    assert got["per_fraction"][1]["winner"] == "finetune" and got["per_fraction"][2]["winner"] is None
    assert got["first_separated"]["fraction"] == next(r["fraction"] for r in got["per_fraction"] if r["separated"])
    one_seed = transfer_gain([c for c in cells if c.get("seed") == 0])  # zero-width intervals: not evidence
    assert not any(r["separated"] for r in one_seed["per_fraction"]) and one_seed["first_separated"] is None
    same = [dict(c, f1=0.5 + 0.01 * c["seed"]) for c in cells if c["status"] == "done"]
    assert transfer_gain(same)["first_separated"] is None


def _store(path: Path) -> None:
    from spectransfer.data.store import write_store

    rng = np.random.default_rng(0)
    n = 240
    y = (rng.random(n) < 0.4).astype(np.int8)
    x = np.linspace(-1, 1, GRID.n_bins)
    # Quasars carry a bump in the middle: learnable in a few steps.
    flux = rng.normal(0, 0.3, (n, GRID.n_bins)) + np.where(y[:, None] == 1, np.exp(-(x**2) / 0.02), 0)
    flux = (2 * (flux - flux.min(1, keepdims=True)) / np.ptp(flux, axis=1, keepdims=True) - 1).astype(np.float32)
    meta = pd.DataFrame(
        {
            "spectrum_id": [f"sdss-2-50000-{i:04d}" for i in range(n)],
            "survey": "sdss",
            "label": y,
            "split": np.array(["train", "train", "val", "test"])[np.arange(n) % 4],
            "object_id": [f"o{i}" for i in range(n)],
        }
    )
    write_store(path, flux, np.ones_like(flux), meta, grid=GRID)


def _source_run(path: Path) -> Path:
    import torch

    from spectransfer.ml.models import ModelConfig, build_model, save_weights

    torch.manual_seed(0)
    save_weights(build_model(ModelConfig(n_bins=GRID.n_bins)), path / "model.safetensors", GRID, mode="pretrain")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectransfer", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_learning_curve_end_to_end_and_resume(tmp_path: Path) -> None:
    _store(tmp_path / "store")
    src = _source_run(tmp_path / "src")
    args = [
        "learning-curve",
        "--source-run",
        str(src),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "lc"),
        "--fractions",
        "0.05,1",
        "--seeds",
        "2",
        "--max-steps",
        "8",
        "--eval-every",
        "4",
        "--train-batch-size",
        "32",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "64",
        "--quiet",
    ]
    res = _cli(*args)
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "lc" / "learning_curve.json").read_text())
    cells = doc["cells"]
    assert len(cells) == 2 * 2 * 2
    assert {(c["mode"], c["fraction"], c["seed"]) for c in cells} == {
        (m, f, s) for m in ("finetune", "scratch") for f in (0.05, 1.0) for s in (0, 1)
    }
    n_train = doc["n_train_available"]
    for c in cells:
        assert c["status"] in ("done", "skipped")
        assert c["n_train_labels"] == (n_train if c["fraction"] == 1.0 else round(0.05 * n_train))
        if c["status"] == "done":
            assert 0 <= c["pr_auc"] <= 1 and (tmp_path / "lc" / c["run_dir"] / "model.safetensors").is_file()
    full = [c for c in cells if c["fraction"] == 1.0]
    assert all(c["status"] == "done" for c in full)
    assert doc["zero_shot"]["pr_auc"] is not None
    assert (tmp_path / "lc" / "learning_curve.png").stat().st_size > 5000
    assert {s["mode"] for s in doc["summary"]} == {"finetune", "scratch"}

    # Resume: finished cells are skipped (their files untouched), nothing retrains.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "lc" / "runs").glob("*/cell.json")}
    weights = {p: p.stat().st_mtime_ns for p in (tmp_path / "lc" / "runs").glob("*/model.safetensors")}
    res2 = _cli(*args)
    assert res2.returncode == 0, res2.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p: p.stat().st_mtime_ns for p in weights} == weights
    assert json.loads((tmp_path / "lc" / "learning_curve.json").read_text())["cells"] == cells

    # The report shows the curve when given the folder.
    rep = _cli(
        "evaluate",
        str(tmp_path / "lc" / "runs" / "finetune-f1-s0"),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "rep"),
        "--learning-curve",
        str(tmp_path / "lc"),
        "--bootstrap",
        "20",
        "--quiet",
    )
    assert rep.returncode == 0, rep.stderr
    assert "Learning curve" in (tmp_path / "rep" / "report.html").read_text()


def test_learning_curve_refuses_bad_input(tmp_path: Path) -> None:
    _store(tmp_path / "store")
    res = _cli(
        "learning-curve",
        "--source-run",
        str(tmp_path / "nope"),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "lc"),
        "--quiet",
    )
    assert res.returncode == 2 and "not a run folder" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = _cli(
        "learning-curve",
        "--source-run",
        str(_source_run(tmp_path / "src")),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "lc"),
        "--fractions",
        "0,2",
        "--quiet",
    )
    assert res.returncode == 2 and "--fractions" in res.stderr
