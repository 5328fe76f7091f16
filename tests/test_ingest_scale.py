"""Ingest at survey scale: the folder walk and the plan hold a batch, not the survey; metadata
written block by block reads back as one table; the column split agrees with assign_splits; a
moved survey folder is found unchanged."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import spectransfer.data.ingest as ingest_mod
import spectransfer.data.split_columns as split_columns_mod
from spectransfer.cli import app
from spectransfer.data.ingest import IngestSummary, _Planner, _walk, ingest
from spectransfer.data.ledger import Keys, Ledger, ledger_path
from spectransfer.data.split_columns import assign_split_columns
from spectransfer.data.splits import SPLITS, SplitConfig, assign_splits
from spectransfer.data.store import create_store, open_store
from spectransfer.errors import StoreError
from spectransfer.surveys import iter_walk

N_ENTRIES = 100_000
N_FOLDERS = 200


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100,000 empty *.fits files in 200 folders of 500 (the shape of a survey's plate folders)."""
    root = tmp_path_factory.mktemp("tree")
    per = N_ENTRIES // N_FOLDERS
    for d in range(N_FOLDERS):
        folder = root / f"{d:04d}"
        folder.mkdir()
        for i in range(per):
            os.close(os.open(folder / f"spec-{d:04d}-{i:05d}.fits", os.O_CREAT | os.O_WRONLY, 0o644))
    return root


def _peak_bytes(consume) -> tuple[int, int]:
    """(items consumed, tracemalloc peak in bytes above the start) of ``consume()``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    n = consume()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return n, peak


def _all_paths_bytes(root: Path) -> int:
    """What holding every path at once costs (the reference the walk must stay far below)."""
    paths = [str(p) for p in root.rglob("*.fits")]
    return sum(sys.getsizeof(p) for p in paths) + sys.getsizeof(paths)


def test_walk_of_100k_files_holds_one_folder(big_tree: Path) -> None:
    order: list[str] = []

    def consume() -> int:
        n = 0
        for path, reason in iter_walk([big_tree]):
            assert reason is None
            if n % 9973 == 0:
                order.append(path)
            n += 1
        return n

    n, peak = _peak_bytes(consume)
    assert n == N_ENTRIES
    assert order == sorted(order)  # path order, as the old sorted list gave
    reference = _all_paths_bytes(big_tree)
    assert reference > 10_000_000
    assert peak < reference / 20, f"walk peak {peak} B vs {reference} B for all paths"


def _plan_peak(tree: Path, folders: int, store_path: Path) -> tuple[int, int, _Planner]:
    """(files planned, tracemalloc peak) of the driver's planning over the first ``folders`` folders:
    walk, ledger look-ups, batches into the on-disk plan, arrays grown."""
    store = create_store(store_path, chunk_rows=128)
    summary = IngestSummary(store=str(store.path))
    with Ledger(ledger_path(store.path)) as ledger:
        planner = _Planner(store, ledger, Keys(str(tree)), 128, 1, summary)
        inputs = [str(tree / f"{d:04d}") for d in range(folders)]
        n, peak = _peak_bytes(lambda: sum(len(b["files"]) for b in planner.batches(_walk(inputs), set())))
        assert ledger.n_pending() == -(-n // 128) and summary.files_seen == n
        first = next(ledger.pending())
        assert first["files"][0][3] == "0000/spec-0000-00000.fits"  # keyed relative to the data root
    assert open_store(store.path).n_rows == planner.next_row >= n
    return n, peak, planner


def test_planning_holds_one_batch_whatever_the_survey_size(big_tree: Path, tmp_path: Path) -> None:
    """Planning 10x more files (1,000 -> 10,000) costs no more memory: a batch and a folder, not the plan."""
    n_small, peak_small, _ = _plan_peak(big_tree, 2, tmp_path / "small")
    n_large, peak_large, _ = _plan_peak(big_tree, 20, tmp_path / "large")
    assert (n_small, n_large) == (1_000, 10_000)
    per_file = 1000  # bytes a planned file's path, key and stamp take in a Python list
    assert peak_large - peak_small < (n_large - n_small) * per_file / 20, (peak_small, peak_large)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spectransfer.simulate import simulate_survey

    out = tmp_path_factory.mktemp("sim") / "survey"
    simulate_survey("sdss", 40, out, seed=4, workers=1)
    return out


def _catalog(survey: Path) -> str:
    return str(next(survey.glob("*quasar_catalog.fits")))


def test_metadata_written_in_small_blocks_reads_back_as_one_table(
    survey: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ingests appending batches of 8, metadata folded 5 rows at a time, give the same table as
    one block: same rows, labels, objects and splits; iter_meta, live_rows and live_surveys agree with it."""
    files = sorted((survey / "spectra").rglob("*.fits"))
    first, second = tmp_path / "in" / "a", tmp_path / "in" / "b"
    for dest, part in ((first, files[:25]), (second, files[25:])):
        dest.mkdir(parents=True)
        for f in part:
            shutil.copy2(f, dest / f.name)
    ref = tmp_path / "ref"
    ingest([first, second], ref, catalogs=[_catalog(survey)], workers=0, quiet=True, batch_size=8)

    monkeypatch.setattr(ingest_mod, "META_ROW_GROUP", 5)
    small = tmp_path / "small"
    ingest([first], small, catalogs=[_catalog(survey)], workers=0, quiet=True, batch_size=8)
    ingest([second], small, workers=0, quiet=True, batch_size=8)

    assert pq.ParquetFile(small / "meta.parquet").metadata.num_row_groups > 2
    a, b = open_store(ref), open_store(small)
    ma, mb = a.meta.set_index("spectrum_id").sort_index(), b.meta.set_index("spectrum_id").sort_index()
    cols = ["survey", "ra", "dec", "z", "label", "label_source", "catalog_name", "object_id", "split", "content_hash"]
    pd.testing.assert_frame_equal(ma[cols], mb[cols])
    assert (ma["label"] == 1).any() and set(ma["split"]) == {"train", "val", "test"}
    assert a.info["labels"]["counts"] == b.info["labels"]["counts"]
    blocks = list(b.iter_meta(batch_size=7))
    pd.testing.assert_frame_equal(pd.concat(blocks, ignore_index=True), b.meta)
    np.testing.assert_array_equal(b.live_rows(), b.meta["row"].to_numpy())
    fresh = open_store(small)  # read from disk, one or two columns only
    np.testing.assert_array_equal(fresh.live_rows(), b.meta["row"].to_numpy())
    assert list(fresh.live_surveys()) == list(b.meta["survey"]) == list(b.live_surveys())
    assert list(b.meta["row"]) == sorted(b.meta["row"])
    assert len(b.meta) + len(b.rejected) == len(files)


def test_moved_survey_folder_is_found_unchanged(survey: Path, tmp_path: Path) -> None:
    here = tmp_path / "disk1" / "survey"
    shutil.copytree(survey / "spectra", here)
    store = tmp_path / "S"
    first = ingest([here], store, catalogs=[_catalog(survey)], workers=0, quiet=True)
    info = json.loads((store / "store.json").read_text())
    assert info["data_root"] == str(here.resolve())
    raw = pq.read_table(store / "meta.parquet", columns=["source_file"]).column(0).to_pylist()
    assert all(not p.startswith("/") for p in raw)  # recorded relative to the data root
    before = open_store(store).meta.set_index("spectrum_id")

    # Moved: the old root is gone, the same folder is ingested at its new place.
    there = tmp_path / "disk2" / "survey"
    there.parent.mkdir()
    os.rename(here, there)
    again = ingest([there], store, workers=0, quiet=True)
    assert again.files_processed == 0 and again.skipped_unchanged == first.files_seen
    after = open_store(store).meta.set_index("spectrum_id")
    pd.testing.assert_index_equal(after.index, before.index)
    assert (after["row"] == before["row"]).all() and (after["split"] == before["split"]).all()
    assert all(p.startswith(str(there.resolve()) + "/") and os.path.exists(p) for p in after["source_file"])

    # Moved again, named by --data-root (here one folder holds it under another name).
    third = tmp_path / "disk3" / "renamed"
    third.parent.mkdir()
    os.rename(there, third)
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(third), "--store", str(store), "--data-root", str(third), "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["files_processed"] == 0 and out["skipped_unchanged"] == first.files_seen

    # A wrong root, or none: a one-line StoreError (the CLI's exit 2), the store untouched.
    (tmp_path / "empty").mkdir()
    for root, why in ((tmp_path / "empty", "holds none of the store's source files"), (tmp_path / "nowhere", "no such folder")):
        res = runner.invoke(app, ["ingest", str(third), "--store", str(store), "--data-root", str(root), "--workers", "0"])
        assert isinstance(res.exception, StoreError), res.output
        assert why in str(res.exception) and str(root) in str(res.exception) and "\n" not in str(res.exception)
    assert json.loads((store / "store.json").read_text())["data_root"] == str(third.resolve())


def test_store_with_absolute_paths_still_opens_and_resumes(survey: Path, tmp_path: Path) -> None:
    """A store written before data roots (absolute source_file, no ledger) opens as before, and the
    next ingest rebuilds its ledger from its tables, finds every file unchanged, and makes it relocatable."""
    here = tmp_path / "data" / "survey"
    shutil.copytree(survey / "spectra", here)
    store = tmp_path / "S"
    first = ingest([here], store, workers=0, quiet=True)
    # Turn it into the older layout: absolute paths, no data root, no ledger.
    info = json.loads((store / "store.json").read_text())
    root = info.pop("data_root")
    (store / "store.json").write_text(json.dumps(info))
    ledger_path(store).unlink()
    for name in ("meta.parquet", "rejected.parquet"):
        t = pq.read_table(store / name)
        col = [None if p is None else f"{root}/{p}" for p in t.column("source_file").to_pylist()]
        pq.write_table(t.set_column(t.schema.get_field_index("source_file"), "source_file", [col]), store / name)
    old = open_store(store)
    assert old.data_root is None and all(p.startswith(root + "/") for p in old.meta["source_file"])

    again = ingest([here], store, workers=0, quiet=True)
    assert again.files_processed == 0 and again.skipped_unchanged == first.files_seen
    assert json.loads((store / "store.json").read_text())["data_root"] == root
    raw = pq.read_table(store / "meta.parquet", columns=["source_file"]).column(0).to_pylist()
    assert all(not p.startswith("/") for p in raw)
    pd.testing.assert_frame_equal(
        open_store(store).meta.drop(columns="file_stamp"), old.meta.drop(columns="file_stamp"), check_dtype=False
    )


def _split_input(n: int, seed: int) -> pd.DataFrame:
    """Spectra with repeats (within 0.4 arcsec of an earlier one), missing positions, prior object
    ids (of a second ingest) and two surveys: what ingest splits."""
    rng = np.random.default_rng(seed)
    ra, dec = rng.uniform(10, 12, n), rng.uniform(0, 2, n)
    rep, j = rng.random(n) < 0.2, rng.integers(0, n, n)
    ra = np.where(rep, ra[j] + rng.normal(0, 1e-4, n), ra)
    dec = np.where(rep, dec[j] + rng.normal(0, 1e-4, n), dec)
    ra[rng.random(n) < 0.01] = np.nan
    survey = np.where(dec < 1.4, "sdss", "lamost").astype(object)
    k = rng.integers(0, max(n // 3, 1), n)
    prior = [f"obj-p{k[i]:05d}-{survey[i]}" if rng.random() < 0.3 else None for i in range(n)]
    ids = [f"s-{seed}-{i:06d}" for i in rng.permutation(n)]
    return pd.DataFrame({"spectrum_id": ids, "survey": survey, "ra": ra, "dec": dec, "object_id": prior})


@pytest.mark.parametrize(
    ("n", "cfg"),
    [
        (3000, SplitConfig()),
        (5000, SplitConfig(size_threshold=1000, val_size=300, test_size=500, seed=3)),  # the paper's absolute sizes
        (40, SplitConfig(seed=7)),
        (2, SplitConfig()),
    ],
)
def test_column_split_is_assign_splits(n: int, cfg: SplitConfig) -> None:
    """The arrow/numpy split ingest uses gives assign_splits' object ids, splits and report."""
    meta = _split_input(n, n)
    ref, ref_report = assign_splits(meta, cfg)
    object_id, split, report = assign_split_columns(pa.Table.from_pandas(meta, preserve_index=False), cfg)
    assert object_id.to_pylist() == ref["object_id"].tolist()
    assert [SPLITS[s] for s in split] == ref["split"].tolist()
    assert report == ref_report
    assert ref_report["leakage"]["repeat_objects"] > 0 or n < 10


def test_column_split_streamed_from_parquet_in_small_blocks_is_assign_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from a parquet file of 97-row groups in 50-row blocks, its per-row arrays worked on
    333 rows at a time, the split still gives assign_splits' object ids, splits and report (both
    split modes)."""
    monkeypatch.setattr(split_columns_mod, "CHUNK", 333)
    meta = _split_input(3000, 11)
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.Table.from_pandas(meta, preserve_index=False), path, row_group_size=97)
    for cfg in (SplitConfig(seed=2), SplitConfig(size_threshold=1000, val_size=200, test_size=300, seed=5)):
        ref, ref_report = assign_splits(meta, cfg)
        source = split_columns_mod.parquet_column_blocks(path, block=50)
        ids, split, report = split_columns_mod.split_columns(source, len(meta), cfg)
        got = pa.concat_arrays(list(ids.iter_blocks(source))).to_pylist()
        assert got == ref["object_id"].tolist()
        assert [SPLITS[s] for s in split] == ref["split"].tolist()
        assert report == ref_report
        assert ref_report["leakage"]["repeat_objects"] > 0


def test_summary_counts_read_a_row_group_at_a_time_match_the_tables(
    survey: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary's rows per split and rejections per kind, counted a row group at a time (groups
    of 5 rows here), are the tables' own value counts."""
    monkeypatch.setattr(ingest_mod, "META_ROW_GROUP", 5)
    summary = ingest([survey / "spectra"], tmp_path / "S", catalogs=[_catalog(survey)], workers=0, quiet=True)
    store = open_store(tmp_path / "S")
    assert pq.ParquetFile(tmp_path / "S" / "meta.parquet").metadata.num_row_groups > 2
    assert summary.splits == store.meta["split"].value_counts().to_dict()
    assert summary.rejected_by_kind == store.rejected["reason_kind"].value_counts().to_dict()
    assert sum(summary.splits.values()) == len(store.meta) and summary.rejected_by_kind
