"""The redshift columns of a candidate table: the network's z and its template refinement.

Every row gets the network's redshift (``Z_NET``, ``Z_NET_ERR``, ``Z_NET_PROB``: read from the
z head's distribution, NaN for a run without one). Spectra the model calls quasars are then
fitted with the DR16Q quasar templates (``ml.refine``): ``Z_PRED``, ``Z_PRED_ERR``, ``ZWARN_PRED``, ``DELTACHI2``
(NaN and ZWARN_NOT_FITTED for the others). The default is DESI's chain: QuasarNET's z, then
the templates in a window of ±0.0784(1+z) around it. Our network alone is not yet that good a
guide (shift head, LAMOST-pretrained, the demo's 375 fine-tuning steps: 4.7% catastrophic on
816 simulated test quasars, 9 of 14 real SDSS quasars within 3000 km/s), but it knows when:
the spectra whose ``Z_NET_PROB`` is below FULL_SCAN_BELOW get the whole range instead, and so
do those whose window fit warns (RESCAN_BITS: best z at the window's edge, or a rival minimum
within Δχ² 9), keeping the better fit: a confident head can still take one line for another.
Measured on those 816: window 0.25% catastrophic, full scan of every positive 0.37%, the
window 2-2.7x faster; on the 14 real quasars 13 right either way, the miss the z = 6.39
spectrum whose Lyα is off the grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spectransfer.candidates.decision import QSO_CHI2
from spectransfer.config import DEFAULT_GRID, Grid
from spectransfer.errors import EvaluateError
from spectransfer.ml.refine import (
    MIN_DELTACHI2,
    ZWARN_BITS,
    ZWARN_NO_NETWORK_Z,
    ZWARN_SMALL_DELTACHI2,
    ZWARN_WINDOW_EDGE,
    RefineResult,
    refine_redshifts,
)

REFINE_MODES = ("full", "window", "none")
DEFAULT_REFINE = "window"  # what discover and classify do unless told otherwise (evaluate scores the same)
ZWARN_NOT_FITTED = 1 << 8  # not fitted: the model does not call it a quasar, or refinement is off
ZWARN_PRED_BITS = {**ZWARN_BITS, "NOT_FITTED": ZWARN_NOT_FITTED}
# --refine window scans the whole range for spectra whose Z_NET_PROB is below this. Measured
# with the shift head (375 fine-tuning steps, two runs): of 816 simulated test quasars, the
# 59-64% at or above 0.7 held no catastrophic network z (those >= 0.5: 0.15-0.65%); of 14 real
# SDSS quasars, a z = 0.38 one at 0.51 had its window around a wrong z = 1.48.
FULL_SCAN_BELOW = 0.7
RESCAN_BITS = ZWARN_SMALL_DELTACHI2 | ZWARN_WINDOW_EDGE  # window fits that are rescanned over 0-7
REDSHIFT_COLUMNS = ("Z_NET", "Z_NET_ERR", "Z_NET_PROB", "Z_PRED", "Z_PRED_ERR", "ZWARN_PRED", "DELTACHI2")


def check_refine(mode: str) -> str:
    if mode not in REFINE_MODES:
        raise EvaluateError(f"--refine must be one of {', '.join(REFINE_MODES)}, got {mode!r}")
    return mode


def redshift_columns(
    outputs: dict[str, np.ndarray], positive: np.ndarray, flux: Any, ivar: Any, mode: str = "full", grid: Grid = DEFAULT_GRID
) -> dict[str, np.ndarray]:
    """The redshift columns for n spectra: network z from ``outputs`` (``z_net``, ``z_net_err``,
    ``z_net_prob`` when the run has a z head), refined z for the ``positive`` ones.

    ``flux``, ``ivar``: (n, n_bins) arrays on ``grid`` (the store's), or a callable that
    returns them for an index array (so only the positives are read)."""
    positive = np.asarray(positive, dtype=bool)
    n = positive.size
    nan = np.full(n, np.nan)
    nan32 = np.full(n, np.nan, dtype=np.float32)
    # the network's outputs are float32 and stay so until written (f8 columns): 12 bytes a spectrum less
    cols = {
        "Z_NET": np.array(outputs.get("z_net", nan32), dtype=np.float32),
        "Z_NET_ERR": np.array(outputs.get("z_net_err", nan32), dtype=np.float32),
        "Z_NET_PROB": np.array(outputs.get("z_net_prob", nan32), dtype=np.float32),
        "Z_PRED": nan.copy(),
        "Z_PRED_ERR": nan.copy(),
        "ZWARN_PRED": np.full(n, ZWARN_NOT_FITTED, dtype=np.int32),
        "DELTACHI2": nan.copy(),
    }
    fit = np.flatnonzero(positive)
    if mode == "none" or fit.size == 0:
        return cols
    if callable(flux):
        f, iv = flux(fit)
    else:
        f, iv = np.asarray(flux)[fit], np.asarray(ivar)[fit]
    z_net = cols["Z_NET"][fit].astype(np.float64)  # the spectra fitted only
    z_err = cols["Z_NET_ERR"][fit].astype(np.float64)
    window = mode == "window" and np.isfinite(z_net).all()
    guide = z_net.copy()
    if window:  # where the head itself doubts its z, the window might miss the truth: scan it all
        guide[cols["Z_NET_PROB"][fit] < FULL_SCAN_BELOW] = np.nan
    res = refine_redshifts(f, iv, guide if window else None, z_err if window else None, grid)
    if window:
        known = np.asarray(outputs.get(QSO_CHI2, nan), dtype=np.float64)[fit]
        res = _rescan_doubtful(res, f, iv, np.isfinite(guide), known, grid)
    zwarn = res.zwarn.copy()
    # a full scan on purpose: "no network z" only where the network gave none
    zwarn[np.isfinite(z_net)] &= ~ZWARN_NO_NETWORK_Z
    cols["Z_PRED"][fit] = res.z
    cols["Z_PRED_ERR"][fit] = res.z_err
    cols["DELTACHI2"][fit] = res.deltachi2
    cols["ZWARN_PRED"][fit] = zwarn
    return cols


def _rescan_doubtful(
    res: RefineResult, flux: Any, ivar: Any, windowed: np.ndarray, known_chi2: np.ndarray, grid: Grid
) -> RefineResult:
    """Scan the whole range where the window's own fit warns (its best z at the window's edge,
    or a rival minimum within Δχ² 9), or where the quasar templates are already known to fit
    better elsewhere (``known_chi2``: the template decision's full-range quasar χ², NaN where
    it did not run, more than Δχ² 9 below the window's): the network's z may have put the
    window around a wrong line identification. The full scan's answer is kept where it fits better."""
    with np.errstate(invalid="ignore"):
        elsewhere = known_chi2 < res.chi2 - MIN_DELTACHI2
    doubt = np.flatnonzero(windowed & (((res.zwarn & RESCAN_BITS) != 0) | elsewhere))
    if doubt.size == 0:
        return res
    full = refine_redshifts(np.asarray(flux)[doubt], np.asarray(ivar)[doubt], None, None, grid)
    better = full.chi2 < res.chi2[doubt]
    rows, take = doubt[better], np.flatnonzero(better)
    out = {k: getattr(res, k).copy() for k in ("z", "z_err", "chi2", "deltachi2", "zwarn", "npix")}
    for k in ("z", "z_err", "chi2", "deltachi2", "zwarn"):
        out[k][rows] = getattr(full, k)[take]
    return RefineResult(**out)
