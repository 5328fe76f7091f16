"""The HTML report: self-contained, every plot renders in a real browser (headless chromium)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectransfer.config import Grid
from spectransfer.evaluation import runner as E
from spectransfer.evaluation.report import QSO_LINES, write_report

CHROMIUM = Path("/usr/bin/chromium")


def _report(tmp_path: Path) -> Path:
    from spectransfer.data.store import open_store, write_store

    grid = Grid(n_bins=256)
    rng = np.random.default_rng(0)
    n = 240
    y = (rng.random(n) < 0.3).astype(np.int8)
    z = np.where(y == 1, rng.uniform(0.2, 3.0, n), 0.0)
    wave = grid.centers
    flux = rng.normal(0, 0.1, (n, grid.n_bins))
    for i in np.flatnonzero(y):
        for _, rest in QSO_LINES:
            flux[i] += np.exp(-0.5 * ((wave - rest * (1 + z[i])) / 40) ** 2)
    flux = (2 * (flux - flux.min(1, keepdims=True)) / np.ptp(flux, axis=1, keepdims=True) - 1).astype(np.float32)
    meta = pd.DataFrame(
        {
            "spectrum_id": [f"sdss-7-50000-{i:04d}" for i in range(n)],
            "survey": "sdss",
            "label": y,
            "z": z,
            "catalog_z": np.where(y == 1, z, np.nan),
            "snr": rng.uniform(1, 40, n).astype(np.float32),
            "mag": rng.uniform(17, 22, n).astype(np.float32),
            "pipeline_class": np.where(y == 1, "QSO", "STAR"),
            "split": np.array(["test", "val"])[np.arange(n) % 2],
            "object_id": [f"o{i}" for i in range(n)],
        }
    )
    write_store(tmp_path / "store", flux, np.ones_like(flux), meta, grid=grid)
    store = open_store(tmp_path / "store")
    m = store.meta
    test = m[m["split"] == "test"].reset_index(drop=True)
    val = m[m["split"] == "val"].reset_index(drop=True)

    def logits(df: pd.DataFrame, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        return 2.5 * (2 * df["label"].to_numpy() - 1) + r.normal(0, 2.5, len(df))

    runs = []
    for k, name in enumerate(("transfer", "scratch")):
        (tmp_path / name).mkdir()
        runs.append(E.RunScores(name, tmp_path / name, logits(test, 2 * k), logits(val, 2 * k + 1), {"model_name": "vgg-a"}))
    doc = E.evaluate_predictions(test, runs, val["label"].to_numpy(), tmp_path / "rep", n_resamples=100)
    lc = {
        "summary": [
            {
                "mode": mode,
                "fraction": f,
                "n_train_labels": 1000 * f,
                "n_seeds": 3,
                "f1_mean": v,
                "f1_std": 0.02,
                "pr_auc_mean": v,
                "pr_auc_std": 0.02,
            }
            for mode, base in (("finetune", 0.8), ("scratch", 0.5))
            for f, v in ((0.01, base), (0.1, base + 0.1), (1.0, 0.95))
        ],
        "cells": [],
        "zero_shot": {"f1": 0.6, "pr_auc": 0.7},
    }
    return write_report(tmp_path / "rep", doc, store=store, meta=test, learning_curve=lc, gallery=3)


@pytest.fixture(scope="module")
def report_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _report(tmp_path_factory.mktemp("report"))


def test_report_is_self_contained(report_path: Path) -> None:
    page = report_path.read_text()
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page
    for section in (
        "ROC and precision-recall",
        "Calibration",
        "Purity and completeness",
        "Learning curve",
        "Gallery",
        "Paired comparison",
    ):
        assert section in page
    # 1 ROC/PR + 1 reliability + 3 breakdowns + 1 learning curve + 2 runs x (3 FP + 3 FN) at most
    assert 6 < page.count("<img") <= 6 + 12


@pytest.mark.browser
def test_report_opens_in_chromium_without_broken_images(report_path: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium not found at /usr/bin/chromium (run `make browser`)")
    from playwright.sync_api import sync_playwright

    path = report_path
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.resolve().as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            title = page.title()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(widths) > 6 and all(w > 0 for w in widths), widths
    assert "evaluation" in title
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
    assert (tmp_path / "report.png").stat().st_size > 10000


def test_report_imports_metrics_not_the_runner() -> None:
    import subprocess
    import sys

    code = (
        "import spectransfer.evaluation.report, sys; "
        "assert 'spectransfer.evaluation.runner' not in sys.modules; "
        "assert 'spectransfer.evaluation.metrics' in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_report_says_when_a_model_was_trained_on_simulated_spectra() -> None:
    from spectransfer.evaluation.report import _origin_note

    sim = _origin_note({"store_origin": "simulated", "trained_on": {"finetune": "simulated", "scratch": "simulated"}})
    assert "Evaluated on simulated spectra" in sim and "finetune: simulated spectra" in sim
    assert 'class="warn"' in sim and "only real spectra" in sim
    real = _origin_note({"store_origin": "real", "trained_on": {"mine": "real"}})
    assert "Evaluated on real survey spectra" in real and 'class="note"' in real and "only real spectra" not in real
