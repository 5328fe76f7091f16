"""The inspection API over real HTTP: a uvicorn server on a free 127.0.0.1 port, driven by httpx."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table

from spectransfer.config import DEFAULT_GRID
from spectransfer.data.store import open_store, write_store
from spectransfer.inspect import InspectError
from spectransfer.inspect.app import MAX_BODY, MAX_POINTS, create_app, downsample, load_candidates
from spectransfer.inspect.server import check_bind, running_server
from spectransfer.loopback import is_loopback

REAL_SDSS = "sdss/spec-7338-57859-0739.fits"  # BOSS quasar (SDSS-RM), z = 0.456, 4565 pixels
CATEGORIES = ["new_candidate", "missed_by_model", "agree_qso", "agree_other"]
CLASSES = ["GALAXY", "STAR", "QSO", None]


def build_inputs(folder: Path, n: int = 30, real_file: Path | None = None, seed: int = 1) -> tuple[Path, Path, pd.DataFrame]:
    """A tiny store and a candidates table (FITS + parquet) laid out as `discover` writes them."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, DEFAULT_GRID.n_bins)
    flux = np.clip(0.3 * np.sin(8 * x[None, :] + rng.uniform(0, 6, (n, 1))) + rng.normal(0, 0.05, (n, x.size)), -1, 1)
    ivar = rng.uniform(50, 400, (n, x.size))
    ivar[:, :15] = 0.0
    ids = [f"sdss-{1000 + i}-55000-{i + 1}" for i in range(n)]
    meta = pd.DataFrame(
        {"spectrum_id": ids, "survey": "sdss", "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-10, 70, n), "split": "test"}
    )
    store_path = folder / "store"
    write_store(store_path, flux.astype("f4"), ivar.astype("f4"), meta)
    p = rng.uniform(0, 0.9, n).astype("f4")
    p[:3] = [0.99, 0.97, 0.95]  # a known top of the queue
    source = [""] * n
    if real_file is not None:
        source[0] = str(real_file)
    source[1] = str(folder / "gone" / "spec-missing.fits")
    table = pd.DataFrame(
        {
            "SPECTRUM_ID": ids,
            "ROW": np.arange(n, dtype="i8"),
            "SURVEY": "sdss",
            "PLATE": 1000 + np.arange(n),
            "MJD": 55000,
            "FIBERID": np.arange(n) + 1,
            "RA": meta["ra"].to_numpy(),
            "DEC": meta["dec"].to_numpy(),
            "CLASS": [CLASSES[i % 4] or "" for i in range(n)],
            "SUBCLASS": "",
            "Z": np.where(np.arange(n) % 5 == 4, np.nan, rng.uniform(0, 4, n)),
            "CAT_LABEL": (np.arange(n) % 3 == 0).astype("i1"),
            "LABEL_SOURCE": ["id" if i % 3 == 0 else "none" for i in range(n)],
            "CATALOG_Z": np.where(np.arange(n) % 3 == 0, 1.5, np.nan),
            "P_QSO": p,
            "CATEGORY": [CATEGORIES[i % 4] for i in range(n)],
            "PIPE_NOT_QSO": [CLASSES[i % 4] in ("GALAXY", "STAR") for i in range(n)],
            "SOURCE_FILE": source,
        }
    )
    if real_file is not None:
        table.loc[0, ["PLATE", "MJD", "FIBERID", "CLASS", "Z"]] = [7338, 57859, 739, "QSO", 0.4565]
    cand = folder / "candidates.fits"
    t = Table.from_pandas(table)
    t.meta["EXTNAME"] = "CANDIDATES"
    hdu = fits.table_to_hdu(t)
    hdu.name = "CANDIDATES"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(cand)
    table.to_parquet(cand.with_suffix(".parquet"), index=False)
    return cand, store_path, table


def dump(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    try:
        return list(con.execute("SELECT * FROM verdicts ORDER BY spectrum_id, inspector"))
    finally:
        con.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, real_data):
    folder = tmp_path_factory.mktemp("inspect")
    return build_inputs(folder, real_file=real_data / REAL_SDSS)


@pytest.fixture(scope="module")
def server(inputs, tmp_path_factory):
    cand, store_path, table = inputs
    db = tmp_path_factory.mktemp("db") / "verdicts.sqlite"
    app = create_app(cand, open_store(store_path), db)
    with running_server(app) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, db, table


# ---- candidates --------------------------------------------------------------------------------


def expected_ids(table: pd.DataFrame, mask: np.ndarray) -> list[str]:
    sub = table[mask].copy()
    sub["P"] = sub["P_QSO"].astype("f8")
    return sub.sort_values(["P", "SPECTRUM_ID"], ascending=[False, True])["SPECTRUM_ID"].tolist()


def test_queue_is_sorted_by_probability_and_filtered(server):
    client, _, table = server
    r = client.get("/api/candidates", params={"limit": 500})
    assert r.status_code == 200
    got = [it["id"] for it in r.json()["items"]]
    assert got == expected_ids(table, np.ones(len(table), bool))
    assert got[:3] == table["SPECTRUM_ID"][:3].tolist()
    r = client.get(
        "/api/candidates",
        params={"category": "new_candidate,agree_qso", "pipeline_class": "GALAXY,QSO", "p_min": 0.2, "p_max": 0.98},
    )
    mask = table["CATEGORY"].isin(["new_candidate", "agree_qso"]) & table["CLASS"].isin(["GALAXY", "QSO"])
    mask &= (table["P_QSO"] >= np.float32(0.2)) & (table["P_QSO"] <= np.float32(0.98))
    body = r.json()
    assert [it["id"] for it in body["items"]] == expected_ids(table, mask.to_numpy())
    assert body["total"] == int(mask.sum())
    none = client.get("/api/candidates", params={"pipeline_class": "none"}).json()
    assert none["total"] == int((table["CLASS"] == "").sum()) > 0


def test_paging_covers_the_queue_once(server):
    client, _, table = server
    pages = [client.get("/api/candidates", params={"offset": o, "limit": 7}).json() for o in range(0, len(table), 7)]
    ids = [it["id"] for p in pages for it in p["items"]]
    assert ids == expected_ids(table, np.ones(len(table), bool))
    assert all(p["total"] == len(table) for p in pages)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 501},
        {"limit": 0},
        {"offset": -1},
        {"category": "nonsense"},
        {"pipeline_class": "ALIEN"},
        {"p_min": 0.9, "p_max": 0.1},
        {"p_min": 1.5},
        {"p_max": "nan"},
        {"status": "maybe"},
    ],
)
def test_bad_queries_get_4xx_with_a_reason(server, params):
    client, _, _ = server
    r = client.get("/api/candidates", params=params)
    assert 400 <= r.status_code < 500
    assert r.json()["detail"]


def test_candidates_from_fits_alone_match_the_parquet(inputs, tmp_path):
    cand, _, table = inputs
    lone = tmp_path / "candidates.fits"
    lone.write_bytes(cand.read_bytes())
    a = load_candidates(lone)  # no parquet beside it: FITS path
    b = load_candidates(cand)
    assert a["SPECTRUM_ID"].tolist() == b["SPECTRUM_ID"].tolist()
    np.testing.assert_array_equal(a["P_QSO"].to_numpy(), b["P_QSO"].to_numpy())
    assert a["CLASS"].tolist() == b["CLASS"].tolist()
    with pytest.raises(InspectError, match="not found"):
        load_candidates(tmp_path / "nope.fits")
    (tmp_path / "junk.fits").write_bytes(b"junk" * 100)
    with pytest.raises(InspectError, match="junk.fits"):
        load_candidates(tmp_path / "junk.fits")


# ---- spectra -----------------------------------------------------------------------------------


def test_spectrum_from_the_original_file_matches_astropy(server, real_data):
    client, _, table = server
    r = client.get(f"/api/spectrum/{table['SPECTRUM_ID'][0]}")
    assert r.status_code == 200
    s = r.json()
    assert s["source"] == "original"
    assert s["z_pipeline"] == pytest.approx(0.4565)
    with fits.open(real_data / REAL_SDSS) as hdul:
        coadd = hdul[1].data
        wave = 10.0 ** coadd["loglam"].astype("f8")
        flux = coadd["flux"].astype("f8")
        ivar = coadd["ivar"].astype("f8")
    assert len(s["wave"]) == len(wave) <= MAX_POINTS
    np.testing.assert_allclose(s["wave"], wave, atol=1e-3)
    np.testing.assert_allclose(s["flux"], flux, rtol=1e-5, atol=1e-6)
    # Pixels the reader masks (its choice of and_mask bits) are sent with ivar 0; the others as in the file.
    got_ivar = np.array(s["ivar"])
    assert np.all(got_ivar[ivar == 0] == 0)
    keep = got_ivar > 0
    assert keep.sum() > 0.5 * len(keep)
    np.testing.assert_allclose(got_ivar[keep], ivar[keep], rtol=1e-5)


def test_spectrum_falls_back_to_the_store(server, inputs):
    client, _, table = server
    store = open_store(inputs[1])
    for i in (1, 5):  # 1: SOURCE_FILE names a missing file; 5: no SOURCE_FILE at all
        s = client.get(f"/api/spectrum/{table['SPECTRUM_ID'][i]}").json()
        assert s["source"] == "resampled"
        np.testing.assert_allclose(s["wave"], DEFAULT_GRID.centers, atol=1e-3)
        np.testing.assert_allclose(s["flux"], store.flux[i], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s["ivar"], store.ivar[i], rtol=1e-5)
        assert (s["note"] is not None) == (i == 1)


def test_unknown_spectrum_is_404(server):
    client, _, _ = server
    for sid in ("sdss-0-0-0", "..%2F..%2Fetc%2Fpasswd", "x" * 300):
        r = client.get(f"/api/spectrum/{sid}")
        assert r.status_code == 404 and r.json()["detail"]


def test_downsample_keeps_weighted_sums():
    rng = np.random.default_rng(3)
    n = 12_345
    wave = np.linspace(3600, 10400, n)
    flux = rng.normal(5, 1, n)
    ivar = rng.uniform(0, 4, n)
    ivar[100:300] = 0
    w, f, iv, k = downsample(wave, flux, ivar)
    assert len(w) <= MAX_POINTS and k == 3
    np.testing.assert_allclose(iv.sum(), ivar.sum())
    np.testing.assert_allclose((f * iv).sum(), (flux * ivar).sum())
    np.testing.assert_allclose(w[:2], [wave[:3].mean(), wave[3:6].mean()])
    assert np.all(np.diff(w) > 0)
    w2, f2, iv2, k2 = downsample(wave[:4000], flux[:4000], ivar[:4000])
    assert k2 == 1 and w2 is not None and np.array_equal(f2, flux[:4000])


# ---- verdicts ----------------------------------------------------------------------------------


def test_verdict_is_stored_and_replaced(server):
    client, db, table = server
    sid = table["SPECTRUM_ID"][2]
    r = client.post("/api/verdicts", json={"id": sid, "verdict": "qso", "z": 2.5, "inspector": "api-ann"})
    assert r.status_code == 201
    r = client.post("/api/verdicts", json={"id": sid, "verdict": "unsure", "inspector": "api-ann"})
    assert r.status_code == 201
    client.post("/api/verdicts", json={"id": sid, "verdict": "not_qso", "inspector": "api-bob"})
    mine = {(row[0], row[3]): (row[1], row[2]) for row in dump(db) if row[3].startswith("api-")}
    assert mine == {(sid, "api-ann"): ("unsure", None), (sid, "api-bob"): ("not_qso", None)}
    listed = client.get("/api/verdicts", params={"inspector": "api-bob"}).json()
    assert [(v["spectrum_id"], v["verdict"]) for v in listed["items"]] == [(sid, "not_qso")]
    q = client.get("/api/candidates", params={"inspector": "api-bob", "status": "done"}).json()
    assert [it["id"] for it in q["items"]] == [sid] and q["items"][0]["verdict"] == "not_qso"
    todo = client.get("/api/candidates", params={"inspector": "api-bob", "status": "todo", "limit": 500}).json()
    assert sid not in [it["id"] for it in todo["items"]] and todo["total"] == len(table) - 1
    assert client.get("/api/candidates", params={"inspector": "api-bob"}).json()["inspected"] == 1


GOOD = {"id": None, "verdict": "qso", "inspector": "mallory"}


@pytest.mark.parametrize(
    "body, ctype",
    [
        ("not json at all", "application/json"),
        ('{"id": "ID", "verdict": "qso", "inspector": "mallory"}', "text/plain"),
        ('[{"id": "ID", "verdict": "qso", "inspector": "mallory"}]', "application/json"),
        ({"verdict": "qso", "inspector": "mallory"}, None),
        ({"id": "ID", "inspector": "mallory"}, None),
        ({"id": "ID", "verdict": "qso"}, None),
        ({"id": "ID", "verdict": "QSO", "inspector": "mallory"}, None),
        ({"id": "ID", "verdict": "probably", "inspector": "mallory"}, None),
        ({"id": "ID", "verdict": "qso", "inspector": ""}, None),
        ({"id": "ID", "verdict": "qso", "inspector": "   "}, None),
        ({"id": "ID", "verdict": "qso", "inspector": "bad\nname"}, None),
        ({"id": "ID", "verdict": "qso", "inspector": "x" * 65}, None),
        ({"id": "ID", "verdict": "qso", "inspector": "mallory", "z": "NaN"}, None),
        ('{"id": "ID", "verdict": "qso", "inspector": "mallory", "z": Infinity}', "application/json"),
        ({"id": "ID", "verdict": "qso", "inspector": "mallory", "z": 42}, None),
        ({"id": "ID", "verdict": "qso", "inspector": "mallory", "z": "two"}, None),
        ({"id": "ID", "verdict": "qso", "inspector": "mallory", "path": "/etc/passwd"}, None),
        ({"id": 7, "verdict": "qso", "inspector": "mallory"}, None),
        ({"id": "sdss-0-0-0", "verdict": "qso", "inspector": "mallory"}, None),
        ({"id": "../../etc/passwd", "verdict": "qso", "inspector": "mallory"}, None),
        ({"id": "", "verdict": "qso", "inspector": "mallory"}, None),
    ],
)
def test_malformed_verdicts_get_4xx_and_change_nothing(server, body, ctype):
    client, db, table = server
    sid = table["SPECTRUM_ID"][3]
    before = dump(db)
    if isinstance(body, dict):
        r = client.post("/api/verdicts", json={k: (sid if v == "ID" else v) for k, v in body.items()})
    else:
        r = client.post("/api/verdicts", content=body.replace("ID", sid), headers={"Content-Type": ctype})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["detail"]
    assert dump(db) == before


def test_concurrent_posts_lose_nothing(server):
    client, db, table = server
    ids = table["SPECTRUM_ID"].tolist()[:25]
    verdicts = ["qso", "not_qso", "unsure"]
    errors: list[str] = []

    def worker(t: int) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            for j, sid in enumerate(ids):
                r = c.post(
                    "/api/verdicts", json={"id": sid, "verdict": verdicts[(t + j) % 3], "z": 0.01 * j, "inspector": f"thread-{t}"}
                )
                if r.status_code != 201:
                    errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    rows = [r for r in dump(db) if r[3].startswith("thread-")]
    assert len(rows) == 8 * 25
    want = {(sid, f"thread-{t}"): (verdicts[(t + j) % 3], pytest.approx(0.01 * j)) for t in range(8) for j, sid in enumerate(ids)}
    assert {(r[0], r[3]): (r[1], r[2]) for r in rows} == want


# ---- safety ------------------------------------------------------------------------------------


def test_token_is_required_on_every_request(inputs, tmp_path):
    cand, store_path, table = inputs
    token = "s3cret-token-for-tests"
    db = tmp_path / "v.sqlite"
    app = create_app(cand, open_store(store_path), db, token=token)
    sid = table["SPECTRUM_ID"][0]
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        for path in ("/", "/static/app.js", "/api/info", "/api/candidates", f"/api/spectrum/{sid}", "/api/verdicts"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"X-Token": "wrong-token-123"}).status_code == 401, path
        r = c.post("/api/verdicts", json={"id": sid, "verdict": "qso", "inspector": "eve"})
        assert r.status_code == 401 and "token" in r.json()["detail"]
        assert dump(db) == []
        assert c.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/api/info", headers={"X-Token": token}).status_code == 200
        page = c.get("/", params={"token": token})
        assert page.status_code == 200
        assert f"static/app.js?token={token}" in page.text and f"static/style.css?token={token}" in page.text
        assert c.get("/static/app.js", params={"token": token}).status_code == 200
        r = c.post("/api/verdicts", json={"id": sid, "verdict": "qso", "inspector": "ann"}, headers={"X-Token": token})
        assert r.status_code == 201
        assert [row[:2] for row in dump(db)] == [(sid, "qso")]


def test_foreign_host_header_is_refused_on_loopback(server):
    client, _, _ = server
    assert client.get("/api/info", headers={"Host": "attacker.example:8000"}).status_code == 400
    assert client.get("/api/info").status_code == 200


def test_binding_beyond_loopback_needs_a_token(inputs):
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    with pytest.raises(InspectError, match="--token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "a-long-enough-token")
    with pytest.raises(InspectError, match="8 characters"):
        create_app(inputs[0], None, inputs[0].parent / "t.sqlite", token="short")


def test_cli_inspect_serves_and_refuses_open_bind(inputs, tmp_path):
    cand, store_path, table = inputs
    cmd = [
        sys.executable,
        "-m",
        "spectransfer",
        "inspect",
        str(cand),
        "--store",
        str(store_path),
        "--db",
        str(tmp_path / "v.sqlite"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "SPECTRANSFER_TOKEN"}
    bad = subprocess.run(cmd + ["--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--token" in bad.stderr and bad.stderr.strip().count("\n") == 0
    proc = subprocess.Popen(
        cmd + ["--port", "0", "--category", "new_candidate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split("at ", 1)[1].split()[0]
        info = httpx.get(url + "api/info", timeout=30).json()
        assert info["n_candidates"] == len(table) and info["default_category"] == "new_candidate"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- hardening: every loopback address guarded, headers, body size, ids with '/' ---------------


def test_one_loopback_check_covers_every_loopback_address():
    yes = ["127.0.0.1", "127.0.0.2", "127.255.255.254", "localhost", "LOCALHOST.", "::1", "[::1]", "::ffff:127.0.0.1"]
    no = ["0.0.0.0", "10.0.0.1", "::", "128.0.0.1", "localhost.example.com", "attacker.example", "", "1.2.3.4"]
    assert all(is_loopback(h) for h in yes)
    assert not any(is_loopback(h) for h in no)
    for host in ("127.0.0.2", "::1"):
        check_bind(host, None)  # loopback: no token needed ...


def _free_on(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.2", "::1"])
def test_cli_on_any_loopback_address_refuses_a_forged_host(inputs, tmp_path, host):
    """... but then the DNS-rebinding guard must hold there too (it once covered 127.0.0.1 only)."""
    if not _free_on(host):
        pytest.skip(f"cannot bind {host} here")
    cand, store_path, _ = inputs
    env = {k: v for k, v in os.environ.items() if k != "SPECTRANSFER_TOKEN"}
    cmd = [
        sys.executable,
        "-m",
        "spectransfer",
        "inspect",
        str(cand),
        "--db",
        str(tmp_path / "v.sqlite"),
        "--host",
        host,
        "--port",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "http://" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split("at ", 1)[1].split()[0]
        assert httpx.get(url + "api/info", timeout=30).status_code == 200
        forged = httpx.get(url + "api/info", headers={"Host": "attacker.example"}, timeout=30)
        assert forged.status_code == 400 and "Host" in forged.json()["detail"]
        assert forged.headers["x-content-type-options"] == "nosniff"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_security_headers_on_every_response(server):
    client, _, _ = server
    for r in (
        client.get("/"),
        client.get("/api/info"),
        client.get("/static/app.js"),
        client.get("/api/spectrum/nope"),
        client.get("/api/info", headers={"Host": "attacker.example"}),
        client.post("/api/verdicts", json={}),
    ):
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["x-frame-options"] == "DENY"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp


def test_large_bodies_are_refused_before_they_are_read(server):
    client, db, _ = server
    before = dump(db)
    big = b'{"id": "' + b"x" * (MAX_BODY + 10) + b'"}'
    r = client.post("/api/verdicts", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413

    def stream():  # no Content-Length: chunked, counted as it arrives
        yield b'{"id": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = client.post("/api/verdicts", content=stream(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]
    assert dump(db) == before


def test_ids_with_a_slash_can_be_opened(tmp_path):
    table = pd.DataFrame(
        {"SPECTRUM_ID": ["lamost-1/2", "plain"], "P_QSO": [0.9, 0.1], "CATEGORY": ["new_candidate", "agree_other"]}
    )
    app = create_app(table, None, tmp_path / "v.sqlite")
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.get("/api/spectrum/lamost-1%2F2")
        assert r.status_code == 404 and "no spectrum available for 'lamost-1/2'" in r.json()["detail"]
        r = client.post("/api/verdicts", json={"id": "lamost-1/2", "verdict": "qso", "inspector": "ann"})
        assert r.status_code == 201
        assert client.get("/api/spectrum/unknown%2Fid").json()["detail"].startswith("unknown spectrum id")


# ---- a survey-sized queue, served from disk -----------------------------------------------------


def test_a_store_sized_queue_pages_filters_and_sorts_from_disk_with_flat_memory(tmp_path):
    """200k candidates: the answers are those of pandas on the whole table, and serving them holds a
    page, not the table (tracemalloc peak well below the table's own size)."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq
    from fastapi.testclient import TestClient

    n = 200_000
    rng = np.random.default_rng(7)
    table = pd.DataFrame(
        {
            "SPECTRUM_ID": [f"lamost-{i:07d}" for i in rng.permutation(n)],
            "P_QSO": np.round(rng.random(n), 3).astype("f4"),  # rounded: many ties, ordered by id
            "CATEGORY": rng.choice(CATEGORIES, n),
            "CLASS": rng.choice(["GALAXY", "STAR", "QSO", ""], n),
            "RA": rng.uniform(0, 360, n),
            "ROW": np.arange(n, dtype="i8"),
            "PIPE_NOT_QSO": rng.random(n) < 0.1,
            "SOURCE_FILE": [f"spec-{i}.fits" for i in range(n)],
        }
    )
    cand = tmp_path / "cand.parquet"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), cand, row_group_size=20_000)
    table["P"] = table["P_QSO"].astype("f8")
    order = table.sort_values(["P", "SPECTRUM_ID"], ascending=[False, True])

    full = int(table.memory_usage(deep=True).sum())
    tracemalloc.start()
    try:
        app = create_app(cand, None, tmp_path / "v.sqlite")  # builds the queue file beside the table, in blocks
        build_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert build_peak < full / 4, (build_peak, full)
    assert (tmp_path / "cand.parquet.queue.sqlite").is_file()
    client = TestClient(app, base_url="http://127.0.0.1")
    client.post("/api/verdicts", json={"id": order["SPECTRUM_ID"].iloc[1], "verdict": "qso", "inspector": "ann"})
    queries = [
        ({"offset": 0, "limit": 500}, np.ones(n, bool)),
        ({"offset": 150_000, "limit": 37}, np.ones(n, bool)),
        (
            {
                "category": "new_candidate,agree_qso",
                "pipeline_class": "STAR,none",
                "p_min": 0.25,
                "p_max": 0.75,
                "offset": 1000,
                "limit": 100,
            },
            (
                order["CATEGORY"].isin(["new_candidate", "agree_qso"])
                & order["CLASS"].isin(["STAR", ""])
                & (order["P"] >= 0.25)
                & (order["P"] <= 0.75)
            ).to_numpy(),
        ),
    ]
    tracemalloc.start()
    try:
        for params, mask in queries:
            body = client.get("/api/candidates", params=params).json()
            want = order[mask]
            assert body["total"] == len(want)
            sl = want.iloc[params["offset"] : params["offset"] + params["limit"]]
            assert [it["id"] for it in body["items"]] == sl["SPECTRUM_ID"].tolist()
            assert [it["p_qso"] for it in body["items"]] == [float(p) for p in sl["P_QSO"]]
            assert [it["class"] for it in body["items"]] == [c or None for c in sl["CLASS"]]
            assert [it["pipe_not_qso"] for it in body["items"]] == sl["PIPE_NOT_QSO"].tolist()
        todo = client.get("/api/candidates", params={"status": "todo", "limit": 2}).json()
        assert todo["total"] == n - 1 and todo["inspected"] == 1
        assert [it["id"] for it in todo["items"]] == [order["SPECTRUM_ID"].iloc[0], order["SPECTRUM_ID"].iloc[2]]
        info = client.get("/api/info").json()
        assert (
            info["n_candidates"] == n
            and info["categories"] == table["CATEGORY"].value_counts().reindex(CATEGORIES, fill_value=0).to_dict()
        )
        assert info["pipeline_classes"] == ["GALAXY", "QSO", "STAR"]
        sid = order["SPECTRUM_ID"].iloc[123_456]
        assert client.get(f"/api/spectrum/{sid}").status_code == 404  # known id, no file, no store: a reason
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full / 4, (peak, full)  # a 500-row page and its JSON, not the 200k rows

    stamp = (tmp_path / "cand.parquet.queue.sqlite").stat().st_mtime_ns
    create_app(cand, None, tmp_path / "v.sqlite")  # unchanged table: the queue file is reused
    assert (tmp_path / "cand.parquet.queue.sqlite").stat().st_mtime_ns == stamp
