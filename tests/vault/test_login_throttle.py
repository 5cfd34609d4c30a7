"""The sign-in throttle kept in the data database: per account and address, shared, durable."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from vault import login_throttle as lt
from vault.errors import InvalidInput
from vault.models import LoginAttempt, utcnow
from vault.vault import Vault

A, B = "203.0.113.7", "198.51.100.9"
T0 = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
MIN = dt.timedelta(minutes=1)


def fail(vault: Vault, name: str, address: str, n: int = 1, *, now=T0,
         policy: lt.Policy = lt.Policy()) -> lt.Lock | None:
    lock = None
    for _ in range(n):
        with vault.session() as s:
            lock = lt.record_failure(s, name, address, policy=policy, now=now)
    return lock


def locked(vault: Vault, name: str, address: str, now=T0) -> lt.Lock | None:
    with vault.session() as s:
        return lt.locked(s, name, address, now=now)


def rows(vault: Vault) -> int:
    with vault.session() as s:
        return s.scalar(select(func.count()).select_from(LoginAttempt))


def test_five_failures_lock_the_account_for_that_address_only(vault):
    assert fail(vault, "maria", A, 4) is None
    assert locked(vault, "maria", A) is None
    lock = fail(vault, "maria", A)
    assert lock is not None and lock.scope == "account" and lock.until == T0 + 5 * MIN
    assert locked(vault, " Maria ", A).seconds == 300  # counted as the name is looked up
    # Another address still signs in: one attacker cannot lock maria out everywhere.
    assert locked(vault, "maria", B) is None
    # ... and another account from the attacker's address is not locked either.
    assert locked(vault, "ben", A) is None
    # The lock ends on time.
    assert locked(vault, "maria", A, now=T0 + 5 * MIN) is None


def test_each_further_lock_doubles_up_to_the_cap(vault):
    now, lengths = T0, []
    for _ in range(6):
        lock = fail(vault, "maria", A, 5, now=now)
        lengths.append(lock.until - now)
        now = lock.until
    assert lengths == [5 * MIN, 10 * MIN, 20 * MIN, 40 * MIN, 60 * MIN, 60 * MIN]


def test_old_failures_are_forgotten_after_the_window(vault):
    fail(vault, "maria", A, 4)
    assert fail(vault, "maria", A, 1, now=T0 + 16 * MIN) is None  # a new window: 1, not 5
    assert fail(vault, "maria", A, 3, now=T0 + 16 * MIN) is None
    assert fail(vault, "maria", A, 1, now=T0 + 16 * MIN).scope == "account"


def test_success_clears_the_pair_but_not_the_address_count(vault):
    policy = lt.Policy(limit=5, address_limit=10)
    fail(vault, "maria", A, 4, policy=policy)
    fail(vault, "ben", A, 3, policy=policy)
    with vault.session() as s:
        lt.record_success(s, "maria", A)
    assert fail(vault, "maria", A, 1, policy=policy) is None  # maria's count starts afresh
    with vault.session() as s:
        assert s.get(LoginAttempt, ("maria", A)).failures == 1
        assert s.get(LoginAttempt, (lt.ANY_ACCOUNT, A)).failures == 8  # 4 + 3 + 1
    assert fail(vault, "carl", A, 2, policy=policy).scope == "address"  # 10 from A in all
    assert locked(vault, "anyone", A).scope == "address"


def test_spraying_many_accounts_from_one_address_locks_that_address(vault):
    policy = lt.Policy(limit=5, address_limit=20)
    for i in range(19):
        assert fail(vault, f"user{i}", A, policy=policy) is None
    lock = fail(vault, "user19", A, policy=policy)
    assert lock.scope == "address" and lock.until == T0 + 5 * MIN
    for name in ("maria", "user3", "never-seen"):
        assert locked(vault, name, A).scope == "address"
        assert locked(vault, name, B) is None  # the sprayer's address only


def test_begin_reports_the_lock_and_expired_rows_are_pruned(vault):
    fail(vault, "maria", A, 5)
    fail(vault, "ben", B, 2)
    with vault.session() as s:
        assert lt.begin(s, "maria", A, now=T0 + MIN).scope == "account"
        assert lt.begin(s, "ben", B, now=T0 + MIN) is None
    assert rows(vault) == 4  # maria@A, *ADDRESS@A, ben@B, *ADDRESS@B
    # Unlocked rows go a window after their last failure; locked ones a day after the lock.
    with vault.session() as s:
        lt.begin(s, "carl", B, now=T0 + 16 * MIN)  # pruning happens as a sign-in begins
    with vault.session() as s:
        assert {(r.account, r.address) for r in s.scalars(select(LoginAttempt))} == {
            ("maria", A), ("carl", B)}
    with vault.session() as s:
        assert lt.prune(s, now=T0 + 5 * MIN + dt.timedelta(days=1, seconds=1)) == 2
    assert rows(vault) == 0


def test_the_throttle_survives_a_restart_and_is_shared_by_every_vault_handle(vault, settings):
    now = utcnow()
    fail(vault, "maria", A, 3, now=now)
    with Vault.open(settings) as other:  # another process's vault, on the same database
        fail(other, "maria", A, 2, now=now)
    vault.dispose()  # the first "process" restarts
    with Vault.open(settings) as again:
        with again.session() as s:
            lock = lt.begin(s, "maria", A)
        assert lock is not None and lock.scope == "account" and 0 < lock.seconds <= 300


def test_parallel_failures_are_all_counted(vault):
    policy = lt.Policy(limit=100, address_limit=100)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: fail(vault, "maria", A, policy=policy), range(24)))
    with vault.session() as s:
        assert s.get(LoginAttempt, ("maria", A)).failures == 24
        assert s.get(LoginAttempt, (lt.ANY_ACCOUNT, A)).failures == 24


def test_no_typed_name_is_counted_as_the_address_row(vault):
    fail(vault, lt.ANY_ACCOUNT, A, 3)  # typed exactly: counted lower-cased, a pair of its own
    with vault.session() as s:
        assert s.get(LoginAttempt, (lt.ANY_ACCOUNT, A)).failures == 3  # once each, not twice
        assert s.get(LoginAttempt, (lt.ANY_ACCOUNT.lower(), A)).failures == 3


def test_bad_policy_is_refused():
    with pytest.raises(InvalidInput, match="login_attempts"):
        lt.Policy(limit=10, address_limit=5)
    with pytest.raises(InvalidInput, match="login_attempts"):
        lt.Policy(limit=0)
