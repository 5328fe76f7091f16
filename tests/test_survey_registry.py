"""The core is survey-agnostic: a third survey declared in this file (its own ids, spectrum-id
pattern, catalogue keys and a tiny FITS reader) goes through ingest -> train -> discover with no
edit to the store, ingest, catalogue or training code."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from spectransfer.candidates.discover import discover
from spectransfer.config import Grid
from spectransfer.data.catalogs import load_catalog
from spectransfer.data.ingest import ingest
from spectransfer.data.store import meta_columns, open_store
from spectransfer.errors import CatalogError
from spectransfer.ml.train import TrainConfig, train
from spectransfer.surveys import (
    READERS,
    Reader,
    SpectrumRecord,
    Survey,
    get_survey,
    id_columns,
    read_spectrum,
    register,
    register_survey,
    unregister_survey,
)
from spectransfer.surveys.base import finish_record
from spectransfer.surveys.fitsfile import FitsFile

# A short grid keeps VGG-A's arithmetic small (the network is the same).
SMALL = Grid(n_bins=256, wave_min=3839.0, wave_max=8915.0)
TOY = Survey(
    name="toy",
    id_columns=(("exposure", "int64"), ("slit", "int64")),
    spectrum_id="toy-{exposure:06d}-{slit:03d}",
    catalogue_keys=(("exposure", "slit"),),
)
QSO_LINES = (1215.7, 1549.1, 1908.7, 2798.8, 4862.7, 6564.6)  # Lya, CIV, CIII], MgII, Hb, Ha (vacuum)


# ---- the toy survey's whole adapter: a format and its reader ---------------------------------


def _identify(path: str, ff: FitsFile) -> bool:
    return str(ff.header(0).get("TELESCOP", "")).strip() == "TOYSCOPE"


def _read(path: str, ff: FitsFile) -> SpectrumRecord:
    hdr, image = ff.header(0), ff.image(0)  # rows: wavelength, flux, ivar
    record = SpectrumRecord(
        path=path,
        survey="toy",
        format="toy-image",
        ids={"exposure": int(hdr["EXPOSURE"]), "slit": int(hdr["SLIT"])},
        ra=float(hdr["RA"]),
        dec=float(hdr["DEC"]),
        cls=str(hdr["CLASS"]).strip() or None,
        subclass=None,
        z=float(hdr["Z"]),
        zwarning=None,
        wave=image[0],
        flux=image[1],
        ivar=image[2],
        mask=np.zeros(image.shape[1], dtype=np.uint32),
        flux_unit="arbitrary",
    )
    return finish_record(record)


def _write_toy_survey(folder: Path, n: int, seed: int) -> tuple[Path, pd.DataFrame]:
    """n toy spectra (a third quasars with broad lines) and a quasar catalogue keyed by the toy ids."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    wave = np.logspace(np.log10(3700.0), np.log10(9300.0), 1500)
    rows = []
    for i in range(n):
        qso = i % 3 == 0
        z = rng.uniform(0.3, 2.5) if qso else rng.uniform(0.0, 0.3)
        flux = 10 * (wave / 5000.0) ** (-1.5 if qso else 1.0)
        if qso:
            for line in QSO_LINES:
                flux += 8 * np.exp(-0.5 * ((wave - line * (1 + z)) / (30 * (1 + z))) ** 2)
        flux += rng.normal(0, 0.3, wave.size)
        ra, dec = 150.0 + 0.01 * i, 2.0 + 0.005 * i  # far more than 1.5 arcsec apart
        hdr = fits.Header(
            {
                "TELESCOP": "TOYSCOPE",
                "EXPOSURE": 1000 + i // 10,
                "SLIT": i % 10,
                "RA": ra,
                "DEC": dec,
                "CLASS": "QSO" if qso else "STAR",
                "Z": z,
            }
        )
        image = np.stack([wave, flux, np.full(wave.size, 1 / 0.3**2)]).astype(np.float64)
        fits.PrimaryHDU(image, header=hdr).writeto(folder / f"toy-{i:04d}.fits")
        rows.append({"exposure": 1000 + i // 10, "slit": i % 10, "ra": ra, "dec": dec, "z": z, "qso": qso})
    truth = pd.DataFrame(rows)
    catalogue = folder.parent / "toy_quasars.csv"
    truth.loc[truth["qso"], ["exposure", "slit", "ra", "dec", "z"]].to_csv(catalogue, index=False)
    return catalogue, truth


@pytest.fixture
def toy() -> Iterator[Survey]:
    register_survey(TOY)
    register(Reader(label="toy-image", survey="toy", identify=_identify, read=_read, priority=1))
    try:
        yield TOY
    finally:
        unregister_survey("toy")


def test_toy_survey_goes_through_ingest_train_discover(toy: Survey, tmp_path: Path) -> None:
    catalogue, truth = _write_toy_survey(tmp_path / "toy", n=60, seed=4)
    rec = read_spectrum(tmp_path / "toy" / "toy-0013.fits")
    assert rec.survey == "toy" and rec.ids == {"exposure": 1001, "slit": 3}

    cat = load_catalog(catalogue, all_quasars=True)  # every row a quasar; sniffed from the registry: the toy id columns
    assert cat.kind == "toy" and len(cat) == int(truth["qso"].sum())

    summary = ingest([tmp_path / "toy"], tmp_path / "store", qso_catalogs=[catalogue], workers=0, grid=SMALL, quiet=True)
    assert summary.accepted == 60 and summary.rejected == 0
    store = open_store(tmp_path / "store")
    meta = store.meta.sort_values("spectrum_id").reset_index(drop=True)
    assert {"exposure", "slit"} <= set(meta.columns) and list(meta.columns) == meta_columns()
    assert meta["spectrum_id"].tolist() == sorted(f"toy-{e:06d}-{s:03d}" for e, s in zip(truth["exposure"], truth["slit"]))
    assert meta["exposure"].tolist() == sorted(truth["exposure"].tolist())
    # Every catalogue quasar is labelled by its ids, nothing by position, nothing else labelled.
    expected = {f"toy-{e:06d}-{s:03d}" for e, s in truth.loc[truth["qso"], ["exposure", "slit"]].to_numpy()}
    assert set(meta.loc[meta["label"] == 1, "spectrum_id"]) == expected
    assert set(meta.loc[meta["label"] == 1, "label_source"]) == {"id"}

    run = tmp_path / "run"
    train(
        TrainConfig(
            store=str(store.path), out=str(run), survey="toy", batch_size=8, eval_every=4, max_steps=8, num_workers=0, seed=0
        )
    )
    assert (run / "summary.json").is_file()

    res = discover(run, store.path, tmp_path / "candidates.fits", engine="torch", survey="toy", quiet=True)
    assert res.n_spectra == 60
    with fits.open(res.fits_path) as hdul:
        table = hdul["CANDIDATES"].data
        assert sorted(table["SPECTRUM_ID"]) == meta["spectrum_id"].tolist()
        assert np.all((table["P_QSO"] >= 0) & (table["P_QSO"] <= 1))
        # the toy survey's own ids reach the candidate table, described, with no edit of the schema
        names = [c.name for c in hdul["CANDIDATES"].columns]
        assert {"EXPOSURE", "SLIT"} <= set(names) and f"TCOMM{names.index('SLIT') + 1}" in hdul["CANDIDATES"].header
        by_id = meta.set_index("spectrum_id")
        order = [str(x) for x in table["SPECTRUM_ID"]]
        assert table["EXPOSURE"].tolist() == by_id.loc[order, "exposure"].astype(int).tolist()
        assert table["SLIT"].tolist() == by_id.loc[order, "slit"].astype(int).tolist()

    # The store remembers its id columns: opened where the toy survey is not registered it
    # keeps them; an ingest there skips the unchanged files; one that must relabel stops on the
    # catalogue it cannot read, changing nothing.
    unregister_survey("toy")
    assert "exposure" not in meta_columns()
    again = open_store(tmp_path / "store")
    assert again.info["id_columns"][-2:] == [["exposure", "int64"], ["slit", "int64"]]
    assert again.meta.sort_values("spectrum_id")["exposure"].tolist() == meta["exposure"].tolist()
    assert ingest([tmp_path / "toy"], tmp_path / "store", workers=0, grid=SMALL, quiet=True).skipped_unchanged == 60
    with pytest.raises(CatalogError, match="toy_quasars.csv: not a recognised quasar catalogue"):
        ingest([tmp_path / "toy"], tmp_path / "store", catalogs=[catalogue], workers=0, grid=SMALL, quiet=True)
    assert open_store(tmp_path / "store").meta.sort_values("spectrum_id")["slit"].tolist() == meta["slit"].tolist()


def test_quality_cuts_come_from_the_survey(toy: Survey, tmp_path: Path) -> None:
    """The toy survey declares no zwarning cut; coverage is the paper's, so a short spectrum is rejected."""
    _write_toy_survey(tmp_path / "toy", n=3, seed=1)
    with fits.open(tmp_path / "toy" / "toy-0001.fits") as hdul:
        hdr, image = hdul[0].header.copy(), hdul[0].data[:, 200:].copy()  # starts near 4000 A
    hdr["SLIT"] = 9
    fits.PrimaryHDU(image, header=hdr).writeto(tmp_path / "toy" / "short.fits")
    ingest([tmp_path / "toy"], tmp_path / "store", workers=0, grid=SMALL, quiet=True)
    rej = open_store(tmp_path / "store").rejected
    assert [Path(p).name for p in rej["source_file"]] == ["short.fits"]
    assert rej["reason"].iloc[0].startswith("fails filter: wavemin") and rej["reason"].iloc[0].endswith("> 3839.7244")


def test_registry_refuses_inconsistent_declarations(toy: Survey) -> None:
    assert get_survey("toy") is TOY and ("exposure", "int64") in id_columns()
    with pytest.raises(ValueError, match="fiberid is string"):
        register_survey(Survey(name="bad", id_columns=(("fiberid", "string"),), spectrum_id="bad-{fiberid}"))
    with pytest.raises(ValueError, match="not id columns"):
        Survey(name="bad", id_columns=(("a", "int64"),), spectrum_id="bad-{a}", catalogue_keys=(("b",),))
    with pytest.raises(ValueError, match="dtype"):
        Survey(name="bad", id_columns=(("a", "float64"),), spectrum_id="bad-{a}")
    with pytest.raises(KeyError, match="unknown survey 'nosuch'"):
        register(Reader(label="x", survey="nosuch", identify=_identify, read=_read))
    assert "bad" not in [r.survey for r in READERS]


def test_toy_survey_is_forgotten_after_the_test() -> None:
    assert "toy" not in [c for c, _ in id_columns()] and "exposure" not in meta_columns()
    assert [c for c, _ in id_columns()] == ["plate", "mjd", "fiberid", "obsid", "lmjd", "planid", "spid"]


def test_importing_the_cli_does_not_load_torch() -> None:
    code = "import sys, spectransfer.cli; assert 'torch' not in sys.modules, 'torch'; assert 'onnxruntime' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
