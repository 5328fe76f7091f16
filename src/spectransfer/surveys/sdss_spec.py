"""SDSS/BOSS ``spec-PLATE-MJD-FIBER.fits`` files, lite and full (DR8 and later data model).

HDU1 is the COADD table (flux, loglam, ivar, and_mask, ...), HDU2 the one-row specObj table,
named SPECOBJ in SDSS-I/II files and SPALL in BOSS/eBOSS files, so it is taken by index.
Per-exposure HDUs of full files come after and are never read. Wavelengths are vacuum
(``10**loglam``); flux is in 1e-17 erg/s/cm2/A. ``mask`` is ``and_mask`` (redrock's choice:
a bit set in every exposure marks a bad pixel) restricted to the bits that mean the pixel
holds no usable flux (``SDSS_BAD_PIXEL_BITS``): informational bits such as BRIGHTSKY (23) or
MANYBADCOLUMNS (4) would otherwise discard 6-46% of the pixels of real BOSS spectra.
NODATA (24) is not among them: a pixel without data has ivar 0 and is dropped for that, while
BOSS v5_4_45 coadds set NODATA in and_mask on ~450 pixels (5200-7300 A) whose ivar is positive
and higher than the spectrum's median; masking them cut a 700 A hole in those spectra.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from spectransfer.errors import SpectrumError
from spectransfer.surveys.base import (
    Reader,
    SpectrumRecord,
    Survey,
    finish_record,
    missing_float,
    missing_int,
    missing_str,
    register,
    register_survey,
    valid_mag,
)
from spectransfer.surveys.fitsfile import FitsFile

# SDSS pixel mask bits (SDSS data model, SPPIXMASK) that make a pixel unusable: NOPLUG 0,
# BADTRACE 1, BADFLAT 2, BADARC 3, MANYREJECTED 5, LARGESHIFT 6, FULLREJECT 18, NOSKY 22,
# COMBINEREJ 25, BADFLUXFACTOR 26, BADSKYCHI 27. Other bits (NEARBADPIXEL, LOWFLAT,
# PARTIALREJECT, SCATTEREDLIGHT, CROSSTALK, BRIGHTSKY, REDMONSTER, the SMEAR* and *WHOPPER
# fibre flags, MANYBADCOLUMNS) describe usable pixels and are not treated as bad. NODATA 24
# is left to the ivar (see the module docstring): where there is truly no data, ivar is 0.
SDSS_BAD_PIXEL_BITS = np.uint32(sum(1 << b for b in (0, 1, 2, 3, 5, 6, 18, 22, 25, 26, 27)))

# SDSS (both file formats): a spectrum is plate, MJD, fibre; DR14Q/DR16Q list those triples.
# The paper's quality cuts: ZWARNING == 0 and the coverage of config.PAPER_COVERAGE.
SDSS = register_survey(
    Survey(
        name="sdss",
        id_columns=(("plate", "int64"), ("mjd", "int64"), ("fiberid", "int64")),
        spectrum_id="sdss-{plate:04d}-{mjd:05d}-{fiberid:04d}",
        catalogue_keys=(("plate", "mjd", "fiberid"),),
        zwarning_cut=True,
    )
)

LABEL = "sdss-spec"
REQUIRED_COLUMNS = ("flux", "loglam", "ivar")
REQUIRED_ROW = ("PLATE", "MJD", "FIBERID", "CLASS", "Z", "ZWARNING")
OPTIONAL_ROW = (
    "SUBCLASS",
    "PLUG_RA",
    "PLUG_DEC",
    "RA",
    "DEC",
    "Z_ERR",
    "WAVEMIN",
    "WAVEMAX",
    "SN_MEDIAN_ALL",
    "SN_MEDIAN",
    "PSFMAG",
    "SPECTROFLUX",
    "THING_ID",
    "OBJTYPE",
    "RUN2D",
)


def identify(path: str, fits: FitsFile) -> bool:
    """HDU1 is a table with a ``loglam`` column, or an SDSS file whose HDU1 is named COADD."""
    if not fits.is_table(1):
        return False
    if "loglam" in {c.lower() for c in fits.colnames(1)}:
        return True
    telescope = str(fits.header(0).get("TELESCOP", "")).upper()
    return telescope.startswith("SDSS") and fits.extname(1) == "COADD"


def read(path: str, fits: FitsFile) -> SpectrumRecord:
    names = {c.lower(): c for c in fits.colnames(1)}
    cols = list(REQUIRED_COLUMNS) + (["and_mask"] if "and_mask" in names else [])
    coadd = fits.table(1, cols)
    if not fits.is_table(2):
        raise SpectrumError(path, "no specObj table in HDU2 (SPECOBJ/SPALL)")
    row_names = {c.upper() for c in fits.colnames(2)}
    hdu2 = fits.extname(2) or "HDU2"
    for key in REQUIRED_ROW:
        if key not in row_names:
            raise SpectrumError(path, f"{hdu2} table lacks column '{key}'")
    if int(fits.header(2).get("NAXIS2", 0)) < 1:
        raise SpectrumError(path, f"{hdu2} table has no row")
    wanted = list(REQUIRED_ROW) + [k for k in OPTIONAL_ROW if k in row_names]
    row = {k: v[0] for k, v in fits.table(2, wanted, rows=slice(0, 1)).items()}

    flux = coadd["flux"]
    loglam = coadd["loglam"].astype(np.float64)
    wave = 10.0**loglam
    mask = coadd["and_mask"] & SDSS_BAD_PIXEL_BITS if "and_mask" in coadd else np.zeros(flux.shape, dtype=np.uint32)

    primary = fits.header(0)
    ra = missing_float(row.get("PLUG_RA", row.get("RA")))
    dec = missing_float(row.get("PLUG_DEC", row.get("DEC")))
    if ra is None or dec is None:
        ra, dec = missing_float(primary.get("PLUG_RA")), missing_float(primary.get("PLUG_DEC"))

    extra: dict[str, Any] = {
        "wavemin": missing_float(row.get("WAVEMIN")),
        "wavemax": missing_float(row.get("WAVEMAX")),
        "snr": _snr(row),
        "z_err": missing_float(row.get("Z_ERR")),
        "objtype": missing_str(row.get("OBJTYPE")),
        "thing_id": _positive(row.get("THING_ID")),
        "run2d": missing_str(row.get("RUN2D")),
        "specobj_hdu": hdu2,
    }
    extra["mag_r"], extra["mag_r_source"] = _mag_r(row)

    record = SpectrumRecord(
        path=path,
        survey=SDSS.name,
        format=LABEL,
        ids={"plate": int(row["PLATE"]), "mjd": int(row["MJD"]), "fiberid": int(row["FIBERID"])},
        ra=ra,
        dec=dec,
        cls=missing_str(row["CLASS"]),
        subclass=missing_str(row.get("SUBCLASS")),
        z=missing_float(row["Z"]),
        zwarning=missing_int(row["ZWARNING"]),
        wave=wave,
        flux=flux,
        ivar=coadd["ivar"],
        mask=mask,
        flux_unit="1e-17 erg / (s cm2 Angstrom)",
        extra=extra,
    )
    return finish_record(record)


def _snr(row: dict[str, Any]) -> float | None:
    """The pipeline's median S/N per pixel: SN_MEDIAN_ALL, else the r-band SN_MEDIAN."""
    snr = missing_float(row.get("SN_MEDIAN_ALL"))
    if snr is None and "SN_MEDIAN" in row:
        per_band = np.atleast_1d(row["SN_MEDIAN"])
        if per_band.size == 5:
            snr = missing_float(per_band[2])
    return snr


def _mag_r(row: dict[str, Any]) -> tuple[float | None, str | None]:
    """r-band magnitude: PSF magnitude when the row has photometry, else synthetic from the spectrum."""
    if "PSFMAG" in row:
        mags = np.atleast_1d(row["PSFMAG"])
        mag = valid_mag(mags[2]) if mags.size == 5 else None
        if mag is not None:
            return mag, "psfmag"
    if "SPECTROFLUX" in row:
        fluxes = np.atleast_1d(row["SPECTROFLUX"])  # nanomaggies
        if fluxes.size == 5 and np.isfinite(fluxes[2]) and fluxes[2] > 0:
            return 22.5 - 2.5 * math.log10(float(fluxes[2])), "spectroflux"
    return None, None


def _positive(value: Any) -> int | None:
    v = missing_int(value)
    return v if v is not None and v > 0 else None


register(Reader(label=LABEL, survey=SDSS.name, identify=identify, read=read, priority=5))
