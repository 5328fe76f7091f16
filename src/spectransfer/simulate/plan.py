"""The design of a simulated survey and its pipeline's answers.

`plan_survey` decides every file before any spectrum exists: which object (class, redshift,
brightness, type), where on the sky, on which plate or plan and fibre, which quasars are
observed twice and which the quasar catalogue leaves out. `pipeline_answers` plays the survey
pipeline: mostly right, sometimes wrong in class or redshift (more often at low S/N).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spectransfer.simulate import spectra, templated

SURVEYS = ("sdss", "lamost")
# Fractions of quasars among all spectra, as in the paper's training sets (Sect. 2):
# LAMOST 31k of 8.9M (0.35%), SDSS 578k of 4.0M (14%).
DEFAULT_QSO_FRACTION = {"sdss": 0.14, "lamost": 0.0035}
# Of the non-quasars: galaxies vs stars (SDSS DR16 specObj ~ 72:28; LAMOST DR5 ~ 2:98).
GALAXY_SHARE = {"sdss": 0.72, "lamost": 0.02}
REPEAT_FRACTION = {"sdss": 0.08, "lamost": 0.10}  # share of quasar spectra that re-observe a quasar
CATALOG_MISSING = 0.03
LOW_Z_SHARE = {"sdss": 0.10, "lamost": 0.08}  # quasars below z = 0.5 (DR16Q: ~8-10%)
# Of those, broad-line AGN (Seyfert 1s) among the main-sample galaxy targets: main-sample
# redshifts and magnitudes (r < 17.77), so low luminosity and host-dominated; the pipeline
# calls them QSO BROADLINE and DR16Q keeps them (it has no luminosity cut).
SEYFERT_SHARE = {"sdss": 0.04, "lamost": 0.02}
LOW_Z_MAG_MAX = 22.0  # faintest r of the SDSS quasars below z = 0.5 (main-sample Seyferts apart)
EBV_MEAN = {"sdss": 0.04, "lamost": 0.15}  # mean Milky Way colour excess E(B-V) of the targets
HOST_Z_MAX = 1.0  # host light drawn below this redshift (at higher z the quasar outshines it)  # share of true quasars the catalogue leaves out

CLASS_NAMES = np.array(["QSO", "GALAXY", "STAR"])
QSO, GALAXY, STAR = 0, 1, 2


# ---- planning ---------------------------------------------------------------------------------


def _quasar_redshifts(rng: np.random.Generator, survey: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """z in [0.001, 5]: a low-z tail (share LOW_Z_SHARE below z = 0.5, p(z) rising as z: slower
    than the volume, z^2, because the faint end of a flux-limited sample is lost) and above
    it a smooth distribution peaking at z ~ 1.5-2.5 (SDSS, as DR16Q, Lyke et al. 2020) or
    z ~ 1-1.5 (LAMOST quasars are brighter; Yao et al. 2019). Returns z and which objects are
    main-sample Seyfert 1s (SEYFERT_SHARE, part of the low-z tail)."""
    grid = np.linspace(0.5, 5.0, 2000)
    if survey == "sdss":
        pdf = (
            0.30 * np.exp(-0.5 * ((grid - 1.1) / 0.45) ** 2)
            + 0.55 * np.exp(-0.5 * ((grid - 2.2) / 0.5) ** 2)
            + 0.15 * np.exp(-0.5 * ((grid - 3.0) / 0.7) ** 2)
        )
    else:
        pdf = 0.65 * np.exp(-0.5 * ((grid - 1.2) / 0.5) ** 2) + 0.35 * np.exp(-0.5 * ((grid - 2.2) / 0.6) ** 2)
    cdf = np.cumsum(pdf)
    cdf /= cdf[-1]
    z = np.interp(rng.random(n), cdf, grid)
    u = rng.random(n)
    low = u < LOW_Z_SHARE[survey]
    seyfert = u < SEYFERT_SHARE[survey]
    # Below 0.5: p(z) ~ z on [0.05, 0.5], by inverting its CDF; Seyferts as main-sample galaxies.
    v = rng.random(n)
    z_low = np.sqrt(0.05**2 + v * (0.5**2 - 0.05**2))
    # Main-sample Seyferts reach the local volume (SDSS calls broad-line nuclei at z ~ 0.002
    # QSO, e.g. NGC 4395 at z = 0.001): most at z ~ 0.05-0.15, a tail to z = 0.001.
    z_sey = np.clip(rng.gamma(2.0, 0.045, n), 0.001, 0.3)
    return np.where(seyfert, z_sey, np.where(low, z_low, z)), seyfert


# Luminosity distance for the host-to-quasar ratio (flat LambdaCDM, H0 = 70, Omega_m = 0.3).
_Z_TAB = np.linspace(0.0, 6.0, 601)
_E = np.sqrt(0.3 * (1.0 + _Z_TAB) ** 3 + 0.7)
_DC_MPC = 299792.458 / 70.0 * np.concatenate([[0.0], np.cumsum(0.5 * (1 / _E[1:] + 1 / _E[:-1]) * np.diff(_Z_TAB))])
MPC_CM = 3.0857e24


def host_ratio(rng: np.random.Generator, z: np.ndarray, mag_r: np.ndarray) -> np.ndarray:
    """Host-galaxy / quasar flux at rest 5100 A, from the total 5100 A luminosity.

    Shen et al. (2011, ApJS 194, 45, eq. 1, calibrated on the Vanden Berk et al. 2006 SDSS
    eigenspectrum decomposition): L_host/L_AGN = 0.8052 - 1.5502 x + 0.9121 x^2 - 0.1577 x^3
    with x = log10(L_5100,total / 1e44 erg/s), zero above x = 1.053; scattered by 0.3 dex.
    L_5100 from the r magnitude with f_lambda ~ lambda^-1.5 (alpha_nu = -0.5) between 6166 A
    and 5100 (1+z) A. The ratio grows toward low luminosity and so toward low z."""
    d_l = np.interp(z, _Z_TAB, _DC_MPC) * (1.0 + z) * MPC_CM
    lam_obs = 5100.0 * (1.0 + z)
    f_r = spectra.ab_flambda(mag_r) * 1e-17
    lum = 4.0 * np.pi * d_l**2 * lam_obs * f_r * (lam_obs / spectra.R_BAND_LAMBDA) ** -1.5
    x = np.clip(np.log10(np.maximum(lum, 1.0) / 1e44), -1.5, 1.053)
    ratio = np.maximum(0.8052 - 1.5502 * x + 0.9121 * x**2 - 0.1577 * x**3, 0.0)
    return np.where(x < 1.053, ratio * 10.0 ** rng.normal(0.0, 0.3, z.shape[0]), 0.0)


# LAMOST fibres catch a varying share of a source's light (open-loop fibre positioning of 3.3"
# fibres under Xinglong's ~3" seeing, sky transparency): ln(share) ~ N(mu, sigma), capped at 1,
# relative to the bright stars the LAMOST sensitivity was measured on (simulate/instrument_curves.npz).
# Calibrated on the survey's own S/N: LAMOST DR5 (Luo et al. 2019, VizieR V/164) lists
# 5,808,985 of 9,026,365 spectra with g-band S/N > 10 and 7,701,235 with i-band S/N > 10, so
# ~31-36% of its stars are at S/N_g <= 10 and ~8-15% at S/N_i <= 10 (the range: the 637,889
# unclassified spectra, mostly faint, counted or not); the simulated stars had 8% and 0%.
LAMOST_LIGHT = (-0.9, 1.0)

# Star types (redrock template names) and their shares among the stars each survey observes.
# SDSS: F stars (spectrophotometric standards and halo targets) and M dwarfs dominate, with
# K/G dwarfs, A stars and BHBs, white dwarfs and a few CVs (SDSS DR16 specObj star subclasses).
# LAMOST: a magnitude-limited disk sample, mostly F/G/K with some A and M (Luo et al. 2015).
STAR_KINDS = ("B", "A", "F", "G", "K", "M", "WD", "CV")
STAR_TYPE_P = {
    "sdss": (0.01, 0.10, 0.30, 0.12, 0.14, 0.25, 0.06, 0.02),
    "lamost": (0.01, 0.10, 0.30, 0.27, 0.22, 0.08, 0.01, 0.01),
}
# SDSS galaxies: the main sample (r < 17.77, z ~ 0.1), LRGs (BOSS LOWZ/CMASS, z 0.2-0.7) and
# emission-line galaxies (eBOSS ELG, z 0.6-1.1); shares of the galaxy spectra.
SDSS_GALAXY_MIX = (0.35, 0.50, 0.15)
# What a fibre sees of an SDSS target. The main-sample and LRG magnitudes above are the ones
# the targets were selected on (Petrosian r < 17.77; BOSS LOWZ r and CMASS i cmodel < 19.6 /
# 19.9), which count a resolved galaxy's whole light; the spectrum (3" SDSS / 2" BOSS fibres,
# flux-calibrated on point sources) and its PSF magnitude see ~1 mag less of it. Shift, mag:
# N(mean, sd), >= 0; emission-line galaxies (compact, z ~ 0.8, already drawn at PSF-like
# magnitudes) keep theirs. Checked on the real files of ../shared/data: SDSS-I main-sample
# spectra have spectro-flux r 16.2-18.5 and median S/N ~30 per grid pixel, the BOSS galaxies
# PSF r 20.8-21.8 and S/N 3.6-6.5; the simulated ones without the shift: main sample median
# r 17.1 and S/N ~50, LRGs r 18.5-20.5 and S/N ~12.
SDSS_GALAXY_APERTURE = (1.0, 0.3)
# Stars among the faint targets: BOSS and eBOSS colour-selected quasar candidates to g = 22
# (Ross et al. 2012; Myers et al. 2015) and CMASS galaxy candidates (Bolton et al. 2012: most of
# the 4.6% of CMASS targets that are not galaxies are M stars) are often stars, observed at
# r ~ 20-22 (the shared real BOSS star: r 21.3, S/N 4.7), where SEGUE's and the standards' stars
# (r 15-20.5, above) are bright. Share of the SDSS stars and their r range.
SDSS_FAINT_STARS = (0.3, 20.0, 22.0)


def _radec_in_field(rng: np.random.Generator, ra0: np.ndarray, dec0: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    r = radius * np.sqrt(rng.random(ra0.shape[0]))
    th = rng.uniform(0.0, 2.0 * np.pi, ra0.shape[0])
    dec = np.clip(dec0 + r * np.sin(th), -89.9, 89.9)
    ra = np.mod(ra0 + r * np.cos(th) / np.cos(np.radians(dec0)), 360.0)
    return ra, dec


def _field_centres(rng: np.random.Generator, k: int, dec_lo: float, dec_hi: float) -> tuple[np.ndarray, np.ndarray]:
    ra = rng.uniform(0.0, 360.0, k)
    s = rng.uniform(np.sin(np.radians(dec_lo)), np.sin(np.radians(dec_hi)), k)
    return ra, np.degrees(np.arcsin(s))


def plan_survey(survey: str, n: int, seed: int, qso_fraction: float) -> dict[str, np.ndarray]:
    """Decide every file of the survey (one row per file) before any spectrum exists.

    Files are ordered object by object (a repeat follows its first observation) so that a
    batch always holds every observation of its objects.
    """
    rng = np.random.default_rng([seed, 0])
    p_gal = (1.0 - qso_fraction) * GALAXY_SHARE[survey]
    p_star = (1.0 - qso_fraction) * (1.0 - GALAXY_SHARE[survey])
    cls = rng.choice(3, size=n, p=[qso_fraction, p_gal, p_star])
    # Some quasar spectra are second observations of another quasar.
    is_rep = (cls == QSO) & (rng.random(n) < REPEAT_FRACTION[survey])
    q_idx = np.nonzero(cls == QSO)[0]
    if q_idx.size and is_rep[q_idx].all():
        is_rep[q_idx[0]] = False
    originals = np.nonzero((cls == QSO) & ~is_rep)[0]
    n_obj = int((~is_rep).sum())
    obj_of_file = np.full(n, -1, dtype=np.int64)
    obj_of_file[~is_rep] = np.arange(n_obj)
    rep_files = np.nonzero(is_rep)[0]
    if rep_files.size:
        obj_of_file[rep_files] = obj_of_file[rng.choice(originals, size=rep_files.size)]
    # Object-major order: all observations of an object are consecutive, first one first.
    order = np.lexsort((is_rep, np.arange(n), obj_of_file))
    cls, is_rep, obj_of_file = cls[order], is_rep[order], obj_of_file[order]

    # Per-object properties.
    obj_cls = np.empty(n_obj, dtype=np.int64)
    obj_cls[obj_of_file[~is_rep]] = cls[~is_rep]
    z = np.zeros(n_obj)
    mag = np.zeros(n_obj)
    temp = np.zeros(n_obj)
    star_type = np.full(n_obj, "", dtype=object)
    gal_sf = np.zeros(n_obj, dtype=bool)
    is_bal = np.zeros(n_obj, dtype=bool)
    arch = np.zeros(n_obj, dtype=np.int64)  # archetype row (galaxies, stars)
    host = np.zeros(n_obj)  # host / quasar flux at rest 5100 A
    resolved = np.zeros(n_obj, dtype=bool)  # SDSS main-sample and LRG galaxies
    qo = np.nonzero(obj_cls == QSO)[0]
    go = np.nonzero(obj_cls == GALAXY)[0]
    so = np.nonzero(obj_cls == STAR)[0]
    z[qo], seyfert = _quasar_redshifts(rng, survey, qo.size)
    # BAL quasars: ~12% where C IV is observable (z > 1.6), rarer (LoBAL only) below.
    is_bal[qo] = rng.random(qo.size) < np.where(z[qo] > 1.6, 0.12, 0.015)
    o2_ew, ha_ew = templated.galaxy_archetype_lines()
    passive = np.nonzero((o2_ew < 5.0) & (ha_ew < 5.0))[0]
    strong = np.nonzero(o2_ew > 20.0)[0]
    if survey == "sdss":
        # Low-z quasars: SDSS-I/II's (i < 19.1 targets) and eBOSS's X-ray selected AGN (SPIDERS,
        # Dwelly et al. 2017: to r ~ 22, mostly z < 0.6, often host-dominated).
        mag[qo] = np.where(
            z[qo] < 0.5, rng.uniform(16.5, LOW_Z_MAG_MAX, qo.size), np.clip(22.0 - rng.exponential(1.3, qo.size), 16.5, 22.0)
        )
        mag[qo] = np.where(seyfert, np.clip(17.77 - rng.exponential(0.9, qo.size), 14.0, 17.77), mag[qo])
        pop = rng.choice(3, size=go.size, p=SDSS_GALAXY_MIX)  # main, LRG, ELG
        resolved[go] = pop < 2
        z[go] = np.select(
            [pop == 0, pop == 1],
            [np.clip(rng.gamma(3.0, 0.035, go.size), 0.005, 0.35), np.clip(rng.normal(0.45, 0.13, go.size), 0.15, 0.8)],
            rng.uniform(0.6, 1.1, go.size),
        )
        mag[go] = np.select(
            [pop == 0, pop == 1],
            [np.clip(17.77 - rng.exponential(0.9, go.size), 14.0, 17.77), rng.uniform(18.5, 20.5, go.size)],
            rng.uniform(20.5, 22.3, go.size),
        )
        arch[go] = np.select(
            [pop == 1, pop == 2],
            [rng.choice(passive, go.size), rng.choice(strong, go.size)],
            rng.integers(0, o2_ew.size, go.size),
        )
        mag[so] = rng.uniform(15.0, 20.5, so.size)
    else:
        mag[qo] = rng.uniform(17.0, 20.0, qo.size)
        mag[qo] = np.where(seyfert, rng.uniform(14.5, 17.8, qo.size), mag[qo])
        z[go] = np.clip(rng.gamma(3.0, 0.03, go.size), 0.005, 0.8)
        mag[go] = np.clip(17.8 - rng.exponential(0.6, go.size), 14.5, 17.8)
        arch[go] = rng.integers(0, o2_ew.size, go.size)
        mag[so] = np.clip(17.8 - rng.exponential(2.0, so.size), 10.5, 17.8)
    gal_sf[go] = ha_ew[arch[go]] > 5.0
    host[qo] = np.where(z[qo] < HOST_Z_MAX, host_ratio(rng, z[qo], mag[qo]), 0.0)
    k_idx = rng.choice(len(STAR_KINDS), size=so.size, p=np.array(STAR_TYPE_P[survey]) / np.sum(STAR_TYPE_P[survey]))
    ranges = {t[0]: (t[1], t[2]) for t in spectra.STAR_TYPES} | {"CV": (5000.0, 20000.0)}
    lo = np.array([ranges[STAR_KINDS[k]][0] for k in k_idx])
    hi = np.array([ranges[STAR_KINDS[k]][1] for k in k_idx])
    temp[so] = np.exp(rng.uniform(np.log(lo), np.log(hi))) if so.size else 0.0
    star_type[so] = np.array(STAR_KINDS, dtype=object)[k_idx]
    n_arch = np.array([max(templated.n_archetypes(templated.STAR_TEMPLATE[STAR_KINDS[k]]), 1) for k in k_idx], dtype=np.int64)
    arch[so] = rng.integers(0, 1 << 30, so.size) % np.maximum(n_arch, 1)
    rv = rng.normal(0.0, 40.0, n_obj)
    z[so] = rv[so] / spectra.C_KMS
    # Milky Way dust along the line of sight (Schlegel et al. 1998 maps): SDSS looks out of the
    # plane (median E(B-V) ~ 0.03); LAMOST's disk fields (anticentre, low latitude) far more.
    ebv = np.minimum(rng.exponential(EBV_MEAN[survey], n_obj), 1.0)
    in_catalog = (obj_cls == QSO) & (rng.random(n_obj) >= CATALOG_MISSING)

    # Where the objects are: fields (plates / plans) of a few hundred targets.
    per_field = 640 if survey == "sdss" else 800
    first_idx = np.nonzero(~is_rep)[0]
    field_of_obj = np.arange(n_obj) // per_field
    n_fields = int(field_of_obj.max()) + 1 if n_obj else 0
    if survey == "sdss":
        f_ra, f_dec = _field_centres(rng, n_fields, -10.0, 70.0)
        radius = 1.49
    else:
        f_ra, f_dec = _field_centres(rng, n_fields, -5.0, 60.0)
        radius = 2.5
    o_ra, o_dec = _radec_in_field(rng, f_ra[field_of_obj], f_dec[field_of_obj], radius)

    files: dict[str, np.ndarray] = {
        "cls": cls,
        "is_repeat": is_rep,
        "object": obj_of_file,
        "z": z[obj_of_file],
        "mag": mag[obj_of_file],
        "temp": temp[obj_of_file],
        "star_type": star_type[obj_of_file],
        "gal_sf": gal_sf[obj_of_file],
        "is_bal": is_bal[obj_of_file],
        "archetype": arch[obj_of_file],
        "host_ratio": host[obj_of_file],
        "ebv": ebv[obj_of_file],
        "in_catalog": in_catalog[obj_of_file],
        "field": field_of_obj[obj_of_file],
        "field_ra": f_ra[field_of_obj[obj_of_file]] if n_fields else np.zeros(n),
        "field_dec": f_dec[field_of_obj[obj_of_file]] if n_fields else np.zeros(n),
        # A repeat is the same object: same position to within 0.1 arcsec.
        "ra": o_ra[obj_of_file] + np.where(is_rep, rng.normal(0, 0.1 / 3600, n), 0.0),
        "dec": o_dec[obj_of_file] + np.where(is_rep, rng.normal(0, 0.1 / 3600, n), 0.0),
        # Quasars vary: a repeat is a little brighter or fainter.
        "dmag": np.where(is_rep, rng.normal(0.0, 0.15, n), 0.0),
        "exposure": rng.lognormal(0.0, 0.2 if survey == "sdss" else 0.3, n),
    }
    files["n_obs"] = np.bincount(obj_of_file, minlength=n_obj)[obj_of_file]
    # The first observation of each object, as a file index (for repeat_of).
    first_of_obj = np.empty(n_obj, dtype=np.int64)
    first_of_obj[obj_of_file[first_idx]] = first_idx
    files["first_file"] = first_of_obj[obj_of_file]
    _assign_ids(rng, survey, files, n_fields)
    # What the fibres see, drawn last so that every earlier draw of either survey stays as it
    # was: SDSS's fibre aperture and faint stars (its light share is 1), LAMOST's light share.
    if survey == "sdss":
        files["light"] = np.ones(n)
        shift = np.where(resolved, np.maximum(rng.normal(*SDSS_GALAXY_APERTURE, n_obj), 0.0), 0.0)
        share, lo, hi = SDSS_FAINT_STARS
        faint = (obj_cls == STAR) & (rng.random(n_obj) < share)
        files["mag"] = np.where(faint, rng.uniform(lo, hi, n_obj), mag + shift)[obj_of_file]
    else:
        files["light"] = np.minimum(rng.lognormal(*LAMOST_LIGHT, n), 1.0)
    return files


def _assign_ids(rng: np.random.Generator, survey: str, f: dict[str, np.ndarray], n_fields: int) -> None:
    """Plate/MJD/fibre (SDSS) or LMJD/plan/spectrograph/fibre/obsid (LAMOST) for each file.

    A repeat is the same plate or plan observed again on a later night, on another fibre."""
    n = f["cls"].shape[0]
    field = f["field"]
    rep = f["is_repeat"]
    if survey == "sdss":
        plates = np.sort(rng.choice(np.arange(3586, 11500), size=max(n_fields, 1), replace=False))
        mjds = (55176 + (plates - 3586) * 0.4 + rng.integers(0, 60, plates.size)).astype(np.int64)
        plate = plates[field]
        mjd = mjds[field].copy()
        fiber = np.zeros(n, dtype=np.int64)
        for k in range(n_fields):
            sel = np.nonzero((field == k) & ~rep)[0]
            fiber[sel] = rng.choice(1000, size=sel.size, replace=False) + 1
        used = {(int(plate[i]), int(mjd[i]), int(fiber[i])) for i in np.nonzero(~rep)[0]}
        for i in np.nonzero(rep)[0]:
            while True:
                m = int(mjd[i]) + int(rng.integers(1, 900))
                fb = int(rng.integers(1, 1001))
                if (int(plate[i]), m, fb) not in used:
                    break
            used.add((int(plate[i]), m, fb))
            mjd[i], fiber[i] = m, fb
        f["plate"], f["mjd"], f["fiberid"] = plate, mjd, fiber
        f["tile"] = plate + 9000
        f["thing_id"] = 100000000 + f["object"] * 7 + 3
    else:
        lmjd_f = np.sort(rng.integers(55859, 57900, size=max(n_fields, 1)))
        prefix = rng.choice(np.array(["EG", "HD"]), size=max(n_fields, 1))
        suffix = rng.choice(np.array(["B", "M", "F"]), size=max(n_fields, 1), p=[0.3, 0.45, 0.25])
        planids = []
        for k in range(max(n_fields, 1)):
            ra = f["field_ra"][field == k][0] if np.any(field == k) else 0.0
            dec = f["field_dec"][field == k][0] if np.any(field == k) else 0.0
            h = ra / 15.0
            hh, mm, ss = int(h), int((h * 60) % 60), int((h * 3600) % 60)
            sgn = "N" if dec >= 0 else "S"
            ad = abs(dec)
            dd, dm, ds = int(ad), int((ad * 60) % 60), int((ad * 3600) % 60)
            planids.append(f"{prefix[k]}{hh:02d}{mm:02d}{ss:02d}{sgn}{dd:02d}{dm:02d}{ds:02d}{suffix[k]}{k % 99 + 1:02d}")
        planids_a = np.array(planids, dtype=object)
        lmjd = lmjd_f[field].copy()
        slot = np.zeros(n, dtype=np.int64)
        for k in range(n_fields):
            sel = np.nonzero((field == k) & ~rep)[0]
            slot[sel] = rng.choice(4000, size=sel.size, replace=False)
        used = {(int(field[i]), int(lmjd[i]), int(slot[i])) for i in np.nonzero(~rep)[0]}
        for i in np.nonzero(rep)[0]:
            while True:
                m = int(lmjd[i]) + int(rng.integers(1, 700))
                s = int(rng.integers(0, 4000))
                if (int(field[i]), m, s) not in used:
                    break
            used.add((int(field[i]), m, s))
            lmjd[i], slot[i] = m, s
        f["planid"] = planids_a[field]
        f["lmjd"] = lmjd
        f["mjd"] = lmjd - 1
        f["spid"] = slot // 250 + 1
        f["fiberid"] = slot % 250 + 1
        # OBSID = observation sequence * 100000 + spid * 1000 + fibre, as in the real files
        # (e.g. 677503031 is observation 6775, spectrograph 03, fibre 031).
        keys = sorted({(int(lm), int(fl)) for lm, fl in zip(lmjd, field)})
        seq = {k: 101 + i for i, k in enumerate(keys)}
        obs_seq = np.array([seq[(int(lm), int(fl))] for lm, fl in zip(lmjd, field)], dtype=np.int64)
        f["obsid"] = obs_seq * 100000 + f["spid"] * 1000 + f["fiberid"]


def relative_path(survey: str, f: dict[str, np.ndarray], i: int) -> str:
    """The file's path below the survey folder, in the survey's own layout."""
    if survey == "sdss":
        p, m, fb = int(f["plate"][i]), int(f["mjd"][i]), int(f["fiberid"][i])
        return f"spectra/lite/{p:04d}/spec-{p:04d}-{m}-{fb:04d}.fits"
    lm, pl, sp, fb = int(f["lmjd"][i]), str(f["planid"][i]), int(f["spid"][i]), int(f["fiberid"][i])
    return f"fits/{pl}/spec-{lm}-{pl}_sp{sp:02d}-{fb:03d}.fits"


def spectrum_id(survey: str, f: dict[str, np.ndarray], i: int) -> str:
    """The store's ``spectrum_id`` of the file (same zero padding as `spectransfer.data.ingest`)."""
    if survey == "sdss":
        return f"sdss-{int(f['plate'][i]):04d}-{int(f['mjd'][i]):05d}-{int(f['fiberid'][i]):04d}"
    return f"lamost-{int(f['lmjd'][i])}-{f['planid'][i]}-{int(f['spid'][i]):02d}-{int(f['fiberid'][i]):03d}"


# ---- pipeline answers -------------------------------------------------------------------------

# Line pairs a redshift finder confuses (true line taken for another): (true, assumed).
_CONFUSIONS = (
    (2798.75, 3728.48),
    (1549.06, 2798.75),
    (2798.75, 4862.68),
    (1215.67, 1549.06),
    (1908.73, 2798.75),
    (4862.68, 6564.61),
)


def pipeline_answers(
    rng: np.random.Generator,
    survey: str,
    cls: np.ndarray,
    z: np.ndarray,
    snr: np.ndarray,
    star_sub: list[str],
    gal_sf: np.ndarray,
    ew_ha: np.ndarray,
) -> dict[str, Any]:
    """What the survey pipeline says: class, subclass, z, z error, warning flags.

    Mostly right, but a fraction (more at low S/N) is wrong in class or redshift, so a
    catalogue label is not a copy of the pipeline class. LAMOST leaves some spectra
    'Unknown' (SUBCLASS 'Non', Z = -9999) as its pipeline does.
    """
    n = cls.shape[0]
    u = rng.random(n)
    low = snr < (2.0 if survey == "sdss" else 3.0)
    mid = (snr >= 2.0) & (snr < 4.0)
    out_cls = CLASS_NAMES[cls].astype(object)
    out_z = z.copy()
    wrong = np.zeros(n, dtype=bool)
    unknown = np.zeros(n, dtype=bool)
    if survey == "sdss":
        p_q = 0.015 + 0.12 * low + 0.04 * mid
        p_g = 0.006 + 0.03 * low
        p_s = 0.003 + 0.02 * low
        to_other = np.where(cls == QSO, u < p_q, np.where(cls == GALAXY, u < p_g, u < p_s))
    else:
        p_q = 0.09 + 0.2 * low
        p_g = 0.04 + 0.08 * low
        p_s = 0.012 + 0.04 * low
        to_other = np.where(cls == QSO, u < p_q, np.where(cls == GALAXY, u < p_g, u < p_s))
    v = rng.random(n)
    for i in np.nonzero(to_other)[0]:
        c = cls[i]
        if survey == "lamost":
            share_unknown = {QSO: 0.55, GALAXY: 0.6, STAR: 0.85}[int(c)]
            if v[i] < share_unknown:
                unknown[i] = True
                out_cls[i] = "Unknown"
                continue
        if c == QSO:
            new = "GALAXY" if rng.random() < 0.65 else "STAR"
        elif c == GALAXY:
            new = "QSO" if rng.random() < (0.6 if survey == "sdss" else 0.4) else "STAR"
        else:
            new = "GALAXY" if rng.random() < 0.7 else "QSO"
        out_cls[i] = new
        wrong[i] = True
        if new == "STAR":
            out_z[i] = rng.normal(0.0, 1.5e-4)
        elif new == "GALAXY":
            zz = -1.0
            if c == QSO:
                lam_t, lam_a = _CONFUSIONS[int(rng.integers(0, len(_CONFUSIONS)))]
                zz = (1.0 + z[i]) * lam_t / lam_a - 1.0
            out_z[i] = zz if 0.0 < zz < 0.9 else rng.uniform(0.02, 0.6)
        else:
            out_z[i] = rng.uniform(0.4, 3.2)
    # Right class, wrong redshift (a line confusion) for a few quasars.
    zfail = (cls == QSO) & ~to_other & (rng.random(n) < (0.012 + 0.05 * low))
    for i in np.nonzero(zfail)[0]:
        lam_t, lam_a = _CONFUSIONS[int(rng.integers(0, len(_CONFUSIONS)))]
        if rng.random() < 0.5:
            lam_t, lam_a = lam_a, lam_t
        zz = (1.0 + z[i]) * lam_t / lam_a - 1.0
        if 0.05 < zz < 6.0:
            out_z[i] = zz
            wrong[i] = True
    z_err = np.where(out_cls == "QSO", 5e-4 * (1.0 + np.abs(out_z)), np.where(out_cls == "GALAXY", 2.5e-5 * (1 + out_z), 1.2e-5))
    out_z = np.where(wrong | unknown, out_z, out_z + rng.normal(0.0, 1.0, n) * z_err * 0.5)
    z_err = z_err * rng.lognormal(0.0, 0.3, n) * (1.0 + 2.0 * low)

    # SDSS ZWARNING: SMALL_DELTA_CHI2 (bit 2 = 4) at low S/N and for some wrong answers,
    # NEGATIVE_MODEL (bit 3 = 8) now and then. LAMOST has no ZWARNING.
    zwarn = np.zeros(n, dtype=np.int32)
    if survey == "sdss":
        zwarn |= np.where(low & (rng.random(n) < 0.45), 4, 0).astype(np.int32)
        zwarn |= np.where(wrong & (rng.random(n) < 0.25), 4, 0).astype(np.int32)
        zwarn |= np.where(rng.random(n) < 0.004, 8, 0).astype(np.int32)

    sub = np.empty(n, dtype=object)
    for i in range(n):
        oc = out_cls[i]
        if survey == "lamost":
            sub[i] = star_sub[i] if (oc == "STAR" and cls[i] == STAR) else ("Non" if oc in ("Unknown", "QSO", "GALAXY") else "K5")
            continue
        if oc == "QSO":
            sub[i] = "BROADLINE" if (cls[i] == QSO and rng.random() < 0.8) else ""
        elif oc == "GALAXY":
            if cls[i] == GALAXY and gal_sf[i]:
                sub[i] = "STARBURST" if ew_ha[i] > 80 else "STARFORMING"
            elif cls[i] == QSO:
                sub[i] = "AGN BROADLINE" if rng.random() < 0.4 else ""
            else:
                sub[i] = ""
        else:
            sub[i] = star_sub[i] if cls[i] == STAR else str(rng.choice(["M0", "A0", "F9", "K7", "WD"]))
    pz = np.where(unknown, -9999.0, out_z)
    z_err = np.where(unknown, -9999.0, z_err)
    return {"class": out_cls, "subclass": sub, "z": pz, "z_err": z_err, "zwarning": zwarn, "wrong": wrong | unknown}
