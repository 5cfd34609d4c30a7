"""Serving the app on waitress, a production WSGI server (never Flask's dev server).

``idvault serve`` calls :func:`serve`; benchmarks and tests use
:func:`make_server` to run the same server on a free loopback port.

One waitress process is bound by Python's GIL to about one core, so
:func:`serve` can run several **worker processes** (pre-fork): the parent
binds the listening socket, then forks the workers; each builds its own app
(engines, pools and background threads do not survive a fork) and serves the
inherited socket, so the kernel hands each new connection to whichever worker
accepts first. The parent serves nothing: it restarts a worker that dies,
and on SIGTERM or SIGINT (Ctrl-C) stops them all and waits for them. Workers
share nothing in memory; what they keep in memory (the dedupe index, cached
data keys) follows the database's change log as on scaled-out API nodes
(docs/deployment.md).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from flask import Flask

from vault import accounts
from vault.errors import Conflict, InvalidInput, VaultError

log = logging.getLogger("idvault.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_THREADS = 8
# Open connections per process; each may hold a request body of up to the body limit
# in memory while it arrives (docs/security.md#uploads-never-touch-disk).
CONNECTION_LIMIT = 200
BODY_SLACK = 1024 * 1024
NEVER_SPOOL = 2**62  # a buffer size no buffer reaches: waitress keeps it in memory
MAX_WORKERS = 64
# A worker that dies this soon after starting, this many times in a row, is not
# restarted again: it cannot start (a database that refuses it, a broken setting).
QUICK_DEATH_SECONDS = 10.0
QUICK_DEATHS = 5
RESIGNAL_SECONDS = 6.0  # a stop signal is sent again after this long (see _serve_here)


def default_workers(environ=None) -> int:
    """``IDVAULT_WEB_WORKERS``, else one per CPU up to 4 (each worker may load the face
    models, so more CPUs do not add workers unasked)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("IDVAULT_WEB_WORKERS", "").strip()
    if not raw:
        return max(1, min(os.cpu_count() or 1, 4))
    try:
        workers = int(raw)
    except ValueError:
        raise InvalidInput(f"IDVAULT_WEB_WORKERS={raw!r} is not an integer") from None
    if not 1 <= workers <= MAX_WORKERS:
        raise InvalidInput(f"IDVAULT_WEB_WORKERS must be between 1 and {MAX_WORKERS}")
    return workers


def make_server(app: Flask, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                threads: int = DEFAULT_THREADS, sock: socket.socket | None = None):
    """A waitress server for ``app`` bound to ``host:port`` (port 0: any free port), or
    serving the listening socket ``sock``."""
    from waitress import create_server

    where = {"sockets": [sock]} if sock is not None else {"host": host, "port": port}
    return create_server(
        app, threads=threads, ident="idvault", **where, **buffer_settings(app),
        max_request_header_size=64 * 1024, connection_limit=CONNECTION_LIMIT,
        channel_timeout=120, expose_tracebacks=False,
        # Behind a trusted proxy (IDVAULT_TRUST_PROXY) the app's ProxyFix reads the
        # X-Forwarded-* headers (the client address the login throttle counts); otherwise
        # waitress drops them, so no client can claim another address.
        clear_untrusted_proxy_headers=not _trusts_proxy(app))


def _trusts_proxy(app: Flask) -> bool:
    state = app.extensions.get("idvault")
    return bool(state is not None and state.config.trust_proxy)


def buffer_settings(app: Flask) -> dict[str, int]:
    """waitress's body limit and buffering for ``app``: nothing it receives or sends is
    ever spooled to a temporary file (docs/security.md#uploads-never-touch-disk).

    waitress reads a whole request body before a thread runs the app, into a buffer that
    moves to an unencrypted temporary file past ``inbuf_overflow`` (512 kB by default);
    responses likewise past ``outbuf_overflow`` (1 MB). Bodies are photos of people and
    responses decrypted artifacts, so neither threshold is ever reached: the body buffer
    is bounded by ``max_request_body_size`` instead (checked on every read, chunked
    bodies included), and a response buffer by ``outbuf_high_watermark`` plus the one
    write the app is making (which the app held in memory already).
    """
    limit = app.config.get("MAX_CONTENT_LENGTH") or 0
    return {
        # Bodies a little over the app's limit still reach Flask, whose 413 is in the
        # JSON error shape; larger ones waitress refuses itself, before reading any
        # of a body that declares its length.
        "max_request_body_size": max(limit, 0) + BODY_SLACK,
        "inbuf_overflow": NEVER_SPOOL,
        "outbuf_overflow": NEVER_SPOOL,
    }


def listen_socket(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), for the workers."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidInput(f"cannot listen on {host}:{port}: unknown host {host!r}; "
                           f"choose another with --host") from exc
    family, kind, proto, _, addr = info[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise _bind_error(host, port, exc) from exc
    sock.listen(1024)
    sock.setblocking(False)  # waitress accepts from its event loop
    return sock


def _bind_error(host: str, port: int, exc: OSError) -> VaultError:
    """What a user can do about a port that cannot be bound (the raw OSError says neither)."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return Conflict(f"port {port} is already in use on {host}: another process holds "
                        f"it; choose another with --port, or stop that process")
    if exc.errno == errno.EACCES:
        return InvalidInput(f"not allowed to listen on {where} (ports below 1024 need "
                            f"privileges); choose another with --port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return InvalidInput(f"cannot listen on {where}: {host} is not an address of this "
                            f"machine; choose another with --host")
    return InvalidInput(f"cannot listen on {where}: {exc.strerror or exc}")


def server_url(server) -> str:
    return _url(str(server.effective_host), server.effective_port)


def _url(host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def first_start(vault, echo: Callable[[str], None]) -> None:
    """Tell how to sign in; on the very first start, create the first superuser."""
    with vault.session() as s:
        if accounts.count_users(s) == 0:
            _, password = accounts.create_user(s, "admin", superuser=True,
                                                 actor="serve:first-start")
            echo("first start: created the superuser 'admin' (admin of every owner) with "
                 "this one-time password:")
            echo(f"    {password}")
            echo("sign in as admin with it; you will be asked to choose your own. It is not "
                 "stored and not shown again (`idvault user passwd admin` makes a new one).")
        else:
            echo("sign in with your account; `idvault user add NAME --owner OWNER --role "
                 "admin` creates one, `idvault user passwd NAME` resets a password")


def serve(make_app: Callable[[], Flask], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          *, threads: int = DEFAULT_THREADS, workers: int = 1,
          echo: Callable[[str], None] = print,
          greet: Callable[[], None] | None = None) -> None:
    """Serve ``make_app()`` until SIGTERM or SIGINT; prints the URL, then calls ``greet``
    (how to sign in). With ``workers`` > 1, each worker process calls ``make_app``."""
    if not 1 <= workers <= MAX_WORKERS:
        raise InvalidInput(f"workers must be between 1 and {MAX_WORKERS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # each worker opens the vault
    app = make_app() if workers == 1 else None  # a broken setup fails before listening
    try:
        sock = listen_socket(host, port)
    except BaseException:
        if app is not None:
            _close(app)
        raise
    url = _url(*sock.getsockname()[:2])
    how = f"{threads} threads" if workers == 1 else f"{workers} workers x {threads} threads"
    echo(f"idvault serving on {url} (waitress, {how})")
    echo(f"  UI: {url}   API: {url}v1/   OpenAPI: {url}v1/openapi.json")
    if not is_loopback(host):
        echo("  warning: listening beyond this machine; put it behind a TLS-terminating "
             "proxy and set IDVAULT_TRUST_PROXY=1 so cookies are marked Secure")
    serving = False
    try:
        if greet is not None:
            greet()
        serving = True
        if app is not None:
            _serve_here(app, sock, threads)
        else:
            _Supervisor(make_app, sock, threads, workers).run()
    finally:
        if app is not None and not serving:
            _close(app)
        sock.close()
        echo("stopped")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _serve_here(app: Flask, sock: socket.socket, threads: int,
                stop: threading.Event | None = None) -> None:
    """Serve ``app`` in this process until SIGTERM or SIGINT (or ``stop`` was set while
    it started), then close it."""
    stop = stop or threading.Event()
    try:
        server = make_server(app, sock=sock, threads=threads)
    except BaseException:
        _close(app)
        raise
    serving = threading.Event()
    resignalling = False

    def on_signal(signum, frame):
        nonlocal resignalling
        stop.set()
        if serving.is_set():
            if not resignalling:
                resignalling = True
                threading.Thread(target=resignal, daemon=True, name="idvault-stop").start()
            raise KeyboardInterrupt  # ends waitress's loop, which stops its threads

    def resignal():
        # An exception raised by a signal handler is lost when the signal lands in a
        # finaliser or a weakref callback ("Exception ignored in ..."): ask again, after
        # the time waitress gives running requests to finish (5 s).
        while not _cleared(serving, RESIGNAL_SECONDS):
            os.kill(os.getpid(), signal.SIGTERM)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS} if main else {}
    try:
        serving.set()
        if not stop.is_set():
            server.run()  # returns on KeyboardInterrupt, having stopped its threads
    except KeyboardInterrupt:
        pass
    finally:
        serving.clear()  # from here on a signal only sets ``stop``: the cleanup runs once
        server.close()
        _close(app)
        for s, handler in old.items():
            signal.signal(s, handler)


def _cleared(event: threading.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event`` to be cleared; whether it was."""
    deadline = time.monotonic() + seconds
    while event.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not event.is_set()


def _close(app: Flask) -> None:
    """Stop what the app started (its job thread, engines); a bare app has nothing."""
    state = app.extensions.get("idvault")
    if state is not None:
        state.close()


class _Supervisor:
    """The parent of the pre-forked workers: starts, restarts and stops them."""

    def __init__(self, make_app: Callable[[], Flask], sock: socket.socket, threads: int,
                 workers: int) -> None:
        self.make_app, self.sock, self.threads, self.workers = make_app, sock, threads, workers
        self.children: dict[int, float] = {}  # pid -> when it started
        self.stopping = False
        self.quick_deaths = 0

    def run(self) -> None:
        old = {s: signal.signal(s, self._stop) for s in STOP_SIGNALS}
        try:
            for _ in range(self.workers):
                self._spawn()
            while self.children:
                try:
                    pid, status = os.wait()  # a handled signal resumes it (PEP 475)
                except ChildProcessError:
                    break
                started = self.children.pop(pid, None)
                if started is not None and not self.stopping:
                    self._died(pid, status, started)
        finally:
            self._stop(None, None)
            self._reap()
            for s, handler in old.items():
                signal.signal(s, handler)

    def _died(self, pid: int, status: int, started: float) -> None:
        code = os.waitstatus_to_exitcode(status)
        quick = time.monotonic() - started < QUICK_DEATH_SECONDS
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        if self.quick_deaths >= QUICK_DEATHS:
            raise VaultError(f"server workers exited right after starting {QUICK_DEATHS} "
                             f"times in a row (the last with status {code}); their log "
                             "above says why")
        log.warning("worker %d exited (%s); starting another", pid, code)
        if quick:  # back off: 0.5, 1, 2, 4 s
            time.sleep(2.0 ** self.quick_deaths / 4)
        if not self.stopping:
            self._spawn()

    def _spawn(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked across the fork, so the new worker never runs the parent's handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # the worker: it must never return into the parent's code
                code = 1
                try:
                    code = _worker(self.make_app, self.sock, self.threads, os.getppid())
                finally:
                    os._exit(code)
            self.children[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _stop(self, signum, frame) -> None:
        self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _reap(self, timeout: float = 30.0) -> None:
        """Wait for the workers to exit; kill those that take longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.children:
            for pid in list(self.children):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    self.children.pop(pid)
            if self.children and time.monotonic() > deadline:
                for pid in self.children:
                    log.warning("worker %d did not stop in %.0f s; killing it", pid, timeout)
                    os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)


def _worker(make_app: Callable[[], Flask], sock: socket.socket, threads: int,
            parent: int) -> int:
    """A forked worker's whole life (signals still blocked); returns its exit status."""
    stop = threading.Event()
    for s in STOP_SIGNALS:  # while the app is built: noted, acted on once it is
        signal.signal(s, lambda signum, frame: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        _watch_parent(parent)
        _serve_here(make_app(), sock, threads, stop)
        return 0
    except VaultError as exc:  # a setting or the database: its message says what to do
        log.error("worker %d cannot serve: %s", os.getpid(), exc)
        return 1
    except BaseException:  # a worker reports and exits; it never returns into the CLI
        log.exception("worker %d failed", os.getpid())
        return 1
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()


def _watch_parent(parent: int) -> None:
    """Stop this worker when its parent is gone (killed with SIGKILL: no SIGTERM came)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="idvault-parent-watch").start()
