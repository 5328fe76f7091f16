"""Survey file readers: one module per format, chosen by sniffing the file's headers.

``read_spectrum(path)`` is the entry point; importing this package registers every reader.
"""

from spectransfer.surveys.base import (
    MASK_DTYPE,
    NONFINITE_BIT,
    READERS,
    Reader,
    SpectrumRecord,
    covers_grid,
    FileWalk,
    iter_spectrum_files,
    printable_path,
    read_spectrum,
    register,
    walk_spectrum_files,
)
from spectransfer.surveys import lamost_coadd, lamost_image, sdss_spec, sdss_spspec  # noqa: F401  (register readers)

__all__ = [
    "MASK_DTYPE",
    "NONFINITE_BIT",
    "READERS",
    "Reader",
    "SpectrumRecord",
    "covers_grid",
    "FileWalk",
    "iter_spectrum_files",
    "printable_path",
    "read_spectrum",
    "register",
    "walk_spectrum_files",
]
