"""audit.events: the filters (action, subject, actor, date range) and keyset paging, on
SQLite and PostgreSQL."""

import datetime as dt

from vault import audit


def _day(n: int) -> dt.datetime:
    return dt.datetime(2026, 3, n, 12, 0, tzinfo=dt.UTC)


def test_filters_and_keyset_paging(family, monkeypatch):
    # Events on three days (the clock the chain records, moved), by two actors.
    for day, actor, action, subject in [(1, "user:maria", "artifact.read", "smiths/ana"),
                                        (1, "user:bob", "artifact.read", "smiths/ben"),
                                        (2, "user:maria", "consent.withdraw", "smiths/ana"),
                                        (3, "user:bob", "artifact.read", "smiths/ana"),
                                        (3, "user:maria", "artifact.read", "northlight/x")]:
        monkeypatch.setattr(audit, "utcnow", lambda d=day: _day(d))
        owner = subject.split("/")[0]
        with family.session() as s:
            audit.append(s, action, actor=actor, owner=owner, subject=subject, details={})
    monkeypatch.undo()

    def seqs(**kw):
        with family.session() as s:
            return [(e.at.day, e.actor, e.action, e.subject)
                    for e in audit.events(s, owner="smiths", **kw)
                    if e.action != "owner.create"]

    assert seqs() == [(3, "user:bob", "artifact.read", "smiths/ana"),
                      (2, "user:maria", "consent.withdraw", "smiths/ana"),
                      (1, "user:bob", "artifact.read", "smiths/ben"),
                      (1, "user:maria", "artifact.read", "smiths/ana")]
    assert [e[0] for e in seqs(action="artifact.read")] == [3, 1, 1]
    assert [e[3] for e in seqs(subject="smiths/ben")] == ["smiths/ben"]
    assert [e[0] for e in seqs(actor="user:maria")] == [2, 1]
    assert [e[0] for e in seqs(since=_day(2).replace(hour=0))] == [3, 2]
    assert [e[0] for e in seqs(until=_day(2).replace(hour=0))] == [1, 1]
    assert [e[0] for e in seqs(since=_day(2).replace(hour=0), until=_day(3).replace(hour=0))] \
        == [2]
    assert seqs(action="artifact.read", actor="user:bob", subject="smiths/ana") == \
        [(3, "user:bob", "artifact.read", "smiths/ana")]
    # Keyset paging: two events a page, each page older than the last seq of the previous.
    with family.session() as s:
        everything = [e.seq for e in audit.events(s, owner="smiths")]
        pages, before = [], None
        while True:
            page = [e.seq for e in audit.events(s, owner="smiths", limit=2, before=before)]
            if not page:
                break
            pages.append(page)
            before = page[-1]
    assert [seq for p in pages for seq in p] == everything
    assert all(len(p) == 2 for p in pages[:-1]) and everything == sorted(everything,
                                                                         reverse=True)
