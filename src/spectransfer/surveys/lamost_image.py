"""LAMOST low-resolution spectra of DR1-DR7: one primary image (5, N), float32 or float64.

The rows are named by the header's EXTEN0: 'Flux, Inverse, Wavelength, Andmask, Ormask' in
most releases, but the earliest (pipeline v2.6) files carry 'Subcontinuum' in row 2 instead of
the wavelength; then the wavelength comes from the log-linear COEFF0/COEFF1 keywords.
LAMOST wavelengths are vacuum and the flux is relative (not absolutely calibrated).
Header ids: OBSID (absent before DR3), LMJD, PLANID, SPID, FIBERID. CLASS 'Unknown',
SUBCLASS 'Non' and Z = -9999 are missing values and become None. The header parsing here,
and the restoration of the pixels the early pipeline zeroed (``restore_zeroed``), are shared
with the DR8+ COADD reader.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from spectransfer.errors import SpectrumError
from spectransfer.surveys.base import (
    Reader,
    SpectrumRecord,
    Survey,
    air_to_vacuum,
    finish_record,
    missing_float,
    missing_int,
    missing_str,
    register,
    register_survey,
    valid_mag,
)
from spectransfer.surveys.fitsfile import FitsFile, Header

# LAMOST LRS (both file layouts): a spectrum is LMJD, plan, spectrograph, fibre; DR3+ files
# and the quasar catalogues also carry OBSID, matched first when both sides have it. LAMOST
# has no redshift warning flag; the coverage cut is the paper's SDSS one. Its relative flux
# calibration is good to ~10% in broad-band shape (Du et al. 2016, ApJS 227, 27), and each
# spectrum is spliced from a blue (3700-5900 A) and a red arm (5700-9000 A; Cui et al. 2012,
# RAA 12, 1197) whose scales differ: the template fits carry a quadratic calibration and a
# red-arm step at ARM_JOIN (the simulator's LAMOST instrument draws both errors there), and a
# free feature over the arms' overlap ARM_OVERLAP, where the splice leaves residuals: in the
# real files of ../shared/data their excess over the continuum across 5700-5930 A is a few A
# of equivalent width in most (|EW| < 7 A in 17 of 19 with data there, up to 31 sigma at high
# S/N) and 32 and 76 A in two faint DR2 files, a broad hump that the quasar templates took for
# Mg II at z 1.08 in a K5 star.
ARM_JOIN = 5900.0
ARM_OVERLAP = (5700.0, 5900.0)
LAMOST = register_survey(
    Survey(
        name="lamost",
        id_columns=(("obsid", "int64"), ("lmjd", "int64"), ("planid", "string"), ("spid", "int64"), ("fiberid", "int64")),
        spectrum_id="lamost-{lmjd}-{planid}-{spid:02d}-{fiberid:03d}",
        catalogue_keys=(("obsid",), ("lmjd", "planid", "spid", "fiberid")),
        zwarning_cut=False,
        calibration_order=2,
        arm_join=ARM_JOIN,
        arm_overlap=ARM_OVERLAP,
    )
)

LABEL = "lamost-image"
FLUX_UNIT = "relative (LAMOST flux is not absolutely calibrated)"
DEFAULT_ROWS = ("flux", "inverse", "wavelength", "andmask", "ormask")
REQUIRED_KEYS = ("LMJD", "PLANID", "SPID", "FIBERID")
_BANDS = set("ugrizyjhkvUBVRI")


def identify(path: str, fits: FitsFile) -> bool:
    hdr = fits.header(0)
    if int(hdr.get("NAXIS", 0)) != 2 or int(hdr.get("NAXIS2", 0)) < 3:
        return False
    return str(hdr.get("TELESCOP", "")).strip().upper() == "LAMOST" or ("PLANID" in hdr and "LMJD" in hdr)


def row_names(hdr: Header, n_rows: int) -> list[str]:
    """Names of the image rows from EXTEN0, or the usual order when it is absent or odd."""
    tokens = [t.lower() for t in re.split(r"[,\s]+", str(hdr.get("EXTEN0", ""))) if t]
    return tokens if len(tokens) == n_rows else list(DEFAULT_ROWS[:n_rows])


def read(path: str, fits: FitsFile) -> SpectrumRecord:
    hdr = fits.header(0)
    image = fits.image(0)
    if image.ndim != 2 or image.shape[0] < 3:
        raise SpectrumError(path, f"primary image has shape {image.shape}, expected (5, n_pixels)")
    rows = {name: i for i, name in reversed(list(enumerate(row_names(hdr, image.shape[0]))))}
    for name in ("flux", "inverse"):
        if name not in rows:
            raise SpectrumError(path, f"primary image has no '{name}' row (EXTEN0 = {hdr.get('EXTEN0')!r})")
    n = image.shape[1]
    wave = None
    if "wavelength" in rows:
        wave = image[rows["wavelength"]].astype(np.float64)
        if not (np.all(np.isfinite(wave)) and np.all(np.diff(wave) > 0) and wave[0] > 1000.0):
            wave = None  # a damaged wavelength row: fall back to the dispersion keywords
    if wave is None:
        if hdr.get("COEFF0") is None or hdr.get("COEFF1") is None:
            raise SpectrumError(path, "no usable wavelength row and no COEFF0/COEFF1 keywords")
        wave = 10.0 ** (float(hdr["COEFF0"]) + float(hdr["COEFF1"]) * np.arange(n, dtype=np.float64))
    mask = image[rows["andmask"]] if "andmask" in rows else np.zeros(n, dtype=np.uint32)
    return finish_record(lamost_record(path, LABEL, hdr, None, wave, image[rows["flux"]], image[rows["inverse"]], mask))


def lamost_record(
    path: str,
    label: str,
    hdr: Header,
    fallback: Header | None,
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray,
) -> SpectrumRecord:
    """A record from LAMOST header keywords (``fallback`` is searched for keys ``hdr`` lacks)."""

    def get(key: str) -> Any:
        value = hdr.get(key)
        if value is None and fallback is not None:
            value = fallback.get(key)
        return value

    for key in REQUIRED_KEYS:
        if get(key) is None:
            raise SpectrumError(path, f"header lacks keyword {key}")
    if get("VACUUM") is False:
        wave = air_to_vacuum(wave)
    ivar, restored = restore_zeroed(flux, ivar, mask)
    obsid = missing_int(get("OBSID"))
    extra: dict[str, Any] = {
        "wavemin": None,  # LAMOST states no coverage: taken from the good pixels
        "wavemax": None,
        "snr": _snr(get),
        "mag_r": _mag_r(get),
        "mag_r_source": _mag_r_source(get),
        "z_err": missing_float(get("Z_ERR")),
        "designation": missing_str(get("DESIG")),
        "objtype": missing_str(get("OBJTYPE")),
        "data_release": missing_str(get("DATA_V")),
        "restored_pixels": restored,
    }
    return SpectrumRecord(
        path=path,
        survey=LAMOST.name,
        format=label,
        ids={
            "obsid": obsid if obsid is not None and obsid > 0 else None,
            "lmjd": int(get("LMJD")),
            "planid": str(get("PLANID")).strip(),
            "spid": int(get("SPID")),
            "fiberid": int(get("FIBERID")),
        },
        ra=missing_float(get("RA")),
        dec=missing_float(get("DEC")),
        cls=missing_str(get("CLASS")),
        subclass=missing_str(get("SUBCLASS")),
        z=missing_float(get("Z")),
        zwarning=None,  # LAMOST has no redshift warning flags
        wave=wave,
        flux=flux,
        ivar=ivar,
        mask=mask,
        flux_unit=FLUX_UNIT,
        extra=extra,
    )


# The early LAMOST 1-D pipeline (DR1-DR2 files, pipeline v2.6-2.7, no DATA_V keyword) sets the
# inverse variance of low-signal pixels to 0 without an ANDMASK flag while keeping their flux:
# in the 16 such files of ../shared/data no pixel with ivar > 0 has flux <= 0 (DR7-DR10 files:
# 1-2% do), and at low S/N whole blue ends are zeroed (first pixel with ivar > 0 at 4039-4692 A
# in 4 of them; the flux is there, down to 3700 A). Taken as it is, such a spectrum fails the
# coverage cut, or is read from the pixels that scattered high only (a bluer, brighter blue end
# than the source's: two of those files, a K7 star and an unclassified source, scored P(QSO)
# 0.57 and 0.72). The paper's own reader used every pixel's flux. So a zeroed pixel with flux
# and no flag, where the signal around it is low (local S/N < RESTORE_MAX_SNR), gets its
# variance back from the scatter of the flux around it (the DER_SNR estimator, Stoehr et al.
# 2008, ASPC 394, 505, over blocks of RESTORE_BLOCK pixels) scaled to the pipeline's
# own noise where it gave one. Zeroed pixels at high S/N (the fixed telluric mask 7580-7680 A,
# cores of strong absorption lines in bright stars) stay masked.
RESTORE_MAX_SNR = 5.0
RESTORE_BLOCK = 81  # pixels (~1e-4 dex each) per block of the local noise and signal estimates
_DER_SNR = 1.482602 / np.sqrt(6.0)  # median |2f_i - f_i-2 - f_i+2| of unit Gaussian noise -> sigma


def restore_zeroed(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(ivar with the unflagged low-signal pixels the pipeline zeroed given back, their number).

    The local noise (DER_SNR) and signal (median flux) are block medians over RESTORE_BLOCK
    pixels, interpolated between block centres. Works on the reader's raw arrays (any float
    dtype, NaN possible); ``ivar`` is returned as it came (not copied) when no pixel qualifies."""
    f = np.asarray(flux, dtype=np.float64)
    iv = np.asarray(ivar, dtype=np.float64)
    has = np.isfinite(f) & (f != 0.0)
    cand = ~(iv > 0) & (np.asarray(mask) == 0) & has
    if not cand.any():
        return ivar, 0
    fv = np.where(has, f, np.nan)
    second = np.full(f.shape, np.nan)
    second[2:-2] = np.abs(2.0 * fv[2:-2] - fv[:-4] - fv[4:])
    sigma = _DER_SNR * _block_median(second)
    level = _block_median(fv)
    good = (iv > 0) & np.isfinite(iv) & (sigma > 0)
    ratio = 1.0 / np.sqrt(iv[good]) / sigma[good] if good.any() else np.ones(1)
    scale = float(np.clip(np.median(ratio), 0.5, 2.0))  # DER_SNR -> the pipeline's noise convention
    cand &= (sigma > 0) & (np.abs(level) < RESTORE_MAX_SNR * sigma)
    if not cand.any():
        return ivar, 0
    out = np.array(iv, copy=True)
    out[cand] = 1.0 / (scale * sigma[cand]) ** 2
    return out.astype(np.asarray(ivar).dtype, copy=False), int(cand.sum())


def _block_median(values: np.ndarray) -> np.ndarray:
    """Per pixel: the medians of RESTORE_BLOCK-pixel blocks of ``values`` (NaN ignored; blocks
    with fewer than a quarter finite left out), interpolated linearly between the blocks'
    centres (constant beyond the first and last); NaN everywhere when no block qualifies."""
    n, w = values.size, RESTORE_BLOCK
    nb = -(-n // w)
    v = np.full(nb * w, np.inf)
    ok = np.isfinite(values)
    v[:n] = np.where(ok, values, np.inf)
    v = np.sort(v.reshape(nb, w), axis=1)
    k = np.isfinite(v).sum(axis=1)
    rows = np.arange(nb)
    med = 0.5 * (v[rows, np.clip((k - 1) // 2, 0, w - 1)] + v[rows, np.clip(k // 2, 0, w - 1)])
    use = k >= w // 4
    if not use.any():
        return np.full(n, np.nan)
    centres = rows * w + 0.5 * (np.minimum(rows * w + w, n) - rows * w - 1)
    return np.interp(np.arange(n), centres[use], med[use])


def _snr(get: Any) -> float | None:
    """r-band S/N as the pipeline states it (SNRR; SN_R in DR1/DR2, where 99 means none)."""
    for key in ("SNRR", "SN_R"):
        v = missing_float(get(key), sentinels=(-9999.0, -999.0, 99.0))
        if v is not None and v >= 0:
            return v
    return None


def _mag_r(get: Any) -> float | None:
    """r-band magnitude from MAG_PS_R (DR8+) or the MAGn key whose MAGTYPE letter is 'r'."""
    mag = valid_mag(get("MAG_PS_R"))
    if mag is not None:
        return mag
    magtype = str(get("MAGTYPE") or "").strip()
    if magtype and set(magtype) <= _BANDS and "r" in magtype and len(magtype) <= 7:
        return valid_mag(get(f"MAG{magtype.index('r') + 1}"))
    return None


def _mag_r_source(get: Any) -> str | None:
    """Where ``_mag_r`` took the r magnitude from: Pan-STARRS (DR8+ MAG_PS_R) or the input catalogue's MAGn."""
    if valid_mag(get("MAG_PS_R")) is not None:
        return "lamost_ps1"
    return "lamost_input" if _mag_r(get) is not None else None


register(Reader(label=LABEL, survey=LAMOST.name, identify=identify, read=read, priority=5))
