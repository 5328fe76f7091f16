"""Ingest: real files land once each, bad files are quarantined with a reason, reruns add nothing,
changed files are re-read, a killed ingest finishes on the next run, real Dask gives the same store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from spectransfer.cli import app
from spectransfer.config import DEFAULT_GRID
from spectransfer.data.ingest import DELAY_ENV, ingest
from spectransfer.data.resample import SCALING
from spectransfer.data.store import open_store
from spectransfer.errors import StoreError

# Three epochs of SDSS-RM 017 in tests/data (the fourth, spec-6717-56397-0534, is in ../shared/data only).
RM_EPOCHS = ("spec-1325-52762-0133.fits", "spec-7338-57859-0739.fits", "spec-7340-57576-0740.fits")
ZWARNING_FILES = {
    "spSpec-51630-0266-633.fit",
    "spSpec-51630-0266-637.fit",
    "spSpec-51630-0266-638.fit",
    "spec-7457-56746-0001.fits",
}


def _copy(real_data: Path, dest: Path, names: list[str] | None = None, survey: str = "sdss") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted((real_data / survey).iterdir()):
        if names is None or f.name in names:
            shutil.copy2(f, dest / f.name)
    return dest


def _by_id(store_path: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Metadata indexed by spectrum id, and each live spectrum's (flux, ivar) rows."""
    store = open_store(store_path)
    meta = store.meta.set_index("spectrum_id")
    assert meta.index.is_unique
    assert meta["row"].is_unique
    flux, ivar = store.flux[:], store.ivar[:]
    return meta, {sid: np.stack([flux[r], ivar[r]]) for sid, r in meta["row"].items()}


def _same_store(a: Path, b: Path) -> None:
    ma, xa = _by_id(a)
    mb, xb = _by_id(b)
    assert set(ma.index) == set(mb.index)
    for sid in ma.index:
        np.testing.assert_array_equal(xa[sid], xb[sid])
    cols = ["survey", "ra", "dec", "z", "pipeline_class", "object_id", "split", "content_hash", "snr"]
    pd.testing.assert_frame_equal(ma.loc[sorted(ma.index), cols], mb.loc[sorted(ma.index), cols])


def _planned_batches(store: Path) -> int:
    """Batches in the ingest plan of the store's ledger (read with sqlite3 directly)."""
    with closing(sqlite3.connect(store / "ledger.sqlite")) as db:
        return int(db.execute("SELECT COUNT(*) FROM plan").fetchone()[0])


@pytest.fixture(scope="module")
def reference_store(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every real SDSS + LAMOST file ingested in-process, uninterrupted: the reference result."""
    out = tmp_path_factory.mktemp("ref") / "store"
    ingest([real_data / "sdss", real_data / "lamost"], out, workers=0, quiet=True)
    return out


def test_real_files_sdss_and_lamost(reference_store: Path, real_data: Path) -> None:
    store = open_store(reference_store)
    meta, rej = store.meta, store.rejected
    n_files = len(list((real_data / "sdss").iterdir())) + len(list((real_data / "lamost").iterdir()))
    assert len(meta) + len(rej) == n_files
    # The four files with ZWARNING != 0 fail the paper's cut, with the value in the reason.
    zw = rej[rej["reason_kind"] == "fails filter: zwarning"]
    assert {Path(p).name for p in zw["source_file"]} == ZWARNING_FILES
    assert any(r == "fails filter: zwarning=5" for r in zw["reason"])
    # LAMOST spectra whose good pixels start redward of the grid fail coverage.
    cov = rej[rej["reason_kind"] == "fails filter: wavemin"]
    assert all(float(r.split()[3]) > 3839.7244 for r in cov["reason"])
    assert meta["spectrum_id"].is_unique and set(meta["survey"]) == {"sdss", "lamost"}

    # One SDSS file against astropy: ids, position, class, redshift.
    path = real_data / "sdss" / "spec-0752-52251-0323.fits"
    row = meta[meta["source_file"] == str(path.resolve())].iloc[0]
    with fits.open(path) as hdul:
        so = hdul[2].data[0]
        assert row["spectrum_id"] == f"sdss-{so['PLATE']:04d}-{so['MJD']:05d}-{so['FIBERID']:04d}"
        assert row["pipeline_class"] == so["CLASS"].strip()
        assert row["z"] == pytest.approx(float(so["Z"]), rel=1e-6)
        assert row["ra"] == pytest.approx(float(so["PLUG_RA"]), abs=1e-6)
    assert row["content_hash"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_stored_flux_is_min_max_scaled_spectres_resample(reference_store: Path, real_data: Path) -> None:
    spectres = pytest.importorskip("spectres").spectres
    path = real_data / "sdss" / "spec-0266-51602-0013.fits"
    store = open_store(reference_store)
    row = store.meta[store.meta["source_file"] == str(path.resolve())].iloc[0]
    flux, ivar = store.flux[int(row["row"])], store.ivar[int(row["row"])]
    with fits.open(path) as hdul:
        c = hdul[1].data
        wave = 10.0 ** c["loglam"].astype(float)
        f, iv, m = c["flux"].astype(float), c["ivar"].astype(float), c["and_mask"]
    ref = spectres(DEFAULT_GRID.centers, wave, f, fill=np.nan, verbose=False)
    # Compare on bins inside the spectrum that no bad pixel (ivar 0 or mask bit) touches:
    # there the store's flux must be an increasing affine map of spectres' resample.
    bad_bins = np.searchsorted(DEFAULT_GRID.edges, wave[(iv <= 0) | (m != 0)]) - 1
    ok = np.isfinite(ref) & (ivar > 0)
    for shift in (-1, 0, 1):
        ok[np.clip(bad_bins + shift, 0, len(ok) - 1)] = False
    ok[:5] = ok[-5:] = False
    assert ok.sum() > 500
    a, b = np.polyfit(ref[ok], flux[ok], 1)
    assert a > 0
    np.testing.assert_allclose(flux[ok], a * ref[ok] + b, atol=2e-3)
    good_bins = flux[ivar > 0]
    assert good_bins.min() == pytest.approx(-1.0) and good_bins.max() == pytest.approx(1.0)


def test_rm_repeat_epochs_share_object_and_split(reference_store: Path, real_data: Path) -> None:
    meta = open_store(reference_store).meta
    rm = meta[meta["source_file"].map(lambda p: Path(p).name in RM_EPOCHS)]
    assert len(rm) == 3
    assert rm["object_id"].nunique() == 1 and rm["split"].nunique() == 1
    assert (meta["object_id"] == rm["object_id"].iloc[0]).sum() == 3
    info = open_store(reference_store).info
    assert info["splits"]["leakage"]["repeat_spectra"] == 3


def test_local_dask_cluster_gives_the_same_store(reference_store: Path, real_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "dask"
    summary = ingest([real_data / "sdss", real_data / "lamost"], out, workers=2, batch_size=4, quiet=True)
    assert summary.batches >= 6
    # The batches ran in worker processes, not in this one.
    assert summary.worker_pids and os.getpid() not in summary.worker_pids
    _same_store(out, reference_store)
    # Row ranges of batches are chunk aligned: each batch's rows start on a chunk boundary.
    store = open_store(out)
    starts = store.meta.groupby("batch_id")["row"].min()
    assert (starts % store.chunk_rows == 0).all()


def test_corrupt_files_are_quarantined_and_good_files_land(real_data: Path, tmp_path: Path) -> None:
    good_names = [
        "spec-0266-51602-0013.fits",
        "spec-0752-52251-0323.fits",
        "spec-7338-57859-0739.fits",
        "spSpec-51993-0542-631.fit",
    ]
    folder = _copy(real_data, tmp_path / "in", good_names)
    (folder / "notes.fits").write_text("this is not a FITS file\n")
    (folder / "empty.fits").write_bytes(b"")
    raw = (real_data / "sdss" / "spec-0266-51602-0001.fits").read_bytes()
    (folder / "truncated.fits").write_bytes(raw[: len(raw) // 3])
    fits.PrimaryHDU(np.zeros((3, 3), dtype=np.float32)).writeto(folder / "image.fits")
    summary = ingest([folder], tmp_path / "s", workers=0, quiet=True)
    store = open_store(tmp_path / "s")
    assert sorted(Path(p).name for p in store.meta["source_file"]) == sorted(good_names)
    rej = store.rejected.set_index(store.rejected["source_file"].map(lambda p: Path(p).name))
    assert set(rej.index) == {"notes.fits", "empty.fits", "truncated.fits", "image.fits"}
    assert (rej["reason_kind"] == "unreadable").all()
    assert "trunc" in rej.loc["truncated.fits", "reason"].lower()
    assert "unrecognised format" in rej.loc["image.fits", "reason"]
    assert summary.rejected == 4 and summary.accepted == 4


def test_rerun_adds_nothing_and_changed_file_is_reread(real_data: Path, tmp_path: Path) -> None:
    names = ["spec-0266-51602-0013.fits", "spec-0266-51602-0001.fits", "spSpec-51993-0542-631.fit"]
    folder = _copy(real_data, tmp_path / "in", names)
    first = ingest([folder], tmp_path / "s", workers=0, quiet=True)
    assert first.accepted == 3
    meta0, x0 = _by_id(tmp_path / "s")
    n_rows0 = open_store(tmp_path / "s").n_rows

    again = ingest([folder], tmp_path / "s", workers=0, quiet=True)
    assert again.files_processed == 0 and again.skipped_unchanged == 3
    meta1, _ = _by_id(tmp_path / "s")
    pd.testing.assert_frame_equal(meta0, meta1)
    assert open_store(tmp_path / "s").n_rows == n_rows0

    # Same bytes, new mtime: hashed again, found unchanged, nothing re-read.
    target = folder / "spec-0266-51602-0013.fits"
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    touched = ingest([folder], tmp_path / "s", workers=0, quiet=True)
    assert touched.files_processed == 1 and touched.unchanged_content == 1 and touched.accepted == 0
    meta2, _ = _by_id(tmp_path / "s")
    pd.testing.assert_frame_equal(meta0.drop(columns="file_stamp"), meta2.drop(columns="file_stamp"))
    assert ingest([folder], tmp_path / "s", workers=0, quiet=True).files_processed == 0

    # New content: the file is read again and its new row replaces the old one.
    with fits.open(target) as hdul:
        hdul[1].data["flux"] = hdul[1].data["flux"] + np.linspace(0, 50, len(hdul[1].data))
        hdul.writeto(tmp_path / "changed.fits")
    os.replace(tmp_path / "changed.fits", target)
    changed = ingest([folder], tmp_path / "s", workers=0, quiet=True)
    assert changed.files_processed == 1 and changed.accepted == 1
    meta3, x3 = _by_id(tmp_path / "s")
    assert len(meta3) == 3
    sid = "sdss-0266-51602-0013"
    assert meta3.loc[sid, "row"] != meta0.loc[sid, "row"]
    assert meta3.loc[sid, "content_hash"] != meta0.loc[sid, "content_hash"]
    assert not np.array_equal(x3[sid], x0[sid])
    for other in set(meta0.index) - {sid}:
        np.testing.assert_array_equal(x3[other], x0[other])
        assert meta3.loc[other, "split"] == meta0.loc[other, "split"]


def test_second_ingest_appends_and_keeps_existing_rows(real_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sdss = _copy(real_data, tmp_path / "sdss", ["spec-0266-51602-0013.fits", "spec-7340-57576-0740.fits"])
    lamost = _copy(
        real_data,
        tmp_path / "lamost",
        ["spec-55862-B6212_sp06-003.fits", "spec-59517-EG025613N082253M02_sp08-200.fits.gz"],
        survey="lamost",
    )
    ingest([sdss], tmp_path / "s", workers=0, quiet=True, batch_size=4)
    meta0, x0 = _by_id(tmp_path / "s")
    rows0 = open_store(tmp_path / "s").n_rows
    ingest([lamost], tmp_path / "s", workers=0, quiet=True, batch_size=4)
    meta1, x1 = _by_id(tmp_path / "s")
    assert open_store(tmp_path / "s").n_rows > rows0
    assert set(meta1["survey"]) == {"sdss", "lamost"} and len(meta1) == 4
    for sid in meta0.index:
        np.testing.assert_array_equal(x1[sid], x0[sid])
        assert meta1.loc[sid, ["row", "split", "object_id"]].tolist() == meta0.loc[sid, ["row", "split", "object_id"]].tolist()
    # a store scaled by the earlier rule (min-max over every bin, no "scaling" in store.json) is
    # not mixed with rows scaled away from the sky lines: refused, its rows untouched
    info_path = tmp_path / "s" / "store.json"
    info = json.loads(info_path.read_text())
    assert info["scaling"] == SCALING
    del info["scaling"]
    info_path.write_text(json.dumps(info))
    more = _copy(real_data, tmp_path / "more", ["spec-7338-57859-0739.fits"])
    with caplog.at_level("WARNING", logger="spectransfer.data.store"):
        with pytest.raises(StoreError, match="scaled by an earlier rule.*new store"):
            ingest([more], tmp_path / "s", workers=0, quiet=True, batch_size=4)
    assert "scaled by an earlier rule" not in caplog.text  # the refusal is the one message, no warning before it
    with caplog.at_level("WARNING", logger="spectransfer.data.store"):
        open_store(tmp_path / "s")  # reading it (train, discover) warns once that it was scaled otherwise
    assert "scaled by an earlier rule" in caplog.text
    assert len(_by_id(tmp_path / "s")[0]) == 4


def test_survey_option_filters_and_duplicates(real_data: Path, tmp_path: Path) -> None:
    folder = _copy(real_data, tmp_path / "in", ["spec-0266-51602-0013.fits", "spec-7457-56746-0001.fits"])
    _copy(real_data, folder, ["spec-55862-B6212_sp06-003.fits"], survey="lamost")
    shutil.copy2(folder / "spec-0266-51602-0013.fits", folder / "zz-copy.fits")
    ingest([folder], tmp_path / "s", survey="sdss", workers=0, quiet=True, zwarning_filter=False)
    store = open_store(tmp_path / "s")
    names = {Path(p).name for p in store.meta["source_file"]}
    assert names == {"spec-0266-51602-0013.fits", "spec-7457-56746-0001.fits"}  # zwarning=5 kept on request
    rej = store.rejected.set_index(store.rejected["source_file"].map(lambda p: Path(p).name))["reason"]
    assert rej["spec-55862-B6212_sp06-003.fits"] == "wrong survey: lamost (expected sdss)"
    assert rej["zz-copy.fits"].startswith("duplicate: sdss-0266-51602-0013 already ingested from ")
    with pytest.raises(StoreError, match="no such file"):
        ingest([tmp_path / "missing"], tmp_path / "s", workers=0, quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no spectrum files"):
        ingest([tmp_path / "empty"], tmp_path / "s", workers=0, quiet=True)


@pytest.mark.parametrize("workers", ["0", pytest.param("2", marks=pytest.mark.slow)])
def test_killed_ingest_finishes_on_rerun(reference_store: Path, real_data: Path, tmp_path: Path, workers: str) -> None:
    """SIGKILL a real `spectransfer ingest` (and its Dask workers) mid-run, twice; rerun: one row per accepted file."""
    store = tmp_path / "s"
    cmd = [
        sys.executable,
        "-m",
        "spectransfer",
        "ingest",
        str(real_data / "sdss"),
        str(real_data / "lamost"),
        "--store",
        str(store),
        "--workers",
        workers,
        "--batch-size",
        "4",
        "--quiet",
    ]
    env = {**os.environ, DELAY_ENV: "0.4"}
    for wanted_parts in (2, 5):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                parts = list((store / "parts").glob("*.parquet")) if (store / "parts").is_dir() else []
                # The plan grows as the walk goes: kill while a planned batch has no part yet.
                if len(parts) >= wanted_parts and _planned_batches(store) > len(parts):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "ingest finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert _planned_batches(store) > 0  # interrupted for real: the plan is still in the ledger
    summary = ingest([real_data / "sdss", real_data / "lamost"], store, workers=0, quiet=True)
    assert summary.resumed_batches > 0
    assert _planned_batches(store) == 0 and not list((store / "parts").glob("*"))
    _same_store(store, reference_store)
    # And once more: nothing left to do.
    assert ingest([real_data / "sdss", real_data / "lamost"], store, workers=0, quiet=True).files_processed == 0


def test_cli_ingest_and_stats(real_data: Path, tmp_path: Path) -> None:
    import json

    folder = _copy(real_data, tmp_path / "in", ["spec-0266-51602-0013.fits", "spSpec-51630-0266-633.fit"])
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(folder), "--store", str(tmp_path / "s"), "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["accepted"] == 1 and summary["rejected"] == 1
    res = runner.invoke(app, ["stats", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["survey"] == {"sdss": 1} and st["rejected"] == {"fails filter: zwarning": 1}
    res = runner.invoke(app, ["stats", str(tmp_path / "s")])
    assert res.exit_code == 0 and "rejection reason" in res.output and "fails filter: zwarning" in res.output


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "spectransfer", "ingest", str(tmp_path / "nothing"), "--store", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "no such file" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "spectransfer", "stats", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "store folder does not exist" in proc.stderr


def test_shared_log_grid_window_matches_per_file_resampling(real_data: Path) -> None:
    """The batch path (spectra placed on one 1e-4 log-lambda window) equals per-file resampling
    up to the float32 rounding of the files' own wavelengths (< 0.5% of the flux scale)."""
    from spectransfer.data.ingest import _aligned_index, resample_records
    from spectransfer.data.resample import resample_batch
    from spectransfer.surveys import read_spectrum

    recs = [read_spectrum(p) for p in sorted((real_data / "sdss").glob("spec-*.fits"))]
    recs += [read_spectrum(p) for p in sorted((real_data / "lamost").glob("spec-5586*"))]
    assert all(_aligned_index(r.wave) is not None for r in recs)
    fa, ia = resample_records(recs)
    fb, ib = resample_batch([r.wave for r in recs], [r.flux for r in recs], [r.ivar for r in recs], [r.mask for r in recs])
    both = (ia > 0) & (ib > 0)
    assert both.sum() > 0.99 * (ib > 0).sum()
    scale = np.abs(np.where(both, fb, 0)).max(axis=1, keepdims=True)
    rel = np.abs(fa - fb) / scale
    assert np.median(rel[both]) < 1e-4 and np.percentile(rel[both], 99.9) < 5e-3
    # A spectrum off the log grid (here: stretched) takes the per-file path and still lands.
    r = recs[0]
    r.wave = r.wave * 1.00001
    assert _aligned_index(r.wave) is None
    f1, _ = resample_records([r])
    f2, _ = resample_batch([r.wave], [r.flux], [r.ivar], [r.mask])
    np.testing.assert_array_equal(f1, f2)


def test_quality_cuts_and_their_reasons() -> None:
    from spectransfer.data.ingest import IngestOptions, quality_failure, reason_kind
    from spectransfer.surveys import SpectrumRecord

    def rec(survey: str, wmin: float, wmax: float, zwarning: int | None = 0) -> SpectrumRecord:
        wave = np.linspace(wmin, wmax, 100)
        return SpectrumRecord(
            path="x.fits",
            survey=survey,
            format="test",
            ids={},
            ra=1.0,
            dec=2.0,
            cls="QSO",
            subclass=None,
            z=1.0,
            zwarning=zwarning,
            wave=wave,
            flux=np.ones(100),
            ivar=np.ones(100),
            mask=np.zeros(100, dtype=np.uint32),
            extra={"wavemin": wmin, "wavemax": wmax},
        )

    on = IngestOptions()
    assert quality_failure(rec("sdss", 3839.7244, 8914.597), on) is None  # the paper's limits are inclusive
    assert quality_failure(rec("sdss", 3850.1, 9200), on) == "fails filter: wavemin 3850.1 > 3839.7244"
    assert quality_failure(rec("sdss", 3800, 8900.04), on) == "fails filter: wavemax 8900.0 < 8914.597"
    assert quality_failure(rec("sdss", 3800, 9200, zwarning=4), on) == "fails filter: zwarning=4"
    assert quality_failure(rec("sdss", 3800, 9200, zwarning=None), on) == "fails filter: zwarning missing"
    assert quality_failure(rec("lamost", 3700, 8000, zwarning=None), on).startswith("fails filter: wavemax")
    off = IngestOptions(zwarning_filter=False, coverage_filter=False)
    assert quality_failure(rec("sdss", 3850.1, 8000, zwarning=4), off) is None
    assert quality_failure(rec("lamost", 3700, 9100), IngestOptions(survey="sdss")) == "wrong survey: lamost (expected sdss)"
    assert reason_kind("fails filter: zwarning=4") == "fails filter: zwarning"
    assert reason_kind("fails filter: wavemin 3850.1 > 3839.7244") == "fails filter: wavemin"
    assert reason_kind("unreadable: truncated file") == "unreadable"


@pytest.mark.slow
def test_existing_dask_scheduler_by_address(reference_store: Path, real_data: Path, tmp_path: Path) -> None:
    """`--scheduler tcp://...` sends the batches to a cluster started elsewhere (here: by the test)."""
    import logging

    from dask.distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as cluster:
        res = CliRunner().invoke(
            app,
            [
                "ingest",
                str(real_data / "sdss"),
                str(real_data / "lamost"),
                "--store",
                str(tmp_path / "s"),
                "--scheduler",
                cluster.scheduler_address,
                "--batch-size",
                "8",
                "--json",
            ],
        )
    assert res.exit_code == 0, res.output
    _same_store(tmp_path / "s", reference_store)


def test_cli_workers_and_scheduler_exclusive(tmp_path: Path, real_data: Path) -> None:
    res = CliRunner().invoke(
        app,
        ["ingest", str(real_data / "sdss"), "--store", str(tmp_path / "s"), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
    )
    assert res.exit_code == 2 and "not both" in res.output


def test_catalogue_beside_the_spectra_is_not_rejected_as_a_spectrum(tmp_path: Path) -> None:
    from spectransfer.simulate import simulate_survey

    sim = tmp_path / "sim"
    simulate_survey("sdss", 40, sim, seed=3, qso_fraction=0.3, workers=1)
    catalog = next(p for p in sim.iterdir() if "catalog" in p.name.lower())
    summary = ingest([sim], tmp_path / "store", catalogs=[catalog], workers=0, quiet=True)
    store = open_store(tmp_path / "store")
    rejected = (
        pd.read_parquet(tmp_path / "store" / "rejected.parquet")
        if (tmp_path / "store" / "rejected.parquet").exists()
        else pd.DataFrame(columns=["source_file"])
    )
    assert str(catalog.resolve()) not in set(rejected["source_file"])
    assert len(store.meta) + len(rejected) == 40
    assert summary.files_seen == 40
    truth = pd.read_parquet(sim / "truth.parquet")
    # labels come from the catalogue: every labelled spectrum is a true quasar in the catalogue
    labelled = set(store.meta.loc[store.meta["label"] == 1, "spectrum_id"])
    in_cat = set(truth.loc[truth["in_catalog"], "spectrum_id"])
    assert labelled and labelled <= in_cat


def _specobj(shared_data: Path, path: Path) -> Path:
    """A specObj-style table (PLATE, MJD, FIBERID, RA, DEC, CLASS, Z) from the real spec files' own HDU2 rows."""
    from test_catalogs import _specobj_table

    _specobj_table(shared_data).write(path)
    return path


def test_specobj_catalogue_labels_only_its_qso_rows_and_says_how_many_of_each(shared_data: Path, tmp_path: Path) -> None:
    from astropy.table import Table

    cat = _specobj(shared_data, tmp_path / "specObj-excerpt.fits")
    res = CliRunner().invoke(
        app, ["ingest", str(shared_data / "sdss"), "--store", str(tmp_path / "s"), "--catalog", str(cat), "--workers", "0", "-q"]
    )
    assert res.exit_code == 0, res.output
    meta = open_store(tmp_path / "s").meta
    assert (meta["label"] == 1).sum() > 0 and (meta["pipeline_class"] != "QSO").sum() > 0
    by_id = meta[meta["label_source"] == "id"]
    assert np.array_equal(meta["label"].to_numpy() == 1, (meta["label_source"] == "id").to_numpy())
    assert set(by_id["pipeline_class"]) == {"QSO"}  # the GALAXY and STAR rows of the table label nothing
    t = Table.read(cat)
    counts = {c: list(t["CLASS"]).count(c) for c in set(t["CLASS"])}
    assert f"specObj-excerpt.fits: {len(t)} rows, {counts['QSO']} quasars (class column: " in res.output
    assert all(f"{c} {n}" in res.output for c, n in counts.items())
    info = open_store(tmp_path / "s").info["labels"]
    assert info["mode"] == "catalog" and info["catalogs"][0]["class_counts"] == counts


def test_table_that_cannot_say_which_rows_are_quasars_is_refused_and_leaves_no_store(shared_data: Path, tmp_path: Path) -> None:
    cand = shared_data / "catalogs" / "spectraml_candidates-catalogue.csv"  # emission-line stars, no class column
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectransfer",
            "ingest",
            str(shared_data / "lamost"),
            "--store",
            str(tmp_path / "s"),
            "--catalog",
            str(cand),
            "--workers",
            "0",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "cannot tell which rows are quasars" in proc.stderr and "--qso-catalog" in proc.stderr
    assert not (tmp_path / "s").exists()
    summary = ingest([shared_data / "lamost"], tmp_path / "s", qso_catalogs=[cand], workers=0, quiet=True)
    assert summary.labels["catalogs"][0]["rule"] == "all rows (asked)"
    assert open_store(tmp_path / "s").info["qso_catalogs"] == [str(cand.resolve())]


def test_labels_pipeline_labels_by_the_survey_class(shared_data: Path, tmp_path: Path) -> None:
    from spectransfer.data.store import LABEL_REFERENCE, label_mode

    names = [
        "spec-0266-51602-0013.fits",
        "spec-0752-52251-0323.fits",
        "spec-3851-55302-0531.fits",
        "spec-3851-55302-0542.fits",
        "spec-4055-55359-0027.fits",
    ]
    folder = _copy(shared_data, tmp_path / "in", names)
    summary = ingest([folder], tmp_path / "s", labels="pipeline", workers=0, quiet=True)
    store = open_store(tmp_path / "s")
    assert set(store.meta["pipeline_class"]) == {"QSO", "GALAXY", "STAR"}
    assert store.meta["label"].tolist() == [int(c == "QSO") for c in store.meta["pipeline_class"]]
    assert set(store.meta["label_source"]) == {"pipeline"}
    assert summary.labels == {"mode": "pipeline", "quasars": 2, "class_counts": {"GALAXY": 2, "QSO": 2, "STAR": 1}}
    assert label_mode(store) == "pipeline" and "pipeline" in LABEL_REFERENCE["pipeline"]
    ingest([folder], tmp_path / "s", workers=0, quiet=True)  # no --labels: the store's mode stays
    assert label_mode(open_store(tmp_path / "s")) == "pipeline"
    ingest([folder], tmp_path / "s", labels="catalog", workers=0, quiet=True)  # no catalogue: no labels, and it says so
    store = open_store(tmp_path / "s")
    assert label_mode(store) == "none" and store.meta["label"].sum() == 0
    with pytest.raises(StoreError, match="--labels must be"):
        ingest([folder], tmp_path / "s", labels="truth", workers=0, quiet=True)


def test_changing_split_settings_needs_resplit(shared_data: Path, tmp_path: Path) -> None:
    from spectransfer.data.splits import SplitConfig

    folder = _copy(shared_data, tmp_path / "in", [f.name for f in sorted((shared_data / "sdss").glob("spec-*.fits"))[:8]])
    ingest([folder], tmp_path / "s", workers=0, quiet=True)
    before = open_store(tmp_path / "s").meta.set_index("spectrum_id")["split"]
    with pytest.raises(StoreError, match=r"split settings differ.*val_fraction 0.1 -> 0.3.*--resplit"):
        ingest([folder], tmp_path / "s", split_config=SplitConfig(val_fraction=0.3), workers=0, quiet=True)
    assert open_store(tmp_path / "s").meta.set_index("spectrum_id")["split"].equals(before)
    res = CliRunner().invoke(
        app, ["ingest", str(folder), "--store", str(tmp_path / "s"), "--workers", "0", "--val-fraction", "0.3", "-q"]
    )
    assert res.exit_code != 0
    summary = ingest([folder], tmp_path / "s", split_config=SplitConfig(val_fraction=0.3), resplit=True, workers=0, quiet=True)
    after = open_store(tmp_path / "s").meta.set_index("spectrum_id")["split"]
    assert summary.resplit_moved == int((after.reindex(before.index) != before).sum())
    assert open_store(tmp_path / "s").info["splits"]["config"]["val_fraction"] == 0.3


def test_small_store_warns_of_an_empty_split_and_names_the_option(shared_data: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["ingest", str(shared_data / "sdss"), "--store", str(tmp_path / "s"), "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    warn = [line for line in res.stderr.splitlines() if line.startswith("warning: sdss: split")]
    assert len(warn) == 1 and "is empty" in warn[0] and "--resplit --val-fraction" in warn[0]
    fraction = warn[0].split("--val-fraction ")[1].split()[0].rstrip(",")
    res = CliRunner().invoke(
        app,
        [
            "ingest",
            str(shared_data / "sdss"),
            "--store",
            str(tmp_path / "s"),
            "--workers",
            "0",
            "-q",
            "--resplit",
            "--val-fraction",
            fraction,
        ],
    )
    assert res.exit_code == 0 and "warning: sdss: split" not in res.stderr
    assert {"train", "val", "test"} <= set(open_store(tmp_path / "s").meta["split"])


def test_no_usable_spectrum_is_an_error_and_a_new_store_is_removed(shared_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"spec-{i}.fits").write_bytes(b"not a fits file\n" * 10)
    shutil.copy2(shared_data / "sdss" / "spec-7457-56746-0001.fits", bad)  # readable, but ZWARNING 5
    proc = subprocess.run(
        [sys.executable, "-m", "spectransfer", "ingest", str(bad), "--store", str(tmp_path / "s"), "--workers", "0", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "none of the 4 spectrum files read could be used (unreadable 3, fails filter: zwarning 1)" in proc.stderr
    assert not (tmp_path / "s").exists()
    # Into an existing store: an error too, but the store and its spectra stay.
    good = _copy(shared_data, tmp_path / "good", ["spec-0266-51602-0013.fits"])
    ingest([good], tmp_path / "s", workers=0, quiet=True)
    with pytest.raises(StoreError, match="none of the 4 spectrum files"):
        ingest([bad], tmp_path / "s", workers=0, quiet=True)
    assert len(open_store(tmp_path / "s").meta) == 1


def test_label_mode_of_stores_written_in_one_go(tmp_path: Path) -> None:
    from spectransfer.data.store import label_mode, write_store

    n = DEFAULT_GRID.n_bins
    flux = np.zeros((3, n), dtype=np.float32)
    meta = pd.DataFrame({"survey": "sdss", "ra": [1.0, 2.0, 3.0], "dec": [0.0, 0.0, 0.0]})
    assert label_mode(write_store(tmp_path / "a", flux, flux, meta)) == "none"
    assert (
        label_mode(write_store(tmp_path / "b", flux, flux, meta.assign(label=[1, 0, 0], label_source=["id", "none", "none"])))
        == "catalog"
    )
    assert (
        label_mode(write_store(tmp_path / "c", flux, flux, meta.assign(label=[1, 0, 0], label_source="pipeline"))) == "pipeline"
    )


def test_fuller_set_lands_whole(full_data: Path, tmp_path: Path) -> None:
    """The fuller ../shared/data set (where present): every file lands or is rejected with a
    reason, and all four SDSS-RM 017 epochs form one object in one split."""
    ingest([full_data / "sdss", full_data / "lamost"], tmp_path / "s", workers=0, quiet=True)
    store = open_store(tmp_path / "s")
    meta, rej = store.meta, store.rejected
    n_files = len(list((full_data / "sdss").iterdir())) + len(list((full_data / "lamost").iterdir()))
    assert len(meta) + len(rej) == n_files and rej["reason"].notna().all()
    assert ZWARNING_FILES <= {Path(p).name for p in rej["source_file"]}
    epochs = (*RM_EPOCHS, "spec-6717-56397-0534.fits")
    rm = meta[meta["source_file"].map(lambda p: Path(p).name in epochs)]
    assert len(rm) == 4 and rm["object_id"].nunique() == 1 and rm["split"].nunique() == 1


def test_store_records_whether_its_spectra_were_simulated(real_data: Path, tmp_path: Path) -> None:
    from spectransfer.config import SIMULATE_MARKER

    real = _copy(real_data, tmp_path / "real", ["spec-0266-51602-0013.fits"])
    ingest([real], tmp_path / "s", workers=0, quiet=True)
    assert open_store(tmp_path / "s").info["origin"] == "real"
    sim = _copy(real_data, tmp_path / "sim", ["spec-0752-52251-0323.fits"])
    (sim / SIMULATE_MARKER).write_text("written by simulate\n")
    ingest([sim], tmp_path / "s", workers=0, quiet=True)
    info = open_store(tmp_path / "s").info
    assert info["origin"] == "mixed" and sorted(info["input_origins"].values()) == ["real", "simulated"]


def test_magnitudes_say_where_they_came_from(real_data: Path, tmp_path: Path) -> None:
    folder = _copy(real_data, tmp_path / "in", ["spec-0752-52251-0323.fits", "spSpec-51993-0542-631.fit"])
    ingest([folder], tmp_path / "s", workers=0, quiet=True)
    meta = open_store(tmp_path / "s").meta.set_index("spectrum_id")
    with fits.open(folder / "spec-0752-52251-0323.fits") as hdul:  # the file's own photometry decides
        want = "psfmag" if "PSFMAG" in hdul[2].columns.names else "spectroflux"
    spec = meta[meta["source_file"].str.endswith("spec-0752-52251-0323.fits")].iloc[0]
    spspec = meta[meta["source_file"].str.endswith("spSpec-51993-0542-631.fit")].iloc[0]
    assert spec["mag_source"] == want and np.isfinite(spec["mag"])
    assert spspec["mag_source"] == ("synthetic" if np.isfinite(spspec["mag"]) else None)
