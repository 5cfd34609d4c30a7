"""Fixtures of the web-app tests: an app over a vault with two owners, keys, users, photos.

Import with ``from tests.web.web_fixtures import *`` in a test module.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import pytest
from argon2 import PasswordHasher
from PIL import Image

from encoders.standins.synthetic_faces import synthetic_face
from tests.helpers import consent_doc
from vault import accounts, api_keys
from vault.vault import Vault
from web.app import WebConfig, create_app

__all__ = [
    "PASSWORD",
    "TWIN_OF_3",
    "Web",
    "cheap_passwords",
    "gen_web",
    "lookup_roster",
    "photo_bytes",
    "web",
]

PASSWORD = "correct horse battery"
SECRET = "s" * 48


@pytest.fixture(autouse=True)
def cheap_passwords(monkeypatch):
    """argon2id with small costs: the same algorithm, a hundred times faster."""
    monkeypatch.setattr(accounts, "hasher",
                        PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    monkeypatch.setattr(accounts, "_DUMMY_HASH", None)


_PHOTO_CACHE: dict[tuple, bytes] = {}
TWIN_OF_3 = (3, 0.4)  # synthetic person 4 with this kin resembles person 3: a review


def photo_bytes(person: int, photo: int = 0, fmt: str = "JPEG",
                kin: tuple[int, float] | None = None) -> bytes:
    """A synthetic person's photo, encoded (the tiny models see these faces)."""
    key = (person, photo, fmt, kin)
    if key not in _PHOTO_CACHE:
        buf = io.BytesIO()
        Image.fromarray(synthetic_face(person, photo, kin=kin)).save(buf, fmt)
        _PHOTO_CACHE[key] = buf.getvalue()
    return _PHOTO_CACHE[key]


@dataclass
class Web:
    app: object
    vault: Vault
    keys: dict[str, str] = field(default_factory=dict)  # "<owner>:<scope or all>" -> token

    @property
    def client(self):
        return self.app.test_client()

    @property
    def state(self):
        return self.app.extensions["idvault"]

    def key(self, owner: str = "smiths", *scopes: str) -> str:
        scopes = scopes or api_keys.SCOPES
        label = f"{owner}:{','.join(sorted(scopes))}"
        if label not in self.keys:
            with self.vault.session() as s:
                _, self.keys[label] = api_keys.create_key(s, owner, label[:60], list(scopes),
                                                          actor="test")
        return self.keys[label]

    def headers(self, owner: str = "smiths", *scopes: str) -> dict:
        return {"Authorization": f"Bearer {self.key(owner, *scopes)}"}

    def user(self, username: str, owner: str | None = "smiths", role: str = "admin", *,
             superuser: bool = False) -> str:
        with self.vault.session() as s:
            try:
                accounts.get_user(s, username)
            except Exception:
                accounts.create_user(s, username, PASSWORD, superuser=superuser, actor="test")
            if owner:
                accounts.grant(s, username, owner, role, actor="test")
        return username

    def login(self, username: str, password: str = PASSWORD):
        """A test client signed in as ``username`` (``client.csrf`` holds its token)."""
        c = self.app.test_client()
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
        resp = c.post("/login", data={"username": username, "password": password,
                                      "csrf_token": token.group(1), "next": "/"})
        assert resp.status_code == 302, resp.get_data(as_text=True)[:500]
        # Signing in starts a new session with a new CSRF token.
        page = c.get("/account").get_data(as_text=True)
        c.csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        assert c.csrf != token.group(1)
        return c

    def enroll(self, handle: str, person: int, photos: tuple[int, ...] = (0, 1), *,
               headers: dict | None = None, consent: dict | None = None, fmt: str = "JPEG",
               kin: tuple[int, float] | None = None):
        owner, name = handle.split("/")
        data = {"photos": [(io.BytesIO(photo_bytes(person, i, fmt, kin)), f"{name}-{i}.jpg")
                           for i in photos]}
        if consent is not False:
            data["consent"] = json.dumps(consent or consent_doc())
        return self.client.post(f"/v1/identities/{owner}/{name}/enroll", data=data,
                                headers=headers or self.headers(owner),
                                content_type="multipart/form-data")


@pytest.fixture
def web(family: Vault, tiny_models) -> Web:
    """An app over a vault with owners smiths (family) and northlight (studio)."""
    app = create_app(WebConfig(vault=family, models_dir=tiny_models, run_jobs=False,
                               secret_key=SECRET))
    yield Web(app, family)
    app.extensions["idvault"].close()


@pytest.fixture
def gen_web(family: Vault, gen_models) -> Web:
    """Like ``web``, with the models of `idvault models tiny` (sdxl-tiny and the identity
    checkpoints), so generate jobs run; the worker thread is off (``run_pending``)."""
    app = create_app(WebConfig(vault=family, models_dir=gen_models, run_jobs=False,
                               secret_key=SECRET))
    yield Web(app, family)
    app.extensions["idvault"].close()


def lookup_roster(v: Vault) -> None:
    """Identities a lookup by handle can find in each state: ``smiths/ana`` with a face
    and a Celeb Basis artifact, ``smiths/ben`` (consent given by himself),
    ``smiths/held`` held for review, ``northlight/sol`` withdrawn and kept."""
    import numpy as np
    from sqlalchemy import select

    from tests.helpers import basis_payload, consent, face_payload
    from vault.models import Identity

    v.create_identity("smiths/ana", consent(), actor="t")
    v.put_artifact("smiths/ana", "face", face_payload(seed=1), actor="t")
    v.put_artifact("smiths/ana", "celeb_basis",
                   basis_payload(np.random.default_rng(0).normal(size=(2, 512))), actor="t")
    v.create_identity("smiths/ben", consent(given_by="self", guardian_name=None), actor="t")
    v.create_identity("smiths/held", consent(), actor="t")
    with v.session() as s:  # held without a review: resealed, as idvault would
        held = s.scalar(select(Identity).where(Identity.name == "held"))
        held.status = "held"
        v._reseal(s, held)
    v.create_identity("northlight/sol", consent(), actor="t")
    v.put_artifact("northlight/sol", "face", face_payload(seed=2), actor="t")
    v.withdraw_consent("northlight/sol", reason="no more", actor="t")  # retained
