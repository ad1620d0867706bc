"""A process cache for reference data the till reads on every cheque (stores, currencies,
products and their groups, legal entities).

Reading them costs several statements per purchase although they change a few times a day.
Entries are dropped:

* at once when this process writes any of the watched tables (an INSERT/UPDATE/DELETE
  statement on them, ORM flushes included), and again when that transaction commits, so a
  reader that filled the cache between the write and the commit cannot keep the old row;
* after ``TTL_SECONDS`` otherwise, which bounds how long *another* process (a second API
  worker, an import run from the command line) can go on seeing the old value.

The cache is keyed by database URL as well, so tests holding several databases in one process
never see each other's rows.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from sqlalchemy import Delete, Engine, Insert, Update, event
from sqlalchemy.orm import Session

T = TypeVar("T")

TTL_SECONDS = 60.0
WATCHED = frozenset(
    {
        "stores",
        "currencies",
        "legal_entities",
        "products",
        "categories",
        "product_groups",
        "product_group_items",
    }
)
_MAX_ENTRIES = 200_000

_lock = threading.Lock()
_generation = 0
_entries: dict[Hashable, tuple[int, float, Any]] = {}


def _bump() -> None:
    global _generation
    with _lock:
        _generation += 1
        _entries.clear()


def _writes_watched(clause: Any) -> bool:
    if isinstance(clause, Insert | Update | Delete):
        table = getattr(clause, "table", None)
        return getattr(table, "name", None) in WATCHED
    return False


@event.listens_for(Engine, "before_execute")
def _on_execute(conn: Any, clause: Any, multiparams: Any, params: Any, options: Any) -> None:
    if _writes_watched(clause):
        conn.info["omniloyal_refdata_dirty"] = True
        _bump()


@event.listens_for(Engine, "commit")
def _on_commit(conn: Any) -> None:
    if conn.info.pop("omniloyal_refdata_dirty", False):
        _bump()


@event.listens_for(Engine, "rollback")
def _on_rollback(conn: Any) -> None:
    conn.info.pop("omniloyal_refdata_dirty", None)


_keys: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def database_key(session: Session) -> str:
    engine = session.get_bind().engine
    key = _keys.get(engine)
    if key is None:
        key = _keys[engine] = str(engine.url.render_as_string(hide_password=True))
    return key


def cached(session: Session, key: Hashable, load: Callable[[], T]) -> T:
    """The value under ``key`` for this session's database, loaded once per generation and TTL."""
    full = (database_key(session), key)
    now = time.monotonic()
    entry = _entries.get(full)
    if entry is not None and entry[0] == _generation and entry[1] > now:
        return entry[2]
    generation = _generation
    value = load()
    with _lock:
        # A write bumped the generation while we loaded: do not keep what may be the old row.
        if generation == _generation:
            if len(_entries) >= _MAX_ENTRIES:
                _entries.clear()
            _entries[full] = (generation, now + TTL_SECONDS, value)
    return value


MISSING: Any = object()


def peek(session: Session, key: Hashable) -> Any:
    """The cached value under ``key``, or ``MISSING`` (a cached ``None`` is a known absence)."""
    entry = _entries.get((database_key(session), key))
    if entry is not None and entry[0] == _generation and entry[1] > time.monotonic():
        return entry[2]
    return MISSING


def fill(session: Session, keys: list[Hashable], load: Callable[[], dict[Any, T]]) -> dict[Any, T]:
    """Loads several entries at once (``load`` answers every key in ``keys``) and keeps them."""
    db = database_key(session)
    generation = _generation
    values = load()
    expires = time.monotonic() + TTL_SECONDS
    with _lock:
        if generation == _generation:
            if len(_entries) + len(keys) >= _MAX_ENTRIES:
                _entries.clear()
            for key in keys:
                _entries[(db, key)] = (generation, expires, values.get(key))
    return values


def clear() -> None:
    _bump()
