"""The candidate tables' columns, categories, quality bits and writers, each defined once.

`discover` (every spectrum of a store) and `classify` (spectrum files, no store) write
tables with the columns below. Each column is declared once with its dtype, unit and a
one-line description; the writers put the unit in TUNIT and the description in TCOMM
(FITS), in the field description (VOTable) and in the parquet metadata, so a table read
years later still says what it holds and where it came from. The output format follows the
file's extension: .fits/.fit, .parquet, .csv, .vot/.xml (the last two through astropy).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectransfer.candidates.redshifts import ZWARN_PRED_BITS
from spectransfer.errors import EvaluateError
from spectransfer.provenance import atomic_path, provenance_cards
from spectransfer.surveys import id_columns

EXTNAME = "CANDIDATES"
REFERENCE = "Podsztavek, Skoda & Tvrdik 2021, ASP Conf. Ser. 532 (ADASS XXX)"
FORMATS = {".fits": "fits", ".fit": "fits", ".parquet": "parquet", ".csv": "csv", ".vot": "votable", ".xml": "votable"}

CATEGORIES = ("new_candidate", "missed_by_model", "agree_qso", "agree_other")


def category_meaning(label_mode: str = "catalog") -> dict[str, str]:
    """What each CATEGORY means for a store labelled by its quasar catalogues ('catalog'), by the
    survey pipeline's CLASS ('pipeline') or not at all ('none': every positive is 'new')."""
    ref = {"catalog": "catalogue", "pipeline": "pipeline CLASS"}.get(label_mode)
    if ref is None:
        return {
            "new_candidate": "model says quasar (the store has no labels to compare with)",
            "missed_by_model": "(no labels: never used)",
            "agree_qso": "(no labels: never used)",
            "agree_other": "model says not a quasar (no labels)",
        }
    return {
        "new_candidate": f"model says quasar, {ref} does not",
        "missed_by_model": f"{ref} quasar the model rejects",
        "agree_qso": "both say quasar",
        "agree_other": "both say not a quasar",
    }


CATEGORY_MEANING = category_meaning("catalog")

# QUALITY bits: a row is kept and flagged, never dropped.
QUALITY_BITS = {
    "LOW_SNR": 0,  # median S/N on the grid below LOW_SNR
    "NO_PIPELINE_CLASS": 1,  # the pipeline gave no class (missing, or LAMOST 'Unknown')
    "NO_PIPELINE_Z": 2,  # the pipeline gave no redshift (LAMOST z = -9999 is stored as null)
    "ZWARNING": 3,  # the pipeline's redshift warning flag is set (classify scores these by default)
}
LOW_SNR = 2.0


@dataclass(frozen=True)
class Column:
    """One output column: FITS name, numpy dtype ('str' for text), unit (FITS string) and meaning."""

    name: str
    dtype: str
    unit: str | None
    description: str
    source: str | None = None  # the store meta / ingest record field it is copied from


_C = Column
COLUMNS: dict[str, Column] = {
    c.name: c
    for c in (
        _C("SPECTRUM_ID", "str", None, "spectrum id (survey ids joined by '-')", "spectrum_id"),
        _C("SOURCE_FILE", "str", None, "spectrum file the row was read from", "source_file"),
        _C("ROW", "i8", None, "row of the spectrum in the store", "row"),
        _C("SURVEY", "str", None, "survey: sdss or lamost", "survey"),
        _C("PLATE", "i8", None, "SDSS plate (-1 = not SDSS)", "plate"),
        _C("MJD", "i8", "d", "SDSS MJD of the observation (-1 = not SDSS)", "mjd"),
        _C("FIBERID", "i8", None, "fibre on the plate (SDSS) or spectrograph (LAMOST)", "fiberid"),
        _C("OBSID", "i8", None, "LAMOST obsid (-1 = not LAMOST)", "obsid"),
        _C("LMJD", "i8", "d", "LAMOST local MJD (-1 = not LAMOST)", "lmjd"),
        _C("PLANID", "str", None, "LAMOST plan id", "planid"),
        _C("SPID", "i8", None, "LAMOST spectrograph id (-1 = not LAMOST)", "spid"),
        _C("RA", "f8", "deg", "right ascension (ICRS)", "ra"),
        _C("DEC", "f8", "deg", "declination (ICRS)", "dec"),
        _C("CLASS", "str", None, "survey pipeline class", "pipeline_class"),
        _C("SUBCLASS", "str", None, "survey pipeline subclass", "pipeline_subclass"),
        _C("Z", "f8", None, "survey pipeline redshift (NaN = none)", "z"),
        _C("ZWARNING", "i8", None, "survey pipeline redshift warning bits (-1 = none given)", "zwarning"),
        _C("CAT_LABEL", "i2", None, "1 = in a quasar catalogue, 0 = not", "label"),
        _C("LABEL_SOURCE", "str", None, "how the catalogue label was matched", "label_source"),
        _C("CATALOG_NAME", "str", None, "quasar catalogue that holds the spectrum", "catalog_name"),
        _C("CATALOG_Z", "f8", None, "catalogue redshift (NaN = not a catalogue quasar)", "catalog_z"),
        _C("SNR", "f4", None, "median S/N per grid bin", "snr"),
        _C("MAG", "f4", "mag", "r-band magnitude; where it came from in MAG_SRC", "mag"),
        _C("MAG_SRC", "str", None, "MAG from: psfmag, spectroflux, synthetic (SDSS), lamost_ps1, lamost_input", "mag_source"),
        _C("OBJECT_ID", "str", None, "object id shared by repeat observations", "object_id"),
        _C("SPLIT", "str", None, "train/val/test split of the store", "split"),
        _C("LOGIT", "f4", None, "network output before calibration"),
        _C("P_QSO", "f4", None, "P(QSO) = sigmoid(LOGIT / TEMPER), see CALIBR"),
        _C("IS_QSO", "bool", None, "quasar: P_QSO + template evidence (TPLWEIGH) >= THRESH, or SPECTYPE"),
        _C("SPECTYPE", "str", None, "best-fitting template family: QSO, GALAXY, STAR (empty = not fitted)"),
        _C("DCHI2_QSO", "f4", None, "best non-quasar minus best quasar template chi2 (NaN = not fitted)"),
        _C("DECIDED_BY", "str", None, "IS_QSO from: network, or templates (decided, or turned the call)"),
        _C("CATEGORY", "str", None, "model vs catalogue: " + ", ".join(CATEGORIES)),
        _C("PIPE_NOT_QSO", "bool", None, "positive the pipeline calls STAR or GALAXY"),
        _C("QUALITY", "i4", None, "bitmask of doubts, see QBITn cards (0 = none)"),
        _C("P_QSO_STD", "f4", None, "spread of P_QSO over MC-dropout passes (NaN = not asked, see MCDROP)"),
        _C("Z_NET", "f8", None, "network redshift from the z head (NaN = run without one)"),
        _C("Z_NET_ERR", "f8", None, "network redshift uncertainty (std of its z distribution)"),
        _C("Z_NET_PROB", "f4", None, "z head's probability that Z_NET is within 3000 km/s of the truth"),
        _C("Z_PRED", "f8", None, "redshift refined with the DR16Q quasar templates (positives; NaN = not fitted)"),
        _C("Z_PRED_ERR", "f8", None, "Z_PRED error from the chi2 curvature (delta chi2 = 1)"),
        _C("ZWARN_PRED", "i4", None, "Z_PRED warning bits, see ZBITn cards (0 = good)"),
        _C("DELTACHI2", "f8", None, "chi2 of the next-best minimum > 3000 km/s away minus the best"),
    )
}

DISCOVER_COLUMNS = (
    "SPECTRUM_ID",
    "ROW",
    "SURVEY",
    "PLATE",
    "MJD",
    "FIBERID",
    "OBSID",
    "LMJD",
    "PLANID",
    "SPID",
    "RA",
    "DEC",
    "CLASS",
    "SUBCLASS",
    "Z",
    "ZWARNING",
    "CAT_LABEL",
    "LABEL_SOURCE",
    "CATALOG_NAME",
    "CATALOG_Z",
    "SNR",
    "MAG",
    "MAG_SRC",
    "OBJECT_ID",
    "SPLIT",
    "SOURCE_FILE",
    "LOGIT",
    "P_QSO",
    "IS_QSO",
    "CATEGORY",
    "PIPE_NOT_QSO",
    "SPECTYPE",
    "DCHI2_QSO",
    "DECIDED_BY",
    "QUALITY",
    "P_QSO_STD",
    "Z_NET",
    "Z_NET_ERR",
    "Z_NET_PROB",
    "Z_PRED",
    "Z_PRED_ERR",
    "ZWARN_PRED",
    "DELTACHI2",
)
CLASSIFY_COLUMNS = (
    "SOURCE_FILE",
    "SPECTRUM_ID",
    "P_QSO",
    "IS_QSO",
    "SPECTYPE",
    "DCHI2_QSO",
    "DECIDED_BY",
    "LOGIT",
    "SURVEY",
    "PLATE",
    "MJD",
    "FIBERID",
    "OBSID",
    "LMJD",
    "PLANID",
    "SPID",
    "RA",
    "DEC",
    "CLASS",
    "SUBCLASS",
    "Z",
    "ZWARNING",
    "SNR",
    "MAG",
    "MAG_SRC",
    "QUALITY",
    "P_QSO_STD",
    "Z_NET",
    "Z_NET_ERR",
    "Z_NET_PROB",
    "Z_PRED",
    "Z_PRED_ERR",
    "ZWARN_PRED",
    "DELTACHI2",
)


def _with_registered_ids(names: Sequence[str]) -> list[str]:
    """``names`` plus the id columns of surveys registered beyond SDSS and LAMOST (after SPID or
    SURVEY): a new survey's ids reach the candidate table without an edit here."""
    have = set(names)
    extra = [c.upper() for c, _ in id_columns() if c.upper() not in have and c.upper() not in COLUMNS]
    if not extra:
        return list(names)
    at = names.index("SPID") + 1 if "SPID" in names else names.index("SURVEY") + 1
    return [*names[:at], *extra, *names[at:]]


def discover_columns() -> list[str]:
    """Columns of discover's candidate table, in order."""
    return _with_registered_ids(DISCOVER_COLUMNS)


def classify_columns() -> list[str]:
    """Columns of classify's table, in order."""
    return _with_registered_ids(CLASSIFY_COLUMNS)


def column_def(name: str) -> Column:
    """The definition of an output column; a registered survey's own id column gets a generic one."""
    col = COLUMNS.get(name)
    if col is not None:
        return col
    dtypes = {c.upper(): (c, t) for c, t in id_columns()}
    if name not in dtypes:
        raise KeyError(name)
    src, t = dtypes[name]
    return Column(name, "i8" if t == "int64" else "str", None, f"survey id {src} (-1 / empty = another survey)", src)


# ---- categories and quality ------------------------------------------------------------------


def categorise(p_qso: np.ndarray, label: np.ndarray, threshold: float, positive: np.ndarray | None = None) -> np.ndarray:
    """CATEGORY per spectrum from the model's decision and the catalogue label (1/0).

    Positive means ``p_qso >= threshold``, or ``positive`` where given (IS_QSO):
    new_candidate (positive, not in the catalogue), missed_by_model (catalogue quasar,
    negative), agree_qso, agree_other.
    """
    p_qso = np.asarray(p_qso)
    label = np.asarray(label)
    if p_qso.shape != label.shape or p_qso.ndim != 1:
        raise ValueError(f"p_qso and label must be 1-D of equal length, got {p_qso.shape} and {label.shape}")
    pos = p_qso >= threshold if positive is None else np.asarray(positive, dtype=bool)
    lab = label.astype(bool)
    out = np.empty(p_qso.shape[0], dtype=object)
    out[pos & ~lab] = "new_candidate"
    out[~pos & lab] = "missed_by_model"
    out[pos & lab] = "agree_qso"
    out[~pos & ~lab] = "agree_other"
    return out


def quality_bits(meta: pd.DataFrame) -> np.ndarray:
    """QUALITY bitmask per row (see QUALITY_BITS); 0 = nothing doubtful."""
    q = np.zeros(len(meta), dtype=np.int32)

    def flag(name: str, where: np.ndarray) -> None:
        q[where] |= np.int32(1 << QUALITY_BITS[name])

    if "snr" in meta:
        flag("LOW_SNR", ~(_numeric(meta["snr"]) >= LOW_SNR))
    if "pipeline_class" in meta:
        cls = meta["pipeline_class"].astype("string").str.strip().str.upper()
        flag("NO_PIPELINE_CLASS", (cls.isna() | cls.isin(["", "UNKNOWN"])).to_numpy(dtype=bool))
    if "z" in meta:
        z = _numeric(meta["z"])
        flag("NO_PIPELINE_Z", ~np.isfinite(z) | (z == -9999.0))
    if "zwarning" in meta:
        zw = pd.to_numeric(meta["zwarning"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
        flag("ZWARNING", zw != 0)
    return q


def _numeric(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def pipe_not_qso(
    p_qso: np.ndarray, pipeline_class: pd.Series, threshold: float, positive: np.ndarray | None = None
) -> np.ndarray:
    """Positives (p >= threshold, or ``positive``) that the survey pipeline classes as STAR or GALAXY."""
    cls = pipeline_class.astype("string").str.strip().str.upper().fillna("").to_numpy(dtype=object)
    pos = np.asarray(p_qso) >= threshold if positive is None else np.asarray(positive, dtype=bool)
    return pos & np.isin(cls, ["STAR", "GALAXY"])


# ---- building and writing tables -----------------------------------------------------------------


def from_meta(meta: pd.DataFrame, names: Sequence[str]) -> dict[str, pd.Series]:
    """The columns of ``names`` that come from ``meta`` fields, under their output names."""
    out = {}
    for name in names:
        src = column_def(name).source
        if src is not None and src in meta.columns:
            out[name] = meta[src].reset_index(drop=True)
    return out


def header_cards(header: dict[str, tuple[Any, str]]) -> list[tuple[str, Any, str]]:
    """The table's header: the caller's cards, then reference, provenance, QUALITY bits, categories."""
    cards = [(k, v, c) for k, (v, c) in header.items()]
    cards.append(("REFERENC", REFERENCE, ""))  # 62 characters: no room for a comment
    cards.extend(provenance_cards())
    cards.extend((f"QBIT{bit}", name, "QUALITY bit meaning") for name, bit in QUALITY_BITS.items())
    cards.append(("CATEGS", ",".join(CATEGORIES), ""))
    cards.extend((f"ZBIT{int(v).bit_length() - 1}", name, "ZWARN_PRED bit meaning") for name, v in ZWARN_PRED_BITS.items())
    return cards


def output_format(path: str | Path) -> str:
    """'fits' | 'parquet' | 'csv' | 'votable' from the extension; one-line error otherwise."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise EvaluateError(f"{path}: the output must end in {', '.join(FORMATS)} (format follows the extension)")
    return fmt


def write_table(table: pd.DataFrame, cards: list[tuple[str, Any, str]], out: str | Path) -> Path:
    """Write ``table`` (columns named as in COLUMNS) to ``out`` in the extension's format, atomically."""
    return write_blocks(lambda: iter([table]), cards, out)


def write_blocks(blocks: Callable[[], Iterable[pd.DataFrame]], cards: list[tuple[str, Any, str]], out: str | Path) -> Path:
    """Write the concatenation of ``blocks()`` (DataFrames with the same columns) to ``out``, atomically.

    FITS and parquet are written block by block, so memory is bounded by one block, not by
    the table: ``blocks`` is called twice (the first pass measures the string columns' widths
    and counts the rows, which the FITS header states up front). CSV and VOTable go through
    astropy with the whole table in memory (small tables only).
    """
    out = Path(out)
    fmt = output_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("fits", "parquet"):
        layout = _Layout.measure(blocks())
        with atomic_path(out) as tmp:
            (_write_fits if fmt == "fits" else _write_parquet)(blocks(), layout, cards, tmp)
        return out
    table = pd.concat(list(blocks()), ignore_index=True)
    if fmt == "votable":
        _write_votable(table, cards, out)
    else:  # CSV holds the columns only: FITS, parquet and VOTable also carry the header
        with atomic_path(out) as tmp:
            _astropy_table(table, cards).write(tmp, format="ascii.csv", overwrite=True)
    return out


@dataclass
class _Layout:
    """Column names, row count and string widths (bytes, at least 1) of a table given in blocks."""

    names: list[str]
    n_rows: int
    widths: dict[str, int]

    @classmethod
    def measure(cls, blocks: Iterable[pd.DataFrame]) -> _Layout:
        names: list[str] | None = None
        n, widths = 0, {}
        for block in blocks:
            if names is None:
                names = list(block.columns)
                widths = {k: 1 for k in names if column_def(k).dtype == "str"}
            elif list(block.columns) != names:
                raise ValueError(f"blocks have different columns: {names} and {list(block.columns)}")
            n += len(block)
            for k in widths:
                widths[k] = max(widths[k], int(_strings(block[k]).str.len().max()) if len(block) else 1)
        if names is None:
            raise ValueError("no blocks to write")
        return cls(names, n, widths)


def _strings(values: pd.Series) -> pd.Series:
    """A text column as UTF-8 bytes ('' = missing)."""
    return values.astype("string").fillna("").astype(str).str.encode("utf-8")


def _array(col: Column, values: pd.Series, width: int | None = None) -> np.ndarray:
    """A column as a fixed-dtype array: strings '' = missing, ints -1 = missing, floats NaN."""
    if col.dtype == "str":
        arr = _strings(values).to_numpy(dtype=object)
        if width is None:
            width = max([1] + [len(s) for s in arr])
        return arr.astype(f"S{width}")
    if col.dtype == "bool":
        return values.fillna(False).to_numpy(dtype=bool)
    if col.dtype.startswith("i"):
        fill = 0 if col.name == "CAT_LABEL" else -1
        return pd.to_numeric(values, errors="coerce").fillna(fill).to_numpy(dtype=col.dtype)
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=col.dtype, na_value=np.nan)


def _write_votable(table: pd.DataFrame, cards: list[tuple[str, Any, str]], out: Path) -> None:
    """VOTable with the header cards as INFO elements of the table (what VO tools show)."""
    from astropy.io.votable import from_table
    from astropy.io.votable.tree import Info

    vot = from_table(_astropy_table(table, cards))
    infos = vot.get_first_table().infos
    for key, value, _comment in cards:
        infos.append(Info(name=key, value=str(value)))
    with atomic_path(out) as tmp:
        vot.to_xml(str(tmp))


def _astropy_table(table: pd.DataFrame, cards: list[tuple[str, Any, str]]) -> Any:
    from astropy.table import Table

    t = Table()
    for name in table.columns:
        col = column_def(name)
        arr = _array(col, table[name])
        t[name] = arr.astype(str) if arr.dtype.kind == "S" else arr
        t[name].unit = col.unit
        t[name].description = col.description
    t.meta.update({k: v for k, v, _c in cards})
    return t


# ---- FITS, block by block -------------------------------------------------------------------------

_TFORM = {"bool": "L", "i2": "I", "i4": "J", "i8": "K", "f4": "E", "f8": "D"}
_BLOCK = 2880


def _fits_dtype(layout: _Layout) -> np.dtype:
    """The big-endian record of one row (logicals as the ASCII 'T'/'F' bytes FITS stores)."""
    fields = []
    for name in layout.names:
        dt = column_def(name).dtype
        fields.append((name, f"S{layout.widths[name]}" if dt == "str" else "S1" if dt == "bool" else ">" + dt))
    return np.dtype(fields)


def _fits_header(layout: _Layout, cards: list[tuple[str, Any, str]]) -> Any:
    """The CANDIDATES header as astropy would write it for the whole table, with room for the checksums."""
    from astropy.io import fits

    columns = []
    for name in layout.names:
        col = column_def(name)
        fmt = f"{layout.widths[name]}A" if col.dtype == "str" else _TFORM[col.dtype]
        columns.append(fits.Column(name=name, format=fmt, unit=col.unit, null=-1 if fmt == "K" else None))
    header = fits.BinTableHDU.from_columns(columns, nrows=0, name=EXTNAME).header
    header["NAXIS2"] = layout.n_rows
    for i, name in enumerate(layout.names, start=1):
        header.set(f"TCOMM{i}", column_def(name).description[:68], after=f"TFORM{i}")
    for key, value, comment in cards:
        header[key] = (value, comment)
    header["CHECKSUM"] = ("0" * 16, "HDU checksum")
    header["DATASUM"] = ("0", "data unit checksum")
    return header


def _write_fits(blocks: Iterable[pd.DataFrame], layout: _Layout, cards: list[tuple[str, Any, str]], path: Path) -> None:
    """Primary HDU, then the table's header (rewritten with its checksums at the end) and rows."""
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    for key, value, comment in provenance_cards():
        primary.header[key] = (value, comment)
    dtype = _fits_dtype(layout)
    header = _fits_header(layout, cards)
    with open(path, "wb") as fh:
        fits.HDUList([primary]).writeto(fh, checksum=True)
        start = fh.tell()
        fh.write(header.tostring().encode("ascii"))
        summer, n = _OnesSum(), 0
        for block in blocks:
            rec = np.empty(len(block), dtype=dtype)
            for name in layout.names:
                col = column_def(name)
                arr = _array(col, block[name].reset_index(drop=True), layout.widths.get(name))
                rec[name] = np.where(arr, b"T", b"F") if col.dtype == "bool" else arr
            data = rec.tobytes()
            summer.add(data)
            fh.write(data)
            n += len(block)
        if n != layout.n_rows:
            raise ValueError(f"{path}: the blocks gave {n} rows the second time and {layout.n_rows} the first")
        pad = -(n * dtype.itemsize) % _BLOCK
        fh.write(b"\0" * pad)
        datasum = summer.total()
        header["DATASUM"] = str(datasum)
        header["CHECKSUM"] = _encode_checksum(_ones_add(_ones_sum(header.tostring().encode("ascii")), datasum))
        fh.seek(start)
        fh.write(header.tostring().encode("ascii"))


def _ones_add(a: int, b: int) -> int:
    """32-bit ones' complement addition (end-around carry)."""
    s = a + b
    while s >> 32:
        s = (s & 0xFFFFFFFF) + (s >> 32)
    return s


def _ones_sum(data: bytes) -> int:
    """Ones' complement sum of big-endian 32-bit words (``data`` a multiple of 4 bytes long)."""
    return _ones_add(0, int(np.frombuffer(data, dtype=">u4").sum(dtype=np.uint64)))  # exact below 2**32 words


class _OnesSum:
    """The FITS DATASUM of bytes fed in pieces of any length (zero padding does not change it)."""

    def __init__(self) -> None:
        self.sum, self.rest = 0, b""

    def add(self, data: bytes) -> None:
        data = self.rest + data
        cut = len(data) - len(data) % 4
        self.sum = _ones_add(self.sum, _ones_sum(data[:cut]))
        self.rest = data[cut:]

    def total(self) -> int:
        return _ones_add(self.sum, _ones_sum(self.rest + b"\0" * (-len(self.rest) % 4))) if self.rest else self.sum


_EXCLUDED = frozenset(range(0x3A, 0x41)) | frozenset(range(0x5B, 0x61))  # punctuation between digits and letters


def _encode_checksum(total: int) -> str:
    """CHECKSUM value: the complement of the HDU's sum as 16 ASCII characters (FITS Standard 4.0, App. J)."""
    value = ~total & 0xFFFFFFFF
    chars = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        q, r = divmod(byte, 4)
        ch = [0x30 + q + r, 0x30 + q, 0x30 + q, 0x30 + q]
        changed = True
        while changed:  # move pairs off the excluded characters, keeping their sum
            changed = False
            for j in (0, 2):
                if ch[j] in _EXCLUDED or ch[j + 1] in _EXCLUDED:
                    ch[j] += 1
                    ch[j + 1] -= 1
                    changed = True
        for j in range(4):
            chars[4 * j + i] = ch[j]
    return bytes(chars[15:] + chars[:15]).decode("ascii")


# ---- parquet, in row groups -----------------------------------------------------------------------

_ARROW = {"str": "string", "bool": "bool_", "i2": "int16", "i4": "int32", "i8": "int64", "f4": "float32", "f8": "float64"}


def _write_parquet(blocks: Iterable[pd.DataFrame], layout: _Layout, cards: list[tuple[str, Any, str]], path: Path) -> None:
    """One row group per block; the schema (types from COLUMNS, nulls kept) and metadata fixed up front."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(n, getattr(pa, _ARROW[column_def(n).dtype])()) for n in layout.names])
    doc: dict[str, Any] = {k: v for k, v, _c in cards if not k.startswith(("DEPNAM", "DEPVER"))}
    doc["provenance"] = {k: v for k, v, _c in provenance_cards()}
    doc["columns"] = {n: {"unit": column_def(n).unit, "description": column_def(n).description} for n in layout.names}
    meta = {b"spectransfer": json.dumps(doc, default=str).encode()}
    for name, width in layout.widths.items():  # string widths, so astropy reads fixed-width columns without guessing
        meta[f"table::len::{name}".encode()] = str(width).encode()
    writer = None
    try:
        for block in blocks:
            block = block.reset_index(drop=True).copy()
            for name in layout.widths:  # '' = missing, as in FITS: astropy's parquet reader takes no null strings
                block[name] = block[name].astype("string").fillna("").astype(str)
            arrow = pa.Table.from_pandas(block, schema=schema, preserve_index=False, safe=False)
            if writer is None:
                schema = arrow.schema.with_metadata({**(arrow.schema.metadata or {}), **meta})
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(arrow.replace_schema_metadata(schema.metadata))
    finally:
        if writer is not None:
            writer.close()
