"""`spectransfer info` on real survey files and on a bad one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spectransfer.cli import app
from spectransfer.surveys import read_spectrum

KEYS = [
    "path",
    "survey",
    "format",
    "ids",
    "ra",
    "dec",
    "class",
    "subclass",
    "z",
    "zwarning",
    "n_pixels",
    "wave_min",
    "wave_max",
    "cuts",
]


def _real_files(real_data: Path) -> list[Path]:
    return sorted((real_data / "sdss").glob("*")) + sorted((real_data / "lamost").glob("*"))


def test_info_json_has_exactly_the_contract_keys(real_data: Path) -> None:
    files = _real_files(real_data)
    result = CliRunner().invoke(app, ["info", "--json", *map(str, files)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(files)
    for path, line in zip(files, lines):
        obj = json.loads(line)
        assert list(obj) == KEYS and obj["path"] == str(path)
        rec = read_spectrum(path)
        assert obj["ids"] == rec.ids
        assert obj["class"] == rec.cls and obj["z"] == rec.z and obj["zwarning"] == rec.zwarning
        assert obj["n_pixels"] == rec.n_pixels
        assert obj["wave_min"] == pytest.approx(rec.wave[0]) and obj["wave_max"] == pytest.approx(rec.wave[-1])
        assert obj["survey"] == path.parent.name


def test_info_json_missing_values_are_null(real_data: Path) -> None:
    path = real_data / "lamost" / "spec-55919-B5591903_sp01-001.fits"  # CLASS 'Unknown', Z -9999
    result = CliRunner().invoke(app, ["info", "--json", str(path)])
    obj = json.loads(result.stdout)
    assert obj["class"] is None and obj["subclass"] is None and obj["z"] is None
    assert obj["ids"]["obsid"] is None and obj["ids"]["planid"] == "B5591903"
    assert '"z": null' in result.stdout
    # a DR2 file whose blue end the pipeline zeroed for low signal: it passes, and info says what the reader gave back
    assert obj["cuts"]["pass"] and obj["cuts"]["reason"].startswith("passes; data cover 3700.0-")
    assert re.search(r"\((\d+) zeroed low-signal pixels restored\)", obj["cuts"]["reason"])


def test_info_goes_on_after_a_bad_file_and_exits_1(real_data: Path, tmp_path: Path) -> None:
    good1 = real_data / "sdss" / "spec-0752-52251-0323.fits"
    good2 = real_data / "lamost" / "spec-59517-EG025613N082253M02_sp08-200.fits.gz"
    bad = tmp_path / "spec-9999-99999-0001.fits"
    bad.write_bytes(good1.read_bytes()[:5000])  # truncated
    result = CliRunner().invoke(app, ["info", "--json", str(good1), str(bad), str(good2)])
    assert result.exit_code == 1
    objs = [json.loads(line) for line in result.stdout.splitlines()]  # stdout stays clean JSON lines
    assert [o["ids"].get("plate", o["ids"].get("obsid")) for o in objs] == [752, 937808200]
    assert str(bad) in result.stderr and "truncated" in result.stderr


def test_info_human_lines_and_folders(real_data: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.fits").write_text("not a fits file\n")
    result = CliRunner().invoke(app, ["info", str(real_data / "lamost"), str(tmp_path / "notes.fits")])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == len(list((real_data / "lamost").glob("*")))
    assert all(": lamost lamost-" in line for line in lines)
    assert "spec-55859-F5902_sp01-013_dr8.fits.gz: lamost lamost-coadd obsid=101013" in result.stdout
    assert "not a FITS file" in result.stderr


def test_info_entry_point(real_data: Path, tmp_path: Path) -> None:
    """The installed command, as a script would call it: JSON on stdout, reasons on stderr, exit 1."""
    exe = Path(sys.executable).with_name("spectransfer")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "spectransfer.cli"]
    spspec = real_data / "sdss" / "spSpec-51993-0542-631.fit"
    proc = subprocess.run(
        [*cmd, "info", "--json", str(spspec), str(tmp_path / "missing.fits")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 1
    obj = json.loads(proc.stdout)
    assert obj["format"] == "sdss-spspec" and obj["class"] == "QSO" and obj["z"] == pytest.approx(2.2319)
    assert "missing.fits" in proc.stderr and "cannot open" in proc.stderr


def test_info_and_ingest_agree_on_the_cuts_of_every_real_file(shared_data: Path, tmp_path: Path) -> None:
    """info's verdict per file is ingest's: kept files land in meta, the others carry the same reason."""
    from spectransfer.data.ingest import ingest
    from spectransfer.data.store import open_store

    files = _real_files(shared_data)
    result = CliRunner().invoke(app, ["info", "--json", *map(str, files)])
    assert result.exit_code == 0, result.stderr
    cuts = {str(p.resolve()): json.loads(line)["cuts"] for p, line in zip(files, result.stdout.splitlines())}
    ingest([str(p) for p in files], tmp_path / "store", workers=0, quiet=True)
    store = open_store(tmp_path / "store")
    kept = set(store.meta["source_file"])
    reasons = dict(zip(store.rejected["source_file"], store.rejected["reason"]))
    assert kept | set(reasons) == set(cuts)
    for path, c in cuts.items():
        assert c["pass"] == (path in kept), (path, c)
        if not c["pass"]:
            assert c["reason"].split("; data cover")[0] == reasons[path]
    # Every LAMOST file reaches the grid's blue end, the early ones whose low-signal blue
    # pixels the pipeline zeroed included (the reader gives them back), and info says so.
    lamost = {p: c for p, c in cuts.items() if "/lamost/" in p}
    assert lamost and all(c["pass"] for c in lamost.values()), {p: c["reason"] for p, c in lamost.items() if not c["pass"]}


def test_info_human_line_ends_with_the_cuts(shared_data: Path) -> None:
    path = shared_data / "sdss" / "spec-7457-56746-0001.fits"  # ZWARNING 5
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.stdout.rstrip().endswith("A") and "cuts: fails filter: zwarning=5; data cover " in result.stdout
