"""The store folder: layout, dtypes, chunking, round trip and the Python API other modules use."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

from spectransfer.config import DEFAULT_GRID
from spectransfer.data.store import create_store, meta_columns, open_store, store_stats, write_store
from spectransfer.errors import StoreError


def _arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    flux = rng.uniform(-1, 1, (n, DEFAULT_GRID.n_bins)).astype(np.float32)
    ivar = rng.uniform(0, 5, (n, DEFAULT_GRID.n_bins)).astype(np.float32)
    meta = pd.DataFrame(
        {
            "spectrum_id": [f"sdss-{i:04d}-55000-0001" for i in range(n)],
            "survey": ["sdss" if i % 3 else "lamost" for i in range(n)],
            "ra": rng.uniform(0, 360, n),
            "dec": rng.uniform(-10, 60, n),
            "pipeline_class": ["QSO" if i % 4 == 0 else "STAR" for i in range(n)],
            "label": [1 if i % 4 == 0 else 0 for i in range(n)],
            "label_source": ["id" if i % 4 == 0 else "none" for i in range(n)],
        }
    )
    return flux, ivar, meta


def test_write_store_round_trip(tmp_path) -> None:
    flux, ivar, meta = _arrays(700)
    store = write_store(tmp_path / "s", flux, ivar, meta, chunk_rows=256)
    again = open_store(tmp_path / "s")
    np.testing.assert_array_equal(again.flux[:], flux)
    np.testing.assert_array_equal(again.ivar[:], ivar)
    assert again.flux.dtype == np.float32 and again.flux.chunks == (256, 2048)
    assert again.grid == DEFAULT_GRID
    m = again.meta
    assert list(m.columns) == meta_columns()
    assert m["row"].tolist() == list(range(700))
    assert m["spectrum_id"].is_unique
    assert set(m["split"]) <= {"train", "val", "test"}
    # rows(): filters by survey and split, sorted.
    rows = again.rows(survey="lamost", split="train")
    expect = m[(m.survey == "lamost") & (m.split == "train")]["row"].to_numpy()
    np.testing.assert_array_equal(rows, np.sort(expect))
    assert store.info["store_id"] == again.info["store_id"]


def test_layout_matches_the_contract(tmp_path) -> None:
    flux, ivar, meta = _arrays(10)
    write_store(tmp_path / "s", flux, ivar, meta)
    info = json.loads((tmp_path / "s" / "store.json").read_text())
    assert info["format"] == "spectransfer-store" and info["format_version"] == 1
    assert {"store_id", "grid", "created", "versions"} <= set(info)
    group = zarr.open_group(str(tmp_path / "s" / "spectra.zarr"), mode="r")
    assert group.metadata.zarr_format == 3
    assert group["flux"].shape == (10, 2048) and group["ivar"].dtype == np.float32
    assert len(group["flux"].compressors) == 1  # compressed
    schema = pq.read_schema(tmp_path / "s" / "meta.parquet")
    assert str(schema.field("row").type) == "int64"
    assert str(schema.field("label").type) == "int8"
    assert str(schema.field("ra").type) == "double" and str(schema.field("snr").type) == "float"
    assert pq.read_table(tmp_path / "s" / "rejected.parquet").column_names[:2] == ["source_file", "reason"]


def test_open_store_refuses_what_is_not_a_store(tmp_path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(StoreError, match="no store.json"):
        open_store(tmp_path / "x")
    (tmp_path / "x" / "store.json").write_text('{"format": "other"}')
    with pytest.raises(StoreError, match="format"):
        open_store(tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "keep.txt").write_text("data")
    with pytest.raises(StoreError, match="not an empty store"):
        create_store(tmp_path / "y")


def test_write_store_checks_shapes(tmp_path) -> None:
    flux, ivar, meta = _arrays(5)
    with pytest.raises(StoreError, match="meta has 4 rows"):
        write_store(tmp_path / "a", flux, ivar, meta.iloc[:4])
    with pytest.raises(StoreError, match="2048"):
        write_store(tmp_path / "b", flux[:, :100], ivar[:, :100], meta)


def test_stats_counts(tmp_path) -> None:
    flux, ivar, meta = _arrays(40)
    store = write_store(tmp_path / "s", flux, ivar, meta)
    st = store_stats(store)
    assert st["n_live"] == 40 and st["n_dead_rows"] == 0
    assert st["survey"] == meta["survey"].value_counts().to_dict()
    assert st["pipeline_class"] == {"QSO": 10, "STAR": 30}
    assert st["label_source"] == {"id": 10, "none": 30}
    assert sum(v["spectra"] for v in st["split"].values()) == 40
    assert sum(v["quasars"] for v in st["split"].values()) == 10
