"""Redshifts everywhere they show up: the scorer hands the z head on as Z_NET, discover and
classify fit the positives with the templates (Z_PRED ...), evaluate reports redshift metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from spectransfer.candidates.discover import discover
from spectransfer.candidates.redshifts import REDSHIFT_COLUMNS, ZWARN_NOT_FITTED, redshift_columns
from spectransfer.config import DEFAULT_GRID as GRID
from spectransfer.data.resample import normalise
from spectransfer.evaluation.metrics import redshift_report
from spectransfer.ml import refine
from spectransfer.templates import load_templates

COEF = np.array([1.0, 0.15, -0.08, 0.05])
Z_TRUE = np.array([0.35, 0.9, 1.3, 2.1, 2.8, 3.4])


def _template(z: float) -> np.ndarray:
    t = load_templates()["qso_loz" if z < refine.Z_SPLIT else "qso_hiz"]
    rest = np.log10(GRID.centers) - np.log10(1 + z)
    return np.array([np.interp(rest, t.loglam, b) for b in t.basis]).T @ COEF


def _z_store(path: Path):
    """Six noiseless quasar template spectra at known z and six flat 'others', on the paper's grid."""
    from spectransfer.data.store import write_store

    n_q = Z_TRUE.size
    flux = np.concatenate([np.array([_template(z) for z in Z_TRUE]), np.ones((n_q, GRID.n_bins))])
    ivar = np.ones_like(flux, dtype=np.float32)
    scaled, ivar = normalise(flux.astype(np.float32), ivar)
    n = 2 * n_q
    meta = pd.DataFrame(
        {
            "spectrum_id": [f"sdss-{2000 + i}-55000-0001" for i in range(n)],
            "survey": "sdss",
            "plate": pd.array(2000 + np.arange(n), dtype="Int64"),
            "mjd": pd.array(np.full(n, 55000), dtype="Int64"),
            "fiberid": pd.array(np.ones(n, int), dtype="Int64"),
            "ra": np.linspace(0, 10, n),
            "dec": np.zeros(n),
            "pipeline_class": pd.array(["QSO"] * n_q + ["STAR"] * n_q, dtype="string"),
            "z": np.r_[Z_TRUE, np.zeros(n_q)],
            "snr": np.full(n, 20.0, np.float32),
            "label": np.r_[np.ones(n_q), np.zeros(n_q)].astype(np.int8),
            "label_source": ["id"] * n_q + ["none"] * n_q,
            "catalog_z": np.r_[Z_TRUE, np.full(n_q, np.nan)],
            "split": "test",
            "object_id": [f"o{i}" for i in range(n)],
            "source_file": [f"f{i}.fits" for i in range(n)],
        }
    )
    return write_store(path, scaled, ivar, meta, grid=GRID, chunk_rows=4)


def _run(path: Path, z_head: bool) -> Path:
    import torch

    from spectransfer.ml.models import ModelConfig, build_model, save_weights, shift_z_bins

    torch.manual_seed(0)
    bins = shift_z_bins(GRID.log_step) if z_head else 0
    model = build_model(ModelConfig(name="vgg-a", n_bins=GRID.n_bins, z_bins=bins, z_head_kind="shift"))
    save_weights(model, path / "model.safetensors", GRID, mode="scratch")
    return path


@pytest.fixture(scope="module")
def zdata(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("zout")
    store = _z_store(base / "store")
    return {
        "base": base,
        "store": base / "store",
        "meta": store.meta,
        "z_run": _run(base / "zrun", True),
        "old_run": _run(base / "oldrun", False),
    }


def test_discover_writes_redshift_columns_with_units_and_bits(zdata: dict) -> None:
    out = zdata["base"] / "cands.fits"
    # threshold just above 0: every spectrum counts as positive, so every one is fitted
    discover(zdata["z_run"], zdata["store"], out, threshold=1e-6, engine="torch", quiet=True)
    with fits.open(out) as hdul:
        t, h = hdul["CANDIDATES"].data, hdul["CANDIDATES"].header
        names = [h[f"TTYPE{i}"] for i in range(1, h["TFIELDS"] + 1)]
        assert set(REDSHIFT_COLUMNS) <= set(names)
        assert all(h.get(f"TCOMM{names.index(c) + 1}") for c in REDSHIFT_COLUMNS)
        # the default: DESI's window, and the whole range where the (untrained) head doubts its z
        assert h["ZREFINE"] == "window" and h["ZBIT8"] == "NOT_FITTED" and h["ZBIT0"] == "SMALL_DELTACHI2"
        assert (t["Z_NET_PROB"] < 0.7).all()
        order = np.argsort(t["PLATE"])
        z_pred, z_net = t["Z_PRED"][order], t["Z_NET"][order]
        assert np.isfinite(z_net).all()  # the z head answers for every spectrum
        prob = t["Z_NET_PROB"]
        assert np.isfinite(prob).all() and ((prob >= 0) & (prob <= 1 + 1e-6)).all()
        step = (1 + Z_TRUE) * np.log(10) * GRID.log_step
        assert np.all(np.abs(z_pred[: Z_TRUE.size] - Z_TRUE) <= 1.5 * step)
        assert np.all(t["DELTACHI2"][order][: Z_TRUE.size] > 9)


def test_a_run_without_z_head_still_scores_and_fits_only_positives(zdata: dict) -> None:
    out = zdata["base"] / "old.parquet"
    discover(zdata["old_run"], zdata["store"], out, threshold=0.999999, engine="onnx", quiet=True, refine="full")
    t = pd.read_parquet(out)
    assert t["Z_NET"].isna().all() and t["Z_NET_ERR"].isna().all() and t["Z_NET_PROB"].isna().all()
    assert (t["P_QSO"] < 0.999999).all()
    neg = ~t["IS_QSO"].astype(bool)  # the decision (the templates may call some of the unsure ones quasars)
    assert neg.sum() > 0 and t.loc[neg, "Z_PRED"].isna().all()
    assert (t.loc[neg, "ZWARN_PRED"] & ZWARN_NOT_FITTED).all()
    assert t.loc[~neg, "Z_PRED"].notna().all() and (t.loc[~neg, "DECIDED_BY"] == "templates").all()


def test_onnx_and_torch_give_the_same_network_redshift(zdata: dict) -> None:
    from spectransfer.ml.score import score_store_outputs

    a = score_store_outputs(zdata["z_run"], zdata["store"], engine="torch")
    b = score_store_outputs(zdata["z_run"], zdata["store"], engine="onnx")
    assert set(a) == set(b) == {"logit", "z_net", "z_net_err", "z_net_prob"}
    np.testing.assert_allclose(a["z_net"], b["z_net"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a["logit"], b["logit"], rtol=1e-4, atol=1e-5)


def test_redshift_columns_window_mode_needs_the_network_z() -> None:
    flux = np.array([_template(1.3)])
    scaled, ivar = normalise(flux.astype(np.float32), np.ones_like(flux, dtype=np.float32))
    cols = redshift_columns({"z_net": np.array([1.32]), "z_net_err": np.array([0.05])}, np.array([True]), scaled, ivar, "window")
    assert abs(cols["Z_PRED"][0] - 1.3) < 0.01 and cols["Z_NET"][0] == pytest.approx(1.32)
    # a far-off network z: trusted by the head, the window cannot reach the truth; doubted, the
    # whole range is scanned and the truth found
    far = {"z_net": np.array([2.6, 2.6]), "z_net_err": np.array([0.05, 0.05]), "z_net_prob": np.array([0.9, 0.1])}
    two = np.repeat(scaled, 2, axis=0), np.repeat(ivar, 2, axis=0)
    cols = redshift_columns(far, np.array([True, True]), *two, "window")
    assert abs(cols["Z_PRED"][0] - 1.3) > 0.5 and abs(cols["Z_PRED"][1] - 1.3) < 0.01
    assert cols["Z_NET_PROB"][1] == pytest.approx(0.1)
    none = redshift_columns({}, np.array([True]), scaled, ivar, "none")
    assert np.isnan(none["Z_PRED"][0]) and none["ZWARN_PRED"][0] == ZWARN_NOT_FITTED


def test_redshift_report_equals_a_direct_computation() -> None:
    rng = np.random.default_rng(3)
    z_true = rng.uniform(0.1, 4, 400)
    z_pred = z_true + rng.normal(0, 0.002, 400) * (1 + z_true)
    z_pred[:12] += 0.5  # catastrophic
    rep = redshift_report(z_pred, z_true, snr=rng.uniform(1, 30, 400), n_resamples=50)
    dv = np.abs(299792.458 * (z_pred - z_true) / (1 + z_true))
    assert rep["catastrophic_fraction"] == pytest.approx((dv > 3000).mean())
    assert rep["median_abs_dv_kms"] == pytest.approx(np.median(dv))
    lo, hi = rep["catastrophic_fraction_interval"]
    assert lo <= rep["catastrophic_fraction"] <= hi
    assert sum(b["n"] for b in rep["by_z"]) == 400 and sum(b["n"] for b in rep["by_snr"]) == 400


def test_evaluate_reports_redshift_metrics_per_run(zdata: dict) -> None:
    from spectransfer.evaluation.runner import evaluate_runs

    out = zdata["base"] / "report"
    evaluate_runs(
        [zdata["z_run"], zdata["old_run"]], zdata["store"], out, split="test", engine="torch", n_resamples=20, quiet=True
    )
    doc = json.loads((out / "metrics.json").read_text())
    new, old = doc["runs"]["zrun"]["redshift"], doc["runs"]["oldrun"]["redshift"]
    assert new["n_quasars"] == Z_TRUE.size and new["network"]["n"] == Z_TRUE.size and old["network"] is None
    assert new["templates"]["catastrophic_fraction"] == 0.0 == old["templates"]["catastrophic_fraction"]
    assert "Redshifts" in (out / "report.html").read_text()
    preds = pd.read_parquet(out / "zrun" / "predictions.parquet")
    assert {"z_net", "z_templates"} <= set(preds.columns)
