"""Survey file readers: one module per format, chosen by sniffing the file's headers, and the
surveys they declare (id columns, spectrum ids, catalogue keys, quality cuts).

``read_spectrum(path)`` is the entry point; importing this package registers every survey and
reader (SDSS first: the order of the store's id columns is the order of declaration).
"""

from spectransfer.surveys import sdss_spec, sdss_spspec, lamost_image, lamost_coadd  # noqa: F401, I001  (register; order matters)
from spectransfer.surveys.base import (
    MASK_DTYPE,
    NONFINITE_BIT,
    READERS,
    SURVEYS,
    Reader,
    SpectrumRecord,
    Survey,
    coverage_limits,
    covers_grid,
    FileWalk,
    get_survey,
    id_columns,
    iter_spectrum_files,
    iter_walk,
    printable_path,
    read_spectrum,
    record_coverage,
    register,
    walk_spectrum_files,
    register_survey,
    survey_names,
    unregister_survey,
)

__all__ = [
    "MASK_DTYPE",
    "NONFINITE_BIT",
    "READERS",
    "SURVEYS",
    "Reader",
    "SpectrumRecord",
    "Survey",
    "coverage_limits",
    "covers_grid",
    "FileWalk",
    "get_survey",
    "id_columns",
    "iter_spectrum_files",
    "iter_walk",
    "printable_path",
    "read_spectrum",
    "record_coverage",
    "register",
    "walk_spectrum_files",
    "register_survey",
    "survey_names",
    "unregister_survey",
]
