"""The "idvault Identity" node against a real idvault server on loopback (waitress): the
lookup gives the stored embeddings, decrypted under the caller's purpose and audited;
``IS_CHANGED`` follows the artifact; a wrong key, a missing scope, an unknown handle, a
withdrawn consent, an erased identity and an unreachable server are clear errors. ComfyUI
is not installed: the tests call the node class the way ComfyUI's executor does
(``IS_CHANGED`` as a classmethod with the widget values, then ``FUNCTION`` on an instance).
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tests.encoders.adapter_payloads import faceid_payload
from tests.helpers import consent_doc
from vault import codec
from web.comfyui.client import AuthError, ConsentRefused, NotFoundError, ScopeError, Unreachable
from web.comfyui.identity import IdvaultIdentity

PURPOSES = ["enroll", "generate"]


def _identity(web, handle: str, payload: bytes, purposes=PURPOSES) -> None:
    owner, name = handle.split("/")
    resp = web.client.post("/v1/identities", headers=web.headers(owner),
                           json={"name": name, "consent": consent_doc(purposes=purposes)})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    web.vault.put_artifact(handle, "faceid", payload, actor="test")


def _inputs(url: str, key: str, handle: str = "smiths/ana", **over) -> dict:
    return {"server_url": url, "api_key_env": "IDVAULT_TEST_UNSET", "api_key": key,
            "handle": handle, "kind": "faceid", "purpose": "generate", **over}


def _reads(web, handle: str) -> int:
    owner = handle.split("/")[0]
    events = web.client.get(f"/v1/audit?subject={handle}", headers=web.headers(owner)).get_json()
    return sum(e["action"] == "artifact.read" for e in events["items"])


def test_lookup_gives_the_stored_embeddings_and_is_changed_follows_the_artifact(web, live):
    payload = faceid_payload(1, photos=2)
    _identity(web, "smiths/ana", payload)
    key = web.key("smiths", "identities:read", "artifacts:read")
    inputs = _inputs(live, key)
    node = IdvaultIdentity()

    (out,) = node.load(**inputs)
    stored = codec.decode(payload)
    assert out["handle"] == "smiths/ana" and out["kind"] == "faceid"
    assert out["purpose"] == "generate" and out["model_id"] == stored.model_id
    assert sorted(out["tensors"]) == ["clip_embeds", "clip_negative", "normed"]
    for name, value in stored.tensors.items():
        np.testing.assert_array_equal(out["tensors"][name].numpy(), value)  # bit-exact
    arts = web.client.get("/v1/identities/smiths/ana/artifacts",
                          headers=web.headers()).get_json()["items"]
    assert out["artifact_id"] == arts[0]["id"] and out["sha256"] == arts[0]["sha256"]
    assert _reads(web, "smiths/ana") == 1  # the server audited the decrypting read

    version = IdvaultIdentity.IS_CHANGED(**inputs)
    assert version == IdvaultIdentity.IS_CHANGED(**inputs)  # unchanged: ComfyUI may reuse
    assert arts[0]["id"] in version and arts[0]["sha256"] in version
    assert _reads(web, "smiths/ana") == 1  # IS_CHANGED reads metadata only, never payloads

    # Re-enrolled (a replaced artifact): a new version, and the node returns the new one.
    newer = faceid_payload(2, photos=1)
    web.vault.put_artifact("smiths/ana", "faceid", newer, actor="test")
    assert IdvaultIdentity.IS_CHANGED(**inputs) != version
    (again,) = node.load(**inputs)
    np.testing.assert_array_equal(again["tensors"]["normed"].numpy(),
                                  codec.decode(newer).tensors["normed"])
    assert _reads(web, "smiths/ana") == 2

    # The key can come from the environment variable the node names.
    env = _inputs(live, "", api_key_env="IDVAULT_TEST_KEY")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDVAULT_TEST_KEY", key)
        assert node.load(**env)[0]["artifact_id"] == again["artifact_id"]
    with pytest.raises(AuthError, match="set the environment variable IDVAULT_TEST_KEY"):
        node.load(**env)


def test_clear_errors(web, live):
    _identity(web, "smiths/ana", faceid_payload(1))
    node = IdvaultIdentity()
    good = web.key("smiths", "identities:read", "artifacts:read")

    with pytest.raises(AuthError, match=r"rejected the API key \(401\)"):
        node.load(**_inputs(live, "idv_000000000000_" + "x" * 43))
    with pytest.raises(AuthError, match="401"):
        IdvaultIdentity.IS_CHANGED(**_inputs(live, "idv_000000000000_" + "x" * 43))
    no_payloads = web.key("smiths", "identities:read")
    with pytest.raises(ScopeError, match="artifacts:read"):
        node.load(**_inputs(live, no_payloads))
    with pytest.raises(NotFoundError, match="no identity smiths/nobody"):
        node.load(**_inputs(live, good, "smiths/nobody"))
    with pytest.raises(NotFoundError, match="no identity smiths/ana"):  # another owner's key
        node.load(**_inputs(live, web.key("northlight", "identities:read", "artifacts:read")))
    with pytest.raises(NotFoundError, match="has no instantid artifact"):
        node.load(**_inputs(live, good, kind="instantid"))
    with pytest.raises(ConsentRefused, match="does not grant 'share'"):
        IdvaultIdentity.IS_CHANGED(**_inputs(live, good, purpose="share"))
    with pytest.raises(ConsentRefused, match="purpose_not_granted"):
        node.load(**_inputs(live, good, purpose="share"))  # the server's own refusal
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Unreachable, match=f"cannot reach the idvault server at "
                                          f"http://127.0.0.1:{port}"):
        node.load(**_inputs(f"http://127.0.0.1:{port}", good))
    with pytest.raises(Unreachable, match="not an idvault server URL"):
        node.load(**_inputs("127.0.0.1:8080", good))
    # Revoking the key stops it at once.
    doomed = web.key("smiths", "identities:read", "artifacts:read", "admin")
    assert node.load(**_inputs(live, doomed))[0]["handle"] == "smiths/ana"
    key_id = next(k["id"] for k in web.client.get("/v1/api-keys", headers=web.headers())
                  .get_json()["items"] if k["prefix"] in doomed)
    assert web.client.delete(f"/v1/api-keys/{key_id}", headers=web.headers()).status_code == 200
    with pytest.raises(AuthError, match="401"):
        IdvaultIdentity.IS_CHANGED(**_inputs(live, doomed))


def test_withdrawn_consent_is_refused_and_nothing_is_cached(web, live):
    """A studio keeps the withdrawn identity's record (erase policy 'retain'); a family's
    is erased at once. Either way IS_CHANGED raises (ComfyUI then runs the node again,
    NaN) and the run is refused by the server: nothing held by the node answers."""
    for handle in ("northlight/cy", "smiths/ana"):
        _identity(web, handle, faceid_payload(3))
    node = IdvaultIdentity()
    studio = _inputs(live, web.key("northlight", "identities:read", "artifacts:read",
                                   "identities:write"), "northlight/cy")
    family = _inputs(live, web.key("smiths", "identities:read", "artifacts:read",
                                   "identities:write"))
    for inputs in (studio, family):
        assert node.load(**inputs)[0]["tensors"]["normed"].shape == (2, 512)
        IdvaultIdentity.IS_CHANGED(**inputs)
    for inputs in (studio, family):
        owner, name = inputs["handle"].split("/")
        resp = web.client.post(f"/v1/identities/{owner}/{name}/consent/withdraw",
                               headers=web.headers(owner), json={})
        assert resp.status_code == 200, resp.get_data(as_text=True)

    with pytest.raises(ConsentRefused, match="consent for northlight/cy is withdrawn"):
        IdvaultIdentity.IS_CHANGED(**studio)
    with pytest.raises(ConsentRefused, match="consent_withdrawn"):
        node.load(**studio)
    with pytest.raises(NotFoundError, match="no identity smiths/ana"):
        IdvaultIdentity.IS_CHANGED(**family)
    with pytest.raises(NotFoundError, match="no identity smiths/ana"):
        node.load(**family)
    # The same node instance kept nothing: it has no state at all.
    assert vars(node) == {}
