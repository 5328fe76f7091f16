"""Survey readers on every real file (tests/data, plus ../shared/data when present), checked against
their PROVENANCE.md and astropy, and on real files corrupted on purpose."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from spectransfer.config import DEFAULT_GRID, Grid
from spectransfer.data.resample import resample_record
from spectransfer.errors import SpectrumError
from spectransfer.surveys import (
    MASK_DTYPE,
    NONFINITE_BIT,
    READERS,
    covers_grid,
    iter_spectrum_files,
    read_spectrum,
)
from spectransfer.surveys.base import INFO_KEYS, SpectrumRecord
from spectransfer.surveys.fitsfile import FitsFile
from spectransfer.surveys.sdss_spec import SDSS_BAD_PIXEL_BITS

from conftest import FULL_DATA, REAL_DATA, full_data_present, real_files

SDSS_FILES = real_files("sdss")
LAMOST_FILES = real_files("lamost")
ALL_FILES = SDSS_FILES + LAMOST_FILES
SPSPEC_CLASS = {0: None, 1: "STAR", 2: "GALAXY", 3: "QSO", 4: "QSO", 5: "SKY", 6: "STAR"}


# ---- PROVENANCE.md, parsed independently of the readers --------------------------------------


def _provenance(folder: Path) -> dict[str, dict]:
    """file name -> {'class', 'subclass', 'z', 'zwarning', 'ids', 'sha256'} from the sdss/ and lamost/ tables."""
    text = (folder / "PROVENANCE.md").read_text()
    out: dict[str, dict] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.match(r"^(spec|spSpec)-", cells[0]):
            continue
        name, cls_cell, z_cell, ids_cell = cells[:4]
        entry: dict = {"ids": dict(re.findall(r"(\w+)=(\S+)", ids_cell))}
        m = re.match(r"SPEC_CLN=(\d+)", cls_cell)
        if m:  # spSpec: 'SPEC_CLN=2 (GALAXY); OBJTYPE=GALAXY'
            entry["class"], entry["subclass"] = SPSPEC_CLASS[int(m.group(1))], None
        else:  # 'QSO / BROADLINE', 'GALAXY /  ', 'Unknown / Non'
            cls, _, sub = cls_cell.partition("/")
            entry["class"], entry["subclass"] = cls.strip(), sub.strip()
        entry["z"] = float(z_cell.split()[0])
        zw = re.search(r"(?:ZWARNING|Z_WARNIN)=(\d+)", z_cell)
        entry["zwarning"] = int(zw.group(1)) if zw else None
        entry["sha256"] = cells[9] if len(cells) > 9 else None
        out[name] = entry
    return out


PROVENANCE = {**(_provenance(FULL_DATA) if full_data_present() else {}), **_provenance(REAL_DATA)}


def test_every_real_file_is_listed_in_provenance() -> None:
    names = {p.name for p in ALL_FILES}
    assert len(names) >= 25
    assert names <= set(PROVENANCE), names - set(PROVENANCE)


def test_in_repo_files_are_the_bytes_their_provenance_names() -> None:
    """Every file in tests/data has its full SHA-256 in tests/data/PROVENANCE.md (unmodified copies)."""
    local = _provenance(REAL_DATA)
    files = sorted(p for sub in ("sdss", "lamost") for p in (REAL_DATA / sub).iterdir())
    assert {p.name for p in files} == set(local)
    for p in files:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == local[p.name]["sha256"], p.name


def test_in_repo_files_equal_the_fuller_set(full_data: Path) -> None:
    for sub in ("sdss", "lamost", "catalogs"):
        for p in sorted((REAL_DATA / sub).iterdir()):
            assert p.read_bytes() == (full_data / sub / p.name).read_bytes(), p.name


# ---- every real file ---------------------------------------------------------------------------


def _check_arrays(rec: SpectrumRecord) -> None:
    n = rec.n_pixels
    assert rec.wave.shape == rec.flux.shape == rec.ivar.shape == rec.mask.shape == (n,)
    assert n > 3000
    assert rec.wave.dtype == np.float64 and rec.mask.dtype == MASK_DTYPE
    assert np.all(np.diff(rec.wave) > 0)
    assert 3500 < rec.wave[0] < 4300 and 8800 < rec.wave[-1] < 10500
    assert np.all(np.isfinite(rec.flux)) and np.all(np.isfinite(rec.ivar))
    assert np.all(rec.ivar >= 0) and np.any(rec.ivar > 0)
    assert rec.wave_unit == "Angstrom"
    for key in ("wavemin", "wavemax", "snr", "mag_r", "z_err", "objtype"):
        assert key in rec.extra, key
    assert rec.extra["wavemin"] < rec.extra["wavemax"]


def _check_provenance(rec: SpectrumRecord, name: str) -> None:
    exp = PROVENANCE[name]
    ids = exp["ids"]
    if rec.survey == "sdss":
        assert rec.ids == {
            "plate": int(ids["PLATE"]),
            "mjd": int(ids["MJD"]),
            "fiberid": int(ids.get("FIBERID", ids.get("FIBER"))),
        }
        assert rec.cls == exp["class"]
        assert rec.subclass == (exp["subclass"] or None)
        assert rec.zwarning == exp["zwarning"]
    else:
        assert rec.ids["lmjd"] == int(ids["LMJD"])
        assert rec.ids["planid"] == ids["PLANID"]
        assert rec.ids["spid"] == int(ids["SPID"])
        assert rec.ids["fiberid"] == int(ids["FIBERID"])
        assert rec.ids["obsid"] == (None if ids["OBSID"] == "None" else int(ids["OBSID"]))
        if exp["class"] == "Unknown":
            assert rec.cls is None and rec.subclass is None
        else:
            assert (rec.cls, rec.subclass) == (exp["class"], exp["subclass"])
        assert rec.zwarning is None
    if exp["z"] == -9999.0:
        assert rec.z is None
    else:
        assert rec.z == pytest.approx(exp["z"], rel=1e-4, abs=1e-5)


def _check_against_astropy(rec: SpectrumRecord, path: Path) -> None:
    """Re-read the file with astropy and compare ids, class, z and the arrays."""
    with fits.open(path) as hdul:
        hdr = hdul[0].header
        if rec.format == "sdss-spec":
            row = hdul[2].data[0]
            assert hdul[2].name in ("SPECOBJ", "SPALL")
            assert rec.ids == {"plate": row["PLATE"], "mjd": row["MJD"], "fiberid": row["FIBERID"]}
            assert rec.cls == row["CLASS"].strip()
            assert rec.subclass == (row["SUBCLASS"].strip() or None)
            assert rec.z == pytest.approx(float(row["Z"]), rel=1e-6)
            assert rec.zwarning == row["ZWARNING"]
            assert rec.ra == pytest.approx(row["PLUG_RA"]) and rec.dec == pytest.approx(row["PLUG_DEC"])
            assert rec.extra["wavemin"] == pytest.approx(row["WAVEMIN"], rel=1e-6)
            assert rec.extra["wavemax"] == pytest.approx(row["WAVEMAX"], rel=1e-6)
            coadd = hdul[1].data
            np.testing.assert_allclose(rec.wave, 10.0 ** coadd["loglam"].astype(np.float64), rtol=1e-12)
            np.testing.assert_array_equal(rec.flux, coadd["flux"])
            np.testing.assert_array_equal(rec.ivar, coadd["ivar"])
            np.testing.assert_array_equal(rec.mask, coadd["and_mask"].astype(np.uint32) & SDSS_BAD_PIXEL_BITS)
        elif rec.format == "sdss-spspec":
            assert rec.ids == {"plate": hdr["PLATEID"], "mjd": hdr["MJD"], "fiberid": hdr["FIBERID"]}
            assert rec.cls == SPSPEC_CLASS[hdr["SPEC_CLN"]]
            assert rec.z == pytest.approx(hdr["Z"]) and rec.zwarning == hdr["Z_WARNIN"]
            assert (rec.ra, rec.dec) == (pytest.approx(hdr["RAOBJ"]), pytest.approx(hdr["DECOBJ"]))
            assert hdr["VACUUM"] is True
            data = hdul[0].data.astype(np.float64)
            wave = 10.0 ** (hdr["COEFF0"] + hdr["COEFF1"] * np.arange(data.shape[1]))
            np.testing.assert_allclose(rec.wave, wave, rtol=1e-12)
            np.testing.assert_array_equal(rec.flux, hdul[0].data[0])
            sigma = data[2]
            expected_ivar = np.zeros_like(sigma)
            expected_ivar[sigma > 0] = 1.0 / sigma[sigma > 0] ** 2
            np.testing.assert_allclose(rec.ivar, expected_ivar, rtol=1e-6)
            assert np.all(rec.ivar[sigma == 0] == 0)
        else:  # LAMOST
            # some re-saved DR2 headers hold the numbers as strings ('1'): compare as ints
            assert rec.ids["lmjd"] == int(hdr["LMJD"]) and rec.ids["planid"] == hdr["PLANID"].strip()
            assert rec.ids["spid"] == int(hdr["SPID"]) and rec.ids["fiberid"] == int(hdr["FIBERID"])
            assert rec.ids["obsid"] == (int(hdr["OBSID"]) if "OBSID" in hdr else None)
            assert rec.ra == pytest.approx(hdr["RA"]) and rec.dec == pytest.approx(hdr["DEC"])
            assert hdr["VACUUM"] is True
            if rec.format == "lamost-coadd":
                assert hdul[1].name == "COADD"
                t = hdul[1].data
                flux, ivar, wave = t["FLUX"][0], t["IVAR"][0], t["WAVELENGTH"][0].astype(np.float64)
            else:
                img = hdul[0].data
                flux, ivar = img[0], img[1]
                if "Wavelength" in hdr["EXTEN0"]:
                    wave = img[2].astype(np.float64)
                else:  # early files: row 2 is the sub-continuum, wavelength from the dispersion keys
                    assert "Subcontinuum" in hdr["EXTEN0"]
                    wave = 10.0 ** (hdr["COEFF0"] + hdr["COEFF1"] * np.arange(img.shape[1]))
            np.testing.assert_allclose(rec.wave, wave, rtol=1e-12)
            np.testing.assert_array_equal(rec.flux, flux)
            # the file's ivar, except the unflagged low-signal pixels it zeroed, which the reader restores
            kept = ivar > 0
            np.testing.assert_array_equal(rec.ivar[kept], ivar[kept])
            assert int(((rec.ivar > 0) & ~kept).sum()) == rec.extra["restored_pixels"]


@pytest.mark.parametrize("path", ALL_FILES, ids=[p.name for p in ALL_FILES])
def test_real_file_matches_provenance_and_astropy(path: Path) -> None:
    rec = read_spectrum(path)
    expected_format = "sdss-spspec" if path.name.startswith("spSpec") else "sdss-spec" if path.parent.name == "sdss" else None
    if expected_format:
        assert rec.format == expected_format
    else:
        assert rec.format in ("lamost-image", "lamost-coadd")
    assert rec.survey == path.parent.name
    assert rec.path == str(path)
    _check_arrays(rec)
    _check_provenance(rec, path.name)
    _check_against_astropy(rec, path)
    summary = rec.summary()
    assert tuple(summary) == INFO_KEYS


def test_lamost_layouts_are_told_apart(real_data: Path) -> None:
    formats = {p.name: read_spectrum(p).format for p in LAMOST_FILES}
    assert formats["spec-55859-F5902_sp01-013_dr8.fits.gz"] == "lamost-coadd"
    assert formats["spec-59517-EG025613N082253M02_sp08-200.fits.gz"] == "lamost-coadd"
    assert formats["spec-55859-F5902_sp01-001_dr7.fits.gz"] == "lamost-image"
    assert formats["spec-55916-B5591606_sp01-001.fits"] == "lamost-image"  # float64 image


def test_lamost_unknown_class_and_sentinel_z_are_none(real_data: Path) -> None:
    rec = read_spectrum(real_data / "lamost" / "spec-55919-B5591903_sp01-001.fits")
    assert rec.cls is None and rec.subclass is None and rec.z is None
    with fits.open(real_data / "lamost" / "spec-55919-B5591903_sp01-001.fits") as hdul:
        assert hdul[0].header["CLASS"] == "Unknown" and hdul[0].header["Z"] == -9999.0


def test_same_spectrum_in_image_and_coadd_layouts_agrees(real_data: Path) -> None:
    """Fibre 1 of plan F5902 in DR7 (image) and fibre 13 in DR8 (COADD) share one wavelength grid."""
    a = read_spectrum(real_data / "lamost" / "spec-55859-F5902_sp01-001_dr7.fits.gz")
    b = read_spectrum(real_data / "lamost" / "spec-55859-F5902_sp01-013_dr8.fits.gz")
    np.testing.assert_allclose(a.wave, b.wave, rtol=1e-9)


def test_extra_carries_what_ingest_filters_need(real_data: Path) -> None:
    rec = read_spectrum(real_data / "sdss" / "spec-0266-51602-0001.fits")
    assert rec.extra["snr"] == pytest.approx(38.055374, rel=1e-6)  # SN_MEDIAN_ALL
    # SPECTROFLUX r = 325.88742 nanomaggies (no PSFMAG in SDSS-I/II rows)
    assert rec.extra["mag_r"] == pytest.approx(22.5 - 2.5 * np.log10(325.88742), abs=1e-4)
    boss = read_spectrum(real_data / "sdss" / "spec-7338-57859-0739.fits")
    assert boss.extra["mag_r"] == pytest.approx(19.869732, abs=1e-5)  # PSFMAG r
    assert boss.extra["mag_r_source"] == "psfmag"
    lam = read_spectrum(real_data / "lamost" / "spec-59522-EG224840N075042B03_sp05-172.fits.gz")
    assert lam.extra["mag_r"] == pytest.approx(15.97) and lam.extra["snr"] == pytest.approx(57.62)
    old = read_spectrum(real_data / "lamost" / "spec-55862-B6212_sp06-003.fits")
    assert old.extra["mag_r"] == pytest.approx(13.56)  # MAGTYPE 'ugrizjh' -> MAG3
    assert old.extra["snr"] is None  # SN_R = 99: no value
    assert old.extra["designation"] == "LAMOST J063715.90+271356.5"


# ---- gzip -----------------------------------------------------------------------------------------


def test_gzipped_sdss_file_reads_like_the_plain_one(real_data: Path, tmp_path: Path) -> None:
    src = real_data / "sdss" / "spec-7457-56746-0001.fits"  # full file, 14 HDUs
    gz = tmp_path / (src.name + ".gz")
    gz.write_bytes(gzip.compress(src.read_bytes(), compresslevel=1))
    a, b = read_spectrum(src), read_spectrum(gz)
    assert a.summary() == b.summary()
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.ivar, b.ivar)


# ---- bad input: real files corrupted on purpose --------------------------------------------------


def _reason(path: Path) -> str:
    with pytest.raises(SpectrumError) as info:
        read_spectrum(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value.reason


def test_truncated_file(real_data: Path, tmp_path: Path) -> None:
    data = (real_data / "sdss" / "spec-0266-51602-0001.fits").read_bytes()
    for cut in (1000, 2880 * 3 + 100, len(data) // 2):
        bad = tmp_path / f"cut{cut}.fits"
        bad.write_bytes(data[:cut])
        assert "truncated" in _reason(bad)


def test_truncated_gzip_file(real_data: Path, tmp_path: Path) -> None:
    data = (real_data / "lamost" / "spec-59517-EG025613N082253M02_sp08-200.fits.gz").read_bytes()
    bad = tmp_path / "cut.fits.gz"
    bad.write_bytes(data[: len(data) // 2])
    assert "truncated" in _reason(bad)


def test_not_fits(tmp_path: Path, real_data: Path) -> None:
    bad = tmp_path / "spec-0000-00000-0000.fits"
    shutil.copy(real_data / "PROVENANCE.md", bad)
    assert "not a FITS file" in _reason(bad)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    assert "empty file" in _reason(empty)
    short = tmp_path / "short.fits"
    short.write_bytes((real_data / "sdss" / "spec-0266-51602-0001.fits").read_bytes()[:40])
    assert "truncated" in _reason(short)
    assert "cannot open" in _reason(tmp_path / "absent.fits")


@pytest.mark.parametrize(
    "source, hdu, column",
    [
        ("lamost/spec-59517-EG025613N082253M02_sp08-200.fits.gz", 1, "IVAR"),
        ("lamost/spec-59522-EG224840N075042B03_sp05-172.fits.gz", 1, "WAVELENGTH"),
        ("sdss/spec-0266-51602-0013.fits", 1, "ivar"),
        ("sdss/spec-7338-57859-0739.fits", 2, "Z"),
    ],
)
def test_table_without_a_column(real_data: Path, tmp_path: Path, source: str, hdu: int, column: str) -> None:
    with fits.open(real_data / source) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul[:3]])
    kept = [c for c in hdul[hdu].columns if c.name != column]
    assert len(kept) == len(hdul[hdu].columns) - 1
    hdul[hdu] = fits.BinTableHDU.from_columns(kept, name=hdul[hdu].name)
    bad = tmp_path / "nocol.fits"
    hdul.writeto(bad, output_verify="silentfix")  # LAMOST primaries keep NAXISn with NAXIS = 0
    reason = _reason(bad)
    assert "lacks column" in reason and f"'{column}'" in reason


def _lamost_image_copy(real_data: Path, tmp_path: Path, edit) -> Path:
    with fits.open(real_data / "lamost" / "spec-58397-EG014118N254444M01_sp03-031.fits") as hdul:
        data = hdul[0].data.copy()
        header = hdul[0].header.copy()
    edit(data)
    out = tmp_path / "edited.fits"
    fits.PrimaryHDU(data=data, header=header).writeto(out)
    return out


def test_all_nan_flux(real_data: Path, tmp_path: Path) -> None:
    bad = _lamost_image_copy(real_data, tmp_path, lambda d: d.__setitem__((0, slice(None)), np.nan))
    assert "no finite flux" in _reason(bad)


def test_all_zero_ivar(real_data: Path, tmp_path: Path) -> None:
    with fits.open(real_data / "sdss" / "spec-0266-51602-0001.fits") as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
        hdul[1].data["ivar"][:] = 0
        bad = tmp_path / "zero-ivar.fits"
        hdul.writeto(bad)
    assert "inverse variances are zero" in _reason(bad)


def test_isolated_nan_pixels_are_masked_not_fatal(real_data: Path, tmp_path: Path) -> None:
    good = read_spectrum(real_data / "lamost" / "spec-58397-EG014118N254444M01_sp03-031.fits")
    bad_pix = [10, 500, 2000]

    def edit(d: np.ndarray) -> None:
        d[0, bad_pix[:2]] = np.nan
        d[1, bad_pix[2]] = np.inf

    rec = read_spectrum(_lamost_image_copy(real_data, tmp_path, edit))
    assert np.all(rec.ivar[bad_pix] == 0)
    assert np.all(rec.mask[bad_pix] & NONFINITE_BIT)
    assert np.all(np.isfinite(rec.flux))
    others = np.setdiff1d(np.arange(rec.n_pixels), bad_pix)
    np.testing.assert_array_equal(rec.ivar[others], good.ivar[others])
    np.testing.assert_array_equal(rec.mask[others], good.mask[others])
    assert not np.any(good.mask & NONFINITE_BIT)


def test_unknown_fits_layout(tmp_path: Path) -> None:
    odd = tmp_path / "odd.fits"
    fits.PrimaryHDU(data=np.ones((3, 3), dtype=np.float32)).writeto(odd)
    assert "unrecognised format" in _reason(odd)
    with FitsFile(odd) as ff:  # no reader's identify raises on a file it does not know
        assert not any(r.identify(str(odd), ff) for r in READERS)


# ---- helpers used by ingest --------------------------------------------------------------------


def test_covers_grid_uses_pipeline_range_and_paper_limits(real_data: Path) -> None:
    sdss = read_spectrum(real_data / "sdss" / "spec-0266-51602-0001.fits")  # WAVEMIN 3806, WAVEMAX 9202
    assert covers_grid(sdss)
    assert not covers_grid(sdss, Grid(n_bins=2048, wave_min=3700.0, wave_max=8915.0))
    short = read_spectrum(real_data / "lamost" / "spec-55862-B6212_sp06-049.fits")
    assert covers_grid(short)  # its zeroed blue end restored by the reader (see restore_zeroed)
    short.ivar[short.wave < 4039.0] = 0.0  # a blue end without data
    short.extra["wavemin"] = short.extra["wavemax"] = None  # LAMOST states none: the good pixels decide
    assert not covers_grid(short)
    sdss.extra["wavemin"], sdss.extra["wavemax"] = 3839.7244, 8914.597  # exactly the paper's cut
    assert covers_grid(sdss, DEFAULT_GRID)
    sdss.extra["wavemin"] = 3839.73
    assert not covers_grid(sdss)


def test_iter_spectrum_files_expands_folders_sorted(tmp_path: Path) -> None:
    names = ["b/spec-2.fits", "a/spec-1.fit", "a/deep/spec-3.FITS.GZ", "c.fit.gz", "notes.txt", "a/x.fits.bz2"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    extra = tmp_path / "explicit.dat"
    extra.write_bytes(b"")
    got = iter_spectrum_files([tmp_path, extra, tmp_path / "c.fit.gz"])
    assert got == [
        tmp_path / "a/deep/spec-3.FITS.GZ",
        tmp_path / "a/spec-1.fit",
        tmp_path / "b/spec-2.fits",
        tmp_path / "c.fit.gz",
        extra,
    ]
    with pytest.raises(SpectrumError, match="no such file"):
        iter_spectrum_files([tmp_path / "missing"])


@pytest.mark.parametrize(
    "name", ["sdss/spec-7457-56746-0001.fits", "sdss/spec-0752-52251-0323.fits", "lamost/spec-55859-F5902_sp01-013_dr8.fits.gz"]
)
def test_fitsfile_agrees_with_astropy_on_every_key_and_column(real_data: Path, name: str) -> None:
    path = real_data / name
    with FitsFile(path) as ff, fits.open(path) as hdul:
        for i in range(3 if len(hdul) > 2 else len(hdul)):
            ahdr = hdul[i].header
            for key in ahdr:
                if key in ("COMMENT", "HISTORY", ""):
                    continue
                assert ff.header(i)[key] == ahdr[key], (i, key)
            if isinstance(hdul[i], fits.BinTableHDU):
                cols = [c.name for c in hdul[i].columns if c.format[-1] not in "PQ"]
                got = ff.table(i, cols)
                for c in cols:
                    want = hdul[i].data[c]
                    if want.dtype.kind in "US":
                        assert list(got[c]) == [s.rstrip() for s in want], c
                    else:
                        np.testing.assert_array_equal(got[c], np.asarray(want), err_msg=c)
                        assert got[c].shape == np.asarray(want).shape, c
        assert not ff.has_hdu(len(hdul))


@pytest.mark.parametrize(
    "name",
    [
        "sdss/spec-0266-51602-0013.fits",
        "sdss/spSpec-51993-0542-631.fit",
        "lamost/spec-55916-B5591606_sp01-001.fits",
        "lamost/spec-59522-EG224840N075042B03_sp05-172.fits.gz",
    ],
)
def test_damaged_bytes_give_spectrum_error_or_a_record(real_data: Path, tmp_path: Path, name: str) -> None:
    """Whatever the damage (bytes overwritten in headers or data, cut anywhere), read_spectrum
    either returns a checked record or raises SpectrumError: never another exception."""
    src = (real_data / name).read_bytes()
    rng = np.random.default_rng(7)
    raw = gzip.decompress(src) if name.endswith(".gz") else src
    outcomes = set()
    for trial in range(25):
        data = bytearray(raw)
        if trial % 3 == 0:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            where = int(rng.integers(0, min(len(data), 3 * 2880))) if trial % 3 == 1 else int(rng.integers(0, len(data)))
            data[where : where + 8] = rng.choice(list(b"0123456789 -=E'/XTNA"), 8).astype(np.uint8).tobytes()
        bad = tmp_path / f"t{trial}.fits"
        bad.write_bytes(gzip.compress(bytes(data), compresslevel=1) if name.endswith(".gz") else bytes(data))
        try:
            rec = read_spectrum(bad)
        except SpectrumError as exc:
            assert exc.reason
            outcomes.add("error")
        else:
            assert np.all(np.isfinite(rec.flux)) and np.all(rec.ivar >= 0)
            outcomes.add("read")
    assert "error" in outcomes


def test_to_specutils_units_uncertainty_and_masked_pixels(real_data: Path) -> None:
    specutils = pytest.importorskip("specutils")
    from astropy import units as u
    from astropy.nddata import InverseVariance

    spectrum_cls = getattr(specutils, "Spectrum", None) or specutils.Spectrum1D
    sdss = real_data / "sdss" / "spec-7338-57859-0739.fits"
    rec = read_spectrum(sdss)
    spec = rec.to_specutils()
    assert isinstance(spec, spectrum_cls) and isinstance(spec.uncertainty, InverseVariance)
    assert spec.flux.unit == u.Unit("1e-17 erg / (s cm2 Angstrom)") and spec.spectral_axis.unit == u.AA
    assert spec.uncertainty.unit == spec.flux.unit**-2
    with fits.open(sdss) as hdul:  # the file itself, read by astropy, is the reference
        coadd = hdul[1].data
        np.testing.assert_allclose(spec.spectral_axis.value, 10.0 ** coadd["loglam"].astype(np.float64), rtol=1e-7)
        np.testing.assert_allclose(spec.flux.value, coadd["flux"], rtol=1e-6)
        np.testing.assert_allclose(spec.uncertainty.array, coadd["ivar"], rtol=1e-6)
        no_data = coadd["ivar"] == 0
    assert spec.mask.dtype == bool and spec.mask[no_data].all()  # True = bad, specutils' convention
    assert np.array_equal(spec.mask, (rec.mask != 0) | (rec.ivar <= 0)) and 0 < spec.mask.sum() < spec.mask.size
    assert spec.meta["ids"] == {"plate": 7338, "mjd": 57859, "fiberid": 739}

    lamost = real_data / "lamost" / "spec-55859-F5902_sp01-001_dr7.fits.gz"  # rows flux, ivar, wavelength, ...
    lspec = read_spectrum(lamost).to_specutils()
    assert lspec.flux.unit == u.dimensionless_unscaled  # LAMOST flux is relative
    with fits.open(lamost) as hdul:
        np.testing.assert_allclose(lspec.spectral_axis.value, hdul[0].data[2].astype(np.float64), rtol=1e-7)
        assert lspec.mask[hdul[0].data[1] == 0].all()


def test_boss_nodata_pixels_with_positive_ivar_are_kept(full_data):
    """BOSS v5_4_45 coadds flag ~450 pixels NODATA in and_mask although their ivar is positive
    (higher than the median): the reader keeps them, so the resampled spectrum has no hole."""
    path = full_data / "sdss" / "spec-3851-55302-0530.fits"
    with fits.open(path) as hdul:
        coadd = hdul[1].data
        wave = 10.0 ** coadd["loglam"].astype(np.float64)
        ivar = coadd["ivar"].astype(np.float64)
        nodata = (coadd["and_mask"].astype(np.int64) & (1 << 24)) != 0
    flagged = nodata & (ivar > 0)
    assert flagged.sum() > 300  # the file's own arrays: the quirk is there
    assert np.median(ivar[flagged]) > np.median(ivar[ivar > 0])
    rec = read_spectrum(path)
    assert np.all(rec.mask[flagged] == 0)
    _, out_iv = resample_record(rec)
    inside = (DEFAULT_GRID.centers > wave[flagged].min()) & (DEFAULT_GRID.centers < wave[flagged].max())
    assert inside.sum() > 200 and np.all(out_iv[inside] > 0)


def test_restore_zeroed_gives_back_the_pixels_the_early_lamost_pipeline_zeroed(real_data: Path) -> None:
    """The early LAMOST pipeline zeroed the ivar of low-signal pixels (flux kept, no flag), so
    the pixels left are those that scattered high. Emulated on a DR7 file (which keeps its
    non-positive pixels) made fainter with known noise: the zeroed pixels come back, with their
    noise to within a third, and the blue end's mean is unbiased again."""
    from spectransfer.surveys.lamost_image import restore_zeroed

    rec = read_spectrum(real_data / "lamost" / "spec-55859-F5902_sp01-001_dr7.fits.gz")
    assert rec.extra["restored_pixels"] == 0  # a DR7 file: nothing zeroed to give back
    rng = np.random.default_rng(3)
    good = rec.ivar > 0
    sigma = np.where(good, 1.0 / np.sqrt(np.where(good, rec.ivar, 1.0)), 0.0) * np.sqrt(26.0)
    flux = rec.flux + rng.normal(size=rec.flux.size) * sigma * 5.0 / np.sqrt(26.0)  # total noise sqrt(26) x the file's
    ivar_true = np.where(good, 1.0 / np.maximum(sigma, 1e-30) ** 2, 0.0)
    zeroed = good & (flux <= 0)  # what the early pipeline did
    ivar_early = np.where(zeroed, 0.0, ivar_true)
    restored, n = restore_zeroed(flux, ivar_early, np.zeros(flux.size, np.uint32))
    blue = (rec.wave > 3840) & (rec.wave < 4500)
    assert zeroed[blue].mean() > 0.2  # the blue end is faint enough for the zeroing to bite
    assert n >= 0.9 * zeroed.sum() and np.all(restored[~zeroed] == ivar_early[~zeroed])
    back = zeroed & (restored > 0)
    ratio = np.sqrt(ivar_true[back] / restored[back])
    assert 0.75 < np.median(ratio) < 1.33
    full = flux[blue & good]
    err = full.std() / np.sqrt(full.size)
    assert flux[blue & (ivar_early > 0)].mean() - full.mean() > 5 * err  # zeroed: biased high
    assert abs(flux[blue & (restored > 0)].mean() - full.mean()) < 3 * err  # restored: not


def test_early_lamost_files_are_read_with_their_zeroed_blue_ends_restored(real_data: Path) -> None:
    """DR2 files of faint sources: the pipeline zeroed the ivar below 4237 A (a K5 star) and
    4692 A (an unclassified source) but kept the flux; the reader gives those pixels back
    (noise from the flux's own scatter), so the spectra cover the grid; DR7+ files are untouched."""
    for name, first_good in (("spec-55916-B5591606_sp01-001.fits", 4237.0), ("spec-55919-B5591903_sp01-001.fits", 4692.0)):
        path = real_data / "lamost" / name
        with fits.open(path) as hdul:
            raw_ivar, raw_wave = hdul[0].data[1], hdul[0].data[2]
        assert raw_wave[raw_ivar > 0][0] > first_good - 1.0  # as the file has it
        rec = read_spectrum(path)
        assert rec.extra["restored_pixels"] > 500 and covers_grid(rec)
        blue = (rec.wave > 3840) & (rec.wave < first_good - 10)
        assert np.all(rec.ivar[blue] > 0) or np.mean(rec.ivar[blue] > 0) > 0.95
        # the restored noise joins the pipeline's own at the first pixels it kept
        near = (rec.wave > first_good) & (rec.wave < first_good + 200) & (raw_ivar > 0)
        just_below = (rec.wave > first_good - 200) & (rec.wave < first_good) & (raw_ivar == 0)
        assert 0.4 < np.median(rec.ivar[just_below]) / np.median(raw_ivar[near]) < 2.5
    for name in ("spec-58397-EG014118N254444M01_sp03-031.fits", "spec-59517-EG025613N082253M02_sp08-200.fits.gz"):
        assert read_spectrum(real_data / "lamost" / name).extra["restored_pixels"] == 0
