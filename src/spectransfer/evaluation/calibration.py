"""Temperature calibration of a run as an explicit, recorded step (`spectransfer calibrate`).

A network trained with BCE is often over-confident; dividing its logits by one temperature
T fitted on held-out spectra (Guo et al. 2017) makes P(QSO) mean what it says. T depends on
the spectra it was fitted on, so RUN/calibration.json records where it came from: store id,
split, number of spectra (and of quasars), engine, model sha256 and date. Only ``calibrate``
writes that file; evaluate reports a fitted T but never overwrites it. discover and classify
apply the recorded T and say so in their headers (or that none was applied).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from spectransfer import __version__
from spectransfer.errors import EvaluateError
from spectransfer.evaluation.metrics import fit_temperature, nll
from spectransfer.provenance import write_text_atomic

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
MIN_SPECTRA = 50  # fewer validation spectra give a temperature whose error is larger than its effect
MIN_PER_CLASS = 5  # and the NLL needs a few of each class to have a minimum at all


@dataclass(frozen=True)
class Calibration:
    """A run's recorded temperature and where it was fitted."""

    temperature: float
    store_id: str | None = None
    split: str | None = None
    n_spectra: int | None = None
    n_qso: int | None = None
    engine: str | None = None
    date: str | None = None

    def header_cards(self) -> list[tuple[str, Any, str]]:
        """FITS cards saying which calibration P_QSO carries."""
        return [
            ("CALIBR", True, "P_QSO calibrated by temperature scaling"),
            ("TEMPER", float(self.temperature), "temperature dividing the logits"),
            ("CALSTORE", str(self.store_id), "store_id T was fitted on"),
            ("CALSPLIT", str(self.split), "split the temperature was fitted on"),
            ("CALNSPEC", int(self.n_spectra) if self.n_spectra is not None else -1, "spectra it was fitted on"),
            ("CALENG", str(self.engine), "engine that scored them"),
            ("CALDATE", str(self.date), "UTC date of the fit"),
        ]


NO_CALIBRATION_CARDS: list[tuple[str, Any, str]] = [
    ("CALIBR", False, "P_QSO not calibrated: no RUN/calibration.json"),
    ("TEMPER", 1.0, "temperature dividing the logits (1 = none)"),
]


def read_calibration(run_dir: str | Path) -> Calibration | None:
    """The run's recorded calibration, or None when the run was never calibrated."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        fields = {k: doc.get(k) for k in ("store_id", "split", "n_spectra", "n_qso", "engine", "date")}
        if fields["n_spectra"] is None and doc.get("n_val") is not None:  # written by older versions
            fields["n_spectra"] = int(doc["n_val"])
        return Calibration(temperature=float(doc["temperature"]), **fields)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluateError(f"{path}: unreadable calibration ({exc})") from None


def check_enough(labels: np.ndarray, split: str) -> None:
    """Refuse a fit on fewer than MIN_SPECTRA spectra or MIN_PER_CLASS of either class."""
    y = np.asarray(labels).astype(bool)
    n, n_qso = int(y.size), int(y.sum())
    if n < MIN_SPECTRA or n_qso < MIN_PER_CLASS or n - n_qso < MIN_PER_CLASS:
        raise EvaluateError(
            f"cannot calibrate on the {split} split: {n} spectra ({n_qso} QSO, {n - n_qso} other); "
            f"need at least {MIN_SPECTRA} with {MIN_PER_CLASS} of each class"
        )


def fit_calibration(
    labels: np.ndarray, logits: np.ndarray, *, store_id: str | None, split: str, engine: str
) -> tuple[Calibration, dict[str, float]]:
    """Fit T on (labels, logits) after ``check_enough``; returns it and the NLL before/after."""
    check_enough(labels, split)
    t = fit_temperature(labels, logits)
    y = np.asarray(labels)
    cal = Calibration(
        temperature=t,
        store_id=store_id,
        split=split,
        n_spectra=int(y.size),
        n_qso=int(np.sum(y)),
        engine=engine,
        date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    )
    return cal, {"nll_before": nll(labels, logits), "nll_after": nll(labels, logits, t)}


def write_calibration(run_dir: str | Path, cal: Calibration, extra: dict[str, Any] | None = None) -> Path:
    """Write RUN/calibration.json atomically (``temperature`` is what models.load_run reads)."""
    doc = {
        "temperature": cal.temperature,
        "store_id": cal.store_id,
        "split": cal.split,
        "n_spectra": cal.n_spectra,
        "n_qso": cal.n_qso,
        "engine": cal.engine,
        "date": cal.date,
        "tool_version": __version__,
        **(extra or {}),
    }
    path = Path(run_dir) / CALIBRATION_FILE
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
    return path


def calibrate_run(
    run_dir: str | Path,
    store_path: str | Path,
    split: str = "val",
    engine: str = "torch",
    survey: str | None = None,
    batch_size: int = 1024,
    quiet: bool = True,
) -> dict[str, Any]:
    """Score ``split`` of the store with the run, fit T, write RUN/calibration.json; returns its record."""
    from spectransfer.data.store import open_store
    from spectransfer.ml.models import load_run
    from spectransfer.ml.score import check_engine, score_store
    from spectransfer.progress import progress_bar

    check_engine(engine)
    store = open_store(store_path)
    model, info = load_run(run_dir)
    if info.grid != store.grid:
        raise EvaluateError(
            f"{run_dir}: run was trained on grid {info.grid.to_dict()} but store {store_path} uses {store.grid.to_dict()}"
        )
    rows = np.asarray(store.rows(survey=survey, split=split), dtype=np.int64)
    meta = store.meta.set_index("row", drop=False).loc[rows]
    if meta["label"].isna().any():
        raise EvaluateError(f"{store_path}: the {split} split has rows without a label")
    labels = meta["label"].to_numpy(dtype=np.int64)
    check_enough(labels, split)
    with progress_bar("calibrate", total=int(rows.size), unit="spectra", quiet=quiet) as bar:
        logits = np.asarray(score_store(model, store, rows, batch_size=batch_size, engine=engine, progress=bar), dtype=np.float64)
    cal, fit = fit_calibration(labels, logits, store_id=(store.info or {}).get("store_id"), split=split, engine=engine)
    path = write_calibration(run_dir, cal, {"model_sha256": info.sha256, "survey": survey, **fit})
    log.info("wrote %s (T = %.4f on %d %s spectra)", path, cal.temperature, cal.n_spectra, split)
    return json.loads(path.read_text())
