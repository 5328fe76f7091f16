"""Survey scale: the candidate catalogue written block by block equals the one written whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectransfer.candidates.schema import COLUMNS, DISCOVER_COLUMNS, EXTNAME, write_blocks, write_table


def _table(n: int, seed: int = 0) -> pd.DataFrame:
    """Every discover column, with missing values of each kind and multi-byte text."""
    rng = np.random.default_rng(seed)
    out: dict[str, object] = {}
    for name in DISCOVER_COLUMNS:
        dt = COLUMNS[name].dtype
        if dt == "str":
            words = np.array(["QSO", "STAR", "galaxy", "", "Ångström-ß", "x" * 40], dtype=object)
            out[name] = pd.array(np.where(rng.random(n) < 0.1, None, rng.choice(words, n)), dtype="string")
        elif dt == "bool":
            out[name] = rng.random(n) < 0.3
        elif dt.startswith("i"):
            out[name] = pd.array(np.where(rng.random(n) < 0.1, None, rng.integers(0, 30000, n)), dtype="Int64")
        else:
            v = rng.normal(0, 100, n).astype(dt)
            v[rng.random(n) < 0.1] = np.nan
            out[name] = v
    return pd.DataFrame(out)


CARDS = [("THRESH", 0.5, "P_QSO threshold"), ("MODELSHA", "f" * 64, ""), ("GRIDLOG", True, "log bins"), ("NSPEC", 1003, "rows")]


def _reference_fits(table: pd.DataFrame, path: Path) -> None:
    """The table written whole by astropy (what the catalogue was before it was streamed)."""
    from astropy.io import fits

    columns = []
    for name in table.columns:
        col = COLUMNS[name]
        if col.dtype == "str":
            arr = table[name].astype("string").fillna("").astype(str).str.encode("utf-8").to_numpy().astype(bytes)
            fmt = f"{max(1, arr.dtype.itemsize)}A"
        elif col.dtype == "bool":
            arr, fmt = table[name].to_numpy(bool), "L"
        elif col.dtype.startswith("i"):
            fill = 0 if name == "CAT_LABEL" else -1
            arr, fmt = table[name].fillna(fill).to_numpy(col.dtype), {"i2": "I", "i4": "J", "i8": "K"}[col.dtype]
        else:
            arr, fmt = table[name].to_numpy(col.dtype), {"f4": "E", "f8": "D"}[col.dtype]
        columns.append(fits.Column(name=name, format=fmt, array=arr, unit=col.unit, null=-1 if fmt == "K" else None))
    hdu = fits.BinTableHDU.from_columns(columns, name=EXTNAME)
    for i, name in enumerate(table.columns, start=1):
        hdu.header.set(f"TCOMM{i}", COLUMNS[name].description[:68], after=f"TFORM{i}")
    for key, value, comment in CARDS:
        hdu.header[key] = (value, comment)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, checksum=True)


@pytest.mark.parametrize("block", [1, 37, 1003])
def test_streamed_fits_equals_the_table_written_whole(tmp_path: Path, block: int) -> None:
    from astropy.io import fits
    from astropy.table import Table

    table = _table(1003)
    out, ref = tmp_path / "cand.fits", tmp_path / "ref.fits"
    write_blocks(lambda: (table.iloc[a : a + block] for a in range(0, len(table), block)), CARDS, out)
    _reference_fits(table, ref)
    got, want = Table.read(out, hdu=EXTNAME), Table.read(ref, hdu=EXTNAME)
    assert got.colnames == want.colnames == list(DISCOVER_COLUMNS) and len(got) == len(want) == 1003
    for name in got.colnames:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert got[name].unit == want[name].unit, name
    with fits.open(out, checksum=True) as g, fits.open(ref) as w:
        assert g[1].verify_checksum() == 1 and g[1].verify_datasum() == 1 and g[0].verify_checksum() == 1
        hg, hw = g[EXTNAME].header, w[EXTNAME].header
        skip = {"CHECKSUM", "DATASUM"}
        assert sorted(k for k in hg if k not in skip) == sorted(k for k in hw if k not in skip)
        keys = list(hg)  # each column's description sits beside it (astropy moves them to the end)
        assert all(keys[keys.index(f"TFORM{i}") + 1] == f"TCOMM{i}" for i in range(1, len(got.colnames) + 1))
        for key in hw:
            if key not in skip:
                assert hg[key] == hw[key], key
                assert hg.comments[key] == hw.comments[key], key
        assert hg["DATASUM"] == hw["DATASUM"]  # same bytes in the data unit
        assert g[EXTNAME].data.tobytes() == w[EXTNAME].data.tobytes()


def test_streamed_fits_reads_in_fitsio(tmp_path: Path) -> None:
    fitsio = pytest.importorskip("fitsio")
    table = _table(500, seed=1).replace("Ångström-ß", "angstrom")  # fitsio decodes text as ASCII
    out = tmp_path / "cand.fits"
    write_blocks(lambda: (table.iloc[a : a + 64] for a in range(0, len(table), 64)), CARDS, out)
    f = fitsio.read(str(out), ext=EXTNAME)
    np.testing.assert_array_equal(f["P_QSO"], table["P_QSO"].to_numpy())
    np.testing.assert_array_equal(f["PIPE_NOT_QSO"], table["PIPE_NOT_QSO"].to_numpy())
    want = table["SPECTRUM_ID"].astype("string").fillna("").tolist()
    assert [s.decode() if isinstance(s, bytes) else s for s in f["SPECTRUM_ID"]] == [w.rstrip() for w in want]


def test_streamed_parquet_equals_the_table_written_in_one_block(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    table = _table(1003, seed=2)
    one, many = tmp_path / "one.parquet", tmp_path / "many.parquet"
    write_table(table, CARDS, one)
    write_blocks(lambda: (table.iloc[a : a + 100] for a in range(0, len(table), 100)), CARDS, many)
    assert pq.ParquetFile(many).num_row_groups == 11
    a, b = pq.read_table(one), pq.read_table(many)
    assert a.schema.equals(b.schema, check_metadata=False) and a.equals(b)
    ma, mb = a.schema.metadata, b.schema.metadata
    assert ma[b"spectransfer"] == mb[b"spectransfer"] and ma[b"table::len::SPECTRUM_ID"] == mb[b"table::len::SPECTRUM_ID"]
    df = pd.read_parquet(many)
    assert df["SPECTRUM_ID"].tolist() == table["SPECTRUM_ID"].astype("string").fillna("").tolist()  # '' = missing
    pd.testing.assert_series_equal(df["PLATE"], table["PLATE"], check_names=False)  # integer nulls stay null
    np.testing.assert_array_equal(df["RA"].to_numpy(), table["RA"].to_numpy())


def test_blocks_must_agree_on_columns(tmp_path: Path) -> None:
    table = _table(20)
    with pytest.raises(ValueError, match="different columns"):
        write_blocks(lambda: iter([table, table.drop(columns=["RA"])]), CARDS, tmp_path / "x.fits")
    assert not (tmp_path / "x.fits").exists()


# ---- discover reads the store's metadata block by block ------------------------------------------


def test_discover_streams_the_metadata_and_matches_the_in_memory_path(tmp_path: Path) -> None:
    """meta.parquet in row order (as ingest writes it) is read a block at a time; shuffled, it is read whole.
    Both give the same catalogue, row for row."""
    import pyarrow.parquet as pq
    from astropy.table import Table

    from spectransfer.candidates.discover import discover
    from test_discover import _run, _store

    _store(tmp_path / "store", n=250, chunk_rows=32)
    run = _run(tmp_path / "run")
    meta_path = tmp_path / "store" / "meta.parquet"
    meta = pq.read_table(meta_path)
    rows = meta.column("row").to_numpy()
    pq.write_table(meta.take(np.argsort(rows)), meta_path, row_group_size=40)  # in row order, several row groups
    streamed = discover(run, tmp_path / "store", tmp_path / "a.fits", engine="torch", block_size=30, quiet=True)
    pq.write_table(meta.take(np.random.default_rng(0).permutation(len(rows))), meta_path)  # shuffled: the fallback
    whole = discover(run, tmp_path / "store", tmp_path / "b.fits", engine="torch", block_size=30, quiet=True)
    a, b = Table.read(tmp_path / "a.fits"), Table.read(tmp_path / "b.fits")
    assert len(a) == 250 and np.all(np.diff(np.asarray(a["ROW"])) > 0)
    for name in a.colnames:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    assert streamed.counts == whole.counts and streamed.n_pipe_not_qso == whole.n_pipe_not_qso
    assert streamed.pipe_not_qso_by_class == whole.pipe_not_qso_by_class
    assert pd.read_parquet(tmp_path / "a.parquet").equals(pd.read_parquet(tmp_path / "b.parquet"))


def test_discover_of_one_survey_streams_only_its_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from astropy.table import Table

    from spectransfer.candidates.discover import discover
    from test_discover import _run, _store

    _store(tmp_path / "store", n=120, chunk_rows=32)
    run = _run(tmp_path / "run")
    meta_path = tmp_path / "store" / "meta.parquet"
    meta = pq.read_table(meta_path)
    meta = meta.take(np.argsort(meta.column("row").to_numpy()))
    survey = np.where(meta.column("row").to_numpy() % 3 == 0, "lamost", "sdss")
    meta = meta.set_column(meta.schema.get_field_index("survey"), "survey", pa.array(survey))
    pq.write_table(meta, meta_path, row_group_size=25)
    res = discover(run, tmp_path / "store", tmp_path / "l.fits", survey="lamost", engine="torch", block_size=7, quiet=True)
    t = Table.read(tmp_path / "l.fits")
    want = meta.filter(pa.array(survey == "lamost"))
    assert res.n_spectra == len(t) == 40
    assert np.asarray(t["ROW"]).tolist() == want.column("row").to_pylist()
    assert set(np.asarray(t["SURVEY"]).astype(str)) == {"lamost"}
    assert np.asarray(t["SPECTRUM_ID"]).astype(str).tolist() == want.column("spectrum_id").to_pylist()


@pytest.mark.parametrize("fmt", ["fits", "parquet"])
def test_writing_in_blocks_holds_one_block_not_the_table(tmp_path: Path, fmt: str) -> None:
    """Peak traced memory of writing 4 blocks and 40 blocks (10x the rows) is about the same."""
    import tracemalloc

    block = _table(1000, seed=3)

    def peak(n_blocks: int) -> int:
        tracemalloc.start()
        try:
            write_blocks(lambda: (block for _ in range(n_blocks)), CARDS, tmp_path / f"t{n_blocks}.{fmt}")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(4), peak(40)
    assert large < 1.5 * small, (small, large)
    assert (tmp_path / f"t40.{fmt}").stat().st_size > 5 * (tmp_path / f"t4.{fmt}").stat().st_size


# ---- survey-sized discover: nothing per spectrum beyond its own columns ----------------------------


def test_int8_calibration_rows_read_the_row_column_only(tmp_path: Path) -> None:
    """The rows that set the int8 ranges are spread over the sorted live rows, whatever
    meta.parquet's order, and choosing them leaves the metadata table unread (it would stay
    cached for the whole discover run: ~1.6 KB a spectrum)."""
    import pyarrow.parquet as pq

    from spectransfer.data.store import open_store
    from spectransfer.ml.score import int8_calibration_rows
    from test_discover import _store

    _store(tmp_path / "store", n=700, chunk_rows=32)
    meta_path = tmp_path / "store" / "meta.parquet"
    meta = pq.read_table(meta_path)
    keep = np.random.default_rng(1).permutation(len(meta))[:650]  # 50 dead rows, the rest shuffled
    pq.write_table(meta.take(keep), meta_path)
    store = open_store(tmp_path / "store")
    got = int8_calibration_rows(store, n=512)
    assert store._meta is None
    live = np.sort(meta.column("row").to_numpy()[keep])
    want = np.unique(live[np.round(np.linspace(0, live.size - 1, 512)).astype(np.int64)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(int8_calibration_rows(store, n=1000), live)  # fewer live rows than asked: all


def _bench_scale() -> object:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_replicated_store_repeats_the_base_rows_under_new_ids(tmp_path: Path) -> None:
    """bench/scale.py's survey-sized stores: row j reads the base's row j mod nb (symlinked
    chunks), the metadata repeats the base's under unique ids, in the shipped row groups."""
    import pyarrow.parquet as pq

    from spectransfer.data.store import META_ROW_GROUP, open_store
    from test_discover import _store

    base = _store(tmp_path / "base", n=150, chunk_rows=32)  # trimmed to 128 rows
    nb = _bench_scale().replicate_store(tmp_path / "base", tmp_path / "big", 500)
    big = open_store(tmp_path / "big")
    assert nb == 128 and big.n_rows == 500 and big.flux.chunks == base.flux.chunks
    j = np.arange(500)
    np.testing.assert_array_equal(big.flux[:], base.flux[:][j % nb])
    np.testing.assert_array_equal(big.ivar[:], base.ivar[:][j % nb])
    assert (tmp_path / "big" / "spectra.zarr" / "flux" / "c" / "5" / "0").is_symlink()
    m, bm = big.meta, base.meta.set_index("row")
    np.testing.assert_array_equal(m["row"].to_numpy(), j)
    assert m["spectrum_id"].is_unique and big.info["store_id"] != base.info["store_id"]
    assert m["spectrum_id"].tolist() == [f"{bm.loc[r % nb, 'spectrum_id']}-r{r // nb}" for r in j]
    np.testing.assert_array_equal(m["plate"].to_numpy(), bm.loc[j % nb, "plate"].to_numpy() + (j // nb) * 1_000_000)
    np.testing.assert_array_equal(m["ra"].to_numpy(), bm.loc[j % nb, "ra"].to_numpy())
    groups = pq.ParquetFile(tmp_path / "big" / "meta.parquet").metadata
    assert groups.row_group(0).num_rows == min(500, META_ROW_GROUP)


def test_filled_column_slices_as_the_dense_column() -> None:
    from spectransfer.candidates.discover import _Filled

    rng = np.random.default_rng(4)
    n = 1000
    at = np.sort(rng.choice(n, 130, replace=False))
    values = rng.normal(size=at.size)
    dense = np.full(n, np.nan)
    dense[at] = values
    sparse, whole, none = (
        _Filled(values, np.nan, np.float64, n, at=at),
        _Filled(dense, 0, np.float64, n),
        _Filled(None, 7, np.int32, n),
    )
    for a, b in [(0, n), (0, 1), (13, 400), (999, 1000), (500, 2000), (at[5], at[5] + 1), (at[5] + 1, at[6])]:
        np.testing.assert_array_equal(sparse[a:b], dense[a:b])
        np.testing.assert_array_equal(whole[a:b], dense[a:b])
        assert none[a:b].dtype == np.int32 and (none[a:b] == 7).all() and none[a:b].size == dense[a:b].size


def test_blocked_redshifts_equal_the_whole_store_fitted_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """discover keeps only the positives' fitted redshifts, refined a few at a time; its columns
    equal redshift_columns over the whole store in one call (the in-memory reference)."""
    from astropy.table import Table

    import spectransfer.candidates.discover as discover_mod
    from spectransfer.candidates.redshifts import REDSHIFT_COLUMNS, redshift_columns
    from spectransfer.data.store import open_store
    from test_discover import _run, _store

    _store(tmp_path / "store", n=160, chunk_rows=32)
    run = _run(tmp_path / "run")
    monkeypatch.setattr(discover_mod, "REFINE_BLOCK", 7)
    discover_mod.discover(
        run, tmp_path / "store", tmp_path / "c.fits", engine="torch", block_size=30, templates="none", quiet=True
    )
    t = Table.read(tmp_path / "c.fits")
    store = open_store(tmp_path / "store")
    positive = np.asarray(t["IS_QSO"], bool)
    assert 0 < positive.sum() < len(t)  # some fitted, some not
    outputs = {k.lower(): np.asarray(t[k], np.float32) for k in ("Z_NET", "Z_NET_ERR", "Z_NET_PROB")}
    want = redshift_columns(outputs, positive, store.flux[:], store.ivar[:], "window", store.grid)
    for k in REDSHIFT_COLUMNS:
        np.testing.assert_allclose(np.asarray(t[k]), want[k], rtol=1e-10, err_msg=k)
