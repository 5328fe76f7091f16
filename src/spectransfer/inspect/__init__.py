"""Visual inspection of candidates: a local web page, its JSON API, and the SQLite verdicts.

``verdicts`` (SQLite, no web dependencies) is what ``evaluate --verdicts`` reads; ``app``
builds the FastAPI application; ``server`` runs it with uvicorn under the safety rules
(loopback by default, a token for any other address).
"""

from __future__ import annotations

from spectransfer.errors import SpectransferError


class InspectError(SpectransferError):
    """The inspection inputs (candidates table, verdict database, host/token) are unusable."""


__all__ = ["InspectError"]
