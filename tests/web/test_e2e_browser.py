"""End to end in headless Chromium (Debian's package, driven by Playwright), against the
app on the production WSGI server (waitress) on loopback, with the tiny face models.

Sign in, enroll a person from photos through the wizard (per-photo feedback, with the
PhotoMaker artifact for generation), see the duplicate warning when the same face is
enrolled again under another name, open the identity page, then generate a scene with
@smiths/ana on the tiny SDXL models (handle autocomplete, progress, gallery) and open the
result with its provenance.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from tests.web.web_fixtures import PASSWORD, photo_bytes
from web.serve import make_server, server_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get "
                       "install chromium chromium-driver; .ci/run does it)"),
]


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def live(gen_web):
    gen_web.state.jobs.start()  # the embedded worker, as `idvault serve` runs it
    server = make_server(gen_web.app, "127.0.0.1", 0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server_url(server).rstrip("/")
    server.close()


@pytest.fixture
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        yield b
        b.close()


def test_sign_in_enroll_duplicate_identity_page_and_generate(gen_web, live, browser, tmp_path):
    web = gen_web
    web.user("maria", "smiths", "admin")
    photos = []
    for i in range(3):
        path = tmp_path / f"ana-{i}.jpg"
        path.write_bytes(photo_bytes(1, i))
        photos.append(str(path))
    form = tmp_path / "consent-form.pdf"
    form.write_bytes(b"%PDF-1.4 signed consent form")
    again = tmp_path / "ana-again.jpg"
    again.write_bytes(photo_bytes(1, 7))

    page = browser.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and
            "status of 409" not in m.text else None)  # the duplicate page is a 409

    # Sign in.
    page.goto(f"{live}/")
    assert "/login" in page.url
    page.get_by_label("Username").fill("maria")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Roster").wait_for()

    # Enroll Ana through the wizard.
    page.get_by_role("link", name="Enroll the first person").click()
    page.get_by_label("Handle").fill("ana")
    page.get_by_label("Full name", exact=True).fill("Ana Smith")
    page.get_by_role("button", name="Next: consent").click()
    page.get_by_label("A parent or guardian on their behalf").check()
    page.get_by_label("Guardian's full name").fill("Maria Smith")
    page.get_by_label("Consent evidence").set_input_files(str(form))
    page.get_by_role("button", name="Next: photos").click()
    page.get_by_label("Photos of the person").set_input_files(photos)
    feedback = page.locator("[data-photo-list] li.ok")
    feedback.nth(2).wait_for()
    assert feedback.count() == 3 and "usable face" in feedback.first.inner_text()
    page.get_by_label("PhotoMaker ID embeddings").check()
    page.get_by_role("button", name="Enroll", exact=True).click()
    page.get_by_role("heading", name="@smiths/ana").wait_for()
    assert "Enrolled smiths/ana from 3 photo(s)." in page.content()

    # The same face under another name: the duplicate warning.
    page.get_by_role("link", name="Enroll", exact=True).click()
    page.get_by_label("Handle").fill("anna")
    page.get_by_label("Full name", exact=True).fill("Anna Smith")
    page.get_by_role("button", name="Next: consent").click()
    page.get_by_label("Consent evidence").set_input_files(str(form))
    page.get_by_role("button", name="Next: photos").click()
    page.get_by_label("Photos of the person").set_input_files([str(again)])
    page.locator("[data-photo-list] li.ok").first.wait_for()
    page.get_by_role("button", name="Enroll", exact=True).click()
    warning = page.get_by_role("alert")
    warning.wait_for()
    assert "Already enrolled: this looks like @smiths/ana" in warning.inner_text()
    assert "Nothing was stored" in warning.inner_text()

    # Open the identity page from the warning.
    warning.get_by_role("link", name="@smiths/ana").click()
    page.get_by_role("heading", name="@smiths/ana").wait_for()
    body = page.inner_text("main")
    for text in ("Consent", "guardian: Maria Smith", "Artifacts", "face", "Audit trail",
                 "identity.create", "enroll", "Erase this identity"):
        assert text in body, text
    assert "photomaker" in body
    assert page.get_by_role("link", name="Roster").is_visible()

    # Generate a scene with Ana on the tiny models: autocomplete, progress, gallery.
    page.get_by_role("link", name="Generate").click()
    page.get_by_role("heading", name="Generate a scene").wait_for()
    prompt = page.get_by_label("Prompt")
    prompt.click()
    prompt.press_sequentially("@an")
    option = page.get_by_role("option", name="@smiths/ana")
    option.wait_for()
    prompt.press("Enter")
    prompt.press_sequentially("hiking in the alps, watercolor")
    assert prompt.input_value() == "@smiths/ana hiking in the alps, watercolor"
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Generate", exact=True).click()
    shot = page.locator("[data-gallery] figure").first
    shot.wait_for(timeout=60_000)
    assert "provenance valid" in shot.inner_text() and "@smiths/ana" in shot.inner_text()
    assert page.locator("[data-progress] progress").get_attribute("value") == "1"
    assert shot.locator("img").evaluate("img => img.complete && img.naturalWidth") > 0

    # Open the result: the image and its provenance.
    shot.get_by_role("link", name="Open").click()
    page.get_by_role("heading", name="Provenance").wait_for()
    body = page.inner_text("main")
    assert "valid, signed by this vault" in body and "smiths/ana via photomaker" in body
    assert page.locator("img.scene").evaluate("img => img.naturalWidth") > 0
    assert not errors, errors  # no CSP violations or script errors
    assert [i["handle"] for i in web.vault.list_identities("smiths")] == ["smiths/ana"]
