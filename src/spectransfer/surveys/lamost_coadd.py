"""LAMOST low-resolution spectra of DR8 and later: an empty primary HDU and an HDU1 'COADD'
binary table with one row of vector columns FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK
(and NORMALIZATION, not used). Header keywords are those of DR1-DR7 files (see lamost_image).
"""

from __future__ import annotations

import numpy as np

from spectransfer.errors import SpectrumError
from spectransfer.surveys.base import Reader, SpectrumRecord, finish_record, register
from spectransfer.surveys.fitsfile import FitsFile
from spectransfer.surveys.lamost_image import LAMOST, lamost_record

LABEL = "lamost-coadd"
REQUIRED_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH")


def identify(path: str, fits: FitsFile) -> bool:
    """An HDU1 table with FLUX and WAVELENGTH columns, or any HDU1 table in a LAMOST file."""
    if not fits.is_table(1):
        return False
    names = {c.upper() for c in fits.colnames(1)}
    if {"FLUX", "WAVELENGTH"} <= names:
        return True
    hdr = fits.header(0)
    return str(hdr.get("TELESCOP", "")).strip().upper() == "LAMOST" and int(hdr.get("NAXIS", 0)) == 0


def read(path: str, fits: FitsFile) -> SpectrumRecord:
    names = {c.upper() for c in fits.colnames(1)}
    cols = list(REQUIRED_COLUMNS) + (["ANDMASK"] if "ANDMASK" in names else [])
    if int(fits.header(1).get("NAXIS2", 0)) < 1:
        raise SpectrumError(path, f"{fits.extname(1) or 'HDU1'} table has no row")
    table = {k: np.ravel(v[0]) for k, v in fits.table(1, cols, rows=slice(0, 1)).items()}
    n = table["FLUX"].size
    mask = table["ANDMASK"] if "ANDMASK" in table else np.zeros(n, dtype=np.uint32)
    record = lamost_record(path, LABEL, fits.header(0), fits.header(1), table["WAVELENGTH"], table["FLUX"], table["IVAR"], mask)
    return finish_record(record)


register(Reader(label=LABEL, survey=LAMOST.name, identify=identify, read=read, priority=5))
