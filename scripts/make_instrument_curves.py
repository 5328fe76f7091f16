"""Regenerate src/spectransfer/simulate/instrument_curves.npz: the night sky and each survey's
sensitivity, measured on real files, for the simulator's instruments.

**The night sky.** Every SDSS/BOSS spec file carries, beside the object's flux, the sky the
pipeline subtracted from it (HDU1 column ``sky``, flux-calibrated, 1e-17 erg/s/cm²/Å). Its
emission lines ([O I] 5577/6300/6364, Na D and the OH Meinel bands that crowd the red) sit at
fixed wavelengths, and their sky-subtraction residuals are the spikes a real spectrum carries.
Each file's sky is divided by its own median over 5000-5500 Å and the median over files is
taken; the smooth continuum is the running 20th percentile over 101 pixels (smoothed over 51),
the lines what lies above it.

**Sensitivity.** A pixel's variance in flux units is (source + sky) / T(λ) (photon noise,
with T the counts per unit flux: telescope, atmosphere, spectrograph and detector), so
T = (source + sky) · ivar. For BOSS files (those reaching below 3650 Å, as the simulated SDSS
instrument does) the source is the pipeline's own best-fit ``model`` column; for LAMOST files
(no sky or model column; the shared ones are bright stars, sky-negligible) it is the running
median of the flux. Each file's T is divided by its median over the grid range and the median
over files is smoothed (running median over 101 pixels, then mean over 51).

Everything is on the BOSS pixel lattice (log10 λ = 3.5523 + 1e-4 i, 3565-10399 Å, which holds
LAMOST's 3700-9100 Å), float32, with the names of the files used.

Usage: .venv/bin/python scripts/make_instrument_curves.py [DATA_DIR ...]
(default ../shared/data and tests/data, each with sdss/ and lamost/ inside; the shipped file was
made from both, and the script refuses to run on the default when ../shared/data is absent
rather than replace it with curves from fewer files)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.ndimage import median_filter, percentile_filter, uniform_filter1d

from spectransfer.surveys import read_spectrum

LOGLAM0 = 3.5523  # BOSS: 3565 Å
DLOGLAM = 1e-4
N_PIX = 4648  # ... to 10399 Å
NORM_RANGE = (5000.0, 5500.0)  # Å: the sky continuum between the lines, blue of [O I] 5577
GRID_RANGE = (3839.7, 8914.6)  # Å: the network's grid; the sensitivity's median there is 1
BOSS_BLUE = 3650.0  # Å: a file whose data start below this is a BOSS (not SDSS-I) spectrum
OUT = Path(__file__).resolve().parents[1] / "src" / "spectransfer" / "simulate" / "instrument_curves.npz"


def lattice() -> np.ndarray:
    return 10.0 ** (LOGLAM0 + DLOGLAM * np.arange(N_PIX))


def _median_of(rows: list[np.ndarray]) -> np.ndarray:
    """Median over files, pixel by pixel; the ends only some files reach take the nearest value."""
    stack = np.stack(rows)
    covered = np.isfinite(stack).any(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = np.nanmedian(stack[:, covered], axis=0)
    wave = lattice()
    return np.interp(wave, wave[covered], out)


def _relative(wave: np.ndarray, values: np.ndarray, lo: float, hi: float) -> np.ndarray | None:
    ref = np.nanmedian(values[(wave >= lo) & (wave < hi)])
    return values / ref if np.isfinite(ref) and ref > 0 else None


def read_sdss(path: Path, wave: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(sky, sensitivity) of one SDSS spec file on ``wave`` (NaN outside its data), each None when
    the file lacks what it needs: sky needs the ``sky`` column, sensitivity a BOSS file with ``model``."""
    try:
        with fits.open(path, memmap=False) as hdul:
            if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
                return None, None
            table = hdul[1].data
            names = table.columns.names
            if "sky" not in names or "loglam" not in names:
                return None, None
            lam = 10.0 ** np.asarray(table["loglam"], dtype=np.float64)
            sky = np.asarray(table["sky"], dtype=np.float64)
            ivar = np.asarray(table["ivar"], dtype=np.float64)
            model = np.asarray(table["model"], dtype=np.float64) if "model" in names else None
    except OSError:
        return None, None
    sky_rel = _relative(wave, np.interp(wave, lam, sky, left=np.nan, right=np.nan), *NORM_RANGE)
    if model is None or lam[ivar > 0][0] > BOSS_BLUE:
        return sky_rel, None
    sens = np.where(ivar > 0, (np.clip(model, 0.0, None) + sky) * ivar, np.nan)
    return sky_rel, _relative(wave, np.interp(wave, lam, sens, left=np.nan, right=np.nan), *GRID_RANGE)


def read_lamost(path: Path, wave: np.ndarray) -> np.ndarray | None:
    """Sensitivity of one LAMOST file on ``wave``: running-median flux × ivar (NaN outside its data)."""
    try:
        rec = read_spectrum(str(path))
    except Exception:  # noqa: BLE001 - a file the package cannot read is left out, not fatal
        return None
    flux = median_filter(np.asarray(rec.flux, dtype=np.float64), 31, mode="nearest")
    ivar = np.asarray(rec.ivar, dtype=np.float64)
    if rec.extra.get("restored_pixels"):  # the pipeline's own variances only, not the reader's restored ones
        ivar = np.where(_pipeline_ivar(path) > 0, ivar, 0.0)
    sens = np.where((ivar > 0) & (flux > 0), flux * ivar, np.nan)
    return _relative(wave, np.interp(wave, np.asarray(rec.wave), sens, left=np.nan, right=np.nan), *GRID_RANGE)


def _pipeline_ivar(path: Path) -> np.ndarray:
    """A LAMOST file's inverse variance as written (image row 1, or the COADD table's IVAR)."""
    with fits.open(path) as hdul:
        if hdul[0].data is not None and hdul[0].data.ndim == 2:
            return np.asarray(hdul[0].data[1], dtype=np.float64)
        return np.asarray(hdul[1].data["IVAR"][0], dtype=np.float64)


def smooth(curve: np.ndarray) -> np.ndarray:
    return uniform_filter1d(median_filter(curve, 101, mode="nearest"), 51, mode="nearest")


def measure(sdss_files: list[Path], lamost_files: list[Path]) -> dict[str, np.ndarray]:
    """The curves (continuum, lines, sdss_sensitivity, lamost_sensitivity) and the files used."""
    wave = lattice()
    skies, sens, used = [], [], []
    for path in sdss_files:
        sky, s = read_sdss(path, wave)
        if sky is not None:
            skies.append(sky)
            used.append(path.name)
        if s is not None:
            sens.append(s)
    lamost = [(p.name, c) for p in lamost_files if (c := read_lamost(p, wave)) is not None]
    if len(skies) < 3 or len(sens) < 3 or len(lamost) < 3:
        raise SystemExit(f"need 3 files of each kind: {len(skies)} SDSS skies, {len(sens)} BOSS, {len(lamost)} LAMOST")
    sky = _median_of(skies)
    cont = uniform_filter1d(percentile_filter(sky, 20, size=101, mode="nearest"), 51, mode="nearest")
    return {
        "continuum": cont,
        "lines": np.clip(sky - cont, 0.0, None),
        "sdss_sensitivity": smooth(_median_of(sens)),
        "lamost_sensitivity": smooth(_median_of([c for _, c in lamost])),
        "files": np.array(sorted(used + [name for name, _ in lamost])),
    }


def gather(data_dirs: list[Path], survey: str) -> list[Path]:
    seen: dict[str, Path] = {}
    for folder in data_dirs:
        for path in sorted((folder / survey).glob("spec-*.fit*")):
            seen.setdefault(path.name, path)
    return list(seen.values())


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    dirs = [Path(a) for a in argv] or [root.parent / "shared" / "data", root / "tests" / "data"]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise SystemExit(f"data folder not found: {', '.join(missing)} (give the folders to read as arguments)")
    curves = measure(gather(dirs, "sdss"), gather(dirs, "lamost"))
    arrays = {k: v if k == "files" else v.astype(np.float32) for k, v in curves.items()}
    tmp = OUT.with_name(OUT.stem + ".partial.npz")
    np.savez_compressed(tmp, loglam0=np.float64(LOGLAM0), dloglam=np.float64(DLOGLAM), **arrays)
    tmp.replace(OUT)  # atomic: a failed run leaves the shipped file as it was
    print(f"{OUT.name}: sky and sensitivities from {len(curves['files'])} real files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
