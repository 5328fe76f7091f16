"""Benchmark: template-family fits (quasar, galaxy, star) spectra/s vs a per-spectrum lstsq loop.

The template decision (`classify`/`discover --templates`) fits every family to the spectra the
network is unsure of. This times `ml.spectype.fit_spectype` (FFT cross-correlations, batched
Cholesky solves) against the straightforward fitter: for each spectrum, each family and each
trial redshift, np.linalg.lstsq of the weighted template matrix (bases + constant), on the same
template arrays. With --catalogue (a discover output) it also prints the share of spectra in the
uncertain band and what that makes discover's template stage cost per scored spectrum.

Run: PYTHONPATH=src .venv/bin/python bench/spectype.py [--n 256] [--loop-n 3] [--threads 2]
     [--store STORE] [--catalogue CANDIDATES.parquet]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _spectra(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Galaxy and star archetypes and quasar means at random z, S/N ~ 5, scaled like the store."""
    from spectransfer.config import DEFAULT_GRID as GRID
    from spectransfer.data.resample import normalise
    from spectransfer.simulate.templated import redshift_to
    from spectransfer.templates import load_templates

    rng = np.random.default_rng(seed)
    t = load_templates()
    loglam = np.log10(GRID.wave_min) + np.arange(GRID.n_bins) * GRID.log_step
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            tpl, rest, z = t["galaxy"], t["galaxy"].archetypes(np.array([rng.integers(750)]))[0], rng.uniform(0.02, 0.8)
        elif kind == 1:
            name = ["star_a", "star_f", "star_g", "star_k", "star_m"][i % 5]
            tpl, z = t[name], 0.0
            rest = tpl.archetypes(np.array([rng.integers(tpl.coeff.shape[0])]))[0]
        else:
            z = rng.uniform(0.1, 4.0)
            tpl = t["qso_loz"] if z < 1.5 else t["qso_hiz"]
            rest = tpl.basis[0].astype(np.float64)
        out.append(redshift_to(tpl, rest[None, :], np.array([z]), loglam)[0])
    clean = np.array(out)
    sigma = 0.2 * np.abs(clean).mean(axis=1, keepdims=True)
    f, iv = normalise(clean + rng.normal(size=clean.shape) * sigma, np.broadcast_to(1 / sigma**2, clean.shape), GRID)
    return f.astype(np.float64), iv.astype(np.float64)


def _store_spectra(store: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    from spectransfer.data.store import open_store
    from spectransfer.ml.score import read_arrays

    st = open_store(store)
    rows = np.sort(np.random.default_rng(0).choice(st.rows(), size=min(n, st.n_rows), replace=False))
    f, iv = read_arrays(st.flux, st.ivar, rows)
    return np.asarray(f, np.float64), np.asarray(iv, np.float64)


def _loop_reference(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """The best χ² of each family per spectrum by np.linalg.lstsq at every trial."""
    from spectransfer.config import DEFAULT_GRID as GRID
    from spectransfer.ml.refine import _scan, template_on_grid
    from spectransfer.ml.spectype import STAR_LINE_FWHM_KMS, STAR_LINES, STAR_TYPES, _trials, _with_lines

    grid_n = flux.shape[1]
    tr = _trials(GRID)
    fams = [[(t, tr["qso"][(tr["qso"] >= t.lo) & (tr["qso"] < t.hi)]) for t in _scan(GRID).templates]]
    fams.append([(template_on_grid("galaxy", 0, int(tr["galaxy"][-1]) + 1, GRID), tr["galaxy"])])
    lo, hi = int(tr["star"][0]), int(tr["star"][-1]) + 1
    star_lines = tuple(STAR_LINES.items())
    # each star type alone, and with its Balmer emission vector (amplitude > 0 only)
    fams.append([(t, tr["star"]) for s in STAR_TYPES for t in _with_lines(s, lo, hi, GRID, star_lines, STAR_LINE_FWHM_KMS)])
    best = np.full((flux.shape[0], 3), np.inf)
    for i in range(flux.shape[0]):
        sw = np.sqrt(ivar[i])
        for k, fam in enumerate(fams):
            for t, trials in fam:
                sign = np.sign(t.ext[0].sum())
                for m in trials:
                    start = t.hi - 1 - m
                    design = np.column_stack([t.ext[:, start : start + grid_n].T, np.ones(grid_n)])
                    sol, *_ = np.linalg.lstsq(design * sw[:, None], flux[i] * sw, rcond=None)
                    if sol[0] * sign <= 0 or (t.name.endswith("+lines") and sol[t.k - 1] <= 0):
                        continue
                    best[i, k] = min(best[i, k], float(np.sum(ivar[i] * (flux[i] - design @ sol) ** 2)))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="spectra fitted by fit_spectype")
    ap.add_argument("--loop-n", type=int, default=3, help="spectra fitted by the lstsq loop (slow: ~7,500 solves each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store", default=None, help="take spectra from this store instead of synthetic ones")
    ap.add_argument("--catalogue", default=None, help="a discover output: share of spectra in the uncertain band")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from spectransfer.candidates.decision import UNCERTAIN, to_fit
    from spectransfer.ml.spectype import fit_spectype

    flux, ivar = _store_spectra(args.store, args.n) if args.store else _spectra(args.n)
    fit_spectype(flux[:16], ivar[:16], workers=args.threads)  # warm the template caches
    t0 = time.perf_counter()
    res = fit_spectype(flux, ivar, workers=args.threads)
    fast_s = time.perf_counter() - t0
    k = min(args.loop_n, flux.shape[0])
    t0 = time.perf_counter()
    ref = _loop_reference(flux[:k], ivar[:k])
    loop_s = time.perf_counter() - t0
    agree = bool(np.allclose(ref, res.chi2[:k], rtol=1e-6, atol=1e-6))
    rate, loop_rate = flux.shape[0] / fast_s, k / loop_s
    out = {
        "n": int(flux.shape[0]),
        "threads": args.threads,
        "spectype_spectra_per_s": round(rate, 1),
        "loop_spectra_per_s": round(loop_rate, 3),
        "speedup_vs_loop": round(rate / loop_rate, 1),
        "chi2_equal_to_loop": agree,
        "families": {f: int((res.spectype == f).sum()) for f in ("QSO", "GALAXY", "STAR")},
    }
    print(
        f"fit_spectype: {rate:.1f} spectra/s; lstsq loop: {loop_rate:.3f} spectra/s ({rate / loop_rate:.0f}x); same chi2: {agree}"
    )
    if args.catalogue:
        import pandas as pd

        p = pd.read_parquet(args.catalogue, columns=["P_QSO"])["P_QSO"].to_numpy()
        share = to_fit(p, "uncertain").size / max(p.size, 1)
        out["uncertain_share"] = round(share, 4)
        out["template_s_per_million_scored"] = round(share * 1e6 / rate, 0)
        print(
            f"{share:.1%} of {p.size} spectra lie in the band {UNCERTAIN}: {share * 1e6 / rate / 3600:.1f} h per million scored"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
