"""The Flask application: ``create_app(config)`` builds the JSON API and the UI.

One app serves one vault. Blueprints: ``/v1`` (the JSON API, one blueprint
per area, ``web/api/``) and the HTML UI (``web/ui/``). Both call the same
vault services the CLI uses. ``idvault serve`` runs the app on waitress, a
production WSGI server (``web/serve.py``); docs/web.md describes the whole.
"""

from __future__ import annotations

import datetime as dt
import importlib
import io
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from flask import Flask, Request, request
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session

from vault.config import Settings
from vault.errors import InvalidInput
from vault.jobs import JobQueue
from vault.login_throttle import Policy as LoginPolicy
from vault.vault import Vault
from web import errors as web_errors
from web.auth import csrf_token, current_principal, password_change_gate

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
SECRET_FILE = "web-secret.key"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
# Pages anyone may cache (nothing personal on them).
PUBLIC_CACHEABLE = ("/static/",)
HSTS = ("Strict-Transport-Security", "max-age=31536000; includeSubDomains")


@dataclass
class WebConfig:
    """Settings of the web app (docs/web.md#configuration).

    ``settings`` locate the vault (default: ``Settings.from_env()``); pass an
    opened ``vault`` instead to share one (tests). ``models_dir`` and
    ``pack`` choose the face models enrollment uses.
    """

    settings: Settings | None = None
    vault: Vault | None = None
    models_dir: Path | None = None  # IDVAULT_MODELS
    pack: str = "buffalo_l"
    secret_key: str | None = None  # IDVAULT_SECRET_KEY; default DATA_DIR/web-secret.key
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # IDVAULT_MAX_REQUEST_BYTES
    max_photos: int = 32  # photos per enrollment request
    trust_proxy: bool = False  # IDVAULT_TRUST_PROXY
    run_jobs: bool = True  # start the embedded job worker thread (never with a broker)
    # Successful lookups by handle answered before Flask (web/api/fast_lookup.py); off,
    # Flask answers them too, with the same bytes (tests compare the two).
    fast_lookup: bool = True
    # Modules imported at start so the job kinds they register can run here
    # (e.g. the generator's); IDVAULT_JOB_MODULES, comma-separated.
    job_modules: tuple[str, ...] = ()
    session_hours: float = 12.0
    # Failed sign-ins of one account from one address, and from one address across
    # accounts, within 15 minutes before that locks (vault/login_throttle.py).
    login_attempts: int = 5
    login_address_attempts: int = 50
    extra: dict = field(default_factory=dict)  # Flask config overrides

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0:
            raise InvalidInput("max_request_bytes must be positive")
        if not 1 <= self.max_photos <= 64:
            raise InvalidInput("max_photos must be between 1 and 64")

    @property
    def session_ttl(self) -> dt.timedelta:
        return dt.timedelta(hours=self.session_hours)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object
                 ) -> WebConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        if environ.get("IDVAULT_SECRET_KEY"):
            values["secret_key"] = environ.get("IDVAULT_SECRET_KEY")
        raw = environ.get("IDVAULT_MAX_REQUEST_BYTES")
        if raw:
            try:
                values["max_request_bytes"] = int(raw)
            except ValueError:
                raise InvalidInput(f"IDVAULT_MAX_REQUEST_BYTES={raw!r} is not an integer") \
                    from None
        if environ.get("IDVAULT_TRUST_PROXY"):
            values["trust_proxy"] = environ.get("IDVAULT_TRUST_PROXY", "").lower() in (
                "1", "true", "yes")
        if environ.get("IDVAULT_JOB_MODULES"):
            values["job_modules"] = tuple(
                m.strip() for m in environ.get("IDVAULT_JOB_MODULES", "").split(",") if m.strip())
        if environ.get("IDVAULT_MODELS"):
            values["models_dir"] = Path(environ.get("IDVAULT_MODELS", ""))
        names = {f.name for f in fields(cls)}
        values.update({k: v for k, v in overrides.items() if v is not None and k in names})
        return cls(**values)  # type: ignore[arg-type]


class AppState:
    """What the views share: the vault, the job queue, the face analyser."""

    def __init__(self, config: WebConfig, vault: Vault, owns_vault: bool) -> None:
        self.config = config
        self.vault = vault
        self.owns_vault = owns_vault
        dispatch = None
        if vault.settings.broker_url:  # scale-out: the workers run the jobs
            from web.workers.celery_app import dispatcher
            from web.workers.runtime import load_kinds

            load_kinds()
            dispatch = dispatcher(vault.settings.broker_url)
        self.jobs = JobQueue(vault, dispatch=dispatch)
        self.jobs.models_dir = config.models_dir  # type: ignore[attr-defined]  # generate jobs
        self.login_policy = LoginPolicy(limit=config.login_attempts,
                                        address_limit=config.login_address_attempts)
        self._enroller = None
        self._lock = threading.Lock()
        self._read_engine = _read_engine(vault)
        self._core_engine = _core_engine(vault)

    def enroller(self):
        """The face enrollment flow, loaded on first use (ModelUnavailable -> 503)."""
        if self._enroller is None:
            with self._lock:
                if self._enroller is None:
                    from encoders.enrollment import Enroller
                    from encoders.face.analyzer import FaceAnalyzer

                    analyzer = FaceAnalyzer.from_models_dir(self.config.models_dir,
                                                            pack=self.config.pack)
                    self._enroller = Enroller(self.vault, analyzer,
                                              models_dir=self.config.models_dir)
        return self._enroller

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only ORM transaction for reads of several statements (listing identities).

        On SQLite the vault's sessions begin with ``BEGIN IMMEDIATE`` (the
        write lock), which serialises concurrent readers; these begin a
        deferred read transaction on a ``query_only`` connection instead, so
        readers see one consistent WAL snapshot and neither wait for nor
        block writers. On PostgreSQL it is the vault's engine, read-only.
        """
        with Session(self._read_engine, expire_on_commit=False) as s, s.begin():
            yield s
            s.rollback()

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A connection for Core reads on the hottest paths (API keys, lookups by handle).

        It is in autocommit mode: each statement reads one consistent snapshot by
        itself and no BEGIN or ROLLBACK is sent (on PostgreSQL each would be a
        round trip). On SQLite it is ``query_only`` and never takes the write lock.
        """
        with self._core_engine.connect() as conn:
            yield conn

    def close(self) -> None:
        self.jobs.stop()
        for engine in (self._read_engine, self._core_engine):
            if engine is not self.vault.engine:
                engine.dispose()
        if self.owns_vault:
            self.vault.dispose()


def _read_engine(vault: Vault) -> Engine:
    engine = vault.engine
    if engine.dialect.name != "sqlite":
        return engine
    reader = _sqlite_reader(engine)

    @event.listens_for(reader, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN")  # deferred: a WAL read snapshot, no write lock

    return reader


def _core_engine(vault: Vault) -> Engine:
    engine = vault.engine
    if engine.dialect.name != "sqlite":
        # Its own pool, without the vault's ping before each use (a round trip): the
        # reads on it (vault.compiled_read) redo a read once on a lost connection.
        return create_engine(engine.url, isolation_level="AUTOCOMMIT")
    # pysqlite in autocommit (isolation_level None) and no BEGIN: each statement is its
    # own read transaction.
    return _sqlite_reader(engine)


def _sqlite_reader(engine: Engine) -> Engine:
    """Another engine on the vault's SQLite file whose connections can only read."""
    url = engine.url.render_as_string(hide_password=False)
    reader = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
    reader.dialect.isolation_level = None  # type: ignore[attr-defined]

    @event.listens_for(reader, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA query_only=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return reader


class _InMemoryUploadRequest(Request):
    """Flask's request, with every multipart file part kept in memory.

    Werkzeug spools a file part over 500 kB to an unencrypted temporary file;
    uploads here are photos of people, and none may reach a disk in plaintext
    (docs/security.md#uploads-never-touch-disk). ``MAX_CONTENT_LENGTH`` bounds
    all parts of a request together, so this costs at most that much memory.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None) -> io.BytesIO:
        return io.BytesIO()


class _SecurityHeaders:
    """WSGI middleware: every response gets the security headers it did not set itself,
    ``Cache-Control: no-store`` unless it is public (``PUBLIC_CACHEABLE``), and HSTS over
    https. Added to the WSGI header list, they cost a list append each; through
    werkzeug's ``Headers`` (an ``after_request`` hook) they cost 15 µs a request, a
    twentieth of a lookup by handle."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Callable):
        def start(status: str, headers: list, exc_info=None):
            present = {k.lower() for k, _ in headers}
            headers.extend(h for h in SECURITY_HEADERS.items() if h[0].lower() not in present)
            if ("cache-control" not in present
                    and not environ.get("PATH_INFO", "").startswith(PUBLIC_CACHEABLE)):
                headers.append(("Cache-Control", "no-store"))
            if environ.get("wsgi.url_scheme") == "https" and "strict-transport-security" \
                    not in present:
                headers.append(HSTS)
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure whenever the request came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        try:
            return bool(app.config["SESSION_COOKIE_SECURE"] or request.is_secure)
        except RuntimeError:  # outside a request
            return bool(app.config["SESSION_COOKIE_SECURE"])

    def open_session(self, app: Flask, request):
        # What Flask answers without a cookie, before it builds the signing serializer
        # (some 20 µs, a sixth of a health check).
        if not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def _secret_key(config: WebConfig, settings: Settings) -> str:
    if config.secret_key:
        if len(config.secret_key) < 32:
            raise InvalidInput("the web secret key must be at least 32 characters")
        return config.secret_key
    path = settings.data_dir / SECRET_FILE
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    # Written whole under a temporary name, then linked into place (link never replaces):
    # a server starting beside this one sees no file or a complete one, never an empty
    # one it would sign cookies with.
    key = secrets.token_urlsafe(48)
    tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process won the race
            return _read_secret(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def _read_secret(path: Path) -> str:
    key = path.read_text().strip()
    if len(key) < 32:
        raise InvalidInput(f"the web secret key file {path} is empty or truncated; delete it "
                           "(a new one is made; every UI session then signs in again)")
    return key


def create_app(config: WebConfig | None = None) -> Flask:
    """The idvault web app for one vault (see ``WebConfig``)."""
    config = config or WebConfig.from_env()
    for module in config.job_modules:
        try:
            importlib.import_module(module)  # registers its job kinds
        except ImportError as exc:
            raise InvalidInput(f"cannot import job module {module!r}: {exc}") from None
    owns = config.vault is None
    vault = config.vault or Vault.open(config.settings or Settings.from_env())
    settings = vault.settings
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.request_class = _InMemoryUploadRequest
    app.config.update(
        SECRET_KEY=_secret_key(config, settings),
        MAX_CONTENT_LENGTH=config.max_request_bytes,
        MAX_FORM_MEMORY_SIZE=1024 * 1024,
        MAX_FORM_PARTS=200,  # more photos than max_photos get a 400 that says so
        SESSION_COOKIE_NAME="idvault_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=False,
        PERMANENT_SESSION_LIFETIME=config.session_ttl,
        JSON_SORT_KEYS=True,
        TRAP_HTTP_EXCEPTIONS=False,
    )
    app.config.update(config.extra)
    app.session_interface = _SessionInterface()
    state = AppState(config, vault, owns)
    app.extensions["idvault"] = state
    if config.fast_lookup:
        from web.api.fast_lookup import FastLookup

        app.wsgi_app = FastLookup(app.wsgi_app, state, app)  # type: ignore[method-assign]
    app.wsgi_app = _SecurityHeaders(app.wsgi_app)  # type: ignore[method-assign]
    if config.trust_proxy:  # outermost: the headers then see the request's own scheme
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore

    web_errors.register(app)
    app.before_request(password_change_gate)
    from web.api import create_api_blueprint
    from web.ui import create_ui_blueprint

    app.register_blueprint(create_api_blueprint())
    app.register_blueprint(create_ui_blueprint())

    @app.context_processor
    def _template_globals() -> dict:
        def principal():
            try:
                return current_principal()
            except Exception:
                return None

        return {"csrf_token": csrf_token, "principal": principal}

    if config.run_jobs and state.jobs.dispatch is None:
        state.jobs.start()
    return app


def app_state(app: Flask) -> AppState:
    return app.extensions["idvault"]
