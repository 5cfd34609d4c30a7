"""The ``reactor`` and ``ip_adapter_embeds`` exports over the API (``/exports/<format>``,
scope ``artifacts:read``) and the CLI (``idvault artifact export``): consent must grant
``share``, and the files are the library's (tests/encoders/test_adapter_exports.py checks
their layouts against ReActor's loader and diffusers' projection)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load

from encoders.fitting.exports import export
from tests.encoders.adapter_payloads import face_payload, faceid_payload
from tests.helpers import consent_doc
from vault import codec
from web.cli.main import main


@pytest.fixture
def backend() -> str:
    return "sqlite"


def same_file(a: bytes, b: bytes) -> bool:
    ta, tb = load(a), load(b)
    return (ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
            and codec.read_header(a)["__metadata__"] == codec.read_header(b)["__metadata__"])


def _identity(web, name: str, purposes: list[str]) -> str:
    resp = web.client.post("/v1/identities", headers=web.headers(),
                           json={"name": name, "consent": consent_doc(purposes=purposes)})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return f"smiths/{name}"


def test_api_exports_need_share_and_artifacts_read(web):
    ana = _identity(web, "ana", ["enroll", "generate", "share"])
    bo = _identity(web, "bo", ["enroll", "generate"])
    face, faceid = face_payload(1), faceid_payload(2)
    for handle in (ana, bo):
        web.vault.put_artifact(handle, "face", face, actor="test")
        web.vault.put_artifact(handle, "faceid", faceid, actor="test")
    hr = web.headers("smiths", "artifacts:read")

    resp = web.client.get("/v1/identities/smiths/ana/exports/reactor", headers=hr)
    assert resp.status_code == 200 and resp.mimetype == "application/octet-stream"
    assert 'filename="smiths-ana-reactor-face-model.safetensors"' in \
        resp.headers["Content-Disposition"]
    np.testing.assert_array_equal(load(resp.data)["embedding"],
                                  codec.decode(face).tensors["embeddings"].mean(0))
    resp = web.client.get("/v1/identities/smiths/ana/exports/ip_adapter_embeds", headers=hr)
    assert resp.status_code == 200
    assert load(resp.data)["id_embeds"].shape == (2, 2, 1, 512)
    # The API gives the library's file (safetensors orders metadata keys arbitrarily,
    # so the files are compared by content, not bytes).
    assert same_file(resp.data, export(web.vault, ana, "ip_adapter_embeds").data)

    for fmt in ("reactor", "ip_adapter_embeds"):
        refused = web.client.get(f"/v1/identities/smiths/bo/exports/{fmt}", headers=hr)
        assert refused.status_code == 403
        assert refused.get_json()["error"]["code"] == "purpose_not_granted"
        wrong_scope = web.client.get(f"/v1/identities/smiths/ana/exports/{fmt}",
                                     headers=web.headers("smiths", "identities:read"))
        assert wrong_scope.status_code == 403
        assert wrong_scope.get_json()["error"]["code"] == "forbidden"
    # Another owner's key never sees smiths' identities.
    other = web.client.get("/v1/identities/smiths/ana/exports/reactor",
                           headers=web.headers("northlight", "artifacts:read"))
    assert other.status_code == 404


def test_cli_exports_write_0600_files(family, tmp_path, capsys):
    from tests.helpers import consent

    family.create_identity("smiths/ana", consent(purposes=["enroll", "share"]), actor="test")
    family.put_artifact("smiths/ana", "face", face_payload(3, photos=2), actor="test")
    family.put_artifact("smiths/ana", "faceid", faceid_payload(4, photos=1), actor="test")
    expected = {"reactor": export(family, "smiths/ana", "reactor").data,
                "ip-adapter-embeds": export(family, "smiths/ana", "ip_adapter_embeds").data}
    data_dir = str(family.settings.data_dir)
    family.dispose()  # the CLI opens the vault itself
    for fmt, data in expected.items():
        out = tmp_path / f"ana-{fmt}.safetensors"
        rc = main(["artifact", "export", "smiths/ana", "--format", fmt, "-o", str(out),
                   "--data-dir", data_dir])
        printed = capsys.readouterr()
        assert rc == 0, printed.err
        assert f"wrote {out}" in printed.out
        assert out.stat().st_mode & 0o777 == 0o600
        assert same_file(out.read_bytes(), data)
    rc = main(["artifact", "export", "smiths/nobody", "--format", "reactor", "-o",
               str(tmp_path / "x"), "--data-dir", data_dir])
    assert rc == 6 and "no identity smiths/nobody" in capsys.readouterr().err
