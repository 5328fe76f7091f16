"""Legacy SDSS DR7-and-earlier ``spSpec-MJD-PLATE-FIBER.fit`` files.

The primary HDU is an image (5, N) float32: row 0 flux, 1 continuum-subtracted flux,
2 sigma, 3 pixel mask, 4 (unused here). Wavelength is log-linear, ``10**(COEFF0 + COEFF1*i)``,
vacuum (the header says ``VACUUM = T``; an air file would be converted). The class is the
SPEC_CLN code and the redshift the header Z; there is no subclass. ivar = 1/sigma**2 where
sigma > 0, else 0. The mask's EMLINE bit (30, "emission line here") is informational and is
cleared so that ``mask != 0`` keeps meaning "bad pixel".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spectransfer.errors import SpectrumError
from spectransfer.surveys.base import (
    Reader,
    SpectrumRecord,
    air_to_vacuum,
    finish_record,
    missing_float,
    missing_int,
    register,
    valid_mag,
)
from spectransfer.surveys.fitsfile import FitsFile
from spectransfer.surveys.sdss_spec import SDSS

LABEL = "sdss-spspec"
SPEC_CLN = {0: None, 1: "STAR", 2: "GALAXY", 3: "QSO", 4: "QSO", 5: "SKY", 6: "STAR"}
SPEC_CLN_NAME = {0: "UNKNOWN", 1: "STAR", 2: "GALAXY", 3: "QSO", 4: "HIZ_QSO", 5: "SKY", 6: "STAR_LATE"}
EMLINE_BIT = np.uint32(1 << 30)
REQUIRED_KEYS = ("COEFF0", "COEFF1", "MJD", "PLATEID", "FIBERID", "SPEC_CLN", "Z")


def identify(path: str, fits: FitsFile) -> bool:
    hdr = fits.header(0)
    return int(hdr.get("NAXIS", 0)) == 2 and "SPEC_CLN" in hdr and "COEFF0" in hdr


def read(path: str, fits: FitsFile) -> SpectrumRecord:
    hdr = fits.header(0)
    for key in REQUIRED_KEYS:
        if hdr.get(key) is None:
            raise SpectrumError(path, f"primary header lacks keyword {key}")
    image = fits.image(0)
    if image.ndim != 2 or image.shape[0] < 4:
        raise SpectrumError(path, f"primary image has shape {image.shape}, expected (5, n_pixels)")
    n = image.shape[1]
    wave = 10.0 ** (float(hdr["COEFF0"]) + float(hdr["COEFF1"]) * np.arange(n, dtype=np.float64))
    if hdr.get("VACUUM") is False:
        wave = air_to_vacuum(wave)
    flux = image[0]
    sigma = image[2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ivar = np.where(sigma > 0, 1.0 / sigma.astype(np.float64) ** 2, 0.0).astype(np.float32)
    raw_mask = np.where(np.isfinite(image[3]), image[3], 0)
    mask = np.rint(raw_mask).astype(np.int64).astype(np.uint32) & ~EMLINE_BIT

    cln = missing_int(hdr["SPEC_CLN"])
    extra: dict[str, Any] = {
        "wavemin": None,  # no pipeline value in spSpec headers: taken from the good pixels
        "wavemax": None,
        "snr": missing_float(hdr.get("SN_R")),
        "mag_r": valid_mag(hdr.get("MAG_R")),
        "mag_r_source": "synthetic" if valid_mag(hdr.get("MAG_R")) is not None else None,
        "spec_cln": cln,
        "spec_cln_name": SPEC_CLN_NAME.get(cln) if cln is not None else None,
        "z_err": missing_float(hdr.get("Z_ERR")),
        "z_status": missing_int(hdr.get("Z_STATUS")),
        "objtype": str(hdr.get("OBJTYPE", "")).strip() or None,
    }
    record = SpectrumRecord(
        path=path,
        survey=SDSS.name,
        format=LABEL,
        ids={"plate": int(hdr["PLATEID"]), "mjd": int(hdr["MJD"]), "fiberid": int(hdr["FIBERID"])},
        ra=missing_float(hdr.get("RAOBJ")),
        dec=missing_float(hdr.get("DECOBJ")),
        cls=SPEC_CLN.get(cln) if cln is not None else None,
        subclass=None,
        z=missing_float(hdr["Z"]),
        zwarning=missing_int(hdr.get("Z_WARNIN")),
        wave=wave,
        flux=flux,
        ivar=ivar,
        mask=mask,
        flux_unit="1e-17 erg / (s cm2 Angstrom)",
        extra=extra,
    )
    return finish_record(record)


register(Reader(label=LABEL, survey=SDSS.name, identify=identify, read=read, priority=10))
