"""Just enough FITS to read one survey spectrum fast, touching only the HDUs a reader asks for.

Ingest reads millions of one-spectrum files. astropy and fitsio both build a description of
every HDU (a full BOSS spec file has 10-30 per-exposure HDUs, a spAll row has ~300 columns)
before handing out one column, which costs tens of milliseconds per file. A survey file needs
far less: a few header keys, a few binary-table columns, one image. This module walks the
HDUs in order, parses header cards lazily, and decodes only the requested columns with a
numpy dtype built from TFORMn, so a file costs about one millisecond. ``.gz`` files are read
through :mod:`gzip` (sniffed by magic bytes, not by name); a short read anywhere is reported
as a truncated file. The tests check every value against astropy.
"""

from __future__ import annotations

import gzip
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from spectransfer.errors import SpectrumError

BLOCK = 2880
CARD = 80
_GZIP_MAGIC = b"\x1f\x8b"

# TFORM letter -> (bytes per element, numpy dtype for one element; None = raw bytes)
_TFORM_SIZES = {
    "L": (1, "i1"),
    "X": (1, None),
    "B": (1, "u1"),
    "I": (2, ">i2"),
    "J": (4, ">i4"),
    "K": (8, ">i8"),
    "A": (1, "S"),
    "E": (4, ">f4"),
    "D": (8, ">f8"),
    "C": (8, ">c8"),
    "M": (16, ">c16"),
    "P": (8, None),
    "Q": (16, None),
}
_TFORM_RE = re.compile(r"^\s*(\d*)\s*([LXBIJKAEDCMPQ])")
_BITPIX = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class Header:
    """Header cards of one HDU; values are parsed when first asked for."""

    def __init__(self, cards: dict[str, str]) -> None:
        self._cards = cards
        self._parsed: dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key.upper() in self._cards

    def __getitem__(self, key: str) -> Any:
        key = key.upper()
        if key not in self._parsed:
            self._parsed[key] = _parse_value(self._cards[key])
        return self._parsed[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value

    def keys(self) -> Iterable[str]:
        return self._cards.keys()


def _parse_value(card: str) -> Any:
    """Value of one 80-character ``KEY     = value / comment`` card (None when undefined)."""
    text = card[10:] if card[8:10] == "= " else ""
    text = text.lstrip()
    if not text:
        return None
    if text[0] == "'":
        # a string: '' inside is an escaped quote; trailing blanks are not significant
        end = text.find("'", 1)
        while 0 < end < len(text) - 1 and text[end + 1] == "'":
            end = text.find("'", end + 2)
        body = text[1:end] if end > 0 else text[1:]
        return body.replace("''", "'").rstrip()
    token = text.split("/", 1)[0].strip()
    if token == "T":
        return True
    if token == "F":
        return False
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token.replace("D", "E").replace("d", "e"))
    except ValueError:
        return token or None


class _Hdu:
    __slots__ = ("header", "data_offset", "data_size", "layout", "names")

    def __init__(self, header: Header, data_offset: int, data_size: int) -> None:
        self.header = header
        self.data_offset = data_offset
        self.data_size = data_size
        self.layout: dict[str, tuple[int, Any, int, str, int]] | None = None  # binary tables, built once
        self.names: list[str] | None = None


class FitsFile:
    """A FITS file (plain or gzip) opened for reading a few HDUs in order.

    Raises :class:`SpectrumError` naming the file when it cannot be opened, is not FITS, or
    ends before the HDU or data that was asked for.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            raw = open(self.path, "rb")
        except OSError as exc:
            raise SpectrumError(self.path, f"cannot open: {exc.strerror or exc}") from None
        try:
            magic = raw.read(2)
            raw.seek(0)
        except OSError as exc:
            raw.close()
            raise SpectrumError(self.path, f"cannot read: {exc}") from None
        self.compressed = magic == _GZIP_MAGIC
        self._file_size = os.fstat(raw.fileno()).st_size
        self._fh: IO[bytes] = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")) if self.compressed else raw
        self._raw = raw
        self._pos = 0
        self._hdus: list[_Hdu] = []
        self._end = False  # True once we know there is no further HDU
        try:
            first = self._fh.read(CARD)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            self.close()
            raise SpectrumError(self.path, f"truncated or corrupt file while reading the primary header ({exc})") from None
        self._pos = len(first)
        reason = None
        if not first:
            reason = "empty file (0 bytes)"
        elif not first.startswith(b"SIMPLE  ="[: len(first)]):
            reason = "not a FITS file (no SIMPLE = T card)"
        elif len(first) < CARD:
            reason = f"truncated file: primary header needs {CARD} bytes, only {len(first)} present"
        elif first[29:30] != b"T":
            reason = "not a standard FITS file (SIMPLE is not T)"
        if reason:
            self.close()
            raise SpectrumError(self.path, reason)

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> FitsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._fh.close()
        finally:
            self._raw.close()

    # -- low-level reading -----------------------------------------------------------------
    def _read_exact(self, offset: int, size: int, what: str) -> bytes:
        if size < 0 or offset < 0:
            raise SpectrumError(self.path, f"corrupt header: negative size for {what}")
        if not self.compressed and offset + size > self._file_size:
            have = max(self._file_size - offset, 0)
            raise SpectrumError(self.path, f"truncated file: {what} needs {size} bytes at offset {offset}, only {have} present")
        try:
            if offset != self._pos:
                self._fh.seek(offset)
            if self.compressed:  # read in pieces: a corrupt size must not allocate gigabytes up front
                parts, left = [], size
                while left > 0:
                    piece = self._fh.read(min(left, 1 << 22))
                    if not piece:
                        break
                    parts.append(piece)
                    left -= len(piece)
                buf = b"".join(parts)
            else:
                buf = self._fh.read(size)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            # gzip raises EOFError on a cut-off stream, BadGzipFile on a damaged one
            raise SpectrumError(self.path, f"truncated or corrupt file while reading {what} ({exc})") from None
        self._pos = offset + len(buf)
        if len(buf) < size:
            raise SpectrumError(
                self.path, f"truncated file: {what} needs {size} bytes at offset {offset}, only {len(buf)} present"
            )
        return buf

    def _parse_header_at(self, offset: int, index: int) -> tuple[Header, int]:
        cards: dict[str, str] = {}
        pos = offset
        while True:
            block = self._read_exact(pos, BLOCK, what=f"header of HDU {index}").decode("ascii", "replace")
            pos += BLOCK
            for i in range(0, BLOCK, CARD):
                card = block[i : i + CARD]
                key = card[:8].rstrip()
                if key == "END":
                    return Header(cards), pos
                if key and key not in cards and key not in ("COMMENT", "HISTORY", "CONTINUE"):
                    cards[key] = card
            if pos - offset > 1000 * BLOCK:
                raise SpectrumError(self.path, f"header of HDU {index} has no END card")

    def _load(self, index: int) -> bool:
        """Make sure HDUs 0..index are known; False when the file has fewer HDUs."""
        while len(self._hdus) <= index:
            if self._end:
                return False
            if self._hdus:
                last = self._hdus[-1]
                offset = last.data_offset + _padded(last.data_size)
                # probe for a next HDU: end of file (allowing a missing final pad) = no more
                try:
                    if offset != self._pos:
                        self._fh.seek(offset)
                    probe = self._fh.read(CARD)
                except (OSError, EOFError, gzip.BadGzipFile):
                    probe = b""
                self._pos = offset + len(probe)
                if len(probe) < CARD or not probe.startswith(b"XTENSION="):
                    self._end = True
                    return False
            else:
                offset = 0
            header, data_offset = self._parse_header_at(offset, len(self._hdus))
            try:
                size = _data_size(header)
            except (KeyError, ValueError, TypeError) as exc:
                raise SpectrumError(self.path, f"corrupt header of HDU {len(self._hdus)}: bad NAXIS/BITPIX ({exc})") from None
            self._hdus.append(_Hdu(header, data_offset, size))
        return True

    # -- public API --------------------------------------------------------------------------
    def has_hdu(self, index: int) -> bool:
        return self._load(index)

    def header(self, index: int) -> Header:
        if not self._load(index):
            raise SpectrumError(self.path, f"has no HDU {index}")
        return self._hdus[index].header

    def extname(self, index: int) -> str:
        return str(self.header(index).get("EXTNAME", "")).strip().upper()

    def is_table(self, index: int) -> bool:
        return self.has_hdu(index) and str(self.header(index).get("XTENSION", "")).strip() == "BINTABLE"

    def colnames(self, index: int) -> list[str]:
        """Column names of a binary table HDU, as written (case kept)."""
        hdr = self.header(index)
        hdu = self._hdus[index]
        if hdu.names is None:
            n = int(hdr.get("TFIELDS", 0))
            hdu.names = [str(hdr.get(f"TTYPE{i}", f"COL{i}")).strip() for i in range(1, n + 1)]
        return list(hdu.names)

    def image(self, index: int) -> np.ndarray:
        """The image of an HDU as a native-endian array (BSCALE/BZERO applied)."""
        hdr = self.header(index)
        naxis = int(hdr.get("NAXIS", 0))
        if naxis == 0:
            raise SpectrumError(self.path, f"HDU {index} has no image data")
        shape = tuple(int(hdr[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
        bitpix = int(hdr["BITPIX"])
        if bitpix not in _BITPIX:
            raise SpectrumError(self.path, f"HDU {index} has unsupported BITPIX {bitpix}")
        dtype = np.dtype(_BITPIX[bitpix])
        hdu = self._hdus[index]
        buf = self._read_exact(hdu.data_offset, hdu.data_size, what=f"image of HDU {index}")
        data = np.frombuffer(buf, dtype=dtype, count=math.prod(shape)).reshape(shape)
        bscale, bzero = hdr.get("BSCALE", 1), hdr.get("BZERO", 0)
        if bscale != 1 or bzero != 0:
            return data.astype(np.float64) * bscale + bzero
        return data.astype(dtype.newbyteorder("="))

    def table(self, index: int, columns: Iterable[str], rows: slice | None = None) -> dict[str, np.ndarray]:
        """Named columns of a binary-table HDU (names matched case-insensitively).

        Returns ``{requested name: array}`` with native byte order, strings decoded and
        right-stripped, TSCAL/TZERO applied. A missing column raises SpectrumError naming it.
        """
        hdr = self.header(index)
        if str(hdr.get("XTENSION", "")).strip() != "BINTABLE":
            raise SpectrumError(self.path, f"HDU {index} is not a binary table")
        hdu = self._hdus[index]
        if hdu.layout is None:
            hdu.layout = _table_layout(hdr)
        layout = hdu.layout
        row_bytes, n_rows = int(hdr["NAXIS1"]), int(hdr["NAXIS2"])
        first, stop = 0, n_rows
        if rows is not None:
            first, stop, _ = rows.indices(n_rows)
        n = max(stop - first, 0)
        name = self.extname(index) or f"HDU {index}"
        wanted = list(columns)
        for col in wanted:
            if col.upper() not in layout:
                raise SpectrumError(self.path, f"{name} table lacks column '{col}'")
        buf = self._read_exact(hdu.data_offset + first * row_bytes, n * row_bytes, what=f"{name} table rows")
        out: dict[str, np.ndarray] = {}
        for col in wanted:
            offset, fmt, repeat, code, number = layout[col.upper()]
            if fmt is None:
                raise SpectrumError(self.path, f"{name} column '{col}' has unsupported format {code}")
            dt = np.dtype({"names": ["v"], "formats": [fmt], "offsets": [offset], "itemsize": row_bytes})
            arr = np.frombuffer(buf, dtype=dt, count=n)["v"]
            value = _convert(arr, code, hdr, number)
            tdim = hdr.get(f"TDIM{number}")
            if tdim and code != "A":
                dims = tuple(int(d) for d in str(tdim).strip("() ").split(",")[::-1])
                if math.prod(dims) == repeat:
                    value = value.reshape((n, *dims))
            out[col] = value
        return out


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _data_size(hdr: Header) -> int:
    naxis = int(hdr.get("NAXIS", 0))
    if naxis == 0:
        return 0
    n = math.prod(int(hdr[f"NAXIS{i}"]) for i in range(1, naxis + 1))
    gcount, pcount = int(hdr.get("GCOUNT", 1)), int(hdr.get("PCOUNT", 0))
    return abs(int(hdr["BITPIX"])) // 8 * gcount * (pcount + n)


def _table_layout(hdr: Header) -> dict[str, tuple[int, Any, int, str, int]]:
    """Upper-cased column name -> (byte offset in row, numpy format, repeat, TFORM code, 1-based number)."""
    layout: dict[str, tuple[int, Any, int, str, int]] = {}
    offset = 0
    for i in range(1, int(hdr.get("TFIELDS", 0)) + 1):
        tform = str(hdr.get(f"TFORM{i}", ""))
        m = _TFORM_RE.match(tform)
        if not m:
            raise ValueError(f"cannot parse TFORM{i} = {tform!r}")
        repeat = int(m.group(1)) if m.group(1) else 1
        code = m.group(2)
        size, base = _TFORM_SIZES[code]
        if code == "X":
            nbytes = -(-repeat // 8)
            fmt: Any = (np.uint8, (nbytes,)) if nbytes > 1 else np.uint8
        elif code in ("P", "Q"):
            nbytes, fmt = size, None  # variable-length arrays: skipped, never needed here
        elif code == "A":
            nbytes, fmt = repeat, f"S{max(repeat, 1)}"
        else:
            nbytes = size * repeat
            fmt = base if repeat == 1 else (base, (repeat,))
        name = str(hdr.get(f"TTYPE{i}", f"COL{i}")).strip().upper()
        layout.setdefault(name, (offset, fmt, repeat, code, i))
        offset += nbytes
    return layout


def _convert(arr: np.ndarray, code: str, hdr: Header, number: int) -> np.ndarray:
    if code == "A":
        return np.char.rstrip(np.char.decode(arr, "ascii", "replace"), " \x00")
    if code == "L":
        return arr == ord("T")
    if code == "X":
        return np.array(arr)
    native = arr.astype(arr.dtype.newbyteorder("="))
    tscal, tzero = hdr.get(f"TSCAL{number}", 1), hdr.get(f"TZERO{number}", 0)
    if tscal == 1 and tzero == 0:
        return native
    if code in "IJK" and tscal == 1 and tzero == 2 ** (8 * native.dtype.itemsize - 1):
        # the FITS convention for unsigned integers: flip the sign bit
        unsigned = native.dtype.str.replace("i", "u")
        return (native.view(unsigned) ^ np.array(tzero, dtype=unsigned)).astype(unsigned)
    if code == "B" and tscal == 1 and tzero == -128:
        return (native.astype(np.int16) - 128).astype(np.int8)
    return native.astype(np.float64) * tscal + tzero
