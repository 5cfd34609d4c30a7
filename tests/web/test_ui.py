"""The HTML UI through the Flask test client: sign-in, roster, enrollment wizard,
identity page, reviews, API keys, members, owners, public pages."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re

import pytest

from tests.helpers import consent_doc, face_payload
from tests.web.web_fixtures import PASSWORD, TWIN_OF_3, photo_bytes
from vault import accounts
from web.ui.filters import breakable, human_size


@pytest.fixture
def backend() -> str:
    return "sqlite"


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def wizard_form(client, name: str, person: int, photos=(0, 1), **extra) -> dict:
    token = csrf(client.get("/enroll").get_data(as_text=True))
    form = {"csrf_token": token, "name": name, "subject": f"{name.title()} Smith",
            "given_by": "guardian", "guardian_name": "Maria Smith",
            "purposes": ["generate"], "retain_until": consent_doc()["retain_until"],
            "evidence": (io.BytesIO(b"signed form"), "form.pdf"),
            "photos": [(io.BytesIO(photo_bytes(person, i)), f"{name}-{i}.jpg") for i in photos]}
    form.update(extra)
    return form


@pytest.fixture
def maria(web):
    web.user("maria", "smiths", "admin")
    return web.login("maria")


def test_sign_in_out_and_throttle(web):
    web.user("maria", "smiths", "editor")
    c = web.app.test_client()
    assert c.get("/").status_code == 302 and "/login" in c.get("/").headers["Location"]
    page = c.get("/login").get_data(as_text=True)
    assert "<label for=\"username\">" in page and "autocomplete=\"current-password\"" in page
    token = csrf(page)
    bad = c.post("/login", data={"username": "maria", "password": "nope", "csrf_token": token})
    assert bad.status_code == 401 and "wrong username or password" in bad.get_data(as_text=True)
    ok = c.post("/login", data={"username": "maria", "password": PASSWORD, "csrf_token": token,
                                "next": "//evil.example/x"})
    assert ok.status_code == 302 and ok.headers["Location"] == "/"  # no open redirect
    roster = c.get("/")
    assert roster.status_code == 200 and "Roster" in roster.get_data(as_text=True)
    cookie = c.get_cookie("idvault_session").value
    c.post("/logout", data={"csrf_token": csrf(roster.get_data(as_text=True))})
    assert c.get("/").status_code == 302
    # The old cookie is dead on the server too.
    thief = web.app.test_client()
    thief.set_cookie("idvault_session", cookie)
    assert thief.get("/").status_code == 302
    # Five failures lock the name from this address for a while (test_auth_hardening.py).
    c2 = web.app.test_client()
    token = csrf(c2.get("/login").get_data(as_text=True))
    codes = [c2.post("/login", data={"username": "maria", "password": f"wrong{i}",
                                     "csrf_token": token}).status_code for i in range(6)]
    assert codes[:5] == [401] * 5 and codes[5] == 429


def test_one_time_password_must_be_changed(web):
    with web.vault.session() as s:
        _, generated = accounts.create_user(s, "newbie", superuser=False, actor="test")
        accounts.grant(s, "newbie", "smiths", "viewer", actor="test")
    c = web.app.test_client()
    token = csrf(c.get("/login").get_data(as_text=True))
    resp = c.post("/login", data={"username": "newbie", "password": generated,
                                  "csrf_token": token})
    assert resp.headers["Location"] == "/account"
    assert c.get("/").headers["Location"] == "/account"  # every page sends you there
    page = c.get("/account").get_data(as_text=True)
    resp = c.post("/account", data={"csrf_token": csrf(page), "current": generated,
                                    "new": "short", "confirm": "short"})
    assert resp.status_code == 400 and "at least 10" in resp.get_data(as_text=True)
    resp = c.post("/account", data={"csrf_token": csrf(page), "current": generated,
                                    "new": "a much better one", "confirm": "a much better one"})
    assert resp.status_code == 302
    assert c.get("/").status_code == 200
    with web.vault.session() as s:
        user = accounts.get_user(s, "newbie")
        assert not user.must_change_password and user.password_hash.startswith("$argon2id$")


def test_enrollment_wizard_duplicate_and_identity_page(web, maria):
    page = maria.get("/enroll").get_data(as_text=True)
    for label in ("Handle", "Full name", "Who gives consent?", "Guardian's full name",
                  "Keep until", "Consent evidence", "Photos of the person"):
        assert label in page
    resp = maria.post("/enroll", data=wizard_form(maria, "ana", 1),
                      content_type="multipart/form-data")
    assert resp.status_code == 302 and resp.headers["Location"] == "/identities/smiths/ana"
    person = maria.get("/identities/smiths/ana").get_data(as_text=True)
    assert "Enrolled smiths/ana from 2 photo(s)." in person
    assert "guardian: Maria Smith" in person and "face" in person and "enroll" in person
    assert "Audit trail" in person and "identity.create" in person
    assert hashlib.sha256(b"signed form").hexdigest()[:16] in person
    # The same face again: the duplicate warning, nothing stored.
    resp = maria.post("/enroll", data=wizard_form(maria, "anna", 1, photos=(2,)),
                      content_type="multipart/form-data")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 409 and "Already enrolled: this looks like @smiths/ana" in html
    assert 'href="/identities/smiths/ana"' in html
    assert maria.get("/identities/smiths/anna").status_code == 404
    roster = maria.get("/").get_data(as_text=True)
    assert "@smiths/ana" in roster and "anna" not in roster and "active" in roster


def test_wizard_reports_bad_photos_and_consent(web, maria):
    form = wizard_form(maria, "ben", 2)
    form["photos"] = [(io.BytesIO(photo_bytes(2, 0)), "ben.jpg"),
                      (io.BytesIO(b"not an image"), "ben.txt")]
    resp = maria.post("/enroll", data=form, content_type="multipart/form-data")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 422 and "ben.txt" in html and 'class="bad"' in html
    assert 'class="ok"' in html  # ben.jpg was fine
    form = wizard_form(maria, "ben", 2, guardian_name="")
    resp = maria.post("/enroll", data=form, content_type="multipart/form-data")
    assert resp.status_code == 400
    assert "guardian_name" in resp.get_data(as_text=True)
    assert web.vault.list_identities("smiths") == []


def test_held_enrollment_and_review_queue(web, maria):
    assert maria.post("/enroll", data=wizard_form(maria, "cleo", 3),
                      content_type="multipart/form-data").status_code == 302
    form = wizard_form(maria, "dan", 4)
    form["photos"] = [(io.BytesIO(photo_bytes(4, i, kin=TWIN_OF_3)), f"dan-{i}.jpg")
                      for i in (0, 1)]
    resp = maria.post("/enroll", data=form, content_type="multipart/form-data")
    assert resp.status_code == 302
    person = maria.get(resp.headers["Location"]).get_data(as_text=True)
    assert "held for review" in person.lower() and "@smiths/cleo" in person
    queue = maria.get("/reviews").get_data(as_text=True)
    assert "@smiths/dan" in queue and "Different people" in queue
    rid = web.vault.list_reviews("smiths")[0]["id"]
    resp = maria.post(f"/reviews/{rid}/accept", data={"csrf_token": csrf(queue)})
    assert resp.status_code == 302
    assert "not the same person" in maria.get("/reviews").get_data(as_text=True)
    assert web.vault.describe("smiths/dan")["status"] == "active"


def test_delete_and_withdraw_from_the_identity_page(web, maria):
    for name in ("ana", "ben"):
        web.client.post("/v1/identities", headers=web.headers(),
                        json={"name": name, "consent": consent_doc()})
    page = maria.get("/identities/smiths/ana").get_data(as_text=True)
    resp = maria.post("/identities/smiths/ana/delete", data={"csrf_token": csrf(page),
                                                              "confirm": "smiths/anna"})
    assert resp.status_code == 302 and web.vault.describe("smiths/ana")
    resp = maria.post("/identities/smiths/ana/delete", data={"csrf_token": csrf(page),
                                                              "confirm": "smiths/ana"})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "Signature verified" in html
    assert "idvault.erasure-receipt/1" in html
    assert maria.get("/identities/smiths/ana").status_code == 404
    resp = maria.post("/identities/smiths/ben/withdraw", data={"csrf_token": csrf(page),
                                                                "confirm": "yes",
                                                                "reason": "asked"})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "withdrew consent" in html
    assert "Signature verified" in html


def _receipt_json(html: str) -> str:
    import html as htmllib

    raw = re.search(r'<input type="hidden" name="receipt" value="([^"]*)"', html).group(1)
    return htmllib.unescape(raw)


def test_receipt_is_verified_downloads_and_a_tampered_one_is_refused(web, maria):
    web.client.post("/v1/identities", headers=web.headers(),
                    json={"name": "ana", "consent": consent_doc()})
    page = maria.get("/identities/smiths/ana").get_data(as_text=True)
    html = maria.post("/identities/smiths/ana/delete",
                      data={"csrf_token": csrf(page), "confirm": "smiths/ana"}
                      ).get_data(as_text=True)
    key_id, _ = web.vault.keys.public_key()
    assert 'data-verified="true"' in html and f"<code>{key_id}</code>" in html
    signed = json.loads(_receipt_json(html))
    assert signed["receipt"]["handle"] == "smiths/ana"
    # The download: an attachment named after the receipt, whose body verifies.
    resp = maria.post("/receipts/download", data={"csrf_token": csrf(html),
                                                  "receipt": json.dumps(signed)})
    day = signed["receipt"]["erased_at"][:10].replace("-", "")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert resp.headers["Content-Disposition"] == \
        f'attachment; filename="erasure-receipt-smiths-ana-{day}.json"'
    assert web.vault.verify_receipt(json.loads(resp.get_data()))["handle"] == "smiths/ana"
    # Checked later, as a file: verified; altered in one field: not verified, no download.
    checker = maria.get("/receipts/verify").get_data(as_text=True)
    ok = maria.post("/receipts/verify", data={
        "csrf_token": csrf(checker),
        "file": (io.BytesIO(resp.get_data()), "erasure-receipt.json")},
        content_type="multipart/form-data")
    assert ok.status_code == 200 and 'data-verified="true"' in ok.get_data(as_text=True)
    tampered = json.loads(json.dumps(signed))
    tampered["receipt"]["reason"] = "retention period ended"
    bad = maria.post("/receipts/verify", data={"csrf_token": csrf(checker),
                                               "receipt": json.dumps(tampered)})
    text = bad.get_data(as_text=True)
    assert bad.status_code == 400 and 'data-verified="false"' in text
    assert "Signature verified" not in text and "altered" in text
    refused = maria.post("/receipts/download", data={"csrf_token": csrf(checker),
                                                     "receipt": json.dumps(tampered)})
    assert refused.status_code == 400 and "Content-Disposition" not in refused.headers
    junk = maria.post("/receipts/verify", data={"csrf_token": csrf(checker),
                                                "receipt": "{not json"})
    assert junk.status_code == 400 and "not JSON" in junk.get_data(as_text=True)
    forged = maria.post("/receipts/download", data={"receipt": json.dumps(signed)})
    assert forged.status_code in (400, 403) and "Content-Disposition" not in forged.headers


def test_withdraw_dialog_states_the_owners_policy(web, maria):
    web.client.post("/v1/identities", headers=web.headers(),
                    json={"name": "ana", "consent": consent_doc()})
    page = maria.get("/identities/smiths/ana").get_data(as_text=True)
    assert 'data-erase-policy="immediate"' in page and "erased immediately" in page
    assert "at once, or at its retention date" not in page
    # northlight keeps withdrawn identities until their retention date.
    web.user("nora", "northlight", "admin")
    nora = web.login("nora")
    retain = consent_doc(retain_until="2031-05-17")
    assert web.client.post("/v1/identities", headers=web.headers("northlight"),
                           json={"name": "kim", "consent": retain}).status_code == 201
    page = nora.get("/identities/northlight/kim").get_data(as_text=True)
    assert 'data-erase-policy="retain"' in page and "erased immediately" not in page
    assert re.search(r"until its retention date, <strong>2031-05-17</strong>", page)
    resp = nora.post("/identities/northlight/kim/withdraw",
                     data={"csrf_token": csrf(page), "confirm": "yes"})
    assert resp.status_code == 302
    after = nora.get("/identities/northlight/kim").get_data(as_text=True)
    assert "kept until its retention date, 2031-05-17, then erased" in after
    assert web.vault.describe("northlight/kim")["status"] == "withdrawn"


def test_identity_page_sizes_and_model_ids(web, maria):
    web.client.post("/v1/identities", headers=web.headers(),
                    json={"name": "ana", "consent": consent_doc()})
    model_id = "clip-vit-h-14@0123456789abcdef+buffalo_l/w600k_r50@fedcba9876543210"
    stored = web.vault.put_artifact("smiths/ana", "face", face_payload(model_id=model_id))
    page = maria.get("/identities/smiths/ana").get_data(as_text=True)
    size = web.vault.describe("smiths/ana")["artifacts"][0]["size"]
    assert size > 1024 and f"{size} B" not in page
    assert f'title="{size} bytes">{human_size(size)}</td>' in page
    assert f'title="{model_id}"' in page and "buffalo_<wbr>l/<wbr>w600k_<wbr>r50" in page
    assert f'id="artifact-{stored.id}"' in page
    assert page.count('class="table-scroll"') == 2  # artifacts and audit trail


def test_human_size_filter():
    assert [human_size(n) for n in (0, 1023, 1024, 164120, 1536 * 1024, 5 * 1024**3)] == \
        ["0 B", "1023 B", "1.0 KiB", "160 KiB", "1.5 MiB", "5.0 GiB"]
    assert str(breakable("a/<b>@c")) == "a/<wbr>&lt;b&gt;@<wbr>c"


def test_members_form_defaults_to_the_least_privilege(web, maria):
    page = maria.get("/members").get_data(as_text=True)
    options = re.findall(r'<option value="(\w+)" ?(selected)?>', page)
    assert [v for v, sel in options if sel] == ["viewer"]
    assert {v for v, _ in options} >= {"admin", "editor", "viewer"}


def _job(web, kind: str, status: str, result: dict | None, identity: str | None = None,
         error: str | None = None) -> str:
    from vault import identities as idents
    from vault.models import Job

    with web.vault.session() as s:
        owner = idents.get_owner(s, "smiths")
        ident = idents.get_identity(s, identity) if identity else None
        job = Job(owner_id=owner.id, kind=kind, status=status, result=result, error=error,
                  identity_id=ident.id if ident else None, progress=1.0, params={})
        s.add(job)
        s.flush()
        return job.id


def test_jobs_page_links_to_results(web, maria):
    for name in ("ana", "ben"):
        web.client.post("/v1/identities", headers=web.headers(),
                        json={"name": name, "consent": consent_doc()})
    scene = _job(web, "generate", "done", {"image": "generated/x.png",
                                           "identities": ["smiths/ana", "smiths/gone"]})
    fit = _job(web, "lidb", "done", {"artifact": "a1b2", "kind": "lidb"}, identity="smiths/ben")
    failed = _job(web, "generate", "failed", None, error="no identity smiths/nobody")
    sweep = _job(web, "retention_sweep", "done", {"erased": ["smiths/old"]})
    html = maria.get("/jobs").get_data(as_text=True)

    def row(job_id):
        return re.search(rf'<tr id="job-{job_id}">(.*?)</tr>', html, re.DOTALL).group(1)

    assert f'href="/generate/{scene}">Open the image</a>' in row(scene)
    assert 'href="/identities/smiths/ana">@smiths/ana</a>' in row(scene)
    assert "smiths/gone" not in row(scene)  # erased: no link to a page that is not there
    assert 'href="/identities/smiths/ben#artifact-a1b2">@smiths/ben</a>' in row(fit)
    assert "<a " not in row(failed) and "no identity smiths/nobody" in row(failed)
    assert "<a " not in row(sweep) and "erased 1" in row(sweep)


@pytest.fixture
def audit_log(web):
    """65 artifact reads of smiths/ana by two actors, and one event of northlight."""
    from vault import audit

    web.client.post("/v1/identities", headers=web.headers(),
                    json={"name": "ana", "consent": consent_doc()})
    with web.vault.session() as s:
        for i in range(65):
            audit.append(s, "artifact.read", actor="user:maria" if i % 2 else "api:idv_render",
                         owner="smiths", subject="smiths/ana", details={"n": i})
        audit.append(s, "artifact.read", actor="user:maria", owner="northlight",
                     subject="northlight/secret", details={})
    return web


EVENT_ROW = r'<tr><td data-label="#">(\d+)</td>'  # one audit event's row, its seq


def test_audit_page_filters_and_pages(audit_log, maria):
    roster = maria.get("/").get_data(as_text=True)
    assert 'href="/audit"' in roster  # in the navigation of an admin
    first = maria.get("/audit").get_data(as_text=True)
    seqs = [int(x) for x in re.findall(EVENT_ROW, first)]
    assert len(seqs) == 50 and seqs == sorted(seqs, reverse=True)  # newest first
    assert "northlight/secret" not in first
    older = re.search(r'href="(/audit\?before=\d+)" rel="next"', first).group(1)
    second = maria.get(older.replace("&amp;", "&")).get_data(as_text=True)
    more = [int(x) for x in re.findall(EVENT_ROW, second)]
    assert more and max(more) < min(seqs) and 'rel="next"' not in second
    with audit_log.vault.session() as s:
        from vault import audit

        everything = [e.seq for e in audit.events(s, owner="smiths", limit=1000)]
    assert seqs + more == everything  # no event skipped or shown twice
    # Filters: action, subject, actor, and they are kept when paging.
    by_actor = maria.get("/audit?actor=api:idv_render&action=artifact.read"
                         "&subject=smiths/ana").get_data(as_text=True)
    rows = [m.group(0) for m in re.finditer(EVENT_ROW + r".*?</tr>", by_actor, re.DOTALL)]
    assert len(rows) == 33 and all("api:<wbr>idv_<wbr>render" in r for r in rows)
    assert "user:<wbr>maria" not in "".join(rows)
    reads = maria.get("/audit?action=artifact.read").get_data(as_text=True)
    older = re.search(r'href="(/audit\?[^"]+)" rel="next"', reads).group(1).replace("&amp;", "&")
    assert "action=artifact.read" in older and "before=" in older
    rest = maria.get(older).get_data(as_text=True)
    assert len(re.findall(EVENT_ROW, reads)) + len(re.findall(EVENT_ROW, rest)) == 65
    assert "identity.create" not in rest.split("<tbody>")[1]
    creates = maria.get("/audit?action=identity.create").get_data(as_text=True)
    assert len(re.findall(EVENT_ROW, creates)) == 1
    nobody = maria.get("/audit?subject=smiths/nobody").get_data(as_text=True)
    assert "No events match these filters" in nobody
    today = dt.date.today()
    for since, until, n in [(today, today, 50), (today + dt.timedelta(days=1), "", 0),
                            ("", today - dt.timedelta(days=1), 0)]:
        html = maria.get(f"/audit?since={since}&until={until}").get_data(as_text=True)
        assert len(re.findall(EVENT_ROW, html)) == n, (since, until)
    resp = maria.get("/audit?since=yesterday")
    assert resp.status_code == 400 and "YYYY-MM-DD" in resp.get_data(as_text=True)
    resp = maria.get(f"/audit?since={today}&until={today - dt.timedelta(days=1)}")
    assert resp.status_code == 400 and "before" in resp.get_data(as_text=True)
    assert maria.get("/audit?action=nope").status_code == 400


@pytest.mark.parametrize("role", ["viewer", "editor"])
def test_audit_page_is_for_admins_only(audit_log, role):
    audit_log.user("bob", "smiths", role)
    bob = audit_log.login("bob")
    assert 'href="/audit"' not in bob.get("/").get_data(as_text=True)
    resp = bob.get("/audit", headers={"Accept": "text/html"})
    assert resp.status_code == 403 and "Not allowed" in resp.get_data(as_text=True)
    assert "artifact.read" not in resp.get_data(as_text=True)


def test_api_keys_page_shows_the_key_once(web, maria):
    page = maria.get("/api-keys").get_data(as_text=True)
    resp = maria.post("/api-keys", data={"csrf_token": csrf(page), "name": "render farm",
                                         "scopes": ["identities:read", "generate"],
                                         "expires_in_days": "30"})
    html = resp.get_data(as_text=True)
    token = re.search(r'value="(idv_[^"]+)"', html).group(1)
    assert resp.status_code == 201 and "will not be shown again" in html
    assert web.client.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code \
        == 200
    again = maria.get("/api-keys").get_data(as_text=True)
    assert token not in again and "render farm" in again
    key_id = re.search(r'action="/api-keys/(\d+)/revoke"', again).group(1)
    maria.post(f"/api-keys/{key_id}/revoke", data={"csrf_token": csrf(again)})
    assert web.client.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code \
        == 401


def test_members_page(web, maria):
    web.user("bob-viewer", None)
    page = maria.get("/members").get_data(as_text=True)
    resp = maria.post("/members", data={"csrf_token": csrf(page), "username": "bob-viewer",
                                        "role": "viewer"})
    assert resp.status_code == 302
    assert "bob-viewer" in maria.get("/members").get_data(as_text=True)
    bob = web.login("bob-viewer")
    roster = bob.get("/").get_data(as_text=True)
    assert "Enroll someone" not in roster and 'href="/api-keys"' not in roster
    resp = bob.get("/enroll", headers={"Accept": "text/html"})
    assert resp.status_code == 403 and "Not allowed" in resp.get_data(as_text=True)
    resp = maria.post("/members", data={"csrf_token": csrf(page), "username": "nobody",
                                        "role": "viewer"})
    assert resp.status_code == 400 and "no user" in resp.get_data(as_text=True)


def test_superuser_creates_an_owner_and_switches(web):
    web.user("root-user", None, superuser=True)
    c = web.login("root-user")
    page = c.get("/owners/new").get_data(as_text=True)
    resp = c.post("/owners/new", data={"csrf_token": csrf(page), "name": "parks",
                                       "kind": "family", "erase_policy": "immediate"})
    assert resp.status_code == 302
    roster = c.get("/").get_data(as_text=True)
    assert "0 identities of parks" in roster
    c.post("/owner/switch", data={"csrf_token": csrf(roster), "owner": "smiths"})
    assert "of smiths" in c.get("/").get_data(as_text=True)
    resp = c.post("/owner/switch", data={"csrf_token": csrf(roster), "owner": "nope"},
                  headers={"Accept": "text/html"})
    assert resp.status_code == 404
    # A plain user with no owner is told what to do.
    web.user("lonely", None)
    lonely = web.login("lonely")
    assert lonely.get("/").headers["Location"] == "/no-owner"
    assert "not a member" in lonely.get("/no-owner").get_data(as_text=True)
    assert lonely.get("/owners/new", headers={"Accept": "text/html"}).status_code == 403


def test_public_generate_and_jobs_pages(web, maria):
    policy = web.app.test_client().get("/retention-policy")
    html = policy.get_data(as_text=True)
    assert policy.status_code == 200 and "Not the photos" in html and "0.70" in html
    for purpose in ("enroll", "generate", "share"):
        assert purpose in html
    gen = maria.get("/generate").get_data(as_text=True)
    assert 'name="prompt"' in gen and "generate.js" in gen and "No scenes yet." in gen
    assert "Generated images may show a person" in gen
    jobs = maria.get("/jobs").get_data(as_text=True)
    assert "No jobs yet" in jobs
