"""Benchmark: spectransfer.data.resample vs spectres on SDSS-like spectra, measured in one run.

spectres is timed two ways: called once per spectrum in a loop (as the paper's code does
per file; a subset is timed and scaled to the full count) and called once on the 2-D batch
with errors (its fastest use). spectres gets errors precomputed (1/sqrt(ivar)) outside its
timing; ours takes ivar and includes the conversion. Human lines first, one JSON line last.

    python bench/resample.py [--n 20000] [--loop-subset 500]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
from spectres import spectres

from spectransfer.config import DEFAULT_GRID
from spectransfer.data.resample import resample_batch


def sdss_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SDSS/BOSS-like coadds: log10 step 1e-4 from 3600 A to ~10400 A, positive flux, ivar."""
    rng = np.random.default_rng(seed)
    loglam = np.log10(3600.0) + 1e-4 * np.arange(4610)  # 3600 .. ~10390 A
    wave = 10.0**loglam
    cont = rng.uniform(1.0, 20.0, (n, 1)) * (wave / 5000.0) ** rng.uniform(-2.0, 1.0, (n, 1))
    ivar = rng.uniform(0.2, 5.0, (n, 1)) * rng.uniform(0.5, 1.5, (n, wave.size))
    flux = cont + rng.standard_normal((n, wave.size)) / np.sqrt(ivar)
    flux = np.abs(flux) + 0.01  # positive, so relative differences are well defined
    return wave, flux, ivar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="number of spectra")
    ap.add_argument("--loop-subset", type=int, default=500, help="spectra timed in the per-spectrum spectres loop")
    args = ap.parse_args()
    grid = DEFAULT_GRID
    wave, flux, ivar = sdss_like(args.n)
    err = 1.0 / np.sqrt(ivar)
    print(f"{args.n} spectra x {wave.size} pixels ({wave[0]:.1f}-{wave[-1]:.1f} A) -> {grid.n_bins} bins")

    resample_batch(wave, flux[:4], ivar[:4], grid=grid)  # warm-up (builds the cached weights once)
    resample_batch(wave, flux[:4], ivar[:4], grid=grid)
    t0 = time.perf_counter()
    out_f, out_iv = resample_batch(wave, flux, ivar, grid=grid)
    t_ours = time.perf_counter() - t0
    print(f"spectransfer.resample_batch: {t_ours:.3f} s ({args.n / t_ours:,.0f} spectra/s)")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ref_f, ref_e = spectres(grid.centers, wave, flux, spec_errs=err, verbose=False)
        t_batch = time.perf_counter() - t0
        print(f"spectres, one 2-D call with errors: {t_batch:.3f} s")

        k = min(args.loop_subset, args.n)
        t0 = time.perf_counter()
        for i in range(k):
            spectres(grid.centers, wave, flux[i], spec_errs=err[i], verbose=False)
        t_loop = (time.perf_counter() - t0) * args.n / k
        print(f"spectres, per-spectrum loop: {t_loop:.1f} s (timed on {k}, scaled to {args.n})")

    defined = np.isfinite(ref_f) & np.isfinite(ref_e)
    ref_iv = 1.0 / ref_e[defined] ** 2
    rel_f = np.abs(out_f[defined] - ref_f[defined]) / np.abs(ref_f[defined])
    rel_iv = np.abs(out_iv[defined] - ref_iv) / ref_iv
    max_rel = float(max(rel_f.max(), rel_iv.max()))
    print(
        f"bins compared: {defined.sum():,} of {defined.size:,}; max relative difference: flux {rel_f.max():.2e}, ivar {rel_iv.max():.2e}"
    )
    figures = {
        "n_spectra": args.n,
        "seconds": round(t_ours, 4),
        "speedup_vs_spectres": round(t_loop / t_ours, 1),
        "speedup_vs_spectres_batched": round(t_batch / t_ours, 2),
        "max_rel_diff": max_rel,
    }
    print(
        f"speed-up: {figures['speedup_vs_spectres']}x the spectres loop, {figures['speedup_vs_spectres_batched']}x the batched call"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
