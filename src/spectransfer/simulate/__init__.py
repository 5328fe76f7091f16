"""Simulated SDSS-like and LAMOST-like surveys in the surveys' native file formats.

`simulate_survey` is the entry point; `spectra` holds the physics, `formats` the writers.
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
