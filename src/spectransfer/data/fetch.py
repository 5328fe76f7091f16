"""Download survey spectra and quasar catalogues so that a user can start from nothing.

The original work mirrored the SDSS spec-lite tree by hand; this module does it as one
interruptible job. Every file goes to ``DEST/<path>.part`` first and is renamed only after
its size, its FITS signature and (when known) its sha256 check out, so an interrupted or
corrupt download never leaves a file that looks complete. A re-run continues ``.part``
files with an HTTP Range request and skips what ``DEST/manifest.jsonl`` records as complete.

Where the files live (read from the SDSS Science Archive Server and from code that uses it):

* SDSS spec-lite spectra: ``https://data.sdss.org/sas/{release}/{eboss|sdss}/spectro/redux/
  {run2d}/spectra/lite/{plate:04d}/spec-{plate:04d}-{mjd}-{fiber:04d}.fits``. BOSS/eBOSS
  plates use the release's eBOSS run2d (dr14 ``v5_10_0``, dr16 ``v5_13_0``, dr17 ``v5_13_2``);
  SDSS-I/II plates use ``sdss/spectro/redux/26`` (SEGUE plates: ``103`` or ``104``).
* Catalogues: ``dr16/eboss/qso/DR16Q/DR16Q_v4.fits``, ``dr14/eboss/qso/DR14Q/DR14Q_v4_4.fits``,
  ``dr16/sdss/spectro/redux/specObj-dr16.fits`` under the same ``sas`` root.
* LAMOST low-resolution spectra, by obsid, as the ``pylamost`` client builds them:
  DR1-3 ``http://drN.lamost.org/spectrum/fits/{obsid}``; DR4-5
  ``http://drN.lamost.org/v{version}/spectrum/fits/{obsid}?token=TOKEN``; DR6 and later
  ``https://www.lamost.org/drN/v{version}/spectrum/fits/{obsid}?token=TOKEN``. Not checked
  against the live server from here (no network), so the base URL is the user's to give.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spectransfer.errors import FetchError
from spectransfer.loopback import url_is_loopback
from spectransfer.provenance import output_target, sha256_file

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO, query string included: that would print a LAMOST token.
logging.getLogger("httpx").setLevel(logging.WARNING)

SAS_URL = "https://data.sdss.org/sas"
# eBOSS run2d folder of each data release (BOSS plates were re-reduced into it).
SDSS_RELEASES: dict[str, str] = {"dr14": "v5_10_0", "dr16": "v5_13_0", "dr17": "v5_13_2"}
# SDSS-I/II (legacy and SEGUE) run2d folders, tried in this order when the list has no RUN2D.
LEGACY_RUN2D: tuple[str, ...] = ("26", "103", "104")
# The first BOSS plates are numbered 3500 and up; lower numbers are SDSS-I/II plates.
FIRST_BOSS_PLATE = 3500
CATALOGS: dict[str, str] = {
    "dr16q": "dr16/eboss/qso/DR16Q/DR16Q_v4.fits",
    "dr14q": "dr14/eboss/qso/DR14Q/DR14Q_v4_4.fits",
    "specobj": "dr16/sdss/spectro/redux/specObj-dr16.fits",
}
LAMOST_TOKEN_ENV = "LAMOST_TOKEN"
MANIFEST_NAME = "manifest.jsonl"

_CHUNK = 1 << 16
_BACKOFF_CAP = 60.0
_FITS_MAGIC = b"SIMPLE  ="
_GZIP_MAGIC = b"\x1f\x8b"
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.]+$")


# ---- what to fetch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One place a file may be: its URL (never holding a secret) and its path below DEST."""

    url: str
    path: str  # relative to DEST, '/'-separated


@dataclass(frozen=True)
class FetchItem:
    """One file to fetch. ``targets`` are tried in order while the server answers 404.

    ``key`` identifies the file in the manifest whatever mirror it came from; ``params`` are
    query parameters sent but never recorded (a LAMOST token); ``any_suffix`` marks files
    whose name cannot say whether the body is gzip-compressed (LAMOST obsid downloads).
    """

    key: str
    targets: tuple[Target, ...]
    params: tuple[tuple[str, str], ...] = ()
    any_suffix: bool = False


@dataclass
class FetchResult:
    """What happened to one item; ``path`` is relative to DEST, ``error`` says why it failed."""

    key: str
    status: str  # fetched | skipped | missing | failed
    url: str | None = None
    path: str | None = None
    size: int | None = None
    sha256: str | None = None
    error: str | None = None
    attempts: int = 0


@dataclass
class FetchSummary:
    """All results of one run, with the bytes moved and the time taken."""

    results: list[FetchResult] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0
    manifest: Path | None = None

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def fetched(self) -> int:
        return self.count("fetched")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def missing(self) -> int:
        return self.count("missing")

    @property
    def failed(self) -> int:
        return self.count("failed")

    def line(self) -> str:
        mb = self.bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        return (
            f"fetched {self.fetched}, skipped {self.skipped}, missing {self.missing}, failed {self.failed} "
            f"({mb:.1f} MB in {self.seconds:.1f} s, {rate:.1f} MB/s); manifest {self.manifest}"
        )


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel.lstrip("/")


def _check_base_url(base_url: str) -> str:
    if not re.match(r"^https?://", base_url):
        raise FetchError(f"base URL must start with http:// or https://, got {base_url!r}")
    return base_url


def sdss_spectrum_path(release: str, plate: int, mjd: int, fiber: int, run2d: str) -> str:
    """SAS path (below ``sas/``) of one spec-lite file; BOSS run2d start with 'v'."""
    survey_dir = "eboss" if run2d.startswith("v") else "sdss"
    return f"{release}/{survey_dir}/spectro/redux/{run2d}/spectra/lite/{plate:04d}/spec-{plate:04d}-{mjd}-{fiber:04d}.fits"


def _find_columns(
    columns: Sequence[str], wanted: dict[str, tuple[str, ...]], path: Path, required: Iterable[str]
) -> dict[str, str]:
    lower = {c.lower(): c for c in columns}
    found: dict[str, str] = {}
    for name, aliases in wanted.items():
        for alias in aliases:
            if alias in lower:
                found[name] = lower[alias]
                break
    missing = [n for n in required if n not in found]
    if missing:
        raise FetchError(f"{path}: list has no column {' / '.join(wanted[missing[0]])} (columns: {', '.join(columns)})")
    return found


def read_list(path: str | Path, wanted: dict[str, tuple[str, ...]], required: Iterable[str]) -> dict[str, list[Any]]:
    """Read the wanted columns (case-insensitive names) of a CSV, FITS or Parquet table.

    A plain text file of bare integers (one per line, no header) is read as the first
    wanted column, so a list of LAMOST obsids can be a one-column file.
    """
    path = Path(path)
    if not path.is_file():
        raise FetchError(f"{path}: list file not found")
    name = path.name.lower()
    try:
        if name.endswith((".fits", ".fit", ".fits.gz", ".fit.gz")):
            from astropy.io import fits

            with fits.open(path, memmap=True) as hdul:
                table = next((h for h in hdul if isinstance(h, (fits.BinTableHDU, fits.TableHDU))), None)
                if table is None:
                    raise FetchError(f"{path}: no table HDU in this FITS file")
                cols = _find_columns(table.columns.names, wanted, path, required)
                return {k: [_scalar(v) for v in table.data[c]] for k, c in cols.items()}
        import pandas as pd

        if name.endswith(".parquet"):
            frame = pd.read_parquet(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as fh:
                first = fh.readline().strip()
            if re.fullmatch(r"\d+", first):
                frame = pd.read_csv(path, header=None, names=[next(iter(wanted))], dtype=str)
            else:
                frame = pd.read_csv(path, dtype=str, skipinitialspace=True)
        cols = _find_columns([str(c) for c in frame.columns], wanted, path, required)
        return {k: [None if pd.isna(v) else v for v in frame[c].tolist()] for k, c in cols.items()}
    except FetchError:
        raise
    except Exception as exc:  # unreadable table: say which file and why
        raise FetchError(f"{path}: cannot read list ({type(exc).__name__}: {exc})") from exc


def _scalar(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    if isinstance(value, str):
        return value.strip()
    return value.item() if hasattr(value, "item") else value


def _as_int(value: Any, what: str, path: Path, row: int) -> int:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        raise FetchError(f"{path}: row {row + 1}: {what} is not a number ({value!r})") from None
    if not number.is_integer() or number < 0:
        raise FetchError(f"{path}: row {row + 1}: {what} is not a non-negative integer ({value!r})")
    return int(number)


def sdss_items(list_path: str | Path, release: str = "dr16", base_url: str = SAS_URL) -> list[FetchItem]:
    """Plan the spec-lite downloads for a table with plate, mjd, fiberid (and maybe run2d).

    Without a RUN2D column a BOSS plate (>= 3500) goes to the release's eBOSS folder and an
    SDSS-I/II plate tries run2d 26, then 103, then 104 (SEGUE) while the server says 404.
    """
    if release not in SDSS_RELEASES:
        raise FetchError(f"unknown SDSS release {release!r}; known: {', '.join(SDSS_RELEASES)}")
    _check_base_url(base_url)
    path = Path(list_path)
    wanted = {
        "plate": ("plate",),
        "mjd": ("mjd",),
        "fiber": ("fiberid", "fiber"),
        "run2d": ("run2d",),
    }
    table = read_list(path, wanted, required=("plate", "mjd", "fiber"))
    items: dict[str, FetchItem] = {}
    run2ds = table.get("run2d")
    for i, (p, m, f) in enumerate(zip(table["plate"], table["mjd"], table["fiber"])):
        plate, mjd, fiber = _as_int(p, "plate", path, i), _as_int(m, "mjd", path, i), _as_int(f, "fiberid", path, i)
        key = f"spec-{plate:04d}-{mjd}-{fiber:04d}.fits"
        if key in items:
            continue
        run2d_value = None if run2ds is None or run2ds[i] is None else str(run2ds[i]).strip()
        if run2d_value:
            if not _SAFE_PART.match(run2d_value) or run2d_value.strip(".") == "":
                raise FetchError(f"{path}: row {i + 1}: RUN2D {run2d_value!r} is not a folder name")
            choices: tuple[str, ...] = (run2d_value,)
        elif plate >= FIRST_BOSS_PLATE:
            choices = (SDSS_RELEASES[release],)
        else:
            choices = LEGACY_RUN2D
        targets = []
        for run2d in choices:
            rel = sdss_spectrum_path(release, plate, mjd, fiber, run2d)
            targets.append(Target(_join(base_url, rel), rel))
        items[key] = FetchItem(key, tuple(targets))
    if not items:
        raise FetchError(f"{path}: list has no rows")
    return list(items.values())


def lamost_items(list_path: str | Path, base_url: str, token: str | None = None) -> list[FetchItem]:
    """Plan LAMOST downloads for a table with an obsid column (or a file of bare obsids).

    ``base_url`` is a release root such as ``https://www.lamost.org/dr10/v2.0`` (the file is
    ``BASE/spectrum/fits/OBSID``) or a template holding ``{obsid}``. The token travels as
    the ``token`` query parameter and is never written to the manifest or the log.
    """
    _check_base_url(base_url)
    path = Path(list_path)
    table = read_list(path, {"obsid": ("obsid",)}, required=("obsid",))
    items: dict[str, FetchItem] = {}
    params: tuple[tuple[str, str], ...] = (("token", token),) if token else ()
    for i, value in enumerate(table["obsid"]):
        obsid = _as_int(value, "obsid", path, i)
        key = f"lamost-{obsid}"
        if key in items:
            continue
        url = base_url.format(obsid=obsid) if "{obsid}" in base_url else _join(base_url, f"spectrum/fits/{obsid}")
        items[key] = FetchItem(key, (Target(url, f"lamost/{obsid}.fits"),), params=params, any_suffix=True)
    if not items:
        raise FetchError(f"{path}: list has no rows")
    return list(items.values())


def catalog_items(name: str, base_url: str = SAS_URL) -> list[FetchItem]:
    """The catalogue file ``name`` (dr16q | dr14q | specobj) under the SAS root ``base_url``."""
    if name not in CATALOGS:
        raise FetchError(f"unknown catalogue {name!r}; known: {', '.join(CATALOGS)}")
    _check_base_url(base_url)
    rel = CATALOGS[name]
    return [FetchItem(rel.rsplit("/", 1)[-1], (Target(_join(base_url, rel), rel),))]


# ---- manifest and checksums --------------------------------------------------------------------


def read_manifest(dest: str | Path) -> dict[str, dict[str, Any]]:
    """Last manifest record per key; unreadable lines (a write cut short) are skipped."""
    path = Path(dest) / MANIFEST_NAME
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                records[str(rec["key"])] = rec
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d: not a manifest record, ignored", path, n)
    return records


def read_checksums(path: str | Path) -> dict[str, str]:
    """``sha256sum``-style lines ``HEX  PATH``; keyed by PATH and by its file name."""
    path = Path(path)
    if not path.is_file():
        raise FetchError(f"{path}: checksums file not found")
    sums: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = re.fullmatch(r"([0-9a-fA-F]{64})\s+\*?(.+)", line)
            if not m:
                raise FetchError(f"{path}: line {n}: expected 'SHA256  PATH', got {line[:60]!r}")
            digest, name = m.group(1).lower(), m.group(2).strip().lstrip("./")
            sums[name] = digest
            sums.setdefault(name.rsplit("/", 1)[-1], digest)
    return sums


# ---- the download loop --------------------------------------------------------------------------


class _Missing(Exception):
    pass


class _Retry(Exception):
    pass


class _Fatal(Exception):
    pass


class _Stopped(Exception):
    pass


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _signature_problem(head: bytes, suffix: str) -> str | None:
    """None when the first bytes match what the file should be, else why not."""
    is_fits, is_gz = head.startswith(_FITS_MAGIC), head.startswith(_GZIP_MAGIC)
    if suffix == "gz" and not is_gz:
        return "not gzip data (expected a .gz file)"
    if suffix == "fits" and not is_fits:
        return "not a FITS file (does not start with 'SIMPLE  =')"
    if suffix == "any" and not (is_fits or is_gz):
        return "neither a FITS file nor gzip data"
    if is_gz and suffix in ("gz", "any"):
        try:  # a gzip body must hold a FITS file
            if not _gunzip_head(head).startswith(_FITS_MAGIC):
                return "gzip data that does not hold a FITS file"
        except zlib.error:
            return "corrupt gzip data"
    return None


_BLOCK = 2880  # FITS headers and data come in blocks of 2880 bytes


def _header_ints(block: bytes) -> tuple[dict[str, int], bool]:
    """Integer cards of one header block, and whether the block holds the END card."""
    cards: dict[str, int] = {}
    for i in range(0, len(block), 80):
        card = block[i : i + 80].decode("ascii", "replace")
        key = card[:8].strip()
        if key == "END":
            return cards, True
        if card[8:10] == "= ":
            value = card[10:].split("/", 1)[0].strip()
            if value.lstrip("+-").isdigit():
                cards[key] = int(value)
            elif value in ("T", "F") and key == "GROUPS":
                cards[key] = int(value == "T")
    return cards, False


def _hdu_data_size(cards: dict[str, int]) -> int:
    """Bytes of an HDU's data without padding (FITS standard 4.0, sections 4.4.1 and 6)."""
    naxis = cards.get("NAXIS", 0)
    dims = [cards.get(f"NAXIS{i}", 0) for i in range(1, naxis + 1)]
    if cards.get("GROUPS") and dims and dims[0] == 0:  # random groups: NAXIS1 = 0 is not a size
        dims = dims[1:]
    n = 1
    for d in dims:
        n *= d
    if naxis == 0:
        n = 0
    return abs(cards.get("BITPIX", 8)) // 8 * cards.get("GCOUNT", 1) * (cards.get("PCOUNT", 0) + n)


def fits_truncation(fh: Any) -> str | None:
    """Why the FITS stream ``fh`` is shorter than its own headers say (None when it is whole).

    Walks the HDUs: each header (blocks up to END) is followed by its data, whose size comes
    from BITPIX, NAXISn, PCOUNT and GCOUNT. A body cut off mid-transfer without a
    Content-Length is caught here. The standard's padding to whole blocks is required.
    """
    offset = 0
    while True:
        block = fh.read(_BLOCK)
        if not block and offset:
            return None  # a clean end after the last HDU
        cards: dict[str, int] = {}
        ended = False
        while True:
            if len(block) < _BLOCK:
                return f"file ends inside the header of the HDU at byte {offset} ({offset + len(block)} bytes)"
            more, ended = _header_ints(block)
            cards.update(more)
            offset += _BLOCK
            if ended:
                break
            block = fh.read(_BLOCK)
        need = _hdu_data_size(cards)
        padded = -(-need // _BLOCK) * _BLOCK
        got = 0
        while got < padded:
            chunk = fh.read(min(1 << 20, padded - got))
            if not chunk:
                break
            got += len(chunk)
        if got < padded:
            return f"file ends at byte {offset + got}, but its headers need {offset + padded} bytes"
        offset += got


def _truncation(path: Path, gz: bool) -> str | None:
    import gzip

    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as fh:
            return fits_truncation(fh)
    except EOFError:
        return "gzip stream ends before its end marker"
    except (OSError, zlib.error) as exc:
        return f"corrupt gzip data ({exc})"


def _drop_if_empty(part: Path) -> None:
    if part.exists() and part.stat().st_size == 0:
        part.unlink()


def _redact(message: str, item: FetchItem) -> str:
    for _, secret in item.params:
        if secret:
            message = message.replace(secret, "***")
    return message


def _gunzip_head(head: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(head, 80)


class Fetcher:
    """Runs a list of FetchItems into DEST with bounded connections, retries and a manifest."""

    def __init__(
        self,
        dest: str | Path,
        jobs: int = 8,
        retries: int = 5,
        timeout: float = 60.0,
        backoff: float = 1.0,
        checksums: dict[str, str] | None = None,
        quick_skip: bool = False,
    ) -> None:
        if jobs < 1:
            raise FetchError(f"--jobs must be at least 1, got {jobs}")
        if retries < 0:
            raise FetchError(f"--retries must be 0 or more, got {retries}")
        if timeout <= 0:
            raise FetchError(f"--timeout must be positive, got {timeout}")
        self.dest = Path(dest)
        self.jobs, self.retries, self.timeout, self.backoff = jobs, retries, timeout, max(0.0, backoff)
        self.checksums = checksums or {}
        self.quick_skip = quick_skip
        self.manifest_path = self.dest / MANIFEST_NAME
        self._manifest_lock = threading.Lock()
        self._bytes_lock = threading.Lock()
        self._stop = threading.Event()
        self.bytes_done = 0

    # -- bookkeeping
    def _record(self, result: FetchResult) -> None:
        rec = {
            "key": result.key,
            "url": result.url,
            "path": result.path,
            "size": result.size,
            "sha256": result.sha256,
            "status": result.status,
            "error": result.error,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        line = json.dumps(rec, sort_keys=True) + "\n"
        with self._manifest_lock, open(self.manifest_path, "a", encoding="utf-8") as fh:
            fh.write(line)

    def _count(self, n: int) -> None:
        with self._bytes_lock:
            self.bytes_done += n

    def _expected_sha(self, item: FetchItem, prior: dict[str, Any] | None) -> str | None:
        for target in item.targets:
            for name in (target.path, target.path.rsplit("/", 1)[-1], item.key):
                if name in self.checksums:
                    return self.checksums[name]
        if prior and prior.get("status") == "fetched" and prior.get("sha256"):
            return str(prior["sha256"])
        return None

    def _already_complete(self, item: FetchItem, prior: dict[str, Any] | None, expected: str | None) -> FetchResult | None:
        """A skipped result when a file on disk matches the manifest (size + sha256) or --checksums."""
        candidates: list[tuple[str, str | None, int | None, str | None]] = []
        if prior and prior.get("status") == "fetched" and prior.get("path"):
            candidates.append((str(prior["path"]), prior.get("url"), prior.get("size"), prior.get("sha256")))
        if expected:  # a file put there by other means counts when its checksum is known
            for t in item.targets:
                candidates.append((t.path, t.url, None, None))
                if item.any_suffix:
                    candidates.append((t.path + ".gz", t.url, None, None))
        for rel, url, size_rec, sha_rec in candidates:
            path = self.dest / rel
            if not path.is_file():
                continue
            size = path.stat().st_size
            if size_rec is not None and size != size_rec:
                continue
            want = expected or sha_rec
            if self.quick_skip and size_rec is not None and want == sha_rec:
                return FetchResult(item.key, "skipped", url, rel, size, sha_rec)
            if want is None:
                continue
            digest = sha256_file(path)
            if digest == want:
                if sha_rec is None:  # first time this file is vouched for: remember it
                    self._record(FetchResult(item.key, "fetched", url, rel, size, digest))
                return FetchResult(item.key, "skipped", url, rel, size, digest)
        return None

    # -- one HTTP exchange
    def _download_once(self, client: Any, item: FetchItem, target: Target, part: Path) -> tuple[int, str]:
        import httpx

        offset = part.stat().st_size if part.exists() else 0
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with client.stream("GET", target.url, params=dict(item.params), headers=headers) as resp:
                code = resp.status_code
                if code == 404 or code == 410:
                    raise _Missing(f"HTTP {code}")
                if code == 416 and offset:
                    part.unlink(missing_ok=True)
                    raise _Retry("server refused the resume range (HTTP 416); restarting from zero")
                if code in (408, 425, 429) or code >= 500:
                    raise _Retry(f"HTTP {code}")
                total: int | None
                if code == 206 and offset:
                    parsed = _parse_content_range(resp.headers.get("content-range"))
                    if parsed is None or parsed[0] != offset:
                        part.unlink(missing_ok=True)
                        raise _Retry(f"resume answered with range {resp.headers.get('content-range')!r}; restarting from zero")
                    total = parsed[1]
                    mode = "ab"
                elif code == 200:
                    if offset:
                        log.debug("%s: server ignored the Range request; restarting from zero", target.url)
                    offset, mode = 0, "wb"
                    length = resp.headers.get("content-length")
                    total = int(length) if length and length.isdigit() else None
                else:
                    raise _Fatal(f"HTTP {code}")
                hasher = hashlib.sha256()
                if offset:
                    with open(part, "rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 20), b""):
                            hasher.update(chunk)
                part.parent.mkdir(parents=True, exist_ok=True)
                with open(part, mode) as fh:
                    for chunk in resp.iter_raw(_CHUNK):
                        if self._stop.is_set():
                            raise _Stopped()
                        fh.write(chunk)
                        hasher.update(chunk)
                        self._count(len(chunk))
        except httpx.TransportError as exc:  # timeouts, refused or dropped connections
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Retry(f"body ended at {size} of {total} bytes")
        return size, hasher.hexdigest()

    def _finish(self, item: FetchItem, target: Target, part: Path, size: int, digest: str, expected: str | None) -> FetchResult:
        with open(part, "rb") as fh:
            head = fh.read(2880)
        rel = target.path
        if item.any_suffix:
            suffix = "any"
            if head.startswith(_GZIP_MAGIC) and not rel.endswith(".gz"):
                rel += ".gz"
        else:
            suffix = "gz" if rel.endswith(".gz") else "fits"
        problem = _signature_problem(head, suffix)
        if problem is None:
            short = _truncation(part, head.startswith(_GZIP_MAGIC))
            if short is not None:  # keep the .part: the next attempt resumes it with a Range request
                raise _Retry(f"incomplete body: {short}")
        if problem is None and expected and digest != expected:
            problem = f"sha256 {digest[:16]}... differs from the expected {expected[:16]}..."
        if problem is not None:
            part.unlink(missing_ok=True)
            raise _Fatal(f"corrupt body, not kept: {problem}")
        final = output_target(self.dest / rel)  # a symlink's target; never a device or folder
        os.replace(part, final)
        return FetchResult(item.key, "fetched", target.url, rel, size, digest)

    def _fetch_item(self, client: Any, item: FetchItem, prior: dict[str, Any] | None) -> FetchResult:
        """Skip a complete file, else try each candidate URL in turn; the outcome goes to the manifest."""
        expected = self._expected_sha(item, prior)
        done = self._already_complete(item, prior, expected)
        if done is not None:
            return done
        attempts = [0]  # counted over every URL of the item
        result: FetchResult | None = None
        for target in item.targets:
            result = self._fetch_target(client, item, target, expected, attempts)
            if result.status != "missing":
                break  # fetched or failed; a 404 moves on to the next folder
        assert result is not None
        self._record(result)
        return result

    def _fetch_target(
        self, client: Any, item: FetchItem, target: Target, expected: str | None, attempts: list[int]
    ) -> FetchResult:
        """Every attempt at one URL: retried after 5xx, timeouts and short bodies, never after 404."""
        part = self.dest / (target.path + ".part")
        last: FetchResult | None = None
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise _Stopped()
            attempts[0] += 1
            try:
                size, digest = self._download_once(client, item, target, part)
                result = self._finish(item, target, part, size, digest, expected)
                result.attempts = attempts[0]
                return result
            except _Missing as exc:
                log.debug("%s: %s", target.url, exc)
                part.unlink(missing_ok=True)
                return FetchResult(item.key, "missing", target.url, target.path, error=str(exc), attempts=attempts[0])
            except _Fatal as exc:
                _drop_if_empty(part)
                result = FetchResult(
                    item.key, "failed", target.url, target.path, error=_redact(str(exc), item), attempts=attempts[0]
                )
                log.warning("%s: %s", target.url, result.error)
                return result
            except _Retry as exc:
                last = FetchResult(
                    item.key, "failed", target.url, target.path, error=_redact(str(exc), item), attempts=attempts[0]
                )
                if attempt < self.retries:
                    self._wait_before_retry(attempt, target, exc)
        _drop_if_empty(part)  # a non-empty .part stays for a later resume
        assert last is not None
        last.error = f"gave up after {self.retries + 1} attempts: {last.error}"
        log.warning("%s: %s", target.url, last.error)
        return last

    def _wait_before_retry(self, attempt: int, target: Target, why: Exception) -> None:
        """Exponential backoff with jitter; raises _Stopped when the run is being stopped."""
        delay = min(_BACKOFF_CAP, self.backoff * 2**attempt) + random.uniform(0, self.backoff)
        log.debug("%s: %s; retry %d/%d in %.2f s", target.url, why, attempt + 1, self.retries, delay)
        if self._stop.wait(delay):
            raise _Stopped() from None

    def run(self, items: Sequence[FetchItem], on_progress: Callable[[int, int], None] | None = None) -> FetchSummary:
        """Fetch ``items``; ``on_progress(files_done, bytes_done)`` is called from this thread."""
        import httpx

        if self.dest.exists() and not self.dest.is_dir():
            raise FetchError(f"{self.dest}: destination exists and is not a folder")
        self.dest.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.dest)
        summary = FetchSummary(manifest=self.manifest_path)
        start = time.monotonic()
        limits = httpx.Limits(max_connections=self.jobs, max_keepalive_connections=self.jobs)
        timeout = httpx.Timeout(self.timeout)
        # Proxies from the environment apply, except to a mirror on this machine.
        trust_env = not all(url_is_loopback(t.url) for item in items for t in item.targets)
        queue = iter(items)
        with (
            httpx.Client(limits=limits, timeout=timeout, follow_redirects=True, trust_env=trust_env) as client,
            cf.ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="fetch") as pool,
        ):
            pending: dict[cf.Future[FetchResult], FetchItem] = {}

            def top_up() -> None:  # a few items per worker in the queue, not millions of futures
                while len(pending) < 4 * self.jobs:
                    item = next(queue, None)
                    if item is None:
                        return
                    pending[pool.submit(self._fetch_item, client, item, manifest.get(item.key))] = item

            try:
                top_up()
                while pending:
                    done, _ = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        item = pending.pop(fut)
                        try:
                            summary.results.append(fut.result())
                        except _Stopped:
                            pass
                        except Exception as exc:  # a bug or a disk error on one file must not stop the rest
                            log.error("%s: %s: %s", item.key, type(exc).__name__, exc)
                            result = FetchResult(item.key, "failed", error=f"{type(exc).__name__}: {exc}")
                            self._record(result)
                            summary.results.append(result)
                    top_up()
                    if on_progress is not None:
                        on_progress(len(summary.results), self.bytes_done)
            except BaseException:
                self._stop.set()  # workers stop at their next chunk; .part files stay for a resume
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        summary.seconds = time.monotonic() - start
        summary.bytes = self.bytes_done
        return summary


def fetch(
    items: Sequence[FetchItem],
    dest: str | Path,
    jobs: int = 8,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    checksums: str | Path | None = None,
    quick_skip: bool = False,
    quiet: bool = True,
) -> FetchSummary:
    """Fetch ``items`` into ``dest`` and return the summary; shows a progress bar unless quiet."""
    from spectransfer.progress import progress_bar

    sums = read_checksums(checksums) if checksums is not None else None
    fetcher = Fetcher(dest, jobs=jobs, retries=retries, timeout=timeout, backoff=backoff, checksums=sums, quick_skip=quick_skip)
    with progress_bar("fetch", total=len(items), unit="files", quiet=quiet) as bar:
        start = time.monotonic()
        shown = [0]

        def on_progress(files: int, nbytes: int) -> None:
            if files > shown[0]:
                bar.advance(files - shown[0])
                shown[0] = files
            elapsed = max(time.monotonic() - start, 1e-9)
            bar.update(description=f"fetch {nbytes / 1e6:,.1f} MB, {nbytes / 1e6 / elapsed:,.1f} MB/s")

        summary = fetcher.run(items, on_progress=on_progress)
    log.debug("%s", summary.line())
    return summary
