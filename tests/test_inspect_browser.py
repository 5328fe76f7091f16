"""The inspection page in a real browser: Debian chromium driven by playwright, keys q / n / u / z."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from spectransfer.data.store import open_store
from spectransfer.inspect.app import create_app
from spectransfer.inspect.server import running_server

from test_inspect_api import REAL_SDSS, build_inputs

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


def rows(db: Path) -> dict[str, tuple]:
    if not db.exists():
        return {}
    con = sqlite3.connect(db)
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT spectrum_id, verdict, z, inspector FROM verdicts")}
    finally:
        con.close()


def wait_rows(db: Path, n: int, timeout: float = 30.0) -> dict[str, tuple]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = rows(db)
        if len(got) >= n:
            return got
        time.sleep(0.05)
    return rows(db)


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (installs Debian chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_keys_record_verdicts_in_sqlite(browser, tmp_path, real_data):
    cand, store_path, table = build_inputs(tmp_path, n=8, real_file=real_data / REAL_SDSS)
    db = tmp_path / "verdicts.sqlite"
    top = table.sort_values("P_QSO", ascending=False)["SPECTRUM_ID"].tolist()
    app = create_app(cand, open_store(store_path), db)
    with running_server(app) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert page.text_content("#c-id") == top[0]

        # Without a name the page refuses to record and says so.
        page.keyboard.press("q")
        page.wait_for_selector("#toast.show.error")
        assert rows(db) == {}
        assert page.text_content("#c-id") == top[0]

        page.fill("#inspector", "playwright")
        page.press("#inspector", "Enter")  # leaves the field, so keys go to the page again
        expect(page.locator("#c-id")).to_have_text(top[0])
        page.wait_for_selector("#c-src >> text=original pixels", timeout=30_000)  # the real SDSS file

        page.keyboard.press("q")
        page.keyboard.press("n")
        page.keyboard.press("u")
        got = wait_rows(db, 3)
        assert got == {
            top[0]: ("qso", None, "playwright"),
            top[1]: ("not_qso", None, "playwright"),
            top[2]: ("unsure", None, "playwright"),
        }
        expect(page.locator("#n-done")).to_have_text("3")
        assert page.text_content("#n-total") == str(len(table))
        assert page.text_content("#c-id") == top[3]

        # z focuses the redshift field; the typed z goes with the next verdict.
        page.keyboard.press("z")
        page.fill("#z-user", "1.234")
        page.press("#z-user", "Enter")
        page.keyboard.press("q")
        got = wait_rows(db, 4)
        assert got[top[3]][0] == "qso" and got[top[3]][1] == pytest.approx(1.234)

        # Arrows move back; a second verdict by the same person replaces the first.
        for _ in range(4):
            page.keyboard.press("ArrowLeft")
        expect(page.locator("#c-id")).to_have_text(top[0])
        page.click("#b-not")
        deadline = time.monotonic() + 30
        while rows(db).get(top[0], ("qso",))[0] != "not_qso" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rows(db)[top[0]] == ("not_qso", None, "playwright")
        assert len(rows(db)) == 4

        # Dragging the plot sideways stretches the lines: 1 + z scales as the wavelength does.
        expect(page.locator("#c-id")).to_have_text(top[1])  # moved on after the verdict
        page.wait_for_selector("#plot-msg", state="hidden")
        z0 = page.evaluate("() => parseFloat(document.querySelector('#c-pipe').textContent.split('z = ')[1])")
        box = page.locator("#plot").bounding_box()
        y = box["y"] + box["height"] / 2
        x0, x1 = box["x"] + box["width"] * 0.4, box["x"] + box["width"] * 0.6

        def wave_at(x: float) -> float:
            page.mouse.move(x, y)
            return float(page.text_content("#readout").split()[1])

        w0, w1 = wave_at(x0), wave_at(x1)
        page.mouse.move(x0, y)
        page.mouse.down()
        page.mouse.move(x1, y, steps=5)
        page.mouse.up()
        z_dragged = float(page.input_value("#z-user"))
        assert z_dragged == pytest.approx((1 + z0) * w1 / w0 - 1, abs=2e-4)
        assert z_dragged > z0

        # The name survives a reload (localStorage) and the queue shows the stored verdicts.
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert page.input_value("#inspector") == "playwright"
        assert page.get_attribute("#queue li[data-index='1'] .dot", "class") == "dot not_qso"
        assert page.text_content("#n-done") == "4"
        assert errors == []


def test_page_works_with_a_token(browser, tmp_path):
    cand, store_path, table = build_inputs(tmp_path, n=5)
    token = "browser-token-1234"
    db = tmp_path / "verdicts.sqlite"
    app = create_app(cand, open_store(store_path), db, token=token)
    with running_server(app) as url:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        denied = page.goto(url + "/")
        assert denied.status == 401
        page.goto(url + f"/?token={token}")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)  # assets and API calls carried it
        page.fill("#inspector", "tok")
        page.press("#inspector", "Enter")
        page.wait_for_selector("#plot-msg", state="hidden")
        page.keyboard.press("u")
        assert list(wait_rows(db, 1).values()) == [("unsure", None, "tok")]
        assert errors == []
