"""The streaming dataset: every selected row once per epoch, deterministic, resumable, bounded."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spectransfer.config import Grid
from spectransfer.data.resample import normalise
from spectransfer.data.store import write_store
from spectransfer.ml.dataset import DEPTH_SNR_MIN, ChunkStream, Selection, _round_robin_skips, make_input, select, shallower


def make_store(
    path: Path,
    n: int = 200,
    pos_frac: float = 0.3,
    chunk_rows: int = 16,
    seed: int = 0,
    surveys: tuple[str, ...] = ("sdss",),
    splits: tuple[float, float] = (0.6, 0.2),
    grid: Grid | None = None,
    signal: float = 0.8,
    with_z: bool = False,
    with_snr: bool = False,
):
    """A small store whose quasars carry broad emission bumps (so a network can learn them).

    ``splits`` are the train and val fractions (the rest is test); rows cycle through ``surveys``.
    ``with_z``: the quasars get a catalogue redshift (0.3-3) and their bumps sit at the
    observed wavelengths of Lyα, C IV, Mg II and Hβ (else three bumps at random places).
    """
    grid = grid or Grid()
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < pos_frac).astype(np.int8)
    x = np.arange(grid.n_bins)
    flux = rng.normal(0.0, 0.3, size=(n, grid.n_bins)).astype(np.float32)
    catalog_z = np.where(label == 1, rng.uniform(0.3, 3.0, n), np.nan)
    width = 25.0 * grid.n_bins / 2048 if with_z else 25.0
    for i in np.flatnonzero(label):
        if with_z:
            observed = np.log10(np.array([1215.67, 1549.06, 2798.75, 4862.68]) * (1 + catalog_z[i]))
            centres = (observed - np.log10(grid.wave_min)) / grid.log_step
        else:
            centres = rng.choice(grid.n_bins - 200, size=3, replace=False) + 100
        for centre in centres:
            flux[i] += signal * 3 * np.exp(-0.5 * ((x - centre) / width) ** 2)
    lo, hi = flux.min(axis=1, keepdims=True), flux.max(axis=1, keepdims=True)
    flux = (2 * (flux - lo) / (hi - lo) - 1).astype(np.float32)
    ivar = rng.uniform(0.5, 2.0, size=flux.shape).astype(np.float32)
    ivar[:, :50] = 0.0
    u = rng.random(n)
    split = np.where(u < splits[0], "train", np.where(u < splits[0] + splits[1], "val", "test"))
    meta = pd.DataFrame(
        {
            "spectrum_id": [f"sim-{i}" for i in range(n)],
            "survey": [surveys[i % len(surveys)] for i in range(n)],
            "ra": rng.uniform(0, 360, n),
            "dec": rng.uniform(-10, 60, n),
            "label": label,
            "label_source": np.where(label == 1, "id", "none"),
            "object_id": [f"obj-{i}" for i in range(n)],
            "split": split,
        }
    )
    if with_z:
        meta["catalog_z"] = catalog_z
    if with_snr:  # a median S/N per row as ingest records it, some below the depth floor
        meta["snr"] = np.exp(rng.uniform(np.log(0.5), np.log(40.0), n))
    return write_store(path, flux, ivar, meta, grid=grid, chunk_rows=chunk_rows)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "s", n=300, chunk_rows=16, surveys=("sdss", "lamost"))


def _epoch_rows(stream: ChunkStream, num_workers: int) -> list[np.ndarray]:
    return [r.numpy() for _, _, r in stream.loader(num_workers)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_selected_row_once_per_epoch(store, num_workers):
    sel = select(store, survey="lamost", split="train")
    expected = store.meta.query("survey == 'lamost' and split == 'train'")["row"].to_numpy()
    assert sorted(sel.rows.tolist()) == sorted(expected.tolist())
    stream = ChunkStream(store.flux, sel, batch_size=7, shuffle=True, seed=3, buffer_chunks=2)
    batches = _epoch_rows(stream, num_workers)
    seen = np.concatenate(batches)
    assert Counter(seen.tolist()) == Counter(expected.tolist())  # exactly once each
    assert len(batches) == sum(stream.worker_batches())
    assert not np.array_equal(seen, np.sort(seen))  # shuffled


def test_batches_carry_the_right_rows_and_labels(store):
    sel = select(store, split="val")
    stream = ChunkStream(store.flux, sel, ivar=store.ivar, in_channels=2, batch_size=9, seed=1)
    flux = np.asarray(store.flux[:])
    ivar = np.asarray(store.ivar[:])
    labels = store.meta.set_index("row")["label"]
    for x, y, r in stream.loader(0):
        r = r.numpy()
        assert x.shape == (len(r), 2, 2048)
        np.testing.assert_array_equal(x[:, 0].numpy(), flux[r])
        np.testing.assert_allclose(x[:, 1].numpy(), make_input(flux[r], ivar[r], 2)[:, 1])
        assert x[:, 1].max() <= 1.0 and (x[:, 1, :50] == 0).all()  # no data -> weight 0
        np.testing.assert_array_equal(y.numpy(), labels.loc[r].to_numpy(dtype=np.float32))


def test_order_is_deterministic_and_changes_with_epoch(store):
    sel = select(store, split="train")
    a = ChunkStream(store.flux, sel, batch_size=16, seed=5)
    b = ChunkStream(store.flux, sel, batch_size=16, seed=5)
    first = np.concatenate(_epoch_rows(a, 0))
    np.testing.assert_array_equal(first, np.concatenate(_epoch_rows(b, 0)))
    a.set_epoch(1)
    assert not np.array_equal(first, np.concatenate(_epoch_rows(a, 0)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_skips_exactly_the_consumed_batches(store, num_workers):
    sel = select(store, split="train")
    stream = ChunkStream(store.flux, sel, batch_size=5, seed=2, buffer_chunks=1)
    stream.set_epoch(4)
    full = _epoch_rows(stream, num_workers)
    stream.set_start(7)
    rest = _epoch_rows(stream, num_workers)
    assert len(rest) == len(full) - 7
    for got, want in zip(rest, full[7:]):
        np.testing.assert_array_equal(got, want)


def test_ranks_get_disjoint_rows_covering_the_selection(store):
    sel = select(store, split="train")
    per_rank = []
    for rank in range(3):
        s = ChunkStream(store.flux, sel, batch_size=4, seed=0, rank=rank, world_size=3, buffer_chunks=1)
        per_rank.append(set(np.concatenate(_epoch_rows(s, 0)).tolist()))
    assert sum(len(r) for r in per_rank) == len(sel)
    assert set().union(*per_rank) == set(sel.rows.tolist())


def test_balanced_stream_is_about_half_positive(store):
    sel = select(store, split="train")
    assert 0.15 < sel.labels.mean() < 0.45
    stream = ChunkStream(store.flux, sel, batch_size=32, seed=0, balanced=True, buffer_chunks=8)
    ys = np.concatenate([y.numpy() for _, y, _ in stream.loader(0)])
    assert len(ys) == len(sel)
    assert 0.4 < ys.mean() < 0.6


def test_subset_is_deterministic_and_bounded():
    sel = Selection(np.arange(1000, dtype=np.int64), np.zeros(1000, np.float32))
    a = sel.subset(fraction=0.1, seed=1)
    assert len(a) == 100 and np.array_equal(a.rows, sel.subset(fraction=0.1, seed=1).rows)
    assert not np.array_equal(a.rows, sel.subset(fraction=0.1, seed=2).rows)
    assert len(sel.subset(fraction=0.5, limit=30, seed=0)) == 30


def test_round_robin_skips_match_a_dataloader_order():
    # workers yielding 3, 1 and 2 batches, consumed round-robin: w0 w1 w2 w0 w2 w0
    assert _round_robin_skips([3, 1, 2], 4) == ([2, 1, 1], 1)
    assert _round_robin_skips([3, 1, 2], 5) == ([2, 1, 2], 0)
    assert _round_robin_skips([3, 1, 2], 6)[0] == [3, 1, 2]
    assert _round_robin_skips([3, 1, 2], 0) == ([0, 0, 0], 0)


@pytest.mark.slow
def test_memory_stays_bounded_on_a_store_larger_than_the_budget(tmp_path):
    """Stream a store of 1.6 GB uncompressed flux in a child process; its peak RSS stays far
    below what loading the array would take (smooth rows compress to little on disk)."""
    import subprocess
    import sys
    import textwrap

    import zarr

    n, chunk = 200 * 1024, 1024
    path = tmp_path / "big"
    small = make_store(path, n=chunk, chunk_rows=chunk)
    group = zarr.open_group(str(path / "spectra.zarr"), mode="r+")
    block = np.tile(np.linspace(-1, 1, 2048, dtype=np.float32), (chunk, 1))
    group["flux"].resize((n, 2048))
    group["ivar"].resize((n, 2048))
    for lo in range(0, n, chunk):
        group["flux"][lo : lo + chunk] = block
    big = pd.concat([small.meta] * (n // chunk), ignore_index=True)
    big["row"] = np.arange(n)
    big["split"] = "train"
    big.to_parquet(path / "meta.parquet")
    code = textwrap.dedent(f"""
        import resource
        from spectransfer.data.store import open_store
        from spectransfer.ml.dataset import ChunkStream, select
        s = open_store({str(path)!r})
        stream = ChunkStream(s.flux, select(s, split="train"), batch_size=256, buffer_chunks=4)
        n = sum(len(r) for _, _, r in stream.loader(0))
        print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == n
    assert int(out[1]) < 800  # MiB; the flux array alone is 1600 MiB


def _two_level(n: int, n_bins: int, snr: np.ndarray, rng: np.random.Generator) -> tuple:
    """Noise-free raw spectra at flux 1 (first half) and 2 (second half) with ivar giving ``snr``
    at flux 1.5 (the median), some bins empty; normalised as the store holds them."""
    raw = np.where(np.arange(n_bins) < n_bins // 2, 1.0, 2.0)[None, :].repeat(n, axis=0)
    ivar = np.repeat((snr / 1.5)[:, None] ** 2, n_bins, axis=1)
    ivar[:, :40] = 0.0
    raw[:, :40] = 0.0
    f, iv = normalise(raw, ivar)
    return f, iv


def test_shallower_reaches_a_log_uniform_depth():
    from scipy import stats

    rng = np.random.default_rng(5)
    n, n_bins = 400, 2048
    snr = np.exp(rng.uniform(np.log(3.0), np.log(60.0), n))
    f, iv = _two_level(n, n_bins, snr, rng)
    f2, iv2 = shallower(f, iv, snr, 1.0, np.random.default_rng(11))
    good = iv[0] > 0
    lo_bins, hi_bins = good & (np.arange(n_bins) < n_bins // 2), np.arange(n_bins) >= n_bins // 2
    # the step between the two levels, in units of the new noise, is the new S/N at flux 1
    step = f2[:, hi_bins].mean(axis=1) - f2[:, lo_bins].mean(axis=1)
    new_snr = 1.5 * step * np.sqrt(iv2[:, good].mean(axis=1))
    k = snr / new_snr
    assert np.all(k > 1.0 - 0.05) and np.all(new_snr > DEPTH_SNR_MIN * 0.9) and np.all(new_snr < snr * 1.05)
    # log(target) is uniform on [log 1, log snr]: its position in that range is U(0, 1)
    u = np.log(new_snr / DEPTH_SNR_MIN) / np.log(snr / DEPTH_SNR_MIN)
    assert stats.kstest(np.clip(u, 0, 1), "uniform").pvalue > 1e-3
    # the scatter about each level is the added noise: sqrt(k^2 - 1) / k of the new sigma
    resid = np.concatenate(
        [
            f2[:, lo_bins] - f2[:, lo_bins].mean(axis=1, keepdims=True),
            f2[:, hi_bins] - f2[:, hi_bins].mean(axis=1, keepdims=True),
        ],
        axis=1,
    )
    scatter = (resid * np.sqrt(iv2[:, good][:, :1])).std(axis=1)
    off = np.abs(scatter - np.sqrt(k**2 - 1) / k)  # k itself is estimated from the noisy levels
    assert np.median(off) < 0.02 and off.max() < 0.1
    # what the store holds: flux in [-1, 1], empty bins still empty
    assert f2.min() >= -1.0 and f2.max() <= 1.0
    assert np.all(f2[:, ~good] == 0) and np.all(iv2[:, ~good] == 0)


def test_shallower_changes_only_the_drawn_rows():
    rng = np.random.default_rng(6)
    n = 2000
    snr = np.exp(rng.uniform(np.log(0.3), np.log(50.0), n))
    snr[::50] = np.nan
    f, iv = _two_level(n, 256, np.nan_to_num(snr, nan=10.0), rng)
    f2, iv2 = shallower(f, iv, snr, 0.3, np.random.default_rng(3))
    changed = np.any(f2 != f, axis=1) | np.any(iv2 != iv, axis=1)
    eligible = np.isfinite(snr) & (snr > DEPTH_SNR_MIN)
    assert not changed[~eligible].any()  # unknown or already faint: left as they are
    m = int(eligible.sum())
    lo, hi = stats_bounds(m, 0.3)
    assert lo <= int(changed.sum()) <= hi
    again = shallower(f, iv, snr, 0.3, np.random.default_rng(3))
    np.testing.assert_array_equal(again[0], f2)
    np.testing.assert_array_equal(shallower(f, iv, snr, 0.0, np.random.default_rng(3))[0], f)


def stats_bounds(n: int, p: float) -> tuple[int, int]:
    from scipy import stats

    return int(stats.binom.ppf(1e-4, n, p)), int(stats.binom.ppf(1 - 1e-4, n, p))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_depth_augmented_stream_resumes_exactly(tmp_path, num_workers):
    st = make_store(tmp_path / "s", n=200, chunk_rows=16, with_snr=True)
    sel = select(st, split="train")
    assert sel.snr is not None and np.isfinite(sel.snr).all()
    stream = ChunkStream(st.flux, sel, ivar=st.ivar, batch_size=5, seed=2, buffer_chunks=1, depth=0.5)
    stream.set_epoch(3)
    full = [(x.numpy(), r.numpy()) for x, _, r in stream.loader(num_workers)]
    plain = ChunkStream(st.flux, sel, ivar=st.ivar, batch_size=5, seed=2, buffer_chunks=1)
    plain.set_epoch(3)
    unchanged = [x.numpy() for x, _, _ in plain.loader(num_workers)]
    differs = np.concatenate([np.any(a[0] != b, axis=(1, 2)) for a, b in zip(full, unchanged)])
    assert 0 < differs.sum() < differs.size  # some rows shown shallower, not all
    stream.set_start(7)
    rest = [(x.numpy(), r.numpy()) for x, _, r in stream.loader(num_workers)]
    assert len(rest) == len(full) - 7
    for (gx, gr), (wx, wr) in zip(rest, full[7:]):
        np.testing.assert_array_equal(gr, wr)
        np.testing.assert_array_equal(gx, wx)
