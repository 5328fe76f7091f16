"""spectransfer fetch against a real HTTP server on 127.0.0.1 serving real SDSS/LAMOST files (tests/data).

The server (http.server, Range support written here) can drop a connection half way, answer
slowly, serve a corrupt body, ignore Range requests and require a token; it counts GETs per
path and the largest number of requests in flight, so the tests can check what the client
did, not only what it wrote.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.table import Table

from spectransfer.data.fetch import (
    CATALOGS,
    _signature_problem,
    catalog_items,
    fetch,
    fits_truncation,
    lamost_items,
    read_manifest,
    sdss_items,
    sdss_spectrum_path,
)
from spectransfer.errors import FetchError

from conftest import real_files

SPEC_NAME = re.compile(r"spec-(\d{4})-(\d{5})-(\d{4})\.fits$")


class SasServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.lock = threading.Lock()
        self.gets: collections.Counter[str] = collections.Counter()
        self.ranges: list[tuple[str, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.drop_once: set[str] = set()
        self.slow: dict[str, float] = {}
        self.errors_before_ok: dict[str, int] = {}
        self.trickle: set[str] = set()  # paths sent in small pieces, slowly
        self.corrupt: dict[str, bytes] = {}
        self.short: dict[str, list] = {}  # path -> [mode 'close'|'chunked', times]: a short body, no length
        self.ignore_range = False
        self.delay = 0.0
        self.token: str | None = None
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset_counts(self) -> None:
        with self.lock:
            self.gets.clear()
            self.ranges.clear()


class _Handler(BaseHTTPRequestHandler):
    server: SasServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        srv = self.server
        path, _, query = self.path.partition("?")
        with srv.lock:
            srv.gets[path] += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            self._answer(srv, path, query)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _plain(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _answer(self, srv: SasServer, path: str, query: str) -> None:
        if srv.token is not None and f"token={srv.token}" not in query.split("&"):
            return self._plain(403)
        if srv.errors_before_ok.get(path, 0) > 0:
            srv.errors_before_ok[path] -= 1
            return self._plain(503)
        if path in srv.slow:
            srv.release.wait(srv.slow[path])
        if srv.delay:
            time.sleep(srv.delay)
        body = srv.corrupt.get(path, srv.files.get(path))
        if body is None:
            return self._plain(404)
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            assert m, rng
            start = int(m.group(1))
            with srv.lock:
                srv.ranges.append((path, start))
            if start >= len(body):
                return self._plain(416)
        payload = body[start:]
        short = srv.short.get(path)
        if short is not None and short[1] > 0:
            short[1] -= 1
            return self._short_body(short[0], start, body, payload)
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/fits")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if path in srv.drop_once:
            srv.drop_once.discard(path)
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True  # the rest never comes
            return
        if path in srv.trickle:
            for i in range(0, len(payload), 8192):
                if srv.release.wait(0.05):
                    return
                self.wfile.write(payload[i : i + 8192])
                self.wfile.flush()
            return
        self.wfile.write(payload)

    def _short_body(self, mode: str, start: int, body: bytes, payload: bytes) -> None:
        """Half the payload and no Content-Length: closed early, or a well-formed but short chunked body."""
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/fits")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        half = payload[: len(payload) // 2]
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n0\r\n\r\n")
        else:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(half)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def sdss_files() -> dict[str, bytes]:
    """URL path -> bytes of every real spec file (tests/data, plus ../shared/data when present), in the
    dr16 SAS layout. With the in-repo files alone (7) each is also served as further fibres of its
    plate, so there are 15 paths: a download checks size, signature and sha256, not the ids inside."""
    real = [f for f in real_files("sdss") if SPEC_NAME.search(f.name)]
    files = {}

    def add(f: Path, plate: int, mjd: int, fiber: int) -> None:
        run2d = "26" if plate < 3500 else "v5_13_0"
        files["/sas/" + sdss_spectrum_path("dr16", plate, mjd, fiber, run2d)] = f.read_bytes()

    for f in real:
        add(f, *(int(x) for x in SPEC_NAME.search(f.name).groups()))
    for k in range(15 - len(files)):
        f = real[k % len(real)]
        plate, mjd, _ = (int(x) for x in SPEC_NAME.search(f.name).groups())
        add(f, plate, mjd, 600 + k)
    assert len(files) >= 15
    return files


@pytest.fixture
def server(sdss_files: dict[str, bytes]):
    srv = SasServer(sdss_files)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _ids(url_path: str) -> tuple[int, int, int]:
    return tuple(int(x) for x in SPEC_NAME.search(url_path).groups())  # type: ignore[return-value]


def _write_list(path: Path, url_paths: list[str], extra: list[tuple[int, int, int]] = ()) -> Path:
    rows = [_ids(p) for p in url_paths] + list(extra)
    path.write_text("plate,mjd,fiberid\n" + "".join(f"{p},{m},{f}\n" for p, m, f in rows))
    return path


def _smallest(files: dict[str, bytes], n: int) -> list[str]:
    return sorted(files, key=lambda p: len(files[p]))[:n]


def _rel(url_path: str) -> str:
    return url_path[len("/sas/") :]


def _run(server: SasServer, items, dest: Path, **kw):
    kw.setdefault("jobs", 4)
    kw.setdefault("retries", 3)
    kw.setdefault("timeout", 10.0)
    kw.setdefault("backoff", 0.01)
    return fetch(items, dest, **kw)


# ---- planning ------------------------------------------------------------------------------------


def test_sdss_urls_follow_the_sas_layout(tmp_path: Path) -> None:
    lst = tmp_path / "l.csv"
    lst.write_text("PLATE,MJD,FiberID\n4055,55359,596\n266,51602,1\n")
    eboss, legacy = sdss_items(lst, release="dr16")
    assert eboss.targets[0].url == (
        "https://data.sdss.org/sas/dr16/eboss/spectro/redux/v5_13_0/spectra/lite/4055/spec-4055-55359-0596.fits"
    )
    assert eboss.targets[0].path == "dr16/eboss/spectro/redux/v5_13_0/spectra/lite/4055/spec-4055-55359-0596.fits"
    assert [t.url.split("/redux/")[1].split("/")[0] for t in legacy.targets] == ["26", "103", "104"]
    assert (
        legacy.targets[0].url
        == "https://data.sdss.org/sas/dr16/sdss/spectro/redux/26/spectra/lite/0266/spec-0266-51602-0001.fits"
    )
    assert sdss_items(lst, release="dr17")[0].targets[0].path.startswith("dr17/eboss/spectro/redux/v5_13_2/")
    assert catalog_items("dr16q")[0].targets[0].url == "https://data.sdss.org/sas/dr16/eboss/qso/DR16Q/DR16Q_v4.fits"
    assert catalog_items("dr14q")[0].targets[0].url == "https://data.sdss.org/sas/dr14/eboss/qso/DR14Q/DR14Q_v4_4.fits"
    assert catalog_items("specobj")[0].targets[0].url == "https://data.sdss.org/sas/dr16/sdss/spectro/redux/specObj-dr16.fits"
    with pytest.raises(FetchError, match="release"):
        sdss_items(lst, release="dr99")


def test_real_skyserver_row_plans_the_legacy_folders(real_data: Path) -> None:
    # astroquery's SkyServer test row: columns plate, mjd, fiberID (mixed case), an SDSS-I plate
    (item,) = sdss_items(real_data / "catalogs" / "astroquery_sdss_xid.csv")
    assert item.key == "spec-0751-52251-0160.fits"
    assert item.targets[0].path == "dr16/sdss/spectro/redux/26/spectra/lite/0751/spec-0751-52251-0160.fits"


def test_fits_list_with_upper_case_columns_and_run2d(tmp_path: Path) -> None:
    lst = tmp_path / "dr16q_cut.fits"
    Table(
        {"PLATE": [266, 7457, 266], "MJD": [51630, 56746, 51630], "FIBERID": [4, 1, 4], "RUN2D": ["103", "v5_13_0", "103"]}
    ).write(lst)
    items = sdss_items(lst)
    assert len(items) == 2  # the duplicate row is fetched once
    assert [len(i.targets) for i in items] == [1, 1]
    assert "/sdss/spectro/redux/103/spectra/lite/0266/spec-0266-51630-0004.fits" in items[0].targets[0].url
    assert "/eboss/spectro/redux/v5_13_0/spectra/lite/7457/spec-7457-56746-0001.fits" in items[1].targets[0].url
    bad = tmp_path / "bad.csv"
    bad.write_text("plate,mjd\n1,2\n")
    with pytest.raises(FetchError, match="bad.csv: list has no column fiberid"):
        sdss_items(bad)
    evil = tmp_path / "evil.csv"
    evil.write_text("plate,mjd,fiberid,run2d\n1,2,3,../../x\n")
    with pytest.raises(FetchError, match="RUN2D"):
        sdss_items(evil)


def test_signature_check_reads_fits_and_gzipped_fits(real_data: Path) -> None:
    body = (real_data / "sdss" / "spec-0266-51602-0001.fits").read_bytes()
    gz_head = gzip.compress(body)[:2880]
    assert _signature_problem(body[:2880], "fits") is None
    assert _signature_problem(gz_head, "gz") is None and _signature_problem(gz_head, "any") is None
    assert "not a FITS file" in _signature_problem(gz_head, "fits")
    assert "not gzip" in _signature_problem(body[:2880], "gz")
    assert "does not hold a FITS file" in _signature_problem(gzip.compress(b"<html>" * 500)[:2880], "any")
    assert "corrupt gzip" in _signature_problem(b"\x1f\x8b" + b"\0" * 200, "any")
    assert "neither" in _signature_problem(b"<html>", "any")


# ---- downloads -----------------------------------------------------------------------------------


def test_fetch_is_byte_identical_in_the_same_layout(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    lst = _write_list(tmp_path / "list.csv", list(sdss_files))
    dest = tmp_path / "dest"
    summary = _run(server, sdss_items(lst, base_url=server.url + "/sas"), dest)
    assert (summary.fetched, summary.skipped, summary.missing, summary.failed) == (len(sdss_files), 0, 0, 0)
    assert summary.bytes == sum(len(b) for b in sdss_files.values())
    manifest = read_manifest(dest)
    for url_path, body in sdss_files.items():
        local = dest / _rel(url_path)
        assert local.read_bytes() == body
        rec = manifest[local.name]
        assert rec["status"] == "fetched" and rec["path"] == _rel(url_path)
        assert rec["size"] == len(body) and rec["sha256"] == hashlib.sha256(body).hexdigest()
    assert not list(dest.rglob("*.part"))
    assert set(server.gets.values()) == {1}
    with fits.open(dest / _rel(_smallest(sdss_files, 1)[0])) as hdul:  # astropy reads what we wrote
        assert hdul[1].columns.names[:2] == ["flux", "loglam"]


def test_dropped_connection_completes_on_resume(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    path = max(sdss_files, key=lambda p: len(sdss_files[p]))
    server.drop_once.add(path)
    lst = _write_list(tmp_path / "list.csv", [path])
    dest = tmp_path / "dest"
    summary = _run(server, sdss_items(lst, base_url=server.url + "/sas"), dest)
    assert summary.fetched == 1 and summary.results[0].attempts == 2
    assert (dest / _rel(path)).read_bytes() == sdss_files[path]
    assert server.gets[path] == 2
    # the second request asked only for what was missing
    assert len(server.ranges) == 1 and 0 < server.ranges[0][1] < len(sdss_files[path])


@pytest.mark.parametrize("mode", ["close", "chunked"])
def test_short_body_without_length_is_never_kept(
    server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path, mode: str
) -> None:
    """A body cut short with no Content-Length is caught by the FITS headers' own size."""
    path = max(sdss_files, key=lambda p: len(sdss_files[p]))
    server.short[path] = [mode, 99]
    lst = _write_list(tmp_path / "list.csv", [path])
    dest = tmp_path / "dest"
    summary = _run(server, sdss_items(lst, base_url=server.url + "/sas"), dest, retries=0)
    assert summary.fetched == 0 and summary.failed == 1
    assert "incomplete body" in summary.results[0].error and "headers need" in summary.results[0].error
    assert not (dest / _rel(path)).exists()
    assert all(r["status"] != "fetched" for r in read_manifest(dest).values())
    # The same server now sends whole bodies: the rerun fetches the file instead of skipping it.
    server.short.clear()
    summary = _run(server, sdss_items(lst, base_url=server.url + "/sas"), dest)
    assert summary.fetched == 1
    assert (dest / _rel(path)).read_bytes() == sdss_files[path]


def test_short_body_once_is_resumed_to_the_whole_file(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    path = max(sdss_files, key=lambda p: len(sdss_files[p]))
    server.short[path] = ["close", 1]
    lst = _write_list(tmp_path / "list.csv", [path])
    summary = _run(server, sdss_items(lst, base_url=server.url + "/sas"), tmp_path / "dest")
    assert summary.fetched == 1 and summary.results[0].attempts == 2
    assert (tmp_path / "dest" / _rel(path)).read_bytes() == sdss_files[path]
    assert len(server.ranges) == 1 and server.ranges[0][1] == len(sdss_files[path]) // 2


def test_fits_truncation_matches_astropy_on_real_files(shared_data: Path) -> None:
    """Whole real files pass; every cut is found; the size walked equals astropy's HDU layout."""
    for f in sorted((shared_data / "sdss").glob("*.fit*")) + sorted((shared_data / "lamost").glob("*.fits")):
        data = f.read_bytes()
        with fits.open(f) as hdul:
            info = hdul.fileinfo(len(hdul) - 1)
            end = info["datLoc"] + -(-hdul[-1]._data_size // 2880) * 2880
        assert end == len(data), f.name
        assert fits_truncation(io.BytesIO(data)) is None, f.name
        for cut in (100, 2880, len(data) // 2, len(data) - 1):
            assert fits_truncation(io.BytesIO(data[:cut])) is not None, (f.name, cut)


def test_cli_catalog_404_exits_1(server: SasServer, tmp_path: Path) -> None:
    proc = _cli(
        "fetch", "catalog", "dr16q", "--base-url", server.url + "/sas", "--dest", str(tmp_path / "c"), "--retries", "0", "--quiet"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "missing" in proc.stderr and "HTTP 404" in proc.stderr


def test_part_file_from_an_earlier_run_continues_with_range(
    server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path
) -> None:
    path = _smallest(sdss_files, 1)[0]
    dest = tmp_path / "dest"
    part = dest / (_rel(path) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(sdss_files[path][:5000])
    summary = _run(server, sdss_items(_write_list(tmp_path / "l.csv", [path]), base_url=server.url + "/sas"), dest)
    assert summary.fetched == 1
    assert server.ranges == [(path, 5000)]
    assert summary.bytes == len(sdss_files[path]) - 5000
    assert (dest / _rel(path)).read_bytes() == sdss_files[path]
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    server.ignore_range = True
    path = _smallest(sdss_files, 1)[0]
    dest = tmp_path / "dest"
    part = dest / (_rel(path) + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 4000)  # appending to this would corrupt the file
    summary = _run(server, sdss_items(_write_list(tmp_path / "l.csv", [path]), base_url=server.url + "/sas"), dest)
    assert summary.fetched == 1
    assert (dest / _rel(path)).read_bytes() == sdss_files[path]


def test_404_is_recorded_missing_without_retry(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    good = _smallest(sdss_files, 1)[0]
    lst = _write_list(tmp_path / "l.csv", [good], extra=[(9999, 58000, 12), (500, 51000, 7)])
    dest = tmp_path / "dest"
    summary = _run(server, sdss_items(lst, base_url=server.url + "/sas"), dest, retries=4)
    assert (summary.fetched, summary.missing, summary.failed) == (1, 2, 0)
    eboss_missing = "/sas/dr16/eboss/spectro/redux/v5_13_0/spectra/lite/9999/spec-9999-58000-0012.fits"
    assert server.gets[eboss_missing] == 1
    # a legacy plate without RUN2D tries each SDSS-I/II folder exactly once
    for run2d in ("26", "103", "104"):
        assert server.gets[f"/sas/dr16/sdss/spectro/redux/{run2d}/spectra/lite/0500/spec-0500-51000-0007.fits"] == 1
    manifest = read_manifest(dest)
    assert manifest["spec-9999-58000-0012.fits"]["status"] == "missing"
    assert manifest["spec-0500-51000-0007.fits"]["status"] == "missing"
    assert not (dest / "dr16/eboss/spectro/redux/v5_13_0/spectra/lite/9999").exists()


def test_5xx_is_retried_then_succeeds(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    path = _smallest(sdss_files, 1)[0]
    server.errors_before_ok[path] = 2
    dest = tmp_path / "dest"
    summary = _run(server, sdss_items(_write_list(tmp_path / "l.csv", [path]), base_url=server.url + "/sas"), dest, retries=3)
    assert summary.fetched == 1 and summary.results[0].attempts == 3
    assert server.gets[path] == 3
    assert (dest / _rel(path)).read_bytes() == sdss_files[path]
    server.errors_before_ok[path] = 10
    (dest / _rel(path)).unlink()
    again = _run(server, sdss_items(_write_list(tmp_path / "l.csv", [path]), base_url=server.url + "/sas"), dest, retries=1)
    assert again.failed == 1 and "gave up after 2 attempts: HTTP 503" in again.results[0].error


def test_slow_server_times_out_with_bounded_retries(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    path = _smallest(sdss_files, 1)[0]
    server.slow[path] = 3.0
    dest = tmp_path / "dest"
    summary = _run(
        server, sdss_items(_write_list(tmp_path / "l.csv", [path]), base_url=server.url + "/sas"), dest, retries=2, timeout=0.2
    )
    assert summary.failed == 1
    result = summary.results[0]
    assert result.attempts == 3 and "gave up after 3 attempts" in result.error and "Timeout" in result.error
    assert server.gets[path] == 3
    assert not (dest / _rel(path)).exists()
    assert read_manifest(dest)[Path(path).name]["status"] == "failed"


def test_corrupt_bodies_are_not_kept(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    html, wrong_sha, good = _smallest(sdss_files, 3)
    server.corrupt[html] = b"<html><body>maintenance</body></html>" * 50
    sums = tmp_path / "sums.txt"
    sums.write_text(f"{'0' * 64}  {Path(wrong_sha).name}\n{hashlib.sha256(sdss_files[good]).hexdigest()}  {_rel(good)}\n")
    dest = tmp_path / "dest"
    lst = _write_list(tmp_path / "l.csv", [html, wrong_sha, good])
    summary = _run(server, sdss_items(lst, base_url=server.url + "/sas"), dest, checksums=sums)
    by_key = {r.key: r for r in summary.results}
    assert by_key[Path(html).name].status == "failed" and "not a FITS file" in by_key[Path(html).name].error
    assert by_key[Path(wrong_sha).name].status == "failed" and "sha256" in by_key[Path(wrong_sha).name].error
    assert by_key[Path(good).name].status == "fetched"
    for p in (html, wrong_sha):
        assert not (dest / _rel(p)).exists() and not (dest / (_rel(p) + ".part")).exists()
    assert server.gets[html] == 1  # a corrupt body is not retried


def test_sha_from_an_earlier_manifest_rejects_a_changed_file(
    server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path
) -> None:
    path = _smallest(sdss_files, 1)[0]
    dest = tmp_path / "dest"
    items = sdss_items(_write_list(tmp_path / "l.csv", [path]), base_url=server.url + "/sas")
    assert _run(server, items, dest).fetched == 1
    (dest / _rel(path)).unlink()
    changed = bytearray(sdss_files[path])
    changed[-1] ^= 0xFF  # still starts with SIMPLE, but not the file the manifest knows
    server.corrupt[path] = bytes(changed)
    summary = _run(server, items, dest)
    assert summary.failed == 1 and "sha256" in summary.results[0].error
    assert not (dest / _rel(path)).exists()


def test_rerun_skips_complete_files_without_requests(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    paths = _smallest(sdss_files, 6)
    items = sdss_items(_write_list(tmp_path / "l.csv", paths), base_url=server.url + "/sas")
    dest = tmp_path / "dest"
    assert _run(server, items, dest).fetched == 6
    server.reset_counts()
    again = _run(server, items, dest)
    assert (again.skipped, again.fetched) == (6, 0)
    assert sum(server.gets.values()) == 0
    # a file damaged on disk (same size, other bytes) no longer matches its sha256: fetched again
    victim = dest / _rel(paths[2])
    victim.write_bytes(b"\0" * victim.stat().st_size)
    third = _run(server, items, dest)
    assert (third.skipped, third.fetched) == (5, 1)
    assert dict(server.gets) == {paths[2]: 1}
    assert victim.read_bytes() == sdss_files[paths[2]]


def test_jobs_bound_the_requests_in_flight(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    server.delay = 0.15
    paths = _smallest(sdss_files, 10)
    summary = _run(
        server, sdss_items(_write_list(tmp_path / "l.csv", paths), base_url=server.url + "/sas"), tmp_path / "d", jobs=3
    )
    assert summary.fetched == 10
    assert 2 <= server.max_in_flight <= 3


def test_lamost_by_obsid_with_token_never_recorded(
    server: SasServer, real_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    lamost = real_data / "lamost"
    by_obsid = {
        677503031: lamost / "spec-58397-EG014118N254444M01_sp03-031.fits",
        937808200: lamost / "spec-59517-EG025613N082253M02_sp08-200.fits.gz",
        938505172: lamost / "spec-59522-EG224840N075042B03_sp05-172.fits.gz",
    }
    for obsid, f in by_obsid.items():
        server.files[f"/dr10/v2.0/spectrum/fits/{obsid}"] = f.read_bytes()
    server.token = "s3cret-token"
    lst = tmp_path / "obsids.txt"
    lst.write_text("".join(f"{o}\n" for o in by_obsid))
    dest = tmp_path / "dest"
    summary = _run(server, lamost_items(lst, base_url=server.url + "/dr10/v2.0", token="s3cret-token"), dest)
    assert summary.fetched == 3
    for obsid, f in by_obsid.items():
        local = dest / "lamost" / (f"{obsid}.fits.gz" if f.name.endswith(".gz") else f"{obsid}.fits")
        assert local.read_bytes() == f.read_bytes()
    assert "s3cret" not in (dest / "manifest.jsonl").read_text()
    assert "s3cret" not in caplog.text  # nor in any log line (httpx logs request URLs)
    # a wrong token is an answer (403): failed at once, not retried
    server.reset_counts()
    bad = _run(server, lamost_items(lst, base_url=server.url + "/dr10/v2.0", token="wrong"), tmp_path / "d2", retries=3)
    assert bad.failed == 3 and all("HTTP 403" in r.error for r in bad.results)
    assert set(server.gets.values()) == {1}


def test_catalog_lands_in_the_sas_layout(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    body = sdss_files[_smallest(sdss_files, 1)[0]]  # any FITS stands in for the 1.7 GB catalogue
    server.files["/sas/" + CATALOGS["dr16q"]] = body
    summary = _run(server, catalog_items("dr16q", base_url=server.url + "/sas"), tmp_path / "cat", jobs=1)
    assert summary.fetched == 1
    assert (tmp_path / "cat/dr16/eboss/qso/DR16Q/DR16Q_v4.fits").read_bytes() == body


# ---- command line --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectransfer", *args], capture_output=True, text=True, timeout=120)


def test_cli_missing_list_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = _cli("fetch", "sdss", "--list", str(tmp_path / "nope.csv"), "--dest", str(tmp_path / "d"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.csv" in lines[0] and "not found" in lines[0]
    assert not (tmp_path / "d").exists()


def test_cli_interrupt_keeps_part_and_the_next_run_resumes(
    server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path
) -> None:
    path = max(sdss_files, key=lambda p: len(sdss_files[p]))
    server.trickle.add(path)
    lst = _write_list(tmp_path / "l.csv", [path])
    dest = tmp_path / "dest"
    part = dest / (_rel(path) + ".part")
    cmd = [
        sys.executable,
        "-m",
        "spectransfer",
        "fetch",
        "sdss",
        "--list",
        str(lst),
        "--dest",
        str(dest),
        "--base-url",
        server.url + "/sas",
        "--quiet",
    ]
    # A job started in the background by a non-interactive shell (nohup, `make test &`) inherits
    # SIGINT ignored, and Python then never turns it into KeyboardInterrupt: give the child the
    # default disposition, as a terminal would.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for _ in range(400):  # wait (at most ~40 s) until some bytes have arrived
            if part.exists() and part.stat().st_size > 0:
                break
            time.sleep(0.1)
        assert part.exists(), "download never started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err  # the conventional exit status after SIGINT
    kept = part.stat().st_size
    assert 0 < kept < len(sdss_files[path])
    assert not (dest / _rel(path)).exists()
    server.trickle.clear()
    server.reset_counts()
    summary = _run(server, sdss_items(lst, base_url=server.url + "/sas"), dest)
    assert summary.fetched == 1 and server.ranges == [(path, kept)]
    assert (dest / _rel(path)).read_bytes() == sdss_files[path]


def test_cli_fetch_summary_and_exit_code(server: SasServer, sdss_files: dict[str, bytes], tmp_path: Path) -> None:
    good, bad = _smallest(sdss_files, 2)
    server.corrupt[bad] = b"not a fits file" * 100
    lst = _write_list(tmp_path / "l.csv", [good, bad], extra=[(9999, 58000, 12)])
    dest = tmp_path / "dest"
    proc = _cli(
        "fetch",
        "sdss",
        "--list",
        str(lst),
        "--dest",
        str(dest),
        "--base-url",
        server.url + "/sas",
        "--backoff",
        "0.01",
        "--jobs",
        "2",
    )
    assert proc.returncode == 1, proc.stderr
    assert "fetched 1, skipped 0, missing 1, failed 1" in proc.stdout
    assert (dest / _rel(good)).read_bytes() == sdss_files[good]
    records = [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in records) == ["failed", "fetched", "missing"]
