"""The one record every survey reader returns, the survey registry, and the reader registry.

A survey is declared once, by the module of its readers, as a :class:`Survey`: its id
columns, how a spectrum id is built from them, which ids a quasar catalogue row matches on,
and its quality cuts. The store schema, ingest, catalogue matching and discovery take their
lists from here (:func:`id_columns`, :func:`get_survey`), so the core never names a survey.

A reader is registered with a label, an ``identify(path, fits)`` function that looks at
headers and column names and answers True/False without raising, and a priority (higher
wins when two readers claim a file). Adding a format means adding one module. ``fits`` is a
:class:`spectransfer.surveys.fitsfile.FitsFile` (fast, reads only the HDUs asked for).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectransfer.config import DEFAULT_GRID, PAPER_COVERAGE, Grid
from spectransfer.errors import SpectrumError
from spectransfer.surveys.fitsfile import FitsFile

log = logging.getLogger(__name__)

# Mask bit the readers set on pixels whose flux or ivar was NaN/inf (their ivar is set to 0).
# Bit 31 is unused by the SDSS and LAMOST pixel masks.
NONFINITE_BIT = np.uint32(1 << 31)
MASK_DTYPE = np.uint32
SPECTRUM_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz")


@dataclass
class SpectrumRecord:
    """One spectrum as read from a survey file, before resampling.

    ``wave`` is vacuum wavelength in Angstrom (ascending). ``ivar`` 0 means no data; ``mask``
    0 means good (any non-zero bit is bad). Missing values (LAMOST 'Unknown' class,
    z = -9999) are ``None``, never sentinel numbers.

    ``extra`` always holds (value or None): ``wavemin``/``wavemax`` (Angstrom; SDSS spec: the
    specObj row's WAVEMIN/WAVEMAX, otherwise the first/last pixel with ivar > 0), ``snr`` (the
    pipeline's median S/N: SDSS SN_MEDIAN_ALL or r-band SN_MEDIAN, spSpec SN_R, LAMOST
    SNRR/SN_R), ``mag_r`` (r magnitude: SDSS PSFMAG r, else from SPECTROFLUX r; spSpec MAG_R;
    LAMOST MAG_PS_R or the MAGn whose MAGTYPE letter is r), ``z_err`` and ``objtype``.
    Format-specific: ``mag_r_source`` (SDSS: psfmag | spectroflux | synthetic), ``thing_id``,
    ``run2d``, ``specobj_hdu`` (sdss-spec); ``spec_cln``, ``spec_cln_name``, ``z_status`` (sdss-spspec); ``designation``,
    ``data_release`` (LAMOST).
    """

    path: str
    survey: str  # a registered Survey's name: "sdss" | "lamost" | ...
    format: str  # reader label, e.g. "sdss-spec", "sdss-spspec", "lamost-image", "lamost-coadd"
    ids: dict[str, Any]  # the survey's id columns (Survey.id_columns), e.g. sdss: plate, mjd, fiberid
    ra: float | None
    dec: float | None
    cls: str | None  # pipeline class: QSO / GALAXY / STAR / None
    subclass: str | None
    z: float | None
    zwarning: int | None
    wave: np.ndarray  # float64, Angstrom, vacuum
    flux: np.ndarray  # float32/float64
    ivar: np.ndarray  # same shape as flux
    mask: np.ndarray  # integer, 0 = good
    flux_unit: str = "1e-17 erg / (s cm2 Angstrom)"
    wave_unit: str = "Angstrom"
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. mag, snr, wavemin/wavemax as the pipeline states them

    @property
    def n_pixels(self) -> int:
        return int(self.flux.shape[0])

    def summary(self) -> dict[str, Any]:
        """The fields `spectransfer info --json` prints, JSON-ready (missing values are None)."""
        return {
            "survey": self.survey,
            "format": self.format,
            "ids": {k: _plain(v) for k, v in self.ids.items()},
            "ra": _plain(self.ra),
            "dec": _plain(self.dec),
            "class": self.cls,
            "subclass": self.subclass,
            "z": _plain(self.z),
            "zwarning": _plain(self.zwarning),
            "n_pixels": self.n_pixels,
            "wave_min": float(self.wave[0]),
            "wave_max": float(self.wave[-1]),
        }

    def to_specutils(self) -> Any:
        """This spectrum as a specutils ``Spectrum`` (``Spectrum1D`` before specutils 2.0).

        Spectral axis in Angstrom (vacuum); flux in ``flux_unit`` (SDSS 1e-17 erg/(s cm2
        Angstrom); LAMOST's relative flux is dimensionless); ``InverseVariance`` uncertainty in
        the inverse square of the flux unit; boolean mask True (= bad, specutils' convention)
        where the survey mask is non-zero or ivar is 0. ``meta`` holds the file path and the
        fields of :meth:`summary`. specutils is optional: ``pip install spectransfer[specutils]``.
        """
        try:
            import specutils
            from astropy import units as u
            from astropy.nddata import InverseVariance
        except ImportError as exc:
            raise ImportError("to_specutils needs specutils: pip install 'spectransfer[specutils]'") from exc
        spectrum_cls = getattr(specutils, "Spectrum", None) or specutils.Spectrum1D
        try:
            flux_unit = u.Unit(self.flux_unit)
        except ValueError:  # a description, not a unit: LAMOST's "relative (... not absolutely calibrated)"
            flux_unit = u.dimensionless_unscaled
        ivar = np.asarray(self.ivar, dtype=np.float64)
        bad = (np.asarray(self.mask) != 0) | ~(ivar > 0)
        return spectrum_cls(
            flux=np.asarray(self.flux, dtype=np.float64) * flux_unit,
            spectral_axis=np.asarray(self.wave, dtype=np.float64) * u.Unit(self.wave_unit),
            uncertainty=InverseVariance(ivar, unit=flux_unit**-2),
            mask=bad,
            meta={"path": self.path, **self.summary()},
        )


INFO_KEYS = ("survey", "format", "ids", "ra", "dec", "class", "subclass", "z", "zwarning", "n_pixels", "wave_min", "wave_max")


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones; NaN to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


ID_DTYPES = ("int64", "string")


@dataclass(frozen=True)
class Survey:
    """What the survey-agnostic core knows of one survey; declared by its readers' module.

    ``id_columns``: (name, dtype) of the ids a record's ``ids`` holds, dtype 'int64' or
    'string'; each is a column of the store's metadata (surveys may share a column, e.g.
    ``fiberid``, when its dtype agrees). ``spectrum_id``: a ``str.format`` pattern over the ids
    that names one spectrum uniquely across surveys (it starts with the survey's name).
    ``catalogue_keys``: id tuples a quasar-catalogue row may match, tried in order; a spectrum
    is matched on the first tuple both sides have. ``zwarning_cut``: whether a non-zero
    pipeline redshift warning rejects a spectrum. ``coverage``: the (largest WAVEMIN, smallest
    WAVEMAX) a spectrum must reach on the default grid (scaled for other grids).
    ``calibration_order``: the Legendre order of the smooth flux-calibration error its spectra
    carry beyond a scale (0: a constant only); ``arm_join``: the wavelength (Angstrom) where two
    spectrograph arms are spliced with their own scales, or None; ``arm_overlap``: the
    (start, end) in Angstrom of the range both arms cover, where the splice leaves residuals of
    either sign, or None. The template families (``ml.spectype``) fit all three as nuisance
    terms, every family alike.
    """

    name: str
    id_columns: tuple[tuple[str, str], ...]
    spectrum_id: str
    catalogue_keys: tuple[tuple[str, ...], ...] = ()
    zwarning_cut: bool = False
    coverage: tuple[float, float] = PAPER_COVERAGE
    calibration_order: int = 0
    arm_join: float | None = None
    arm_overlap: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        names = [c for c, _ in self.id_columns]
        for col, dtype in self.id_columns:
            if dtype not in ID_DTYPES:
                raise ValueError(f"survey {self.name}: id column {col} has dtype {dtype!r}, not one of {ID_DTYPES}")
        for key in self.catalogue_keys:
            if not set(key) <= set(names):
                raise ValueError(f"survey {self.name}: catalogue key {key} names columns that are not id columns")

    def format_id(self, ids: dict[str, Any]) -> str:
        """The spectrum id of a record with these ``ids`` (ints cast, so numpy ints format too)."""
        values = {
            c: (None if ids.get(c) is None else int(ids[c]) if t == "int64" else str(ids[c]).strip()) for c, t in self.id_columns
        }
        return self.spectrum_id.format(**values)


SURVEYS: dict[str, Survey] = {}


def register_survey(survey: Survey) -> Survey:
    """Declare a survey (once per name); its id columns must agree in dtype with those declared before."""
    known = dict(id_columns())
    for col, dtype in survey.id_columns:
        if known.get(col, dtype) != dtype:
            raise ValueError(f"survey {survey.name}: id column {col} is {dtype} but another survey declares it {known[col]}")
    if survey.name in SURVEYS and SURVEYS[survey.name] != survey:
        raise ValueError(f"survey {survey.name!r} is already registered differently")
    SURVEYS[survey.name] = survey
    return survey


def unregister_survey(name: str) -> None:
    """Forget a survey and its readers (for tests that register a toy one)."""
    SURVEYS.pop(name, None)
    READERS[:] = [r for r in READERS if r.survey != name]


def get_survey(name: str) -> Survey:
    """The registered survey ``name``; KeyError naming the known ones otherwise."""
    try:
        return SURVEYS[name]
    except KeyError:
        raise KeyError(f"unknown survey {name!r} (registered: {', '.join(SURVEYS) or 'none'})") from None


def survey_names() -> list[str]:
    return list(SURVEYS)


def id_columns() -> list[tuple[str, str]]:
    """(name, dtype) of every registered survey's id columns, each once, in declaration order."""
    out: dict[str, str] = {}
    for survey in SURVEYS.values():
        for col, dtype in survey.id_columns:
            out.setdefault(col, dtype)
    return list(out.items())


def coverage_limits(survey: str, grid: Grid = DEFAULT_GRID) -> tuple[float, float]:
    """(largest WAVEMIN, smallest WAVEMAX) a spectrum of ``survey`` must reach to cover ``grid``.

    On the default grid these are the survey's numbers as declared (the paper's SDSS cut:
    3839.7244, 8914.597); other grids scale them in proportion to the grid's ends. Rounded to
    1e-4 Angstrom so that the default grid gives the declared numbers exactly.
    """
    lo, hi = get_survey(survey).coverage
    return round(grid.wave_min * lo / DEFAULT_GRID.wave_min, 4), round(grid.wave_max * hi / DEFAULT_GRID.wave_max, 4)


@dataclass(frozen=True)
class Reader:
    label: str
    survey: str
    identify: Callable[[str, Any], bool]  # (path, FitsFile) -> bool, never raises
    read: Callable[[str, Any], SpectrumRecord]  # (path, FitsFile) -> record or SpectrumError
    priority: int = 0


READERS: list[Reader] = []


def register(reader: Reader) -> Reader:
    """Add a reader of a registered survey to the registry (kept sorted, highest priority first)."""
    get_survey(reader.survey)
    READERS.append(reader)
    READERS.sort(key=lambda r: -r.priority)
    return reader


# ---- reading any file ------------------------------------------------------------------------


def identify_reader(path: str, fits: FitsFile) -> Reader | None:
    """The highest-priority reader whose ``identify`` accepts the file (an exception = no).

    When no reader accepts it and one of them stopped on a damaged file (SpectrumError:
    truncated, ...), that error is raised, as it says more than "unrecognised format".
    """
    damage: SpectrumError | None = None
    for reader in READERS:
        try:
            if reader.identify(path, fits):
                return reader
        except SpectrumError as exc:
            damage = damage or exc
        except Exception:  # identify must never make a file fail; treat as "not mine"
            log.debug("identify of %s raised on %s", reader.label, path, exc_info=True)
    if damage is not None:
        raise damage
    return None


def read_spectrum(path: str | os.PathLike[str]) -> SpectrumRecord:
    """Read one survey spectrum file (plain or gzipped), whatever its format.

    Raises :class:`SpectrumError` naming the file and the reason for anything unusable: not
    FITS, truncated, unknown format, a missing column, no finite flux, all-zero ivar.
    Whether the spectrum covers the model's grid is not checked here (see :func:`covers_grid`).
    """
    path = str(path)
    label = None
    try:
        with FitsFile(path) as fits:
            fits.header(0)  # a damaged primary header is reported as such, not as an unknown format
            reader = identify_reader(path, fits)
            if reader is None:
                raise SpectrumError(path, "unrecognised format (not an SDSS spec/spSpec or LAMOST spectrum file)")
            label = reader.label
            return reader.read(path, fits)
    except SpectrumError:
        raise
    except Exception as exc:  # a malformed file must give a reason, never a traceback
        log.debug("reading %s failed", path, exc_info=True)
        where = f" as {label}" if label else ""
        raise SpectrumError(path, f"unreadable{where}: {type(exc).__name__}: {exc}") from exc


def printable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as valid UTF-8 text: undecodable bytes of a file name become ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(path: str | os.PathLike[str]) -> bool:
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


MISSING = "cannot open (no such file or directory)"


@dataclass
class FileWalk:
    """What a folder walk found: the spectrum files, and every entry it passed over with why."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (printable path, reason)

    def skip(self, path: str | os.PathLike[str], reason: str) -> None:
        self.skipped.append((printable_path(path), reason))
        log.debug("skipped %s: %s", printable_path(path), reason)


def _not_a_file(path: str) -> str:
    """Why an entry with a spectrum's name is not a readable regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            return "symbolic link loop" if exc.errno == errno.ELOOP else "broken symbolic link"
        return f"cannot stat ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return "unreadable (permission denied)"


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop or a vanished entry: judged as a file by name below
        return False


def _walk_folder(top: str, seen: set[tuple[int, int]]) -> Iterator[tuple[str, str | None]]:
    """Depth first, each folder's entries in name order (a folder's files and subfolders
    interleaved), so the files come out sorted as paths while only the folders on the way
    down are held in memory."""
    try:
        st = os.stat(top)
    except OSError as exc:
        yield printable_path(top), f"cannot list folder ({exc.strerror})"
        return
    if (st.st_dev, st.st_ino) in seen:  # a symlink back to a folder already walked
        yield printable_path(top), "symbolic link loop (folder already searched)"
        return
    seen.add((st.st_dev, st.st_ino))
    try:
        with os.scandir(top) as it:
            entries = sorted((e.name, _is_dir(e)) for e in it)
    except OSError as exc:
        yield printable_path(top), f"cannot list folder ({exc.strerror})"
        return
    for name, is_dir in entries:
        full = os.path.join(top, name)
        if is_dir:
            if not _utf8(name):
                yield printable_path(full), "folder name is not valid UTF-8 (rename it)"
            else:
                yield from _walk_folder(full, seen)
        elif name.lower().endswith(SPECTRUM_SUFFIXES):
            if not _utf8(name):
                yield printable_path(full), "file name is not valid UTF-8 (rename it)"
            elif os.path.isfile(full) and os.access(full, os.R_OK):
                yield full, None
            else:
                yield printable_path(full), _not_a_file(full)


def iter_walk(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[str, str | None]]:
    """Stream the candidate spectrum files of ``paths`` as (path, None), and each entry passed over
    as (printable path, reason); memory is one folder listing per level, not the survey.

    A folder is searched recursively (symlinked folders followed once) for ``*.fits, *.fit,
    *.fits.gz, *.fit.gz`` (any case), in path order; a file named explicitly is kept whatever
    its name. Names that are not valid UTF-8, broken or looping links, unlistable folders,
    non-regular files and missing paths are passed over with the reason, never silently.
    """
    seen: set[tuple[int, int]] = set()
    for p in paths:
        p = os.fspath(p)
        if not _utf8(p):
            yield printable_path(p), "file name is not valid UTF-8 (rename it)"
        elif os.path.isdir(p):
            yield from _walk_folder(str(p), seen)
        elif os.path.isfile(p) and os.access(p, os.R_OK):
            yield str(p), None
        elif os.path.lexists(p):
            yield printable_path(p), _not_a_file(str(p))
        else:
            yield printable_path(p), MISSING


def walk_spectrum_files(paths: Iterable[str | os.PathLike[str]]) -> FileWalk:
    """Expand files and folders to the candidate spectrum files (unique, in path order per folder),
    recording what is passed over (see :func:`iter_walk`)."""
    walk = FileWalk()
    for path, reason in iter_walk(paths):
        if reason is None:
            walk.files.append(Path(path))
        else:
            walk.skip(path, reason)
    walk.files = list(dict.fromkeys(walk.files))
    return walk


def iter_spectrum_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The spectrum files of :func:`walk_spectrum_files`; a missing path raises SpectrumError.

    What else it skipped is logged.
    """
    walk = walk_spectrum_files(paths)
    for path, reason in walk.skipped:
        if reason == MISSING:
            raise SpectrumError(path, reason)
        log.warning("skipped %s: %s", path, reason)
    return walk.files


def covers_grid(record: SpectrumRecord, grid: Grid = DEFAULT_GRID) -> bool:
    """True when the spectrum's wavelength coverage includes the whole grid.

    Uses the pipeline's WAVEMIN/WAVEMAX (``record.extra``) when present, else the range of
    pixels with ivar > 0, against the survey's :func:`coverage_limits` (on the default grid
    the paper's SDSS cut: WAVEMIN <= 3839.7244, WAVEMAX >= 8914.597).
    """
    lo, hi = record_coverage(record)
    lo_limit, hi_limit = coverage_limits(record.survey, grid)
    return bool(lo <= lo_limit and hi >= hi_limit)


def record_coverage(record: SpectrumRecord) -> tuple[float, float]:
    """(WAVEMIN, WAVEMAX) as the pipeline states them, else of the pixels with ivar > 0 (NaN when none)."""
    lo, hi = record.extra.get("wavemin"), record.extra.get("wavemax")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        good_lo, good_hi = good_range(np.asarray(record.wave), np.asarray(record.ivar))
        lo = good_lo if lo is None or not np.isfinite(lo) else lo
        hi = good_hi if hi is None or not np.isfinite(hi) else hi
    return (float("nan") if lo is None else float(lo)), (float("nan") if hi is None else float(hi))


# ---- helpers shared by the readers -----------------------------------------------------------


def missing_str(value: Any, missing: tuple[str, ...] = ("", "UNKNOWN", "NON", "NULL", "NONE")) -> str | None:
    """A stripped string, or None when empty or a survey's 'no value' word (case-insensitive)."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text.upper() in missing else text


def missing_float(value: Any, sentinels: tuple[float, ...] = (-9999.0, -999.0)) -> float | None:
    """A finite float, or None when absent, not a number, non-finite or a sentinel such as -9999."""
    if value is None or isinstance(value, bool):
        return None
    try:
        # a float32 value becomes the shortest decimal that round-trips (0.0212755, not 0.021275453269...)
        v = float(str(value)) if isinstance(value, np.floating) and value.dtype.itemsize < 8 else float(value)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(v) or v in sentinels:
        return None
    return v


def missing_int(value: Any, sentinels: tuple[int, ...] = (-9999, -999)) -> int | None:
    """An int, or None when absent, not a number or a sentinel."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        try:
            f = float(value)
        except (TypeError, ValueError):
            return None
        if not np.isfinite(f) or f != int(f):
            return None
        v = int(f)
    return None if v in sentinels else v


def valid_mag(value: Any) -> float | None:
    """A plausible apparent magnitude (0 < m < 40), else None (99 and -999 are 'no data')."""
    v = missing_float(value)
    return v if v is not None and 0.0 < v < 40.0 else None


def air_to_vacuum(wave_air: np.ndarray) -> np.ndarray:
    """Air wavelengths (Angstrom) to vacuum, with the refractive index SDSS uses (idlutils airtovac)."""
    wave_air = np.asarray(wave_air, dtype=np.float64)
    sigma2 = (1.0e4 / wave_air) ** 2
    factor = 1.0 + 6.4328e-5 + 2.94981e-2 / (146.0 - sigma2) + 2.5540e-4 / (41.0 - sigma2)
    return np.where(wave_air >= 2000.0, wave_air * factor, wave_air)


def good_range(wave: np.ndarray, ivar: np.ndarray) -> tuple[float | None, float | None]:
    """First and last wavelength with ivar > 0."""
    idx = np.flatnonzero(ivar > 0)
    if idx.size == 0:
        return None, None
    return float(wave[idx[0]]), float(wave[idx[-1]])


def finish_record(record: SpectrumRecord) -> SpectrumRecord:
    """Check and clean a reader's arrays in place; raise SpectrumError when unusable.

    Arrays become 1-D: wave float64 ascending (a descending one is flipped), flux and ivar
    float, mask uint32. NaN/inf flux or ivar and negative ivar get ivar 0 and
    :data:`NONFINITE_BIT` (negative ivar: ivar 0 only). Fatal: empty or unequal lengths,
    non-finite or non-monotonic or implausible (not Angstrom) wavelengths, no finite flux,
    all ivar zero.
    """
    path = record.path
    wave = np.asarray(record.wave, dtype=np.float64).ravel()
    flux = np.asarray(record.flux).ravel()
    ivar = np.asarray(record.ivar).ravel()
    mask = np.asarray(record.mask).ravel()
    n = flux.size
    if n == 0:
        raise SpectrumError(path, "empty spectrum (0 pixels)")
    if not (wave.size == ivar.size == mask.size == n):
        raise SpectrumError(path, f"array lengths differ (wave {wave.size}, flux {n}, ivar {ivar.size}, mask {mask.size})")
    if flux.dtype.kind != "f":
        flux = flux.astype(np.float32)
    if ivar.dtype.kind != "f":
        ivar = ivar.astype(np.float32)
    if mask.dtype != MASK_DTYPE:
        if mask.dtype.kind == "f":
            mask = np.where(np.isfinite(mask), mask, 0)
            mask = np.rint(mask).astype(np.int64)
        mask = mask.astype(MASK_DTYPE)
    if not np.all(np.isfinite(wave)):
        raise SpectrumError(path, "wavelength array has NaN/inf values")
    step = np.diff(wave)
    if n > 1 and not np.all(step > 0):
        if np.all(step < 0):
            wave, flux, ivar, mask = wave[::-1], flux[::-1], ivar[::-1], mask[::-1]
        else:
            raise SpectrumError(path, "wavelength array is not monotonic")
    if wave[0] < 500.0 or wave[-1] > 100000.0:
        raise SpectrumError(path, f"wavelengths {wave[0]:.4g}-{wave[-1]:.4g} are not plausible Angstroms")
    finite_flux = np.isfinite(flux)
    if not finite_flux.any():
        raise SpectrumError(path, "no finite flux values")
    bad = ~finite_flux | ~np.isfinite(ivar)
    if bad.any() or (ivar < 0).any():
        flux = np.where(finite_flux, flux, 0).astype(flux.dtype, copy=False)
        ivar = np.where(bad | (ivar < 0), 0, ivar).astype(ivar.dtype, copy=False)
        mask = np.where(bad, mask | NONFINITE_BIT, mask).astype(MASK_DTYPE, copy=False)
    if not (ivar > 0).any():
        raise SpectrumError(path, "all inverse variances are zero (no usable pixel)")
    record.wave = np.ascontiguousarray(wave)
    record.flux = np.ascontiguousarray(flux)
    record.ivar = np.ascontiguousarray(ivar)
    record.mask = np.ascontiguousarray(mask)
    if record.extra.get("wavemin") is None or record.extra.get("wavemax") is None:
        lo, hi = good_range(record.wave, record.ivar)
        record.extra["wavemin"], record.extra["wavemax"] = lo, hi
    return record
