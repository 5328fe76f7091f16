"""Quasar catalogues with their real column names, and labelling by ids and by position."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord, match_coordinates_sky
from astropy.table import Table

from spectransfer.data.catalogs import label_spectra, load_catalog
from spectransfer.errors import CatalogError

ARCSEC = 1 / 3600


def _offset(ra: float, dec: float, arcsec: float, pa_deg: float = 30.0) -> tuple[float, float]:
    c = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(pa_deg * u.deg, arcsec * u.arcsec)
    return float(c.ra.deg), float(c.dec.deg)


def _meta(rows: list[dict]) -> pd.DataFrame:
    cols = ["survey", "plate", "mjd", "fiberid", "obsid", "lmjd", "planid", "spid", "ra", "dec"]
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows])
    for c in ("plate", "mjd", "fiberid", "obsid", "lmjd", "spid"):
        df[c] = pd.array(df[c].tolist(), dtype="Int64")
    df["ra"] = df["ra"].astype(float)
    df["dec"] = df["dec"].astype(float)
    return df


@pytest.fixture()
def dr14q(tmp_path):
    """DR14Q-like: row 0 has two duplicate observations; empty slots are -1 as in the file."""
    n = 3
    dup = np.full((n, 32), -1, dtype=np.int32)
    pd_, md, fd = dup.copy(), dup.copy(), dup.copy()
    pd_[0, :2], md[0, :2], fd[0, :2] = [7000, 7001], [56800, 56801], [5, 6]
    t = Table(
        {
            "SDSS_NAME": ["000000.00+000000.0", "010000.00+100000.0", "020000.00-050000.0"],
            "RA": [10.0, 15.0, 30.0],
            "DEC": [0.5, 10.0, -5.0],
            "PLATE": np.array([266, 3851, 4055], dtype=np.int32),
            "MJD": np.array([51602, 55302, 55359], dtype=np.int32),
            "FIBERID": np.array([1, 530, 27], dtype=np.int16),
            "Z": [1.5, 2.701, 0.9],
            "Z_VI": [1.51, 2.70, -1.0],
            "PLATE_DUPLICATE": pd_,
            "MJD_DUPLICATE": md,
            "FIBERID_DUPLICATE": fd,
        }
    )
    path = tmp_path / "DR14Q_v4_4.fits"
    t.write(path)
    return path


@pytest.fixture()
def dr16q(tmp_path):
    """DR16Q-like: SOURCE_Z and IS_QSO_FINAL as in DR16Q_v4 (every row of the quasar catalogue is 1)."""
    t = Table(
        {
            "RA": [15.0, 200.0],
            "DEC": [10.0, 45.0],
            "PLATE": [3851, 8000],
            "MJD": [55302, 57000],
            "FIBERID": [530, 100],
            "Z": [2.7012, 0.3],
            "SOURCE_Z": ["VI", "PIPE"],
            "IS_QSO_FINAL": np.array([1, 1], dtype=np.int16),
        }
    )
    path = tmp_path / "DR16Q_v4.fits"
    t.write(path)
    return path


@pytest.fixture()
def lamost_q(tmp_path):
    """LAMOST DR4&5Q-like FITS with the published column names (MJD = UTC, not LMJD)."""
    t = Table(
        {
            "ObsID": np.array([677503031, 101001, 0], dtype=np.int64),
            "Designation": ["J013730.44+252537.7", "J000000.00+000000.0", "J055722.77+355459.7"],
            "RA": [24.376833, 50.0, 89.344875],
            "Dec": [25.427139, 20.0, 35.916583],
            "MJD": np.array([58396, 55858, 56256], dtype=np.int32),
            "planID": ["EG014118N254444M01", "F5902", "GAC089N38V2"],
            "spID": np.array([3, 1, 1], dtype=np.int16),
            "fiberID": np.array([31, 1, 1], dtype=np.int16),
            "z_vi": [1.2, 0.8, 2.2],
        }
    )
    path = tmp_path / "dr4dr5_qso.fits"
    t.write(path)
    return path


def test_dr14q_ids_including_duplicate_observations(dr14q):
    cat = load_catalog(dr14q)
    assert cat.kind == "sdss" and len(cat) == 3
    assert len(cat.keys) == 5  # 3 primary + 2 duplicates, no (-1, -1, -1) key
    meta = _meta(
        [
            {"survey": "sdss", "plate": 266, "mjd": 51602, "fiberid": 1, "ra": 10.0, "dec": 0.5},
            {"survey": "sdss", "plate": 7001, "mjd": 56801, "fiberid": 6, "ra": 123.0, "dec": -20.0},  # duplicate obs, elsewhere
            {"survey": "sdss", "plate": 7001, "mjd": 56801, "fiberid": 7, "ra": 123.0, "dec": -20.0},
            {"survey": "sdss", "plate": 4055, "mjd": 55359, "fiberid": 27, "ra": 30.0, "dec": -5.0},
        ]
    )
    out = label_spectra(meta, [cat])
    assert out["label"].tolist() == [1, 1, 0, 1]
    assert out["label"].dtype == np.int8
    assert out["label_source"].tolist() == ["id", "id", "none", "id"]
    assert out["catalog_name"].tolist() == ["DR14Q_v4_4.fits", "DR14Q_v4_4.fits", None, "DR14Q_v4_4.fits"]
    np.testing.assert_allclose(out["catalog_z"].to_numpy(), [1.5, 1.5, np.nan, 0.9])
    assert out.attrs["label_counts"]["id"] == 3 and out.attrs["label_counts"]["none"] == 1
    # The input columns are kept, the input frame untouched.
    assert list(out.columns[: len(meta.columns)]) == list(meta.columns) and "label" not in meta.columns


def test_catalogue_order_decides_which_name_a_label_carries(dr14q, dr16q):
    meta = _meta(
        [
            {"survey": "sdss", "plate": 3851, "mjd": 55302, "fiberid": 530, "ra": 15.0, "dec": 10.0},
            {"survey": "sdss", "plate": 8000, "mjd": 57000, "fiberid": 100, "ra": 200.0, "dec": 45.0},
        ]
    )
    c14, c16 = load_catalog(dr14q), load_catalog(dr16q)
    out = label_spectra(meta, [c16, c14])
    assert out["catalog_name"].tolist() == ["DR16Q_v4.fits", "DR16Q_v4.fits"]
    out = label_spectra(meta, [c14, c16])
    assert out["catalog_name"].tolist() == ["DR14Q_v4_4.fits", "DR16Q_v4.fits"]
    assert out["catalog_z"].tolist() == [2.701, 0.3]


def test_lamost_obsid_then_lmjd_key_then_position(lamost_q):
    cat = load_catalog(lamost_q)
    assert cat.kind == "lamost" and len(cat) == 3
    assert any("MJD + 1" in n for n in cat.notes)
    ra2, dec2 = _offset(89.344875, 35.916583, 1.0)
    meta = _meta(
        [
            # obsid matches; its lmjd deliberately disagrees: obsid wins.
            {
                "survey": "lamost",
                "obsid": 677503031,
                "lmjd": 12345,
                "planid": "X",
                "spid": 9,
                "fiberid": 9,
                "ra": 0.0,
                "dec": 0.0,
            },
            # DR1-era file without OBSID: (lmjd = MJD + 1, planid, spid, fiberid).
            {"survey": "lamost", "lmjd": 55859, "planid": "F5902", "spid": 1, "fiberid": 1, "ra": 0.0, "dec": 0.0},
            # Wrong lmjd for the 4-tuple, but 1 arcsec from the catalogue position.
            {"survey": "lamost", "lmjd": 56256, "planid": "GAC089N38V2", "spid": 1, "fiberid": 1, "ra": ra2, "dec": dec2},
            {"survey": "lamost", "lmjd": 56257, "planid": "GAC089N38V2", "spid": 1, "fiberid": 2, "ra": 1.0, "dec": 1.0},
        ]
    )
    out = label_spectra(meta, [cat])
    assert out["label_source"].tolist() == ["id", "id", "position", "none"]
    np.testing.assert_allclose(out["catalog_z"].to_numpy(), [1.2, 0.8, 2.2, np.nan])
    counts = out.attrs["label_counts"]
    assert (counts["id"], counts["position"], counts["none"]) == (2, 1, 1)
    assert counts["by_catalog"]["dr4dr5_qso.fits"] == {"id": 2, "position": 1}


def test_lamost_csv_with_lmjd_and_lower_case_aliases(tmp_path):
    path = tmp_path / "dr1q.csv"
    pd.DataFrame(
        {
            "obsid": [0],
            "lmjd": [55862],
            "planid": ["B6212"],
            "spid": [6],
            "fiberid": [3],
            "ra": [99.5],
            "dec": [27.3],
            "z_vi": [0.5],
        }
    ).to_csv(path, index=False)
    cat = load_catalog(path)
    assert cat.kind == "lamost" and not cat.notes and cat.rule == "quasar catalogue"
    meta = _meta(
        [
            {"survey": "lamost", "lmjd": 55862, "planid": "B6212", "spid": 6, "fiberid": 3, "ra": 0.0, "dec": 0.0},
            {"survey": "sdss", "plate": 55862, "mjd": 6, "fiberid": 3, "ra": 0.0, "dec": 0.0},
        ]
    )
    out = label_spectra(meta, [cat])
    assert out["label_source"].tolist() == ["id", "none"]


def test_sdss_ids_do_not_match_lamost_spectra(dr16q):
    meta = _meta([{"survey": "lamost", "plate": 3851, "mjd": 55302, "fiberid": 530, "ra": 0.0, "dec": 0.0}])
    assert label_spectra(meta, [load_catalog(dr16q)])["label"].tolist() == [0]


@pytest.mark.parametrize("ra,dec", [(150.0, 2.0), (359.9999, 0.3), (0.0001, -30.0), (45.0, 89.9995)])
def test_positional_fallback_radius(tmp_path, ra, dec):
    path = tmp_path / "q.fits"
    Table({"RA": [ra], "DEC": [dec], "PLATE": [1], "MJD": [2], "FIBERID": [3], "Z": [2.0]}).write(path)
    cat = load_catalog(path, all_quasars=True)
    inside = _offset(ra, dec, 1.4, pa_deg=100)
    outside = _offset(ra, dec, 1.6, pa_deg=250)
    meta = _meta(
        [
            {"survey": "sdss", "plate": 9, "mjd": 9, "fiberid": 9, "ra": inside[0], "dec": inside[1]},
            {"survey": "sdss", "plate": 9, "mjd": 9, "fiberid": 8, "ra": outside[0], "dec": outside[1]},
        ]
    )
    sep = SkyCoord(meta["ra"].to_numpy() * u.deg, meta["dec"].to_numpy() * u.deg).separation(SkyCoord(ra * u.deg, dec * u.deg))
    assert sep.arcsec[0] < 1.5 < sep.arcsec[1]
    out = label_spectra(meta, [cat], radius_arcsec=1.5)
    assert out["label_source"].tolist() == ["position", "none"]
    assert out["label"].tolist() == [1, 0]
    assert label_spectra(meta, [cat], radius_arcsec=None)["label"].tolist() == [0, 0]
    assert label_spectra(meta, [cat], radius_arcsec=2.0)["label"].tolist() == [1, 1]


def test_positional_matches_agree_with_astropy_at_scale(tmp_path):
    rng = np.random.default_rng(0)
    n_cat, n_spec = 20000, 100000
    ra_c = rng.uniform(0, 360, n_cat)
    dec_c = np.degrees(np.arcsin(rng.uniform(-1, 1, n_cat)))
    path = tmp_path / "q.fits"
    Table(
        {
            "RA": ra_c,
            "DEC": dec_c,
            "PLATE": np.arange(n_cat) + 1,
            "MJD": np.full(n_cat, 55000),
            "FIBERID": np.full(n_cat, 1),
            "Z": rng.uniform(0, 4, n_cat),
        }
    ).write(path)
    cat = load_catalog(path, all_quasars=True)
    # Half the spectra sit 0-3 arcsec from a catalogue quasar, half at random places; a tenth
    # of the near ones carry the quasar's own ids.
    near = rng.integers(0, n_cat, n_spec // 2)
    off = rng.uniform(0, 3, near.size) * ARCSEC
    pa = rng.uniform(0, 2 * np.pi, near.size)
    c = SkyCoord(ra_c[near] * u.deg, dec_c[near] * u.deg).directional_offset_by(pa * u.rad, off * u.deg)
    ra_s = np.concatenate([c.ra.deg, rng.uniform(0, 360, n_spec - near.size)])
    dec_s = np.concatenate([c.dec.deg, np.degrees(np.arcsin(rng.uniform(-1, 1, n_spec - near.size)))])
    plate = np.full(n_spec, 999999)
    with_ids = np.arange(0, near.size, 10)
    plate[with_ids] = near[with_ids] + 1
    meta = pd.DataFrame({"survey": "sdss", "plate": plate, "mjd": 55000, "fiberid": 1, "ra": ra_s, "dec": dec_s})
    out = label_spectra(meta, [cat], radius_arcsec=1.5)

    idx, sep, _ = match_coordinates_sky(SkyCoord(ra_s * u.deg, dec_s * u.deg), SkyCoord(ra_c * u.deg, dec_c * u.deg))
    by_id = np.zeros(n_spec, dtype=bool)
    by_id[with_ids] = True
    expect_pos = ~by_id & (sep.arcsec <= 1.5)
    src = out["label_source"].to_numpy()
    assert np.array_equal(src == "id", by_id)
    # Exactly-at-radius ties aside (measure zero here), the same spectra match.
    assert np.array_equal(src == "position", expect_pos)
    np.testing.assert_allclose(out["catalog_z"].to_numpy()[expect_pos], cat.objects["z"].to_numpy()[idx[expect_pos]])
    np.testing.assert_allclose(out["catalog_z"].to_numpy()[with_ids], cat.objects["z"].to_numpy()[near[with_ids]])
    assert out.attrs["label_counts"]["position"] == int(expect_pos.sum()) > 10000


def test_real_catalogue_files(real_data):
    cats = real_data / "catalogs"
    # An SDSS SkyServer row (astroquery test data): SDSS ids, case-insensitive 'fiberID', and
    # the DR7 numeric specClass (3 = QSO) that says the row is a quasar.
    xid = load_catalog(cats / "astroquery_sdss_xid.csv")
    assert xid.kind == "sdss" and xid.keys[["plate", "mjd", "fiberid"]].iloc[0].tolist() == [751, 52251, 160]
    assert xid.rule == "class column" and xid.class_counts == {"QSO": 1} and len(xid) == 1
    # LAMOST emission-line candidates: ids only in the file names (spec-LMJD-PLANID_spSS-FFF),
    # and nothing says they are quasars (they are emission-line stars): refused unless vouched for.
    with pytest.raises(CatalogError, match="candidates-catalogue.csv: cannot tell which rows are quasars.*--qso-catalog"):
        load_catalog(cats / "spectraml_candidates-catalogue.csv")
    cand = load_catalog(cats / "spectraml_candidates-catalogue.csv", all_quasars=True)
    assert cand.kind == "lamost" and len(cand) == 10 and cand.rule == "all rows (asked)"
    assert cand.keys.iloc[0][["lmjd", "planid", "spid", "fiberid"]].tolist() == [55960, "GAC_101N09_V2", 10, 57]
    # Hou et al. list: position only, with its objtype columns: ten HII regions, no quasar.
    hou = load_catalog(cats / "spectraml_hou-catalogue.csv")
    table = pd.read_csv(cats / "spectraml_hou-catalogue.csv")
    assert hou.kind == "positions" and len(hou) == 0 and hou.rows == len(table) == 10
    assert hou.class_counts == table["objtype_Hou"].value_counts().to_dict() == {"HII-region": 10}
    hou_all = load_catalog(cats / "spectraml_hou-catalogue.csv", kind="positions", all_quasars=True)
    assert len(hou_all) == 10 and hou_all.objects["z"].isna().all()
    ra, dec = _offset(table["ra"][3], table["dec"][3], 0.5)
    meta = _meta(
        [
            {"survey": "sdss", "plate": 751, "mjd": 52251, "fiberid": 160, "ra": 0.0, "dec": 0.0},
            {"survey": "lamost", "lmjd": 55960, "planid": "GAC_101N09_V2", "spid": 10, "fiberid": 57, "ra": 0.0, "dec": 0.0},
            {"survey": "lamost", "lmjd": 1, "planid": "P", "spid": 1, "fiberid": 1, "ra": ra, "dec": dec},
        ]
    )
    assert label_spectra(meta, [xid, cand, hou])["label_source"].tolist() == ["id", "id", "none"]
    out = label_spectra(meta, [xid, cand, hou_all])
    assert out["label_source"].tolist() == ["id", "id", "position"]
    assert out["catalog_name"].tolist() == [
        "astroquery_sdss_xid.csv",
        "spectraml_candidates-catalogue.csv",
        "spectraml_hou-catalogue.csv",
    ]
    assert out["catalog_z"].iloc[0] == pytest.approx(0.04541)


def _specobj_table(shared_data) -> Table:
    """A specObj-style table (PLATE, MJD, FIBERID, RA, DEC, CLASS, Z) built from the real files' own HDU2 rows."""
    from astropy.io import fits

    rows = []
    for path in sorted((shared_data / "sdss").glob("spec-*.fits")):
        with fits.open(path) as hdul:
            r = hdul[2].data[0]
            rows.append(
                (
                    int(r["PLATE"]),
                    int(r["MJD"]),
                    int(r["FIBERID"]),
                    float(r["PLUG_RA"]),
                    float(r["PLUG_DEC"]),
                    str(r["CLASS"]).strip(),
                    float(r["Z"]),
                )
            )
    return Table(rows=rows, names=["PLATE", "MJD", "FIBERID", "RA", "DEC", "CLASS", "Z"])


@pytest.mark.parametrize("ext", ["fits", "csv"])
def test_specobj_table_labels_only_its_qso_rows(shared_data, tmp_path, ext):
    t = _specobj_table(shared_data)
    path = tmp_path / f"specObj-excerpt.{ext}"
    t.write(path)
    cat = load_catalog(path)
    classes = list(t["CLASS"])
    assert cat.rule == "class column" and cat.rows == len(t)
    assert cat.class_counts == {c: classes.count(c) for c in set(classes)}
    assert {"GALAXY", "STAR", "QSO"} <= set(classes)
    assert len(cat) == classes.count("QSO")
    meta = _meta(
        [
            {
                "survey": "sdss",
                "plate": int(r["PLATE"]),
                "mjd": int(r["MJD"]),
                "fiberid": int(r["FIBERID"]),
                "ra": float(r["RA"]),
                "dec": float(r["DEC"]),
            }
            for r in t
        ]
    )
    out = label_spectra(meta, [cat])
    assert out["label"].tolist() == [int(c == "QSO") for c in classes]


def test_table_without_a_class_column_is_refused_unless_vouched_for(tmp_path):
    path = tmp_path / "my_list.fits"
    Table({"RA": [1.0, 2.0], "DEC": [3.0, 4.0], "PLATE": [1, 2], "MJD": [55000, 55001], "FIBERID": [1, 2]}).write(path)
    with pytest.raises(CatalogError, match="my_list.fits: cannot tell which rows are quasars.*--qso-catalog"):
        load_catalog(path)
    assert len(load_catalog(path, all_quasars=True)) == 2


def test_dr16q_superset_keeps_is_qso_final_1_and_ignores_class_person(tmp_path):
    path = tmp_path / "DR16Q_Superset_v3.fits"
    Table(
        {
            "RA": [1.0, 2.0, 3.0],
            "DEC": [0.0] * 3,
            "PLATE": [1, 2, 3],
            "MJD": [55000] * 3,
            "FIBERID": [1, 2, 3],
            "Z": [1.0, 2.0, 0.1],
            "CLASS_PERSON": np.array([3, -1, 4], dtype=np.int16),
            "IS_QSO_FINAL": np.array([1, 1, -1], dtype=np.int16),
        }
    ).write(path)
    cat = load_catalog(path)
    assert cat.rule == "is_qso_final" and len(cat) == 2 and cat.keys["plate"].tolist() == [1, 2]
    assert cat.class_counts == {"IS_QSO_FINAL=1": 2, "IS_QSO_FINAL=-1": 1}


def test_simulated_catalogues_are_recognised_as_quasar_catalogues(tmp_path):
    from spectransfer.simulate import simulate_survey

    for survey in ("sdss", "lamost"):
        res = simulate_survey(survey, 40, tmp_path / survey, seed=1, qso_fraction=0.5)
        cat = load_catalog(res.catalog)
        assert cat.kind == survey and cat.rule in ("quasar catalogue", "is_qso_final")
        assert len(cat) > 0 and len(cat) == cat.rows


def test_bad_catalogues_raise_catalog_error_naming_the_file(tmp_path):
    with pytest.raises(CatalogError, match="nope.fits.*does not exist"):
        load_catalog(tmp_path / "nope.fits")
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not a FITS file at all" * 100)
    with pytest.raises(CatalogError, match="junk.fits"):
        load_catalog(junk)
    no_ra = tmp_path / "no_ra.fits"
    Table({"DEC": [1.0], "PLATE": [1], "MJD": [2], "FIBERID": [3]}).write(no_ra)
    with pytest.raises(CatalogError, match="no_ra.fits.*lacks column.*ra"):
        load_catalog(no_ra)
    no_ids = tmp_path / "no_ids.csv"
    pd.DataFrame({"ra": [1.0], "dec": [2.0], "z": [1.0]}).to_csv(no_ids, index=False)
    numeric = tmp_path / "numeric.csv"
    pd.DataFrame({"ra": [1.0], "dec": [2.0], "plate": [1], "mjd": [2], "fiberid": [3], "class": [7]}).to_csv(numeric, index=False)
    with pytest.raises(CatalogError, match="numeric.csv: class column 'class' is numeric"):
        load_catalog(numeric)
    with pytest.raises(CatalogError, match="no_ids.csv.*not a recognised quasar catalogue"):
        load_catalog(no_ids)
    with pytest.raises(CatalogError, match="no_ids.csv.*lacks id column"):
        load_catalog(no_ids, kind="sdss")
    with pytest.raises(CatalogError, match="unknown catalogue kind"):
        load_catalog(no_ids, kind="gaia")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(b"\x00\x01\x02")
    with pytest.raises(CatalogError, match="bad.csv"):
        load_catalog(bad_csv)
