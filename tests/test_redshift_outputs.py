"""Redshifts everywhere they show up: the scorer hands the z head on as Z_NET, discover and
classify fit the positives with the templates (Z_PRED ...), evaluate reports redshift metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from spectransfer.candidates.decision import QSO_CHI2
from spectransfer.candidates.discover import discover
from spectransfer.candidates.redshifts import REDSHIFT_COLUMNS, RESCAN_BITS, ZWARN_NOT_FITTED, redshift_columns
from spectransfer.config import DEFAULT_GRID as GRID
from spectransfer.data.resample import normalise
from spectransfer.data.store import open_store
from spectransfer.evaluation.metrics import flagged_catastrophic, redshift_report
from spectransfer.ml import refine
from spectransfer.ml.spectype import fit_spectype
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
    # a far-off network z: doubted by the head, the whole range is scanned and the truth found;
    # trusted, the window alone cannot reach the truth, but its fit warns (edge or a close rival),
    # so the whole range is scanned too and the better fit kept
    far = {"z_net": np.array([2.6, 2.6]), "z_net_err": np.array([0.05, 0.05]), "z_net_prob": np.array([0.9, 0.1])}
    two = np.repeat(scaled, 2, axis=0), np.repeat(ivar, 2, axis=0)
    alone = refine.refine_redshifts(scaled, ivar, np.array([2.6]), None, GRID)
    assert abs(alone.z[0] - 1.3) > 0.5 and alone.zwarn[0] & RESCAN_BITS
    cols = redshift_columns(far, np.array([True, True]), *two, "window")
    assert abs(cols["Z_PRED"][0] - 1.3) < 0.01 and abs(cols["Z_PRED"][1] - 1.3) < 0.01
    assert cols["Z_NET_PROB"][1] == pytest.approx(0.1)
    # the template decision already knows the quasar χ² over the whole range: a window fit
    # far above it is rescanned even without a warning of its own
    low = np.array([_template(0.45)])
    s2, iv2 = normalise(low.astype(np.float32), np.ones_like(low, dtype=np.float32))
    trusted = {"z_net": np.array([1.6]), "z_net_err": np.array([0.05]), "z_net_prob": np.array([0.9])}
    window_only = refine.refine_redshifts(s2, iv2, np.array([1.6]), None, GRID)
    assert abs(window_only.z[0] - 0.45) > 0.5
    family = fit_spectype(s2, iv2, GRID)
    cols = redshift_columns({**trusted, QSO_CHI2: family.chi2[:, 0]}, np.array([True]), s2, iv2, "window")
    assert family.chi2[0, 0] < window_only.chi2[0] - 9 and abs(cols["Z_PRED"][0] - 0.45) < 0.01
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
    assert new["refine"] == old["refine"] == "window" == doc["refine"]
    assert new["templates"]["catastrophic_fraction"] == 0.0 == old["templates"]["catastrophic_fraction"]
    # the run without z head: no network figures, no uncertainty figures, still Z_PRED (full range)
    assert old["uncertainty"] is None
    assert new["uncertainty"]["lowest_z_net_prob"]["network"]["n_flagged"] == 1  # ceil(10% of 6)
    html = (out / "report.html").read_text()
    assert "Redshifts" in html and "lowest Z_NET_PROB" in html
    preds = pd.read_parquet(out / "zrun" / "predictions.parquet")
    assert {"z_net", "z_net_err", "z_net_prob", "z_pred"} <= set(preds.columns)
    # Z_PRED is what discover's redshift_columns gives these spectra with the run's own z head
    q = preds["label"].to_numpy() == 1
    rows = preds["row"].to_numpy()[q]
    st = open_store(zdata["store"])
    outputs = {k: preds[k].to_numpy()[q] for k in ("z_net", "z_net_err", "z_net_prob")}
    flux, ivar = np.asarray(st.flux[:])[rows], np.asarray(st.ivar[:])[rows]
    direct = redshift_columns(outputs, np.ones(q.sum(), bool), flux, ivar, "window")
    np.testing.assert_array_equal(preds["z_pred"].to_numpy()[q], direct["Z_PRED"])
    assert preds["z_pred"].isna().sum() == (~q).sum()
    # and what discover writes for them with its defaults, every spectrum a positive
    discover(zdata["z_run"], zdata["store"], zdata["base"] / "chain.parquet", threshold=1e-6, engine="torch", quiet=True)
    cand = pd.read_parquet(zdata["base"] / "chain.parquet").set_index("SPECTRUM_ID")
    ids = preds["spectrum_id"].to_numpy()[q]
    np.testing.assert_allclose(cand.loc[ids, "Z_PRED"].to_numpy(), direct["Z_PRED"], rtol=0, atol=1e-9)


def _flagged_direct(z_pred: np.ndarray, z_true: np.ndarray, prob: np.ndarray) -> tuple[float, float, float]:
    cat = np.abs(299792.458 * (z_pred - z_true) / (1 + z_true)) > 3000
    low = np.zeros(prob.size, bool)
    low[np.argsort(prob)[: int(np.ceil(0.1 * prob.size))]] = True
    return cat[low].mean(), cat[~low].mean(), cat[low].sum() / cat.sum()


def _doubtful_case(n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quasars whose z is catastrophic more often the lower the head's probability."""
    rng = np.random.default_rng(5)
    z_true = rng.uniform(0.1, 4, n)
    prob = rng.uniform(0, 1, n)
    z_pred = z_true + rng.normal(0, 0.001, n) * (1 + z_true)
    bad = rng.uniform(0, 1, n) > 0.4 + 0.6 * prob  # ~30%: mostly low prob
    z_pred[bad] += rng.uniform(0.2, 1.0, bad.sum())
    return z_pred, z_true, prob


def test_flagged_catastrophic_equals_a_direct_computation() -> None:
    z_pred, z_true, prob = _doubtful_case()
    got = flagged_catastrophic(z_pred, z_true, prob, lowest=True, n_resamples=100)
    flagged, rest, share = _flagged_direct(z_pred, z_true, prob)
    assert got["n_flagged"] == 40 and got["n"] == 400
    assert got["catastrophic_flagged"] == pytest.approx(flagged) and got["catastrophic_rest"] == pytest.approx(rest)
    assert got["share_of_catastrophic"] == pytest.approx(share)
    assert got["flag_cut"] == pytest.approx(np.sort(prob)[39])
    for k in ("catastrophic_flagged", "catastrophic_rest", "share_of_catastrophic"):
        lo, hi = got[f"{k}_interval"]
        assert lo <= got[k] <= hi
    assert flagged > rest  # the case was built so: the low-probability tenth fails more often
    # a predicted error: the largest flagged; the same as the lowest of its negative
    err = 1 - prob
    by_err = flagged_catastrophic(z_pred, z_true, err, lowest=False, n_resamples=0)
    assert by_err["share_of_catastrophic"] == pytest.approx(share) and "share_of_catastrophic_interval" not in by_err
    # a missing network z is catastrophic, a missing score most doubtful
    z_nan, p_nan = z_pred.copy(), prob.copy()
    z_nan[0], p_nan[1] = np.nan, np.nan
    got = flagged_catastrophic(z_nan, z_true, p_nan, n_resamples=0)
    cat = ~(np.abs(299792.458 * (z_nan - z_true) / (1 + z_true)) <= 3000)
    low = np.argsort(np.where(np.isnan(p_nan), -np.inf, p_nan))[:40]
    assert 1 in low and got["catastrophic_flagged"] == pytest.approx(cat[low].mean())
    assert flagged_catastrophic([], [], []) is None


def test_evaluate_predictions_reports_the_uncertainty_figures(tmp_path: Path) -> None:
    from spectransfer.evaluation.runner import RunScores, evaluate_predictions

    z_pred, z_true, prob = _doubtful_case()
    n_other = 100
    y = np.r_[np.ones(z_true.size, int), np.zeros(n_other, int)]
    cat_z = np.r_[z_true, np.full(n_other, np.nan)]
    meta = pd.DataFrame({"spectrum_id": [f"id{i}" for i in range(y.size)], "label": y, "catalog_z": cat_z})
    pad = np.full(n_other, 0.5)
    err = np.r_[(1 - prob) * (1 + z_pred), pad]
    logits = np.where(y == 1, 2.0, -2.0)
    run = RunScores("r", tmp_path / "run", logits, None, z_net=np.r_[z_pred, pad], z_net_err=err, z_net_prob=np.r_[prob, pad])
    run.z_pred = cat_z  # a perfect refinement
    old = RunScores("old", tmp_path / "old", logits, None)
    doc = evaluate_predictions(meta, [run, old], None, tmp_path / "rep", n_resamples=50, context={"refine": "window"})
    u = doc["runs"]["r"]["redshift"]["uncertainty"]
    flagged, rest, share = _flagged_direct(z_pred, z_true, prob)
    net = u["lowest_z_net_prob"]["network"]
    assert u["fraction"] == 0.1 and net["n_flagged"] == 40
    assert (net["catastrophic_flagged"], net["catastrophic_rest"]) == (pytest.approx(flagged), pytest.approx(rest))
    assert net["share_of_catastrophic"] == pytest.approx(share)
    # Z_NET_ERR/(1+Z_NET) = 1 - prob here: the same tenth
    assert u["largest_z_net_err"]["network"]["share_of_catastrophic"] == pytest.approx(share)
    assert u["lowest_z_net_prob"]["templates"]["n_catastrophic"] == 0
    assert doc["runs"]["r"]["redshift"]["refine"] == "window"
    assert doc["runs"]["old"]["redshift"]["network"] is None and doc["runs"]["old"]["redshift"]["uncertainty"] is None
    assert json.loads(json.dumps(doc))
