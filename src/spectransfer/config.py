"""Frozen settings shared by every stage: the common wavelength grid above all."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Grid:
    """The common input grid of the network.

    The paper (Podsztavek et al. 2021, Sect. 2) resamples every spectrum onto 2048 bins,
    logarithmically spaced between 3839 and 8915 Angstrom (vacuum). ``centers`` are those
    2048 wavelengths (as ``np.logspace`` gives them); bin edges lie half way between
    neighbouring centres in wavelength, the outer edges half a neighbour spacing beyond the
    first and last centre (the convention of ``spectres``, whose resampling the paper used;
    it differs from log-midpoints by ~2e-8 relative).
    """

    n_bins: int = 2048
    wave_min: float = 3839.0
    wave_max: float = 8915.0

    @cached_property
    def log_step(self) -> float:
        return (np.log10(self.wave_max) - np.log10(self.wave_min)) / (self.n_bins - 1)

    @cached_property
    def centers(self) -> np.ndarray:
        return np.logspace(np.log10(self.wave_min), np.log10(self.wave_max), self.n_bins)

    @cached_property
    def edges(self) -> np.ndarray:
        return centre_edges(self.centers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grid:
        return cls(n_bins=int(d["n_bins"]), wave_min=float(d["wave_min"]), wave_max=float(d["wave_max"]))


def centre_edges(centres: np.ndarray) -> np.ndarray:
    """Edges (n+1,) of bins or pixels centred on ``centres``: midpoints, outer edges half a
    neighbour spacing out. Written exactly as ``spectres.make_bins`` computes them, so the
    resampler equals spectres to the last bit of the weights; used for the grid's bins and
    for every input spectrum's pixels."""
    c = np.asarray(centres, dtype=np.float64)
    e = np.empty(c.shape[0] + 1)
    e[0] = c[0] - (c[1] - c[0]) / 2
    e[-1] = c[-1] + (c[-1] - c[-2]) / 2
    e[1:-1] = (c[1:] + c[:-1]) / 2
    return e


DEFAULT_GRID = Grid()

# SDSS and most LAMOST files sample log10(wavelength) in steps of 1e-4 (69 km/s pixels).
LOGLAM_STEP = 1e-4

# The paper's SDSS quality cut (authors' code): keep spectra whose coverage includes the grid,
# WAVEMIN <= 3839.7244 and WAVEMAX >= 8914.597 Angstrom. A survey declares its own pair
# (spectransfer.surveys.Survey.coverage); this is the default.
PAPER_COVERAGE = (3839.7244, 8914.597)

# The file `spectransfer simulate` leaves in each survey folder it writes: `simulate --overwrite`
# replaces only such folders, and ingest records a store built from them as simulated.
SIMULATE_MARKER = ".spectransfer-simulate"
