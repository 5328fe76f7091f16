"""Quasar catalogues (SDSS DR14Q/DR16Q, LAMOST DR1Q..DR4&5Q) and labelling of spectra by them.

A spectrum is labelled quasar when its survey ids are in a catalogue (SDSS: plate, mjd,
fiberid, including DR14Q/DR16Q's duplicate-observation columns, which list other spectra of
the same quasar; LAMOST: obsid when both sides have it, else lmjd, planid, spid, fiberid),
and otherwise when a catalogue quasar lies within ``radius_arcsec`` of its position. The
``label_source`` column says which way each label came ('id', 'position' or 'none'), so a
user can see how many labels each way gave.

Column names are matched case-insensitively with a few aliases (``z_vi`` for ``z``,
``fiber`` for ``fiberid`` ...). The LAMOST quasar catalogues give the UTC ``MJD`` of the
observation, while LAMOST file names and headers use the local ``LMJD``; for a catalogue
without an LMJD column, ``lmjd = mjd + 1`` (the convention of LAMOST DR3+ headers and of the
paper authors' code).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from astropy.io import fits
from scipy.spatial import cKDTree

from spectransfer.data.splits import chord_length, unit_vectors
from spectransfer.errors import CatalogError
from spectransfer.surveys import SURVEYS, get_survey, survey_names

log = logging.getLogger(__name__)

FIXED_KINDS = ("auto", "positions")  # besides the registered surveys' names
_KIND_ALIASES = {
    "dr14q": "sdss",
    "dr16q": "sdss",
    "dr1q": "lamost",
    "dr2&3q": "lamost",
    "dr4&5q": "lamost",
    "dr23q": "lamost",
    "dr45q": "lamost",
}

# canonical name -> accepted column names (lower case), first found wins.
_ALIASES: dict[str, tuple[str, ...]] = {
    "ra": ("ra", "ra_deg", "raj2000", "ra_j2000", "radeg"),
    "dec": ("dec", "dec_deg", "dej2000", "decj2000", "dec_j2000", "dedeg", "decdeg"),
    "z": ("z", "z_vi", "zvi", "z_pipe", "z_qso", "redshift"),
    "plate": ("plate",),
    "mjd": ("mjd",),
    "fiberid": ("fiberid", "fiber_id", "fiber"),
    "obsid": ("obsid", "obs_id"),
    "lmjd": ("lmjd",),
    "planid": ("planid", "plan_id"),
    "spid": ("spid", "sp_id"),
    "filename": ("filename", "file_name", "file"),
}
_SDSS_IDS = get_survey("sdss").catalogue_keys[0]  # plate, mjd, fiberid: the DR14Q/DR16Q columns
_DUP = {"plate": "plate_duplicate", "mjd": "mjd_duplicate", "fiberid": "fiberid_duplicate"}

_SDSS_FILE = re.compile(r"spec-(\d+)-(\d+)-(\d+)\.fits?(\.gz)?$", re.I)
_LAMOST_FILE = re.compile(r"spec-(\d+)-(.+)_sp(\d+)-(\d+)(?:_\w+)?\.fits?(\.gz)?$", re.I)


@dataclass
class QuasarCatalog:
    """One quasar catalogue, reduced to what labelling needs.

    ``objects``: one row per catalogue row (quasar) with ra, dec (deg) and z (NaN = missing).
    ``keys``: survey ids that identify a spectrum of a catalogue quasar, with ``obj`` the
    row in ``objects`` (SDSS: plate, mjd, fiberid, several rows per quasar when the catalogue
    lists duplicate observations; LAMOST: obsid (may be <NA>), lmjd, planid, spid, fiberid).
    ``kind`` is 'sdss', 'lamost' or 'positions' (no ids: label by position only).
    """

    name: str
    path: str
    kind: str
    objects: pd.DataFrame
    keys: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    rule: str = "quasar catalogue"  # how its quasar rows were chosen (see ``quasar_rule``)
    rows: int = 0  # rows in the file, quasars or not
    class_counts: dict[str, int] = field(default_factory=dict)  # rows per class value, when chosen by a class column

    def __len__(self) -> int:
        return len(self.objects)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "quasars": len(self.objects),
            "id_keys": len(self.keys),
            "notes": list(self.notes),
            "rule": self.rule,
            "rows": self.rows,
            "class_counts": dict(self.class_counts),
        }


# ---- reading --------------------------------------------------------------------------------


def _read_columns(path: Path) -> tuple[list[str], Any]:
    """Column names of the file's table, and a function returning chosen columns as arrays."""
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".txt", ".tsv")):
        sep = "\t" if name.endswith(".tsv") else ","
        try:
            cols = list(pd.read_csv(path, nrows=0, sep=sep).columns)
        except Exception as exc:  # pandas raises many types for bad text files
            raise CatalogError(f"{path}: cannot read catalogue as CSV ({exc})") from exc

        def read_csv(wanted: list[str]) -> dict[str, np.ndarray]:
            try:
                df = pd.read_csv(path, usecols=wanted, sep=sep, low_memory=False)
            except Exception as exc:
                raise CatalogError(f"{path}: cannot read catalogue as CSV ({exc})") from exc
            return {c: df[c].to_numpy() for c in wanted}

        return cols, read_csv
    if name.endswith(".parquet"):
        try:
            cols = list(pq.read_schema(path).names)
        except Exception as exc:
            raise CatalogError(f"{path}: cannot read catalogue as Parquet ({exc})") from exc

        def read_parquet(wanted: list[str]) -> dict[str, np.ndarray]:
            df = pd.read_parquet(path, columns=wanted)
            return {c: df[c].to_numpy() for c in wanted}

        return cols, read_parquet
    return _fits_columns(path)


def _fits_columns(path: Path) -> tuple[list[str], Any]:
    """Columns of the first table HDU of a FITS catalogue; the file is memory-mapped, so only
    the columns asked for are read (DR16Q is 1.7 GB)."""
    try:
        hdul = fits.open(path, memmap=True)
    except Exception as exc:
        raise CatalogError(f"{path}: cannot read catalogue (not a FITS, CSV or Parquet table: {exc})") from exc
    try:
        ext = next((i for i, h in enumerate(hdul) if isinstance(h, (fits.BinTableHDU, fits.TableHDU))), None)
        if ext is None:
            raise CatalogError(f"{path}: FITS file has no table HDU")
        cols = list(hdul[ext].columns.names)
    except CatalogError:
        hdul.close()
        raise
    except Exception as exc:
        hdul.close()
        raise CatalogError(f"{path}: cannot read catalogue table ({exc})") from exc

    def read_fits(wanted: list[str]) -> dict[str, np.ndarray]:
        try:
            data = hdul[ext].data
            out = {}
            for c in wanted:
                a = np.array(data[c])  # a copy: the memory map closes below
                if a.dtype.byteorder not in ("=", "|"):
                    a = a.astype(a.dtype.newbyteorder("="))
                out[c] = a
            return out
        except Exception as exc:
            raise CatalogError(f"{path}: cannot read columns {wanted} ({exc})") from exc
        finally:
            hdul.close()

    return cols, read_fits


def _find(cols: Sequence[str], canonical: str) -> str | None:
    lower = {c.lower(): c for c in cols}
    for alias in _ALIASES[canonical]:
        if alias in lower:
            return lower[alias]
    return None


def _sniff(cols: Sequence[str]) -> str | None:
    have = {k for k in _ALIASES if _find(cols, k) is not None}
    if have & {"obsid", "lmjd", "planid", "spid"}:
        return "lamost"
    if {"plate", "mjd", "fiberid"} <= have:
        return "sdss"
    if "filename" in have:
        return "filename"
    lower = {c.lower() for c in cols}
    for survey in SURVEYS.values():  # any other registered survey: its id columns by name
        if survey.name not in ("sdss", "lamost") and any(set(key) <= lower for key in survey.catalogue_keys):
            return survey.name
    return None


def _filename_survey(path: Path, read: Any, column: str) -> str:
    """'sdss' or 'lamost' from a column of spectrum file names (the commoner pattern)."""
    names = [str(x) for x in _as_str(read([column])[column])]
    n_sdss = sum(bool(_SDSS_FILE.search(x)) for x in names)
    n_lamost = sum(bool(_LAMOST_FILE.search(x)) for x in names)
    if n_sdss == n_lamost == 0:
        raise CatalogError(f"{path}: column {column!r} holds no SDSS or LAMOST spectrum file names and there are no id columns")
    return "sdss" if n_sdss > n_lamost else "lamost"


def _as_int(a: np.ndarray) -> np.ndarray:
    """Integer ids from a numeric or text column; unparseable / missing -> -1."""
    s = pd.to_numeric(pd.Series(_as_str(a) if a.dtype.kind in "SUO" else a), errors="coerce")
    return s.fillna(-1).to_numpy().astype(np.int64)


def _as_str(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "S":
        a = np.char.decode(a, "ascii", errors="replace")
    return np.char.strip(np.asarray(a, dtype=str))


def _as_float(a: np.ndarray) -> np.ndarray:
    return np.array(pd.to_numeric(pd.Series(a), errors="coerce"), dtype=np.float64)


def load_catalog(path: str | Path, kind: str = "auto", all_quasars: bool = False) -> QuasarCatalog:
    """Read a quasar catalogue (FITS, CSV or Parquet) into a ``QuasarCatalog``.

    ``kind``: 'auto' (sniffed from the columns), 'sdss' (DR14Q, DR16Q), 'lamost' (DR1Q,
    DR2&3Q, DR4&5Q) or 'positions' (any table with ra/dec: positional labels only; 'auto'
    refuses such a table unless ``all_quasars``, because nothing in it says its objects are
    quasars). Which rows are quasars follows :func:`quasar_rule`: all rows of a recognised
    quasar catalogue, the QSO rows of a table with a class column (specObj CLASS, specClass,
    objtype ...), every row of any other table only when ``all_quasars`` is given. Raises
    ``CatalogError`` naming the file for an unreadable file or missing columns.
    """
    path = Path(path)
    kind = _KIND_ALIASES.get(kind.lower(), kind.lower())
    kinds = (FIXED_KINDS[0], *survey_names(), *FIXED_KINDS[1:])
    if kind not in kinds:
        raise CatalogError(f"{path}: unknown catalogue kind {kind!r} (choose from {', '.join(kinds)})")
    if not path.is_file():
        raise CatalogError(f"{path}: catalogue file does not exist")
    cols, read = _read_columns(path)
    found = {k: _find(cols, k) for k in _ALIASES}
    sniffed = _sniff(cols)
    if kind == "auto":
        if sniffed is None and not ((all_quasars or _class_column(cols)) and found["ra"] and found["dec"]):
            pos = (
                "it has ra/dec only; pass it with --qso-catalog if every row is a quasar"
                if found["ra"] and found["dec"]
                else "no ra/dec either"
            )
            keys = "; ".join(f"{s.name}: {' / '.join(', '.join(k) for k in s.catalogue_keys)}" for s in SURVEYS.values())
            raise CatalogError(
                f"{path}: not a recognised quasar catalogue: no id columns of a survey ({keys}) "
                f"({pos}); columns are {', '.join(cols[:20])}"
            )
        if sniffed is None:  # ra/dec only: a class column or the caller says which rows are quasars
            kind = "positions"
        else:
            kind = _filename_survey(path, read, str(found["filename"])) if sniffed == "filename" else sniffed
        if sniffed == "filename":
            cols, read = _read_columns(path)  # the sniffing read consumed the reader
    missing = [k for k in ("ra", "dec") if found[k] is None]
    if missing:
        raise CatalogError(f"{path}: catalogue lacks column(s) {', '.join(missing)} (columns: {', '.join(cols[:20])})")

    notes: list[str] = []
    wanted = [found["ra"], found["dec"]] + ([found["z"]] if found["z"] else [])
    if kind == "sdss":
        if sniffed == "filename" and not all(found[k] for k in _SDSS_IDS):
            wanted.append(found["filename"])
        else:
            miss = [k for k in _SDSS_IDS if found[k] is None]
            if miss:
                raise CatalogError(f"{path}: SDSS catalogue lacks id column(s) {', '.join(miss)}")
            wanted += [found[k] for k in _SDSS_IDS]
            lower = {c.lower(): c for c in cols}
            dups = [lower[_DUP[k]] for k in _SDSS_IDS if _DUP[k] in lower]
            if len(dups) == 3:
                wanted += dups
    elif kind == "lamost":
        have_key = all(found[k] for k in ("planid", "spid", "fiberid")) and (found["lmjd"] or found["mjd"])
        if found["obsid"]:
            wanted.append(found["obsid"])
        if have_key:
            wanted += [found[k] for k in ("planid", "spid", "fiberid")]
            wanted.append(found["lmjd"] or found["mjd"])
        elif found["filename"]:
            wanted.append(found["filename"])
        elif not found["obsid"]:
            raise CatalogError(f"{path}: LAMOST catalogue lacks obsid and (lmjd|mjd, planid, spid, fiberid) columns")
    elif kind != "positions":
        wanted += _survey_id_columns(path, cols, kind)
    rule, class_col = quasar_rule(path, cols, all_quasars)
    if class_col:
        wanted.append(class_col)
    data = read(list(dict.fromkeys(wanted)))
    n_rows = len(next(iter(data.values()))) if data else 0
    class_counts: dict[str, int] = {}
    if class_col:
        is_qso, class_counts = quasar_rows(path, class_col, data.pop(class_col))
        data = {k: v[is_qso] for k, v in data.items()}
        notes.append(f"{int(is_qso.sum())} of {n_rows} rows are quasars by {class_col}")
    elif rule == "all rows (asked)":
        notes.append(f"all {n_rows} rows taken as quasars, as asked")

    objects = pd.DataFrame({"ra": _as_float(data[found["ra"]]), "dec": _as_float(data[found["dec"]])})
    if found["z"]:
        z = _as_float(data[found["z"]])
        z[z <= -1] = np.nan  # -1 / -999 / -9999 are "no redshift"
        objects["z"] = z
    else:
        objects["z"] = np.nan
    bad_pos = ~np.isfinite(objects["ra"].to_numpy()) | ~np.isfinite(objects["dec"].to_numpy())
    if bad_pos.any():
        notes.append(f"{int(bad_pos.sum())} rows without a finite position")
    n = len(objects)
    idx = np.arange(n)

    if kind == "sdss":
        keys = _sdss_keys(data, found, idx, notes)
    elif kind == "lamost":
        keys = _lamost_keys(data, found, idx, notes)
    elif kind != "positions":
        keys = _survey_keys(data, cols, kind, idx)
    else:
        keys = pd.DataFrame({"obj": np.empty(0, dtype=np.int64)})
    cat = QuasarCatalog(
        name=path.name,
        path=str(path),
        kind=kind,
        objects=objects,
        keys=keys,
        notes=notes,
        rule=rule,
        rows=n_rows,
        class_counts=class_counts,
    )
    if class_counts:
        log.info("catalogue %s: rows per %s: %s", cat.name, class_col, ", ".join(f"{k} {v}" for k, v in class_counts.items()))
    log.info(
        "catalogue %s: %s, %d quasars, %d id keys%s",
        cat.name,
        kind,
        len(cat),
        len(keys),
        "; " + "; ".join(notes) if notes else "",
    )
    return cat


# ---- which rows are quasars ------------------------------------------------------------------

# Columns that only quasar catalogues carry: SDSS DR12Q/DR14Q/DR16Q (visual-inspection and PCA
# redshifts, the source of Z, duplicate observations, BAL measures) and the LAMOST quasar
# catalogues (visual-inspection redshift beside the pipeline's class and redshift). A table
# with one of them lists quasars; CLASS_PIPE / CLASS_PERSON there are not a row filter.
QSO_CATALOG_COLUMNS = (
    "z_vi",
    "source_z",
    "is_qso_final",
    "plate_duplicate",
    "z_pca",
    "z_mgii",
    "bal_prob",
    "bi_civ",
    "class_pipe",
    "z_pipe",
    "z_qso",
)
# Columns that give each row's class, most specific first: specObj/spAll CLASS, SkyServer DR7
# specClass and spSpec SPEC_CLN (numeric codes), SIMBAD otype, target types (objtype, objtype_*).
CLASS_COLUMNS = ("class", "specclass", "spec_cln", "objclass", "main_type", "otype", "objtype")
# DR7 specClass / SPEC_CLN codes (SDSS DR7 schema): 3 QSO and 4 HIZ_QSO are quasars.
_SPEC_CLN = {0: "UNKNOWN", 1: "STAR", 2: "GALAXY", 3: "QSO", 4: "HIZ_QSO", 5: "SKY", 6: "STAR_LATE", 7: "GAL_EM"}
_NUMERIC_CLASS = ("specclass", "spec_cln")


def _class_column(cols: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in cols}
    for name in CLASS_COLUMNS:
        if name in lower:
            return lower[name]
    typed = sorted(c for c in cols if c.lower().startswith("objtype_"))
    return typed[0] if typed else None


def quasar_rule(path: Path, cols: Sequence[str], all_quasars: bool = False) -> tuple[str, str | None]:
    """(rule, column) saying which rows of a catalogue are quasars; ``CatalogError`` when nothing can tell.

    'quasar catalogue': a recognised quasar catalogue, every row (DR16Q's superset keeps only
    IS_QSO_FINAL == 1: rule 'is_qso_final', column IS_QSO_FINAL). 'all rows (asked)': the
    caller vouches for every row. 'class column': the rows whose class is QSO.
    """
    lower = {c.lower(): c for c in cols}
    if all_quasars:
        return "all rows (asked)", None
    if any(c in lower for c in QSO_CATALOG_COLUMNS):
        if "is_qso_final" in lower:
            return "is_qso_final", lower["is_qso_final"]
        return "quasar catalogue", None
    col = _class_column(cols)
    if col is not None:
        return "class column", col
    raise CatalogError(
        f"{path}: cannot tell which rows are quasars: no class column ({', '.join(CLASS_COLUMNS)}, objtype_*) and none of the "
        f"quasar-catalogue columns ({', '.join(QSO_CATALOG_COLUMNS)}); if every row is a quasar, pass it with --qso-catalog"
    )


def quasar_rows(path: Path, column: str, values: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """(is-quasar mask, rows per class value) from a class column (text, or DR7 numeric codes)."""
    name = column.lower()
    if name == "is_qso_final":
        v = _as_int(np.asarray(values))
        names = np.array([f"IS_QSO_FINAL={x}" for x in v], dtype=object)
        is_qso = v == 1
    elif np.asarray(values).dtype.kind in "iuf" or name in _NUMERIC_CLASS:
        if name not in _NUMERIC_CLASS:
            raise CatalogError(
                f"{path}: class column {column!r} is numeric and its codes are unknown; pass the file with --qso-catalog if every row is a quasar"
            )
        v = _as_int(np.asarray(values))
        names = np.array([_SPEC_CLN.get(int(x), f"code {int(x)}") for x in v], dtype=object)
        is_qso = np.isin(v, (3, 4))
    else:
        raw = _as_str(np.asarray(values))
        text = np.char.upper(raw)
        names = np.where(np.isin(text, ("", "-", "NAN", "NONE")), "(none)", raw).astype(object)
        is_qso = np.array([t in ("QSO", "QUASAR", "HIZ_QSO") or t.startswith("QSO_") for t in text], dtype=bool)
    counts = pd.Series(names).value_counts()
    return is_qso, {str(k): int(c) for k, c in counts.items()}


def _sdss_keys(data: dict, found: dict, idx: np.ndarray, notes: list[str]) -> pd.DataFrame:
    if found["plate"] in data:
        plate, mjd, fib = (_as_int(data[found[k]]) for k in _SDSS_IDS)
    else:  # ids parsed from spec-PLATE-MJD-FIBER file names
        parsed = [_SDSS_FILE.search(str(s)) for s in _as_str(data[found["filename"]])]
        plate = np.array([int(m.group(1)) if m else -1 for m in parsed])
        mjd = np.array([int(m.group(2)) if m else -1 for m in parsed])
        fib = np.array([int(m.group(3)) if m else -1 for m in parsed])
    parts = [pd.DataFrame({"plate": plate, "mjd": mjd, "fiberid": fib, "obj": idx})]
    dup_cols = [c for c in data if c.lower().endswith("_duplicate")]
    if len(dup_cols) == 3:
        by = {c.lower().split("_")[0]: np.asarray(data[c]) for c in dup_cols}
        dp, dm, df_ = by["plate"], by["mjd"], by["fiberid"]
        if dp.ndim == 1:
            dp, dm, df_ = dp[:, None], dm[:, None], df_[:, None]
        ok = (dp > 0) & (dm > 0) & (df_ > 0)  # empty slots hold -1 (DR14Q) or 0
        rows, _ = np.nonzero(ok)
        parts.append(
            pd.DataFrame(
                {
                    "plate": dp[ok].astype(np.int64),
                    "mjd": dm[ok].astype(np.int64),
                    "fiberid": df_[ok].astype(np.int64),
                    "obj": rows,
                }
            )
        )
        notes.append(f"{int(ok.sum())} duplicate-observation keys")
    keys = pd.concat(parts, ignore_index=True)
    keys = keys[(keys.plate > 0) & (keys.mjd > 0) & (keys.fiberid > 0)]
    return keys.drop_duplicates(subset=list(_SDSS_IDS)).reset_index(drop=True)


def _survey_id_columns(path: Path, cols: Sequence[str], kind: str) -> list[str]:
    """Columns of a catalogue of another registered survey: its id columns, by name (any case)."""
    lower = {c.lower(): c for c in cols}
    ids = [c for c, _ in get_survey(kind).id_columns if c in lower]
    if not any(set(key) <= set(ids) for key in get_survey(kind).catalogue_keys):
        raise CatalogError(f"{path}: {kind} catalogue lacks the id columns of any of {get_survey(kind).catalogue_keys}")
    return [lower[c] for c in ids]


def _survey_keys(data: dict, cols: Sequence[str], kind: str, idx: np.ndarray) -> pd.DataFrame:
    lower = {c.lower(): c for c in cols}
    keys = pd.DataFrame({"obj": idx})
    for col, dtype in get_survey(kind).id_columns:
        if col in lower:
            keys[col] = _as_int(data[lower[col]]) if dtype == "int64" else _as_str(data[lower[col]])
    return keys


def _lamost_keys(data: dict, found: dict, idx: np.ndarray, notes: list[str]) -> pd.DataFrame:
    n = idx.size
    keys = pd.DataFrame({"obj": idx})
    if found["obsid"] and found["obsid"] in data:
        obs = _as_int(data[found["obsid"]])
        keys["obsid"] = pd.array(np.where(obs > 0, obs, 0), dtype="Int64")
        keys.loc[obs <= 0, "obsid"] = pd.NA
    else:
        keys["obsid"] = pd.array([pd.NA] * n, dtype="Int64")
    if found["planid"] and found["planid"] in data:
        keys["planid"] = _as_str(data[found["planid"]])
        keys["spid"] = _as_int(data[found["spid"]])
        keys["fiberid"] = _as_int(data[found["fiberid"]])
        if found["lmjd"]:
            keys["lmjd"] = _as_int(data[found["lmjd"]])
        else:
            keys["lmjd"] = _as_int(data[found["mjd"]]) + 1
            notes.append("lmjd = MJD + 1 (catalogue has MJD only)")
    elif found["filename"] and found["filename"] in data:
        parsed = [_LAMOST_FILE.search(str(s)) for s in _as_str(data[found["filename"]])]
        keys["lmjd"] = np.array([int(m.group(1)) if m else -1 for m in parsed], dtype=np.int64)
        keys["planid"] = np.array([m.group(2) if m else "" for m in parsed], dtype=object)
        keys["spid"] = np.array([int(m.group(3)) if m else -1 for m in parsed], dtype=np.int64)
        keys["fiberid"] = np.array([int(m.group(4)) if m else -1 for m in parsed], dtype=np.int64)
        notes.append("ids parsed from LAMOST file names")
    else:
        keys["lmjd"], keys["planid"], keys["spid"], keys["fiberid"] = -1, "", -1, -1
    return keys[["obsid", "lmjd", "planid", "spid", "fiberid", "obj"]]


# ---- labelling ------------------------------------------------------------------------------


def _meta_col(meta: pd.DataFrame, name: str) -> pd.Series:
    if name in meta.columns:
        return meta[name]
    return pd.Series([pd.NA] * len(meta), index=meta.index, dtype="object")


def _int_key(s: pd.Series) -> np.ndarray:
    """Nullable ids as int64 with -1 for missing."""
    return pd.to_numeric(s, errors="coerce").fillna(-1).to_numpy().astype(np.int64)


def _str_key(s: pd.Series) -> np.ndarray:
    return s.astype("string").str.strip().fillna("").to_numpy(dtype=object)


def _key_column(s: pd.Series, dtype: str) -> np.ndarray:
    return _int_key(s) if dtype == "int64" else _str_key(s)


def _valid(frame: pd.DataFrame, key: tuple[str, ...], dtypes: dict[str, str]) -> np.ndarray:
    """Rows whose every key column holds a value (ints >= 0: missing ones are -1; strings not empty)."""
    ok = np.ones(len(frame), dtype=bool)
    for c in key:
        v = frame[c].to_numpy()
        ok &= (v >= 0) if dtypes[c] == "int64" else (v != "")
    return ok


def _id_matches(meta: pd.DataFrame, cat: QuasarCatalog) -> tuple[np.ndarray, np.ndarray]:
    """(positions in meta, catalogue object index) of spectra whose ids are in ``cat``.

    A catalogue of a registered survey matches that survey's spectra on the id tuples the
    survey declares (``Survey.catalogue_keys``), in order: a spectrum matched by one tuple
    (LAMOST: obsid) is not tried with the next (the 4-tuple, for spectra or rows without one).
    """
    if cat.kind not in SURVEYS or not len(cat.keys):
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    survey = get_survey(cat.kind)
    dtypes = dict(survey.id_columns)
    mine = np.ones(len(meta), dtype=bool)
    if "survey" in meta.columns:
        mine = (meta["survey"].astype("string").fillna(survey.name) == survey.name).to_numpy()
    done = np.zeros(len(meta), dtype=bool)
    out_pos, out_obj = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for key in survey.catalogue_keys:
        if not set(key) <= set(cat.keys.columns):
            continue
        left = pd.DataFrame({c: _key_column(_meta_col(meta, c), dtypes[c]) for c in key})
        left["pos"] = np.arange(len(meta))
        left = left[mine & ~done & _valid(left, key, dtypes)]
        right = pd.DataFrame({c: _key_column(cat.keys[c], dtypes[c]) for c in key})
        right["obj"] = cat.keys["obj"].to_numpy()
        right = right[_valid(right, key, dtypes)].drop_duplicates(subset=list(key))
        m = left.merge(right, on=list(key), how="inner")
        out_pos.append(m["pos"].to_numpy())
        out_obj.append(m["obj"].to_numpy())
        done[m["pos"].to_numpy()] = True
    return np.concatenate(out_pos).astype(np.int64), np.concatenate(out_obj).astype(np.int64)


def label_spectra(meta: pd.DataFrame, catalogs: Sequence[QuasarCatalog], radius_arcsec: float | None = 1.5) -> pd.DataFrame:
    """Label spectra as quasars (1) or other (0) from quasar catalogues.

    ``meta`` has one row per spectrum with (where known) ``survey``, SDSS ``plate``, ``mjd``,
    ``fiberid``, LAMOST ``obsid``, ``lmjd``, ``planid``, ``spid``, ``fiberid``, and ``ra``,
    ``dec`` in degrees. Returns a copy with ``label`` (int8), ``label_source`` ('id' |
    'position' | 'none'), ``catalog_name`` (the catalogue that gave the label) and
    ``catalog_z`` (its redshift, NaN if none).

    Exact id matches come first, catalogues in the order given (SDSS catalogues match SDSS
    spectra, LAMOST catalogues LAMOST spectra). Every spectrum still unmatched is then
    matched by position to the nearest quasar of any catalogue within ``radius_arcsec``
    (a KD-tree on unit vectors; ``None`` or 0 turns the fallback off). The counts per
    source are logged and kept in ``result.attrs['label_counts']``.
    """
    n = len(meta)
    out = meta.copy()
    label = np.zeros(n, dtype=np.int8)
    source = np.full(n, "none", dtype=object)
    cat_name = np.full(n, None, dtype=object)
    cat_z = np.full(n, np.nan)
    counts: dict[str, Any] = {"id": 0, "position": 0, "none": 0, "by_catalog": {}}

    for cat in catalogs:
        pos, obj = _id_matches(meta, cat)
        new = ~label[pos].astype(bool)
        pos, obj = pos[new], obj[new]
        pos, first = np.unique(pos, return_index=True)  # one catalogue row per spectrum
        obj = obj[first]
        label[pos] = 1
        source[pos] = "id"
        cat_name[pos] = cat.name
        cat_z[pos] = cat.objects["z"].to_numpy()[obj]
        counts["by_catalog"][cat.name] = {"id": int(pos.size), "position": 0}

    if radius_arcsec and n and catalogs:
        ra = pd.to_numeric(_meta_col(meta, "ra"), errors="coerce").to_numpy(dtype=np.float64)
        dec = pd.to_numeric(_meta_col(meta, "dec"), errors="coerce").to_numpy(dtype=np.float64)
        todo = np.nonzero((label == 0) & np.isfinite(ra) & np.isfinite(dec))[0]
        objs = [(ci, c.objects) for ci, c in enumerate(catalogs) if len(c.objects)]
        if todo.size and objs:
            all_ra = np.concatenate([o["ra"].to_numpy() for _, o in objs])
            all_dec = np.concatenate([o["dec"].to_numpy() for _, o in objs])
            which = np.concatenate([np.full(len(o), ci) for ci, o in objs])
            row = np.concatenate([np.arange(len(o)) for _, o in objs])
            fin = np.isfinite(all_ra) & np.isfinite(all_dec)
            tree = cKDTree(unit_vectors(all_ra[fin], all_dec[fin]))
            which, row = which[fin], row[fin]
            chord = chord_length(radius_arcsec)
            dist, hit = tree.query(unit_vectors(ra[todo], dec[todo]), k=1, distance_upper_bound=chord)
            ok = np.isfinite(dist) & (dist <= chord)
            pos, hit = todo[ok], hit[ok]
            label[pos] = 1
            source[pos] = "position"
            for ci in np.unique(which[hit]):
                sel = which[hit] == ci
                cat = catalogs[ci]
                cat_name[pos[sel]] = cat.name
                cat_z[pos[sel]] = cat.objects["z"].to_numpy()[row[hit][sel]]
                counts["by_catalog"].setdefault(cat.name, {"id": 0, "position": 0})["position"] = int(sel.sum())

    out["label"] = label
    out["label_source"] = pd.Series(source, index=out.index, dtype="object")
    out["catalog_name"] = pd.Series(cat_name, index=out.index, dtype="object")
    out["catalog_z"] = cat_z
    counts["id"] = int((source == "id").sum())
    counts["position"] = int((source == "position").sum())
    counts["none"] = int((source == "none").sum())
    out.attrs["label_counts"] = counts
    log.info(
        "labels: %d quasars by id, %d by position (<= %s arcsec), %d unmatched; per catalogue %s",
        counts["id"],
        counts["position"],
        radius_arcsec,
        counts["none"],
        counts["by_catalog"],
    )
    return out
