"""The redrock spectral templates, shipped as a compact derivative (redrock.npz).

Real-data-derived spectral shapes for the simulator and the redshift refinement: the DR16Q
quasar PCA bases (LOZ, HIZ), the galaxy and A/B/F/G/K/M/WD star bases with archetype
coefficients (each row times the basis is one realistic spectrum) and the CV-star basis, from
DESI Collaboration, redrock-templates (BSD-3-Clause, LICENSE.md beside this file). Every basis
is on a rest-frame grid of 1e-4 dex bins (the SDSS/LAMOST pixel width); regenerate with
`python scripts/make_templates.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

TEMPLATE_FILE = Path(__file__).with_name("redrock.npz")
NAMES = ("qso_loz", "qso_hiz", "galaxy", "star_a", "star_b", "star_f", "star_g", "star_k", "star_m", "star_wd", "star_cv")


@dataclass(frozen=True)
class Template:
    """One redrock template: `basis` (k, n) on rest-frame `loglam` (n,), archetype `coeff` (m, k) or None."""

    name: str
    loglam: np.ndarray
    basis: np.ndarray
    coeff: np.ndarray | None

    @property
    def wave(self) -> np.ndarray:
        """Rest-frame bin centres in vacuum Å."""
        return 10.0**self.loglam

    def archetypes(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Archetype spectra (m, n) = coeff[rows] @ basis; raises if the template has none."""
        if self.coeff is None:
            raise ValueError(f"template {self.name} has no archetype coefficients")
        coeff = self.coeff if rows is None else self.coeff[rows]
        return coeff @ self.basis


@lru_cache(maxsize=1)
def load_templates(path: Path = TEMPLATE_FILE) -> dict[str, Template]:
    """Every template in the shipped file, keyed by name (see NAMES)."""
    with np.load(path) as npz:
        step = float(npz["step"])
        out = {}
        for name in NAMES:
            basis = npz[f"{name}/basis"]
            loglam = float(npz[f"{name}/loglam0"]) + step * np.arange(basis.shape[1])
            coeff = npz[f"{name}/coeff"] if f"{name}/coeff" in npz else None
            out[name] = Template(name, loglam, basis, coeff)
    return out
