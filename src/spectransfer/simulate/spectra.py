"""The physics of the simulated surveys: rest-frame spectra of quasars, stars and galaxies,
and the two instruments that observe them (pixel grid, resolution, throughput, sky, noise,
calibration errors, bad pixels).

Everything is vectorised over a batch of spectra that share one observed-frame pixel grid:
arrays are (N, n_pix). Wavelengths are vacuum Angstrom throughout; fluxes are f_lambda in
1e-17 erg/(s cm2 A) before the instrument turns them into what it records.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

C_KMS = 299792.458
LN10 = np.log(10.0)
SQRT2PI = np.sqrt(2.0 * np.pi)
HC_OVER_K = 1.4387769e8  # h c / k in Angstrom K (Planck's law)

# ---- rest wavelengths (vacuum, Angstrom) -----------------------------------------------------
# Quasar broad and narrow lines with rest equivalent widths (A) and FWHM (km/s) close to the
# SDSS composite quasar spectrum of Vanden Berk et al. (2001, AJ 122, 549, Table 2); widths
# and strengths are varied per object around these values.
QSO_LINES: tuple[tuple[str, float, float, float], ...] = (
    # name, lambda_rest, EW_rest, FWHM
    ("Lya", 1215.67, 90.0, 4500.0),
    ("NV", 1240.14, 12.0, 4500.0),
    ("SiIV+OIV]", 1399.8, 8.0, 5500.0),
    ("CIV", 1549.06, 30.0, 5000.0),
    ("HeII", 1640.42, 3.0, 5000.0),
    ("CIII]", 1908.73, 20.0, 5500.0),
    ("MgII", 2798.75, 32.0, 4500.0),
    ("[NeV]", 3426.84, 1.2, 800.0),
    ("[OII]", 3728.48, 1.5, 600.0),
    ("[NeIII]", 3869.85, 1.5, 700.0),
    ("Hd", 4102.89, 5.0, 3500.0),
    ("Hg", 4341.68, 12.0, 3500.0),
    ("Hb", 4862.68, 45.0, 4000.0),
    ("[OIII]4959", 4960.30, 5.0, 500.0),
    ("[OIII]5007", 5008.24, 15.0, 500.0),
    ("HeI", 5877.29, 5.0, 4000.0),
    ("Ha", 6564.61, 190.0, 3500.0),
)
LYA = 1215.67
LYB = 1025.72
LYMAN_LIMIT = 911.75

# Stellar absorption features (vacuum wavelengths).
BALMER = (6564.61, 4862.68, 4341.68, 4102.89, 3971.20, 3890.16, 3836.47)  # H alpha .. H9
BALMER_JUMP = 3646.0
CA_K, CA_H = 3934.78, 3969.59  # Ca II K and H
CA_I = 4227.92  # Ca I resonance line (strong in K/M dwarfs)
G_BAND = 4305.0  # CH G band
MG_B = (5168.76, 5174.13, 5185.05)  # Mg I b triplet
NA_D = (5891.58, 5897.56)  # Na I D doublet
HE_I = (4027.33, 4472.73, 5877.29)  # He I (B stars)
HE_II = 4687.02  # He II (O stars)
# TiO band heads of M stars (the bands degrade to the red); the 7054 and 7589 A heads are
# the strongest in low-resolution spectra (e.g. Kirkpatrick et al. 1991, ApJS 77, 417).
TIO_HEADS = ((4955.0, 0.25), (5167.0, 0.35), (5448.0, 0.35), (5847.0, 0.3), (6159.0, 0.5), (6651.0, 0.4), (7054.0, 1.0), (7589.0, 0.8), (8432.0, 0.4))

# Galaxy narrow emission lines (vacuum) with ratios to H beta typical of star-forming galaxies.
GAL_EMISSION: tuple[tuple[str, float, float], ...] = (
    ("[OII]3726", 3727.09, 1.2),
    ("[OII]3729", 3729.88, 1.6),
    ("[NeIII]", 3869.85, 0.15),
    ("Hd", 4102.89, 0.26),
    ("Hg", 4341.68, 0.47),
    ("Hb", 4862.68, 1.0),
    ("[OIII]4959", 4960.30, 0.33),  # [O III] 4959/5007 = 1/3 (atomic physics)
    ("[OIII]5007", 5008.24, 1.0),
    ("[NII]6548", 6549.86, 0.33),  # [N II] 6548/6583 = 1/3
    ("Ha", 6564.61, 2.86),  # Case B recombination H alpha / H beta = 2.86 (Osterbrock)
    ("[NII]6583", 6585.27, 1.0),
    ("[SII]6716", 6718.29, 0.45),
    ("[SII]6731", 6732.67, 0.35),
)
D4000_BREAK = 4000.0  # the 4000 A break (Bruzual 1983): Ca II H&K + metal-line blanketing

# Night-sky emission lines (vacuum): [O I] 5577, Na D, [O I] 6300/6364 and the OH Meinel
# bands that crowd the red end (Osterbrock et al. 1996, PASP 108, 277).
SKY_LINES = ((5578.89, 60.0), (5891.5, 15.0), (5897.5, 10.0), (6302.05, 25.0), (6365.54, 8.0))


def lya_tau_eff(z_abs: np.ndarray) -> np.ndarray:
    """Effective Lyman-alpha forest optical depth, tau_eff = 0.0018 (1+z)^3.92
    (Faucher-Giguere et al. 2008, ApJ 681, 831)."""
    return 0.0018 * (1.0 + z_abs) ** 3.92


def planck(wave: np.ndarray, temp: np.ndarray) -> np.ndarray:
    """B_lambda(T) up to a constant, for wave (..., P) and temp (N, 1)."""
    x = np.minimum(HC_OVER_K / (wave * temp), 80.0)
    return (wave / 5500.0) ** -5 / np.expm1(x)


def _gauss_sum(logw: np.ndarray, centers: np.ndarray, sig_log: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Sum of Gaussians in log10(lambda): logw (P,), centres/sigmas/amps (N, L) -> (N, P).

    ``amp`` is the integral of each line in units of (flux * log10 lambda)."""
    n, p = centers.shape[0], logw.shape[0]
    out = np.zeros((n, p), dtype=np.float64)
    flat = out.reshape(-1)
    # The grid is uniform in log10(lambda): evaluate each line only within +-6 sigma of its
    # centre pixel, which is what makes a batch of thousands of spectra cheap.
    step = (logw[-1] - logw[0]) / (p - 1)
    rows = (np.arange(n) * p)[:, None]
    for j in range(centers.shape[1]):
        c = centers[:, j]
        s = sig_log[:, j]
        a = amp[:, j] / (s * SQRT2PI)
        half = int(np.ceil(6.0 * np.max(s) / step)) + 1
        if 2 * half + 1 >= p:
            d = (logw[None, :] - c[:, None]) / s[:, None]
            out += a[:, None] * np.exp(-0.5 * d * d)
            continue
        centre_pix = np.rint((c - logw[0]) / step).astype(np.int64)
        idx = centre_pix[:, None] + np.arange(-half, half + 1)[None, :]
        ok = (idx >= 0) & (idx < p)
        if not ok.any():
            continue
        d = (logw[np.clip(idx, 0, p - 1)] - c[:, None]) / s[:, None]
        val = a[:, None] * np.exp(-0.5 * d * d)
        flat[(rows + idx)[ok]] += val[ok]
    return out


def _smoothstep(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


# ---- instruments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instrument:
    """A spectrograph: a log-linear pixel grid and what it does to the light.

    ``gain`` converts flux units into detected counts (so variance = counts + sky + read);
    ``calib_rms`` is the rms of the smooth multiplicative flux-calibration error;
    ``arm_join`` (A) and ``arm_rms`` describe a blue/red arm join with a relative scale error.
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

    @cached_property
    def loglam(self) -> np.ndarray:
        # Pixel centres on an exact lattice of dloglam (as both pipelines write COEFF0/COEFF1).
        return np.round(self.loglam0 + self.dloglam * np.arange(self.n_pix), 6)

    @cached_property
    def wave(self) -> np.ndarray:
        return 10.0 ** self.loglam

    @property
    def sigma_inst_log(self) -> float:
        """Instrumental Gaussian sigma in log10(lambda): FWHM = lambda / R."""
        return 1.0 / (self.resolution * 2.3548 * LN10)

    @cached_property
    def throughput(self) -> np.ndarray:
        """Relative system throughput: falls at both ends, dips at a dichroic if there is one."""
        w = self.wave
        t = _smoothstep((w - 3900.0) / 120.0) * _smoothstep((9700.0 - w) / 250.0)
        t = 0.15 + 0.85 * t
        if self.arm_join is not None:
            t = t * (1.0 - 0.55 * np.exp(-0.5 * ((w - (self.arm_join - 80.0)) / 70.0) ** 2))
        return t

    @cached_property
    def sky(self) -> tuple[np.ndarray, np.ndarray]:
        """(sky spectrum, its line part) in flux units per pixel, fixed for the instrument."""
        w = self.wave
        cont = self.sky_continuum * (0.6 + 0.4 * (w / 5500.0)) * (1.0 + 0.5 * _smoothstep((w - 7000.0) / 300.0))
        lines = np.zeros_like(w)
        sig = w / (self.resolution * 2.3548)
        for lam, strength in SKY_LINES:
            lines += strength * self.sky_continuum * np.exp(-0.5 * ((w - lam) / sig) ** 2)
        # OH forest: a fixed pseudo-random set of lines whose density and strength grow to
        # the red, mimicking the Meinel bands beyond 6800 A (same lines in every run).
        rng = np.random.default_rng(20010521)
        n_oh = 160
        lam_oh = np.sort(6800.0 + 3600.0 * rng.beta(1.3, 1.0, n_oh))
        amp_oh = rng.lognormal(np.log(8.0), 0.8, n_oh) * (1.0 + (lam_oh - 6800.0) / 1800.0)
        for lam, a in zip(lam_oh, amp_oh):
            lines += a * self.sky_continuum * np.exp(-0.5 * ((w - lam) / sig) ** 2)
        return cont + lines, lines


SDSS = Instrument(
    name="sdss",
    loglam0=3.5523,  # BOSS: 3565 A ...
    n_pix=4648,  # ... to 10399 A
    resolution=2000.0,
    gain=40.0,
    read_var=0.01,
    sky_continuum=1.2,
    calib_rms=0.02,
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
    arm_join=5900.0,  # blue arm 3700-5900 A, red arm 5700-9100 A
    arm_rms=0.06,
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


# ---- quasars ----------------------------------------------------------------------------------


def quasar_model(rng: np.random.Generator, loglam: np.ndarray, z: np.ndarray, is_bal: np.ndarray, sigma_inst_log: float) -> np.ndarray:
    """Noiseless quasar spectra (N, P), arbitrary units, on the observed grid ``loglam``.

    Power-law continuum f_nu ~ nu^alpha_nu with alpha_nu ~ N(-0.44, 0.3) (Vanden Berk et al.
    2001), a small blue bump (Balmer continuum + Fe II, 2200-4000 A), the broad and narrow
    lines of ``QSO_LINES`` with per-object strengths and widths, the Lyman-alpha forest
    blueward of Lya (tau_eff from Faucher-Giguere et al. 2008; Lyb forest below 1026 A; a
    Lyman limit at 912 A), and broad absorption troughs for BAL quasars.
    """
    n = z.shape[0]
    wave = 10.0**loglam
    zp1 = (1.0 + z)[:, None]
    rest = wave[None, :] / zp1
    alpha_nu = rng.normal(-0.44, 0.3, n)
    cont = (rest / 3000.0) ** (-2.0 - alpha_nu)[:, None]
    # Small blue bump: Balmer continuum and blended Fe II emission.
    bump = rng.uniform(0.05, 0.3, n)[:, None]
    cont = cont * (1.0 + bump * np.exp(-0.5 * ((rest - 2950.0) / 420.0) ** 2))
    # Optical Fe II shelves either side of H beta.
    fe2 = rng.uniform(0.0, 0.12, n)[:, None]
    cont = cont * (1.0 + fe2 * (np.exp(-0.5 * ((rest - 4570.0) / 110.0) ** 2) + np.exp(-0.5 * ((rest - 5250.0) / 130.0) ** 2)))

    lam = np.array([l[1] for l in QSO_LINES])
    ew0 = np.array([l[2] for l in QSO_LINES])
    fwhm0 = np.array([l[3] for l in QSO_LINES])
    narrow = fwhm0 < 1000.0
    n_lines = lam.shape[0]
    ew = ew0[None, :] * rng.lognormal(0.0, 0.35, (n, n_lines)) * rng.lognormal(0.0, 0.25, (n, 1))
    width_factor = rng.lognormal(0.0, 0.3, (n, 1))
    fwhm = np.where(narrow[None, :], fwhm0[None, :] * rng.lognormal(0.0, 0.2, (n, 1)), fwhm0[None, :] * width_factor)
    sig_log = np.sqrt((fwhm / 2.3548 / C_KMS / LN10) ** 2 + sigma_inst_log**2)
    centers = np.log10(lam)[None, :] + np.log10(1.0 + z)[:, None]
    # Continuum at each line (rest frame power law with the bump), then flux = EW * continuum.
    lam_b = np.broadcast_to(lam[None, :], (n, n_lines))
    cont_line = (lam_b / 3000.0) ** (-2.0 - alpha_nu)[:, None]
    cont_line = cont_line * (1.0 + bump * np.exp(-0.5 * ((lam_b - 2950.0) / 420.0) ** 2))
    # Line integral in observed flux * log10(lambda): EW_obs / (lambda_obs ln10) = EW_rest / (lambda_rest ln10).
    amp = ew * cont_line / (lam_b * LN10)
    flux = cont + _gauss_sum(loglam, centers, sig_log, amp)

    # Lyman-alpha forest. With tau = tau' g and g ~ Exp(1), <exp(-tau)> = 1 / (1 + tau'), so
    # tau' = exp(tau_eff) - 1 reproduces the mean transmission exp(-tau_eff) exactly.
    in_forest = rest < LYA
    if np.any(in_forest):
        z_abs = wave[None, :] / LYA - 1.0
        tau_a = np.expm1(lya_tau_eff(z_abs))
        z_b = wave[None, :] / LYB - 1.0
        tau_b = np.where(rest < LYB, np.expm1(0.16 * lya_tau_eff(z_b)), 0.0)
        g = rng.exponential(1.0, (n, wave.shape[0]))
        trans = np.exp(-(tau_a + tau_b) * g)
        # Lines are resolved over ~2 pixels: a 3-tap average keeps the mean transmission.
        trans[:, 1:-1] = (trans[:, :-2] + 2.0 * trans[:, 1:-1] + trans[:, 2:]) / 4.0
        trans = np.where(in_forest, trans, 1.0)
        trans = np.where(rest < LYMAN_LIMIT, trans * 0.02, trans)
        flux = flux * trans

    if np.any(is_bal):
        flux = flux * (1.0 - bal_absorption(rng, rest, is_bal))
    return flux


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


def star_model(rng: np.random.Generator, loglam: np.ndarray, temp: np.ndarray, is_wd: np.ndarray, rv_kms: np.ndarray, sigma_inst_log: float) -> np.ndarray:
    """Noiseless stellar spectra (N, P): a Planck continuum at ``temp`` with the absorption
    features each type shows (Balmer lines peaking in A stars, very broad in DA white dwarfs;
    the Balmer jump; He I/He II in O/B; Ca II H&K, the G band, Mg b and Na D growing to
    cooler types; TiO bands in M stars; weak metal-line blanketing in F-M)."""
    n = temp.shape[0]
    wave = 10.0**loglam
    t = temp[:, None]
    cont = planck(wave[None, :], t)
    shift = np.log10(1.0 + rv_kms / C_KMS)[:, None]
    rest = wave[None, :] / (1.0 + rv_kms / C_KMS)[:, None]

    lines_c: list[np.ndarray] = []
    lines_s: list[np.ndarray] = []  # sigma in A (intrinsic)
    lines_d: list[np.ndarray] = []  # equivalent width (A) of each line
    balmer_strength = np.exp(-0.5 * ((np.log10(temp) - np.log10(9500.0)) / 0.12) ** 2)
    balmer_strength = np.where(is_wd, rng.uniform(0.6, 1.0, n), balmer_strength)
    for k, lam in enumerate(BALMER):
        ew = (14.0 - 1.3 * k) * balmer_strength + 0.3
        ew = np.where(is_wd, (40.0 - 4.0 * k) * balmer_strength, ew)
        sig = np.where(is_wd, rng.uniform(15.0, 30.0, n), 3.0 + 6.0 * balmer_strength)
        lines_c.append(np.full(n, lam))
        lines_s.append(sig)
        lines_d.append(ew)
    cool = _smoothstep((6800.0 - temp) / 500.0) * ~is_wd
    cooler = _smoothstep((5600.0 - temp) / 450.0) * ~is_wd
    hot = _smoothstep((temp - 12000.0) / 2000.0) * ~is_wd
    hotter = _smoothstep((temp - 28000.0) / 2000.0) * ~is_wd
    metal: list[tuple[float, float, np.ndarray]] = [  # (lambda, sigma A, EW A)
        (CA_K, 5.0, 12.0 * cool + 0.2 * ~is_wd),
        (CA_H, 5.0, 9.0 * cool + 0.2 * ~is_wd),
        (G_BAND, 9.0, 6.0 * cool * _smoothstep((temp - 3800.0) / 300.0)),
        (CA_I, 3.0, 4.0 * cooler),
        *[(lam, 2.5, 2.2 * cooler + 0.3 * cool) for lam in MG_B],
        *[(lam, 2.5, 2.5 * cooler + 0.2 * cool) for lam in NA_D],
        *[(lam, 3.0, 1.2 * hot) for lam in HE_I],
        (HE_II, 3.0, 1.0 * hotter),
    ]
    for lam, sig, ew in metal:
        lines_c.append(np.full(n, lam))
        lines_s.append(np.full(n, sig))
        lines_d.append(ew)

    centers = np.log10(np.stack(lines_c, axis=1)) + shift
    sig_a = np.stack(lines_s, axis=1)
    ew = np.stack(lines_d, axis=1) * rng.lognormal(0.0, 0.15, (n, 1))
    lam_l = np.stack(lines_c, axis=1)
    sig_log = np.sqrt((sig_a / (lam_l * LN10)) ** 2 + sigma_inst_log**2)
    # Optical depth profile with integral EW (small-EW limit) -> exp(-tau) keeps flux >= 0.
    tau = _gauss_sum(loglam, centers, sig_log, ew / (lam_l * LN10))
    flux = cont * np.exp(-tau)

    # Balmer jump below 3646 A, strongest in A/B stars.
    jump = 0.45 * balmer_strength * ~is_wd
    flux = flux * (1.0 - jump[:, None] * _smoothstep((BALMER_JUMP - rest) / 15.0))
    # TiO bands: sharp heads that recover slowly to the red.
    tio = np.clip((3950.0 - temp) / 1300.0, 0.0, 1.0) * ~is_wd
    m_rows = np.nonzero(tio > 0)[0]
    if m_rows.size:
        r = rest[m_rows]
        band = np.zeros_like(r)
        for head, strength in TIO_HEADS:
            x = r - head
            band += strength * (x >= 0.0) * np.exp(-np.maximum(x, 0.0) / 180.0)
        flux[m_rows] *= np.exp(-1.2 * tio[m_rows, None] * band)
    # Metal-line blanketing (many weak lines, stronger to the blue and in cooler stars).
    blanket = 0.25 * cool[:, None] * _smoothstep((4500.0 - rest) / 300.0)
    flux = flux * (1.0 - blanket * _blanket_pattern(loglam)[None, :])
    return flux


_BLANKET_CACHE: dict[tuple[float, int], np.ndarray] = {}


def _blanket_pattern(loglam: np.ndarray) -> np.ndarray:
    """A fixed, deterministic forest of weak absorption lines in [0, 1] on this grid."""
    key = (float(loglam[0]), int(loglam.shape[0]))
    if key not in _BLANKET_CACHE:
        rng = np.random.default_rng(1983)
        base = rng.random(loglam.shape[0])
        kern = np.array([1.0, 2.0, 3.0, 2.0, 1.0])
        pat = np.convolve(base, kern / kern.sum(), mode="same")
        pat = (pat - pat.min()) / (pat.max() - pat.min())
        _BLANKET_CACHE[key] = pat
    return _BLANKET_CACHE[key]


# ---- galaxies ---------------------------------------------------------------------------------


def galaxy_model(
    rng: np.random.Generator, loglam: np.ndarray, z: np.ndarray, sf: np.ndarray, sigma_inst_log: float
) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless galaxy spectra (N, P) and their H-alpha equivalent widths (N,).

    Old populations: a cool (4000-5000 K) continuum with a 4000 A break of strength
    D4000 = 1.5-2.2, Ca II H&K, G band, Mg b and Na D in absorption and weak lines.
    Star-forming: a bluer continuum, a small break (D4000 = 1.05-1.4), Balmer absorption and
    the narrow emission lines of ``GAL_EMISSION`` with varied [O III]/H beta and [N II]/H alpha,
    reddened by a Balmer decrement > 2.86. Velocity dispersions 60-300 km/s.
    """
    n = z.shape[0]
    wave = 10.0**loglam
    zp1 = (1.0 + z)[:, None]
    rest = wave[None, :] / zp1
    t_eff = np.where(sf, rng.uniform(6500.0, 11000.0, n), rng.uniform(4200.0, 5200.0, n))
    cont = planck(rest, t_eff[:, None])
    d4000 = np.where(sf, rng.uniform(1.05, 1.4, n), rng.uniform(1.5, 2.2, n))
    brk = 1.0 - (1.0 - 1.0 / d4000[:, None]) * _smoothstep((3950.0 - rest) / 25.0)
    cont = cont * brk
    vdisp = np.where(sf, rng.uniform(50.0, 120.0, n), rng.uniform(150.0, 300.0, n))

    # Absorption features.
    abs_lam = np.array([CA_K, CA_H, G_BAND, MG_B[1], NA_D[0], NA_D[1], 4862.68, 6564.61, 4102.89])
    abs_ew_old = np.array([8.0, 7.0, 5.0, 4.0, 2.0, 1.5, 1.0, 1.0, 0.5])
    abs_ew_sf = np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.4, 4.0, 3.0, 4.0])
    ew = np.where(sf[:, None], abs_ew_sf[None, :], abs_ew_old[None, :]) * rng.lognormal(0.0, 0.2, (n, 1))
    lam_b = np.broadcast_to(abs_lam[None, :], (n, abs_lam.shape[0]))
    sig_int = np.where(abs_lam[None, :] == G_BAND, 9.0 / abs_lam[None, :] * C_KMS, vdisp[:, None] + 0.0 * lam_b)
    sig_log = np.sqrt((sig_int / C_KMS / LN10) ** 2 + sigma_inst_log**2)
    centers = np.log10(lam_b) + np.log10(zp1)
    tau = _gauss_sum(loglam, centers, sig_log, ew / (lam_b * LN10))
    flux = cont * np.exp(-tau)
    blanket = np.where(sf, 0.05, 0.2)[:, None] * _smoothstep((5000.0 - rest) / 400.0)
    flux = flux * (1.0 - blanket * _blanket_pattern(loglam)[None, :])

    # Narrow emission lines, scaled by an H alpha equivalent width.
    ew_ha = np.where(sf, rng.lognormal(np.log(35.0), 0.7, n), rng.lognormal(np.log(1.0), 0.8, n))
    lam_e = np.array([l[1] for l in GAL_EMISSION])
    ratio = np.broadcast_to(np.array([l[2] for l in GAL_EMISSION])[None, :], (n, lam_e.shape[0])).copy()
    o3 = rng.lognormal(np.log(0.6), 0.7, n)  # [O III] 5007 / H beta
    n2 = np.clip(0.35 / np.sqrt(o3) * rng.lognormal(0.0, 0.25, n), 0.05, 1.5)  # [N II]/H alpha, BPT-like anticorrelation
    names = [l[0] for l in GAL_EMISSION]
    ratio[:, names.index("[OIII]5007")] = o3
    ratio[:, names.index("[OIII]4959")] = o3 / 3.0
    ratio[:, names.index("[NII]6583")] = n2 * 2.86
    ratio[:, names.index("[NII]6548")] = n2 * 2.86 / 3.0
    # Dust: Balmer decrement 2.86 -> up to ~5 (blue lines weakened relative to H alpha).
    ebv = rng.uniform(0.0, 0.5, n)[:, None]
    ratio = ratio * 10.0 ** (-0.4 * ebv * 2.5 * (6564.61 / lam_e[None, :] - 1.0))
    ha_idx = names.index("Ha")
    cont_ha = planck(np.full((n, 1), 6564.61), t_eff[:, None])[:, 0]  # continuum under H alpha
    ha_flux = ew_ha * cont_ha  # line flux in flux * A (rest EW -> observed via (1+z) cancels below)
    line_flux = ratio / ratio[:, ha_idx : ha_idx + 1] * ha_flux[:, None]
    sig_e = rng.uniform(40.0, 110.0, (n, 1))
    sig_log_e = np.sqrt((np.broadcast_to(sig_e, line_flux.shape) / C_KMS / LN10) ** 2 + sigma_inst_log**2)
    centers_e = np.log10(lam_e)[None, :] + np.log10(zp1)
    amp = line_flux / (lam_e[None, :] * LN10)
    flux = flux + _gauss_sum(loglam, centers_e, sig_log_e, amp)
    return flux, ew_ha


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


def observe(rng: np.random.Generator, inst: Instrument, model: np.ndarray, exposure: np.ndarray) -> Observation:
    """Pass noiseless f_lambda spectra (N, P) through ``inst``.

    Steps: smooth multiplicative calibration error (Legendre terms up to order 3, plus a
    relative scale error of the red arm at the arm join); per-pixel Gaussian noise whose
    variance is (source + sky) / (gain * throughput * exposure) + read noise; sky-subtraction
    residuals at the sky lines (scale error and a small wavelength shift, giving the typical
    P-Cygni-like residuals); rejected pixel runs and, for some spectra, a long bad stretch;
    and the blue/red ends with no data.
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
    var = (np.maximum(observed, 0.0) + sky_n) * inv_gain * inv_exp + inst.read_var * inv_exp
    sigma = np.sqrt(var)
    flux = rng.standard_normal((n, p)) * sigma
    flux += observed
    # Sky-subtraction residuals: scale error + a sub-pixel wavelength shift of the sky model.
    eps = rng.normal(0.0, 0.02, (n, 1))
    dshift = rng.normal(0.0, 0.04, (n, 1))  # in pixels
    dsky = np.gradient(sky_lines)
    flux += sky_scale * (eps * sky_lines[None, :] + dshift * dsky[None, :])
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
    # A few spectra lose a long stretch (a bad CCD column range / broken amplifier).
    long_bad = rng.random(n) < 0.01
    for r in np.nonzero(long_bad)[0]:
        s = int(rng.integers(0, p - 400))
        bad[r, s : s + int(rng.integers(50, 350))] = True
    rej_bit = np.int32(SDSS_FULLREJECT if inst.name == "sdss" else LAMOST_BADCCD)
    and_mask |= bad * rej_bit
    or_mask |= bad * rej_bit
    ivar[bad] = 0.0

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
        nodata_red = rng.integers(2, 30, n)
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
        flux=flux, ivar=ivar, and_mask=and_mask, or_mask=or_mask, sky=np.broadcast_to(sky_n, (n, p)),
        model=observed, snr_true=snr_true, snr_median=snr_med, sn_bands=sn_bands, first=first, last=last,
    )


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
