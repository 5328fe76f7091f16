"""The reality check counts right and wrong answers on real files by their own pipeline class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from spectransfer.candidates.classify import classify
from spectransfer.config import DEFAULT_GRID
from spectransfer.evaluation.reality import reality_check
from test_discover import _run


def _with_a_cut_file(real_data: Path, out: Path) -> list[Path]:
    """The real files' folders and a third folder holding one LAMOST file whose blue end is
    flagged bad (BADCCD, ivar 0): a spectrum classify's coverage cut refuses."""
    (out / "cut").mkdir(parents=True)
    with fits.open(real_data / "lamost" / "spec-55862-B6212_sp06-049.fits") as hdul:
        hdr, image = hdul[0].header.copy(), hdul[0].data.copy()
    image[1, :400] = 0.0
    image[3, :400] = 1  # ANDMASK BADCCD: a flagged loss, which the reader does not restore
    hdr["FIBERID"] = 250
    fits.PrimaryHDU(image, header=hdr).writeto(out / "cut" / "spec-55862-B6212_sp06-250.fits")
    # and a DR7 spSpec its pipeline classed as sky (SPEC_CLN 5): a class that names no object
    with fits.open(real_data / "sdss" / "spSpec-51630-0266-633.fit") as hdul:
        hdul[0].header["SPEC_CLN"] = 5
        hdul[0].header["FIBERID"] = 640
        hdul.writeto(out / "cut" / "spSpec-51630-0266-640.fit")
    return [real_data / "sdss", real_data / "lamost", out / "cut"]


def test_reality_check_counts_by_the_files_own_class(real_data: Path, tmp_path: Path) -> None:
    run = _run(tmp_path / "run", seed=5, grid=DEFAULT_GRID)
    folders = _with_a_cut_file(real_data, tmp_path / "extra")
    rep = reality_check(run, folders, threshold=0.5, engine="onnx", refine="none")
    files = {r["file"]: r for r in rep["files"]}
    n_files = len(list((real_data / "sdss").iterdir())) + len(list((real_data / "lamost").iterdir())) + 2
    assert len(files) + len(rep["not_scored"]) == n_files
    # the reference: each SDSS spec file's own HDU2 CLASS
    for f in sorted((real_data / "sdss").glob("spec-*.fits")):
        with fits.open(f) as hdul:
            sky = int(hdul[2].data["ZWARNING"][0]) & 1
            assert files[f.name]["pipeline_class"] == (None if sky else str(hdul[2].data["CLASS"][0]).strip().upper())
    assert files["spec-55919-B5591903_sp01-001.fits"]["pipeline_class"] is None  # LAMOST 'Unknown': not counted
    # the headline counts what classify itself accepts; the files its cuts refuse are scored
    # with the cuts off, carry the reason, and count in the all_files_* figures only
    labelled = [r for r in files.values() if r["pipeline_class"] is not None]
    counted = [r for r in labelled if r["cut"] is None]
    cut = [r for r in files.values() if r["cut"] is not None]
    assert [r["file"] for r in cut] == ["spec-55862-B6212_sp06-250.fits"] and rep["n_cut"] == 1
    assert cut[0]["cut"].startswith("fails filter: wavemin")
    refused = {Path(f).name for f, _ in classify(run, folders, refine="none").failed}
    assert {r["file"] for r in cut} == refused
    assert all("zwarning" not in r["cut"] for r in cut)  # classify scores ZWARNING != 0 files
    assert files["spec-7457-56746-0001.fits"]["cut"] is None and files["spec-7457-56746-0001.fits"]["is_qso"] is not None
    # a BOSS sky fibre (ZWARNING bit 0 SKY; its header's OBJTYPE is SKY): scored, not counted as the QSO the pipeline fitted
    with fits.open(real_data / "sdss" / "spec-7457-56746-0001.fits") as hdul:
        assert hdul[2].data["OBJTYPE"][0].strip() == "SKY" and int(hdul[2].data["ZWARNING"][0]) & 1
    assert files["spec-7457-56746-0001.fits"]["pipeline_class"] is None
    assert files["spSpec-51630-0266-640.fit"]["pipeline_class"] is None and files["spSpec-51630-0266-640.fit"]["cut"] is None
    assert rep["n_real"] == len(counted) == sum(c["n"] for c in rep["per_class"].values())
    assert rep["all_files_n"] == len(labelled)
    everything = [r for r in labelled if r["pipeline_class"] == "QSO"]
    assert rep["all_files_qso_recall"] == np.mean([r["is_qso"] for r in everything])
    qso = [r for r in counted if r["pipeline_class"] == "QSO"]
    assert rep["n_qso"] == len(qso) and rep["real_qso_recall"] == np.mean([r["is_qso"] for r in qso])
    assert rep["real_accuracy"] == np.mean([r["right"] for r in counted])


def test_reality_at_depth_makes_the_files_fainter(real_data: Path, tmp_path: Path) -> None:
    from spectransfer.candidates.classify import _read
    from spectransfer.data.ingest import IngestOptions, find_files
    from spectransfer.evaluation.reality import reality_at_depth

    run = _run(tmp_path / "run", seed=5, grid=DEFAULT_GRID)
    folders = [real_data / "sdss", real_data / "lamost"]
    head = reality_check(run, folders, threshold=0.5, engine="onnx", refine="none")
    deep = reality_at_depth(run, folders, [1e9, 2.0], draws=2, engine="onnx")
    # a level above every file's S/N leaves them as they are: the headline figures, twice over
    same = deep["levels"]["1e+09"]
    assert same["fainter"] == 0.0
    for key in ("real_qso_recall", "real_fp_rate_sdss", "real_fp_rate_lamost"):
        assert same[key] == head[key] and same[f"network_{key}"] == head[f"network_{key}"]
    assert same["n_real"] == 2 * head["n_real"]
    # at S/N 2 the files brighter than that (nearly all shared ones) are scored noisier
    files, _ = find_files(folders)
    meta = _read(files, DEFAULT_GRID, None, IngestOptions(zwarning_filter=False))[0]
    assert deep["levels"]["2"]["fainter"] == np.mean(meta["snr"].to_numpy(float) > 2.0) > 0.5
    assert deep["levels"]["2"]["n_real"] == 2 * head["n_real"]
