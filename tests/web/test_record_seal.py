"""A tampered identity record over HTTP: the one JSON error shape, with the message that
names the identity and what changed (web/errors.py maps RecordTampered to 409)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.helpers import consent, face_payload

BOTH = pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                                  marks=pytest.mark.postgres)])


@pytest.fixture
def backend() -> str:
    return "sqlite"


@BOTH
def test_tampered_identity_is_a_409_naming_what_changed(web):
    v = web.vault
    v.create_identity("smiths/ana", consent(purposes=["enroll"]), actor="t")
    v.put_artifact("smiths/ana", "face", face_payload(), actor="t")
    doc = v.describe("smiths/ana")
    art = doc["artifacts"][0]["id"]
    h = web.headers("smiths", "artifacts:read", "identities:read")
    url = f"/v1/identities/smiths/ana/artifacts/{art}/payload?purpose=share"
    assert web.client.get(url, headers=h).status_code == 403  # share is not granted
    with v.engine.begin() as c:
        c.execute(text("""update consents set purposes = '["enroll","share"]'"""))
    resp = web.client.get(url, headers=h)
    assert resp.status_code == 409, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == "record_tampered"
    message = body["error"]["message"]
    assert "smiths/ana" in message and doc["id"] in message
    assert "purposes were changed from [enroll] to [enroll, share]" in message
    assert body["error"]["details"]["identity"] == doc["id"]
    # the roster still lists it (a listing is no use; it never decrypts anything)
    listed = web.client.get("/v1/identities", headers=h)
    assert listed.status_code == 200
    assert [i["handle"] for i in listed.get_json()["items"]] == ["smiths/ana"]
