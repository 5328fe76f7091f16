"""Verdicts become labels: applied beside the catalogue's, idempotent, reverted exactly."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from spectransfer.config import Grid
from spectransfer.data.labels import apply_verdicts, decide, read_verdict_file, revert_verdicts
from spectransfer.data.store import open_store, write_store
from spectransfer.errors import StoreError
from spectransfer.provenance import sha256_file

GRID = Grid(n_bins=64)
N = 40


def _store(path: Path) -> Path:
    rng = np.random.default_rng(1)
    label = (np.arange(N) % 4 == 0).astype(np.int8)
    meta = pd.DataFrame(
        {
            "spectrum_id": [f"s{i:03d}" for i in range(N)],
            "survey": "sdss",
            "ra": rng.uniform(0, 360, N),
            "dec": rng.uniform(-10, 60, N),
            "label": label,
            "label_source": np.where(label == 1, "id", "none"),
            "split": np.array(["train", "val", "test"])[np.arange(N) % 3],
            "object_id": [f"o{i}" for i in range(N)],
        }
    )
    flux = rng.normal(size=(N, GRID.n_bins)).astype(np.float32)
    write_store(path, flux, np.ones_like(flux), meta, grid=GRID, chunk_rows=16)
    return path


# s000 is a catalogue quasar (i % 4 == 0), s001..s003 are not.
VERDICTS = [
    ("s001", "qso", "ann", "2026-01-01T00:00:01"),  # promoted to quasar
    ("s000", "not_qso", "ann", "2026-01-01T00:00:02"),  # demoted
    ("s002", "unsure", "ann", "2026-01-01T00:00:03"),  # ignored
    ("s003", "qso", "ann", "2026-01-01T00:00:04"),  # tie: ann qso, bob not_qso -> unchanged
    ("s003", "not_qso", "bob", "2026-01-01T00:00:05"),
    ("s005", "qso", "ann", "2026-01-01T00:00:06"),  # majority 2:1 qso
    ("s005", "qso", "bob", "2026-01-01T00:00:07"),
    ("s005", "not_qso", "cid", "2026-01-01T00:00:08"),
    ("s006", "not_qso", "ann", "2026-01-01T00:00:09"),  # ann changed her mind: latest (qso) counts
    ("s006", "qso", "ann", "2026-01-01T00:00:10"),
    ("s007", "not_qso", "ann", "2026-01-01T00:00:11"),  # agrees with the catalogue: source becomes 'verdict'
    ("nope", "qso", "ann", "2026-01-01T00:00:12"),  # not in the store
]


def _csv(path: Path, rows=VERDICTS) -> Path:
    pd.DataFrame(rows, columns=["SPECTRUM_ID", "VERDICT", "INSPECTOR", "CREATED_AT"]).to_csv(path, index=False)
    return path


def _sqlite(path: Path, rows=VERDICTS) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE verdicts (spectrum_id TEXT, verdict TEXT, z REAL, inspector TEXT, created_at TEXT)")
    # the real database keeps one row per (spectrum, inspector): the latest
    last = pd.DataFrame(rows, columns=["s", "v", "i", "t"]).drop_duplicates(["s", "i"], keep="last")
    con.executemany("INSERT INTO verdicts VALUES (?, ?, NULL, ?, ?)", last[["s", "v", "i", "t"]].values.tolist())
    con.commit()
    con.close()
    return path


def test_decide_majority_ties_and_unsure() -> None:
    v = pd.DataFrame(VERDICTS, columns=["spectrum_id", "verdict", "inspector", "created_at"])
    d = decide(v)["decision"].to_dict()
    assert d == {"nope": 1, "s000": 0, "s001": 1, "s002": -1, "s003": -1, "s007": 0, "s005": 1, "s006": 1}


@pytest.mark.parametrize("fmt", ["csv", "sqlite", "fits", "parquet"])
def test_verdicts_applied_beside_catalogue_and_reverted_exactly(tmp_path: Path, fmt: str) -> None:
    store = _store(tmp_path / "store")
    before_meta = open_store(store).meta.copy()
    before_raw = pq.read_table(store / "meta.parquet")
    if fmt == "sqlite":
        vfile = _sqlite(tmp_path / "v.sqlite")
    else:
        from astropy.table import Table

        t = Table.from_pandas(pd.DataFrame(VERDICTS, columns=["SPECTRUM_ID", "VERDICT", "INSPECTOR", "CREATED_AT"]))
        vfile = _csv(tmp_path / "v.csv") if fmt == "csv" else tmp_path / f"v.{fmt}"
        if fmt != "csv":
            t.write(vfile, format=fmt)
    res = apply_verdicts(store, vfile)
    assert (res.n_labelled, res.n_changed, res.n_promoted, res.n_demoted) == (5, 4, 3, 1)
    assert (res.n_ties, res.n_unsure_only, res.n_unknown_ids) == (1, 1, 1)

    raw = pq.read_table(store / "meta.parquet").to_pandas().set_index("spectrum_id")
    assert (
        raw.loc["s001", "label"] == 1 and raw.loc["s001", "label_source"] == "verdict" and raw.loc["s001", "catalog_label"] == 0
    )
    assert (
        raw.loc["s000", "label"] == 0
        and raw.loc["s000", "catalog_label"] == 1
        and raw.loc["s000", "catalog_label_source"] == "id"
    )
    for sid in ("s002", "s003"):  # unsure and a tie change nothing
        assert raw.loc[sid, "label"] == raw.loc[sid, "catalog_label"] and raw.loc[sid, "label_source"] == "none"
    assert raw.loc["s007", "label_source"] == "verdict" and raw.loc["s007", "label"] == 0
    # every other spectrum keeps its catalogue label
    untouched = ~raw.index.isin(["s000", "s001", "s007", "s005", "s006"])
    assert (raw["label"][untouched] == raw["catalog_label"][untouched]).all()
    # training reads `label`: the store's meta (what dataset.select uses) carries the verdicts
    from spectransfer.ml.dataset import select

    st = open_store(store)
    sel = select(st, None, None)
    by_row = dict(zip(st.meta["row"], st.meta["spectrum_id"]))
    got = {by_row[r]: int(y) for r, y in zip(sel.rows, sel.labels)}
    assert got["s001"] == 1 and got["s000"] == 0 and got["s005"] == 1
    rec = st.info["verdict_labels"]
    assert rec["sha256"] == sha256_file(vfile) and rec["verdict_file"].endswith(vfile.name) and rec["applied_at"]

    back = revert_verdicts(store)
    assert back.action == "reverted" and back.n_changed == 4
    pd.testing.assert_frame_equal(open_store(store).meta, before_meta)
    assert pq.read_table(store / "meta.parquet").equals(before_raw)
    assert "verdict_labels" not in open_store(store).info
    assert revert_verdicts(store).action == "nothing-to-revert"


def test_applying_twice_is_applying_once(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    vfile = _csv(tmp_path / "v.csv")
    apply_verdicts(store, vfile)
    once = (store / "meta.parquet").read_bytes()
    info_once = json.loads((store / "store.json").read_text())
    again = apply_verdicts(store, vfile)
    assert again.action == "unchanged" and again.n_labelled == 5
    assert (store / "meta.parquet").read_bytes() == once
    assert json.loads((store / "store.json").read_text()) == info_once
    # a second, different file replaces the first, starting from the catalogue labels
    other = _csv(tmp_path / "w.csv", [("s002", "qso", "ann", "2026-01-02T00:00:00")])
    res = apply_verdicts(store, other)
    raw = pq.read_table(store / "meta.parquet").to_pandas().set_index("spectrum_id")
    assert res.n_labelled == 1 and raw.loc["s002", "label"] == 1 and raw.loc["s001", "label"] == 0
    assert (raw["label_source"] == "verdict").sum() == 1


def test_bad_verdict_file_is_one_error_and_leaves_the_store(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    before = (store / "meta.parquet").read_bytes()
    bad = _csv(tmp_path / "bad.csv", [("s001", "maybe", "ann", "t")])
    with pytest.raises(StoreError, match="bad.csv.*not qso"):
        apply_verdicts(store, bad)
    with pytest.raises(StoreError, match="not found"):
        read_verdict_file(tmp_path / "missing.csv")
    assert (store / "meta.parquet").read_bytes() == before


def test_label_cli_applies_and_reverts(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    vfile = _sqlite(tmp_path / "v.sqlite")
    env_cmd = [sys.executable, "-m", "spectransfer", "label", str(store)]
    r = subprocess.run([*env_cmd, "--verdicts", str(vfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "5 labels from" in r.stdout and "1 ties" in r.stdout
    r = subprocess.run([*env_cmd, "--revert"], capture_output=True, text=True)
    assert r.returncode == 0 and "restored (4 labels" in r.stdout
    r = subprocess.run([*env_cmd, "--verdicts", str(tmp_path / "none.csv")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "none.csv" in r.stderr


@pytest.mark.parametrize("ending", ["fits", "csv", "parquet", "vot"])
def test_verdicts_exported_by_the_inspection_tool_are_read(tmp_path: Path, ending: str) -> None:
    from spectransfer.inspect.verdicts import VerdictDB, export_table

    db = VerdictDB(tmp_path / "v.sqlite")
    db.record("s001", "qso", "zoë", z=2.1)
    db.record("s000", "not_qso", "ann")
    db.record("s002", "unsure", "ann")
    export_table(tmp_path / "v.sqlite", tmp_path / f"v.{ending}")
    got = read_verdict_file(tmp_path / f"v.{ending}").sort_values("spectrum_id")
    assert got["spectrum_id"].tolist() == ["s000", "s001", "s002"] and got["verdict"].tolist() == ["not_qso", "qso", "unsure"]
    store = _store(tmp_path / "store")
    res = apply_verdicts(store, tmp_path / f"v.{ending}")
    assert (res.n_labelled, res.n_promoted, res.n_demoted, res.n_unsure_only) == (2, 1, 1, 1)
