"""Signed checkpoints in the key store catch what the data database alone cannot: a cut
or rewritten tail with a matching ``audit_head``, deleted or forged checkpoints."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from vault import audit, audit_anchor, db
from vault.config import Settings
from vault.errors import AuditChainBroken
from vault.keystore_models import AuditCheckpoint, KeystoreMeta
from vault.models import AuditEvent, AuditHead
from vault.vault import Vault
from web.cli.main import main


@pytest.fixture
def busy(family):
    for name in ("a", "b", "c", "d"):
        family.add_owner(f"owner{name}", "family", actor="test")
    return family  # 7 events: vault.init, 2 + 4 owner.create


def _keystore(vault):
    return Session(vault.keystore_engine, expire_on_commit=False)


def _event(vault, seq):
    with vault.session() as s:
        return s.get(AuditEvent, seq)


def _cut_tail(vault, keep: int) -> None:
    """The attack of issue 17: delete the last events, copy the new last hash into the head."""
    with vault.session() as s:
        last = s.get(AuditEvent, keep)
        s.execute(delete(AuditEvent).where(AuditEvent.seq > keep))
        s.execute(update(AuditHead).where(AuditHead.id == 1)
                  .values(seq=last.seq, hash=last.hash))


def test_every_append_is_anchored_and_the_head_reported(busy):
    result = busy.verify_audit()
    assert result.ok and result.events == 7 and result.unanchored == 0
    assert (result.head_seq, result.head_hash) == (7, _event(busy, 7).hash)
    assert (result.checkpoint.seq, result.checkpoint.hash) == (7, result.head_hash)
    with _keystore(busy) as s:
        assert s.get(KeystoreMeta, audit_anchor.PENDING) is None  # init settled it


def test_tail_cut_with_copied_head_is_broken_naming_the_missing_range(busy):
    _cut_tail(busy, 4)
    result = busy.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "events 5..7 are missing" in result.reason
    with pytest.raises(AuditChainBroken, match="broken at event 5"):
        result.raise_if_bad()


def test_rewritten_last_event_with_recomputed_hash_and_head_is_broken(busy):
    with busy.session() as s:
        ev = s.get(AuditEvent, 7)
        ev.actor = "mallory"
        ev.hash = audit.event_hash(ev.seq, ev.at, ev.action, ev.actor, ev.owner, ev.subject,
                                   ev.details, ev.prev_hash)
        s.get(AuditHead, 1).hash = ev.hash
    result = busy.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 7)
    assert "does not have the hash the checkpoint signed" in result.reason


def test_deleted_checkpoints_are_reported(busy):
    with _keystore(busy) as s, s.begin():
        s.execute(delete(AuditCheckpoint))
    result = busy.verify_audit()
    assert not result.ok and "holds no audit checkpoint" in result.reason
    with pytest.raises(AuditChainBroken, match="they were deleted"):
        result.raise_if_bad()


def test_forged_checkpoint_is_broken_naming_it(busy):
    # The attacker cuts the tail and moves the checkpoint back to match, without the key.
    _cut_tail(busy, 4)
    four = _event(busy, 4)
    with _keystore(busy) as s, s.begin():
        s.execute(update(AuditCheckpoint).where(AuditCheckpoint.slot == 0)
                  .values(seq=4, hash=four.hash))
    result = busy.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "newest audit checkpoint (event 4" in result.reason
    assert "signature that does not verify" in result.reason


def test_checkpoint_signed_by_another_key_is_broken(busy):
    with _keystore(busy) as s, s.begin():
        s.execute(update(AuditCheckpoint).values(key_id="00000000-0000-0000-0000-000000000000"))
    result = busy.verify_audit()
    assert not result.ok and "signed by a key this vault does not know" in result.reason


def test_history_is_sparse_and_a_deleted_newest_is_reported(family, monkeypatch):
    monkeypatch.setattr(audit_anchor, "HISTORY_EVERY", 3)
    for i in range(8):
        family.add_owner(f"o{i}", "family", actor="test")  # events 4..11
    with _keystore(family) as s:
        slots = {c.slot: c.seq for c in s.scalars(select(AuditCheckpoint))}
    # the newest, and the first checkpoint at or past 6 and 9, not one row per event (3 was
    # passed before the patch, at 1000 a row apart)
    assert slots == {0: 11, 2: 6, 3: 9}
    assert family.verify_audit().ok
    with _keystore(family) as s, s.begin():
        s.execute(delete(AuditCheckpoint).where(AuditCheckpoint.slot == 0))
    result = family.verify_audit()
    assert not result.ok and "newest audit checkpoint is missing" in result.reason


def test_a_checkpoint_never_goes_back(busy):
    assert audit_anchor.record(busy.keys, 3, _event(busy, 3).hash) is False
    result = busy.verify_audit()
    assert result.ok and result.checkpoint.seq == 7


def test_many_appends_from_two_vault_objects_stay_anchored(busy, settings):
    other = Vault.open(settings)

    def work(vault, prefix):
        for i in range(15):
            vault.add_owner(f"{prefix}{i}", "family", actor="test")

    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(work, v, p) for v, p in ((busy, "x"), (other, "y"))]
    for f in done:
        f.result()  # a writer's exception fails the test here
    other.dispose()
    result = busy.verify_audit()
    assert result.ok and result.head_seq == 7 + 30
    # whichever writer finished last, the newest checkpoint was not overwritten by an older
    assert result.checkpoint.seq == result.head_seq and result.unanchored == 0


def test_a_crash_between_commit_and_checkpoint_is_not_yet_anchored_then_reanchored(busy):
    with Session(busy.engine) as s, s.begin():  # a commit whose process died before the hook
        audit.append(s, "owner.create", actor="test", owner="lost", subject="lost")
        audit.append(s, "owner.create", actor="test", owner="lost2", subject="lost2")
    result = busy.verify_audit()
    assert result.ok and (result.head_seq, result.unanchored) == (9, 2)
    assert result.checkpoint.seq == 7
    busy.add_owner("next", "family", actor="test")
    result = busy.verify_audit()
    assert result.ok and (result.head_seq, result.unanchored, result.checkpoint.seq) == (10, 0, 10)


def test_since_checks_the_given_event_then_the_chain_on(busy):
    three = _event(busy, 3)
    result = busy.verify_audit(since=(3, three.hash))
    assert result.ok and (result.events, result.start_seq, result.head_seq) == (5, 3, 7)
    wrong = busy.verify_audit(since=(3, _event(busy, 2).hash))
    assert (wrong.ok, wrong.first_bad_seq) == (False, 3) and "not the" in wrong.reason
    beyond = busy.verify_audit(since=(99, three.hash))
    assert (beyond.ok, beyond.first_bad_seq) == (False, 99) and "does not exist" in beyond.reason


def test_since_still_catches_a_cut_below_the_checkpoint(busy):
    two = _event(busy, 2)
    _cut_tail(busy, 5)
    result = busy.verify_audit(since=(2, two.hash))
    assert (result.ok, result.first_bad_seq) == (False, 6) and "6..7 are missing" in result.reason


def test_since_past_the_checkpoint_point_checks_it(busy):
    with Session(busy.engine) as s, s.begin():  # two unanchored events
        audit.append(s, "owner.create", actor="test", owner="u1", subject="u1")
        audit.append(s, "owner.create", actor="test", owner="u2", subject="u2")
    nine = _event(busy, 9)
    assert busy.verify_audit(since=(9, nine.hash)).ok
    with busy.session() as s:  # rewrite the checkpointed event 7 (and on), keeping 9's hash
        s.execute(update(AuditEvent).where(AuditEvent.seq == 7).values(hash="f" * 64))
    result = busy.verify_audit(since=(9, nine.hash))
    assert (result.ok, result.first_bad_seq) == (False, 7)


def test_open_of_a_vault_from_before_checkpoints_anchors_its_head_once(busy, settings):
    db.downgrade(busy.keystore_engine, "keystore", "k0001")
    busy.dispose()
    with Vault.open(settings, check_keys=False) as v:  # upgraded; no key used: pending
        result = v.verify_audit()
        assert result.ok and result.checkpoint is None and result.unanchored == 7
    with Vault.open(settings) as v:
        result = v.verify_audit()
        assert result.ok and (result.checkpoint.seq, result.unanchored) == (7, 0)
        with _keystore(v) as s:
            assert s.get(KeystoreMeta, audit_anchor.PENDING) is None


def test_reanchor_accepts_a_restored_chain_and_records_what_it_dropped(busy):
    _cut_tail(busy, 4)  # what restoring an older backup of the data database looks like
    assert not busy.verify_audit().ok
    result = busy.reanchor_audit(actor="test")
    assert result.ok and (result.head_seq, result.checkpoint.seq, result.unanchored) == (5, 5, 0)
    event = _event(busy, 5)
    assert event.action == "audit.reanchor"
    assert event.details["dropped"]["seq"] == 7 and event.details["head"]["seq"] == 4
    busy.add_owner("after", "family", actor="test")
    assert busy.verify_audit().ok


def test_reanchor_refuses_a_chain_broken_in_itself_and_keeps_the_checkpoints(busy):
    with busy.session() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 3).values(actor="mallory"))
    with pytest.raises(AuditChainBroken, match="event 3"):
        busy.reanchor_audit(actor="test")
    with _keystore(busy) as s:
        assert s.get(AuditCheckpoint, 0).seq == 7


def test_parse_seq_hash():
    assert audit.parse_seq_hash(" 12:" + "AB" * 32) == (12, "ab" * 32)
    for bad in ("12", "0:" + "a" * 64, "x:" + "a" * 64, "12:" + "a" * 63, "12:" + "g" * 64):
        with pytest.raises(audit.InvalidInput, match="is not SEQ:HASH"):
            audit.parse_seq_hash(bad)


# -- the CLI (SQLite) -------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path, capsys):
    data = str(tmp_path / "vault")

    def run(*args: str, code: int = 0) -> tuple[str, str]:
        rc = main([*args, "--data-dir", data])
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc} (wanted {code}); stderr: {err}"
        assert "Traceback" not in err
        return out, err

    run.settings = Settings(data_dir=tmp_path / "vault")  # type: ignore[attr-defined]
    return run


def test_cli_prints_the_head_and_checkpoint_and_verifies_since(cli):
    cli("init")
    cli("owner", "add", "smiths", "--kind", "family")
    out, _ = cli("audit", "verify")
    with Vault.open(cli.settings) as v:
        head = _event(v, 2)
    assert "audit chain intact: 2 events" in out
    assert f"head 2:{head.hash}" in out and f"checkpoint 2:{head.hash} signed" in out
    doc = json.loads(cli("audit", "verify", "--json")[0])
    assert doc["head"] == {"seq": 2, "hash": head.hash} and doc["unanchored"] == 0
    assert doc["checkpoint"]["seq"] == 2
    out, _ = cli("audit", "verify", "--since", f"2:{head.hash}")
    assert "1 event from 2 to the head" in out
    _, err = cli("audit", "verify", "--since", f"2:{'0' * 64}", code=3)
    assert "event 2 has hash" in err and f"not the {'0' * 64} given" in err
    with Vault.open(cli.settings) as v, Session(v.engine) as s, s.begin():  # no checkpoint
        audit.append(s, "owner.create", actor="test", owner="lost", subject="lost")
    out, _ = cli("audit", "verify")
    assert "head 3:" in out and f"checkpoint 2:{head.hash}" in out
    assert "1 event not yet anchored" in out


def test_cli_reanchor_asks_first_then_prints_the_new_head(cli):
    cli("init")
    _, err = cli("audit", "reanchor", code=2)  # stdin is not a terminal under pytest
    assert "pass --yes" in err
    out, _ = cli("audit", "reanchor", "--yes")
    with Vault.open(cli.settings) as v:
        assert out.strip() == f"re-anchored: head 2:{_event(v, 2).hash}"
        assert _event(v, 2).action == "audit.reanchor"


def test_cli_since_syntax_is_a_usage_error_before_opening_anything(cli):
    _, err = cli("audit", "verify", "--since", "latest", code=2)  # no vault exists at all
    assert "'latest' is not SEQ:HASH" in err


def test_cli_unreadable_timestamp_exits_3_naming_the_event(cli):
    """SQLite only: PostgreSQL's timestamptz column cannot hold such a value."""
    cli("init")
    for name in ("a", "b", "c", "d"):
        cli("owner", "add", name, "--kind", "family")
    engine = db.make_engine(f"sqlite:///{cli.settings.data_dir}/vault.db", schema="data")
    with engine.begin() as conn:
        conn.execute(text("update audit_events set at='garbage' where seq=5"))
    engine.dispose()
    _, err = cli("audit", "verify", code=3)
    assert "audit chain broken at event 5: event 5 cannot be read" in err
