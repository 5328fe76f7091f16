"""Redshifts: the template refinement recovers injected redshifts, flags what it cannot trust,
and the network's z-head read-out and the redshift metrics compute what they claim."""

from __future__ import annotations

import numpy as np
import pytest

from spectransfer.config import DEFAULT_GRID as GRID
from spectransfer.data.resample import normalise
from spectransfer.ml import refine
from spectransfer.ml.models import redshift_from_head, z_bin_centres
from spectransfer.templates import load_templates

COEF = np.array([1.0, 0.15, -0.08, 0.05])  # a plausible quasar: mostly the mean spectrum


def _grid_step_z(z: np.ndarray) -> np.ndarray:
    """One trial step (a grid pixel in log10(1+z)) expressed in z at ``z``."""
    return (1 + z) * np.log(10) * GRID.log_step


def _template_on_grid(z: float, coef: np.ndarray = COEF) -> np.ndarray:
    """The template at ``z`` sampled independently of the fitter: np.interp of the rest-frame
    basis at the grid's rest wavelengths (no rebinning, any z, not only whole pixels)."""
    t = load_templates()["qso_loz" if z < refine.Z_SPLIT else "qso_hiz"]
    rest = np.log10(GRID.centers) - np.log10(1 + z)
    return np.array([np.interp(rest, t.loglam, b) for b in t.basis]).T @ coef


@pytest.fixture(scope="module")
def injected():
    rng = np.random.default_rng(7)
    z = np.concatenate([rng.uniform(0.05, 1.45, 12), rng.uniform(1.55, 4.5, 12)])
    clean = np.array([_template_on_grid(zi) for zi in z])
    return z, clean


def test_noiseless_templates_are_recovered_to_the_grid_step(injected):
    z, clean = injected
    # the store's own scaling: min-max to [-1, 1] with ivar scaled by 1/s^2 (the fit absorbs it)
    flux, ivar = normalise(clean, np.ones_like(clean))
    start = z + 0.03 * (1 + z) * np.where(np.arange(z.size) % 2, 1, -1)  # a network off by 9000 km/s
    res = refine.refine_redshifts(flux, ivar, start)
    assert np.all(np.abs(res.z - z) < _grid_step_z(z)), np.abs(res.z - z) / _grid_step_z(z)
    assert np.all(res.zwarn == 0) and np.all(res.npix == GRID.n_bins)
    assert np.all(res.deltachi2 >= refine.MIN_DELTACHI2)


def test_noisy_templates_are_recovered_with_honest_errors(injected):
    z, clean = injected
    rng = np.random.default_rng(3)
    sigma = 0.15 * np.abs(clean).mean(axis=1, keepdims=True)  # S/N ~ 7 per pixel
    flux = clean + rng.normal(size=clean.shape) * sigma
    ivar = np.broadcast_to(1 / sigma**2, clean.shape).copy()
    ivar[:, 300:340] = 0.0  # a masked stretch
    res = refine.refine_redshifts(flux, ivar, z + 0.01 * (1 + z))
    err = np.abs(res.z - z)
    assert np.all(err < 2 * _grid_step_z(z))
    assert np.median(err) < _grid_step_z(np.median(z))
    assert np.all(res.npix == GRID.n_bins - 40)
    assert np.all(np.isfinite(res.z_err) & (res.z_err > 0))
    # the Δχ² = 1 error is the right size: the pulls are of order one, not 10 or 0.1
    pull = np.median(err / res.z_err)
    assert 0.2 < pull < 3.0
    # χ² per good pixel of a correct model with the right noise is about 1
    assert np.median(res.chi2 / res.npix) == pytest.approx(1.0, abs=0.15)


def test_fit_matches_a_per_spectrum_least_squares_reference():
    """χ² of the FFT scan equals numpy lstsq on the same template matrix at every trial."""
    rng = np.random.default_rng(1)
    z0 = 2.1
    flux = _template_on_grid(z0) + rng.normal(0, 0.05, GRID.n_bins)
    ivar = rng.uniform(50, 500, GRID.n_bins)
    ivar[:100] = 0
    trials = refine.window_trials(np.array([z0]))[:, ::37]
    chi2, _ = refine.chi2_scan(flux[None], ivar[None], trials)
    for k, m in enumerate(trials[0]):
        z = float(refine._scan(GRID).z_of(m))
        bases = np.array([refine.template_spectrum(z, e) for e in np.eye(4)] + [np.ones(GRID.n_bins)]).T
        sw = np.sqrt(ivar)
        coef, *_ = np.linalg.lstsq(bases * sw[:, None], flux * sw, rcond=None)
        want = float((ivar * (flux - bases @ coef) ** 2).sum())
        assert chi2[0, k] == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_truth_just_outside_the_window_sets_the_edge_bit(injected):
    z, clean = injected
    flux, ivar = normalise(clean, np.ones_like(clean))
    # the truth 3000 km/s below the window's lower edge: the χ² well reaches into the window
    start = (1 + z) * np.exp(0.01) / (1 - refine.DESI_WINDOW) - 1
    res = refine.refine_redshifts(flux, ivar, start)
    assert np.all(res.zwarn & refine.ZWARN_WINDOW_EDGE)
    lower_edge = (1 + start) * (1 - refine.DESI_WINDOW) - 1
    assert np.all(np.abs(res.z - lower_edge) < 2 * _grid_step_z(z))


def test_too_few_pixels_and_empty_spectra_warn_instead_of_raising(injected):
    z, clean = injected
    flux, ivar = normalise(clean[:3], np.ones_like(clean[:3]))
    ivar[0, 50:] = 0.0  # 50 good pixels
    ivar[1] = 0.0  # none
    flux[1] = 0.0
    res = refine.refine_redshifts(flux, ivar, z[:3])
    assert res.npix.tolist() == [50, 0, GRID.n_bins]
    assert res.zwarn[0] & refine.ZWARN_FEW_PIXELS and res.zwarn[1] & refine.ZWARN_FEW_PIXELS
    assert not res.zwarn[2] & refine.ZWARN_FEW_PIXELS
    assert np.all(np.isfinite(res.z))


def test_no_network_z_scans_the_whole_range(injected):
    z, clean = injected
    pick = [0, 13, 20]
    flux, ivar = normalise(clean[pick], np.ones_like(clean[pick]))
    res = refine.refine_redshifts(flux, ivar, np.array([np.nan, np.nan, np.nan]))
    assert np.all(res.zwarn & refine.ZWARN_NO_NETWORK_Z)
    assert np.all(np.abs(res.z - z[pick]) < _grid_step_z(z[pick]))


def test_uncertain_network_redshifts_get_the_full_scan(injected):
    z, clean = injected
    pick = [1, 14]
    flux, ivar = normalise(clean[pick], np.ones_like(clean[pick]))
    wrong = z[pick] + 0.5 * (1 + z[pick])  # a line confusion far outside the DESI window
    confident = refine.refine_redshifts(flux, ivar, wrong, np.array([0.01, 0.01]), full_scan_above=0.1)
    assert np.all(np.abs(confident.z - z[pick]) > 0.1)  # trusted: refined where the network said
    doubtful = refine.refine_redshifts(flux, ivar, wrong, np.array([0.5, 0.5]) * (1 + wrong), full_scan_above=0.1)
    assert np.all(np.abs(doubtful.z - z[pick]) < _grid_step_z(z[pick]))
    assert not np.any(doubtful.zwarn & refine.ZWARN_NO_NETWORK_Z)


def test_inverted_spectrum_gets_the_negative_fit_bit(injected):
    z, clean = injected
    flux, ivar = normalise(-clean[:4], np.ones_like(clean[:4]))
    res = refine.refine_redshifts(flux, ivar, z[:4])
    assert np.all(res.zwarn & refine.ZWARN_NEGATIVE_FIT)


def test_redshift_metrics_against_a_direct_computation():
    z_true = np.array([1.0, 2.0, 0.5, 3.0, np.nan])
    dv = np.array([100.0, -2000.0, 5000.0, 50.0, 0.0])  # km/s
    z_pred = z_true + dv / refine.C_KMS * (1 + z_true)
    z_pred[3] = np.nan  # a missing answer counts as catastrophic
    m = refine.redshift_metrics(z_pred, z_true)
    assert m["n"] == 4
    assert m["catastrophic_fraction"] == pytest.approx(2 / 4)
    assert m["median_abs_dv_kms"] == pytest.approx(2000.0)
    np.testing.assert_allclose(refine.velocity_offset_kms(z_pred[:3], z_true[:3]), dv[:3])


def test_redshift_from_head_reads_mode_and_spread():
    n = 300
    u = z_bin_centres(n)
    one = np.full(n, -30.0)
    one[150] = 0.0
    one[151] = 0.0  # two equal neighbouring bins: z between their centres
    two = np.full(n, -30.0)
    two[60] = 0.1
    two[200] = 0.0  # two rival peaks: the mode wins, the spread is large
    z, z_err = redshift_from_head(np.stack([one, two]))
    assert z[0] == pytest.approx(np.expm1(0.5 * (u[150] + u[151])))
    assert z[1] == pytest.approx(np.expm1(u[60]), rel=1e-6)
    assert z_err[0] < 0.05 and z_err[1] > 1.0
