"""``idvault demo``: the main job end to end on a throwaway vault.

Uses synthetic embeddings (no models needed) so it runs on a fresh machine in
seconds: init, owners, identities with consent, sealed artifacts, a duplicate
caught and a twin pair accepted, lookups by handle, key rotation, consent
withdrawal and erasure with signed receipts, and an audit check.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
from pathlib import Path

import click
import numpy as np

from vault import codec
from vault.config import Settings
from vault.consent import ConsentRequest
from vault.vault import Vault


def _face_payload(center: np.ndarray, rng: np.random.Generator, photos: int = 3) -> bytes:
    raw = center + 0.35 * rng.normal(size=(photos, 512)).astype(np.float32)
    raw = raw.astype(np.float32) * 20.0  # raw ArcFace embeddings have norms ~20
    normed = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    mean = normed.mean(0)
    return codec.encode("face", {"embeddings": raw, "normed": normed,
                                 "mean": mean / np.linalg.norm(mean)},
                        {"model_id": "demo-synthetic"})


def _consent(subject: str, guardian: str | None = None, *purposes: str) -> ConsentRequest:
    return ConsentRequest.from_dict({
        "subject": subject, "given_by": "guardian" if guardian else "self",
        **({"guardian_name": guardian} if guardian else {}),
        "purposes": ["enroll", *purposes],
        "retain_until": (dt.date.today() + dt.timedelta(days=3 * 365)).isoformat(),
        "evidence_sha256": hashlib.sha256(f"signed form of {subject}".encode()).hexdigest(),
    })


def step(n: int, text: str) -> None:
    click.secho(f"\n[{n}] {text}", bold=True)


def run_demo(data_dir: Path | None = None) -> None:
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="idvault-demo-"))
    rng = np.random.default_rng(7)
    people = {name: rng.normal(size=512).astype(np.float32)
              for name in ("ana", "ben", "cleo", "dan")}
    people["dan"] = people["cleo"] + 1.2 * rng.normal(size=512).astype(np.float32)  # twins

    step(1, f"init a vault in {data_dir} (SQLite + separate key store + key file 0600)")
    vault = Vault.init(Settings(data_dir=data_dir), actor="demo")
    click.echo(f"    vault {vault.vault_id}")

    step(2, "owners: the Smith family and Northlight studio")
    vault.add_owner("smiths", "family", actor="demo")
    vault.add_owner("northlight", "studio", erase_policy="retain", actor="demo")

    step(3, "identities with consent, face artifacts sealed under per-identity keys")
    for name, guardian in (("ana", "Maria Smith"), ("ben", None), ("cleo", None)):
        vault.create_identity(f"smiths/{name}", _consent(f"{name.title()} Smith", guardian,
                                                          "generate"), actor="demo")
        stored = vault.put_artifact(f"smiths/{name}", "face",
                                    _face_payload(people[name], rng), actor="demo")
        click.echo(f"    smiths/{name}: face artifact {stored.id[:8]} ({stored.size} B payload, sealed)")

    step(4, "a second enrollment of Ana's face is caught as a duplicate")
    probe = codec.decode(_face_payload(people["ana"], rng)).tensors["normed"]
    for m in vault.search_faces("smiths", probe, k=2):
        click.echo(f"    {m['handle']:<14} score {m['score']:.3f} -> {m['decision']}")

    step(5, "Dan is Cleo's twin: flagged for review, then recorded as not the same person")
    dan = codec.decode(_face_payload(people["dan"], rng)).tensors["normed"]
    top = vault.search_faces("smiths", dan, k=1)[0]
    click.echo(f"    before: {top['handle']} score {top['score']:.3f} -> {top['decision']}")
    vault.create_identity("smiths/dan", _consent("Dan Smith", None, "generate"), actor="demo")
    vault.put_artifact("smiths/dan", "face", _face_payload(people["dan"], rng), actor="demo")
    vault.record_not_same("smiths/cleo", "smiths/dan", actor="demo")
    after = vault.search_faces("smiths", dan, k=1, exclude_identity="smiths/dan")
    click.echo(f"    after:  closest is {after[0]['handle'] if after else '-'}: "
               f"{after[0]['decision'] if after else 'no match'} (the twin pair is excluded)")

    step(6, "look identities up by handle; decrypt for generation (audited)")
    opened = vault.get_artifact("smiths/ana", "face", purpose="generate", actor="demo")
    click.echo(f"    @smiths/ana -> {opened.artifact.shapes} from {opened.artifact.model_id}")

    step(7, "rotate the key-encryption key: data keys re-wrapped, artifacts untouched")
    report = vault.rotate_keys(actor="demo")
    click.echo(f"    KEK v{report.to_version} active, {report.rewrapped} keys re-wrapped")

    step(8, "Ben withdraws consent: blocked at once and erased (family policy: immediate)")
    result = vault.withdraw_consent("smiths/ben", reason="changed his mind", actor="demo")
    click.echo(f"    receipt signed {result['receipt']['signature']['alg']}: "
               f"{len(result['receipt']['receipt']['artifacts'])} artifact(s), data key shredded")

    step(9, "erase Ana on request; verify the signed receipt")
    receipt = vault.delete_identity("smiths/ana", actor="demo")
    checked = vault.verify_receipt(receipt)
    click.echo(f"    receipt verified: {checked['handle']} erased at {checked['erased_at']}")

    step(10, "verify the audit chain")
    res = vault.verify_audit()
    click.echo(f"    {res.events} events, chain intact: {res.ok}")
    vault.dispose()
    click.secho(f"\ndone. Explore it: idvault --help, e.g. "
                f"idvault identity list --data-dir {data_dir}", fg="green")
