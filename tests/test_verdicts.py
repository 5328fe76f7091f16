"""The verdict database: its exact schema, upsert rules, WAL mode, and the FITS export."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits, votable
from astropy.table import Table

from spectransfer.inspect import InspectError
from spectransfer.inspect.verdicts import VerdictDB, export_fits, export_table


def dump(path) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return sorted(con.execute("SELECT spectrum_id, verdict, z, inspector, created_at FROM verdicts"))
    finally:
        con.close()


def test_schema_is_the_contract_evaluate_reads(tmp_path):
    VerdictDB(tmp_path / "v.sqlite")
    con = sqlite3.connect(tmp_path / "v.sqlite")
    info = con.execute("PRAGMA table_info(verdicts)").fetchall()
    con.close()
    cols = [(r[1], r[2]) for r in info]
    assert cols == [("spectrum_id", "TEXT"), ("verdict", "TEXT"), ("z", "REAL"), ("inspector", "TEXT"), ("created_at", "TEXT")]
    pk = {r[1]: r[5] for r in info if r[5]}
    assert pk == {"spectrum_id": 1, "inspector": 2}


def test_database_runs_in_wal_mode(tmp_path):
    db = VerdictDB(tmp_path / "v.sqlite")
    db.record("a", "qso", "ann")
    con = sqlite3.connect(tmp_path / "v.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent once set
    con.close()


def test_same_inspector_replaces_others_are_kept(tmp_path):
    db = VerdictDB(tmp_path / "v.sqlite")
    db.record("sdss-1-2-3", "qso", "ann", z=2.1)
    db.record("sdss-1-2-3", "unsure", "bob")
    db.record("sdss-1-2-3", "not_qso", "ann")  # ann changes her mind: z goes too
    db.record("sdss-1-2-4", "qso", "ann", z=0.5)
    rows = {(r[0], r[3]): (r[1], r[2]) for r in dump(tmp_path / "v.sqlite")}
    assert rows == {
        ("sdss-1-2-3", "ann"): ("not_qso", None),
        ("sdss-1-2-3", "bob"): ("unsure", None),
        ("sdss-1-2-4", "ann"): ("qso", 0.5),
    }
    assert db.latest_by_spectrum("bob") == {"sdss-1-2-3": "unsure"}
    assert db.count() == 3


@pytest.mark.parametrize(
    "args",
    [
        ("x", "yes", "ann", None),
        ("x", "QSO", "ann", None),
        ("", "qso", "ann", None),
        ("x", "qso", "", None),
        ("x", "qso", "ann", float("nan")),
        ("x", "qso", "ann", float("inf")),
    ],
)
def test_bad_verdicts_raise_and_change_nothing(tmp_path, args):
    db = VerdictDB(tmp_path / "v.sqlite")
    db.record("keep", "qso", "ann", z=1.0)
    before = dump(tmp_path / "v.sqlite")
    sid, verdict, who, z = args
    with pytest.raises(InspectError):
        db.record(sid, verdict, who, z=z)
    assert dump(tmp_path / "v.sqlite") == before


def test_sqlite_itself_rejects_verdicts_outside_the_set(tmp_path):
    VerdictDB(tmp_path / "v.sqlite")
    con = sqlite3.connect(tmp_path / "v.sqlite")
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO verdicts VALUES ('a', 'maybe', NULL, 'ann', 't')")
    con.close()


def test_foreign_or_broken_database_is_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE verdicts (id TEXT, v TEXT)")
    con.commit()
    con.close()
    with pytest.raises(InspectError, match="columns"):
        VerdictDB(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InspectError, match="junk.sqlite"):
        VerdictDB(junk)
    with pytest.raises(InspectError, match="not found"):
        VerdictDB(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()


def test_export_fits_round_trips_through_astropy(tmp_path):
    db = VerdictDB(tmp_path / "v.sqlite")
    db.record("sdss-266-51602-1", "qso", "ann", z=2.25)
    db.record("lamost-55859-F5902-1-1", "not_qso", "bob")
    db.record("sdss-266-51602-1", "unsure", "zoë")
    out = tmp_path / "out" / "verdicts.fits"
    assert export_fits(tmp_path / "v.sqlite", out) == 3
    with fits.open(out, checksum=True) as hdul:
        h = hdul["VERDICTS"].header
        data = hdul["VERDICTS"].data
        assert h["STVER"]
        assert h["NVERDICT"] == 3
        assert any(k.startswith("DEPNAM") for k in h)
        got = sorted(
            (s.strip(), v.strip(), None if np.isnan(z) else float(z), i.strip())
            for s, v, z, i in zip(data["SPECTRUM_ID"], data["VERDICT"], data["Z"], data["INSPECTOR"])
        )
        assert data["Z"].dtype.kind == "f" and data["Z"].dtype.itemsize == 8
    want = sorted((r[0], r[1], r[2], r[3].replace("ë", "\\xeb")) for r in dump(tmp_path / "v.sqlite"))
    assert got == want  # FITS strings are ASCII: the non-ASCII name is kept as an escape
    assert [p.name for p in out.parent.iterdir()] == ["verdicts.fits"]  # no temporary left behind


def test_export_of_missing_database_writes_nothing(tmp_path):
    out = tmp_path / "v.fits"
    with pytest.raises(InspectError):
        export_fits(tmp_path / "nope.sqlite", out)
    assert not out.exists() and not (tmp_path / "nope.sqlite").exists()


def test_cli_verdicts_export_and_error_line(tmp_path):
    db = VerdictDB(tmp_path / "v.sqlite")
    db.record("a", "qso", "ann", z=1.5)
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectransfer",
            "verdicts",
            "export",
            "--db",
            str(tmp_path / "v.sqlite"),
            "--out",
            str(tmp_path / "v.fits"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    with fits.open(tmp_path / "v.fits") as hdul:
        assert hdul["VERDICTS"].data["VERDICT"][0].strip() == "qso"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectransfer",
            "verdicts",
            "export",
            "--db",
            str(tmp_path / "none.sqlite"),
            "--out",
            str(tmp_path / "x.fits"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "none.sqlite" in bad.stderr
    assert not (tmp_path / "x.fits").exists()


@pytest.fixture()
def db_and_candidates(tmp_path):
    db = VerdictDB(tmp_path / "v.sqlite")
    db.record("sdss-0266-51602-0001", "qso", "ann", z=2.25)
    db.record("lamost-55859-F5902-01-001", "not_qso", "zoë")
    db.record("not-a-candidate", "unsure", "bob")
    cand = Table(
        {
            "SPECTRUM_ID": ["lamost-55859-F5902-01-001", "sdss-0266-51602-0001", "sdss-9999-99999-0001"],
            "RA": [332.2022, 146.71420, 1.0],
            "DEC": [-2.0568, -1.04128, 2.0],
            "P_QSO": np.array([0.1, 0.93, 0.5], dtype="f4"),
            "CATEGORY": ["agree_other", "new_candidate", "agree_other"],
        }
    )
    cand.meta["EXTNAME"] = "CANDIDATES"
    path = tmp_path / "candidates.fits"
    cand.write(path)
    return tmp_path / "v.sqlite", path


def _read_back(out):
    """The exported table through astropy, and (unit, description) per column from the file's own metadata."""
    if out.suffix == ".fits":
        t = Table.read(out, hdu="VERDICTS")
        h = fits.getheader(out, "VERDICTS")
        n = h["TFIELDS"]
        docs = {h[f"TTYPE{i}"]: (h.get(f"TUNIT{i}"), h.get(f"TCOMM{i}")) for i in range(1, n + 1)}
        meta = dict(h)
    elif out.suffix == ".vot":
        t = Table.read(out)
        docs = {c: (None if t[c].unit is None else str(t[c].unit), t[c].description) for c in t.colnames}
        meta = {i.name: i.value for i in votable.parse(out).get_first_table().infos}
    else:
        t = Table.read(out, format="ascii.ecsv") if out.suffix == ".csv" else Table.read(out)
        docs = {c: (None if t[c].unit is None else str(t[c].unit), t[c].description) for c in t.colnames}
        meta = dict(t.meta)
    return t, docs, meta


@pytest.mark.parametrize("ext", ["fits", "parquet", "csv", "vot"])
def test_export_each_format_round_trips_with_units_descriptions_and_candidates(db_and_candidates, tmp_path, ext):
    db, cand = db_and_candidates
    out = tmp_path / f"verdicts.{ext}"
    assert export_table(db, out, candidates=cand) == 3
    if ext == "csv":
        assert out.read_text().startswith("# %ECSV")  # a CSV with its metadata in '#' lines
    if ext == "parquet":
        import pyarrow.parquet as pq

        assert pq.read_table(out).num_rows == 3
    t, docs, meta = _read_back(out)
    assert t.colnames == ["SPECTRUM_ID", "VERDICT", "Z", "INSPECTOR", "CREATED_AT", "RA", "DEC", "P_QSO", "CATEGORY"]
    assert all(doc for _, doc in docs.values())  # a description (TCOMMn) on every column
    assert docs["RA"][0] == docs["DEC"][0] == "deg"
    assert meta["NVERDICT"] in (3, "3") and meta["SRCCAND"] == "candidates.fits" and meta["STVER"]
    assert any(k.startswith("DEPNAM") for k in meta)
    ref = Table.read(cand)
    by_id = {str(r["SPECTRUM_ID"]): r for r in ref}
    for row in t:
        sid = str(row["SPECTRUM_ID"]).strip()
        if sid in by_id:
            assert row["RA"] == pytest.approx(by_id[sid]["RA"]) and row["DEC"] == pytest.approx(by_id[sid]["DEC"])
            assert row["P_QSO"] == pytest.approx(by_id[sid]["P_QSO"]) and str(row["CATEGORY"]).strip() == by_id[sid]["CATEGORY"]
        else:
            # NaN = not in the candidates (astropy reads FITS/VOTable NaN back as masked)
            assert all(np.ma.is_masked(row[c]) or np.isnan(row[c]) for c in ("RA", "DEC", "P_QSO"))
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_export_unknown_extension_is_one_line_error_and_writes_nothing(db_and_candidates, tmp_path):
    db, _ = db_and_candidates
    with pytest.raises(InspectError, match=r"verdicts.txt: unknown table format '.txt'"):
        export_table(db, tmp_path / "verdicts.txt")
    bad = subprocess.run(
        [sys.executable, "-m", "spectransfer", "verdicts", "export", "--db", str(db), "--out", str(tmp_path / "verdicts.xlsx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown table format" in bad.stderr
    assert not (tmp_path / "verdicts.xlsx").exists()


def test_cli_export_csv_is_not_fits(db_and_candidates, tmp_path):
    db, cand = db_and_candidates
    out = tmp_path / "verdicts.csv"
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectransfer",
            "verdicts",
            "export",
            "--db",
            str(db),
            "--out",
            str(out),
            "--candidates",
            str(cand),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert not out.read_bytes().startswith(b"SIMPLE")
    import pandas as pd

    df = pd.read_csv(out, comment="#")
    assert sorted(df["VERDICT"]) == ["not_qso", "qso", "unsure"] and df["RA"].notna().sum() == 2
