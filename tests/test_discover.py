"""discover: categories, QUALITY bits, the candidate catalogue (astropy + fitsio), engines, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectransfer.candidates.discover import (
    CATEGORIES,
    QUALITY_BITS,
    categorise,
    discover,
    parts_dir,
    pipe_not_qso,
    quality_bits,
)
from spectransfer.config import Grid
from spectransfer.evaluation.metrics import calibrated_probability

GRID = Grid(n_bins=128)  # a small grid keeps the network (and the tests) small


# ---- categories and quality bits -------------------------------------------------------------


def test_categorise_names_each_case_and_threshold_is_inclusive() -> None:
    p = np.array([0.9, 0.1, 0.9, 0.1, 0.5, 0.4999])
    lab = np.array([0, 1, 1, 0, 0, 1])
    got = categorise(p, lab, 0.5)
    assert got.tolist() == ["new_candidate", "missed_by_model", "agree_qso", "agree_other", "new_candidate", "missed_by_model"]


def test_categories_partition_the_spectra() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(5000).astype(np.float32)
    lab = (rng.random(5000) < 0.2).astype(np.int8)
    for t in (0.05, 0.5, 0.93):
        cat = categorise(p, lab, t)
        counts = {c: int((cat == c).sum()) for c in CATEGORIES}
        assert sum(counts.values()) == p.size
        assert counts["new_candidate"] + counts["agree_qso"] == int((p >= t).sum())
        assert counts["missed_by_model"] + counts["agree_qso"] == int(lab.sum())


def test_categorise_rejects_misaligned_input() -> None:
    with pytest.raises(ValueError):
        categorise(np.zeros(3), np.zeros(4), 0.5)


def test_quality_bits_flag_each_doubt_and_nothing_else() -> None:
    meta = pd.DataFrame(
        {
            "snr": pd.array([10.0, 1.0, 10.0, 10.0, 10.0, 10.0, None], dtype="Float32"),
            "pipeline_class": pd.array(["QSO", "STAR", None, "Unknown", "GALAXY", "STAR", "QSO"], dtype="string"),
            "z": pd.array([1.0, 0.0, 0.1, 0.2, None, 0.0, 2.0], dtype="Float64"),
            "zwarning": pd.array([0, 0, 0, 0, 0, 4, None], dtype="Int64"),
        }
    )
    q = quality_bits(meta)
    b = {k: 1 << v for k, v in QUALITY_BITS.items()}
    assert q.tolist() == [
        0,
        b["LOW_SNR"],
        b["NO_PIPELINE_CLASS"],
        b["NO_PIPELINE_CLASS"],
        b["NO_PIPELINE_Z"],
        b["ZWARNING"],
        b["LOW_SNR"],
    ]


def test_pipe_not_qso_marks_positives_the_pipeline_calls_star_or_galaxy() -> None:
    p = np.array([0.9, 0.9, 0.9, 0.9, 0.2])
    cls = pd.Series(["STAR", "galaxy", "QSO", None, "STAR"], dtype="string")
    assert pipe_not_qso(p, cls, 0.5).tolist() == [True, True, False, False, False]


def test_sigmoid_is_stable_and_matches_the_formula() -> None:
    x = np.array([-800.0, -3.0, 0.0, 2.5, 800.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = calibrated_probability(x)
    np.testing.assert_allclose(s[1:4], 1 / (1 + np.exp(-x[1:4])), rtol=1e-6)
    assert s[0] == 0.0 and s[-1] == 1.0 and s.dtype == np.float32


# ---- a tiny store and an untrained run -----------------------------------------------------------


def _spectra(rng: np.random.Generator, n: int, grid: Grid = GRID) -> np.ndarray:
    """Smooth spectra with a few bumps, min-max scaled to [-1, 1] as the store holds them."""
    x = np.linspace(0, 1, grid.n_bins)
    f = rng.normal(0, 0.05, (n, grid.n_bins)) + rng.uniform(-1, 1, (n, 1)) * x
    for _ in range(3):
        c, w, a = rng.uniform(0, 1, (n, 1)), rng.uniform(0.005, 0.05, (n, 1)), rng.normal(0, 1, (n, 1))
        f += a * np.exp(-0.5 * ((x - c) / w) ** 2)
    lo, hi = f.min(axis=1, keepdims=True), f.max(axis=1, keepdims=True)
    return (2 * (f - lo) / (hi - lo) - 1).astype(np.float32)


def _store(path: Path, n: int = 300, seed: int = 0, chunk_rows: int = 64, grid: Grid = GRID):
    from spectransfer.data.store import write_store

    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.3).astype(np.int8)
    meta = pd.DataFrame(
        {
            "spectrum_id": [f"sdss-{1000 + i // 100}-55000-{i % 100 + 1:04d}" for i in range(n)],
            "survey": "sdss",
            "plate": pd.array(1000 + np.arange(n) // 100, dtype="Int64"),
            "mjd": pd.array(np.full(n, 55000), dtype="Int64"),
            "fiberid": pd.array(np.arange(n) % 100 + 1, dtype="Int64"),
            "ra": rng.uniform(0, 360, n),
            "dec": rng.uniform(-10, 60, n),
            "pipeline_class": pd.array(rng.choice(["QSO", "STAR", "GALAXY"], n), dtype="string"),
            "z": rng.uniform(0, 3, n),
            "snr": rng.uniform(0.5, 30, n).astype(np.float32),
            "label": label,
            "label_source": np.where(label == 1, "id", "none"),
            "catalog_z": np.where(label == 1, rng.uniform(0, 3, n), np.nan),
            "split": np.array(["train", "val", "test"])[np.arange(n) % 3],
            "object_id": [f"o{i}" for i in range(n)],
            "source_file": [f"spec-{i}.fits" for i in range(n)],
        }
    )
    # ivar as the noise _spectra adds (sigma 0.05 before the [-1, 1] scaling, about 0.03-0.1 after)
    ivar = np.full((n, grid.n_bins), 400.0, np.float32)
    return write_store(path, _spectra(rng, n, grid), ivar, meta, grid=grid, chunk_rows=chunk_rows)


def _run(path: Path, seed: int = 0, temperature: float | None = None, grid: Grid = GRID) -> Path:
    import torch

    from spectransfer.ml.models import ModelConfig, build_model, save_weights

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="vgg-a", n_bins=grid.n_bins))
    save_weights(model, path / "model.safetensors", grid, mode="scratch")
    if temperature is not None:
        (path / "calibration.json").write_text(json.dumps({"temperature": temperature}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("discover")
    store = _store(base / "store")
    run = _run(base / "run", temperature=2.0)
    return {"base": base, "store": base / "store", "run": run, "meta": store.meta}


def _torch_logits(run: Path, store_path: Path) -> np.ndarray:
    from spectransfer.data.store import open_store
    from spectransfer.ml.score import score_store

    st = open_store(store_path)
    return np.asarray(score_store(run, st, st.rows(), engine="torch"), dtype=np.float64)


# ---- the catalogue -------------------------------------------------------------------------------


def test_catalogue_has_every_spectrum_calibrated_probabilities_and_provenance(tiny: dict, tmp_path: Path) -> None:
    import fitsio
    from astropy.io import fits
    from astropy.table import Table

    out = tmp_path / "cand.fits"
    res = discover(tiny["run"], tiny["store"], out, threshold=0.5, engine="torch", block_size=100, quiet=True)
    meta = tiny["meta"].sort_values("row").reset_index(drop=True)
    assert res.n_spectra == len(meta) and sum(res.counts.values()) == len(meta)
    assert not parts_dir(out).exists(), "the parts folder is removed once the catalogue is written"

    t = Table.read(out, hdu="CANDIDATES")
    assert len(t) == len(meta)
    assert sorted(t["SPECTRUM_ID"]) == sorted(meta["spectrum_id"])
    assert t["RA"].unit == "deg" and t["RA"].dtype.kind == "f" and t["RA"].dtype.itemsize == 8 and t["P_QSO"].dtype.itemsize == 4
    # P_QSO is the sigmoid of the torch logits divided by the run's temperature (2.0).
    want = 1 / (1 + np.exp(-_torch_logits(tiny["run"], tiny["store"]) / 2.0))
    np.testing.assert_allclose(np.asarray(t["P_QSO"], np.float64), want, rtol=1e-5, atol=1e-6)
    cat = np.asarray(t["CATEGORY"]).astype(str)
    pos = np.asarray(t["IS_QSO"]).astype(bool)
    by_net = np.asarray(t["DECIDED_BY"]).astype(str) == "network"
    assert (pos[by_net] == (np.asarray(t["P_QSO"])[by_net] >= 0.5)).all()
    assert by_net.sum() < len(t), "the tiny store holds spectra the network is unsure of"
    assert cat.tolist() == categorise(np.asarray(t["P_QSO"]), np.asarray(t["CAT_LABEL"]), 0.5, pos).tolist()
    assert {c: int((cat == c).sum()) for c in CATEGORIES} == res.counts
    assert np.asarray(t["CAT_LABEL"]).tolist() == meta["label"].tolist()
    assert np.asarray(t["PLATE"]).tolist() == meta["plate"].tolist()
    assert np.asarray(t["QUALITY"]).tolist() == quality_bits(meta).tolist()
    flag = np.asarray(t["PIPE_NOT_QSO"])
    cls = np.asarray(t["CLASS"]).astype(str)
    assert flag.tolist() == (pos & np.isin(cls, ["STAR", "GALAXY"])).tolist()

    with fits.open(out) as hdul:
        h = hdul["CANDIDATES"].header
        for key in (
            "STVER",
            "DEPNAM00",
            "DEPVER00",
            "MODELSHA",
            "THRESH",
            "STOREID",
            "GRIDN",
            "GRIDMIN",
            "GRIDMAX",
            "DATE",
            "TEMPER",
        ):
            assert key in h, key
        from spectransfer.data.store import open_store
        from spectransfer.ml.models import load_run

        assert h["MODELSHA"] == load_run(tiny["run"])[1].sha256
        assert h["STOREID"] == open_store(tiny["store"]).info["store_id"]
        assert h["GRIDN"] == 128 and h["THRESH"] == 0.5 and h["TEMPER"] == 2.0 and h["CALIBR"] is True
        assert hdul["CANDIDATES"].verify_checksum() == 1

    f = fitsio.read(str(out), ext="CANDIDATES")
    assert f.shape[0] == len(meta)
    np.testing.assert_array_equal(f["P_QSO"], np.asarray(t["P_QSO"]))
    assert [s.strip() for s in f["CATEGORY"].astype(str)] == cat.tolist()
    assert fitsio.read_header(str(out), ext="CANDIDATES")["EXTNAME"].strip() == "CANDIDATES"

    pq = pd.read_parquet(out.with_suffix(".parquet"))
    assert pq["SPECTRUM_ID"].tolist() == list(np.asarray(t["SPECTRUM_ID"]).astype(str))
    np.testing.assert_array_equal(pq["P_QSO"].to_numpy(), np.asarray(t["P_QSO"]))
    import pyarrow.parquet as papq

    doc = json.loads(papq.read_schema(out.with_suffix(".parquet")).metadata[b"spectransfer"])
    assert doc["MODELSHA"] == h["MODELSHA"] and doc["THRESH"] == 0.5


def test_threshold_moves_spectra_between_categories(tiny: dict, tmp_path: Path) -> None:
    # the network's threshold alone (the templates may otherwise decide the unsure ones)
    lo = discover(tiny["run"], tiny["store"], tmp_path / "lo.fits", threshold=0.05, engine="torch", quiet=True, templates="none")
    hi = discover(tiny["run"], tiny["store"], tmp_path / "hi.fits", threshold=0.95, engine="torch", quiet=True, templates="none")
    p = pd.read_parquet(tmp_path / "lo.parquet")["P_QSO"].to_numpy()
    assert lo.counts["new_candidate"] + lo.counts["agree_qso"] == int((p >= 0.05).sum())
    assert hi.counts["new_candidate"] + hi.counts["agree_qso"] == int((p >= 0.95).sum())


def test_onnx_engines_agree_with_torch(tiny: dict, tmp_path: Path) -> None:
    ref = _torch_logits(tiny["run"], tiny["store"])
    discover(tiny["run"], tiny["store"], tmp_path / "o.fits", engine="onnx", quiet=True)
    discover(tiny["run"], tiny["store"], tmp_path / "q.fits", engine="onnx-int8", quiet=True)
    o = pd.read_parquet(tmp_path / "o.parquet")["LOGIT"].to_numpy(np.float64)
    q = pd.read_parquet(tmp_path / "q.parquet")["LOGIT"].to_numpy(np.float64)
    np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # int8 only approximates fp32. This untrained network's logits barely vary between spectra,
    # so the bound here is loose; test_demo checks int8 against torch on a trained network.
    assert np.isfinite(q).all() and np.corrcoef(q, ref)[0, 1] > 0.8


def test_dask_workers_give_the_same_catalogue(tiny: dict, tmp_path: Path) -> None:
    one = discover(tiny["run"], tiny["store"], tmp_path / "a.fits", engine="torch", block_size=64, quiet=True)
    two = discover(tiny["run"], tiny["store"], tmp_path / "b.fits", engine="torch", block_size=64, workers=2, quiet=True)
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    assert one.counts == two.counts
    pd.testing.assert_frame_equal(a, b)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectransfer", *args], capture_output=True, text=True, timeout=300, **kw)


def test_cli_prints_summary_and_refuses_bad_input(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "c.fits"
    res = _cli("discover", str(tiny["run"]), "--store", str(tiny["store"]), "--out", str(out), "--engine", "torch", "--quiet")
    assert res.returncode == 0, res.stderr
    for c in CATEGORIES:
        assert c in res.stdout
    assert "STAR" in res.stdout and str(out) in res.stdout
    bad = [
        (["--out", str(tmp_path / "c.txt")], "must end in .fits"),
        (["--out", str(out), "--threshold", "1.5"], "threshold"),
        (["--out", str(out), "--engine", "tpu"], "--engine"),
    ]
    for extra, msg in bad:
        r = _cli("discover", str(tiny["run"]), "--store", str(tiny["store"]), *extra, "--quiet")
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    other = _run(tmp_path / "wide", seed=1)
    (other / "model.safetensors").unlink()
    from spectransfer.ml.models import ModelConfig, build_model, save_weights

    save_weights(build_model(ModelConfig(n_bins=256)), other / "model.safetensors", Grid(n_bins=256), mode="scratch")
    r = _cli("discover", str(other), "--store", str(tiny["store"]), "--out", str(out), "--quiet")
    assert r.returncode == 2 and "grid" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_discover_resumes_after_sigkill(tmp_path: Path) -> None:
    # the paper's 2048-bin network: slow enough (~3 s on one core) for the kill to land part way
    from spectransfer.config import DEFAULT_GRID

    store = tmp_path / "store"
    _store(store, n=800, seed=5, chunk_rows=64, grid=DEFAULT_GRID)
    run = _run(tmp_path / "run", seed=2, grid=DEFAULT_GRID)
    ref_out = tmp_path / "ref.fits"
    discover(run, store, ref_out, engine="torch", block_size=40, batch_size=40, threads=1, quiet=True)
    ref = pd.read_parquet(ref_out.with_suffix(".parquet"))

    out = tmp_path / "killed.fits"
    parts = parts_dir(out)
    args = [
        sys.executable,
        "-m",
        "spectransfer",
        "discover",
        str(run),
        "--store",
        str(store),
        "--out",
        str(out),
        "--engine",
        "torch",
        "--block-size",
        "40",
        "--batch-size",
        "40",
        "--threads",
        "1",
        "--quiet",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(parts.glob("block-*.npy"))) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "discover finished before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    done = sorted(parts.glob("block-*.npy"))
    assert 3 <= len(done) < 20 and not out.exists(), "the kill must land part way"

    res = _cli(*args[3:])
    assert res.returncode == 0, res.stderr
    # the blocks finished before the kill are reused, not scored again
    assert f"resumed: {len(done) * 40:,} spectra" in res.stdout, res.stdout
    got = pd.read_parquet(out.with_suffix(".parquet"))
    assert got["SPECTRUM_ID"].is_unique and len(got) == 800
    assert sorted(got["SPECTRUM_ID"]) == sorted(open_meta(store)["spectrum_id"])
    # the killed run scores with --threads 1, the reference with the default threads: oneDNN's
    # AVX-512 kernels sum in another order, so logits near 0 differ in the 7th decimal
    pd.testing.assert_frame_equal(got, ref, check_exact=False, atol=1e-6)
    assert not parts.exists()


def open_meta(store: Path) -> pd.DataFrame:
    from spectransfer.data.store import open_store

    return open_store(store).meta


def test_stale_parts_of_another_model_are_discarded(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "x.fits"
    parts = parts_dir(out)
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"model_sha256": "something else"}))
    np.save(parts / "block-000000.npy", np.full(100, 50.0, np.float32))  # would make every P_QSO 1
    res = discover(tiny["run"], tiny["store"], out, engine="torch", block_size=100, quiet=True)
    assert res.resumed_spectra == 0
    p = pd.read_parquet(out.with_suffix(".parquet"))["LOGIT"].to_numpy(np.float64)
    np.testing.assert_allclose(p, _torch_logits(tiny["run"], tiny["store"]), rtol=1e-5, atol=1e-5)


# ---- self-describing tables and recorded calibration ------------------------------------------------


def test_header_records_the_calibration_applied_or_that_none_was(tiny: dict, tmp_path: Path) -> None:
    from astropy.io import fits

    from spectransfer.candidates.schema import COLUMNS, REFERENCE
    from spectransfer.evaluation.calibration import calibrate_run

    run = _run(tmp_path / "run", seed=3)
    discover(run, tiny["store"], tmp_path / "none.fits", engine="torch", quiet=True)
    h = fits.getheader(tmp_path / "none.fits", "CANDIDATES")
    assert h["CALIBR"] is False and h["TEMPER"] == 1.0 and "CALSTORE" not in h

    doc = calibrate_run(run, tiny["store"], split="val", engine="torch")
    discover(run, tiny["store"], tmp_path / "cal.fits", engine="torch", quiet=True)
    with fits.open(tmp_path / "cal.fits") as hdul:
        h = hdul["CANDIDATES"].header
        n_val = int((tiny["meta"]["split"] == "val").sum())
        assert h["CALIBR"] is True and h["TEMPER"] == pytest.approx(doc["temperature"])
        assert h["CALSTORE"] == open_store_id(tiny["store"]) == doc["store_id"] and h["CALSPLIT"] == "val"
        assert h["CALNSPEC"] == n_val == doc["n_spectra"] and h["CALENG"] == "torch"
        assert h["REFERENC"] == REFERENCE and h["RUNID"] == h["MODELSHA"][:16]
        names = hdul["CANDIDATES"].columns.names
        for i, name in enumerate(names, start=1):
            assert h[f"TCOMM{i}"] == COLUMNS[name].description[:68], name
            if COLUMNS[name].unit:
                assert h[f"TUNIT{i}"] == COLUMNS[name].unit
        p = np.asarray(hdul["CANDIDATES"].data["P_QSO"], np.float64)
        logit = np.asarray(hdul["CANDIDATES"].data["LOGIT"], np.float64)
        np.testing.assert_allclose(p, 1 / (1 + np.exp(-logit / doc["temperature"])), rtol=1e-5)


def open_store_id(store: Path) -> str:
    from spectransfer.data.store import open_store

    return open_store(store).info["store_id"]


def test_calibrate_refuses_too_few_spectra_in_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _store(store, n=90, seed=2)  # 30 val spectra: below the minimum of 50
    run = _run(tmp_path / "run", seed=1)
    r = _cli("calibrate", str(run), "--store", str(store), "--quiet")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot calibrate" in r.stderr and "30 spectra" in r.stderr and "at least 50" in r.stderr
    assert not (run / "calibration.json").exists()


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".vot"])
def test_discover_writes_the_format_of_the_extension(tiny: dict, tmp_path: Path, ext: str) -> None:
    from astropy.table import Table

    out = tmp_path / f"cand{ext}"
    res = discover(tiny["run"], tiny["store"], out, engine="torch", quiet=True)
    assert res.parquet_path is None and out.is_file() and not parts_dir(out).exists()
    t = Table.read(out)
    assert len(t) == res.n_spectra and "P_QSO" in t.colnames and "QUALITY" in t.colnames
    want = 1 / (1 + np.exp(-_torch_logits(tiny["run"], tiny["store"]) / 2.0))
    np.testing.assert_allclose(np.asarray(t["P_QSO"], np.float64), want, rtol=1e-5, atol=1e-6)
