"""The ``idvault`` command line.

Every command takes the vault options (``--data-dir``, ``--database-url``,
``--keystore-url``, ``--key-provider``, ``--key-file``; each also read from
its ``IDVAULT_*`` variable). Errors go to stderr as ``error: ...`` with a
non-zero exit code (see ``EXIT_CODES``) and never a traceback. docs/cli.md
documents every command; tests/web/test_docs.py fails when the two disagree.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import click

from encoders.library_output import without_expected_notices
from vault import errors
from vault.config import Settings
from vault.private_files import write_private
from web.cli.common import (
    Group,
    emit,
    exit_code,
    open_vault,
    progress_bar,
    vault_options,
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.version_option(package_name="idvault")
def cli() -> None:
    """idvault: a consented identity vault for personalised image generation.

    Enroll people once, with recorded consent; their identity artifacts are
    stored encrypted, duplicates are caught, and generators pull identities by
    handle (OWNER/NAME, or @OWNER/NAME in prompts).

    \b
    Start here (after `idvault init` and `idvault owner add smiths --kind family`):
      idvault enroll smiths/ana ana1.jpg ana2.jpg --consent ana-consent.json --kinds photomaker
      idvault generate "@smiths/ana:woman reading in a garden" -o ana.png
      idvault identity show smiths/ana
      idvault demo           see it all run on throwaway data (stand-in models)
    """


# -- init ----------------------------------------------------------------------
@cli.command()
@vault_options
def init(settings: Settings) -> None:
    """Create a new vault: data DB, separate key store, and key material.

    With the default file provider this writes DATA_DIR/master.key (mode
    0600). Back it up apart from the data: without it nothing decrypts.

    \b
    Example (a vault of its own, apart from the default data folder):
      idvault init --data-dir ~/idvault-try
    """
    from vault.vault import Vault

    vault = Vault.init(settings)
    click.echo(f"initialised vault {vault.vault_id}")
    click.echo(f"  data:      {vault.describe_location()}")
    click.echo(f"  key store: {vault.keystore_engine.url.render_as_string(hide_password=True)}")
    click.echo(f"  KEK:       {vault.provider.describe()}")
    click.echo(_backup_advice(vault.provider))
    vault.dispose()


def _backup_advice(provider) -> str:
    """What to keep safe now: losing the KEK loses every artifact, and nothing recreates it."""
    lost = "without it nothing in this vault can be decrypted, and nothing recreates it"
    if provider.name == "file":
        return (f"back up the key file now: {provider.path} (keep the copy apart from the "
                f"data and its backups); {lost}")
    if provider.name == "env":
        return f"keep a copy of the key in {provider.VAR} apart from the data; {lost}"
    return f"keep the passphrase of {provider.VAR} safe (a password manager); {lost}"


# -- owners ----------------------------------------------------------------------
@cli.group(cls=Group)
def owner() -> None:
    """Families and studios: every identity belongs to one owner.

    \b
    Example:
      idvault owner add smiths --kind family
    """


@owner.command("add")
@click.argument("name")
@click.option("--kind", type=click.Choice(["family", "studio"]), required=True,
              help="A family (members) or a studio (cast under contract).")
@click.option("--erase-policy", type=click.Choice(["immediate", "retain"]),
              default="immediate", show_default=True,
              help="On consent withdrawal: erase at once, or keep blocked until the consent's "
                   "retain_until date (then `idvault retention sweep` erases it).")
@vault_options
def owner_add(name: str, kind: str, erase_policy: str, settings: Settings) -> None:
    """Add an owner NAME (lowercase letters, digits, '-').

    \b
    Example (a studio that keeps withdrawn identities until their retention date):
      idvault owner add northlight --kind studio --erase-policy retain
    """
    with open_vault(settings) as vault:
        doc = vault.add_owner(name, kind, erase_policy=erase_policy)
    click.echo(f"added {doc['kind']} {doc['name']} (erase policy: {doc['erase_policy']})")


@owner.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def owner_list(as_json: bool, settings: Settings) -> None:
    """List owners.

    \b
    Example:
      idvault owner list --json
    """
    from vault import identities

    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        rows = [{"name": o.name, "kind": o.kind, "erase_policy": o.erase_policy,
                 "identities": identities.count_identities(s, o.name)}
                for o in identities.list_owners(s)]
    emit(rows, as_json, lambda: "\n".join(
        f"{r['name']:<20} {r['kind']:<7} {r['identities']:>5} identities  "
        f"erase={r['erase_policy']}" for r in rows) or "no owners yet")


# -- identities ------------------------------------------------------------------
@cli.group(cls=Group)
def identity() -> None:
    """Identities: OWNER/NAME handles with consent and artifacts.

    \b
    Example:
      idvault identity show smiths/ana
    """


@identity.command("add")
@click.argument("handle")
@click.option("--consent", "consent_file", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="Consent record JSON (see docs/consent.md).")
@vault_options
def identity_add(handle: str, consent_file: Path, settings: Settings) -> None:
    """Create identity HANDLE (OWNER/NAME) with its consent record.

    \b
    Example (then `idvault enroll smiths/ana PHOTO...` adds photos):
      idvault identity add smiths/ana --consent ana-consent.json
    """
    from vault.consent import ConsentRequest

    request = ConsentRequest.from_file(consent_file)
    with open_vault(settings) as vault:
        doc = vault.create_identity(handle, request)
    click.echo(f"created {doc['handle']} (consent {doc['consent']['id']}, purposes: "
               f"{', '.join(doc['consent']['purposes'])}; retain until "
               f"{doc['consent']['retain_until']})")


@identity.command("list")
@click.argument("owner_name", metavar="[OWNER]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def identity_list(owner_name: str | None, as_json: bool, settings: Settings) -> None:
    """List identities, of one OWNER or all.

    \b
    Example:
      idvault identity list smiths
    """
    with open_vault(settings, check_keys=False) as vault:
        rows = vault.list_identities(owner_name)
    emit(rows, as_json, lambda: "\n".join(
        # an unfinished erasure shows as such, never as its consent's 'active'
        f"{r['handle']:<40} "
        f"{'erasing' if r['status'] == 'erasing' else r['consent']['status']:<10} "
        f"{','.join(a['kind'] for a in r['artifacts']) or '-'}" for r in rows)
        or "no identities")


@identity.command("show")
@click.argument("handle")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def identity_show(handle: str, as_json: bool, settings: Settings) -> None:
    """Show an identity: consent and artifact metadata (nothing decrypted).

    \b
    Example:
      idvault identity show smiths/ana --json
    """
    with open_vault(settings, check_keys=False) as vault:
        doc = vault.describe(handle)

    def text() -> str:
        c = doc["consent"]
        lines = [f"{doc['handle']}  ({doc['owner_kind']}, {doc['status']})",
                 f"  consent {c['status']}: {c['subject']} given by {c['given_by']}"
                 + (f" ({c['guardian_name']})" if c["guardian_name"] else "")
                 + f"; purposes {', '.join(c['purposes'])}; retain until {c['retain_until']}"]
        for a in doc["artifacts"]:
            lines.append(f"  {a['kind']:<12} {a['model_id']:<30} {a['size']:>8} B  "
                         f"{json.dumps(a['shapes'])}")
        return "\n".join(lines)

    emit(doc, as_json, text)


@identity.command("delete")
@click.argument("handle")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the signed receipt to this file.")
@vault_options
def identity_delete(handle: str, yes: bool, output: Path | None, settings: Settings) -> None:
    """Erase an identity: crypto-shred its key, delete its rows and index entries.

    Prints a signed JSON receipt of what was erased (verify it with
    `idvault receipt verify`). Run again on an interrupted erasure, it finishes it;
    on a completed one, it prints the stored receipt again.

    \b
    Example (no question asked; the receipt also to a file):
      idvault identity delete smiths/ana --yes -o ana-receipt.json
    """
    with open_vault(settings) as vault:
        # fails on a bad handle before asking; nothing to confirm once it is erased
        if vault.identity_status(handle) is None:
            receipt = vault.erasure_receipt(handle)
        else:
            if not yes:
                if not sys.stdin.isatty():
                    raise click.UsageError("refusing to erase without confirmation: pass "
                                           "--yes")
                # On stderr: stdout is the receipt (`... > r.json`).
                click.confirm(f"Erase {handle} and all its artifacts for good?", abort=True,
                              err=True)
            receipt = vault.delete_identity(handle)
    text = json.dumps(receipt, indent=2, sort_keys=True)
    if output:
        write_private(output, (text + "\n").encode())
    click.echo(text)


@identity.command("receipt")
@click.argument("ref", metavar="HANDLE|UID")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the signed receipt to this file.")
@vault_options
def identity_receipt(ref: str, output: Path | None, settings: Settings) -> None:
    """Print the signed receipt of an erased identity again, by handle or uid.

    Every completed erasure stores its receipt; exits 7 while the erasure is
    unfinished (`identity delete` finishes it) and 6 when nothing was erased.

    \b
    Example:
      idvault identity receipt smiths/ana -o ana-receipt.json
    """
    with open_vault(settings, check_keys=False) as vault:
        receipt = vault.erasure_receipt(ref)
    text = json.dumps(receipt, indent=2, sort_keys=True)
    if output:
        write_private(output, (text + "\n").encode())
    click.echo(text)


@identity.command("not-same")
@click.argument("a")
@click.argument("b")
@vault_options
def identity_not_same(a: str, b: str, settings: Settings) -> None:
    """Record that A and B are different people (twins, siblings): never flagged again.

    \b
    Example (twins):
      idvault identity not-same smiths/cleo smiths/dan
    """
    with open_vault(settings) as vault:
        vault.record_not_same(a, b)
    click.echo(f"recorded: {a} and {b} are different people")


# -- consent and retention ----------------------------------------------------------
@cli.group(cls=Group)
def consent() -> None:
    """View and withdraw consent.

    \b
    Example:
      idvault consent show smiths/ana
    """


@consent.command("show")
@click.argument("handle")
@vault_options
def consent_show(handle: str, settings: Settings) -> None:
    """Print an identity's consent record as JSON.

    \b
    Example:
      idvault consent show smiths/ana
    """
    with open_vault(settings, check_keys=False) as vault:
        emit(vault.describe(handle)["consent"], True)


@consent.command("withdraw")
@click.argument("handle")
@click.option("--reason", help="Recorded with the withdrawal.")
@vault_options
def consent_withdraw(handle: str, reason: str | None, settings: Settings) -> None:
    """Withdraw consent: every later use is refused; erased per the owner's policy.

    \b
    Example:
      idvault consent withdraw smiths/ben --reason "asked to be removed"
    """
    with open_vault(settings) as vault:
        result = vault.withdraw_consent(handle, reason=reason)
    emit(result, True)


@cli.group(cls=Group)
def retention() -> None:
    """Retention: erase identities whose consent period has ended.

    \b
    Example:
      idvault retention sweep > receipts.json
    """


@retention.command("sweep")
@vault_options
def retention_sweep(settings: Settings) -> None:
    """Erase every identity past its consent's retain_until date; prints receipts.

    \b
    Example (daily, from cron; the receipts kept):
      idvault retention sweep > receipts-$(date +%F).json
    """
    with open_vault(settings) as vault:
        receipts = vault.sweep_retention()
    emit(receipts, True)


# -- artifacts ----------------------------------------------------------------------
@cli.group(cls=Group)
def artifact() -> None:
    """Sealed identity artifacts (face, photomaker, storymaker, celeb_basis, lidb).

    \b
    Example:
      idvault artifact kinds
    """


@artifact.command("put")
@click.argument("handle")
@click.argument("kind")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@vault_options
def artifact_put(handle: str, kind: str, file: Path, settings: Settings) -> None:
    """Validate FILE (safetensors) against KIND's schema, seal and store it.

    \b
    Example:
      idvault artifact put smiths/ana face face.safetensors
    """
    size = file.stat().st_size
    if size > settings.max_artifact_bytes:
        raise errors.ArtifactRejected(
            f"{file} is {size} bytes; the limit is {settings.max_artifact_bytes}")
    with open_vault(settings) as vault:
        stored = vault.put_artifact(handle, kind, file.read_bytes())
    click.echo(f"stored {kind} artifact {stored.id} for {handle} ({stored.size} bytes, model "
               f"{stored.model_id})" + (f"; replaced {stored.replaced}" if stored.replaced else ""))


@artifact.command("get")
@click.argument("handle")
@click.argument("kind")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Where to write the decrypted safetensors file (created 0600).")
@click.option("--model-id", help="Which one, when the identity has several of this kind.")
@click.option("--purpose", type=click.Choice(["generate", "personalize", "share"]),
              default="share", show_default=True,
              help="Why it is read; consent must grant it. Audited.")
@vault_options
def artifact_get(handle: str, kind: str, output: Path, model_id: str | None, purpose: str,
                 settings: Settings) -> None:
    """Decrypt an artifact to a safetensors file (consent permitting; audited).

    \b
    Example:
      idvault artifact get smiths/ana photomaker -o ana-pm.safetensors --purpose generate
    """
    with open_vault(settings) as vault:
        opened = vault.get_artifact(handle, kind, model_id=model_id, purpose=purpose)
    write_private(output, opened.payload)
    click.echo(f"wrote {output} ({len(opened.payload)} bytes)")


@artifact.command("kinds")
@click.option("--json", "as_json", is_flag=True, help="Print the schemas as JSON.")
@vault_options
def artifact_kinds(as_json: bool, settings: Settings) -> None:
    """The declared schema of every artifact kind (needs no vault).

    \b
    Example:
      idvault artifact kinds --json
    """
    from vault.artifact_kinds import KINDS

    docs = {k: s.to_json() for k, s in KINDS.items()}

    def text() -> str:
        lines = []
        for s in KINDS.values():
            lines.append(f"{s.kind} (v{s.schema_version}, max {s.max_bytes} B): {s.description}")
            for t in s.tensors:
                lines.append(f"  {t.name:<14} {tuple(t.shape)!s:<24} {'|'.join(t.dtypes)}")
            for m in s.metadata:
                lines.append(f"  meta {m.name}: {m.description}")
        return "\n".join(lines)

    emit(docs, as_json, text)


# -- keys, audit, index, receipts -----------------------------------------------------
@cli.group(cls=Group)
def keys() -> None:
    """Key-encryption keys: rotation and status.

    \b
    Example:
      idvault keys status
    """


@keys.command("rotate")
@click.option("--batch-size", default=50, show_default=True, help="Keys re-wrapped per commit.")
@vault_options
def keys_rotate(batch_size: int, settings: Settings) -> None:
    """Re-wrap every data key under a new KEK version (artifacts are untouched).

    Safe to interrupt: run it again and it finishes the rotation it began.

    \b
    Example:
      idvault keys rotate --batch-size 100
    """
    with open_vault(settings, check_keys=False) as vault:
        bar = progress_bar("re-wrapping keys", "key")
        try:
            report = vault.rotate_keys(batch_size=batch_size, progress=bar)
        finally:
            bar.close()
    click.echo(f"{'resumed and completed' if report.resumed else 'rotated'}: KEK version "
               f"{report.to_version} active; {report.rewrapped} keys re-wrapped; version(s) "
               f"{', '.join(map(str, report.from_versions)) or '-'} retired")
    if report.note:
        click.echo(report.note)


@keys.command("sweep")
@click.option("--grace-hours", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Leave data keys younger than this (an enrollment makes its key before "
                   "its identity).")
@vault_options
def keys_sweep(grace_hours: float, settings: Settings) -> None:
    """Shred orphan data keys: of no identity, no staged photos, no queued job.

    An enrollment killed between making its identity's data key and storing
    the identity leaves such a key. Prints the counts as JSON; audited.

    \b
    Example:
      idvault keys sweep --grace-hours 24
    """
    with open_vault(settings) as vault:
        doc = vault.sweep_orphan_keys(grace_seconds=grace_hours * 3600)
    emit(doc, True)


@keys.command("status")
@vault_options
def keys_status(settings: Settings) -> None:
    """KEK versions and their state, and the number of data keys.

    \b
    Example:
      idvault keys status
    """
    with open_vault(settings, check_keys=False) as vault:
        doc = {"provider": vault.provider.describe(),
               "kek_versions": [{"version": v, "state": st}
                                for v, st in vault.keys.kek_versions()],
               "data_keys": vault.keys.count_deks()}
    emit(doc, True)


@keys.command("generate")
@vault_options
def keys_generate(settings: Settings) -> None:
    """Print a new random 256-bit key, base64 (for IDVAULT_KEK with the env provider).

    \b
    Example (store it in your secret manager, then set IDVAULT_KEK):
      idvault keys generate
    """
    from vault.crypto import new_key

    click.echo(base64.b64encode(new_key()).decode())


@cli.group(cls=Group)
def audit() -> None:
    """The hash-chained audit log.

    \b
    Example:
      idvault audit verify
    """


def _seq_hash(ctx: click.Context, param: click.Parameter, value: str | None):
    """``--since SEQ:HASH``, checked before the vault is opened (a usage error)."""
    from vault.audit import parse_seq_hash

    if value is None:
        return None
    try:
        return parse_seq_hash(value)
    except errors.InvalidInput as exc:
        raise click.BadParameter(exc.message) from None


@audit.command("verify")
@click.option("--since", metavar="SEQ:HASH", callback=_seq_hash,
              help="Verify only from this event (a head printed earlier) to the head; fast "
                   "on a long chain.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def audit_verify(since: tuple[int, str] | None, as_json: bool, settings: Settings) -> None:
    """Check the chain against the key store's signed checkpoints; print the head.

    Exits 3 and names the first bad event if tampered: an altered, removed or
    reordered event, or a tail cut below the newest checkpoint. The printed
    head (SEQ:HASH) can be kept elsewhere and given back as --since.

    \b
    Example (whole chain; then only what came after a head kept as SEQ:HASH):
      idvault audit verify
      idvault audit verify --since "$KEPT_HEAD"
    """
    with open_vault(settings, check_keys=False) as vault:
        result = vault.verify_audit(since=since)
    result.raise_if_bad()
    cp = result.checkpoint
    doc = {"ok": True, "events": result.events, "from_seq": result.start_seq,
           "head": {"seq": result.head_seq, "hash": result.head_hash},
           "checkpoint": cp.describe() if cp is not None else None,
           "unanchored": result.unanchored}

    def text() -> str:
        n = f"{result.events} event{'s' if result.events != 1 else ''}"
        scope = n if since is None else f"{n} from {result.start_seq} to the head"
        lines = [f"audit chain intact: {scope}", f"head {result.head_seq}:{result.head_hash}"]
        if cp is None:
            lines.append("checkpoint: none yet (a vault from before checkpoints is anchored "
                         "the next time it is opened with its keys)")
        else:
            lines.append(f"checkpoint {cp.seq}:{cp.hash} signed {doc['checkpoint']['at']}")
        if result.unanchored:
            lines.append(f"{result.unanchored} event{'s' if result.unanchored != 1 else ''} "
                         "not yet anchored (the next append anchors them)")
        return "\n".join(lines)

    emit(doc, as_json, text)


@audit.command("reanchor")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@vault_options
def audit_reanchor(yes: bool, settings: Settings) -> None:
    """Accept the chain as it is now, after restoring the data DB from a backup.

    Only when the chain is intact in itself: drops the key store's audit
    checkpoints, appends an `audit.reanchor` event that names the dropped newest
    one, and anchors the new head. Needs the KEK. Never run it to silence a
    report you cannot explain: that is what a cut tail looks like.

    \b
    Example (no question asked):
      idvault audit reanchor --yes
    """
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("refusing to replace the audit checkpoints without "
                                   "confirmation: pass --yes")
        click.confirm("Replace the audit checkpoints with one of the chain as it is now?",
                      abort=True, err=True)
    with open_vault(settings) as vault:
        result = vault.reanchor_audit()
    result.raise_if_bad()
    click.echo(f"re-anchored: head {result.head_seq}:{result.head_hash}")


@audit.command("log")
@click.option("--owner", "owner_name", help="Only this owner's events.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def audit_log(owner_name: str | None, limit: int, as_json: bool, settings: Settings) -> None:
    """The newest audit events.

    \b
    Example:
      idvault audit log --owner smiths --limit 20
    """
    from vault import audit as audit_mod

    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        rows = [{"seq": e.seq, "at": audit_mod.canonical_time(e.at), "action": e.action,
                 "actor": e.actor, "owner": e.owner, "subject": e.subject, "details": e.details}
                for e in audit_mod.events(s, owner=owner_name, limit=limit)]
    emit(rows, as_json, lambda: "\n".join(
        f"{r['seq']:>6} {r['at']} {r['action']:<16} {r['subject'] or '-':<30} {r['actor']}"
        for r in rows) or "no events")


@cli.group(cls=Group)
def index() -> None:
    """The in-memory dedupe index.

    \b
    Example:
      idvault index rebuild smiths
    """


@index.command("rebuild")
@click.argument("owner_name", metavar="[OWNER]", required=False)
@vault_options
def index_rebuild(owner_name: str | None, settings: Settings) -> None:
    """Rebuild the dedupe index from the encrypted store and report its size.

    The index lives only in memory (never in plaintext on disk); every process
    rebuilds it when first needed. This command checks that every face
    artifact decrypts and shows how long a rebuild takes.

    \b
    Example:
      idvault index rebuild smiths
    """
    import time

    with open_vault(settings) as vault:
        t0 = time.perf_counter()
        stats = vault.rebuild_index(owner_name, progress=progress_bar("decrypting", "face"))
        stats["seconds"] = round(time.perf_counter() - t0, 3)
    click.echo(f"index rebuilt: {stats['identities']} identities, {stats['vectors']} vectors "
               f"across {stats['owners']} owner(s) in {stats['seconds']} s")


@cli.group(cls=Group)
def receipt() -> None:
    """Signed erasure receipts.

    \b
    Example:
      idvault receipt verify ana-receipt.json
    """


@receipt.command("verify")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@vault_options
def receipt_verify(file: Path, settings: Settings) -> None:
    """Check that FILE is an erasure receipt signed by this vault and unaltered.

    \b
    Example:
      idvault receipt verify ana-receipt.json
    """
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise errors.InvalidInput(f"{file} is not JSON") from None
    with open_vault(settings, check_keys=False) as vault:
        r = vault.verify_receipt(doc)
    click.echo(f"valid receipt: {r['handle']} erased at {r['erased_at']} "
               f"({len(r['artifacts'])} artifacts, data key shredded: "
               f"{r['data_key']['shredded']})")


from web.cli.faces import register as _register_face_commands

_register_face_commands(cli)
from web.cli.generate import register as _register_generate_commands
from web.cli.personalize import register as _register_personalize_commands
from web.cli.server import register as _register_web_commands
from web.cli.worker import register as _register_worker_commands

_register_generate_commands(cli)
_register_personalize_commands(cli)  # adds `artifact export`: after the core groups
_register_web_commands(cli)
_register_worker_commands(cli)


@cli.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where to build the demo vault (default: a new temporary folder, removed "
                   "at the end unless --keep). A folder given here is kept.")
@click.option("--keep", is_flag=True,
              help="Keep the temporary folder (models, photos, vault) to try the CLI on.")
def demo(data_dir: Path | None, keep: bool) -> None:
    """Run the main job end to end on a throwaway vault and narrate it.

    \b
    Example (keep the models, photos and vault to try the CLI on):
      idvault demo --keep
    """
    from web.cli.demo import run_demo

    run_demo(data_dir, keep=keep)


def main(argv: list[str] | None = None) -> int:
    without_expected_notices()  # before any command imports the ML stack
    try:
        # Not standalone: click then returns a command's explicit exit code.
        result = cli.main(args=argv, prog_name="idvault", standalone_mode=False)
    except errors.VaultError as exc:
        click.echo(f"error: {exc}", err=True)
        return exit_code(exc)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if os.environ.get("IDVAULT_DEBUG"):
            raise
        click.echo(f"error: unexpected {type(exc).__name__}: {exc} "
                   "(set IDVAULT_DEBUG=1 for a traceback)", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
