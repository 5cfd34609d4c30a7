"""End to end in headless Chromium (Debian's package, driven by Playwright), against the
app on the production WSGI server (waitress) on loopback, with the tiny face models.

Sign in, enroll a person from photos through the wizard (per-photo feedback, with the
PhotoMaker artifact for generation), see the duplicate warning when the same face is
enrolled again under another name, open the identity page, then generate a scene with
@smiths/ana on the tiny SDXL models (handle autocomplete, progress, gallery) and open the
result with its provenance.

The layout test opens the roster, identity, jobs and audit pages (seeded with long model
ids, long names and many audit events) at 1280 and 390 px wide and checks in the page that
nothing is cut off: the page never scrolls sideways, and every table either fits its
container or sits in a scroll container that fits the viewport and its own parent. Its
screenshots go to ``$IDVAULT_UI_SHOTS`` (default: the test's tmp folder).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import basis_payload, consent_doc, face_payload
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


# -- layout at desktop and phone widths --------------------------------------------------------
# For each <table> in <main>: it fits its parent (scrollWidth <= clientWidth + 1), or its
# nearest ancestor with overflow-x auto/scroll (not the page itself) lies inside the viewport
# and inside its own parent; and no card is wider inside than its box. The page itself must
# not scroll sideways. Returns the problems found and how each table was held.
LAYOUT_CHECK = """() => {
  const vw = window.innerWidth, problems = [], tables = [];
  const root = document.documentElement;
  if (root.scrollWidth > vw) {
    const wide = [...document.body.querySelectorAll('*')]
      .filter(e => e.getBoundingClientRect().right > vw + 1
              && !e.parentElement.closest('.table-scroll')
              && !(e.parentElement.getBoundingClientRect().right > vw + 1))
      .slice(0, 5).map(e => `${e.tagName.toLowerCase()}.${e.className}`);
    problems.push(`the page scrolls sideways: ${root.scrollWidth} > ${vw} ` +
                  `(${wide.join(', ')})`);
  }
  document.querySelectorAll('main table').forEach((t, i) => {
    const heading = t.closest('section, main').querySelector('h1, h2') || {};
    const box = t.parentElement;
    const label = `table ${i} (${heading.textContent || box.getAttribute("aria-label")})`;
    const fits = t.scrollWidth <= box.clientWidth + 1 &&
      t.getBoundingClientRect().right <= box.getBoundingClientRect().right + 1;
    let how = 'fits';
    if (!fits) {
      let s = box;
      while (s && s !== document.body &&
             !['auto', 'scroll'].includes(getComputedStyle(s).overflowX))
        s = s.parentElement;
      if (!s || s === document.body) {
        problems.push(`${label} is ${t.scrollWidth}px wide in ${box.clientWidth}px, ` +
                      'not in a scroll container');
        return;
      }
      const r = s.getBoundingClientRect(), pr = s.parentElement.getBoundingClientRect();
      if (r.left < -1 || r.right > vw + 1)
        problems.push(`${label}: its scroll container leaves the viewport`);
      if (r.right > pr.right + 1)
        problems.push(`${label}: its scroll container overflows its parent`);
      how = `scrolls (${t.scrollWidth}px in ${s.clientWidth}px)`;
    }
    const card = t.closest('.card');
    if (card && card.scrollWidth > card.clientWidth + 1)
      problems.push(`${label} overflows its card: ${card.scrollWidth} > ${card.clientWidth}`);
    tables.push(`${label}: ${how}`);
  });
  return {problems, tables};
}"""

MODEL_IDS = ("clip-vit-h-14@0123456789abcdef+buffalo_l/w600k_r50@fedcba9876543210",
             "stable-diffusion-v1-5/unet@sha256:9a3c1f0e5b7d2c4a6e8f0b1d3c5e7a9b")


@pytest.fixture
def busy_web(web):
    """smiths with a dozen identities (long names), ana with long model ids, many audit
    events with long details, and jobs done, failed and queued."""
    from vault import audit
    from vault import identities as idents
    from vault.models import Job

    names = ["ana", "alexandria-konstantinopoulou", "bartholomew-featherstonehaugh"] + \
        [f"person-{i:02d}-with-a-long-name" for i in range(9)]
    for i, name in enumerate(names):
        doc = consent_doc(subject=f"{name.replace('-', ' ').title()} Smith-Vandenberghe",
                          guardian_name="Maria Konstantinopoulou-Smith",
                          purposes=["enroll", "generate", "personalize", "share",
                                    "commercial"])
        assert web.client.post("/v1/identities", headers=web.headers(),
                               json={"name": name, "consent": doc}).status_code == 201
        web.vault.put_artifact(f"smiths/{name}", "face",
                               face_payload(seed=i, model_id=MODEL_IDS[0]))
    web.vault.put_artifact("smiths/ana", "celeb_basis",
                           basis_payload(np.full((2, 512), 0.01, dtype=np.float32),
                                         model_id=MODEL_IDS[1]))
    with web.vault.session() as s:
        for i in range(70):
            audit.append(s, "artifact.read", actor="api:idv_renderfarm01" if i % 2
                         else "user:maria", owner="smiths", subject="smiths/ana",
                         details={"kind": "face", "model_id": MODEL_IDS[0],
                                  "purpose": "generate", "sha256": "ab" * 32})
    for kind in ("rebuild_index", "retention_sweep"):
        web.state.jobs.submit("smiths", kind, actor="user:maria")
    web.state.jobs.run_pending()
    with web.vault.session() as s:
        owner = idents.get_owner(s, "smiths")
        ana = idents.get_identity(s, "smiths/ana")
        s.add(Job(owner_id=owner.id, kind="generate", status="failed", progress=0.3,
                  params={}, error="the identity smiths/bartholomew-featherstonehaugh has no "
                  "photomaker artifact (enroll it with --kinds photomaker)"))
        s.add(Job(owner_id=owner.id, kind="lidb", status="done", progress=1.0, params={},
                  identity_id=ana.id, result={"artifact": "0" * 32, "kind": "lidb"}))
        s.add(Job(owner_id=owner.id, kind="celeb_basis", status="running", progress=0.42,
                  params={}, identity_id=ana.id,
                  message="celeb_basis: step 168 of 400, about 9 min left"))
    return web


@pytest.fixture
def live_web(busy_web):
    server = make_server(busy_web.app, "127.0.0.1", 0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server_url(server).rstrip("/")
    server.close()


@pytest.mark.parametrize("width", [1280, 390])
def test_no_table_is_cut_off(busy_web, live_web, browser, tmp_path, width):
    busy_web.user("maria", "smiths", "admin")
    shots = Path(os.environ.get("IDVAULT_UI_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(20_000)
    page.goto(f"{live_web}/login")
    page.get_by_label("Username").fill("maria")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Roster").wait_for()
    report = {}
    for name, path, heading in [("roster", "/", "Roster"),
                                ("identity", "/identities/smiths/ana", "@smiths/ana"),
                                ("jobs", "/jobs", "Jobs"),
                                ("audit", "/audit", "Audit log of smiths"),
                                ("members", "/members", "Members of smiths")]:
        page.goto(live_web + path)
        page.get_by_role("heading", name=heading, exact=True).wait_for()
        assert page.locator("main table").count() >= 1, name
        result = page.evaluate(LAYOUT_CHECK)
        page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
        assert not result["problems"], (name, width, result)
        report[name] = result["tables"]
    # The model ids wrap between their parts, never a few characters a line (the bug was
    # about four): at least 16 characters a line on average.
    page.goto(f"{live_web}/identities/smiths/ana")
    held = page.locator("code.model-id").evaluate_all(
        "els => els.map(e => [e.textContent.length, Math.round(e.getBoundingClientRect()"
        ".height / parseFloat(getComputedStyle(e).lineHeight))])")
    assert len(held) == 2 and all(chars / lines >= 16 for chars, lines in held), held
    (shots / f"layout-{width}.json").write_text(json.dumps(report, indent=2))
    if width < 640:  # the check itself: without the fixes, the old layout fails it
        page.goto(f"{live_web}/identities/smiths/ana")
        page.evaluate("""() => {  // CSSOM, which the page's CSP allows (a <style> it does not)
          const sheet = new CSSStyleSheet();
          sheet.replaceSync('.table-scroll { overflow: visible !important; } ' +
            '.table.stack, .table.stack * { display: revert !important; } ' +
            '.table .model-id { overflow-wrap: normal !important; }');
          document.adoptedStyleSheets = [sheet];
        }""")
        broken = page.evaluate(LAYOUT_CHECK)["problems"]
        assert any("the page scrolls sideways" in m for m in broken), broken
        assert any("not in a scroll container" in m for m in broken), broken

    # The withdraw dialog states smiths' policy (erase at once).
    page.locator("details.danger-zone > summary").click()
    dialog = page.locator("details.danger-zone")
    assert "erased immediately" in dialog.inner_text()
    dialog.screenshot(path=str(shots / f"withdraw-{width}.png"))

    # The optional layout boxes of the generation page: a neutral control, not a warning.
    page.goto(f"{live_web}/generate")
    summary = page.get_by_text("Layout boxes (optional)")
    danger = page.evaluate("getComputedStyle(document.documentElement)"
                           ".getPropertyValue('--bad').trim()")
    assert danger == "#b3261e" and summary.evaluate(
        "e => getComputedStyle(e).color") != "rgb(179, 38, 30)"
    page.screenshot(path=str(shots / f"generate-{width}.png"))

    # Erase one: the receipt page says the signature verified; the download is its file.
    page.goto(f"{live_web}/identities/smiths/person-08-with-a-long-name")
    page.get_by_label("to confirm").fill("smiths/person-08-with-a-long-name")
    page.get_by_role("button", name="Erase @smiths/person-08-with-a-long-name").click()
    page.get_by_text("Signature verified").wait_for()
    page.screenshot(path=str(shots / f"receipt-{width}.png"), full_page=True)
    with page.expect_download() as info:
        page.get_by_role("button", name="Download the receipt").click()
    download = info.value
    assert download.suggested_filename.startswith(
        "erasure-receipt-smiths-person-08-with-a-long-name-")
    signed = json.loads(Path(download.path()).read_text())
    assert busy_web.vault.verify_receipt(signed)["handle"] == \
        "smiths/person-08-with-a-long-name"
