"""The one scorer: every engine through it, named outputs, int8 calibration recorded and repeatable,
and the same P(QSO) for a spectrum from evaluate's predictions and from discover."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectransfer.evaluation.metrics import calibrated_probability
from spectransfer.ml.score import (
    ENGINES,
    INT8_CALIBRATION_SPECTRA,
    build_scorer,
    int8_calibration_rows,
    prepare_engine,
    read_block,
    rows_digest,
    score_rows,
    score_store,
)
from test_discover import _run, _store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("score")
    store = _store(base / "store", n=700, seed=3)
    run = _run(base / "run", seed=4, temperature=1.5)
    return {"base": base, "store": store, "run": run}


def test_every_engine_gives_the_same_probability(tiny: dict) -> None:
    st = tiny["store"]
    rows = st.rows()
    p = {e: calibrated_probability(score_store(tiny["run"], st, rows, engine=e), 1.5) for e in ENGINES}
    np.testing.assert_allclose(p["onnx"], p["torch"], atol=1e-6)
    # int8 approximates fp32: on this untrained net the logits are ~1e-2, so compare probabilities
    assert np.max(np.abs(p["onnx-int8"] - p["torch"])) < 5e-3
    assert all(v.dtype == np.float32 and v.shape == rows.shape for v in p.values())


def test_scorer_returns_named_outputs_in_row_order(tiny: dict, tmp_path: Path) -> None:
    st = tiny["store"]
    spec = prepare_engine(tiny["run"], "torch", tmp_path)
    scorer = build_scorer(spec)
    rows = np.sort(st.rows())[5:300]
    got = score_rows(scorer, st, rows, batch_size=37, in_channels=spec.in_channels)
    assert set(got) == {"logit"} and got["logit"].shape == rows.shape
    # against one direct call on the block read in one go
    direct = scorer(read_block(st, rows, spec.in_channels))["logit"]
    np.testing.assert_allclose(got["logit"], direct, rtol=1e-5, atol=1e-7)
    shuffled = np.random.default_rng(0).permutation(rows)
    np.testing.assert_allclose(
        score_store(tiny["run"], st, shuffled), direct[np.searchsorted(rows, shuffled)], rtol=1e-5, atol=1e-7
    )


def test_int8_calibration_is_recorded_and_deterministic(tiny: dict, tmp_path: Path) -> None:
    st = tiny["store"]
    a = prepare_engine(tiny["run"], "onnx-int8", tmp_path / "a", store=st)
    b = prepare_engine(tiny["run"], "onnx-int8", tmp_path / "b", store=st)
    cal = a.int8_calibration
    assert cal is not None and cal == b.int8_calibration
    want_rows = int8_calibration_rows(st)
    assert cal.store_id == st.info["store_id"] and cal.n_spectra == min(INT8_CALIBRATION_SPECTRA, st.rows().size)
    assert cal.rows_sha256 == rows_digest(want_rows) and want_rows.size == cal.n_spectra
    assert json.loads((tmp_path / "a" / "model-onnx-int8.json").read_text())["rows_sha256"] == cal.rows_sha256
    x = read_block(st, np.sort(st.rows())[:200])
    np.testing.assert_array_equal(build_scorer(a)(x)["logit"], build_scorer(b)(x)["logit"])


@pytest.mark.parametrize("engine", ["torch", "onnx-int8"])
def test_evaluate_predictions_and_discover_give_one_probability(tiny: dict, tmp_path: Path, engine: str) -> None:
    from spectransfer.candidates.discover import discover
    from spectransfer.evaluation.runner import evaluate_runs

    evaluate_runs(
        [tiny["run"]], tiny["store"].path, tmp_path / "rep", engine=engine, n_resamples=0, quiet=True, write_report=False
    )
    discover(tiny["run"], tiny["store"].path, tmp_path / "c.parquet", engine=engine, quiet=True)
    pred = pd.read_parquet(tmp_path / "rep" / "run" / "predictions.parquet").set_index("spectrum_id")
    cand = pd.read_parquet(tmp_path / "c.parquet").set_index("SPECTRUM_ID")
    p_eval = pred["p_qso"].to_numpy(np.float64)
    p_disc = cand.loc[pred.index, "P_QSO"].to_numpy(np.float64)
    np.testing.assert_allclose(p_disc, p_eval, rtol=0, atol=1e-6)
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert doc["engine"] == engine and doc["runs"]["run"]["engine"] == engine
    assert (doc["int8_calibration"] is not None) == (engine == "onnx-int8")
