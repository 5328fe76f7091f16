"""The resampler against spectres (the paper's reference), analytic noise, and brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st
from spectres import spectres
from spectres.spectral_resampling import make_bins

from spectransfer.config import DEFAULT_GRID, Grid
from spectransfer.data.resample import (
    BRIGHT_SKY_LINES,
    normalise,
    overlap_matrix,
    pixel_edges,
    resample_batch,
    resample_record,
    scale_bins,
)
from spectransfer.surveys.base import SpectrumRecord

from conftest import REAL_DATA as DATA


def _spectres(grid: Grid, wave, flux, err):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spectres(grid.centers, wave, flux, spec_errs=err, verbose=False)


def _brute_force(grid: Grid, wave, flux, ivar, good):
    """Direct O(n_in x n_out) overlap-weighted mean and variance over good pixels."""
    e_in, e_out = pixel_edges(wave), grid.edges
    ov = np.minimum(e_in[None, 1:], e_out[1:, None]) - np.maximum(e_in[None, :-1], e_out[:-1, None])
    w = np.clip(ov, 0, None) * good[None, :]
    s = w.sum(axis=1)
    var = np.where(good, 1 / np.where(good, ivar, 1), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (w * np.where(good, flux, 0)).sum(axis=1) / s
        v = (w**2 * var).sum(axis=1) / s**2
    return np.where(s > 0, f, 0), np.where(s > 0, 1 / v, 0)


def test_grid_edges_are_spectres_edges():
    edges, _ = make_bins(DEFAULT_GRID.centers)
    assert np.array_equal(DEFAULT_GRID.edges, edges)
    assert DEFAULT_GRID.edges.shape == (2049,)
    assert np.all(np.diff(DEFAULT_GRID.edges) > 0)


@st.composite
def _case(draw):
    n_bins = draw(st.integers(8, 96))
    lo = draw(st.floats(3000, 6000))
    hi = lo * draw(st.floats(1.05, 2.5))
    grid = Grid(n_bins=n_bins, wave_min=lo, wave_max=hi)
    n_pix = draw(st.integers(4, 400))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Random strictly increasing grid that may be finer or coarser than the output and may
    # start/end inside it; spacings vary by up to a factor 20 pixel to pixel.
    start = lo + (hi - lo) * draw(st.floats(-0.3, 0.3))
    span = (hi - lo) * draw(st.floats(0.3, 1.6))
    steps = rng.uniform(0.05, 1.0, n_pix - 1)
    wave = start + np.concatenate(([0.0], np.cumsum(steps))) * span / steps.sum()
    n_spec = draw(st.integers(1, 4))
    flux = rng.uniform(0.1, 10.0, (n_spec, n_pix))
    err = rng.uniform(0.05, 3.0, (n_spec, n_pix))
    return grid, wave, flux, err


@settings(max_examples=150, deadline=None)
@given(_case())
def test_resample_equals_spectres_on_random_spectra(case):
    grid, wave, flux, err = case
    out_f, out_iv = resample_batch(wave, flux, 1 / err**2, grid=grid)
    ref_f, ref_e = _spectres(grid, wave, flux, err)
    defined = np.isfinite(ref_f)
    np.testing.assert_allclose(out_f[defined], ref_f[defined], rtol=1e-6, atol=0)
    np.testing.assert_allclose(out_iv[defined], 1 / ref_e[defined] ** 2, rtol=1e-6, atol=0)
    # Bins outside the input's pixels entirely carry no data.
    e_in = pixel_edges(wave)
    outside = (grid.edges[1:] <= e_in[0]) | (grid.edges[:-1] >= e_in[-1])
    assert np.all(out_iv[:, outside] == 0) and np.all(out_f[:, outside] == 0)


def test_resample_equals_spectres_on_default_grid_sdss_like():
    rng = np.random.default_rng(1)
    wave = 10 ** (np.log10(3600) + 1e-4 * np.arange(4610))
    flux = rng.uniform(0.5, 50, (7, wave.size))
    err = rng.uniform(0.1, 5, (7, wave.size))
    out_f, out_iv = resample_batch(wave, flux, 1 / err**2)
    ref_f, ref_e = _spectres(DEFAULT_GRID, wave, flux, err)
    assert np.isfinite(ref_f).all()  # this input covers the whole grid
    np.testing.assert_allclose(out_f, ref_f, rtol=1e-6)
    np.testing.assert_allclose(out_iv, 1 / ref_e**2, rtol=1e-6)


def test_resample_conserves_flux_integral():
    rng = np.random.default_rng(2)
    grid = DEFAULT_GRID
    wave = np.sort(rng.uniform(3700, 9100, 3000))
    flux = rng.uniform(0, 10, wave.size)
    out_f, _ = resample_batch(wave, flux[None], np.ones((1, wave.size)), grid=grid)
    # Independent: the input as a step function, integrated exactly between the grid's ends.
    e_in = pixel_edges(wave)
    cum = np.concatenate(([0.0], np.cumsum(flux * np.diff(e_in))))
    expected = np.interp(grid.edges[-1], e_in, cum) - np.interp(grid.edges[0], e_in, cum)
    got = np.sum(out_f[0] * np.diff(grid.edges))
    assert got == pytest.approx(expected, rel=1e-10)
    # ... and over any run of whole bins, not only the full range.
    j0, j1 = 100, 1500
    expected = np.interp(grid.edges[j1], e_in, cum) - np.interp(grid.edges[j0], e_in, cum)
    assert np.sum(out_f[0, j0:j1] * np.diff(grid.edges)[j0:j1]) == pytest.approx(expected, rel=1e-10)


def _centres_for_edges(edges: np.ndarray) -> np.ndarray:
    """Pixel centres whose spectres-style edges are exactly ``edges``."""
    c = np.empty(edges.size - 1)
    c[0] = (edges[0] + edges[1]) / 2
    for i in range(1, c.size):
        c[i] = 2 * edges[i] - c[i - 1]
    return c


def test_ivar_of_constant_noise_spectrum_matches_analytic_value():
    # Input pixels: every output bin split into k equal pixels, plus margins. Each bin then
    # averages k equal-width pixels of variance sigma^2: var = sigma^2 / k exactly.
    grid = Grid(n_bins=200, wave_min=4000, wave_max=6000)
    k, sigma = 3, 0.7
    e = grid.edges
    fine = np.concatenate([np.linspace(e[j], e[j + 1], k + 1)[:-1] for j in range(grid.n_bins)] + [e[-1:]])
    step = fine[1] - fine[0]
    fine = np.concatenate((fine[0] - step * np.arange(5, 0, -1), fine, fine[-1] + (fine[-1] - fine[-2]) * np.arange(1, 6)))
    wave = _centres_for_edges(fine)
    assert np.allclose(pixel_edges(wave), fine, rtol=1e-12, atol=1e-9)
    ivar = np.full((1, wave.size), 1 / sigma**2)
    flux = np.random.default_rng(3).normal(5, sigma, (1, wave.size))
    _, out_iv = resample_batch(wave, flux, ivar, grid=grid)
    np.testing.assert_allclose(out_iv[0], k / sigma**2, rtol=1e-6)


def test_propagated_ivar_matches_monte_carlo_scatter():
    rng = np.random.default_rng(4)
    grid = Grid(n_bins=40, wave_min=4000, wave_max=5000)
    wave = np.sort(rng.uniform(3950, 5050, 150))
    sigma = rng.uniform(0.5, 2.0, wave.size)
    n_real = 4000
    flux = 10 + rng.standard_normal((n_real, wave.size)) * sigma
    out_f, out_iv = resample_batch(wave, flux, np.broadcast_to(1 / sigma**2, flux.shape), grid=grid)
    predicted_var = 1 / out_iv[0]
    ratio = out_f.var(axis=0) / predicted_var
    assert np.allclose(out_iv, out_iv[0])  # same noise model -> same ivar in every realisation
    assert abs(ratio.mean() - 1) < 0.02  # sampling error of the mean ratio ~0.4%
    assert np.all(np.abs(ratio - 1) < 0.15)  # per bin ~2.2% sampling error


def test_masked_and_zero_ivar_pixels_carry_no_weight():
    rng = np.random.default_rng(5)
    grid = Grid(n_bins=64, wave_min=4000, wave_max=4400)
    wave = np.sort(rng.uniform(3990, 4410, 300))
    flux = rng.uniform(1, 2, (3, wave.size))
    ivar = rng.uniform(1, 4, (3, wave.size))
    mask = np.zeros((3, wave.size), dtype=np.int32)
    mask[0, 10:20] = 1 << 4
    ivar[1, 50:60] = 0
    flux[1, 70] = np.nan  # non-finite flux counts as bad
    mask[2, :] = 0
    bad = (mask != 0) | (ivar == 0) | ~np.isfinite(flux)
    poisoned = np.where(bad, 1e30, flux)  # a bad pixel's value must not leak
    poisoned[1, 70] = np.nan
    out_f, out_iv = resample_batch(wave, poisoned, ivar, mask, grid=grid)
    for i in range(3):
        ref_f, ref_iv = _brute_force(grid, wave, flux[i], ivar[i], ~bad[i])
        np.testing.assert_allclose(out_f[i], ref_f, rtol=1e-10, atol=0)
        np.testing.assert_allclose(out_iv[i], ref_iv, rtol=1e-10, atol=0)
    assert np.all(np.isfinite(out_f)) and out_f.max() < 3


def test_bins_without_good_pixels_get_zero_flux_and_ivar():
    grid = Grid(n_bins=50, wave_min=4000, wave_max=5000)
    wave = np.linspace(3900, 4600, 500)  # grid's red part not covered
    flux = np.ones((1, wave.size)) * 3
    ivar = np.ones((1, wave.size))
    ivar[0, (wave > 4200) & (wave < 4300)] = 0  # a masked gap wider than a bin
    out_f, out_iv = resample_batch(wave, flux, ivar, grid=grid)
    e = grid.edges
    beyond = e[:-1] >= pixel_edges(wave)[-1]
    in_gap = (e[:-1] > 4201) & (e[1:] < 4299)
    assert beyond.sum() > 10 and in_gap.sum() >= 2
    for sel in (beyond, in_gap):
        assert np.all(out_iv[0, sel] == 0) and np.all(out_f[0, sel] == 0)
    rest = ~beyond & ~in_gap & (out_iv[0] > 0)
    np.testing.assert_allclose(out_f[0, rest], 3.0, rtol=1e-12)


def test_different_grids_per_row_and_ragged_input():
    rng = np.random.default_rng(6)
    grid = Grid(n_bins=128, wave_min=4000, wave_max=8000)
    w_a = 10 ** (3.59 + 1e-4 * np.arange(3909))
    w_b = 10 ** (3.5901 + 1e-4 * np.arange(3909))
    w_c = 10 ** (3.59 + 1e-4 * np.arange(3904))
    waves = np.stack([w_a, w_b, w_a, w_b])
    flux = rng.uniform(1, 5, (4, 3909))
    ivar = rng.uniform(1, 5, (4, 3909))
    out_f, out_iv = resample_batch(waves, flux, ivar, grid=grid)
    for i in range(4):
        f1, iv1 = resample_batch(waves[i], flux[i], ivar[i], grid=grid)
        np.testing.assert_array_equal(out_f[i], f1[0])
        np.testing.assert_array_equal(out_iv[i], iv1[0])
    assert not np.allclose(out_f[0], resample_batch(w_b, flux[0], ivar[0], grid=grid)[0][0])
    # Ragged (LAMOST files differ in length): sequences of 1-D arrays.
    rf, riv = resample_batch([w_a, w_c, w_b], [flux[0], flux[1, :3904], flux[1]], [ivar[0], ivar[1, :3904], ivar[1]], grid=grid)
    np.testing.assert_array_equal(rf[0], out_f[0])
    np.testing.assert_array_equal(rf[2], out_f[1])
    ref_f, _ = _spectres(grid, w_c, flux[1, :3904], 1 / np.sqrt(ivar[1, :3904]))
    np.testing.assert_allclose(rf[1], ref_f, rtol=1e-6)


def test_overlap_matrix_is_cached_and_exact():
    wave = np.linspace(3800, 9000, 2000)
    w1 = overlap_matrix(wave)
    w2 = overlap_matrix(wave.copy())
    assert w1 is w2
    assert w1.shape == (2048, 2000)
    # Each fully covered bin's weights sum to its width.
    np.testing.assert_allclose(np.asarray(w1.sum(axis=1)).ravel(), np.diff(DEFAULT_GRID.edges), rtol=1e-12)


def test_bad_wavelength_arrays_are_rejected():
    with pytest.raises(ValueError, match="increasing"):
        resample_batch(np.array([3, 2, 1.0, 4]), np.ones((1, 4)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="pixels"):
        resample_batch(np.arange(5.0), np.ones((1, 4)), np.ones((1, 4)))


def test_resample_record_on_a_real_boss_file(real_data):
    path = real_data / "sdss" / "spec-7340-57576-0740.fits"
    with fits.open(path) as hdul:
        coadd = hdul[1].data
        wave = 10.0 ** coadd["loglam"].astype(np.float64)
        flux = coadd["flux"].astype(np.float64)
        ivar = coadd["ivar"].astype(np.float64)
        mask = coadd["and_mask"].astype(np.int64)
    rec = SpectrumRecord(
        path=str(path),
        survey="sdss",
        format="sdss-spec",
        ids={},
        ra=None,
        dec=None,
        cls=None,
        subclass=None,
        z=None,
        zwarning=None,
        wave=wave,
        flux=flux,
        ivar=ivar,
        mask=mask,
    )
    out_f, out_iv = resample_record(rec)
    assert out_f.shape == out_iv.shape == (2048,)
    # and_mask flags ~14% of this file's pixels (BRIGHTSKY sky lines, NODATA), all bad here.
    assert 0.8 < (out_iv > 0).mean() < 0.95
    # Where every overlapping pixel is good, the bin equals spectres on the raw arrays.
    good = (ivar > 0) & (mask == 0)
    w = overlap_matrix(wave)
    all_good = np.asarray((w @ (~good).astype(float)) == 0).ravel() & (out_iv > 0)
    err = np.where(ivar > 0, 1 / np.sqrt(np.where(ivar > 0, ivar, 1)), 0)
    ref_f, ref_e = _spectres(DEFAULT_GRID, wave, flux, err)
    assert all_good.sum() > 1000
    np.testing.assert_allclose(out_f[all_good], ref_f[all_good], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out_iv[all_good], 1 / ref_e[all_good] ** 2, rtol=1e-6)


def test_normalise_min_max_and_ivar_scaling():
    flux = np.array([[2.0, 4.0, 6.0, 100.0, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0], [5.0, 6.0, 7.0, 8.0, 9.0]])
    ivar = np.array([[1.0, 2.0, 4.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    fn, ivn = normalise(flux, ivar)
    assert fn.dtype == np.float32 and ivn.dtype == np.float32
    # Row 0: good range 2..6 (the 100 has ivar 0), s = 2 / 4 = 0.5.
    np.testing.assert_allclose(fn[0], [-1.0, 0.0, 1.0, 0.0, -0.5])
    np.testing.assert_allclose(ivn[0], [4.0, 8.0, 16.0, 0.0, 4.0])
    # Constant spectrum: 0 with ivar unscaled; no data at all: zeros.
    np.testing.assert_array_equal(fn[1], 0)
    np.testing.assert_array_equal(ivn[1], ivar[1])
    np.testing.assert_array_equal(fn[2], 0)
    np.testing.assert_array_equal(ivn[2], 0)
    # Same as sklearn's minmax_scale (the paper's code) on a spectrum with every bin good.
    from sklearn.preprocessing import minmax_scale

    row = np.random.default_rng(7).uniform(-3, 8, 2048)
    f1, _ = normalise(row, np.ones(2048))
    np.testing.assert_allclose(f1, minmax_scale(row, feature_range=(-1, 1)), atol=1e-6)
    assert f1.min() == -1 and f1.max() == 1


def test_the_bright_sky_lines_do_not_set_the_scale():
    # the grid bins left out are those within 5 Å of [O I] 5577, Na D and [O I] 6300/6364
    keep = scale_bins(DEFAULT_GRID)
    near = np.min(np.abs(DEFAULT_GRID.centers[:, None] - np.array(BRIGHT_SKY_LINES)[None]), axis=1)
    np.testing.assert_array_equal(~keep, near <= 5.0)
    assert 15 <= (~keep).sum() <= 30
    # a residual spike at 5577 no longer squeezes the spectrum: the scale is that of the rest
    rng = np.random.default_rng(3)
    row = rng.uniform(0.0, 1.0, DEFAULT_GRID.n_bins)
    spiked = row.copy()
    spiked[np.argmin(np.abs(DEFAULT_GRID.centers - 5578.89))] = 50.0
    plain, _ = normalise(spiked, np.ones_like(row))
    sky, _ = normalise(spiked, np.ones_like(row), DEFAULT_GRID)
    ref, _ = normalise(np.where(keep, row, 0.5), np.ones_like(row))  # the same spectrum without the residual
    np.testing.assert_allclose(sky[keep], ref[keep], atol=1e-6)
    assert sky.max() == 1.0 and np.ptp(plain[keep]) < 0.05  # clipped at 1; unclipped, the rest fills 1/50 of the range
    # a spectrum with data only near the sky lines falls back to those bins
    iv = (~keep).astype(float)
    only, _ = normalise(spiked, iv, DEFAULT_GRID)
    np.testing.assert_array_equal(only, normalise(spiked, iv)[0])
    with pytest.raises(ValueError, match="bins"):
        normalise(row[:100], np.ones(100), DEFAULT_GRID)


def test_the_5577_residual_of_a_real_boss_file_no_longer_squeezes_it():
    """The z = 6.39 quasar in tests/data: its brightest and faintest bins are the 5577 residual."""
    from spectransfer.surveys import read_spectrum

    rec = read_spectrum(DATA / "sdss" / "spec-7457-56746-0001.fits")
    f, iv = resample_record(rec)
    keep = scale_bins(DEFAULT_GRID)
    good = iv > 0
    assert abs(DEFAULT_GRID.centers[np.argmax(np.where(good, f, -np.inf))] - 5578.89) < 5  # the file's own extreme
    plain, _ = normalise(f, iv)
    sky, _ = normalise(f, iv, DEFAULT_GRID)
    rest = good & keep
    # the object's own bins now span the whole range, instead of a small part of it
    assert np.ptp(sky[rest]) == pytest.approx(2.0)
    assert np.ptp(plain[rest]) < 0.5 * np.ptp(sky[rest])
