"""classify: real files scored without a store equal ingest + discover; bad files listed, the rest
scored; every output format round-trips through astropy; --help documents every option."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectransfer.candidates.classify import classify
from spectransfer.candidates.schema import CLASSIFY_COLUMNS, COLUMNS, QUALITY_BITS, REFERENCE
from test_discover import _run

SDSS = [
    "spSpec-51630-0266-633.fit",
    "spSpec-51984-0296-001.fit",
    "spec-0266-51602-0013.fits",
    "spec-3586-55181-0002.fits",
    "spec-7877-56898-0604.fits",
]  # the first has ZWARNING = 256: ingest refuses it by default, classify scores it


@pytest.fixture(scope="module")
def real(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A folder of real SDSS and LAMOST files, a run on the paper's grid, and their discover catalogue."""
    from spectransfer.candidates.discover import discover
    from spectransfer.config import DEFAULT_GRID
    from spectransfer.data.ingest import ingest

    base = tmp_path_factory.mktemp("classify")
    files = base / "files"
    files.mkdir()
    for name in SDSS:
        shutil.copy(shared_data / "sdss" / name, files / name)
    for f in sorted((shared_data / "lamost").iterdir())[:8]:
        shutil.copy(f, files / f.name)
    run = _run(base / "run", seed=7, temperature=0.8, grid=DEFAULT_GRID)
    ingest([files], base / "store", workers=0, quiet=True, zwarning_filter=False)  # as classify
    discover(run, base / "store", base / "cand.parquet", engine="torch", quiet=True)
    return {"files": files, "run": run, "cand": pd.read_parquet(base / "cand.parquet"), "base": base}


def test_classify_equals_ingest_plus_discover(real: dict) -> None:
    res = classify(real["run"], [real["files"]], engine="torch", templates="uncertain")  # discover's default
    cand = real["cand"].set_index("SPECTRUM_ID")
    t = res.table.set_index("SPECTRUM_ID")
    assert len(t) == len(cand) > 5 and sorted(t.index) == sorted(cand.index)
    np.testing.assert_allclose(
        t["P_QSO"].to_numpy(np.float64), cand.loc[t.index, "P_QSO"].to_numpy(np.float64), rtol=0, atol=1e-6
    )
    # the same decision: where the templates did not decide, P_QSO >= threshold
    for col in ("IS_QSO", "SPECTYPE", "DECIDED_BY"):
        assert t[col].tolist() == cand.loc[t.index, col].tolist(), col
    np.testing.assert_allclose(t["DCHI2_QSO"], cand.loc[t.index, "DCHI2_QSO"], rtol=1e-5, equal_nan=True)
    net = t["DECIDED_BY"] == "network"
    assert (t.loc[net, "IS_QSO"] == (t.loc[net, "P_QSO"] >= 0.5)).all()
    alone = classify(real["run"], [real["files"]], engine="torch", templates="none").table
    assert (alone["IS_QSO"] == (alone["P_QSO"] >= 0.5)).all() and set(alone["DECIDED_BY"]) == {"network"}
    # the files ingest rejected are exactly the ones classify lists, with ingest's reasons
    assert len(res.failed) == res.n_files - len(t)
    assert all(reason.startswith(("fails filter", "unreadable")) for _f, reason in res.failed)
    for col in ("SURVEY", "CLASS", "Z", "RA", "DEC", "SOURCE_FILE"):
        assert col in t.columns
    # a pipeline redshift warning is a doubt about the label, not the spectrum: scored and flagged
    warned = t[t["SOURCE_FILE"].str.endswith(SDSS[0])]
    assert len(warned) == 1 and int(warned["ZWARNING"].iloc[0]) == 256
    assert int(warned["QUALITY"].iloc[0]) & (1 << QUALITY_BITS["ZWARNING"])
    strict = classify(real["run"], [real["files"]], engine="torch", templates="none", refine="none", zwarning_filter=True)
    assert [(Path(f).name, r) for f, r in strict.failed if "zwarning" in r] == [(SDSS[0], "fails filter: zwarning=256")]
    assert len(strict.table) == len(t) - 1
    np.testing.assert_allclose(t["Z"].to_numpy(np.float64), cand.loc[t.index, "Z"].to_numpy(np.float64))


def test_damaged_file_is_listed_and_the_rest_scored(real: dict, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(real["files"], folder)
    (folder / "spec-broken.fits").write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    good = classify(real["run"], [real["files"]])
    res = classify(real["run"], [folder])
    assert res.n_files == good.n_files + 1 and len(res.table) == len(good.table)
    broken = [r for f, r in res.failed if f.endswith("spec-broken.fits")]
    assert len(broken) == 1 and broken[0].startswith("unreadable")
    r = subprocess.run(
        [sys.executable, "-m", "spectransfer", "classify", str(real["run"]), str(folder), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert "spec-broken.fits" in r.stdout and "not scored" in r.stdout and "Traceback" not in r.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectransfer",
            "classify",
            str(real["run"]),
            *[str(real["files"] / n) for n in SDSS[:1]],
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    doc = json.loads(ok.stdout)
    assert ok.returncode == (1 if doc["failed"] else 0)
    assert {"SOURCE_FILE", "SPECTRUM_ID", "P_QSO", "IS_QSO"} <= set(doc["rows"][0] if doc["rows"] else CLASSIFY_COLUMNS)


@pytest.mark.parametrize("ext", [".fits", ".parquet", ".csv", ".vot"])
def test_every_output_format_round_trips_through_astropy(real: dict, tmp_path: Path, ext: str) -> None:
    from astropy.table import Table

    out = tmp_path / f"t{ext}"
    res = classify(real["run"], [real["files"]], out=out)
    t = Table.read(out, **({"hdu": "CANDIDATES"} if ext == ".fits" else {}))
    assert len(t) == len(res.table) and list(t.colnames) == list(res.table.columns)
    np.testing.assert_allclose(np.asarray(t["P_QSO"], np.float64), res.table["P_QSO"].to_numpy(np.float64), rtol=1e-6)
    assert [str(s) for s in t["SPECTRUM_ID"]] == res.table["SPECTRUM_ID"].tolist()
    if ext in (".fits", ".vot"):
        assert t["RA"].unit == "deg"
    if ext == ".vot":
        from astropy.io.votable import parse

        assert t["P_QSO"].description == COLUMNS["P_QSO"].description
        infos = {i.name: i.value for i in parse(out).get_first_table().infos}
        assert infos["REFERENC"] == REFERENCE and infos["TEMPER"] == "0.8" and infos["ENGINE"] == "torch"
    if ext == ".fits":
        from astropy.io import fits

        h = fits.getheader(out, "CANDIDATES")
        for i, name in enumerate(t.colnames, start=1):
            assert h[f"TCOMM{i}"] == COLUMNS[name].description[:68]
        assert h["REFERENC"] == REFERENCE and h["TEMPER"] == 0.8 and h["ENGINE"] == "torch"


def test_classify_refuses_bad_arguments_in_one_line(real: dict, tmp_path: Path) -> None:
    for extra, msg in (
        (["--out", str(tmp_path / "x.txt")], "must end in"),
        (["--engine", "onnx-int8"], "int8"),
        (["--threshold", "2"], "threshold"),
        (["--templates", "sometimes"], "--templates"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "spectransfer", "classify", str(real["run"]), str(real["files"]), *extra, "--quiet"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_documents_every_option() -> None:
    import typer.main

    from spectransfer.cli import app

    cmd = typer.main.get_command(app).commands["classify"]
    r = subprocess.run(
        [sys.executable, "-m", "spectransfer", "classify", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0
    for p in cmd.params:
        assert p.help, f"{p.name} has no help text"
        for opt in p.opts:
            if opt.startswith("-"):
                assert opt in r.stdout, opt
