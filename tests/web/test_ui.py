"""The HTML UI through the Flask test client: sign-in, roster, enrollment wizard,
identity page, reviews, API keys, members, owners, public pages."""

from __future__ import annotations

import hashlib
import io
import re

import pytest

from tests.helpers import consent_doc
from tests.web.web_fixtures import PASSWORD, TWIN_OF_3, photo_bytes
from vault import accounts


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
    # Five failures lock the name (and the address) for a while.
    from web.auth import LoginThrottle

    web.state.login_throttle = LoginThrottle()
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
    assert resp.status_code == 200 and "Signed erasure receipt" in html
    assert "idvault.erasure-receipt/1" in html
    assert maria.get("/identities/smiths/ana").status_code == 404
    resp = maria.post("/identities/smiths/ben/withdraw", data={"csrf_token": csrf(page),
                                                                "confirm": "yes",
                                                                "reason": "asked"})
    assert resp.status_code == 200 and "withdrew consent" in resp.get_data(as_text=True)


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
