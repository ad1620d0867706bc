"""Segments: definitions, live counts, materialised memberships kept fresh, exports.

Definitions and their bookkeeping (freshness, count history, dependency graph) live in the
operational store; memberships in the warehouse (``segments.tables``). A definition compiles
to one SQL query per warehouse dialect (``segments.compiler``).

Freshness: ``materialise`` rebuilds a segment from the whole warehouse (on demand, after a
definition change, and periodically for conditions that move with time alone, such as "no
purchase in 30 days"); ``apply_events`` re-evaluates only the members a batch of events
touched against every active dynamic segment (the consumer in ``segments.freshness``).
Both record ``refreshed_at``; every entry and exit is written to ``segment_changes`` and, after
a segment's first build, emitted as ``segment.entered`` / ``segment.left`` to the outbox.

Ordering: the operational transaction (events, counts, a synchronised audience) commits before
the warehouse membership is written. A crash in between makes the next refresh find the same
difference again: events are delivered at least once, never lost.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import uuid4

import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from sqlglot import exp

from omniloyal.analytics.warehouse import Warehouse
from omniloyal.auth.schemas import Principal
from omniloyal.auth.service import record_audit
from omniloyal.catalog import service as catalog
from omniloyal.db.engine import Database
from omniloyal.events.envelope import EventEnvelope
from omniloyal.events.outbox import emit_many, envelope
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError, Conflict, NotFound, not_found
from omniloyal.kernel.pagination import check_limit, decode_cursor, encode_cursor
from omniloyal.offers import service as offers
from omniloyal.offers.schemas import AudienceCreate
from omniloyal.segments import compiler, tables
from omniloyal.segments import loyalty as mirror
from omniloyal.segments.models import Segment, SegmentCount, SegmentReference
from omniloyal.segments.schemas import (
    AudienceExportIn,
    AudienceExportOut,
    BuildOut,
    ChangeRow,
    CountOut,
    CountPoint,
    MemberPage,
    MemberRow,
    SampleMember,
    SampleOut,
    SegmentIn,
    SegmentOut,
    SegmentUpdate,
)

ENTERED = "segment.entered"
LEFT = "segment.left"
# Outbox rows written per INSERT when a build emits many entries and exits.
EMIT_CHUNK = 5000
SAMPLE_LIMIT = 100


class DefinitionError(AppError):
    status_code = 422


def _refusal(error: compiler.ConditionError) -> DefinitionError:
    return DefinitionError(error.code, error.message, field=error.path)


# ---------------------------------------------------------------- compiling in context


def target_of(wh: Warehouse) -> compiler.Target:
    dialect: compiler.Dialect = "clickhouse" if wh.dialect == "clickhouse" else "duckdb"
    return compiler.Target(dialect, tables.database(wh))


def _stores_of_format(db: Database, fmt: str) -> list[str]:
    codes: list[str] = []
    cursor: str | None = None
    while True:
        page = catalog.list_stores(db, 500, cursor, attributes=[f"{compiler.STORE_FORMAT_ATTRIBUTE}:{fmt}"])
        codes.extend(s.code for s in page.items)
        cursor = page.next_cursor
        if not cursor:
            return codes


def _referenced(session: Session, node: compiler.Node) -> dict[int, compiler.Node]:
    """Parsed definitions of every segment ``node`` uses, transitively."""
    found: dict[int, compiler.Node] = {}
    todo = sorted(compiler.references(node))
    while todo:
        segment_id = todo.pop()
        if segment_id in found:
            continue
        row = session.get(Segment, segment_id)
        if row is None:
            raise NotFound("unknown_segment", f"No segment {segment_id}")
        parsed = compiler.parse(row.conditions)
        found[segment_id] = parsed
        todo.extend(compiler.references(parsed))
    return found


def context(db: Database, node: compiler.Node, now: datetime | None = None) -> compiler.Context:
    """What ``node`` needs to compile: referenced segments, stores of formats, group skus."""
    with db.reading() as session:
        segments = _referenced(session, node)
        every = [node, *segments.values()]
        groups = {
            code: sorted(catalog.group_skus(session, code))
            for code in sorted({g for n in every for g in compiler.product_groups(n)})
        }
    formats = {
        fmt: _stores_of_format(db, fmt)
        for fmt in sorted({f for n in every for f in compiler.store_formats(n)})
    }
    return compiler.Context(now=now or utcnow(), segments=segments, store_formats=formats, groups=groups)


def _sql(wh: Warehouse, query: Any) -> str:
    return tables.escape(compiler.render(query, target_of(wh)))


def member_ids(
    db: Database,
    wh: Warehouse,
    node: compiler.Node,
    *,
    only: Sequence[int] | None = None,
    now: datetime | None = None,
) -> pa.Array:
    """Ids of the members ``node`` selects now (Arrow int64, ascending)."""
    tables.ensure(wh)
    return _run_members(wh, _members_query(db, wh, node, only=only, now=now))


def _members_query(
    db: Database, wh: Warehouse, node: compiler.Node, *, only: Sequence[int] | None, now: datetime | None
) -> exp.Select:
    return compiler.members_query(node, target_of(wh), context(db, node, now), only=only, order=True)


def _run_members(wh: Warehouse, query: exp.Select) -> pa.Array:
    return wh.query_arrow(_sql(wh, query)).column("member_id").combine_chunks().cast(pa.int64())


def _reads(query: exp.Expr) -> set[str]:
    """The warehouse tables a segment's query reads (referenced segments included)."""
    return {table.name for table in query.find_all(exp.Table)}


def count_of(db: Database, wh: Warehouse, node: compiler.Node, now: datetime | None = None) -> int:
    tables.ensure(wh)
    query = compiler.count_query(node, target_of(wh), context(db, node, now))
    return int(wh.scalar(_sql(wh, query)) or 0)


# ---------------------------------------------------------------- definitions


def _paths(tree: Any) -> list[tuple[str, compiler.Node]]:
    """(path, leaf) for every leaf of a valid tree, in document order."""
    out: list[tuple[str, compiler.Node]] = []

    def visit(obj: Any, at: str) -> None:
        if not isinstance(obj, dict):
            return
        for key in ("all", "any"):
            if key in obj and isinstance(obj[key], list):
                for index, item in enumerate(obj[key]):
                    visit(item, f"{at}.{key}[{index}]")
                return
        if "not" in obj:
            visit(obj["not"], f"{at}.not")
            return
        out.append((at, compiler.parse(obj, at)))

    visit(tree, "conditions")
    return out


def _graph(session: Session) -> dict[int, set[int]]:
    graph: dict[int, set[int]] = {}
    for segment_id, uses_id in session.execute(select(SegmentReference.segment_id, SegmentReference.uses_id)):
        graph.setdefault(segment_id, set()).add(uses_id)
    return graph


def _reaches(graph: dict[int, set[int]], start: int, goal: int) -> bool:
    seen: set[int] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node in seen:
            continue
        seen.add(node)
        todo.extend(graph.get(node, ()))
    return False


def check_definition(
    db: Database, session: Session, tree: Any, segment_id: int | None = None
) -> compiler.Node:
    """The parsed tree; refuses (422, with the path of the bad node) an invalid tree, a segment
    that does not exist, a cycle through "member of segment", an unknown audience or group."""
    try:
        node = compiler.parse(tree)
        leaves = _paths(tree)
    except compiler.ConditionError as exc:
        raise _refusal(exc) from exc
    graph = _graph(session)
    for path, leaf in leaves:
        if isinstance(leaf, compiler.SegmentRef):
            field = f"{path}.segment"
            if session.get(Segment, leaf.segment) is None:
                raise DefinitionError("unknown_segment", f"No segment {leaf.segment}", field=field)
            if segment_id is not None and (
                leaf.segment == segment_id or _reaches(graph, leaf.segment, segment_id)
            ):
                raise DefinitionError(
                    "segment_cycle",
                    f"Segment {leaf.segment} depends on segment {segment_id}: membership would be circular",
                    field=field,
                )
        elif isinstance(leaf, compiler.Audience):
            for index, code in enumerate(leaf.audiences):
                try:
                    offers.get_audience(db, code)
                except NotFound as exc:
                    raise DefinitionError(
                        "unknown_audience", f"No audience {code!r}", field=f"{path}.audiences[{index}]"
                    ) from exc
        elif isinstance(leaf, compiler.Purchases):
            for index, code in enumerate(leaf.groups):
                try:
                    catalog.group_skus(session, code)
                except NotFound as exc:
                    raise DefinitionError(
                        "unknown_product_group", f"No product group {code!r}", field=f"{path}.groups[{index}]"
                    ) from exc
    return node


def _check_audience(db: Database, code: str | None) -> None:
    if code is None:
        return
    try:
        offers.get_audience(db, code)
    except NotFound as exc:
        raise NotFound("unknown_audience", f"No audience {code!r}", field="audience") from exc


def _references(session: Session, segment_id: int) -> tuple[list[int], list[int]]:
    uses = sorted(
        session.scalars(select(SegmentReference.uses_id).where(SegmentReference.segment_id == segment_id))
    )
    used_by = sorted(
        session.scalars(select(SegmentReference.segment_id).where(SegmentReference.uses_id == segment_id))
    )
    return uses, used_by


def _out(session: Session, row: Segment) -> SegmentOut:
    uses, used_by = _references(session, row.id)
    return SegmentOut(
        id=row.id,
        name=row.name,
        description=row.description,
        kind=row.kind,
        status=row.status,
        conditions=row.conditions,
        audience=row.audience,
        version=row.version,
        member_count=row.member_count,
        materialised_at=row.materialised_at,
        refreshed_at=row.refreshed_at,
        build_ms=row.build_ms,
        last_error=row.last_error,
        last_error_at=row.last_error_at,
        uses=uses,
        used_by=used_by,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _row(session: Session, segment_id: int, *, lock: bool = False) -> Segment:
    stmt = select(Segment).where(Segment.id == segment_id)
    if lock:
        stmt = stmt.with_for_update()
    row = session.scalar(stmt)
    if row is None:
        raise not_found("segment", segment_id)
    return row


def _set_references(session: Session, segment_id: int, node: compiler.Node) -> None:
    session.execute(delete(SegmentReference).where(SegmentReference.segment_id == segment_id))
    for uses in sorted(compiler.references(node)):
        session.add(SegmentReference(segment_id=segment_id, uses_id=uses))


def create_segment(db: Database, data: SegmentIn, actor: Principal) -> SegmentOut:
    _check_audience(db, data.audience)
    with db.transaction() as session:
        node = check_definition(db, session, data.conditions)
        now = utcnow()
        row = Segment(
            name=data.name,
            description=data.description,
            kind=data.kind,
            status="active",
            conditions=data.conditions,
            audience=data.audience,
            version=1,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        session.flush()
        _set_references(session, row.id, node)
        session.flush()
        out = _out(session, row)
        record_audit(session, actor, "create", "segment", row.id, None, out.model_dump(mode="json"))
        return out


def get_segment(db: Database, segment_id: int) -> SegmentOut:
    with db.reading() as session:
        return _out(session, _row(session, segment_id))


def list_segments(
    db: Database, limit: int, cursor: str | None, status: str | None = None
) -> tuple[list[SegmentOut], str | None]:
    limit = check_limit(limit)
    with db.reading() as session:
        stmt = select(Segment)
        if status:
            stmt = stmt.where(Segment.status == status)
        if cursor:
            stmt = stmt.where(Segment.id > decode_cursor(cursor))
        rows = list(session.scalars(stmt.order_by(Segment.id).limit(limit + 1)))
        next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
        return [_out(session, r) for r in rows[:limit]], next_cursor


def update_segment(
    db: Database, segment_id: int, data: SegmentUpdate, actor: Principal, wh: Warehouse | None = None
) -> SegmentOut:
    """Changes fields. When the conditions of a built, active dynamic segment change and ``wh``
    is given, the segment is rebuilt at once (members entering or leaving because of the new
    definition are events like any other)."""
    fields = data.model_dump(exclude_unset=True)
    if "audience" in fields:
        _check_audience(db, data.audience)
    with db.transaction() as session:
        row = _row(session, segment_id, lock=True)
        before = _out(session, row).model_dump(mode="json")
        if data.conditions is not None:
            node = check_definition(db, session, data.conditions, segment_id)
            if data.conditions != row.conditions:
                row.conditions = data.conditions
                row.version += 1
                _set_references(session, row.id, node)
        for name in ("name", "description", "kind", "status", "audience"):
            if name in fields and (fields[name] is not None or name in ("description", "audience")):
                setattr(row, name, fields[name])
        row.updated_at = utcnow()
        session.flush()
        out = _out(session, row)
        record_audit(session, actor, "update", "segment", row.id, before, out.model_dump(mode="json"))
        rebuild = (
            wh is not None
            and out.version != before["version"]
            and row.materialised_at is not None
            and row.kind == "dynamic"
            and row.status == "active"
        )
    if rebuild and wh is not None:
        materialise(db, wh, segment_id, cause="definition")
        return get_segment(db, segment_id)
    return out


def delete_segment(db: Database, wh: Warehouse, segment_id: int, actor: Principal) -> None:
    with db.transaction() as session:
        row = _row(session, segment_id, lock=True)
        _, used_by = _references(session, segment_id)
        if used_by:
            raise Conflict(
                "segment_in_use",
                f"Segments {', '.join(map(str, used_by))} use segment {segment_id}: change them first",
                details={"segment_ids": used_by},
            )
        before = _out(session, row).model_dump(mode="json")
        session.delete(row)
        record_audit(session, actor, "delete", "segment", segment_id, before, None)
    tables.ensure(wh)
    with wh.write_lock:
        tables.delete_where(wh, "segment_members", f"segment_id = {int(segment_id)}")


# ---------------------------------------------------------------- counting and sampling


def _node_of(db: Database, segment_id: int) -> tuple[compiler.Node, Segment]:
    with db.reading() as session:
        row = _row(session, segment_id)
        session.expunge(row)
    try:
        return compiler.parse(row.conditions), row
    except compiler.ConditionError as exc:  # stored before a rule changed
        raise _refusal(exc) from exc


def count_segment(db: Database, wh: Warehouse, segment_id: int) -> CountOut:
    node, _ = _node_of(db, segment_id)
    return _count(db, wh, node)


def count_definition(db: Database, wh: Warehouse, tree: Any) -> CountOut:
    with db.reading() as session:
        node = check_definition(db, session, tree)
    return _count(db, wh, node)


def _count(db: Database, wh: Warehouse, node: compiler.Node) -> CountOut:
    started = time.perf_counter()
    now = utcnow()
    count = count_of(db, wh, node, now)
    return CountOut(
        count=count, at=now, took_ms=int((time.perf_counter() - started) * 1000), engine=wh.dialect
    )


_SAMPLE_COLUMNS = ("member_id", "external_id", "first_name", "last_name", "gender", "city", "email", "phone")


def sample(db: Database, wh: Warehouse, segment_id: int, limit: int = 20) -> SampleOut:
    if not 1 <= limit <= SAMPLE_LIMIT:
        raise AppError("invalid_limit", f"limit must be between 1 and {SAMPLE_LIMIT}", field="limit")
    node, _ = _node_of(db, segment_id)
    tables.ensure(wh)
    ctx = context(db, node)
    count = int(wh.scalar(_sql(wh, compiler.count_query(node, target_of(wh), ctx))) or 0)
    query = compiler.members_query(node, target_of(wh), ctx, order=True, limit=limit)
    chosen = wh.query_arrow(_sql(wh, query)).column("member_id").to_pylist()
    rows: list[dict[str, Any]] = []
    if chosen:
        rows = wh.query(
            tables.escape(
                f"SELECT {', '.join(_SAMPLE_COLUMNS)} FROM {tables.ref(wh, 'members')} "
                f"WHERE member_id IN ({', '.join(str(int(i)) for i in chosen)}) ORDER BY member_id"
            )
        )
    return SampleOut(count=count, members=[SampleMember(**r) for r in rows])


# ---------------------------------------------------------------- materialising


_locks: dict[int, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(segment_id: int) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(segment_id, threading.Lock())


@dataclass
class Diff:
    entered: list[int]
    left: list[int]
    kept: int


def _current(wh: Warehouse, segment_id: int, only: Sequence[int] | None = None) -> pa.Array:
    where = f"segment_id = {int(segment_id)}"
    if only is not None:
        where += f" AND member_id IN ({', '.join(str(int(i)) for i in only) or 'NULL'})"
    table = wh.query_arrow(f"SELECT member_id FROM {tables.ref(wh, 'segment_members')} WHERE {where}")
    return table.column("member_id").combine_chunks().cast(pa.int64())


def _diff(new: pa.Array, current: pa.Array) -> Diff:
    entered = pc.filter(new, pc.invert(pc.is_in(new, value_set=current))).to_pylist()
    left = pc.filter(current, pc.invert(pc.is_in(current, value_set=new))).to_pylist()
    return Diff(entered=entered, left=left, kept=len(new) - len(entered))


def _events(row: Segment, diff: Diff, cause: str, now: datetime) -> Iterator[EventEnvelope]:
    for change, ids in ((ENTERED, diff.entered), (LEFT, diff.left)):
        for member_id in ids:
            yield envelope(
                f"{change}:{row.id}:{member_id}:{uuid4().hex[:16]}",
                change,
                member_id=int(member_id),
                occurred_at=now,
                source="loyalty",
                properties={"segment": row.id, "name": row.name, "cause": cause},
            )


def _emit(session: Session, events: Iterator[EventEnvelope]) -> int:
    emitted = 0
    chunk: list[EventEnvelope] = []
    for event in events:
        chunk.append(event)
        if len(chunk) >= EMIT_CHUNK:
            emitted += emit_many(session, chunk)
            chunk = []
    if chunk:
        emitted += emit_many(session, chunk)
    return emitted


def _write_membership(wh: Warehouse, segment_id: int, diff: Diff, cause: str, now: datetime) -> None:
    entered = pa.array(diff.entered, pa.int64())
    left = pa.array(diff.left, pa.int64())
    time_type = pa.timestamp("us", tz="UTC")

    def rows(ids: pa.Array, **columns: Any) -> pa.Table:
        n = len(ids)
        data = {"segment_id": pa.array([segment_id] * n, pa.int64()), "member_id": ids}
        for name, value in columns.items():
            data[name] = pa.array([value] * n, time_type if isinstance(value, datetime) else pa.string())
        return pa.table(data)

    changes = pa.concat_tables(
        [
            rows(entered, change="entered", cause=cause, changed_at=now, updated_at=now),
            rows(left, change="left", cause=cause, changed_at=now, updated_at=now),
        ]
    )
    with wh.write_lock, wh.transaction():
        if len(entered):
            tables.insert(wh, "segment_members", rows(entered, entered_at=now, updated_at=now))
        if len(left):
            tables.delete_keys(wh, "segment_members", rows(left).select(["segment_id", "member_id"]))
        tables.insert(wh, "segment_changes", changes)


def _apply(
    db: Database,
    wh: Warehouse,
    row: Segment,
    diff: Diff,
    *,
    cause: str,
    now: datetime,
    started: float,
    full: bool,
    all_ids: pa.Array | None = None,
) -> BuildOut:
    """Records a refresh: operational side first (counts, events, audience), then the warehouse."""
    first = row.materialised_at is None and full
    took = int((time.perf_counter() - started) * 1000)
    with db.transaction() as session:
        stored = _row(session, row.id, lock=True)
        count = (
            len(all_ids)
            if all_ids is not None
            else (stored.member_count or 0) + len(diff.entered) - len(diff.left)
        )
        stored.member_count = count
        stored.refreshed_at = now
        stored.last_error = None
        stored.last_error_at = None
        if full:
            stored.materialised_at = now
            stored.build_ms = took
        if full or diff.entered or diff.left:
            session.add(
                SegmentCount(
                    segment_id=row.id,
                    at=now,
                    member_count=count,
                    entered=len(diff.entered),
                    left=len(diff.left),
                    cause=cause,
                    duration_ms=took,
                )
            )
        if not first:
            _emit(session, _events(stored, diff, cause, now))
        if stored.audience:
            if full and all_ids is not None:
                # A full build makes the audience exactly the segment (repairs any drift).
                offers.replace_audience_members(session, stored.audience, all_ids.to_pylist())
            else:
                if diff.entered:
                    offers.add_audience_members(session, stored.audience, diff.entered)
                if diff.left:
                    offers.remove_audience_members(session, stored.audience, diff.left)
        audience = stored.audience
    _write_membership(wh, row.id, diff, cause, now)
    if audience:
        version = _audience_version(db, audience)
        if full and all_ids is not None:
            mirror.replace_audience(wh, audience, all_ids.to_pylist(), version=version)
        elif diff.entered or diff.left:
            mirror.mirror_audience(wh, audience, added=diff.entered, removed=diff.left, version=version)
    return BuildOut(
        segment_id=row.id,
        member_count=count,
        entered=len(diff.entered),
        left=len(diff.left),
        at=now,
        took_ms=int((time.perf_counter() - started) * 1000),
        cause=cause,
    )


def _audience_version(db: Database, code: str) -> datetime | None:
    try:
        return offers.get_audience(db, code).updated_at
    except NotFound:
        return None


def _record_failure(db: Database, segment_id: int, error: BaseException) -> None:
    with db.transaction() as session:
        row = session.get(Segment, segment_id)
        if row is not None:
            row.last_error = f"{type(error).__name__}: {error}"[:2000]
            row.last_error_at = utcnow()


def materialise(db: Database, wh: Warehouse, segment_id: int, *, cause: str = "materialise") -> BuildOut:
    """Rebuilds the segment's membership from the whole warehouse."""
    with _lock(segment_id):
        started = time.perf_counter()
        node, row = _node_of(db, segment_id)
        now = utcnow()
        try:
            ids = member_ids(db, wh, node, now=now)
            current = _current(wh, segment_id)
        except Exception as exc:
            _record_failure(db, segment_id, exc)
            raise
        return _apply(
            db, wh, row, _diff(ids, current), cause=cause, now=now, started=started, full=True, all_ids=ids
        )


def refresh_all(db: Database, wh: Warehouse) -> list[BuildOut]:
    """Rebuilds every active dynamic segment (the periodic job: catches conditions that change
    with time alone). A failing segment is recorded on it and does not stop the others."""
    with db.reading() as session:
        ids = list(
            session.scalars(
                select(Segment.id)
                .where(Segment.status == "active", Segment.kind == "dynamic")
                .order_by(Segment.id)
            )
        )
    results = []
    for segment_id in ids:
        try:
            results.append(materialise(db, wh, segment_id, cause="scheduled"))
        except Exception:  # recorded on the segment by materialise
            continue
    return results


def apply_events(
    db: Database,
    wh: Warehouse,
    touched: Sequence[int],
    *,
    now: datetime | None = None,
    changed: Collection[str] | None = None,
) -> list[BuildOut]:
    """Re-evaluates the touched members against every active dynamic segment built before.

    ``changed``: the warehouse tables the batch changed, when known (None: any). A segment that
    reads none of them cannot have gained or lost anyone: it is not queried, only stamped as
    brought up to date (a batch of page views does not rerun "women with 2+ purchases")."""
    members = sorted({int(m) for m in touched})
    if not members:
        return []
    with db.reading() as session:
        rows = list(
            session.scalars(
                select(Segment)
                .where(
                    Segment.status == "active",
                    Segment.kind == "dynamic",
                    Segment.materialised_at.is_not(None),
                )
                .order_by(Segment.id)
            )
        )
        for row in rows:
            session.expunge(row)
    results = []
    untouched: list[int] = []
    read_by_batch = None if changed is None else set(changed)
    tables.ensure(wh)
    for row in rows:
        with _lock(row.id):
            started = time.perf_counter()
            moment = now or utcnow()
            try:
                node = compiler.parse(row.conditions)
                query = _members_query(db, wh, node, only=members, now=moment)
                if read_by_batch is not None and not _reads(query) & read_by_batch:
                    untouched.append(row.id)
                    continue
                ids = _run_members(wh, query)
                current = _current(wh, row.id, members)
                diff = _diff(ids, current)
                results.append(
                    _apply(db, wh, row, diff, cause="events", now=moment, started=started, full=False)
                )
            except Exception as exc:
                _record_failure(db, row.id, exc)
    if untouched:
        with db.transaction() as session:
            session.execute(
                update(Segment).where(Segment.id.in_(untouched)).values(refreshed_at=now or utcnow())
            )
    return results


# ---------------------------------------------------------------- reading memberships


def members_page(db: Database, wh: Warehouse, segment_id: int, limit: int, cursor: str | None) -> MemberPage:
    limit = check_limit(limit)
    get_segment(db, segment_id)
    tables.ensure(wh)
    after = f" AND member_id > {decode_cursor(cursor)}" if cursor else ""
    rows = wh.query(
        f"SELECT member_id, entered_at FROM {tables.ref(wh, 'segment_members')} "
        f"WHERE segment_id = {int(segment_id)}{after} ORDER BY member_id LIMIT {limit + 1}"
    )
    next_cursor = encode_cursor(rows[limit - 1]["member_id"]) if len(rows) > limit else None
    return MemberPage(items=[MemberRow(**r) for r in rows[:limit]], next_cursor=next_cursor)


def changes(db: Database, wh: Warehouse, segment_id: int, limit: int = 100) -> list[ChangeRow]:
    """The latest entries and exits, newest first."""
    limit = check_limit(limit)
    get_segment(db, segment_id)
    tables.ensure(wh)
    rows = wh.query(
        f"SELECT member_id, change, changed_at, cause FROM {tables.ref(wh, 'segment_changes')} "
        f"WHERE segment_id = {int(segment_id)} ORDER BY changed_at DESC, member_id LIMIT {limit}"
    )
    return [
        ChangeRow(member_id=r["member_id"], change=r["change"], at=r["changed_at"], cause=r["cause"])
        for r in rows
    ]


def count_history(db: Database, segment_id: int, limit: int = 100) -> list[CountPoint]:
    limit = check_limit(limit)
    with db.reading() as session:
        _row(session, segment_id)
        rows = session.scalars(
            select(SegmentCount)
            .where(SegmentCount.segment_id == segment_id)
            .order_by(SegmentCount.at.desc(), SegmentCount.id.desc())
            .limit(limit)
        )
        return [
            CountPoint(
                at=r.at,
                member_count=r.member_count,
                entered=r.entered,
                left=r.left,
                cause=r.cause,
                duration_ms=r.duration_ms,
            )
            for r in rows
        ]


# ---------------------------------------------------------------- exports


CSV_COLUMNS = ("member_id", "external_id", "first_name", "last_name", "email", "phone", "city")
CSV_CHUNK = 10_000


def export_csv(db: Database, wh: Warehouse, segment_id: int) -> Iterator[str]:
    """The segment's current members (evaluated now) as CSV text chunks."""
    node, _ = _node_of(db, segment_id)
    ids = member_ids(db, wh, node)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    yield buffer.getvalue()
    for start in range(0, len(ids), CSV_CHUNK):
        chunk = ids.slice(start, CSV_CHUNK)
        rows = wh.query_arrow(
            f"SELECT {', '.join(CSV_COLUMNS)} FROM {tables.ref(wh, 'members')} "
            "WHERE member_id IN (SELECT member_id FROM {chunk}) ORDER BY member_id",
            data={"chunk": pa.table({"member_id": chunk})},
        ).to_pylist()
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for r in rows:
            writer.writerow(["" if r[c] is None else r[c] for c in CSV_COLUMNS])
        yield buffer.getvalue()


def export_to_audience(
    db: Database, wh: Warehouse, segment_id: int, data: AudienceExportIn, actor: Principal
) -> AudienceExportOut:
    """Adds the segment's current members to a target audience, removes them from it, or makes
    the audience exactly them (only the difference is written); offers filter on it at once."""
    started = time.perf_counter()
    if data.keep_in_sync and data.mode != "replace":
        raise AppError("invalid_mode", "keep_in_sync needs mode replace", field="keep_in_sync")
    node, row = _node_of(db, segment_id)
    try:
        offers.get_audience(db, data.audience)
    except NotFound:
        if not data.create:
            raise NotFound("unknown_audience", f"No audience {data.audience!r}", field="audience") from None
        offers.create_audience(db, AudienceCreate(code=data.audience, name=data.name or row.name), actor)
    ids = member_ids(db, wh, node).to_pylist()
    change = {
        "add": offers.add_audience_members,
        "remove": offers.remove_audience_members,
        "replace": offers.replace_audience_members,
    }[data.mode]
    with db.transaction() as session:
        result = change(session, data.audience, ids)
        if data.keep_in_sync:
            stored = _row(session, segment_id, lock=True)
            stored.audience = data.audience
        record_audit(
            session,
            actor,
            f"export_{data.mode}",
            "segment",
            segment_id,
            None,
            {
                "audience": data.audience,
                "exported": len(ids),
                "added": result.added,
                "removed": result.removed,
            },
        )
    version = _audience_version(db, data.audience)
    if data.mode == "add":
        mirror.mirror_audience(wh, data.audience, added=ids, version=version)
    elif data.mode == "remove":
        mirror.mirror_audience(wh, data.audience, removed=ids, version=version)
    else:
        mirror.replace_audience(wh, data.audience, ids, version=version)
    return AudienceExportOut(
        segment_id=segment_id,
        audience=data.audience,
        mode=data.mode,
        exported=len(ids),
        added=result.added,
        removed=result.removed,
        member_count=result.member_count,
        took_ms=int((time.perf_counter() - started) * 1000),
    )
