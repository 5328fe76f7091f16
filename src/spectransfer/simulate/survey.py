"""Simulated SDSS-like and LAMOST-like surveys with a known truth, written in native formats.

`simulate_survey` plans a survey (which objects, where on the sky, on which plate/plan and
fibre, how bright, which repeats, which quasars the catalogue misses), simulates the spectra
in batches (in a small process pool), writes one FITS file per spectrum in the survey's own
folder layout, the survey's quasar catalogue at the top, and `truth.parquet`.

Everything is drawn from random streams derived from the seed and the batch number only, so
the same seed gives the same bytes whatever the number of workers. The whole survey is built
in a hidden temporary folder beside the target and renamed into place at the end: a failed or
interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectransfer.config import SIMULATE_MARKER
from spectransfer.errors import SpectransferError
from spectransfer.provenance import provenance_cards
from spectransfer.simulate import formats, spectra, templated
from spectransfer.simulate.plan import (
    CLASS_NAMES,
    DEFAULT_QSO_FRACTION,
    GALAXY,
    QSO,
    STAR,
    SURVEYS,
    pipeline_answers,
    plan_survey,
    relative_path,
    spectrum_id,
)

log = logging.getLogger(__name__)

CATALOG_NAME = {"sdss": "DR16Q-like_quasar_catalog.fits", "lamost": "LAMOST_QSO-like_catalog.fits"}
BATCH = 256  # spectra simulated together (one task of the process pool)


class SimulationError(SpectransferError):
    """Impossible simulation arguments or an output folder that cannot be written."""


@dataclass
class SimulationResult:
    """What `simulate_survey` wrote: the folder, its files and a few counts."""

    out: Path
    survey: str
    seed: int
    n_files: int
    counts: dict[str, int]  # true classes of the spectra written
    n_repeats: int
    n_quasar_objects: int
    n_catalog_missing: int
    catalog: Path
    truth: Path
    files: list[Path] = field(default_factory=list)


# ---- the worker -------------------------------------------------------------------------------


def _simulate_batch(survey: str, seed: int, batch: int, rows: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """Simulate and write the files of one batch; return the per-file pipeline answers."""
    rng = np.random.default_rng([seed, 1, batch])
    inst = spectra.INSTRUMENTS[survey]
    loglam = inst.loglam
    wave = inst.wave
    n = rows["cls"].shape[0]
    p = inst.n_pix
    cls = rows["cls"]
    rep = rows["is_repeat"]
    prim = ~rep
    model = np.zeros((n, p))
    ew_ha = np.zeros(n)
    sig = inst.sigma_inst_log
    q = np.nonzero(prim & (cls == QSO))[0]
    if q.size:
        bal = rows["is_bal"][q]
        model[q] = templated.quasar_model(
            rng, loglam, rows["z"][q], rows["host_ratio"][q], lambda rest: spectra.bal_absorption(rng, rest, bal), sig
        )
    g = np.nonzero(prim & (cls == GALAXY))[0]
    if g.size:
        model[g] = templated.galaxy_model(rng, loglam, rows["z"][g], rows["archetype"][g], sig)
        ew_ha[g] = templated.galaxy_archetype_lines()[1][rows["archetype"][g]]
    s = np.nonzero(prim & (cls == STAR))[0]
    if s.size:
        model[s] = templated.star_model(rng, loglam, rows["star_type"][s], rows["archetype"][s], rows["z"][s], sig)
    model[prim] *= spectra.galactic_extinction(wave, rows["ebv"][prim])
    model[prim] = spectra.normalise_to_mag(wave, model[prim], rows["mag"][prim])
    # A repeat is the same spectrum seen again (a little brighter or fainter).
    local_first = rows["first_file"] - rows["_offset"]
    for i in np.nonzero(rep)[0]:
        j = int(local_first[i])
        model[i] = model[j] * 10.0 ** (-0.4 * rows["dmag"][i])
        ew_ha[i] = ew_ha[j]
    true_mags = spectra.synthetic_mags(wave, model)
    obs = spectra.observe(rng, inst, model, rows["exposure"], rows["light"])

    star_sub = [
        spectra.star_subclass(str(t), float(tt)) if c == STAR else "" for c, t, tt in zip(cls, rows["star_type"], rows["temp"])
    ]
    pipe = pipeline_answers(rng, survey, cls, rows["z"], obs.snr_median, star_sub, rows["gal_sf"], ew_ha)
    psfmag = true_mags + rng.normal(0.0, 0.03, true_mags.shape)

    # Pixels the file keeps, and the first/last good wavelength (WAVEMIN/WAVEMAX).
    col = np.arange(p)[None, :]
    kept = (col >= obs.first[:, None]) & (col < obs.last[:, None])
    good = kept & (obs.ivar > 0)
    has_good = good.any(axis=1)
    i_min = np.where(has_good, np.argmax(good, axis=1), obs.first)
    i_max = np.where(has_good, p - 1 - np.argmax(good[:, ::-1], axis=1), obs.last - 1)
    wavemin, wavemax = wave[i_min], wave[i_max]
    spall = _sdss_spall(rng, rows, obs, pipe, psfmag, kept, good, wavemin, wavemax) if survey == "sdss" else None

    root_p = Path(root)
    made_dirs: set[Path] = set()
    for i in range(n):
        path = root_p / rows["relpath"][i]
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        if survey == "sdss":
            assert spall is not None
            data = _sdss_file(inst, rows, i, obs, spall[i : i + 1])
        else:
            data = _lamost_file(inst, rows, i, obs, pipe, psfmag)
        with open(path, "wb") as fh:
            fh.write(data)
    return {
        "pipeline_class": pipe["class"],
        "pipeline_subclass": pipe["subclass"],
        "pipeline_z": pipe["z"],
        "zwarning": pipe["zwarning"],
        "pipeline_wrong": pipe["wrong"],
        "snr": obs.snr_true,
        "sn_median_all": obs.snr_median,
        "mags": psfmag,
        "wavemin": wavemin,
        "wavemax": wavemax,
    }


def _objtype(c: int, survey: str) -> str:
    """The target type the survey's input catalogue gave the object (OBJTYPE)."""
    if survey == "sdss":
        return {QSO: "QSO", GALAXY: "GALAXY", STAR: "NA"}[c]
    return {QSO: "QSO", GALAXY: "gal", STAR: "star"}[c]


def _sdss_spall(
    rng: np.random.Generator,
    rows: dict[str, np.ndarray],
    obs: spectra.Observation,
    pipe: dict[str, Any],
    psfmag: np.ndarray,
    kept: np.ndarray,
    good: np.ndarray,
    wavemin: np.ndarray,
    wavemax: np.ndarray,
) -> np.ndarray:
    """The HDU2 rows (one per file) of a batch, filled column by column."""
    n = rows["cls"].shape[0]
    cls = rows["cls"]
    pc = pipe["class"]
    t = np.zeros(n, dtype=formats.SPALL_DTYPE)
    t["PROGRAMNAME"] = np.where(rows["plate"] >= 7300, b"eboss", b"boss")
    t["CHUNK"] = np.array([f"eboss{int(p) % 30}".encode() for p in rows["plate"]])
    t["PLATEQUALITY"] = b"good"
    t["PLATESN2"] = 10.0 + 10.0 * rows["exposure"]
    t["EBOSS_TARGET1"] = np.where(cls == QSO, 1 << 10, 0)
    t["SPECPRIMARY"] = np.where(rows["is_repeat"], 0, 1)
    t["NSPECOBS"] = rows["n_obs"]
    t["PLATE"], t["TILE"], t["MJD"], t["FIBERID"] = rows["plate"], rows["tile"], rows["mjd"], rows["fiberid"]
    t["RUN2D"] = t["RUN1D"] = formats.RUN2D.encode()
    t["OBJTYPE"] = np.array([_objtype(int(c), "sdss").encode() for c in cls])
    t["PLUG_RA"], t["PLUG_DEC"] = rows["ra"], rows["dec"]
    t["CLASS"] = np.array([str(c).encode() for c in pc])
    t["SUBCLASS"] = np.array([str(c).encode() for c in pipe["subclass"]])
    t["Z"] = pipe["z"]
    t["Z_ERR"] = pipe["z_err"]
    t["RCHI2"] = rng.normal(1.0, 0.08, n)
    t["DOF"] = np.maximum(good.sum(axis=1) - 10, 0)
    t["RCHI2DIFF"] = rng.exponential(1.0, n) * np.where(pipe["wrong"], 0.05, 0.3)
    t["VDISP"] = np.where(pc == "GALAXY", rng.uniform(100, 300, n), 0.0)
    t["WAVEMIN"], t["WAVEMAX"] = wavemin, wavemax
    t["WCOVERAGE"] = np.log10(wavemax) - np.log10(wavemin)
    t["ZWARNING"] = pipe["zwarning"]
    t["SN_MEDIAN"] = obs.sn_bands
    t["SN_MEDIAN_ALL"] = obs.snr_median
    flux_nmgy = 10.0 ** (-0.4 * (psfmag - 22.5))
    t["SPECTROFLUX"] = flux_nmgy
    t["SPECTROFLUX_IVAR"] = 1.0 / np.maximum(0.02 * flux_nmgy, 1e-3) ** 2
    t["SPECTROSYNFLUX"] = flux_nmgy * rng.normal(1.0, 0.03, (n, 5))
    t["ANYANDMASK"] = np.bitwise_or.reduce(np.where(kept, obs.and_mask, 0), axis=1)
    t["ANYORMASK"] = np.bitwise_or.reduce(np.where(kept, obs.or_mask, 0), axis=1)
    not_q = pc != "QSO"
    t["Z_NOQSO"] = np.where(not_q, pipe["z"], rng.uniform(0.05, 0.8, n))
    t["CLASS_NOQSO"] = np.where(not_q, t["CLASS"], b"GALAXY")
    t["OBJID"] = np.array([f"{1237650000000000000 + int(o) * 17}".encode() for o in rows["object"]])
    t["RA"], t["DEC"] = rows["ra"], rows["dec"]
    t["EXTINCTION"] = np.array([0.18, 0.13, 0.09, 0.07, 0.05]) * 0.5
    t["PSFMAG"] = psfmag
    t["FIBER2MAG"] = psfmag + np.where(cls == GALAXY, 0.6, 0.35)[:, None]
    t["THING_ID"] = rows["thing_id"]
    return t


def _sdss_file(
    inst: spectra.Instrument, rows: dict[str, np.ndarray], i: int, obs: spectra.Observation, spall_row: np.ndarray
) -> bytes:
    a, b = int(obs.first[i]), int(obs.last[i])
    coadd = np.empty(b - a, dtype=formats.COADD_DTYPE)
    coadd["flux"] = obs.flux[i, a:b]
    coadd["loglam"] = inst.loglam[a:b]
    coadd["ivar"] = obs.ivar[i, a:b]
    coadd["and_mask"] = obs.and_mask[i, a:b]
    coadd["or_mask"] = obs.or_mask[i, a:b]
    # wdisp: dispersion in units of pixels (1e-4 log10 lambda), slowly varying along the chip.
    coadd["wdisp"] = _wdisp(inst)[a:b]
    coadd["sky"] = obs.sky[i, a:b]
    coadd["model"] = obs.model[i, a:b]
    exposure = float(rows["exposure"][i])
    meta = {
        "plate": int(rows["plate"][i]),
        "mjd": int(rows["mjd"][i]),
        "fiberid": int(rows["fiberid"][i]),
        "tile": int(rows["tile"][i]),
        "cartid": int(rows["plate"][i]) % 16 + 1,
        "plate_ra": float(rows["field_ra"][i]),
        "plate_dec": float(rows["field_dec"][i]),
        "exptime": round(3600.0 * exposure, 2),
        "nexp": 8,
        "helio_rv": round(float(np.sin(rows["mjd"][i] / 58.1) * 25.0), 6),
        "sn2_g": round(12.0 * exposure, 4),
        "sn2_r": round(40.0 * exposure, 4),
        "sn2_i": round(32.0 * exposure, 4),
        "coeff0": round(float(inst.loglam[a]), 4),
        "fbadpix": round(float(np.mean(obs.ivar[i, a:b] == 0)), 5),
        "ra": float(rows["ra"][i]),
        "dec": float(rows["dec"][i]),
        "thing_id": int(rows["thing_id"][i]),
    }
    return formats.sdss_file_bytes(formats.sdss_primary_cards(meta), coadd, spall_row)


_WDISP: dict[str, np.ndarray] = {}


def _wdisp(inst: spectra.Instrument) -> np.ndarray:
    if inst.name not in _WDISP:
        _WDISP[inst.name] = inst.sigma_inst_log / 1e-4 * (0.92 + 0.16 * np.arange(inst.n_pix) / inst.n_pix)
    return _WDISP[inst.name]


def _designation(ra: float, dec: float) -> str:
    h = ra / 15.0
    hh = int(h)
    mm = int((h - hh) * 60)
    ss = ((h - hh) * 60 - mm) * 60
    sgn = "+" if dec >= 0 else "-"
    ad = abs(dec)
    dd = int(ad)
    dm = int((ad - dd) * 60)
    ds = ((ad - dd) * 60 - dm) * 60
    return f"J{hh:02d}{mm:02d}{min(ss, 59.99):05.2f}{sgn}{dd:02d}{dm:02d}{min(ds, 59.9):04.1f}"


def _lamost_file(
    inst: spectra.Instrument,
    rows: dict[str, np.ndarray],
    i: int,
    obs: spectra.Observation,
    pipe: dict[str, Any],
    psfmag: np.ndarray,
) -> bytes:
    # LAMOST fluxes are relative (not flux-calibrated to absolute units): a per-spectrum scale.
    scale = float(rows["_lamost_scale"][i])
    image = np.empty((5, inst.n_pix), dtype=">f4")
    image[0] = obs.flux[i] * scale
    image[1] = obs.ivar[i] / scale**2
    image[2] = inst.wave
    image[3] = obs.and_mask[i]
    image[4] = obs.or_mask[i]
    lmjd = int(rows["lmjd"][i])
    # Dates follow from LMJD (MJD 40587 = 1970-01-01), so the header is reproducible.
    day = dt.date(1970, 1, 1) + dt.timedelta(days=lmjd - 40587)
    made = day + dt.timedelta(days=400 + lmjd % 97)
    fname = Path(rows["relpath"][i]).name
    meta = {
        "filename": fname,
        "obsid": int(rows["obsid"][i]),
        "date": f"{made.isoformat()}T{lmjd % 24:02d}:{lmjd % 60:02d}:{(lmjd * 7) % 60:02d}",
        "date_obs": f"{day.isoformat()}T16:20:00",
        "lmjd": lmjd,
        "mjd": int(rows["mjd"][i]),
        "planid": str(rows["planid"][i]),
        "ra": float(rows["ra"][i]),
        "dec": float(rows["dec"][i]),
        "desig": "LAMOST " + _designation(float(rows["ra"][i]), float(rows["dec"][i])),
        "fiberid": int(rows["fiberid"][i]),
        "spid": int(rows["spid"][i]),
        "objtype": _objtype(int(rows["cls"][i]), "lamost"),
        "mags": psfmag[i],
        "exptime": round(5400.0 * float(rows["exposure"][i]), 2),
        "plan_ra": float(rows["field_ra"][i]),
        "plan_dec": float(rows["field_dec"][i]),
        "helio_rv": round(float(np.sin(lmjd / 58.1) * 25.0), 5),
        "coeff0": float(inst.loglam0),
        "class": str(pipe["class"][i]),
        "subclass": str(pipe["subclass"][i]),
        "z": round(float(pipe["z"][i]), 8),
        "z_err": round(float(pipe["z_err"][i]), 8),
        "snr_bands": obs.sn_bands[i],
    }
    return formats.lamost_file_bytes(formats.lamost_primary_cards(meta, inst.n_pix), image)


# ---- catalogues and truth ---------------------------------------------------------------------


def _write_catalog(path: Path, survey: str, f: dict[str, np.ndarray], res: dict[str, np.ndarray], seed: int) -> int:
    """The survey's quasar catalogue in its real form (DR16Q-like: one row per quasar with
    its repeats in the *_DUPLICATE columns; LAMOST-like: one row per quasar spectrum).
    Returns the number of rows."""
    rng = np.random.default_rng([seed, 2])
    qso_files = np.nonzero((f["cls"] == QSO) & f["in_catalog"])[0]
    z_cat_obj: dict[int, float] = {}
    for i in qso_files:
        o = int(f["object"][i])
        if o not in z_cat_obj:
            # Visual-inspection redshifts: close to the truth, not exact.
            z_cat_obj[o] = float(f["z"][i] + rng.normal(0.0, 6e-4 * (1.0 + f["z"][i])))
    if survey == "sdss":
        fi = np.array([i for i in qso_files if not f["is_repeat"][i]], dtype=np.int64)
        k = fi.size
        ndup = 74
        t = np.zeros(k, dtype=formats.DR16Q_DTYPE)
        t["PLATE_DUPLICATE"] = t["MJD_DUPLICATE"] = t["FIBERID_DUPLICATE"] = -1
        row_of_obj = {int(f["object"][i]): r for r, i in enumerate(fi)}
        for i in qso_files:
            if f["is_repeat"][i]:
                r = row_of_obj[int(f["object"][i])]
                j = int(t["NSPEC"][r])
                if j < ndup:
                    t["PLATE_DUPLICATE"][r, j], t["MJD_DUPLICATE"][r, j], t["FIBERID_DUPLICATE"][r, j] = (
                        f["plate"][i],
                        f["mjd"][i],
                        f["fiberid"][i],
                    )
                t["NSPEC"][r] += 1
        zc = np.array([z_cat_obj[int(f["object"][i])] for i in fi])
        vi = rng.random(k) < 0.3
        t["SDSS_NAME"] = [_designation(f["ra"][i], f["dec"][i])[1:].encode() for i in fi]
        t["RA"], t["DEC"] = f["ra"][fi], f["dec"][fi]
        t["PLATE"], t["MJD"], t["FIBERID"] = f["plate"][fi], f["mjd"][fi], f["fiberid"][fi]
        t["OBJID"] = [f"{1237650000000000000 + int(f['object'][i]) * 17}".encode() for i in fi]
        t["THING_ID"] = f["thing_id"][fi]
        t["Z"] = zc
        t["SOURCE_Z"] = np.where(vi, b"VI", b"PIPE")
        t["Z_PIPE"] = res["pipeline_z"][fi]
        t["ZWARNING"] = res["zwarning"][fi]
        t["Z_VI"] = np.where(vi, zc, -1.0)
        t["IS_QSO_FINAL"] = 1
        t["CLASS_PERSON"] = np.where(vi, np.where(f["is_bal"][fi], 30, 3), -1)
        t["BAL_PROB"] = np.where(f["is_bal"][fi], rng.uniform(0.8, 1.0, k), rng.uniform(0.0, 0.1, k))
        t["PSFMAG"] = res["mags"][fi]
        t["SN_MEDIAN_ALL"] = res["sn_median_all"][fi]
        notes = [
            "Simulated DR16Q-like quasar catalogue (spectransfer simulate): one row per quasar,",
            "repeat spectra in PLATE/MJD/FIBERID_DUPLICATE; a few true quasars are left out.",
        ]
    else:
        fi = qso_files
        k = fi.size
        t = np.zeros(k, dtype=formats.LAMOST_QSO_DTYPE)
        t["OBSID"] = f["obsid"][fi]
        t["DESIGNATION"] = [("LAMOST " + _designation(f["ra"][i], f["dec"][i])).encode() for i in fi]
        t["RA"], t["DEC"] = f["ra"][fi], f["dec"][fi]
        t["LMJD"], t["MJD"] = f["lmjd"][fi], f["mjd"][fi]
        t["PLANID"] = [str(f["planid"][i]).encode() for i in fi]
        t["SPID"], t["FIBERID"] = f["spid"][fi], f["fiberid"][fi]
        t["Z"] = [z_cat_obj[int(f["object"][i])] for i in fi]
        t["Z_PIPE"] = res["pipeline_z"][fi]
        t["CLASS_PIPE"] = [str(c).encode() for c in res["pipeline_class"][fi]]
        t["MAG_G"], t["MAG_R"], t["MAG_I"] = res["mags"][fi, 1], res["mags"][fi, 2], res["mags"][fi, 3]
        notes = [
            "Simulated LAMOST-quasar-catalogue-like table (spectransfer simulate): one row per",
            "spectrum of a confirmed quasar; a few true quasars are left out.",
        ]
    primary = [
        formats.card("SIMPLE", True, "conforms to FITS standard"),
        formats.card("BITPIX", 8, "array data type"),
        formats.card("NAXIS", 0, "number of array dimensions"),
        formats.card("EXTEND", True),
        formats.card("SIMSURV", survey, "simulated survey (spectransfer simulate)"),
        formats.card("SIMSEED", int(seed), "random seed of the simulation"),
        *[formats.card(key, value, comment) for key, value, comment in provenance_cards()],
    ]
    units = {"RA": "deg", "DEC": "deg"}
    ext = formats.bintable_header(t.dtype, k, "CATALOG", units=units, extra=[formats.card("COMMENT", comment=c) for c in notes])
    path.write_bytes(formats.header_bytes(primary) + formats.header_bytes(ext) + formats.pad_data(t.tobytes()))
    return int(k)


def _write_truth(path: Path, survey: str, f: dict[str, np.ndarray], res: dict[str, np.ndarray], seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = f["cls"].shape[0]
    ids = [spectrum_id(survey, f, i) for i in range(n)]
    obj = [f"{survey}-s{seed}-{int(o):07d}" for o in f["object"]]
    repeat_of = [ids[int(f["first_file"][i])] if f["is_repeat"][i] else None for i in range(n)]
    true_sub = []
    for i in range(n):
        c = int(f["cls"][i])
        if c == QSO:
            true_sub.append("BAL" if f["is_bal"][i] else "BROADLINE")
        elif c == GALAXY:
            true_sub.append("STARFORMING" if f["gal_sf"][i] else "PASSIVE")
        else:
            true_sub.append(spectra.star_subclass(str(f["star_type"][i]), float(f["temp"][i])))

    def nullable_int(key: str) -> pa.Array:
        if key in f:
            return pa.array(f[key].astype(np.int64))
        return pa.nulls(n, pa.int64())

    pz = res["pipeline_z"].astype(np.float64)
    cols = {
        "path": pa.array(list(f["relpath"]), pa.string()),
        "spectrum_id": pa.array(ids, pa.string()),
        "survey": pa.array([survey] * n, pa.string()),
        "object_id": pa.array(obj, pa.string()),
        "plate": nullable_int("plate"),
        "mjd": nullable_int("mjd"),
        "fiberid": nullable_int("fiberid"),
        "obsid": nullable_int("obsid"),
        "lmjd": nullable_int("lmjd"),
        "planid": pa.array([str(x) for x in f["planid"]], pa.string()) if "planid" in f else pa.nulls(n, pa.string()),
        "spid": nullable_int("spid"),
        "ra": pa.array(f["ra"].astype(np.float64)),
        "dec": pa.array(f["dec"].astype(np.float64)),
        "true_class": pa.array(list(CLASS_NAMES[f["cls"]]), pa.string()),
        "true_subclass": pa.array(true_sub, pa.string()),
        "true_z": pa.array(f["z"].astype(np.float64)),
        "snr": pa.array(res["snr"].astype(np.float32)),
        "sn_median_all": pa.array(res["sn_median_all"].astype(np.float32)),
        "mag_r": pa.array((f["mag"] + f["dmag"]).astype(np.float32)),
        "pipeline_class": pa.array([str(c) for c in res["pipeline_class"]], pa.string()),
        "pipeline_subclass": pa.array([str(c) for c in res["pipeline_subclass"]], pa.string()),
        "pipeline_z": pa.array(np.where(pz == -9999.0, np.nan, pz), mask=pz == -9999.0),
        "zwarning": pa.array(res["zwarning"].astype(np.int32)),
        "pipeline_wrong": pa.array(res["pipeline_wrong"].astype(bool)),
        "in_catalog": pa.array(f["in_catalog"].astype(bool)),
        "is_repeat": pa.array(f["is_repeat"].astype(bool)),
        "repeat_of": pa.array(repeat_of, pa.string()),
        "n_obs": pa.array(f["n_obs"].astype(np.int32)),
        "is_bal": pa.array(f["is_bal"].astype(bool)),
        # Share of the rest-frame 5100 A flux that is host-galaxy light (quasars; 0 otherwise).
        "host_fraction": pa.array((f["host_ratio"] / (1.0 + f["host_ratio"])).astype(np.float32)),
        "ebv": pa.array(f["ebv"].astype(np.float32)),
    }
    table = pa.table(cols)
    table = table.replace_schema_metadata({"spectransfer": f"simulate survey={survey} seed={seed}"})
    pq.write_table(table, path, compression="zstd")


# ---- the entry point --------------------------------------------------------------------------


def check_arguments(survey: str, n: int, qso_fraction: float | None = None, workers: int = 1) -> float:
    """Validate simulation arguments; return the quasar fraction to use or raise SimulationError."""
    if survey not in SURVEYS:
        raise SimulationError(f"unknown survey {survey!r}: choose one of {', '.join(SURVEYS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise SimulationError(f"--n must be a positive number of spectra, got {n!r}")
    q = DEFAULT_QSO_FRACTION[survey] if qso_fraction is None else qso_fraction
    if not isinstance(q, (int, float)) or not np.isfinite(q) or not 0.0 <= float(q) <= 1.0:
        raise SimulationError(f"--qso-fraction must lie in [0, 1], got {qso_fraction!r}")
    if workers < 1:
        raise SimulationError(f"--workers must be at least 1, got {workers}")
    return float(q)


# Written into every simulated survey: --overwrite replaces only folders that carry it, never
# a folder of real data that happens to be named as the output.
MARKER = SIMULATE_MARKER  # one definition: ingest reads it to record a store as simulated


def _prepare_target(out: Path, overwrite: bool) -> Path:
    """Check the target folder and make a hidden temporary folder beside it."""
    if out.exists() and not out.is_dir():
        raise SimulationError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SimulationError(f"{out}: folder is not empty (use --overwrite to replace it)")
        if not (out / MARKER).is_file():
            raise SimulationError(
                f"{out}: folder is not empty and was not written by `spectransfer simulate` "
                f"(no {MARKER}); --overwrite replaces only simulated surveys"
            )
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.simulating-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the survey should not be
        (tmp / MARKER).write_text("folder written by `spectransfer simulate`; --overwrite may replace it\n")
    except OSError as exc:
        raise SimulationError(f"{out}: cannot write there ({exc.strerror or exc})") from None
    return tmp


def _install(tmp: Path, out: Path) -> None:
    """Move the finished survey into place (replacing an old one only once the new one exists)."""
    old: Path | None = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        else:
            out.rmdir()
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def simulate_survey(
    survey: str,
    n: int,
    out: str | os.PathLike[str],
    seed: int = 0,
    qso_fraction: float | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Write a simulated ``survey`` ('sdss' | 'lamost') of ``n`` spectra into folder ``out``.

    ``qso_fraction`` defaults to the survey's real share (SDSS 0.14, LAMOST 0.0035).
    ``progress(k)`` is called with the number of files finished after each batch.
    Raises `SimulationError` on impossible arguments or an unwritable folder; on any failure
    nothing is left behind (the survey appears only when complete).
    """
    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    q = check_arguments(survey, n, qso_fraction, workers)
    out = Path(out)
    tmp = _prepare_target(out, overwrite)
    try:
        f = plan_survey(survey, int(n), int(seed), q)
        f["relpath"] = np.array([relative_path(survey, f, i) for i in range(n)], dtype=object)
        if survey == "lamost":
            # LAMOST fluxes are relative; real files sit near 1e-17 erg/s/cm2/A units with a
            # scatter of a factor of a few (the real DR1-DR7 files the tests use: r = 16 gives 80-1200).
            f["_lamost_scale"] = np.random.default_rng([seed, 3]).lognormal(0.0, 0.6, n)
        bounds = _batch_bounds(f, BATCH)
        results: list[dict[str, np.ndarray] | None] = [None] * len(bounds)

        def rows_of(a: int, b: int) -> dict[str, np.ndarray]:
            d = {k: v[a:b] for k, v in f.items()}
            d["_offset"] = np.full(b - a, a)
            return d

        if workers == 1 or len(bounds) == 1:
            for k, (a, b) in enumerate(bounds):
                results[k] = _simulate_batch(survey, int(seed), k, rows_of(a, b), str(tmp))
                if progress:
                    progress(b - a)
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
            try:
                futs = [
                    pool.submit(_simulate_batch, survey, int(seed), k, rows_of(a, b), str(tmp)) for k, (a, b) in enumerate(bounds)
                ]
                for k, fut in enumerate(futs):
                    results[k] = fut.result()
                    if progress:
                        progress(bounds[k][1] - bounds[k][0])
            finally:
                # On failure or Ctrl-C: drop the batches not started, let running ones end,
                # and only then remove the temporary folder.
                pool.shutdown(wait=True, cancel_futures=True)
        res = {key: np.concatenate([r[key] for r in results if r is not None]) for key in results[0]}  # type: ignore[index]
        catalog = tmp / CATALOG_NAME[survey]
        _write_catalog(catalog, survey, f, res, int(seed))
        _write_truth(tmp / "truth.parquet", survey, f, res, int(seed))
        _install(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SimulationError(f"{out}: writing the survey failed ({exc.strerror or exc}); nothing was kept") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cls = f["cls"]
    counts = {str(name): int((cls == k).sum()) for k, name in enumerate(CLASS_NAMES)}
    qobj = {int(o) for o, c in zip(f["object"], cls) if c == QSO}
    missing = {int(o) for o, c, ic in zip(f["object"], cls, f["in_catalog"]) if c == QSO and not ic}
    log.info("simulated %d %s spectra (%s) in %s", n, survey, ", ".join(f"{k} {v}" for k, v in counts.items()), out)
    return SimulationResult(
        out=out,
        survey=survey,
        seed=int(seed),
        n_files=int(n),
        counts=counts,
        n_repeats=int(f["is_repeat"].sum()),
        n_quasar_objects=len(qobj),
        n_catalog_missing=len(missing),
        catalog=out / CATALOG_NAME[survey],
        truth=out / "truth.parquet",
        files=[out / p for p in f["relpath"]],
    )


def _batch_bounds(f: dict[str, np.ndarray], size: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of about ``size`` files that never split an object."""
    n = f["cls"].shape[0]
    obj = f["object"]
    bounds = []
    a = 0
    while a < n:
        b = min(a + size, n)
        while b < n and obj[b] == obj[b - 1]:
            b += 1
        bounds.append((a, b))
        a = b
    return bounds
