"""Survey file readers: one module per format, chosen by sniffing the file's headers."""

from spectransfer.surveys.base import READERS, Reader, SpectrumRecord, register

__all__ = ["READERS", "Reader", "SpectrumRecord", "register"]
