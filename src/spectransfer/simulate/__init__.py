"""Simulated SDSS-like and LAMOST-like surveys in the surveys' native file formats.

`simulate_survey` is the entry point; `plan` designs the survey, `templated` makes the spectra
from the real redrock templates, `spectra` is the instrument (noise, sky, calibration, dust),
`formats` the writers.
"""

from spectransfer.simulate.survey import (
    CATALOG_NAME,
    DEFAULT_QSO_FRACTION,
    SimulationError,
    SimulationResult,
    check_arguments,
    simulate_survey,
)

__all__ = ["CATALOG_NAME", "DEFAULT_QSO_FRACTION", "SimulationError", "SimulationResult", "check_arguments", "simulate_survey"]
