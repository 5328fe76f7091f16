"""Which family of real-spectrum templates fits a spectrum best: quasar, galaxy or star.

The network learns from simulated spectra, so where the sky differs from the simulation it can
be wrong with confidence. The redrock templates (``spectransfer.templates``) were built from
real SDSS/BOSS spectra: a χ² fit of each family is an opinion that does not share the
simulation's blind spots. This is redrock's SPECTYPE (the family with the lowest χ² over its
redshift range), on the store's grid and vectorised over spectra, and it is what DESI's
quasar selection adds to QuasarNET (Chaussidon et al. 2023, ApJ 944, 107: QuasarNET and
redrock combined find quasars that either alone misses).

Families, each its PCA bases plus a constant (the store's min-max scaling, see ``ml.refine``):

* QSO: the DR16Q LOZ/HIZ bases over z 0-7 as ``ml.refine`` scans them, every second trial
  (246 km/s: broad lines; the redshift refinement refits z on every trial);
* GALAXY: the 5 galaxy bases over z 0-1.6 (redrock scans galaxies to 1.7);
* STAR: each of the A, B, F, G, K, M, WD and CV bases within ±STAR_KMS of rest.

Every family is fitted with the same additive nuisance terms, the survey's calibration
freedom (``calibration_terms``): a constant for SDSS (spectrophotometry good to ~5%); for
LAMOST also a quadratic in wavelength and a red-arm step at the arm join (``surveys.Survey``:
calibration_order, arm_join), because its relative flux calibration errs by ~10% in shape and
its two arms are spliced with their own scales. Without them, the family with the most
freedom (the quasar PCA, many bases over z 0-7) absorbs a LAMOST calibration error that the
galaxy and star bases cannot, and wins: on a simulated LAMOST-like survey the quasar family
was decisive for 4.6% of the galaxies and 2.8% of the stars (the network: 0.5%, 0.3%); with
the terms, 0.5% and 1.2%, quasars found 97.6% (was 98.2%); the shared real files' decisions
are the same either way (see the README).

A fit counts only where the first (mean-spectrum) part is positive, so a template turned
upside down cannot fit an absorption spectrum by its emission lines. ``DCHI2_QSO`` is
the best non-quasar χ² minus the best quasar χ²: positive where a quasar fits better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from spectransfer.config import DEFAULT_GRID, Grid
from spectransfer.ml.refine import C_KMS, _scan, chi2_templates, template_on_grid
from spectransfer.surveys import SURVEYS

GALAXY_Z_MAX = 1.6
QSO_STEP = 2  # quasar trials two grid steps (246 km/s) apart: broad lines; ml.refine refits z finely
STAR_KMS = 600.0  # radial velocities of Galactic stars and the grid's wavelength zero points
STAR_TYPES = ("star_a", "star_b", "star_f", "star_g", "star_k", "star_m", "star_wd", "star_cv")
FAMILIES = ("QSO", "GALAXY", "STAR")


@dataclass(frozen=True)
class SpectypeResult:
    """Per spectrum: the best χ² and its z of each family, the best family and DCHI2_QSO."""

    chi2: np.ndarray  # (n, 3) float64: QSO, GALAXY, STAR
    z: np.ndarray  # (n, 3) float64: the best trial z of each family
    star_type: np.ndarray  # (n,) str: the best star template (A ... CV)
    spectype: np.ndarray  # (n,) str: QSO, GALAXY or STAR
    dchi2_qso: np.ndarray  # (n,) float64: min(GALAXY, STAR) - QSO


@lru_cache(maxsize=4)
def _trials(grid: Grid) -> dict[str, np.ndarray]:
    step = float(grid.log_step)
    n_star = int(np.ceil(np.log10(1 + STAR_KMS / C_KMS) / step))
    return {
        "qso": np.arange(0, _scan(grid).n_trials, QSO_STEP),
        "galaxy": np.arange(int(np.floor(np.log10(1 + GALAXY_Z_MAX) / step)) + 1),
        "star": np.arange(-n_star, n_star + 1),
    }


@lru_cache(maxsize=16)
def calibration_terms(grid: Grid = DEFAULT_GRID, survey: str | None = None) -> np.ndarray:
    """(q, n_bins) nuisance terms every family of ``survey``'s spectra is fitted with: the
    constant, Legendre terms to the survey's ``calibration_order`` and, where it splices two
    arms inside the grid, a step (1 redward of ``arm_join``). Unknown or no survey: the constant."""
    info = SURVEYS.get(survey or "")
    order = info.calibration_order if info is not None else 0
    terms = np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, grid.n_bins), order).T
    join = info.arm_join if info is not None else None
    if join is not None and grid.wave_min < join < grid.wave_max:
        terms = np.vstack([terms, (grid.centers >= join).astype(np.float64)])
    terms.setflags(write=False)
    return terms


def _best_physical(chi2: np.ndarray, coef: np.ndarray, sign0: float) -> tuple[np.ndarray, np.ndarray]:
    """Index and χ² of the lowest trial whose mean-spectrum part is positive (inf if none).

    PCA signs are arbitrary: the first basis vector of the M-star template is negative and its
    archetypes have negative first coefficients, so the sign that counts is coef[0]·sign0."""
    allowed = np.where(coef[:, :, 0] * sign0 > 0, chi2, np.inf)
    i = np.argmin(allowed, axis=1)
    return i, allowed[np.arange(len(i)), i]


def _family(
    flux: np.ndarray, ivar: np.ndarray, trials: np.ndarray, templates: tuple, workers: int, terms: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    t = np.broadcast_to(trials, (flux.shape[0], trials.size))
    chi2, coef = chi2_templates(flux, ivar, t, templates, workers, terms=terms)
    i, best = _best_physical(chi2, coef, float(np.sign(templates[0].ext[0].sum())))
    return best, trials[i]


def fit_spectype(
    flux: np.ndarray,
    ivar: np.ndarray,
    grid: Grid = DEFAULT_GRID,
    *,
    survey: str | Sequence[str | None] | np.ndarray | None = None,
    batch_size: int = 16,
    workers: int = -1,
) -> SpectypeResult:
    """Fit every family to each spectrum (n, n_bins) on ``grid`` (scaled store arrays are fine);
    ``survey``: one survey name for all, or one per spectrum (its ``calibration_terms``)."""
    flux, ivar = np.atleast_2d(flux), np.atleast_2d(ivar)  # float64 a batch at a time, below
    if flux.shape != ivar.shape or flux.shape[1] != grid.n_bins:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must both be (n, {grid.n_bins})")
    n = flux.shape[0]
    keys = (
        np.full(n, survey or "", dtype=object) if survey is None or isinstance(survey, str) else np.asarray(survey, dtype=object)
    )
    if keys.shape != (n,):
        raise ValueError(f"survey must be one name or {n} names, got {keys.shape}")
    tr = _trials(grid)
    scan = _scan(grid)
    gal = (template_on_grid("galaxy", 0, int(tr["galaxy"][-1]) + 1, grid),)
    lo, hi = int(tr["star"][0]), int(tr["star"][-1]) + 1
    stars = [(template_on_grid(name, lo, hi, grid),) for name in STAR_TYPES]
    chi2 = np.full((n, 3), np.inf)
    m_best = np.zeros((n, 3))
    star_idx = np.zeros(n, dtype=np.int64)
    for key in dict.fromkeys(keys.tolist()):  # each survey with its own calibration terms
        terms = calibration_terms(grid, key or None)
        rows = np.flatnonzero(keys == key)
        for start in range(0, rows.size, batch_size):
            sl = rows[start : start + batch_size]
            f, w = np.asarray(flux[sl], dtype=np.float64), np.asarray(ivar[sl], dtype=np.float64)
            chi2[sl, 0], m_best[sl, 0] = _family(f, w, tr["qso"], scan.templates, workers, terms)
            chi2[sl, 1], m_best[sl, 1] = _family(f, w, tr["galaxy"], gal, workers, terms)
            per_type = [_family(f, w, tr["star"], s, workers, terms) for s in stars]
            c = np.stack([p[0] for p in per_type], axis=1)
            k = np.argmin(c, axis=1)
            ix = np.arange(c.shape[0])
            chi2[sl, 2] = c[ix, k]
            m_best[sl, 2] = np.stack([p[1] for p in per_type], axis=1)[ix, k]
            star_idx[sl] = k
    z = scan.z_of(m_best)
    fam = np.argmin(chi2, axis=1)
    names = np.array([s.removeprefix("star_").upper() for s in STAR_TYPES])
    with np.errstate(invalid="ignore"):  # no physical fit at all: inf - inf
        dchi2 = np.minimum(chi2[:, 1], chi2[:, 2]) - chi2[:, 0]
    return SpectypeResult(chi2=chi2, z=z, star_type=names[star_idx], spectype=np.array(FAMILIES)[fam], dchi2_qso=dchi2)
