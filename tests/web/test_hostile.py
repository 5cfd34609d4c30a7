"""Malformed and hostile input: bad JSON, wrong types, huge uploads, non-images,
path-like handles, SQL-ish strings. Every one is a 4xx with a clear message in the one
error shape, and nothing is stored."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.helpers import consent_doc
from tests.web.web_fixtures import SECRET, photo_bytes
from vault.models import AuditEvent
from web.app import WebConfig, create_app


@pytest.fixture
def backend() -> str:
    return "sqlite"


def audit_count(web) -> int:
    with web.vault.session() as s:
        return s.query(AuditEvent).count()


SOURCE_ROOT = str(Path(__file__).resolve().parents[2])  # no server paths in answers


def refused(resp, status: int | tuple[int, ...], words: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert resp.status_code in statuses, (resp.status_code, resp.get_data(as_text=True)[:500])
    body = resp.get_json()
    assert set(body) == {"error"} and body["error"]["message"]
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and SOURCE_ROOT not in text and ".py" not in text
    if words:
        assert words.lower() in body["error"]["message"].lower(), body
    return body["error"]


@pytest.fixture
def before(web):
    web.headers()  # create the key first: it is audited
    return audit_count(web)


def nothing_stored(web, before: int) -> None:
    listing = web.client.get("/v1/identities", headers=web.headers()).get_json()
    assert listing["items"] == []
    assert audit_count(web) == before


def test_bad_json(web, before):
    h = {**web.headers(), "Content-Type": "application/json"}
    for body, words in ((b"{", "not valid JSON"), (b"[1, 2]", "JSON object"),
                        (b"null", "JSON object"), (b"\xff\xfe\x00garbage", "not valid JSON"),
                        (b'{"name": "ana", "consent": ' + b"[" * 50_000, "not valid JSON"),
                        (b"123", "JSON object")):
        refused(web.client.post("/v1/identities", data=body, headers=h), 400, words)
    refused(web.client.post("/v1/identities", data="name=ana", headers={
        **web.headers(), "Content-Type": "application/x-www-form-urlencoded"}), 415, "JSON")
    nothing_stored(web, before)


def test_wrong_types_and_fields(web, before):
    h = web.headers()
    cases = [
        ({"name": 123, "consent": consent_doc()}, 400, "'name'"),
        ({"name": ["ana"], "consent": consent_doc()}, 400, "'name'"),
        ({"name": "ana", "consent": "yes"}, 422, "JSON object"),
        ({"name": "ana", "consent": consent_doc(purposes="enroll")}, 422, "purposes"),
        ({"name": "ana", "consent": consent_doc(retain_until=20301231)}, 422, "retain_until"),
        ({"name": "ana", "consent": consent_doc(retain_until="2001-01-01")}, 422, "future"),
        ({"name": "ana", "consent": consent_doc(), "admin": True}, 400, "unknown field"),
        ({"name": "ana"}, 400, "missing field"),
        ({"name": "ana", "consent": {**consent_doc(), "evidence_file": "/etc/passwd"}}, 422,
         "evidence_file"),
        ({"name": "Ana Smith", "consent": consent_doc()}, 400, "lowercase"),
        ({"name": "a" * 5000, "consent": consent_doc()}, 400, "'name'"),
    ]
    for body, status, words in cases:
        refused(web.client.post("/v1/identities", json=body, headers=h), status, words)
    for body, words in (({"name": "k", "scopes": "admin"}, "scopes"),
                        ({"name": "k", "scopes": ["admin"], "expires_in_days": "30"}, "expires"),
                        ({"name": "k", "scopes": ["admin"], "expires_in_days": True}, "expires"),
                        ({"name": "k", "scopes": ["admin"], "expires_in_days": 10**9},
                         "expires"),
                        ({"name": "\x00\x07", "scopes": ["admin"]}, "printable")):
        refused(web.client.post("/v1/api-keys", json=body, headers=h), 400, words)
    for query, words in (("limit=abc", "integer"), ("limit=0", "between"),
                         ("limit=99999999999999999999999", "between"), ("status=dead", "one of"),
                         ("cursor=" + "x" * 200, "cursor")):
        refused(web.client.get(f"/v1/identities?{query}", headers=h), 400, words)
    refused(web.client.post("/v1/jobs", json={"kind": "rebuild_index", "params": [1]},
                            headers=h), 400, "params")
    refused(web.client.post("/v1/not-same", json={"a": 1, "b": None}, headers=h), 400)
    nothing_stored(web, before)


def test_huge_uploads_are_refused_before_reading(web, family, tiny_models, before):
    small = create_app(WebConfig(vault=family, models_dir=tiny_models, run_jobs=False,
                                 secret_key=SECRET, max_request_bytes=256 * 1024))
    try:
        big = io.BytesIO(b"\xff\xd8\xff" + b"\x00" * (600 * 1024))
        resp = small.test_client().post(
            "/v1/identities/smiths/ana/enroll", headers=web.headers(),
            data={"photos": [(big, "big.jpg")], "consent": json.dumps(consent_doc())},
            content_type="multipart/form-data")
        e = refused(resp, 413, "larger than")
        assert e["code"] == "payload_too_large" and e["details"]["limit_bytes"] == 256 * 1024
        resp = small.test_client().post("/v1/identities", headers=web.headers(),
                                        json={"name": "ana", "consent": consent_doc(),
                                              "pad": "x" * 400_000})
        refused(resp, 413)
    finally:
        small.extensions["idvault"].close()
    # Too many photos, and a photo above the decoder's limits.
    many = [(io.BytesIO(photo_bytes(1, 0)), f"{i}.jpg") for i in range(40)]
    refused(web.client.post("/v1/photos/check", headers=web.headers(), data={"photos": many},
                            content_type="multipart/form-data"), 400, "at most")
    nothing_stored(web, before)


def test_non_images_and_decompression_bombs(web, before):
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(bomb, "PNG")  # 100 MP of zeros: tiny file
    uploads = [("notes.txt", b"just text"), ("page.pdf", b"%PDF-1.4 ..."),
               ("anim.gif", b"GIF89a...."), ("empty.jpg", b""), ("bomb.png", bomb.getvalue()),
               ("script.jpg", b"<script>alert(1)</script>")]
    for name, data in uploads:
        e = refused(web.client.post(
            "/v1/identities/smiths/ana/enroll", headers=web.headers(),
            data={"photos": [(io.BytesIO(data), name)], "consent": json.dumps(consent_doc())},
            content_type="multipart/form-data"), 422)
        assert e["code"] == "photo_rejected" and e["details"]["photos"][0]["ok"] is False
        assert "<script>" not in json.dumps(e) or name == "script.jpg"
    e = refused(web.client.post(
        "/v1/identities/smiths/ana/enroll", headers=web.headers(),
        data={"photos": [(io.BytesIO(bomb.getvalue()), "bomb.png")],
              "consent": json.dumps(consent_doc())}, content_type="multipart/form-data"), 422)
    assert "decompression bomb" in e["message"] or "megapixels" in e["message"]
    refused(web.client.post("/v1/identities/smiths/ana/enroll", headers=web.headers(),
                            json={"photos": []}), 415, "multipart")
    refused(web.client.post("/v1/identities/smiths/ana/enroll", headers=web.headers(),
                            data={"consent": json.dumps(consent_doc())},
                            content_type="multipart/form-data"), 400, "no photos")
    refused(web.client.post("/v1/identities/smiths/ana/enroll", headers=web.headers(),
                            data={"photos": [(io.BytesIO(photo_bytes(1)), "a.jpg")],
                                  "consent": "{not json"},
                            content_type="multipart/form-data"), 400, "not valid JSON")
    refused(web.client.post("/v1/identities/smiths/ana/enroll", headers=web.headers(),
                            data={"photos": [(io.BytesIO(photo_bytes(1)), "a.jpg")],
                                  "consent": "[" * 100_000},
                            content_type="multipart/form-data"), 400, "not valid JSON")
    refused(web.client.post("/v1/identities/smiths/ana/enroll", headers=web.headers(),
                            data={"photos": [(io.BytesIO(photo_bytes(1)), "a.jpg")],
                                  "consent": json.dumps(consent_doc()), "pick": "all"},
                            content_type="multipart/form-data"), 400, "pick")
    refused(web.client.post("/v1/identities/smiths/ana/enroll", headers=web.headers(),
                            data={"photos": [(io.BytesIO(photo_bytes(1)), "a.jpg")],
                                  "consent": json.dumps(consent_doc()), "sneaky": "x"},
                            content_type="multipart/form-data"), 400, "unknown field")
    nothing_stored(web, before)


def _image(width: int, height: int, mode: str = "RGB", **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _huge_palette_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 3, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + bytes(64) for _ in range(64)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"PLTE", bytes(range(256)) * 300) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


# Decodable but hostile: a 60000x2 PNG once reached OpenCV and answered 500.
HOSTILE_IMAGES = [
    ("strip.png", _image(60000, 2), "30000 times as wide"),
    ("tower.png", _image(2, 60000), "30000 times as high"),
    ("dot.png", _image(1, 1), "too small"),
    ("thumb.png", _image(31, 31), "too small"),
    ("palette.png", _huge_palette_png(), "palette"),
]


def test_hostile_images_get_a_clear_4xx_naming_the_problem(web, before):
    for name, data, words in HOSTILE_IMAGES:
        e = refused(web.client.post(
            "/v1/identities/smiths/ana/enroll", headers=web.headers(),
            data={"photos": [(io.BytesIO(data), name)], "consent": json.dumps(consent_doc())},
            content_type="multipart/form-data"), 422, words)
        assert e["code"] == "photo_rejected" and e["details"]["photos"] == [
            {"photo": name, "ok": False, "reason": e["details"]["photos"][0]["reason"]}]
        assert words in e["details"]["photos"][0]["reason"]
    # /photos/check answers one result per photo (the UI shows each beside its photo):
    # every hostile one is refused there with its reason, and the good one passes.
    uploads = [(io.BytesIO(data), name) for name, data, _ in HOSTILE_IMAGES]
    resp = web.client.post("/v1/photos/check", headers=web.headers(), content_type=
                           "multipart/form-data",
                           data={"photos": [*uploads, (io.BytesIO(photo_bytes(1)), "ok.jpg")]})
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    results = resp.get_json()["photos"]
    assert [r["photo"] for r in results] == [n for n, _, _ in HOSTILE_IMAGES] + ["ok.jpg"]
    for (name, _, words), r in zip(HOSTILE_IMAGES, results, strict=False):
        assert r["ok"] is False and r["reason"].startswith(f"{name}: ") and words in r["reason"]
    assert results[-1]["ok"] is True
    nothing_stored(web, before)


HOSTILE_PATHS = [
    "/v1/identities/smiths/..", "/v1/identities/../etc", "/v1/identities/%2e%2e/passwd",
    "/v1/identities/smiths/..%2f..%2fetc%2fpasswd", "/v1/identities/smiths/ana%00",
    "/v1/identities/smiths/ANA", "/v1/identities/smiths/an%C3%A4",
    "/v1/identities/smiths/ana;rm%20-rf", "/v1/identities/smiths/%252e%252e",
    "/v1/identities/smiths/admin", "/v1/identities/smiths/ana'--",
    "/v1/identities/smiths/ana%27%20OR%201%3D1--", "/v1/identities/smiths/" + "a" * 300,
    "/v1/identities/smiths/ana/artifacts/..%2F..%2Fkeystore.db/payload",
    "/v1/identities/smiths/ana/exports/..%2f..%2fmaster.key",
    "/v1/reviews/1%20OR%201=1/accept", "/v1/jobs/'%20OR%20''='", "/v1/api-keys/-1",
    "/static/../vault.db", "/static/%2e%2e/%2e%2e/master.key",
]


def test_path_like_and_sql_like_handles(web, before):
    h = web.headers()
    for path in HOSTILE_PATHS:
        for method in ("GET", "POST", "DELETE"):
            resp = web.client.open(path, method=method, headers=h)
            assert 400 <= resp.status_code < 500, (method, path, resp.status_code)
            text = resp.get_data(as_text=True)
            assert "Traceback" not in text and "SQLite" not in text
            if resp.mimetype == "application/json":
                assert set(resp.get_json()) == {"error"}
    nothing_stored(web, before)


def test_sql_like_strings_are_just_data(web):
    """SQL in values is stored and returned literally; the tables are intact."""
    h = web.headers()
    subject = "Robert'); DROP TABLE identities;--"
    created = web.client.post("/v1/identities", headers=h, json={
        "name": "bobby", "consent": consent_doc(subject=subject, guardian_name="' OR '1'='1")})
    assert created.status_code == 201
    got = web.client.get("/v1/identities/smiths/bobby", headers=h).get_json()
    assert got["consent"]["subject"] == subject
    assert got["consent"]["guardian_name"] == "' OR '1'='1"
    for query in ("cursor=' OR 1=1 --", "cursor=%27%3B%20DROP%20TABLE%20users%3B--"):
        resp = web.client.get(f"/v1/identities?{query}", headers=h)
        assert resp.status_code == 200  # a cursor is compared as text, nothing more
    refused(web.client.get("/v1/audit?subject=smiths/x' OR '1'='1", headers=h), 400, "name")
    resp = web.client.get("/v1/identities", headers=h).get_json()
    assert [i["handle"] for i in resp["items"]] == ["smiths/bobby"]
    refused(web.client.post("/v1/identities", headers=h, json={
        "name": "x'; DROP TABLE owners;--", "consent": consent_doc()}), 400, "may use only")


def test_hostile_headers_and_methods(web, before):
    for headers in ({"Authorization": "Bearer " + "A" * 10_000},
                    {"Authorization": "Bearer idv_\u00e9\u00e9\u00e9"},
                    {"Authorization": "Bearer idv_0123456789ab_" + "\x00" * 43},
                    {"Authorization": "Token abc"}, {"Authorization": ""},
                    {"Cookie": "idvault_session=forged.value.sig"}):
        resp = web.client.get("/v1/identities", headers=headers)
        refused(resp, 401)
    refused(web.client.open("/v1/identities", method="PATCH", headers=web.headers()), 405,
            "not allowed")
    resp = web.client.open("/v1/identities", method="PATCH", headers=web.headers())
    assert "GET" in resp.headers["Allow"] and resp.get_json()["error"]["details"]["allowed"]
    nothing_stored(web, before)
