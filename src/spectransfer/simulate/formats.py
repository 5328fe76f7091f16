"""Byte-level writers of the survey files the simulator produces, in the surveys' own layouts.

SDSS: spec-lite `spec-PLATE-MJD-FIBER.fits` (primary header, HDU1 COADD table with flux,
loglam, ivar, and_mask, or_mask, wdisp, sky, model; HDU2 SPALL one-row table with the
pipeline's answers), as in DR14-DR16 `spectra/lite/PLATE/`. LAMOST DR5: primary image
(5, N) float32 with rows flux, ivar, wavelength, andmask, ormask and the pipeline keys in the
header, as in `fits/PLANID/spec-LMJD-PLANID_spSS-FFF.fits`.

The files are assembled as bytes (FITS cards + big-endian arrays) rather than through
astropy: writing thousands of small files is then limited by the disk, not by header
bookkeeping, and the bytes depend only on the values (no timestamps), so a seed always gives
the same files. Tests read them back with astropy to check the layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

BLOCK = 2880


def _fmt_value(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return f"{'T' if value else 'F':>20}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):>20d}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"non-finite header value {v!r}")
        s = f"{v:.10G}"
        if "E" in s:
            mant, exp = s.split("E")
            if "." not in mant:
                mant += ".0"
            s = f"{mant}E{exp}"
        elif "." not in s:
            s += ".0"
        return f"{s:>20}"
    if isinstance(value, str):
        text = value.replace("'", "''")
        return f"'{text:<8}'".ljust(20)
    raise TypeError(f"unsupported FITS header value {value!r}")


@lru_cache(maxsize=8192, typed=True)
def card(key: str, value: Any = None, comment: str = "") -> str:
    """One 80-character FITS card. ``value=None`` with key COMMENT or '' gives commentary."""
    if key in ("COMMENT", "HISTORY", ""):
        return f"{key:<8}{comment}"[:80].ljust(80)
    body = f"{key:<8}= {_fmt_value(value)}"
    if comment:
        body += f" / {comment}"
    if len(body) > 80:
        body = body[:80]
    return body.ljust(80)


def header_bytes(cards: Sequence[str]) -> bytes:
    text = "".join(cards) + "END".ljust(80)
    pad = (-len(text)) % BLOCK
    return (text + " " * pad).encode("ascii")


def pad_data(data: bytes) -> bytes:
    return data + b"\0" * ((-len(data)) % BLOCK)


# ---- binary tables ----------------------------------------------------------------------------

_TFORM = {"f4": "E", "f8": "D", "i2": "I", "i4": "J", "i8": "K", "u1": "B", "b1": "L"}


def _tform(dt: np.dtype) -> str:
    base = dt.base if dt.shape else dt
    count = int(np.prod(dt.shape)) if dt.shape else 1
    if base.kind == "S":
        return f"{base.itemsize}A"
    code = _TFORM[base.str[1:]]
    return f"{count}{code}" if count != 1 else code


def bintable_header(
    dtype: np.dtype, n_rows: int, extname: str, extra: Sequence[str] = (), units: dict[str, str] | None = None
) -> list[str]:
    """Cards of a BINTABLE extension for a big-endian structured ``dtype`` (TUNITn from ``units``)."""
    cards = [
        card("XTENSION", "BINTABLE", "binary table extension"),
        card("BITPIX", 8, "array data type"),
        card("NAXIS", 2, "number of array dimensions"),
        card("NAXIS1", dtype.itemsize, "length of dimension 1"),
        card("NAXIS2", n_rows, "length of dimension 2"),
        card("PCOUNT", 0, "number of group parameters"),
        card("GCOUNT", 1, "number of groups"),
        card("TFIELDS", len(dtype.names or ()), "number of table fields"),
    ]
    for i, name in enumerate(dtype.names or (), start=1):
        cards.append(card(f"TTYPE{i}", name))
        cards.append(card(f"TFORM{i}", _tform(dtype.fields[name][0])))
        if units and name in units:
            cards.append(card(f"TUNIT{i}", units[name]))
    cards.append(card("EXTNAME", extname, "extension name"))
    cards.extend(extra)
    return cards


# ---- SDSS spec-lite ---------------------------------------------------------------------------

COADD_DTYPE = np.dtype(
    [
        ("flux", ">f4"),
        ("loglam", ">f4"),
        ("ivar", ">f4"),
        ("and_mask", ">i4"),
        ("or_mask", ">i4"),
        ("wdisp", ">f4"),
        ("sky", ">f4"),
        ("model", ">f4"),
    ]
)

# The HDU2 (SPALL) columns we fill, with the dtypes of the real DR14-DR16 (run2d v5_10+) files.
SPALL_DTYPE = np.dtype(
    [
        ("PROGRAMNAME", "S27"),
        ("CHUNK", "S14"),
        ("PLATEQUALITY", "S4"),
        ("PLATESN2", ">f4"),
        ("EBOSS_TARGET1", ">i8"),
        ("SPECPRIMARY", "u1"),
        ("NSPECOBS", ">i2"),
        ("PLATE", ">i4"),
        ("TILE", ">i4"),
        ("MJD", ">i4"),
        ("FIBERID", ">i4"),
        ("RUN2D", "S7"),
        ("RUN1D", "S7"),
        ("OBJTYPE", "S16"),
        ("PLUG_RA", ">f8"),
        ("PLUG_DEC", ">f8"),
        ("CLASS", "S6"),
        ("SUBCLASS", "S21"),
        ("Z", ">f4"),
        ("Z_ERR", ">f4"),
        ("RCHI2", ">f4"),
        ("DOF", ">i4"),
        ("RCHI2DIFF", ">f4"),
        ("VDISP", ">f4"),
        ("WAVEMIN", ">f4"),
        ("WAVEMAX", ">f4"),
        ("WCOVERAGE", ">f4"),
        ("ZWARNING", ">i4"),
        ("SN_MEDIAN", ">f4", (5,)),
        ("SN_MEDIAN_ALL", ">f4"),
        ("SPECTROFLUX", ">f4", (5,)),
        ("SPECTROFLUX_IVAR", ">f4", (5,)),
        ("SPECTROSYNFLUX", ">f4", (5,)),
        ("ANYANDMASK", ">i4"),
        ("ANYORMASK", ">i4"),
        ("Z_NOQSO", ">f4"),
        ("ZWARNING_NOQSO", ">i4"),
        ("CLASS_NOQSO", "S6"),
        ("SUBCLASS_NOQSO", "S21"),
        ("OBJID", "S19"),
        ("RA", ">f8"),
        ("DEC", ">f8"),
        ("EXTINCTION", ">f4", (5,)),
        ("PSFMAG", ">f4", (5,)),
        ("FIBER2MAG", ">f4", (5,)),
        ("THING_ID", ">i4"),
    ]
)

RUN2D = "v5_13_0"


def sdss_primary_cards(meta: dict[str, Any]) -> list[str]:
    """Primary header of a spec-lite file (keys as in DR14-DR16 BOSS/eBOSS files)."""
    return [
        card("SIMPLE", True, "conforms to FITS standard"),
        card("BITPIX", 8, "array data type"),
        card("NAXIS", 0, "number of array dimensions"),
        card("EXTEND", True),
        card("TELESCOP", "SDSS 2.5-M", "Sloan Digital Sky Survey"),
        card("FLAVOR", "science", "exposure type, SDSS spectro style"),
        card("MJD", meta["mjd"], "APO fMJD day at start of exposure"),
        card("MJDLIST", str(meta["mjd"])),
        card("NAME", f"{meta['plate']:04d}-{meta['mjd']}-01", "The name of the currently loaded plate"),
        card("PLATEID", meta["plate"], "The currently loaded plate"),
        card("TILEID", meta["tile"], "Tile number"),
        card("CARTID", meta["cartid"], "Cartridge used in this plugging"),
        card("MAPID", 1, "The mapping version of the loaded plate"),
        card("PLATETYP", "eBOSS", "Type of plate"),
        card("RA", round(meta["plate_ra"], 6), "RA of telescope boresight (deg)"),
        card("DEC", round(meta["plate_dec"], 6), "Dec of telescope boresight (deg)"),
        card("EQUINOX", 2000.0),
        card("RADECSYS", "FK5"),
        card("RADEG", round(meta["plate_ra"], 2), "RA of telescope pointing(deg)"),
        card("DECDEG", round(meta["plate_dec"], 2), "Dec of telescope pointing (deg)"),
        card("EXPTIME", meta["exptime"], "Minimum of exposure times for all cameras"),
        card("NEXP", meta["nexp"], "Number of individual exposures"),
        card("VERS2D", RUN2D, "Version of idlspec2d for 2D reduction"),
        card("VERSCOMB", RUN2D, "Version of idlspec2d for combining multiple spe"),
        card("RUN2D", RUN2D, "Spectro-2D reduction name"),
        card("HELIO_RV", meta["helio_rv"], "Heliocentric correction (added to velocities)"),
        card("VACUUM", True, "Wavelengths are in vacuum"),
        card("SPEC1_G", meta["sn2_g"], "(S/N)^2 for spec  1 at mag 21.20"),
        card("SPEC1_R", meta["sn2_r"], "(S/N)^2 for spec  1 at mag 20.20"),
        card("SPEC1_I", meta["sn2_i"], "(S/N)^2 for spec  1 at mag 20.20"),
        card("NWORDER", 2, "Linear-log10 coefficients"),
        card("WFITTYPE", "LOG-LINEAR", "Linear-log10 dispersion"),
        card("COEFF0", meta["coeff0"], "Central wavelength (log10) of first pixel"),
        card("COEFF1", 0.0001, "Log10 dispersion per pixel"),
        card("FBADPIX", meta["fbadpix"], "Fraction of bad pixels"),
        card("DC-FLAG", 1, "Log-linear flag"),
        card("BUNIT", "1E-17 erg/cm^2/s/Ang"),
        card("PLUG_RA", round(meta["ra"], 6), "RA of object [deg]"),
        card("PLUG_DEC", round(meta["dec"], 6), "dec of object [deg]"),
        card("THING_ID", meta["thing_id"], "Unique object identifier"),
        card("FIBERID", meta["fiberid"], "Fiber number (1-1000)"),
        card("COMMENT", comment="Simulated by spectransfer simulate: not a real SDSS spectrum"),
    ]


_COADD_HEADER_CACHE: dict[int, bytes] = {}


def _coadd_header(n_rows: int) -> bytes:
    if n_rows not in _COADD_HEADER_CACHE:
        _COADD_HEADER_CACHE[n_rows] = header_bytes(
            bintable_header(COADD_DTYPE, n_rows, "COADD", [card("COMMENT", comment="Coadded spectrum")])
        )
    return _COADD_HEADER_CACHE[n_rows]


_SPALL_HEADER = header_bytes(bintable_header(SPALL_DTYPE, 1, "SPALL"))


def sdss_file_bytes(primary: list[str], coadd: np.ndarray, spall_row: np.ndarray) -> bytes:
    """A complete spec-lite file: primary header, COADD table, one-row SPALL table."""
    assert coadd.dtype == COADD_DTYPE and spall_row.dtype == SPALL_DTYPE
    return b"".join(
        (
            header_bytes(primary),
            _coadd_header(coadd.shape[0]),
            pad_data(coadd.tobytes()),
            _SPALL_HEADER,
            pad_data(spall_row.tobytes()),
        )
    )


# ---- quasar catalogues -----------------------------------------------------------------------

# DR16Q (Lyke et al. 2020; DR16Q_v4.fits) columns we fill, with the catalogue's types; the
# *_DUPLICATE arrays hold the other spectra of the same quasar (-1 padded).
DR16Q_DTYPE = np.dtype(
    [
        ("SDSS_NAME", "S18"),
        ("RA", ">f8"),
        ("DEC", ">f8"),
        ("PLATE", ">i4"),
        ("MJD", ">i4"),
        ("FIBERID", ">i2"),
        ("OBJID", "S19"),
        ("THING_ID", ">i4"),
        ("Z", ">f8"),
        ("SOURCE_Z", "S12"),
        ("Z_PIPE", ">f8"),
        ("ZWARNING", ">i4"),
        ("Z_VI", ">f8"),
        ("IS_QSO_FINAL", ">i2"),
        ("CLASS_PERSON", ">i2"),
        ("BAL_PROB", ">f4"),
        ("PSFMAG", ">f4", (5,)),
        ("SN_MEDIAN_ALL", ">f8"),
        ("NSPEC", ">i2"),
        ("PLATE_DUPLICATE", ">i4", (74,)),
        ("MJD_DUPLICATE", ">i4", (74,)),
        ("FIBERID_DUPLICATE", ">i2", (74,)),
    ]
)

# LAMOST quasar catalogues (DR1Q Ai et al. 2016; DR2&3Q Dong et al. 2018; DR4&5Q Yao et al.
# 2019) identify each spectrum by OBSID and LMJD/PLANID/SPID/FIBERID.
LAMOST_QSO_DTYPE = np.dtype(
    [
        ("OBSID", ">i8"),
        ("DESIGNATION", "S26"),
        ("RA", ">f8"),
        ("DEC", ">f8"),
        ("LMJD", ">i4"),
        ("MJD", ">i4"),
        ("PLANID", "S20"),
        ("SPID", ">i2"),
        ("FIBERID", ">i2"),
        ("Z", ">f8"),
        ("Z_PIPE", ">f8"),
        ("CLASS_PIPE", "S7"),
        ("MAG_G", ">f4"),
        ("MAG_R", ">f4"),
        ("MAG_I", ">f4"),
    ]
)


# ---- LAMOST DR5 -------------------------------------------------------------------------------


def lamost_primary_cards(meta: dict[str, Any], n_pix: int) -> list[str]:
    """Primary header of a LAMOST DR5 low-resolution spectrum (keys and order as the real files)."""
    c = card
    return [
        c("SIMPLE", True, "Primary Header created by MWRFITS v1.11b"),
        c("BITPIX", -32),
        c("NAXIS", 2, "Number of array dimensions"),
        c("NAXIS1", n_pix),
        c("NAXIS2", 5),
        c("EXTEND", True),
        c(""),
        c("COMMENT", comment="--------FILE INFORMATION"),
        c("FILENAME", meta["filename"]),
        c("OBSID", meta["obsid"], "Unique number ID of this spectrum"),
        c("AUTHOR", "LAMOST Pipeline", "Who compiled the information"),
        c("DATA_V", "LAMOST DR5", "Data release version"),
        c("EXTEN0", "Flux, Inverse, Wavelength, Andmask, Ormask"),
        c("N_EXTEN", 1, "The extension number"),
        c("EXTNAME", "Flux", "The extension name"),
        c("ORIGIN", "NAOC-LAMOST", "Organization responsible for creating this file"),
        c("DATE", meta["date"], "Time when this HDU is created (UTC)"),
        c("COMMENT", comment="--------TELESCOPE PARAMETERS"),
        c("TELESCOP", "LAMOST", "GuoShouJing Telescope"),
        c("LONGITUD", 117.58, "[deg] Longitude of site"),
        c("LATITUDE", 40.39, "[deg] Latitude of site"),
        c("COMMENT", comment="--------OBSERVATION PARAMETERS"),
        c("DATE-OBS", meta["date_obs"], "The observation median UTC"),
        c("LMJD", meta["lmjd"], "Local Modified Julian Day"),
        c("MJD", meta["mjd"], "Modified Julian Day"),
        c("PLANID", meta["planid"], "Plan ID in use"),
        c("RA", round(meta["ra"], 6), "[deg] Right ascension of object"),
        c("DEC", round(meta["dec"], 6), "[deg] Declination of object"),
        c("RA_OBS", round(meta["ra"], 6), "[deg] Right ascension during observing"),
        c("DEC_OBS", round(meta["dec"], 6), "[deg] Declination during observing"),
        c("DESIG", meta["desig"], "Designation of LAMOST target"),
        c("FIBERID", meta["fiberid"], "Fiber ID of Object"),
        c("OBJTYPE", meta["objtype"], "Object type from input catalog"),
        c("FIBERTYP", "Obj", "Fiber type of object"),
        c("FIBERMAS", 0, "Bitmask of warning values, 0 means all is well"),
        c("MAGTYPE", "ugriz", "Magnitude type of object"),
        *[c(f"MAG{k + 1}", round(float(m), 2), f"[mag] Mag{k + 1} of object") for k, m in enumerate(meta["mags"])],
        c("MAG6", 99.0, "[mag] Mag6 of object"),
        c("MAG7", 99.0, "[mag] Mag7 of object"),
        c("OBS_TYPE", "OBJ", "The type of target (OBJ, FLAT, ARC or BIAS)"),
        c("OBSCOMM", "Science", "Science or Test"),
        c("RADECSYS", "FK5", "Equatorial coordinate system"),
        c("EQUINOX", 2000.0, "Equinox in years"),
        c("NEXP", 3, "Number of valid exposures"),
        c("EXPTIME", meta["exptime"], "[s] Minimum of exposure time for all cameras"),
        c("COMMENT", comment="--------SPECTROGRAPH PARAMETERS"),
        c("SPID", meta["spid"], "Spectrograph ID"),
        c("SPRA", round(meta["plan_ra"], 7), "[deg] Average RA of this spectrograph"),
        c("SPDEC", round(meta["plan_dec"], 7), "[deg] Average DEC of this spectrograph"),
        c("SLIT_MOD", "x2/3", "Slit mode, x1, x2/3 or x1/2"),
        c("COMMENT", comment="--------DATA REDUCTION PARAMETERS"),
        c("EXTRACT", "aperture", "Extraction method"),
        c("SFLATTEN", True, "Super flat has been applied"),
        c("PCASKYSB", True, "PCA sky-subtraction has been applied"),
        c("HELIO", True, "Heliocentric correction"),
        c("HELIO_RV", meta["helio_rv"], "[km/s] Heliocentric correction"),
        c("VACUUM", True, "Wavelengths are in vacuum"),
        c("NWORDER", 2, "Number of linear-log10 coefficients"),
        c("WFITTYPE", "LOG-LINEAR", "Linear-log10 dispersion"),
        c("COEFF0", meta["coeff0"], "Central wavelength (log10) of first pixel"),
        c("COEFF1", 0.0001, "Log10 dispersion per pixel"),
        c("CRVAL1", meta["coeff0"], "Central wavelength (log10) of first pixel"),
        c("CD1_1", 0.0001, "Log10 dispersion per pixel"),
        c("CRPIX1", 1, "Starting pixel (1-indexed)"),
        c("CTYPE1", "LINEAR"),
        c("DC-FLAG", 1, "Log-linear flag"),
        c("COMMENT", comment="--------SPECTRA ANALYSIS RESULTS"),
        c("VERSPIPE", "v2.9.7", "Version of Pipeline"),
        c("CLASS", meta["class"], "Class of object"),
        c("SUBCLASS", meta["subclass"], "Subclass of object"),
        c("Z", meta["z"], "Redshift of object"),
        c("Z_ERR", meta["z_err"], "Redshift error of object"),
        c("ZFLAG", "LASP" if meta["class"] == "STAR" else "ppxf", "Which method computes the redshift"),
        *[c(f"SNR{b}", round(float(s), 2), f"SNR of {b.lower()} filter") for b, s in zip("UGRIZ", meta["snr_bands"])],
        c("COMMENT", comment="Simulated by spectransfer simulate: not a real LAMOST spectrum"),
    ]


def lamost_file_bytes(primary: list[str], image: np.ndarray) -> bytes:
    """A complete LAMOST DR5 file: header + (5, N) big-endian float32 image."""
    assert image.dtype == np.dtype(">f4") and image.shape[0] == 5
    return header_bytes(primary) + pad_data(image.tobytes())
