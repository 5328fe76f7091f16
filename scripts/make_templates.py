"""Regenerate src/spectransfer/templates/redrock.npz from the redrock template files.

The redrock templates (DESI Collaboration, desihub/redrock-templates, BSD-3-Clause) are sampled
at 0.1 Å (stars, galaxies) or 1e-4 dex (quasars) over wide ranges: 29 MB in all. The package
needs them only at the resolution of the spectrographs it simulates and fits (SDSS/BOSS and
LAMOST pixels are 1e-4 dex = 69 km/s wide), so every basis vector is integrated onto one
rest-frame grid of 1e-4 dex bins (flux-conserving: the mean of the template over each bin),
stored as float32, with the archetype coefficients that turn the bases into real spectra.
The white-dwarf archetypes (20,000 rows) are thinned to 2,000 with a fixed seed.

Usage: python scripts/make_templates.py [TEMPLATE_DIR] (default ../shared/templates/redrock)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

STEP = 1e-4  # dex per bin, the SDSS/LAMOST pixel width
MAX_ARCHETYPES = 2000
FILES = {
    "qso_loz": "rrtemplate-QSO-LOZ-v1.1.fits",
    "qso_hiz": "rrtemplate-QSO-HIZ-v1.1.fits",
    "galaxy": "rrtemplate-galaxy.fits",
    "star_a": "rrtemplate-STAR-A-v0.1.fits",
    "star_b": "rrtemplate-STAR-B-v0.1.fits",
    "star_f": "rrtemplate-STAR-F-v0.1.fits",
    "star_g": "rrtemplate-STAR-G-v0.1.fits",
    "star_k": "rrtemplate-STAR-K-v0.1.fits",
    "star_m": "rrtemplate-STAR-M-v0.1.fits",
    "star_wd": "rrtemplate-STAR-WD-v0.1.fits",
    "star_cv": "rrtemplate-STAR-CV-v0.1.fits",
}


def native_wavelength(header: fits.Header, n: int) -> np.ndarray:
    """Wavelength (Å) of each native pixel: log-linear for the QSO files, linear otherwise."""
    i = np.arange(n, dtype=np.float64)
    if header.get("LOGLAM"):
        return 10.0 ** (header["CRVAL1"] + header["CDELT1"] * i)
    return header["CRVAL1"] + header["CDELT1"] * i


def bin_average(wave: np.ndarray, flux: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of a finely sampled (k, n) flux over each [edges[j], edges[j+1]) (trapezoid integral)."""
    seg = 0.5 * (flux[:, 1:] + flux[:, :-1]) * np.diff(wave)
    cum = np.concatenate([np.zeros((flux.shape[0], 1)), np.cumsum(seg, axis=1)], axis=1)
    at = np.stack([np.interp(edges, wave, c) for c in cum])
    return np.diff(at, axis=1) / np.diff(edges)


def convert(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    with fits.open(path) as hdul:
        basis = np.asarray(hdul[0].data, dtype=np.float64)
        header = hdul[0].header
        coeff = np.asarray(hdul["ARCHETYPE_COEFF"].data, dtype=np.float64) if "ARCHETYPE_COEFF" in hdul else None
    wave = native_wavelength(header, basis.shape[1])
    lo = np.ceil(np.log10(wave[0]) / STEP) * STEP
    hi = np.floor(np.log10(wave[-1]) / STEP) * STEP
    edges = 10.0 ** np.arange(lo, hi + STEP / 2, STEP)
    out = {"loglam0": np.float64(lo + STEP / 2), "basis": bin_average(wave, basis, edges).astype(np.float32)}
    if coeff is not None:
        if coeff.shape[0] > MAX_ARCHETYPES:
            coeff = coeff[np.sort(rng.choice(coeff.shape[0], MAX_ARCHETYPES, replace=False))]
        out["coeff"] = coeff.astype(np.float32)
    return out


def main(src: Path, dest: Path) -> None:
    rng = np.random.default_rng(20211021)
    arrays: dict[str, np.ndarray] = {"step": np.float64(STEP)}
    for name, fname in FILES.items():
        for key, value in convert(src / fname, rng).items():
            arrays[f"{name}/{key}"] = value
        print(f"{name}: basis {arrays[f'{name}/basis'].shape}", file=sys.stderr)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "redrock.npz.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(dest / "redrock.npz")
    shutil.copyfile(src / "LICENSE.md", dest / "LICENSE.md")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared" / "templates" / "redrock"
    main(source, root / "src" / "spectransfer" / "templates")
