"""One exception type per layer, so the CLI can turn any of them into one line and an exit code."""

from __future__ import annotations


class SpectransferError(Exception):
    """Base of every error this package raises on purpose (bad input, bad arguments)."""


class SpectrumError(SpectransferError):
    """A survey file cannot be read or is not usable; the message names the file and why."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CatalogError(SpectransferError):
    """A quasar catalogue cannot be read or lacks the columns needed to match spectra."""


class StoreError(SpectransferError):
    """A spectral store is missing, inconsistent, or lacks what a command asked for."""


class TrainError(SpectransferError):
    """Training cannot start or continue (incompatible --init, no validation rows, ...)."""


class EvaluateError(SpectransferError):
    """A run cannot be evaluated on a store (different grid or model, empty split, ...)."""


class FetchError(SpectransferError):
    """A download cannot be planned or completed."""


class OutputError(SpectransferError):
    """An output path cannot be written (not a regular file, read-only, disk full, in use)."""
