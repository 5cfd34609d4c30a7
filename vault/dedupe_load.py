"""Reading an owner's face vectors out of the encrypted store, for a full index load.

A load (:meth:`vault.dedupe_sync.IndexSync.load`) first makes a :func:`plan`: the
owner's identity ids cut into ranges of about :data:`BATCH_ROWS` identities. A
:class:`FaceReader` turns one range into vectors: one
query for its rows, one key store query for their data keys, then each artifact is
decrypted and all are decoded and validated together (:func:`vault.codec.stack_rows`).

:class:`Workers` reads the ranges in worker processes, one per core, and hands the
results back in range order, so the index receives exactly what a reader in the
calling process would give, in the same order; the calling process reads the first
ranges itself while the workers start. Each worker is a fresh Python process
(``python -m vault.dedupe_load``) that opens the two databases and the key provider
from the same settings, as any idvault command does: no key material is passed to it,
and it exits when the load is done. It gets its settings and ranges on stdin and
writes frames on stdout: a JSON head (rows read, then per face model its vector
count, or an error), then per model the identity ids (int64), the unit vectors
(float32) and their binary codes (uint8), raw. A worker normalises and encodes
(:func:`vault.dedupe_index.normalise`, :func:`~vault.dedupe_index.encode`) what it
reads, on one BLAS thread, so the calling process only copies rows into the index:
encoding there took its BLAS threads, which spin after each call, onto the cores
the workers need (bench/bench_rebuild.py).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import select as io_select
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sqlalchemy import Engine, event, func, select

from vault import codec, crypto, errors
from vault.config import Settings
from vault.db import READ_ONLY, make_engine
from vault.dedupe_index import encode, normalise
from vault.keyprovider import provider_for
from vault.keystore import KeyStore
from vault.models import Artifact, Identity

INDEXED_STATUSES = ("active", "held")  # held identities are indexed: a third try is caught
BATCH_ROWS = 1000  # artifacts per range: a worker holds ~15 MB for one
PIPE_BYTES = 1 << 20  # Linux's default limit for unprivileged processes
_HEAD = struct.Struct(">I")

Range = tuple[int | None, int | None]  # identity ids lo <= id < hi; None: open
# model id, identity id per vector, vectors, and (from a worker) the unit vectors' codes;
# None: the vectors as stored, for OwnerIndex.add_many to normalise and encode
Part = tuple[str, np.ndarray, np.ndarray, np.ndarray | None]
# A worker's BLAS (numpy's encode) on one thread: the workers already fill the cores.
ONE_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                     "MKL_NUM_THREADS")}


def _indexed(owner_id: int) -> tuple:
    return (Identity.owner_id == owner_id, Identity.status.in_(INDEXED_STATUSES),
            Artifact.kind == "face")


@dataclass(frozen=True)
class Plan:
    ranges: list[Range]
    identities: int  # of the owner, any status: what the ranges hold at most


def plan(conn, owner_id: int, batch: int | None = None) -> Plan:
    """Cut the owner's identities into id ranges of about ``batch`` (default
    :data:`BATCH_ROWS`) each on average, from the span and count of their ids: one query
    on the owner's index, however large the roster (numbering the artifacts to cut
    exactly took 2-3 s at 1M)."""
    batch = batch or BATCH_ROWS
    lo, hi, count = conn.execute(select(func.min(Identity.id), func.max(Identity.id),
                                        func.count()).where(Identity.owner_id == owner_id)).one()
    if not count:
        return Plan([(None, None)], 0)
    width = max(1, math.ceil(batch * (hi - lo + 1) / count))
    bounds: list[int | None] = [None, *range(lo + width, hi + 1, width), None]
    # open at both ends: an identity stored since is read too (and is in the change log)
    return Plan(list(zip(bounds[:-1], bounds[1:], strict=True)), count)


class FaceReader:
    """Decrypts and decodes the face artifacts of one owner, a range at a time."""

    def __init__(self, engine: Engine, keys: KeyStore, vault_id: str, owner_id: int,
                 owner: str) -> None:
        self.engine = engine.execution_options(**{READ_ONLY: True})
        self.keys = keys
        self.owner_id = owner_id
        # Vault._context with the parts that vary inside one owner's load left open
        self.context = crypto.ContextEncoder({"vault": vault_id, "owner": owner, "kind": "face"},
                                             ("identity", "artifact", "model_id"))

    def read(self, lo: int | None, hi: int | None) -> tuple[int, list[Part]]:
        """``(rows read, parts)`` for the identities ``lo <= id < hi``, one part per face
        model, vectors in (identity id, artifact id) order."""
        where = list(_indexed(self.owner_id))
        if lo is not None:
            where.append(Identity.id >= lo)
        if hi is not None:
            where.append(Identity.id < hi)
        with self.engine.begin() as conn:
            rows = conn.execute(select(Identity.id, Identity.uid, Artifact.id, Artifact.model_id,
                                       Artifact.ciphertext)
                                .join(Artifact, Artifact.identity_id == Identity.id)
                                .where(*where).order_by(Identity.id, Artifact.id)).all()
        deks = self.keys.all_deks({r[1] for r in rows})
        by_model: dict[str, tuple[list[int], list[bytes]]] = {}
        for identity_id, uid, art_id, model_id, ciphertext in rows:
            dek = deks.get(uid)
            if dek is None:
                continue  # shredded mid-erasure; its rows are going
            try:
                payload = crypto.open_token(dek, ciphertext,
                                            context=self.context(uid, art_id, model_id))
            except errors.DecryptionError as exc:
                raise errors.DecryptionError(f"face artifact {art_id} of identity {uid}: "
                                             f"{exc}") from None
            ids, payloads = by_model.setdefault(model_id, ([], []))
            ids.append(identity_id)
            payloads.append(payload)
        parts = []
        for model_id, (ids, payloads) in by_model.items():
            vectors, counts = codec.stack_rows(payloads, kind="face", name="normed")
            parts.append((model_id, np.repeat(np.asarray(ids, dtype=np.int64), counts), vectors,
                          None))
        return len(rows), parts

    def map(self, ranges: Iterable[Range]) -> Iterator[tuple[int, list[Part]]]:
        """:meth:`read` of each range, in order (the interface of :class:`Workers`)."""
        for lo, hi in ranges:
            yield self.read(lo, hi)


# -- worker processes ---------------------------------------------------------------------
class Workers:
    """``n`` worker processes reading one owner's ranges (a context manager)."""

    AHEAD = 2  # ranges queued per worker beyond the one it reads

    def __init__(self, n: int, settings: Settings, vault_id: str, owner_id: int,
                 owner: str, here: FaceReader | None = None) -> None:
        """``here``: a reader in this process, which reads the first ranges while the
        workers start."""
        self.here = here
        # Settings go over the pipe, not the command line: URLs may hold a password.
        config = {"database_url": settings.resolved_database_url,
                  "keystore_url": settings.resolved_keystore_url,
                  "key_provider": settings.key_provider,
                  "key_file": str(settings.resolved_key_file),
                  "vault_id": vault_id, "owner_id": owner_id, "owner": owner}
        env = {**os.environ, **ONE_THREAD}
        root = str(Path(__file__).resolve().parents[1])  # where `vault` imports from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # -P: nothing from the working directory shadows a module of the worker's
        self.procs = [subprocess.Popen([sys.executable, "-P", "-m", "vault.dedupe_load"], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                      for _ in range(n)]
        for p in self.procs:
            try:  # room for a range's vectors: a worker is not held up by every 64 KiB read
                fcntl.fcntl(p.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except (AttributeError, OSError):  # not Linux, or over the system's limit
                pass
            self._send(p, config)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for p in self.procs:
            if exc_type is None and p.poll() is None:
                try:
                    self._send(p, None)
                except OSError:
                    pass
            else:  # a failed or abandoned load: its workers may be blocked writing
                p.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdin.close()
            p.stdout.close()

    @staticmethod
    def _send(proc: subprocess.Popen, message: object) -> None:
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()

    def map(self, ranges: Iterable[Range]) -> Iterator[tuple[int, list[Part]]]:
        """What :meth:`FaceReader.read` gives for each range, in order: the first ones
        read here until every worker has started (a worker says so with an empty frame),
        then the ``k``-th of the rest by worker ``k mod n``."""
        ranges = list(ranges)
        first = 0
        while self.here is not None and first < len(ranges) and not self._started():
            yield self.here.read(*ranges[first])
            first += 1
        if first == len(ranges):  # all read here: no need to wait for them
            for p in self.procs:
                p.kill()
            return
        for p in self.procs:
            _read_frame(p)  # its "started" frame
        rest, n, sent = ranges[first:], len(self.procs), 0
        for k in range(len(rest)):
            while sent < len(rest) and sent < k + n * (1 + self.AHEAD):
                self._send(self.procs[sent % n], rest[sent])
                sent += 1
            yield _read_frame(self.procs[k % n])

    def _started(self) -> bool:
        ready, _, _ = io_select.select([p.stdout for p in self.procs], [], [], 0)
        return len(ready) == len(self.procs)


def _read_frame(proc: subprocess.Popen) -> tuple[int, list[Part]]:
    stream = proc.stdout
    head = json.loads(_read_exact(stream, _HEAD.unpack(_read_exact(stream, _HEAD.size))[0]))
    if "error" in head:
        cls = getattr(errors, head["error"], None)
        if isinstance(cls, type) and issubclass(cls, errors.VaultError) and \
                cls.__init__ is errors.VaultError.__init__:
            raise cls(head["message"])
        raise errors.VaultError(f"an index load worker failed: {head['error']}: "
                                f"{head['message']}")
    parts = []
    for model_id, count, width, code_bytes in head["parts"]:
        ids = np.empty(count, dtype=np.int64)
        vectors = np.empty((count, width), dtype=np.float32)
        codes = np.empty((count, code_bytes), dtype=np.uint8)
        for a in (ids, vectors, codes):
            _read_into(stream, a)
        parts.append((model_id, ids, vectors, codes))
    return head["rows"], parts


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise errors.VaultError("an index load worker exited early (see its error above)")
    return data


def _read_into(stream: BinaryIO, array: np.ndarray) -> None:
    view = memoryview(array).cast("B")
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])
        if not got:
            raise errors.VaultError("an index load worker exited early (see its error above)")
        done += got


def _write_frame(out: BinaryIO, head: dict, arrays: list[np.ndarray] = ()) -> None:
    data = json.dumps(head).encode()
    out.write(_HEAD.pack(len(data)) + data)
    for a in arrays:
        out.write(memoryview(np.ascontiguousarray(a)).cast("B"))
    out.flush()


def _reading_engine(url: str, schema: str) -> Engine:
    """A worker's engine. On PostgreSQL its results come in binary: a ciphertext is then
    sent as it is, not as hex text, which halves the cost of fetching it."""
    engine = make_engine(url, schema=schema)
    if engine.dialect.name == "postgresql":
        from psycopg.pq import Format

        @event.listens_for(engine, "before_cursor_execute")
        def _binary(conn, cursor, statement, parameters, context, executemany) -> None:
            cursor.format = Format.BINARY
    return engine


def _worker(inp: BinaryIO, out: BinaryIO) -> None:
    config = json.loads(inp.readline())
    engine = _reading_engine(config["database_url"], "data")
    keys = KeyStore(_reading_engine(config["keystore_url"], "keystore"),
                    provider_for(config["key_provider"], Path(config["key_file"])),
                    dek_cache_seconds=0)
    reader = FaceReader(engine, keys, config["vault_id"], config["owner_id"], config["owner"])
    _write_frame(out, {"rows": 0, "parts": []})  # started
    for line in inp:
        task = json.loads(line)
        if task is None:
            return
        try:
            rows, read = reader.read(*task)
            parts = []
            for model_id, ids, vectors, _ in read:
                unit = normalise(vectors)
                parts.append((model_id, ids, unit, encode(unit)))
        except Exception as exc:  # reported to the parent, which raises it there
            _write_frame(out, {"error": type(exc).__name__, "message": str(exc)})
            return
        _write_frame(out, {"rows": rows, "parts": [(m, len(i), v.shape[1], c.shape[1])
                                                   for m, i, v, c in parts]},
                     [a for part in parts for a in part[1:]])


if __name__ == "__main__":
    # Frames go to the real stdout; anything a library prints goes to stderr.
    frames = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _worker(sys.stdin.buffer, frames)
    frames.close()
    os._exit(0)  # nothing to clean up: skip the interpreter's teardown (~0.1 s)
