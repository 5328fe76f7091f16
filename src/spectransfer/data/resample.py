"""Flux-conserving resampling of survey spectra onto the network's common grid.

Every output bin's flux is the overlap-weighted mean of the input pixel flux densities that
fall in it, with input pixel edges half way (in wavelength) between pixel centres and output
bin edges from ``Grid.edges`` (the same construction from the bin centres). This is the
definition of ``spectres`` (Carnall 2017), which the paper used; unlike ``spectres`` it

* propagates inverse variance and ignores bad pixels (ivar 0, a non-zero mask bit, or a
  non-finite value): they get weight 0 and the bin is the weighted mean of the good pixels;
* is vectorised: the (2048 x n_pix) overlap-weight matrix of an input wavelength grid is
  built once (a scipy CSR matrix, cached per grid) and applied to a whole batch of spectra
  as one sparse matrix product, instead of a Python loop over the 2048 output bins.

For bin j with overlap lengths ``w_ij`` (Angstrom) of good pixels i::

    flux_j = sum_i w_ij f_i / sum_i w_ij
    var_j  = sum_i w_ij^2 var_i / (sum_i w_ij)^2,      ivar_j = 1 / var_j

A bin with no good pixel gets flux 0 and ivar 0 (no interpolation: the network sees "no
data" through ivar, and ``normalise`` keeps such bins at 0). Where no pixel is masked and
the input covers the bin, this equals ``spectres(grid.centers, wave, flux, errs)``. A bin
only partly covered by the input's pixels (at the ends of the spectrum) is the mean over the
covered part, where ``spectres`` returns its fill value.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from spectransfer.config import DEFAULT_GRID, Grid, centre_edges
from spectransfer.surveys.base import SpectrumRecord

log = logging.getLogger(__name__)

# Rows of a batch processed at once. Small chunks keep the transposed copies and the
# products in the CPU cache, which matters more than the matmul's vector length (32 rows was
# fastest on a 1 MiB-L2 EPYC; 1024 rows was three times slower).
CHUNK_ROWS = 32
_CACHE_SIZE = 64
_cache: OrderedDict[tuple[str, Grid], _Weights] = OrderedDict()
_cache_lock = threading.Lock()

# The brightest night-sky emission lines (vacuum Å): [O I] 5577, Na D, [O I] 6300 and 6364
# (Osterbrock et al. 1996, PASP 108, 277). Sky subtraction leaves residuals there whose
# amplitude is set by the sky, not the object: in the shared real files the residual at 5577
# is the brightest or faintest bin of 9 of 27 SDSS spectra (the simulation: 2%), and in 4 of
# them min-max scaling over it squeezed the object's own spectrum into 1/7 to 1/55 of the range.
# ``normalise`` with a grid therefore takes the scale from the other bins (SKY_HALF_WIDTH Å
# either side of each line left out); the sky bins keep their data, clipped to [-1, 1].
BRIGHT_SKY_LINES = (5578.89, 5891.5, 5897.5, 6302.05, 6365.54)
SKY_HALF_WIDTH = 5.0
SCALING = "min-max away from the bright sky lines"  # recorded in store.json: how its rows were scaled


def pixel_edges(wave: np.ndarray) -> np.ndarray:
    """Edges (n+1,) of pixels centred on ``wave`` (:func:`spectransfer.config.centre_edges`,
    the construction of the grid's bin edges), after checking the array."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1 or wave.shape[0] < 2:
        raise ValueError(f"wavelength array must be 1-D with at least 2 pixels, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        raise ValueError("wavelength array must be finite and strictly increasing")
    return centre_edges(wave)


class _Weights:
    """The overlap matrix of one input grid and the forms of it the batch paths use."""

    def __init__(self, w: sp.csr_matrix) -> None:
        self.w = w  # (n_out, n_in) overlap lengths in Angstrom
        self.w2 = w.multiply(w).tocsr()
        rowsum = np.asarray(w.sum(axis=1)).ravel()
        inv = np.divide(1.0, rowsum, out=np.zeros_like(rowsum), where=rowsum > 0)
        # Row-normalised weights for batches without bad pixels (one product fewer).
        self.wn = sp.diags(inv) @ w
        self.wn2 = sp.diags(inv * inv) @ self.w2
        self.wn = self.wn.tocsr()
        self.wn2 = self.wn2.tocsr()


def overlap_matrix(wave: np.ndarray, grid: Grid = DEFAULT_GRID) -> sp.csr_matrix:
    """(grid.n_bins x n_pix) CSR matrix of overlap lengths (Angstrom) of pixel i with bin j.

    Cached per unique wavelength array (keyed by a hash of its bytes) and grid.
    """
    return _weights(wave, grid).w


def _weights(wave: np.ndarray, grid: Grid) -> _Weights:
    wave = np.ascontiguousarray(wave, dtype=np.float64)
    key = (hashlib.blake2b(wave.tobytes(), digest_size=16).hexdigest() + f":{wave.shape[0]}", grid)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    weights = _Weights(_build_overlap(wave, grid))
    with _cache_lock:
        _cache[key] = weights
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return weights


def _build_overlap(wave: np.ndarray, grid: Grid) -> sp.csr_matrix:
    # Cut the wavelength axis at every input and output edge: each resulting segment lies in
    # exactly one pixel and one bin, and its length is their overlap (one segment per pair).
    e_in = pixel_edges(wave)
    e_out = grid.edges
    n_in, n_out = wave.shape[0], e_out.shape[0] - 1
    lo, hi = max(e_in[0], e_out[0]), min(e_in[-1], e_out[-1])
    if hi <= lo:
        return sp.csr_matrix((n_out, n_in))
    cuts = np.concatenate(([lo, hi], e_in[(e_in > lo) & (e_in < hi)], e_out[(e_out > lo) & (e_out < hi)]))
    cuts = np.unique(cuts)
    length = np.diff(cuts)
    mid = 0.5 * (cuts[:-1] + cuts[1:])
    pix = np.searchsorted(e_in, mid, side="right") - 1
    out = np.searchsorted(e_out, mid, side="right") - 1
    keep = length > 0
    w = sp.coo_matrix((length[keep], (out[keep], pix[keep])), shape=(n_out, n_in)).tocsr()
    w.sum_duplicates()
    return w


def _good_pixels(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    good = ivar > 0  # False for NaN
    good &= ivar < np.inf
    good &= np.isfinite(flux)
    if mask is not None:
        good &= mask == 0
    return good


def _resample_shared(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray | None,
    grid: Grid,
    out_flux: np.ndarray,
    out_ivar: np.ndarray,
) -> None:
    """Resample rows sharing one wavelength array into the given output rows."""
    wt = _weights(wave, grid)
    n = flux.shape[0]
    for r0 in range(0, n, CHUNK_ROWS):
        r1 = min(n, r0 + CHUNK_ROWS)
        f, iv = flux[r0:r1], ivar[r0:r1]
        m = None if mask is None else mask[r0:r1]
        good = _good_pixels(f, iv, m)
        # The sparse product wants the pixel axis first, C-contiguous: (n_in, rows).
        with np.errstate(divide="ignore", invalid="ignore"):
            if good.all():
                ft = np.array(f.T, dtype=np.float64, order="C")
                vt = np.reciprocal(iv.T, dtype=np.float64, order="C")
                fo = wt.wn @ ft  # uncovered bins have all-zero weight rows -> 0
                vo = wt.wn2 @ vt
                ok = vo > 0
            else:
                gt = np.array(good.T, dtype=np.float64, order="C")
                ft = np.array(np.where(good, f, 0.0).T, dtype=np.float64, order="C")
                vt = np.array(np.where(good, np.reciprocal(iv, dtype=np.float64), 0.0).T, order="C")
                s = wt.w @ gt
                ok = s > 0
                fo = np.where(ok, (wt.w @ ft) / s, 0.0)
                vo = (wt.w2 @ vt) / (s * s)
                ok &= vo > 0
            out_flux[r0:r1] = fo.T
            out_ivar[r0:r1] = np.divide(1.0, vo, out=np.zeros_like(vo), where=ok).T


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {a.shape}")
    return a


def resample_batch(
    wave: np.ndarray | Sequence[np.ndarray],
    flux: np.ndarray | Sequence[np.ndarray],
    ivar: np.ndarray | Sequence[np.ndarray],
    mask: np.ndarray | Sequence[np.ndarray] | None = None,
    grid: Grid = DEFAULT_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a batch of spectra onto ``grid``; returns (flux (N, n_bins), ivar (N, n_bins)) f8.

    ``wave`` is one wavelength array (n_pix,) shared by every row of ``flux``/``ivar``/``mask``
    (N, n_pix), or one per row (N, n_pix); or all four are sequences of 1-D arrays of
    varying length (e.g. LAMOST files with 3904..3909 pixels). Rows with identical
    wavelength arrays are grouped and share one weight matrix. ``mask`` non-zero = bad.
    """
    if isinstance(flux, np.ndarray) and flux.ndim in (1, 2):
        f2 = _as_2d(flux, "flux")
        iv2 = _as_2d(np.asarray(ivar), "ivar")
        m2 = None if mask is None else _as_2d(np.asarray(mask), "mask")
        if iv2.shape != f2.shape or (m2 is not None and m2.shape != f2.shape):
            raise ValueError(f"flux {f2.shape}, ivar {iv2.shape} and mask shapes differ")
        w = np.asarray(wave, dtype=np.float64)
        n = f2.shape[0]
        out_f = np.zeros((n, grid.n_bins))
        out_iv = np.zeros((n, grid.n_bins))
        if w.ndim == 1:
            if w.shape[0] != f2.shape[1]:
                raise ValueError(f"wave has {w.shape[0]} pixels, flux {f2.shape[1]}")
            _resample_shared(w, f2, iv2, m2, grid, out_f, out_iv)
            return out_f, out_iv
        if w.shape != f2.shape:
            raise ValueError(f"wave shape {w.shape} does not match flux {f2.shape}")
        rows_of = _group_rows([w[i] for i in range(n)])
        for rows in rows_of:
            idx = np.asarray(rows)
            sub_f, sub_iv = np.empty((len(idx), grid.n_bins)), np.empty((len(idx), grid.n_bins))
            _resample_shared(w[idx[0]], f2[idx], iv2[idx], None if m2 is None else m2[idx], grid, sub_f, sub_iv)
            out_f[idx], out_iv[idx] = sub_f, sub_iv
        return out_f, out_iv

    # Ragged input: sequences of 1-D arrays.
    waves = [np.asarray(x, dtype=np.float64) for x in wave]
    fluxes = [np.asarray(x) for x in flux]
    ivars = [np.asarray(x) for x in ivar]
    masks = None if mask is None else [np.asarray(x) for x in mask]
    n = len(fluxes)
    if not (len(waves) == len(ivars) == n and (masks is None or len(masks) == n)):
        raise ValueError("wave, flux, ivar and mask sequences differ in length")
    out_f = np.zeros((n, grid.n_bins))
    out_iv = np.zeros((n, grid.n_bins))
    for rows in _group_rows(waves):
        idx = np.asarray(rows)
        f2 = np.stack([fluxes[i] for i in rows])
        iv2 = np.stack([ivars[i] for i in rows])
        m2 = None if masks is None else np.stack([masks[i] for i in rows])
        if f2.shape[1] != waves[rows[0]].shape[0] or iv2.shape != f2.shape:
            raise ValueError(f"spectrum {rows[0]}: wave, flux and ivar lengths differ")
        sub_f, sub_iv = np.empty((len(idx), grid.n_bins)), np.empty((len(idx), grid.n_bins))
        _resample_shared(waves[rows[0]], f2, iv2, m2, grid, sub_f, sub_iv)
        out_f[idx], out_iv[idx] = sub_f, sub_iv
    return out_f, out_iv


def _group_rows(waves: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of rows grouped by identical wavelength arrays (hash of bytes, then equality)."""
    groups: dict[str, list[int]] = {}
    for i, w in enumerate(waves):
        w = np.ascontiguousarray(w, dtype=np.float64)
        key = hashlib.blake2b(w.tobytes(), digest_size=16).hexdigest() + f":{w.shape[0]}"
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def resample_record(record: SpectrumRecord, grid: Grid = DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Resample one ``SpectrumRecord``; returns (flux (n_bins,), ivar (n_bins,)) float64."""
    f, iv = resample_batch(record.wave, record.flux[None, :], record.ivar[None, :], record.mask[None, :], grid)
    return f[0], iv[0]


@lru_cache(maxsize=8)
def scale_bins(grid: Grid) -> np.ndarray:
    """Bins of ``grid`` that may set a spectrum's min-max scale: all but those within
    SKY_HALF_WIDTH Å of a BRIGHT_SKY_LINES line (read-only bool array)."""
    centres = grid.centers
    keep = np.ones(centres.size, dtype=bool)
    for line in BRIGHT_SKY_LINES:
        keep &= np.abs(centres - line) > SKY_HALF_WIDTH
    keep.setflags(write=False)
    return keep


def normalise(flux: np.ndarray, ivar: np.ndarray, grid: Grid | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Min-max scale each spectrum to [-1, 1] over its bins with ivar > 0; float32 out.

    With ``s = 2 / (max - min)`` the flux becomes ``(flux - min) * s - 1`` and the ivar
    ``ivar / s**2`` (the variance scales with the flux squared). Bins with ivar 0 are set
    to flux 0 and keep ivar 0. A spectrum with no good bin is all zeros; one whose good
    bins all hold the same value maps to 0 with its ivar unscaled (s = 1).
    With ``grid`` (the arrays' grid), min and max come from the good bins of
    ``scale_bins(grid)``, away from the bright sky lines, whose bins are scaled the same way
    and clipped to [-1, 1] (a spectrum with data only there falls back to all good bins).
    Accepts (n_bins,) or (N, n_bins).
    """
    f = np.asarray(flux, dtype=np.float64)
    iv = np.asarray(ivar, dtype=np.float64)
    one = f.ndim == 1
    f2, iv2 = np.atleast_2d(f), np.atleast_2d(iv)
    if f2.shape != iv2.shape:
        raise ValueError(f"flux {f.shape} and ivar {iv.shape} shapes differ")
    good = (iv2 > 0) & np.isfinite(iv2) & np.isfinite(f2)
    if grid is None:
        fmin, fmax = _extremes(f2, good)
    else:
        if grid.n_bins != f2.shape[1]:
            raise ValueError(f"flux has {f2.shape[1]} bins, the grid {grid.n_bins}")
        fmin, fmax = _extremes(f2, good & scale_bins(grid))
        back = ~(np.isfinite(fmax - fmin) & (fmax > fmin))  # no span away from the sky lines: all good bins
        if back.any():
            fmin[back], fmax[back] = _extremes(f2[back], good[back])
    span = fmax - fmin
    ok = np.isfinite(span) & (span > 0)
    scale = np.where(ok, 2.0 / np.where(ok, span, 1.0), 1.0)
    base = np.where(ok, fmin, 0.0)
    out_f = (f2 - base[:, None]) * scale[:, None] - 1.0
    out_f[~ok] = 0.0
    out_f[~good] = 0.0
    out_iv = np.where(good, iv2 / (scale * scale)[:, None], 0.0)
    out_f32, out_iv32 = out_f.astype(np.float32), out_iv.astype(np.float32)
    # float32 rounding must not leave [-1, 1].
    np.clip(out_f32, -1.0, 1.0, out=out_f32)
    if one:
        return out_f32[0], out_iv32[0]
    return out_f32, out_iv32


def _extremes(f: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.where(use, f, np.inf).min(axis=1, initial=np.inf), np.where(use, f, -np.inf).max(axis=1, initial=-np.inf)


def scale_noise(
    flux: np.ndarray, ivar: np.ndarray, k: np.ndarray, rng: np.random.Generator, grid: Grid | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised rows (N, n_bins) as a k times noisier observation would give them.

    Each row's noise grows by its k >= 1 (a k**2 times shorter sky-limited exposure): Gaussian
    noise of variance (k**2 - 1)/ivar is added and ivar divided by k**2, then the row is
    min-max normalised again (``normalise``, over ``grid``'s scale bins when given). Linear
    scaling commutes with this, so it works on normalised store rows as on raw fluxes. Bins
    without data stay empty; float32 out.
    """
    f = np.asarray(flux, dtype=np.float64)
    iv = np.asarray(ivar, dtype=np.float64)
    k2 = np.asarray(k, dtype=np.float64).reshape(-1, 1) ** 2
    if np.any(k2 < 1.0):
        raise ValueError("noise can only grow: every k must be >= 1")
    good = iv > 0
    sigma = np.where(good, 1.0 / np.sqrt(np.where(good, iv, 1.0)), 0.0)
    noisy = f + rng.standard_normal(f.shape) * sigma * np.sqrt(k2 - 1.0)
    return normalise(np.where(good, noisy, 0.0), iv / k2, grid)
