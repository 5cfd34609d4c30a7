"""Every timestamp the API returns says it is UTC ('Z' or '+00:00'), on SQLite as on
PostgreSQL: identities, consents, artifacts, jobs, API keys, audit events, reviews,
not-same pairs, the owner and its members."""

from __future__ import annotations

import re

from tests.web.web_fixtures import TWIN_OF_3

UTC_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")
TIME_KEYS = re.compile(r"^(.*_at|at|since)$")


def stamps(doc: object, path: str = "") -> list[tuple[str, object]]:
    """(path, value) of every non-null timestamp field in a JSON document."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if TIME_KEYS.match(k) and v is not None:
                out.append((f"{path}.{k}", v))
            out += stamps(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += stamps(v, f"{path}[{i}]")
    return out


def test_every_timestamp_carries_utc(web):
    h = web.headers()

    def get(path: str) -> dict:
        resp = web.client.get(path, headers=h)
        assert resp.status_code == 200, (path, resp.get_data(as_text=True)[:300])
        return resp.get_json()

    assert web.enroll("smiths/cleo", 3, (0, 1, 2)).status_code == 201
    assert web.enroll("smiths/dan", 4, (0, 1, 2), kin=TWIN_OF_3).get_json()["status"] == "held"
    # northlight keeps what is withdrawn (retain policy): a withdrawn_at to read back.
    assert web.enroll("northlight/lee", 5, (0, 1)).status_code == 201
    assert web.client.post("/v1/identities/northlight/lee/consent/withdraw",
                           headers=web.headers("northlight")).status_code == 200
    # A review decided (decided_at), a not-same pair, a job, a key used once (last_used_at).
    [review] = get("/v1/reviews")["items"]
    assert web.client.post(f"/v1/reviews/{review['id']}/accept", headers=h).status_code == 200
    assert web.client.post("/v1/jobs", json={"kind": "rebuild_index"},
                           headers=h).status_code == 202
    web.user("mia")
    docs = {path: get(path) for path in (
        "/v1/identities", "/v1/identities/smiths/cleo", "/v1/identities/smiths/cleo/consent",
        "/v1/identities/smiths/cleo/artifacts", "/v1/reviews?status=accepted", "/v1/not-same",
        "/v1/jobs", "/v1/api-keys", "/v1/audit", "/v1/owner", "/v1/owner/members")}
    withdrawn = web.client.get("/v1/identities/northlight/lee",
                               headers=web.headers("northlight"))
    docs["/v1/identities/northlight/lee"] = withdrawn.get_json()
    found = [(f"{path}{where}", value) for path, doc in docs.items()
             for where, value in stamps(doc)]
    bad = [(where, value) for where, value in found
           if not (isinstance(value, str) and UTC_STAMP.match(value))]
    assert not bad, bad
    # Each kind of timestamp was seen (a field renamed or dropped would pass unseen).
    seen = {re.sub(r"\[\d+\]", "", where) for where, _ in found}
    for expected in (
            "/v1/identities.items.created_at", "/v1/identities.items.consent.given_at",
            "/v1/identities/northlight/lee.consent.withdrawn_at",
            "/v1/identities/smiths/cleo/artifacts.items.created_at",
            "/v1/reviews?status=accepted.items.created_at",
            "/v1/reviews?status=accepted.items.decided_at", "/v1/not-same.items.created_at",
            "/v1/jobs.items.created_at", "/v1/api-keys.items.created_at",
            "/v1/api-keys.items.last_used_at", "/v1/audit.items.at", "/v1/owner.created_at",
            "/v1/owner/members.items.since"):
        assert expected in seen, (expected, sorted(seen))
