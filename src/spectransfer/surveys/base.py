"""The one record every survey reader returns, and the reader registry that sniffs files.

A reader is registered with a label, an ``identify(path, hdul)`` function that looks at
headers and column names and answers True/False without raising, and a priority (higher
wins when two readers claim a file). Adding a format means adding one module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SpectrumRecord:
    """One spectrum as read from a survey file, before resampling.

    ``wave`` is vacuum wavelength in Angstrom (ascending). ``ivar`` 0 means no data; ``mask``
    0 means good (any non-zero bit is bad). Missing values (LAMOST 'Unknown' class,
    z = -9999) are ``None``, never sentinel numbers.
    """

    path: str
    survey: str  # "sdss" | "lamost"
    format: str  # reader label, e.g. "sdss-spec", "sdss-spspec", "lamost-image", "lamost-coadd"
    ids: dict[str, Any]  # sdss: plate, mjd, fiberid; lamost: obsid (or None), lmjd, planid, spid, fiberid
    ra: float | None
    dec: float | None
    cls: str | None  # pipeline class: QSO / GALAXY / STAR / None
    subclass: str | None
    z: float | None
    zwarning: int | None
    wave: np.ndarray  # float64, Angstrom, vacuum
    flux: np.ndarray  # float32/float64
    ivar: np.ndarray  # same shape as flux
    mask: np.ndarray  # integer, 0 = good
    flux_unit: str = "1e-17 erg / (s cm2 Angstrom)"
    wave_unit: str = "Angstrom"
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. mag, snr, wavemin/wavemax as the pipeline states them

    @property
    def n_pixels(self) -> int:
        return int(self.flux.shape[0])


@dataclass(frozen=True)
class Reader:
    label: str
    survey: str
    identify: Callable[[str, Any], bool]  # (path, astropy HDUList) -> bool, never raises
    read: Callable[[str, Any], SpectrumRecord]  # (path, astropy HDUList) -> record or SpectrumError
    priority: int = 0


READERS: list[Reader] = []


def register(reader: Reader) -> Reader:
    """Add a reader to the registry (kept sorted, highest priority first)."""
    READERS.append(reader)
    READERS.sort(key=lambda r: -r.priority)
    return reader
