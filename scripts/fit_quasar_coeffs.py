"""Estimate the spread of DR16Q quasar PCA coefficients from real SDSS quasar spectra.

For every real SDSS file whose pipeline calls it QSO with a trustworthy redshift (ZWARNING 0,
0.05 < z < 5), fit the redrock quasar bases (LOZ below z = 1.4, HIZ above) at the pipeline
redshift by inverse-variance weighted least squares, over the rest-frame range both the data
and the template cover. Below z = 0.8 the five galaxy bases at the same redshift are fitted
alongside, so that host-galaxy light is not taken up by the quasar coefficients. The quasar
coefficients are normalised by the first (the mean spectrum), c[1:] / c[0], and their mean and
covariance per template written to src/spectransfer/simulate/qso_coeffs.json.

With so few quasars (a dozen spectra of fewer objects) the sample covariance is only a hint:
it is shrunk halfway to its diagonal, every standard deviation is widened by WIDEN and given a
floor of FLOOR times the spread of all fitted objects pooled over both templates, so the
simulation draws a wider family than the few real objects. Repeat epochs of one object are
averaged into one object first.

Usage: PYTHONPATH=src python scripts/fit_quasar_coeffs.py [DATA_DIR] (default ../shared/data)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from spectransfer.surveys.base import iter_spectrum_files, read_spectrum
from spectransfer.templates import Template, load_templates

Z_SPLIT = 1.4  # LOZ below, HIZ above (LOZ starts at 1329 A rest, HIZ ends at 4498 A rest)
Z_HOST = 0.8  # fit galaxy bases alongside below this
WIDEN = 1.5
FLOOR = 0.5
OUT = Path(__file__).resolve().parents[1] / "src" / "spectransfer" / "simulate" / "qso_coeffs.json"


def unit_basis(t: Template) -> np.ndarray:
    """The template's basis vectors scaled to unit rms (so coefficients compare across vectors)."""
    return t.basis / np.sqrt(np.mean(t.basis.astype(np.float64) ** 2, axis=1, keepdims=True))


def fit_one(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, z: float) -> tuple[str, np.ndarray, float]:
    """(template name, quasar coefficients, host share of the 4000-5500 A rest flux)."""
    t = load_templates()
    name = "qso_loz" if z < Z_SPLIT else "qso_hiz"
    q = t[name]
    rest = wave / (1.0 + z)
    parts = [q]
    if z < Z_HOST:
        parts.append(t["galaxy"])
    lo = max(p.wave[0] for p in parts)
    hi = min(p.wave[-1] for p in parts)
    ok = (ivar > 0) & np.isfinite(flux) & (rest > lo) & (rest < hi)
    cols = np.concatenate([np.stack([np.interp(rest[ok], p.wave, b) for b in unit_basis(p)], axis=1) for p in parts], axis=1)
    w = np.sqrt(ivar[ok])
    coef, *_ = np.linalg.lstsq(cols * w[:, None], flux[ok] * w, rcond=None)
    k = q.basis.shape[0]
    qso = cols[:, :k] @ coef[:k]
    host = cols[:, k:] @ coef[k:] if len(parts) > 1 else np.zeros_like(qso)
    band = (rest[ok] > 4000) & (rest[ok] < 5500)
    share = float(np.sum(host[band]) / max(np.sum(host[band] + qso[band]), 1e-30)) if band.any() else 0.0
    return name, coef[:k], share


def main(data: Path) -> None:
    per_obj: dict[tuple[str, str], list[np.ndarray]] = {}
    for path in iter_spectrum_files([data / "sdss"]):
        rec = read_spectrum(path)
        if (rec.cls or "").upper() != "QSO" or rec.z is None or not 0.05 < rec.z < 5.0 or (rec.zwarning or 0) != 0:
            continue
        name, c, share = fit_one(
            np.asarray(rec.wave, float), np.asarray(rec.flux, float), np.asarray(rec.ivar, float), float(rec.z)
        )
        # Objects by position (repeat epochs of one quasar share it to an arcsecond).
        key = (name, f"{round(rec.ra or 0, 3)},{round(rec.dec or 0, 3)}")
        if c[0] > 0 and share < 0.8:  # else the quasar part is too weak to constrain its shape
            per_obj.setdefault(key, []).append(c[1:] / c[0])
        print(
            f"{path.name}: z={rec.z:.3f} {name} c/c0={np.round(c[1:] / c[0], 3).tolist()} host share={share:.2f}", file=sys.stderr
        )
    objs = {name: np.array([np.mean(v, axis=0) for (n, _), v in per_obj.items() if n == name]) for name in ("qso_loz", "qso_hiz")}
    pooled_sd = np.std(np.concatenate([o for o in objs.values() if len(o)]), axis=0)
    out = {"z_split": Z_SPLIT, "widen": WIDEN, "floor": FLOOR}
    for name, r in objs.items():
        mean = r.mean(axis=0)
        cov = np.cov(r, rowvar=False) if len(r) > 1 else np.diag(pooled_sd**2)
        cov = 0.5 * cov + 0.5 * np.diag(np.diag(cov))
        sd = np.sqrt(np.diag(cov))
        new_sd = np.maximum(WIDEN * sd, FLOOR * pooled_sd)
        cov = cov * np.outer(new_sd / sd, new_sd / sd)
        out[name] = {"n_objects": int(len(r)), "mean": mean.round(6).tolist(), "cov": cov.round(8).tolist()}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data")
