"""No uploaded photo reaches a disk in plaintext (docs/security.md#uploads-never-touch-disk).

A photo larger than every spool threshold (waitress's 512 kB ``inbuf_overflow``,
Werkzeug's 500 kB file parts) is uploaded slowly to a real ``idvault serve``. While
waitress holds all but the last bytes of it, every regular file the server processes
have open (deleted ones included, read back through ``/proc/<pid>/fd``) and every file
under the temporary folders they can write is searched for the photo's bytes; then the
upload finishes and the answer must be an ordinary one. Werkzeug parses the form only
once the whole body is in, so its part of the path is checked in-process, while the
parsed parts are alive.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import secrets
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import consent_doc
from vault import api_keys

SOURCE_ROOT = Path(__file__).resolve().parents[2]
# Large enough to pass every spool threshold several times over, well under the 20 MB
# photo limit and the 64 MiB request limit.
WIDTH, HEIGHT = 1400, 1000
TAIL = 2048  # bytes held back until the scan is done
READ_CAP = 512 * 1024 * 1024  # files larger than this are not ours (none are, here)
LIMIT = 32 * 1024 * 1024  # the server's max_request_bytes (IDVAULT_MAX_REQUEST_BYTES)


@pytest.fixture
def backend() -> str:
    return "sqlite"  # where the body is buffered does not depend on the database


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def marked_photo(marker: bytes) -> bytes:
    """A valid PNG of incompressible noise (about 4 MB) whose first chunk after the header
    is a text chunk holding ``marker``."""
    noise = np.random.default_rng().integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=1)
    png = buf.getvalue()
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return png[:ihdr_end] + _chunk(b"tEXt", b"idvault-test\x00" + marker) + png[ihdr_end:]


def needles(photo: bytes, marker: bytes) -> list[bytes]:
    """What must appear nowhere: the marker, and 64-byte slices from across the photo (a
    spool of any part of it, not just its start, holds one of them)."""
    return [marker] + [photo[i:i + 64] for i in range(len(photo) // 8, len(photo) - TAIL,
                                                      len(photo) // 8)]


# -- what the server can reach -----------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def _holds(path: str, wanted: list[bytes]) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read(READ_CAP)
    except OSError:
        return False
    return any(w in data for w in wanted)


def open_files_holding(pids: list[int], wanted: list[bytes]) -> tuple[list[str], int]:
    """The open regular files of ``pids`` (deleted ones too) that hold any of ``wanted``,
    and how many files were read."""
    found, read = [], 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    continue
                target = os.readlink(path)
            except OSError:
                continue
            read += 1
            if _holds(path, wanted):
                found.append(f"{pid}: fd {fd} -> {target}")
    return found, read


def files_holding(roots: list[Path], wanted: list[bytes], since: float) -> list[str]:
    """Files under ``roots`` changed since ``since`` that hold any of ``wanted``."""
    found = []
    for root in roots:
        for folder, _, names in os.walk(root, onerror=lambda exc: None):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if (stat.S_ISREG(st.st_mode) and st.st_mtime >= since
                        and st.st_size <= READ_CAP and _holds(path, wanted)):
                    found.append(path)
    return found


def writable_temp_roots(tmpdir: Path) -> list[Path]:
    roots = [tmpdir]
    for shared in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(shared) and os.access(shared, os.W_OK):
            roots.append(Path(shared))
    return roots


# -- the server --------------------------------------------------------------------------------


@dataclass
class Served:
    proc: subprocess.Popen
    host: str
    port: int
    token: str
    tmpdir: Path  # the server's TMPDIR
    log: Path


@pytest.fixture
def served(family, tiny_models, tmp_path) -> Iterator[Served]:
    with family.session() as s:
        _, token = api_keys.create_key(s, "smiths", "spool test", list(api_keys.SCOPES),
                                       actor="test")
    tmpdir = tmp_path / "server-tmp"
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDVAULT_")}
    env.update(TMPDIR=str(tmpdir), IDVAULT_DATA_DIR=str(family.settings.data_dir),
               IDVAULT_MODELS=str(tiny_models), IDVAULT_SECRET_KEY="k" * 48,
               IDVAULT_MAX_REQUEST_BYTES=str(LIMIT))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "web.cli.main", "serve", "--port", "0", "--threads", "2",
             "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT,
            cwd=SOURCE_ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (m := re.search(r"serving on http://(127\.0\.0\.1):(\d+)/", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield Served(proc, m.group(1), int(m.group(2)), token, tmpdir, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- a slow upload over a raw socket ------------------------------------------------------------


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]
              ) -> tuple[bytes, str]:
    boundary = "----idvault" + secrets.token_hex(12)
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                  f"{value}\r\n".encode())
    for name, (filename, data, mimetype) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                  f'filename="{filename}"\r\nContent-Type: {mimetype}\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _unsent(sock: socket.socket) -> int:
    """Bytes in this socket's send queue that the peer has not acknowledged."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _server_unread(server_port: int, client_port: int) -> int | None:
    """Bytes the kernel holds for the server's end of this connection, not yet read."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, queues = parts[1], parts[2], parts[4]
        if (int(local.split(":")[1], 16) == server_port
                and int(remote.split(":")[1], 16) == client_port):
            return int(queues.split(":")[1], 16)
    return None


def wait_until_server_read_it(sock: socket.socket, server_port: int) -> None:
    """Until the server process has read every byte sent so far (out of the kernel's
    buffers, into its own): only then can it have spooled them."""
    client_port = sock.getsockname()[1]
    deadline = time.monotonic() + 60
    while True:
        if _unsent(sock) == 0 and _server_unread(server_port, client_port) == 0:
            return
        assert time.monotonic() < deadline, "the server never read the upload"
        time.sleep(0.02)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    sock.settimeout(120)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return status, json.loads(body or b"null")


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out, body = out + body[:n], body[n + 2:]
    return out


ROUTES = {
    "check": ("/v1/photos/check", "multipart"),
    "check, chunked": ("/v1/photos/check", "chunked"),  # no Content-Length: waitress de-chunks
    "enroll": ("/v1/identities/smiths/ana/enroll", "multipart"),
    "json": ("/v1/identities", "json"),  # a raw body (no route takes photos that way)
}


@pytest.mark.slow
def test_a_slow_upload_leaves_no_photo_bytes_on_any_disk(served):
    started = time.time() - 2  # mtime granularity
    marker = secrets.token_hex(32).encode()  # 64 bytes
    photo = marked_photo(marker)
    wanted = needles(photo, marker)
    assert len(photo) > 3 * 1024 * 1024 and len(wanted) >= 7
    outcomes = {}
    for name, (path, kind) in ROUTES.items():
        framing = "Content-Length: {}"
        if kind in ("multipart", "chunked"):
            fields = {"consent": json.dumps(consent_doc())} if name == "enroll" else {}
            body, ctype = multipart(fields, {"photos": ("big.png", photo, "image/png")})
            if kind == "chunked":
                body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                                for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
                framing = "Transfer-Encoding: chunked"
        else:  # the photo inside a JSON document, as a client might smuggle it
            body = json.dumps({"name": "ana", "consent": consent_doc(),
                               "photo": photo.decode("latin-1")}).encode()
            ctype = "application/json"
            wanted_here = [json.dumps(w.decode("latin-1"))[1:-1].encode() for w in wanted]
        head = (f"POST {path} HTTP/1.1\r\nHost: {served.host}:{served.port}\r\n"
                f"Authorization: Bearer {served.token}\r\nContent-Type: {ctype}\r\n"
                f"{framing.format(len(body))}\r\nConnection: close\r\n\r\n").encode()
        sock = socket.create_connection((served.host, served.port), timeout=60)
        try:
            sock.sendall(head + body[:-TAIL])
            wait_until_server_read_it(sock, served.port)
            # In flight: the server holds all but the last TAIL bytes of the body.
            looking_for = wanted_here if kind == "json" else wanted
            pids = descendants(served.proc.pid)
            leaked, read = open_files_holding(pids, looking_for)
            assert read > 0  # the scan saw the server's files (its log, its database)
            leaked += files_holding(writable_temp_roots(served.tmpdir), looking_for, started)
            assert leaked == [], f"{name}: the photo's bytes are on disk in {leaked}"
            sock.sendall(body[-TAIL:])
            outcomes[name] = read_response(sock)
        finally:
            sock.close()
        assert files_holding([served.tmpdir], looking_for, started) == []
    # Each finished upload was answered for what it held, never with a server error.
    for name in ("check", "check, chunked"):
        status, doc = outcomes[name]
        assert status == 200 and [p["photo"] for p in doc["photos"]] == ["big.png"], doc
    status, doc = outcomes["enroll"]
    assert status == 422 and doc["error"]["code"] == "photo_rejected", doc  # no face in noise
    status, doc = outcomes["json"]
    assert status == 400 and "unknown field" in doc["error"]["message"], doc
    assert "Traceback" not in served.log.read_text()


@pytest.mark.slow
def test_bodies_over_the_limit_are_refused_and_never_buffered_past_it(served):
    """A little over the limit: read (into memory), then Flask's 413 in the JSON error
    shape. Over the limit plus 1 MiB: waitress refuses it from the declared length,
    before reading a byte of it."""
    def post(length: int, body: bytes) -> bytes:
        with socket.create_connection((served.host, served.port), timeout=60) as sock:
            sock.sendall(f"POST /v1/identities HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         f"{served.token}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode())
            sock.sendall(body)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(60)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    over = LIMIT + 512 * 1024
    answer = post(over, b" " * over)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    answer = post(LIMIT + 2 * 1024 * 1024, b"")  # declared only: nothing is sent
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds max_body" in answer


def test_the_form_parser_keeps_file_parts_in_memory(web, tmp_path, monkeypatch):
    """Werkzeug spools a file part over 500 kB to a temporary file; the app's request
    class keeps every part in memory, for every route that takes files."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    marker = secrets.token_hex(32).encode()
    photo = marked_photo(marker)
    body, ctype = multipart({}, {"photos": ("big.png", photo, "image/png"),
                                 "evidence": ("consent.png", photo, "image/png")})
    with web.app.test_request_context("/v1/photos/check", method="POST", data=body,
                                      content_type=ctype):
        from flask import request

        parts = request.files.getlist("photos") + request.files.getlist("evidence")
        assert [p.filename for p in parts] == ["big.png", "consent.png"]
        leaked, _ = open_files_holding([os.getpid()], [marker])
        assert leaked == [] and list(scratch.iterdir()) == []
        assert all(p.read() == photo for p in parts)


_WRITES: list[str] | None = None  # while a list: files opened for writing are added


def _audit(event: str, args: tuple) -> None:
    if _WRITES is not None and event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            _WRITES.append(str(path))


@pytest.fixture
def writes() -> Iterator[list[str]]:
    """Every file opened for writing, from Python, while the test runs (an audit hook:
    a temporary file is one, whether or not it has a name)."""
    global _WRITES
    if not getattr(sys, "_idvault_open_hook", False):
        sys.addaudithook(_audit)  # hooks cannot be removed: it stays, idle
        sys._idvault_open_hook = True  # type: ignore[attr-defined]
    _WRITES = []
    try:
        yield _WRITES
    finally:
        _WRITES = None


def test_no_upload_route_writes_a_file(web, writes):
    """Each route that takes an image reads it from memory: nothing is opened for
    writing while it runs (the provenance check once copied uploads to a temp file)."""
    marker = secrets.token_hex(32).encode()
    photo = marked_photo(marker)
    h = web.headers()
    web.client.get("/v1/me", headers=h)  # the key's first use is audited (a database write)
    writes.clear()
    png = ("big.png", photo, "image/png")
    for path, fields, files in (
            ("/v1/photos/check", {}, {"photos": png}),
            ("/v1/verify", {}, {"image": png}),
            ("/v1/identities/smiths/ana/enroll", {"consent": json.dumps(consent_doc())},
             {"photos": png})):
        # Encoded here: the test client's own encoder spools large files to /tmp.
        body, ctype = multipart(fields, files)
        resp = web.client.post(path, headers=h, data=body, content_type=ctype)
        assert resp.status_code in (200, 422), (path, resp.get_data(as_text=True)[:300])
        assert writes == [], f"{path} opened {writes} for writing"
