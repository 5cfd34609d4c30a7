"""A Core SELECT compiled once and run on the driver's cursor: the hottest reads' fast path.

``Connection.execute`` costs about 50 µs per statement on top of the driver's
own ``cursor.execute`` (an execution context, a cursor result and its
metadata, events): for the two statements of an API lookup by handle, a
third of the lookup's own time. A :class:`CompiledRead` keeps what does not change between calls:
the statement compiled by SQLAlchemy for the connection's dialect, the order of
its parameters and each column's result processor (the type's own conversion,
e.g. SQLite's datetime strings and JSON text). Each call then runs the driver's
cursor on the pooled connection SQLAlchemy checked out, so the SQL and the
values are those ``Connection.execute`` gives (tests compare the two); only
the per-call machinery is skipped. A database connection found lost is
invalidated, as SQLAlchemy would, and the read made again on a new one.

Only for a few fixed SELECTs on hot paths; everything else uses the ORM or
``Connection.execute``.
"""

from __future__ import annotations

import threading
import weakref
from collections import namedtuple
from collections.abc import Callable

from sqlalchemy import Connection, Select
from sqlalchemy.engine import Dialect


class CompiledRead:
    """``statement`` (a Core SELECT with named bind parameters) ready to run on a connection;
    rows are named tuples with the statement's column names."""

    def __init__(self, statement: Select) -> None:
        self.statement = statement
        names = [c.key for c in statement.selected_columns]
        self.Row = namedtuple("Row", names)  # type: ignore[misc]
        self._by_dialect: weakref.WeakKeyDictionary[Dialect, tuple] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def _prepared(self, dialect: Dialect) -> tuple[str, tuple[str, ...] | None, list]:
        found = self._by_dialect.get(dialect)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)
            if compiled.binds and any(b.type.dialect_impl(dialect).bind_processor(dialect)
                                      for b in compiled.binds.values()):
                raise TypeError("CompiledRead takes parameters the driver accepts as they are")
            order = tuple(compiled.positiontup) if compiled.positional else None
            processors = [c.type.dialect_impl(dialect).result_processor(dialect, None)
                          for c in self.statement.selected_columns]
            found = (compiled.string, order, processors)
            with self._lock:
                self._by_dialect[dialect] = found
        return found

    def all(self, conn: Connection, params: dict[str, object]) -> list:
        """The rows for ``params``, read on ``conn``'s database connection. A connection
        lost since it was pooled (a database restart) is invalidated and the read made
        once more on a new one: a read can be repeated, and the pool need not ping."""
        sql, order, processors = self._prepared(conn.dialect)
        args = [params[k] for k in order] if order is not None else params
        for attempt in (1, 2):
            dbapi_conn = conn.connection.dbapi_connection  # a new one after invalidate()
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute(sql, args)
                raw = cursor.fetchall()
                break
            except conn.dialect.loaded_dbapi.Error as exc:
                if attempt == 2 or not conn.dialect.is_disconnect(exc, dbapi_conn, cursor):
                    raise
                conn.invalidate(exc)
            finally:
                cursor.close()
        make: Callable = self.Row._make
        return [make([p(v) if p else v for p, v in zip(processors, row)]) for row in raw]

    def first(self, conn: Connection, params: dict[str, object]):
        """The first row for ``params``, or None."""
        rows = self.all(conn, params)
        return rows[0] if rows else None
