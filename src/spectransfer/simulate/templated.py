"""Rest-frame spectra of quasars, their host galaxies, galaxies and stars from real templates.

Every shape comes from the redrock templates (`spectransfer.templates`: DR16Q quasar PCA,
galaxy and star archetypes derived from real BOSS/SDSS spectra), so the network learns what
real spectra look like rather than hand-built caricatures:

* Galaxies and stars: one archetype row (its coefficients times the basis is one realistic
  spectrum), the coefficients jittered by a few per cent, redshifted (galaxies) or shifted by
  the radial velocity (stars). Cataclysmic variables have no archetypes: their first basis
  vector with small random admixtures of the other two.
* Quasars: the LOZ bases below ``z_split`` (1.4) and the HIZ bases above, with coefficient
  ratios c[k]/c[0] (on unit-rms basis vectors) drawn from a multivariate normal whose mean and
  covariance were ESTIMATED from the real SDSS quasars of the shared data set by
  ``scripts/fit_quasar_coeffs.py`` (weighted least squares at the pipeline redshift, galaxy
  bases fitted alongside below z = 0.8 so host light does not enter the quasar coefficients;
  repeat epochs averaged per object; the covariance shrunk halfway to its diagonal, every
  standard deviation widened 1.5x and floored at half the pooled spread, because only a
  handful of objects constrain it). Stored in ``qso_coeffs.json`` beside this file. A draw
  that makes the continuum negative is pulled back toward the mean. The four real quasars
  behind the LOZ numbers (z 0.1-0.97) saw rest 2000-6400 A at most, so blueward of 4200 A
  their draws extrapolate: their slope between rest 2200 and 4200 A had median
  alpha_lambda -2.5 and 5% below -4.5, bluer than any quasar population, and the simulated
  z 0.9-1.3 quasars' observed 4100-4500 / 7300-7700 A flux ratio median 3.8 (10% above 12)
  where the composite gives 2.4 and the real z 0.97 quasar of the shared files 1.4. So each
  LOZ draw's continuum is bent blueward of rest 3025 A (f_lambda times (lambda/3025)^d there,
  3025 A the centre of the red slope window) to a 2200-3000 A slope drawn from the SDSS
  quasars' (alpha_nu = QSO_ALPHA_NU, Vanden Berk et al. 2001, AJ 122, 549; spread as Richards
  et al. 2003, AJ 126, 1131); redward of 3000 A, which the real quasars' spectra covered, the
  draws are kept (bending from 4200 A instead reddened their 3000-4200 A shape too, and the
  demo's network lost real z 0.4-0.5 quasars at low S/N). On top: Lyman-alpha forest
  fluctuations about the template's mean absorption (tau_eff of Faucher-Giguere et al.
  2008), broad absorption troughs for BAL quasars, and a random continuum tilt (rest-frame
  f_lambda ~ lambda^delta, delta ~ N(0, 0.15): the slope and dust-reddening spread the four
  PCA vectors leave out).
* Host galaxies: a galaxy archetype at the quasar's redshift scaled so that host / quasar at
  rest 5100 A equals the ratio the plan drew (`plan.host_ratio`: Shen et al. 2011, eq. 1).

All functions return (N, P) arrays on the observed grid ``loglam`` (log10 vacuum Angstrom),
f_lambda in arbitrary units, already smoothed to the instrument's resolution.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d

from spectransfer.templates import Template, load_templates

COEFF_FILE = Path(__file__).with_name("qso_coeffs.json")
LYA = 1215.67
STAR_TEMPLATE = {
    "A": "star_a",
    "B": "star_b",
    "F": "star_f",
    "G": "star_g",
    "K": "star_k",
    "M": "star_m",
    "WD": "star_wd",
    "CV": "star_cv",
}
TILT_SD = 0.15
QSO_ALPHA_NU = (-0.44, 0.30)  # UV-optical continuum slope of SDSS quasars: mean, spread
SLOPE_WINDOWS = ((2150.0, 2250.0), (2990.0, 3060.0))  # rest continuum windows the LOZ slope is set between
ARCHETYPE_JITTER = 0.03  # relative rms jitter of each archetype coefficient


@lru_cache(maxsize=1)
def qso_coeffs() -> dict:
    """The fitted quasar coefficient distributions (see the module docstring)."""
    return json.loads(COEFF_FILE.read_text())


@cache
def unit_basis(name: str) -> np.ndarray:
    """The template's basis vectors scaled to unit rms (as scripts/fit_quasar_coeffs.py uses them)."""
    b = load_templates()[name].basis.astype(np.float64)
    return b / np.sqrt(np.mean(b**2, axis=1, keepdims=True))


def redshift_to(t: Template, rest: np.ndarray, z: np.ndarray, loglam: np.ndarray) -> np.ndarray:
    """Rest-frame spectra (N, n_t) on the template grid -> observed grid (N, P) at redshifts z.

    Both grids are uniform in log10(lambda), so a redshift is a shift by log10(1+z) bins:
    linear interpolation between template bins; beyond the template's ends the edge value.
    """
    step = float(t.loglam[1] - t.loglam[0])
    pos = (loglam[None, :] - np.log10(1.0 + z)[:, None] - t.loglam[0]) / step
    n_t = rest.shape[1]
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, n_t - 2)
    frac = np.clip(pos - i0, 0.0, 1.0)
    lo = np.take_along_axis(rest, i0, axis=1)
    hi = np.take_along_axis(rest, i0 + 1, axis=1)
    return lo + (hi - lo) * frac


def smooth(flux: np.ndarray, sigma_inst_log: float) -> np.ndarray:
    """Gaussian line-spread function of the instrument on a 1e-4 dex pixel grid."""
    return gaussian_filter1d(flux, sigma_inst_log / 1e-4, axis=1, mode="nearest", truncate=3.0)


def _window_mean(t: Template, rest: np.ndarray, lo: float, hi: float) -> np.ndarray:
    sel = (t.wave > lo) & (t.wave < hi)
    return rest[:, sel].mean(axis=1)


# ---- quasars ----------------------------------------------------------------------------------


def quasar_rest(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    """n rest-frame quasar spectra (n, n_t) on template ``name`` (qso_loz | qso_hiz), unit c[0]."""
    d = qso_coeffs()[name]
    mean, cov = np.asarray(d["mean"]), np.asarray(d["cov"])
    u = unit_basis(name)
    r = rng.multivariate_normal(mean, cov, size=n, method="cholesky")
    out = u[0][None, :] + r @ u[1:]
    # A draw whose continuum goes negative is unphysical: pull it halfway back, up to 4 times.
    for _ in range(4):
        bad = np.mean(out <= 0.0, axis=1) > 0.01
        if not bad.any():
            break
        r[bad] = mean + 0.5 * (r[bad] - mean)
        out[bad] = u[0][None, :] + r[bad] @ u[1:]
    return np.maximum(out, 0.0)


def lya_tau_eff(z_abs: np.ndarray) -> np.ndarray:
    """tau_eff = 0.0018 (1+z)^3.92 (Faucher-Giguere et al. 2008, ApJ 681, 831)."""
    return 0.0018 * (1.0 + z_abs) ** 3.92


def forest_fluctuations(rng: np.random.Generator, wave: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Multiplicative Lyman-alpha forest fluctuations (N, P) of mean 1 blueward of Lya.

    With tau = tau' g, g ~ Exp(1): <exp(-tau)> = 1 / (1 + tau'), so exp(-tau) (1 + tau') has
    mean 1 and keeps the template's own mean absorption while adding the line-to-line scatter."""
    rest = wave[None, :] / (1.0 + z)[:, None]
    tau = np.expm1(lya_tau_eff(wave / LYA - 1.0))[None, :]
    g = rng.exponential(1.0, (z.shape[0], wave.shape[0]))
    f = np.exp(-tau * g) * (1.0 + tau)
    f[:, 1:-1] = (f[:, :-2] + 2.0 * f[:, 1:-1] + f[:, 2:]) / 4.0
    return np.where(rest < LYA, f, 1.0)


def quasar_model(
    rng: np.random.Generator,
    loglam: np.ndarray,
    z: np.ndarray,
    host_ratio: np.ndarray,
    bal_absorb: Callable[[np.ndarray], np.ndarray],
    sigma_inst_log: float,
) -> np.ndarray:
    """Quasar (+ host) spectra (N, P): PCA continuum and lines, tilt, forest, BALs, host light.

    ``host_ratio`` is host / quasar flux at rest 5100 A (0 for none); ``bal_absorb(rest)``
    returns the BAL absorption depth (N, P) for the rest-frame wavelengths given.
    """
    t = load_templates()
    wave = 10.0**loglam
    n = z.shape[0]
    out = np.zeros((n, loglam.shape[0]))
    split = float(qso_coeffs()["z_split"])
    tilt = np.asarray(rng.normal(0.0, TILT_SD, n))
    for name, sel in (("qso_loz", z < split), ("qso_hiz", z >= split)):
        idx = np.nonzero(sel)[0]
        if not idx.size:
            continue
        tpl = t[name]
        rest = quasar_rest(rng, name, idx.size)
        if name == "qso_loz":
            rest = set_uv_slope(rng, tpl, rest)
        rest = rest * (tpl.wave[None, :] / 3000.0) ** tilt[idx, None]
        out[idx] = redshift_to(tpl, rest, z[idx], loglam)
        hosted = idx[host_ratio[idx] > 0]
        if hosted.size and name == "qso_loz":
            k = np.searchsorted(idx, hosted)
            a5100 = _window_mean(tpl, rest[k], 5050.0, 5150.0)
            out[hosted] += host_model(rng, loglam, z[hosted], host_ratio[hosted] * a5100)
    out *= forest_fluctuations(rng, wave, z)
    out *= 1.0 - bal_absorb(wave[None, :] / (1.0 + z)[:, None])
    return smooth(out, sigma_inst_log)


def set_uv_slope(rng: np.random.Generator, tpl: Template, rest: np.ndarray) -> np.ndarray:
    """``rest`` (n, n_t) with each row's f_lambda slope between the SLOPE_WINDOWS set to
    alpha_lambda = -2 - alpha_nu, alpha_nu ~ N(QSO_ALPHA_NU), by bending it blueward of the red
    window's centre only (a power law in wavelength there, continuous at the centre)."""
    (b_lo, b_hi), (r_lo, r_hi) = SLOPE_WINDOWS
    blue, red = _window_mean(tpl, rest, b_lo, b_hi), _window_mean(tpl, rest, r_lo, r_hi)
    lever = np.log(0.5 * (b_lo + b_hi) / (0.5 * (r_lo + r_hi)))
    with np.errstate(divide="ignore", invalid="ignore"):  # a window <= 0: that row is left as drawn
        alpha = np.log(blue / red) / lever
    target = -2.0 - rng.normal(QSO_ALPHA_NU[0], QSO_ALPHA_NU[1], rest.shape[0])
    pivot = 0.5 * (r_lo + r_hi)
    bend = np.log(np.minimum(tpl.wave, pivot) / pivot)  # 0 redward of the pivot
    delta = np.where((blue > 0) & (red > 0), target - alpha, 0.0)
    return rest * np.exp(delta[:, None] * bend[None, :])


def host_model(rng: np.random.Generator, loglam: np.ndarray, z: np.ndarray, flux5100: np.ndarray) -> np.ndarray:
    """Host galaxies (N, P): random galaxy archetypes at z with mean rest 5050-5150 A flux ``flux5100``."""
    g = load_templates()["galaxy"]
    assert g.coeff is not None  # the galaxy template has archetypes
    rows = np.asarray(rng.integers(0, g.coeff.shape[0], z.shape[0]))
    rest = np.maximum(_jittered(rng, g, rows), 0.0)
    rest *= (flux5100 / np.maximum(_window_mean(g, rest, 5050.0, 5150.0), 1e-30))[:, None]
    return redshift_to(g, rest, z, loglam)


# ---- galaxies and stars -----------------------------------------------------------------------


def _jittered(rng: np.random.Generator, t: Template, rows: np.ndarray) -> np.ndarray:
    assert t.coeff is not None, f"template {t.name} has no archetypes"
    c = t.coeff[rows].astype(np.float64)
    c = c * (1.0 + rng.normal(0.0, ARCHETYPE_JITTER, c.shape))
    return c @ t.basis.astype(np.float64)


def galaxy_model(
    rng: np.random.Generator, loglam: np.ndarray, z: np.ndarray, rows: np.ndarray, sigma_inst_log: float
) -> np.ndarray:
    """Galaxy spectra (N, P): archetype ``rows`` of the galaxy template, jittered, at redshift z."""
    g = load_templates()["galaxy"]
    rest = np.maximum(_jittered(rng, g, rows), 0.0)
    return smooth(redshift_to(g, rest, z, loglam), sigma_inst_log)


def star_model(
    rng: np.random.Generator, loglam: np.ndarray, kind: np.ndarray, rows: np.ndarray, z: np.ndarray, sigma_inst_log: float
) -> np.ndarray:
    """Stellar spectra (N, P): archetype ``rows`` of each star's type template (CV: basis mix), Doppler-shifted by z."""
    t = load_templates()
    out = np.zeros((kind.shape[0], loglam.shape[0]))
    for k, name in STAR_TEMPLATE.items():
        idx = np.nonzero(kind == k)[0]
        if not idx.size:
            continue
        tpl = t[name]
        if tpl.coeff is None:
            u = unit_basis(name)
            rest = u[0][None, :] + rng.normal(0.0, 0.1, (idx.size, u.shape[0] - 1)) @ u[1:]
        else:
            rest = _jittered(rng, tpl, rows[idx] % tpl.coeff.shape[0])
        out[idx] = redshift_to(tpl, np.maximum(rest, 0.0), z[idx], loglam)
    return smooth(out, sigma_inst_log)


@lru_cache(maxsize=1)
def galaxy_archetype_lines() -> tuple[np.ndarray, np.ndarray]:
    """Rest equivalent widths (A, emission positive) of [O II] 3727 and H alpha of every galaxy archetype."""
    g = load_templates()["galaxy"]
    a = g.archetypes().astype(np.float64)
    w = g.wave
    dlnw = float(np.log(10.0) * (g.loglam[1] - g.loglam[0]))

    def ew(lo: float, hi: float, side: tuple[float, float, float, float]) -> np.ndarray:
        cont_sel = ((w > side[0]) & (w < side[1])) | ((w > side[2]) & (w < side[3]))
        c = np.maximum(np.median(a[:, cont_sel], axis=1), 1e-30)
        sel = (w > lo) & (w < hi)
        return (a[:, sel] - c[:, None]).sum(axis=1) * dlnw * 0.5 * (lo + hi) / c

    return ew(3718.0, 3740.0, (3680.0, 3710.0, 3750.0, 3780.0)), ew(6553.0, 6575.0, (6480.0, 6530.0, 6600.0, 6640.0))


def n_archetypes(name: str) -> int:
    """Number of archetype rows of a template (0 where it has none)."""
    c = load_templates()[name].coeff
    return 0 if c is None else int(c.shape[0])
