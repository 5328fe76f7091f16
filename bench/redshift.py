"""Benchmark: redshift refinement spectra/s vs a per-spectrum least-squares loop, and the
network's forward throughput with and without the z head.

Run: PYTHONPATH=src .venv/bin/python bench/redshift.py [--n 1000] [--loop-n 16] [--threads 2]
     [--real ../shared/data/sdss] [--run RUN --store STORE]

The reference is the straightforward fitter: for each spectrum, for each trial z of its
window, np.linalg.lstsq of the weighted template matrix (4 bases + constant) against the
flux, both fitters on the same precomputed template arrays and the same windows. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _spectra(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy template quasars (S/N ~ 5 per pixel) on the grid, scaled as the store keeps them."""
    from spectransfer.config import DEFAULT_GRID
    from spectransfer.data.resample import normalise
    from spectransfer.ml.refine import template_spectrum

    rng = np.random.default_rng(seed)
    z = rng.uniform(0.1, 4.5, n)
    coef = np.column_stack([np.ones(n), rng.normal(0, 0.15, (n, 3))])
    clean = np.array([template_spectrum(zi, ci) for zi, ci in zip(z, coef)])
    sigma = 0.2 * np.abs(clean).mean(axis=1, keepdims=True)
    flux, ivar = normalise(clean + rng.normal(size=clean.shape) * sigma, np.broadcast_to(1 / sigma**2, clean.shape), DEFAULT_GRID)
    return flux, ivar, z


def _loop_reference(flux: np.ndarray, ivar: np.ndarray, z_net: np.ndarray) -> np.ndarray:
    """Best trial z of each spectrum by np.linalg.lstsq at every trial of its window."""
    from spectransfer.ml import refine

    scan = refine._scan()
    n_bins = flux.shape[1]
    best = np.empty(len(flux))
    for i, trials in enumerate(refine.window_trials(z_net)):
        sw = np.sqrt(ivar[i].astype(np.float64))
        chi2 = np.empty(trials.size)
        for k, m in enumerate(trials):
            t = next(t for t in scan.templates if t.lo <= m < t.hi)
            start = t.hi - 1 - m
            design = np.vstack([t.ext[:, start : start + n_bins], np.ones(n_bins)]).T
            coef, *_ = np.linalg.lstsq(design * sw[:, None], flux[i] * sw, rcond=None)
            chi2[k] = float(((flux[i] - design @ coef) * sw) @ ((flux[i] - design @ coef) * sw))
        best[i] = scan.z_of(trials[np.argmin(chi2)])
    return best


def _forward_rates(heads: dict[str, tuple[int, str]], batch: int, repeats: int) -> dict[str, float]:
    """Spectra/s of the network's forward with each z head (name -> (z_bins, kind)); the
    models take turns, so a shared machine's changing load falls on all of them alike."""
    import torch

    from spectransfer.ml.models import ModelConfig, build_model, forward_outputs

    torch.manual_seed(0)
    models = {k: build_model(ModelConfig(n_bins=2048, z_bins=b, z_head_kind=kind)).eval() for k, (b, kind) in heads.items()}
    x = torch.randn(batch, 1, 2048)
    best = dict.fromkeys(models, np.inf)
    with torch.no_grad():
        for model in models.values():
            forward_outputs(model, x)
        for _ in range(repeats):
            for k, model in models.items():
                t0 = time.perf_counter()
                forward_outputs(model, x)
                best[k] = min(best[k], time.perf_counter() - t0)
    return {k: batch / v for k, v in best.items()}


def real_files(folder: str) -> list[dict]:
    """Full-range template scan (no network z) of every pipeline-QSO file in ``folder``,
    resampled onto the grid as ingest does; Δv against the file's own pipeline z."""
    from pathlib import Path

    from spectransfer.config import DEFAULT_GRID
    from spectransfer.data.resample import normalise, resample_record
    from spectransfer.errors import SpectrumError
    from spectransfer.ml import refine
    from spectransfer.surveys import read_spectrum

    rows = []
    for path in sorted(Path(folder).iterdir()):
        try:
            rec = read_spectrum(path)
        except SpectrumError:
            continue
        if rec.cls != "QSO" or rec.z is None:
            continue
        flux, ivar = normalise(*resample_record(rec), DEFAULT_GRID)
        res = refine.refine_redshifts(flux[None], ivar[None], None)
        dv = float(refine.velocity_offset_kms(res.z[0], rec.z))
        rows.append(
            {
                "file": path.name,
                "z_pipeline": rec.z,
                "z_fit": round(float(res.z[0]), 5),
                "dv_kms": round(dv, 1),
                "z_err": float(res.z_err[0]),
                "deltachi2": round(float(res.deltachi2[0]), 1),
                "zwarn": int(res.zwarn[0]),
                "npix": int(res.npix[0]),
            }
        )
        print(
            f"{path.name}: pipeline z {rec.z:.4f}, fit z {res.z[0]:.4f}, dv {dv:+.0f} km/s, "
            f"deltachi2 {res.deltachi2[0]:.1f}, zwarn {res.zwarn[0]}, good pixels {res.npix[0]}"
        )
    return rows


def run_on_store(run: str, store_path: str, split: str = "test", batch: int = 64) -> dict:
    """Network z, then refined z, of the ``split`` quasars (with a catalogue z) of a store,
    against that catalogue z; and whether the 10% largest network z_err hold more failures."""
    import torch

    from spectransfer.data.store import open_store
    from spectransfer.ml import refine
    from spectransfer.ml.dataset import select
    from spectransfer.ml.models import forward_outputs, load_run, redshift_from_head

    model, info = load_run(run)
    if not info.model_config.has_z_head:
        raise SystemExit(f"{run}: the model has no z head")
    store = open_store(store_path)
    sel = select(store, split=split)
    rows = sel.rows[np.isfinite(sel.z_of(sel.rows))]
    z_true = sel.z_of(rows).astype(np.float64)
    flux = np.asarray(store.flux[:])[rows]
    ivar = np.asarray(store.ivar[:])[rows]
    z_net, z_err = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            out = forward_outputs(model, torch.from_numpy(flux[i : i + batch]))
            zn, ze = redshift_from_head(out["z_logits"])
            z_net.append(zn)
            z_err.append(ze)
    z_net, z_err = np.concatenate(z_net), np.concatenate(z_err)
    res = refine.refine_redshifts(flux, ivar, z_net, z_err, store.grid)
    net_m, ref_m = refine.redshift_metrics(z_net, z_true), refine.redshift_metrics(res.z, z_true)
    full_m = refine.redshift_metrics(refine.refine_redshifts(flux, ivar, None, grid=store.grid).z, z_true)
    cat_net = np.abs(refine.velocity_offset_kms(z_net, z_true)) > refine.CATASTROPHIC_KMS
    top = z_err >= np.quantile(z_err, 0.9)
    share = float(cat_net[top].sum() / max(cat_net.sum(), 1))
    cat_ref = np.abs(refine.velocity_offset_kms(res.z, z_true)) > refine.CATASTROPHIC_KMS
    flagged = res.zwarn != 0
    print(
        f"{run} on {split} quasars ({len(rows)}): network catastrophic {net_m['catastrophic_fraction']:.3f}, "
        f"median |dv| {net_m['median_abs_dv_kms']:.0f} km/s; refined catastrophic {ref_m['catastrophic_fraction']:.3f}, "
        f"median |dv| {ref_m['median_abs_dv_kms']:.0f} km/s; full-range template scan alone catastrophic "
        f"{full_m['catastrophic_fraction']:.3f}, median |dv| {full_m['median_abs_dv_kms']:.0f} km/s"
    )
    print(
        f"  the 10% largest network z_err hold {share:.0%} of the network's catastrophic failures "
        f"({int(cat_net[top].sum())}/{int(cat_net.sum())}); refined failures with ZWARN_PRED != 0: "
        f"{int((cat_ref & flagged).sum())}/{int(cat_ref.sum())}, good ones flagged {int((~cat_ref & flagged).sum())}/{int((~cat_ref).sum())}"
    )
    return {
        "store_n_quasars": len(rows),
        "network": net_m,
        "refined": ref_m,
        "full_scan": full_m,
        "top10_zerr_share_of_catastrophic": share,
        "refined_catastrophic_flagged": int((cat_ref & flagged).sum()),
        "refined_catastrophic": int(cat_ref.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="spectra for the vectorised fitter")
    ap.add_argument("--loop-n", type=int, default=16, help="spectra for the per-spectrum reference loop")
    ap.add_argument("--threads", type=int, default=2, help="threads (FFT workers, torch threads)")
    ap.add_argument("--batch", type=int, default=256, help="network batch size")
    ap.add_argument("--real", default=None, help="also scan the pipeline-QSO files of this folder (SDSS/LAMOST)")
    ap.add_argument("--run", default=None, help="a run with a z head: measure it (and the refinement) on --store")
    ap.add_argument("--store", default=None, help="store whose test quasars --run is measured on")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from spectransfer.ml import refine

    torch.set_num_threads(args.threads)
    flux, ivar, z = _spectra(args.n)
    rng = np.random.default_rng(1)
    z_net = z + rng.normal(0, 0.01, z.size) * (1 + z)  # a network good to ~3000 km/s
    refine.refine_redshifts(flux[:32], ivar[:32], z_net[:32], workers=args.threads)  # warm the template cache
    t0 = time.perf_counter()
    res = refine.refine_redshifts(flux, ivar, z_net, workers=args.threads)
    fast_rate = args.n / (time.perf_counter() - t0)
    metrics = refine.redshift_metrics(res.z, z)
    print(
        f"vectorised refinement: {fast_rate:.0f} spectra/s on {args.threads} thread(s) "
        f"({args.n} spectra; catastrophic {metrics['catastrophic_fraction']:.4f}, median |dv| {metrics['median_abs_dv_kms']:.0f} km/s)"
    )

    k = min(args.loop_n, args.n)
    t0 = time.perf_counter()
    ref = _loop_reference(flux[:k], ivar[:k], z_net[:k])
    loop_rate = k / (time.perf_counter() - t0)
    # the reference's best trial vs ours before the parabola: the same trial
    ours = refine._scan().z_of(np.rint(refine._scan().m_of(res.z[:k])))
    agree = float(np.mean(np.abs(refine.velocity_offset_kms(ours, ref)) < 130.0))
    print(
        f"per-spectrum lstsq loop: {loop_rate:.2f} spectra/s ({k} spectra); speed-up {fast_rate / loop_rate:.0f}x; "
        f"same best trial (within one step) for {agree:.0%}"
    )

    from spectransfer.config import DEFAULT_GRID
    from spectransfer.ml.models import Z_BINS, shift_z_bins

    heads = {"none": (0, "dense"), "shift": (shift_z_bins(DEFAULT_GRID.log_step), "shift"), "dense": (Z_BINS, "dense")}
    rates = _forward_rates(heads, args.batch, 6)
    without, with_z, with_dense = rates["none"], rates["shift"], rates["dense"]
    drop = 1 - with_z / without
    print(
        f"network forward (VGG-A, 2048 bins, batch {args.batch}): {without:.0f} spectra/s without the z head, "
        f"{with_z:.0f} with the shift z head ({drop:+.1%} slower), {with_dense:.0f} with the dense one"
    )
    real = {}
    if args.real:
        rows = real_files(args.real)
        dv = np.array([r["dv_kms"] for r in rows])
        real = {
            "real_n": len(rows),
            "real_within_3000_kms": int((np.abs(dv) < 3000).sum()),
            "real_median_abs_dv_kms": float(np.median(np.abs(dv))) if rows else None,
        }
        print(f"real files: {real['real_within_3000_kms']}/{len(rows)} within 3000 km/s of the pipeline z")
    on_store = run_on_store(args.run, args.store) if args.run and args.store else {}
    print(
        json.dumps(
            {
                "refine_spectra_per_s": round(fast_rate, 1),
                "loop_spectra_per_s": round(loop_rate, 3),
                "speedup_vs_loop": round(fast_rate / loop_rate, 1),
                "same_best_trial_fraction": agree,
                "refine_catastrophic_fraction": metrics["catastrophic_fraction"],
                "refine_median_abs_dv_kms": round(metrics["median_abs_dv_kms"], 1),
                "forward_per_s_without_z_head": round(without, 1),
                "forward_per_s_with_z_head": round(with_z, 1),
                "forward_drop_fraction": round(drop, 4),
                "forward_per_s_with_dense_z_head": round(with_dense, 1),
                "threads": args.threads,
                **real,
                **({"store": on_store} if on_store else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
