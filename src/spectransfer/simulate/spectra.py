"""The instruments of the simulated surveys and what they do to the light: pixel grid,
resolution, throughput, sky, noise, flux-calibration errors, bad pixels; plus photometry,
broad absorption troughs and star subclasses. The spectra themselves come from the real
templates (`templated`).

Everything is vectorised over a batch of spectra that share one observed-frame pixel grid:
arrays are (N, n_pix). Wavelengths are vacuum Angstrom throughout; fluxes are f_lambda in
1e-17 erg/(s cm2 A) before the instrument turns them into what it records.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from spectransfer.data.resample import BRIGHT_SKY_LINES
from spectransfer.surveys.lamost_image import ARM_JOIN

C_KMS = 299792.458
LN10 = np.log(10.0)

# Measured on real files by scripts/make_instrument_curves.py: the night sky (the median of
# the sky spectra real SDSS/BOSS files carry: [O I] 5577/6300/6364, Na D and the OH Meinel
# bands, at the wavelengths where real spectra carry their sky-subtraction residuals) and each
# survey's sensitivity (counts per unit flux, from the real files' own ivar).
CURVES_FILE = Path(__file__).with_name("instrument_curves.npz")
SENSITIVITY_FLOOR = 0.005  # of the median over the grid: BOSS below 3600 Å is ~0.01


@lru_cache(maxsize=1)
def instrument_curves() -> dict[str, np.ndarray]:
    """The measured curves on their lattice: ``wave`` (Å), ``continuum`` and ``lines`` of the
    night sky (relative to its 5000-5500 Å level), ``sdss_sensitivity``, ``lamost_sensitivity``
    (relative to their median over the network's grid)."""
    with np.load(CURVES_FILE) as data:
        out = {k: np.asarray(data[k], dtype=np.float64) for k in ("continuum", "lines", "sdss_sensitivity", "lamost_sensitivity")}
        out["wave"] = 10.0 ** (float(data["loglam0"]) + float(data["dloglam"]) * np.arange(out["lines"].size))
    return out


def night_sky() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(wavelength Å, continuum, lines) of the real night sky, relative to its 5000-5500 Å level."""
    c = instrument_curves()
    return c["wave"], c["continuum"], c["lines"]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


# ---- instruments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instrument:
    """A spectrograph: a log-linear pixel grid and what it does to the light.

    ``gain`` converts flux units into detected counts (so variance = counts + sky + read);
    ``calib_rms`` is the rms of the smooth multiplicative flux-calibration error;
    ``arm_join`` (A) and ``arm_rms`` describe a blue/red arm join with a relative scale error;
    the sensitivity and the sky are measured on real files (``instrument_curves``).
    The pixel defects seen in the real files (``../shared/data``, 17 LAMOST and 27 SDSS):
    ``zeroed_share`` is the share of spectra whose pipeline zeroed the inverse variance of
    low-signal pixels, unflagged, keeping their flux (LAMOST DR1-DR2, pipeline v2.6-2.7: in
    the 16 such real files no pixel with ivar > 0 has flux <= 0, and faint ones lose their
    whole blue end below 4000-4700 A that way; the readers give those pixels back, see
    ``surveys.lamost_image.restore_zeroed``): a pixel is zeroed where any of
    ``n_exposures`` exposures averaged into it was <= 0; ``fixed_gaps`` are wavelength ranges
    masked in a share of spectra (LAMOST DR1-DR3: 7580-7680 A in 9 of 17); ``long_gap`` is the share that loses a long
    stretch anywhere (1 of 17 LAMOST lost 5600-7540 A); ``red_nodata_px`` bounds the red
    pixels without data (LAMOST: 13-50 in 14 of 17 files; more would end the spectrum short of
    the grid's 8915 A, and such spectra are cut at ingest).
    """

    name: str
    loglam0: float
    n_pix: int
    resolution: float
    gain: float
    read_var: float
    sky_continuum: float
    calib_rms: float
    arm_join: float | None = None
    arm_rms: float = 0.0
    dloglam: float = 1e-4
    zeroed_share: float = 0.0
    n_exposures: int = 3
    fixed_gaps: tuple[tuple[float, float, float], ...] = ()
    long_gap: float = 0.01
    red_nodata_px: tuple[int, int] = (2, 30)

    @cached_property
    def loglam(self) -> np.ndarray:
        # Pixel centres on an exact lattice of dloglam (as both pipelines write COEFF0/COEFF1).
        return np.round(self.loglam0 + self.dloglam * np.arange(self.n_pix), 6)

    @cached_property
    def wave(self) -> np.ndarray:
        return 10.0**self.loglam

    @property
    def sigma_inst_log(self) -> float:
        """Instrumental Gaussian sigma in log10(lambda): FWHM = lambda / R."""
        return 1.0 / (self.resolution * 2.3548 * LN10)

    @cached_property
    def throughput(self) -> np.ndarray:
        """Relative sensitivity (counts per unit flux) on this instrument's pixels, as measured on
        the survey's real files (``instrument_curves``): BOSS loses a factor 4 from 5500 to 4000 Å
        to the atmosphere and the blue optics, LAMOST more; both red arms are the most sensitive."""
        c = instrument_curves()
        return np.maximum(np.interp(self.wave, c["wave"], c[f"{self.name}_sensitivity"]), SENSITIVITY_FLOOR)

    @cached_property
    def sky(self) -> tuple[np.ndarray, np.ndarray]:
        """(sky spectrum, its line part) in flux units per pixel, fixed for the instrument.

        The real sky (``night_sky``, observed at R ≈ 2000 like both instruments) on this
        instrument's pixels, scaled so that its continuum over 5000-5500 Å is ``sky_continuum``.
        """
        wave, cont, lines = night_sky()
        band = (wave >= 5000.0) & (wave < 5500.0)
        scale = self.sky_continuum / float(np.median(cont[band]))
        w = self.wave
        line_part = scale * np.interp(w, wave, lines)
        return scale * np.interp(w, wave, cont) + line_part, line_part


SDSS = Instrument(
    name="sdss",
    loglam0=3.5523,  # BOSS: 3565 A ...
    n_pix=4648,  # ... to 10399 A
    resolution=2000.0,
    gain=40.0,
    read_var=0.01,
    sky_continuum=1.2,
    # BOSS spectrophotometry: synthetic minus photometric colours scatter by ~5% (Dawson et
    # al. 2013, AJ 145, 10), more for quasar targets offset for 4000 A (Margala et al. 2016).
    calib_rms=0.04,
)

LAMOST = Instrument(
    name="lamost",
    loglam0=3.5682,  # LAMOST LRS: COEFF0 = 3.5682 (3700 A), 3909 pixels to 9100 A
    n_pix=3909,
    resolution=1800.0,
    gain=9.0,
    read_var=0.03,
    sky_continuum=1.6,
    calib_rms=0.07,
    arm_join=ARM_JOIN,  # blue arm 3700-5900 A, red arm 5700-9100 A
    arm_rms=0.06,
    zeroed_share=0.5,
    fixed_gaps=((7580.0, 7680.0, 0.5),),
    long_gap=0.05,
    red_nodata_px=(10, 60),
)

INSTRUMENTS = {"sdss": SDSS, "lamost": LAMOST}


# ---- magnitudes -------------------------------------------------------------------------------

# Box approximations of the SDSS ugriz bands (A) used for synthetic photometry.
BANDS = ((3600.0, 3950.0), (4050.0, 5450.0), (5600.0, 6850.0), (6950.0, 8250.0), (8350.0, 9200.0))
R_BAND_LAMBDA = 6166.0


def ab_flambda(mag: np.ndarray, lam: float = R_BAND_LAMBDA) -> np.ndarray:
    """f_lambda in 1e-17 erg/s/cm2/A of an AB magnitude at ``lam``: f_nu = 10^(-0.4(m+48.6))."""
    f_nu = 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) + 48.6))
    return f_nu * 2.99792458e18 / lam**2 / 1e-17


def synthetic_mags(wave: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """AB magnitudes (N, 5) in box ugriz bands from f_lambda (N, P) in 1e-17 units."""
    out = np.full((flux.shape[0], 5), 99.0)
    for k, (lo, hi) in enumerate(BANDS):
        sel = (wave >= lo) & (wave <= hi)
        if sel.sum() < 5:
            continue
        lam = 0.5 * (lo + hi)
        f = np.mean(flux[:, sel], axis=1) * 1e-17
        f_nu = f * lam**2 / 2.99792458e18
        with np.errstate(divide="ignore", invalid="ignore"):
            m = -2.5 * np.log10(np.maximum(f_nu, 1e-40)) - 48.6
        out[:, k] = np.minimum(m, 30.0)
    return out


def normalise_to_mag(wave: np.ndarray, flux: np.ndarray, mag_r: np.ndarray) -> np.ndarray:
    """Scale each spectrum so that its mean f_lambda in the r box equals that of ``mag_r``."""
    lo, hi = BANDS[2]
    sel = (wave >= lo) & (wave <= hi)
    mean = np.mean(flux[:, sel], axis=1)
    scale = ab_flambda(mag_r) / np.maximum(mean, 1e-30)
    return flux * scale[:, None]


# ---- dust ------------------------------------------------------------------------------------


def ccm_a_over_av(wave: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """A_lambda / A_V of Milky Way dust, Cardelli, Clayton & Mathis (1989, ApJ 345, 245) eqs. 2-3
    (infrared, x < 1.1 um^-1) and 3a-b (optical/near-IR, 1.1 <= x <= 3.3), x = 1 / lambda[um]."""
    x = 1e4 / np.asarray(wave, dtype=np.float64)
    out = np.empty_like(x)
    ir = x < 1.1
    out[ir] = (0.574 - 0.527 / r_v) * x[ir] ** 1.61
    y = np.clip(x[~ir], 1.1, 3.3) - 1.82
    a = 1 + 0.17699 * y - 0.50447 * y**2 - 0.02427 * y**3 + 0.72085 * y**4 + 0.01979 * y**5 - 0.77530 * y**6 + 0.32999 * y**7
    b = 1.41338 * y + 2.28305 * y**2 + 1.07233 * y**3 - 5.38434 * y**4 - 0.62251 * y**5 + 5.30260 * y**6 - 2.09002 * y**7
    out[~ir] = a + b / r_v
    return out


def galactic_extinction(wave: np.ndarray, ebv: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """Transmission (N, P) through Milky Way dust of colour excess ``ebv`` (N,), A_V = R_V E(B-V)."""
    return 10.0 ** (-0.4 * r_v * ebv[:, None] * ccm_a_over_av(wave, r_v)[None, :])


# ---- quasars ----------------------------------------------------------------------------------


def bal_absorption(rng: np.random.Generator, rest: np.ndarray, is_bal: np.ndarray) -> np.ndarray:
    """Fractional absorption (N, P) of broad absorption line troughs at rest wavelengths ``rest``.

    C IV, Si IV, N V (and Mg II for the ~12% LoBALs), outflow velocities a few thousand to
    25000 km/s, depths 0.35-0.9; zero for the rows where ``is_bal`` is False."""
    absorb_all = np.zeros_like(rest)
    if np.any(is_bal):
        idx = np.nonzero(is_bal)[0]
        k = idx.shape[0]
        vmin = rng.uniform(1500.0, 9000.0, k)
        dv = rng.uniform(2000.0, 14000.0, k)
        depth = rng.uniform(0.35, 0.9, k)
        lobal = rng.random(k) < 0.12
        r = rest[idx]
        absorb = np.zeros_like(r)
        for lam0, weight, only_lo in ((1549.06, 1.0, False), (1396.76, 0.7, False), (1240.14, 0.8, False), (2798.75, 0.8, True)):
            lo = lam0 * (1.0 - (vmin + dv) / C_KMS)
            hi = lam0 * (1.0 - vmin / C_KMS)
            edge = 6.0
            prof = _smoothstep((r - lo[:, None]) / edge) * _smoothstep((hi[:, None] - r) / edge)
            w = weight * (lobal if only_lo else np.ones(k, dtype=bool))
            absorb = np.maximum(absorb, (depth * w)[:, None] * prof)
        absorb_all[idx] = absorb
    return absorb_all


# ---- stars ------------------------------------------------------------------------------------

# Spectral types with effective-temperature ranges (K).
STAR_TYPES: tuple[tuple[str, float, float], ...] = (
    ("O", 30000.0, 45000.0),
    ("B", 10500.0, 30000.0),
    ("A", 7500.0, 10500.0),
    ("F", 6000.0, 7500.0),
    ("G", 5200.0, 6000.0),
    ("K", 3900.0, 5200.0),
    ("M", 2500.0, 3900.0),
    ("WD", 7000.0, 35000.0),
)


def star_subclass(kind: str, temp: float) -> str:
    """A spectral subtype string like 'F5' or 'M2' from the type and temperature."""
    if kind in ("WD", "CV"):
        return kind
    for name, lo, hi in STAR_TYPES:
        if name == kind:
            sub = int(np.clip(9.99 * (hi - temp) / (hi - lo), 0, 9))
            return f"{name}{sub}"
    return kind


# ---- observing --------------------------------------------------------------------------------


@dataclass
class Observation:
    """What an instrument records for a batch: arrays (N, n_pix) on ``inst.wave``."""

    flux: np.ndarray
    ivar: np.ndarray
    and_mask: np.ndarray
    or_mask: np.ndarray
    sky: np.ndarray
    model: np.ndarray  # the noiseless model as observed (calibration included)
    snr_true: np.ndarray  # median model / sigma over good pixels
    snr_median: np.ndarray  # median flux * sqrt(ivar) over good pixels (what a pipeline reports)
    sn_bands: np.ndarray  # (N, 5) median S/N in the ugriz boxes
    first: np.ndarray  # index of the first pixel written to the file
    last: np.ndarray  # index one past the last pixel written


# SDSS spPlate/spec mask bits (idlspec2d sdssMaskbits.par) used here.
SDSS_FULLREJECT = 1 << 18
SDSS_NODATA = 1 << 24
SDSS_BRIGHTSKY = 1 << 23
SDSS_COMBINEREJ = 1 << 25
SDSS_BADSKYCHI = 1 << 27
# LAMOST pixel mask bits (LAMOST DR5 data model: 1 BADCCD, 2 BADPROFILE, 3 NOSKY,
# 4 BRIGHTSKY, 5 BADCENTER, 6 NODATA -> bit values 1, 2, 4, 8, 16, 32).
LAMOST_BADCCD = 1
LAMOST_BRIGHTSKY = 8
LAMOST_NODATA = 32


def observe(
    rng: np.random.Generator, inst: Instrument, model: np.ndarray, exposure: np.ndarray, light: np.ndarray | None = None
) -> Observation:
    """Pass noiseless f_lambda spectra (N, P) through ``inst``.

    Steps: smooth multiplicative calibration error (Legendre terms up to order 3, plus a
    relative scale error of the red arm at the arm join); per-pixel Gaussian noise whose
    variance is (source + sky) / (gain * throughput * exposure) + read noise; sky-subtraction
    residuals at the sky lines (scale error and a small wavelength shift, giving the typical
    P-Cygni-like residuals); rejected pixel runs and, for some spectra, a long bad stretch;
    and the blue/red ends with no data. ``light`` (default 1) is the share of the source's
    light the fibre catches relative to the spectra the sensitivity was measured on: the
    counts of the source scale by it, the flux calibration divides it out again, so the
    spectrum keeps its flux and its noise grows (see ``plan.LAMOST_LIGHT``).
    """
    n, p = model.shape
    wave = inst.wave
    x = np.linspace(-1.0, 1.0, p)
    legendre = np.stack([x, 0.5 * (3 * x**2 - 1), 0.5 * (5 * x**3 - 3 * x)], axis=0)
    coef = rng.normal(0.0, inst.calib_rms, (n, 3))
    calib = 1.0 + coef @ legendre
    if inst.arm_join is not None:
        join = inst.arm_join + rng.normal(0.0, 25.0, (n, 1))
        red_scale = 1.0 + rng.normal(0.0, inst.arm_rms, (n, 1))
        calib = calib * (1.0 + (red_scale - 1.0) * _smoothstep((wave[None, :] - join) / 12.0))
    calib = np.clip(calib, 0.3, 3.0)
    observed = model * calib

    sky, sky_lines = inst.sky
    sky_scale = rng.lognormal(0.0, 0.25, (n, 1))
    sky_n = sky[None, :] * sky_scale
    inv_gain = (1.0 / (inst.gain * inst.throughput))[None, :]
    inv_exp = (1.0 / exposure)[:, None]
    share = np.ones((n, 1)) if light is None else np.asarray(light, dtype=np.float64)[:, None]
    # counts of the source: observed * share; calibrated back to flux: divided by share
    var = ((np.maximum(observed, 0.0) * share + sky_n) * inv_gain * inv_exp + inst.read_var * inv_exp) / share**2
    sigma = np.sqrt(var)
    flux = rng.standard_normal((n, p)) * sigma
    flux += observed
    # Sky-subtraction residuals: scale error + a sub-pixel wavelength shift of the sky model.
    # Each line has its own error on top of the spectrum's (a fibre's sky model is fitted,
    # not exact, line by line); heavy-tailed, as the [O I] 5577 residuals of the real SDSS
    # spectra reach many sigma and often set the min-max range.
    eps = rng.normal(0.0, 0.02, (n, 1)) + rng.standard_t(3, (n, 1)) * 0.02
    dshift = rng.normal(0.0, 0.06, (n, 1))  # in pixels
    # The brightest lines (data.resample's BRIGHT_SKY_LINES: [O I] 5577, Na D, [O I] 6300/6364;
    # Osterbrock et al. 1996, PASP 108, 277) each have their own residual error on top.
    line_eps = rng.normal(0.0, 0.03, (n, len(BRIGHT_SKY_LINES)))
    dsky = np.gradient(sky_lines)
    flux += sky_scale / share * (eps * sky_lines[None, :] + dshift * dsky[None, :])  # sky counts, calibrated
    sig_l = wave / (inst.resolution * 2.3548)
    for k, lam in enumerate(BRIGHT_SKY_LINES):
        near = np.abs(wave - lam) < 5 * sig_l
        flux[:, near] += sky_scale / share * line_eps[:, k : k + 1] * sky_lines[None, near]
    ivar = 1.0 / var

    sky_bit = SDSS_BRIGHTSKY if inst.name == "sdss" else LAMOST_BRIGHTSKY
    and_mask = np.zeros((n, p), dtype=np.int32)
    or_mask = (sky_lines[None, :] * sky_scale > 3.0 * inst.sky_continuum).astype(np.int32) * np.int32(sky_bit)

    # Rejected pixels: a few short runs per spectrum (cosmic rays, bad columns).
    bad = np.zeros((n, p), dtype=bool)
    n_runs = rng.poisson(3.0, n)
    total = int(n_runs.sum())
    rows = np.repeat(np.arange(n), n_runs)
    starts = rng.integers(0, p, total)
    lengths = rng.integers(1, 7, total)
    for r, s, ln in zip(rows, starts, lengths):
        bad[r, s : s + ln] = True
    # Some spectra lose a long stretch (a bad CCD column range, a broken amplifier, an arm).
    long_bad = rng.random(n) < inst.long_gap
    for r in np.nonzero(long_bad)[0]:
        s = int(rng.integers(0, p - 400))
        bad[r, s : s + int(rng.integers(50, 1300))] = True
    for lo, hi, share in inst.fixed_gaps:
        in_gap = (wave >= lo) & (wave <= hi)
        bad[np.ix_(rng.random(n) < share, in_gap)] = True
    rej_bit = np.int32(SDSS_FULLREJECT if inst.name == "sdss" else LAMOST_BADCCD)
    and_mask |= bad * rej_bit
    or_mask |= bad * rej_bit
    ivar[bad] = 0.0
    if inst.zeroed_share > 0:
        _zero_low_signal(rng, inst, flux, ivar, sigma, rng.random(n) < inst.zeroed_share)

    # The ends: SDSS spectra start and stop a few pixels apart (per fibre); LAMOST writes the
    # full grid with zero flux and ivar where the red end has no data.
    if inst.name == "sdss":
        first = rng.integers(0, 45, n)
        last = p - rng.integers(0, 70, n)
        nodata_blue = rng.integers(0, 6, n)
        nodata_red = rng.integers(0, 12, n)
        col = np.arange(p)[None, :]
        edge = (col < (first + nodata_blue)[:, None]) | (col >= (last - nodata_red)[:, None])
        and_mask |= edge * np.int32(SDSS_NODATA)
        or_mask |= edge * np.int32(SDSS_NODATA)
        ivar[edge] = 0.0
        flux[edge] = 0.0
    else:
        first = np.zeros(n, dtype=np.int64)
        last = np.full(n, p, dtype=np.int64)
        nodata_red = rng.integers(inst.red_nodata_px[0], inst.red_nodata_px[1], n)
        col = np.arange(p)[None, :]
        edge = col >= (p - nodata_red)[:, None]
        and_mask |= edge * np.int32(LAMOST_NODATA)
        or_mask |= edge * np.int32(LAMOST_NODATA)
        ivar[edge] = 0.0
        flux[edge | bad] = 0.0

    good = ivar > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        snr_true = _masked_median(observed / sigma, good)
        snr_med = _masked_median(flux * np.sqrt(ivar), good)
        sn_bands = np.zeros((n, 5))
        for k, (lo, hi) in enumerate(BANDS):
            sel = (wave >= lo) & (wave <= hi)
            if sel.sum() > 5:
                sn_bands[:, k] = _masked_median((flux * np.sqrt(ivar))[:, sel], good[:, sel])
    return Observation(
        flux=flux,
        ivar=ivar,
        and_mask=and_mask,
        or_mask=or_mask,
        sky=np.broadcast_to(sky_n, (n, p)),
        model=observed,
        snr_true=snr_true,
        snr_median=snr_med,
        sn_bands=sn_bands,
        first=first,
        last=last,
    )


def _zero_low_signal(
    rng: np.random.Generator, inst: Instrument, flux: np.ndarray, ivar: np.ndarray, sigma: np.ndarray, rows: np.ndarray
) -> None:
    """Zero, in place and without a flag, the ivar of ``rows``' pixels where any of the
    instrument's ``n_exposures`` equal exposures averaged into the pixel was <= 0: each
    exposure is the coadd plus a zero-mean deviation (exposure noise sigma * sqrt(k), less
    the k exposures' mean, which the coadd already holds)."""
    idx = np.flatnonzero(rows)
    if not idx.size:
        return
    k = inst.n_exposures
    f, s = flux[idx], sigma[idx] * np.sqrt(k)
    lowest = np.full(f.shape, np.inf)
    total = np.zeros(f.shape)
    for _ in range(k):
        d = rng.standard_normal(f.shape) * s
        lowest = np.minimum(lowest, d)
        total += d
    zero = f + lowest - total / k <= 0.0
    sub = ivar[idx]
    sub[zero] = 0.0
    ivar[idx] = sub


def _masked_median(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Row-wise median of ``values`` where ``good`` (0 where a row has no good pixel).

    Sorting once with the bad pixels pushed to +inf is much faster than nanmedian, which
    falls back to a Python loop over rows."""
    v = np.where(good, values, np.inf).astype(np.float32)
    v.sort(axis=1)
    k = good.sum(axis=1)
    rows = np.arange(v.shape[0])
    lo = np.clip((k - 1) // 2, 0, v.shape[1] - 1)
    hi = np.clip(k // 2, 0, v.shape[1] - 1)
    med = 0.5 * (v[rows, lo] + v[rows, hi])
    return np.where(k > 0, med.astype(np.float64), 0.0)
