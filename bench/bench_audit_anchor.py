"""What the audit checkpoint costs a commit that appends an audit event.

What it measures
    A transaction that appends one audit event and commits, run two ways on the
    same vault, alternating in blocks so drift hits both alike:

    * ``bare``:   a plain session on the data engine (no checkpoint);
    * ``vault``:  ``Vault.session()``, which after the commit signs the new head
                  and writes it to the key store (vault.audit_anchor.record).

    It prints the mean and median milliseconds of each, the checkpoint's extra
    time and its ratio to the bare commit, and ``record()`` alone. On SQLite as
    the product configures it (``synchronous=FULL``: each commit, the key
    store's included, waits for fsync) and, with ``--pg-admin``, on PostgreSQL.

How to run
    .venv/bin/python bench/bench_audit_anchor.py                 # SQLite
    .venv/bin/python bench/bench_audit_anchor.py --n 200 \\
        --pg-admin postgresql://postgres@127.0.0.1:5432/postgres   # + PostgreSQL

    SQLite files live in a temporary directory, removed at the end; PostgreSQL
    gets two throwaway databases, dropped at the end. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy.orm import Session

from vault import audit, audit_anchor
from vault.config import Settings
from vault.vault import Vault


def _append(s: Session, i: int) -> None:
    audit.append(s, "owner.create", actor="bench", owner=f"o{i}", subject=f"o{i}")


def measure(settings: Settings, n: int, block: int = 20) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"bare": [], "vault": [], "record": []}
    vault = Vault.init(settings, actor="bench")
    try:
        i = 0
        for _ in range(max(1, n // block)):
            for kind in ("bare", "vault"):
                for _ in range(block):
                    i += 1
                    t = time.perf_counter()
                    if kind == "bare":
                        with Session(vault.engine) as s, s.begin():
                            _append(s, i)
                    else:
                        with vault.session() as s:
                            _append(s, i)
                    times[kind].append(time.perf_counter() - t)
        for _ in range(block):  # record() alone: sign + one key-store transaction
            i += 1
            with Session(vault.engine) as s, s.begin():
                _append(s, i)
                head = s.info[audit.HEAD_INFO]
            t = time.perf_counter()
            audit_anchor.record(vault.keys, *head)
            times["record"].append(time.perf_counter() - t)
        assert vault.verify_audit().ok
    finally:
        vault.dispose()
    return times


def report(name: str, times: dict[str, list[float]]) -> None:
    ms = {k: (1000 * statistics.mean(v), 1000 * statistics.median(v)) for k, v in times.items()}
    extra = ms["vault"][0] - ms["bare"][0]
    print(f"{name}: commit {ms['bare'][0]:.2f} ms (median {ms['bare'][1]:.2f}); with "
          f"checkpoint {ms['vault'][0]:.2f} ms (median {ms['vault'][1]:.2f}); extra "
          f"{extra:.2f} ms = {extra / ms['bare'][0]:.2f}x the commit; record() alone "
          f"{ms['record'][0]:.2f} ms (median {ms['record'][1]:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="commits per variant")
    ap.add_argument("--pg-admin", help="PostgreSQL URL of a database to create others from")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report("SQLite", measure(Settings(data_dir=Path(tmp) / "v"), args.n))
    if args.pg_admin:
        import psycopg

        names = [f"idvault_bench_{uuid.uuid4().hex[:10]}" for _ in range(2)]
        with psycopg.connect(args.pg_admin, autocommit=True) as c:
            for name in names:
                c.execute(f'CREATE DATABASE "{name}"')
        base = args.pg_admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                report("PostgreSQL", measure(Settings(
                    data_dir=Path(tmp) / "v", database_url=f"{base}/{names[0]}",
                    keystore_url=f"{base}/{names[1]}"), args.n))
        finally:
            with psycopg.connect(args.pg_admin, autocommit=True) as c:
                for name in names:
                    c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
