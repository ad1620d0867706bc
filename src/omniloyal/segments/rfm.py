"""The RFM preset: recency, frequency and money scored 1..5 by quintiles, stored per member.

Over a period (default 365 days before now), for every member with at least one confirmed
purchase in it:

* **R** = whole days since the member's last purchase in the period (fewer is better);
* **F** = the number of purchases in the period (more is better);
* **M** = the money spent in the period, net of discounts and refunds (more is better).

Each measure is cut into quintiles by **nearest rank**: with ``n`` members sorted by the
measure, the boundaries are the values at ranks ``ceil(k * n / 5)`` for k = 1..4. A member's F
(or M) score is 1 + the number of boundaries strictly below their value; R is 5 minus that
number (5 = most recent). Equal values always get equal scores. Worked example: ten members who
last bought 1, 3, 5, 10, 20, 40, 60, 90, 180 and 300 days ago have R boundaries 3, 10, 40, 90
and fall into R5, R5, R4, R4, R3, R3, R2, R2, R1, R1.

Boundaries are computed here, in Python, from the per-member measures the warehouse returns, so
DuckDB and ClickHouse give identical scores. Members with no purchase in the period have no
RFM row (use purchase conditions for them).

Named groups (the first that matches wins; together they cover all 125 cells):

=============  ============================  ==========================================
group          cells                         meaning
=============  ============================  ==========================================
best           R5 F5 M5                      the very best on all three
lost           R1                            have not bought for the longest time
champions      R4-5 F4-5                     recent and frequent
new            R5 F1                         first purchase very recently
promising      R4-5 F1-3                     recent, not yet frequent
loyal          R3 F3-5                       buy often, a little less recently
at_risk        R2 F3-5                       used to buy often, not lately
hibernating    R2-3 F1-2                     bought rarely, and a while ago
=============  ============================  ==========================================

A member moving into another group is the event ``rfm.group_entered`` (not on the very first
recompute, which would make everyone "move").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import uuid4

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import select
from sqlglot import exp

from omniloyal.analytics.schema import DELETED_COLUMN
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from omniloyal.events.outbox import emit_many, envelope
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import NotFound
from omniloyal.segments import compiler, service, tables
from omniloyal.segments.models import RfmRun
from omniloyal.segments.schemas import (
    MatrixCell,
    RfmBoundaries,
    RfmGroupOut,
    RfmMatrix,
    RfmMemberOut,
    RfmOverview,
    RfmRunOut,
)

DEFAULT_PERIOD_DAYS = 365
GROUP_ENTERED = "rfm.group_entered"
DAY_US = 86_400_000_000
EMIT_CHUNK = 5000


@dataclass(frozen=True)
class Group:
    code: str
    name: str
    definition: str
    test: Callable[[int, int, int], bool]


GROUPS: tuple[Group, ...] = (
    Group("best", "Best", "R5 F5 M5", lambda r, f, m: r == 5 and f == 5 and m == 5),
    Group("lost", "Lost", "R1", lambda r, f, m: r == 1),
    Group("champions", "Champions", "R4-5 F4-5 (not Best)", lambda r, f, m: r >= 4 and f >= 4),
    Group("new", "New", "R5 F1", lambda r, f, m: r == 5 and f == 1),
    Group("promising", "Promising", "R4-5 F1-3 (not New)", lambda r, f, m: r >= 4 and f <= 3),
    Group("loyal", "Loyal", "R3 F3-5", lambda r, f, m: r == 3 and f >= 3),
    Group("at_risk", "At risk", "R2 F3-5", lambda r, f, m: r == 2 and f >= 3),
    Group("hibernating", "Hibernating", "R2-3 F1-2", lambda r, f, m: r in (2, 3) and f <= 2),
)
assert {g.code for g in GROUPS} == set(compiler.RFM_GROUPS), "compiler.RFM_GROUPS lists the same groups"


def group_of(r: int, f: int, m: int) -> str:
    for group in GROUPS:
        if group.test(r, f, m):
            return group.code
    raise AssertionError(f"no RFM group for R{r} F{f} M{m}")


# Every cell's group in SQL: index (r - 1) * 25 + (f - 1) * 5 + m (1-based arrays).
_GROUP_TABLE_SQL = [group_of(r, f, m) for r in range(1, 6) for f in range(1, 6) for m in range(1, 6)]
# Every cell's group, looked up by index r*36 + f*6 + m.
_GROUP_TABLE = np.array(
    [group_of(r, f, m) if r and f and m else "" for r in range(6) for f in range(6) for m in range(6)],
    dtype=object,
)


def boundaries(values: np.ndarray) -> list[Any]:
    """Nearest-rank quintile boundaries: the values at ranks ceil(k n / 5), k = 1..4."""
    n = len(values)
    if n == 0:
        return []
    ordered = np.sort(values, kind="stable")
    return [ordered[max(0, (k * n + 4) // 5 - 1)].item() for k in range(1, 5)]


def score(values: np.ndarray, bounds: Sequence[Any], *, lower_is_better: bool = False) -> np.ndarray:
    """1..5: one more for every boundary strictly below the value (reversed for R)."""
    if not len(bounds):
        return np.full(len(values), 3, dtype=np.int32)
    below = np.searchsorted(np.asarray(bounds, dtype=values.dtype), values, side="left").astype(np.int32)
    return (5 - below) if lower_is_better else (1 + below)


# ---------------------------------------------------------------- measures


def _measures_sql(wh: Warehouse, only: Sequence[int] | None) -> str:
    member_filter = ""
    if only is not None:
        member_filter = f" AND member_id IN ({', '.join(str(int(i)) for i in only) or 'NULL'})"
    return (
        "SELECT member_id, count(*) AS frequency, sum(amount - discount - refunded) AS monetary, "
        "max(cheque_at) AS last_purchase_at "
        f"FROM {tables.ref(wh, 'purchases')} "
        "WHERE status = 'confirmed' AND member_id IS NOT NULL AND cheque_at >= $since AND cheque_at <= $now"
        f"{member_filter} GROUP BY member_id"
    )


@dataclass
class Measures:
    member_id: np.ndarray
    recency_days: np.ndarray
    frequency: np.ndarray
    monetary_cents: np.ndarray
    last_purchase_at: pa.Array

    def __len__(self) -> int:
        return len(self.member_id)


def measures(wh: Warehouse, now: datetime, period_days: int, only: Sequence[int] | None = None) -> Measures:
    table = wh.query_arrow(
        _measures_sql(wh, only), {"since": now - timedelta(days=period_days), "now": now}
    ).combine_chunks()
    last = table.column("last_purchase_at").cast(pa.timestamp("us", tz="UTC"))
    now_us = int(pa.scalar(now, pa.timestamp("us", tz="UTC")).cast(pa.int64()).as_py())
    last_us = last.cast(pa.int64()).to_numpy(zero_copy_only=False)
    cents = decimal_to_cents(table.column("monetary"))
    return Measures(
        member_id=table.column("member_id").cast(pa.int64()).to_numpy(zero_copy_only=False),
        recency_days=((now_us - last_us) // DAY_US).astype(np.int64),
        frequency=table.column("frequency").cast(pa.int64()).to_numpy(zero_copy_only=False),
        monetary_cents=cents,
        last_purchase_at=last.combine_chunks() if isinstance(last, pa.ChunkedArray) else last,
    )


@dataclass
class Bounds:
    r: list[int]
    f: list[int]
    m_cents: list[int]

    def as_json(self) -> dict[str, Any]:
        return {"r": self.r, "f": self.f, "m": [f"{Decimal(c) / 100:.2f}" for c in self.m_cents]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Bounds:
        return cls(
            r=[int(v) for v in data.get("r", [])],
            f=[int(v) for v in data.get("f", [])],
            m_cents=[int(Decimal(v) * 100) for v in data.get("m", [])],
        )

    def out(self) -> RfmBoundaries:
        data = self.as_json()
        return RfmBoundaries(r=data["r"], f=data["f"], m=[Decimal(v) for v in data["m"]])


def decimal_to_cents(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Decimal money (2 places, no nulls) as int64 cents: the unscaled integers, read directly."""
    array = values.cast(pa.decimal128(18, 2))
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not len(array):
        return np.zeros(0, dtype=np.int64)
    words = np.frombuffer(array.buffers()[1], dtype=np.int64).reshape(-1, 2)
    return words[array.offset : array.offset + len(array), 0].copy()


def cents_to_decimal(cents: np.ndarray) -> pa.Array:
    """int64 cents as decimal128(18, 2), exactly (the unscaled 128-bit integers, built directly)."""
    cents = np.ascontiguousarray(cents, dtype=np.int64)
    words = np.empty((len(cents), 2), dtype=np.int64)
    words[:, 0] = cents
    words[:, 1] = np.where(cents < 0, -1, 0)
    return pa.Array.from_buffers(pa.decimal128(18, 2), len(cents), [None, pa.py_buffer(words.tobytes())])


def _scored(values: Measures, bounds: Bounds, now: datetime, period_days: int) -> pa.Table:
    r = score(values.recency_days, bounds.r, lower_is_better=True)
    f = score(values.frequency, bounds.f)
    m = score(values.monetary_cents, bounds.m_cents)
    cells = np.char.add(
        np.char.add(np.char.add("R", r.astype(str)), np.char.add("F", f.astype(str))),
        np.char.add("M", m.astype(str)),
    )
    groups = _GROUP_TABLE[r * 36 + f * 6 + m]
    n = len(values)
    monetary = cents_to_decimal(values.monetary_cents)
    time_type = pa.timestamp("us", tz="UTC")
    return pa.table(
        {
            "member_id": pa.array(values.member_id, pa.int64()),
            "recency_days": pa.array(values.recency_days, pa.int64()),
            "frequency": pa.array(values.frequency, pa.int64()),
            "monetary": monetary,
            "last_purchase_at": values.last_purchase_at,
            "r": pa.array(r, pa.int32()),
            "f": pa.array(f, pa.int32()),
            "m": pa.array(m, pa.int32()),
            "rfm_cell": pa.array(cells.tolist(), pa.string()),
            "rfm_group": pa.array(groups.tolist(), pa.string()),
            "period_days": pa.array(np.full(n, period_days, dtype=np.int32), pa.int32()),
            "computed_at": pa.array([now] * n, time_type),
            "updated_at": pa.array([now] * n, time_type),
        }
    )


def _previous_groups(wh: Warehouse, only: Sequence[int] | None = None) -> pa.Table:
    where = ""
    if only is not None:
        where = f" WHERE member_id IN ({', '.join(str(int(i)) for i in only) or 'NULL'})"
    return wh.query_arrow(f"SELECT member_id, rfm_group FROM {tables.ref(wh, 'rfm_scores')}{where}")


def _moves(previous: pa.Table, scored: pa.Table) -> list[tuple[int, str | None, str, str]]:
    """(member, old group or None, new group, cell) for every member whose group changed."""
    old_ids = previous.column("member_id").combine_chunks().cast(pa.int64())
    new_ids = scored.column("member_id")
    positions = pc.index_in(new_ids, value_set=old_ids)
    old_groups = pc.take(previous.column("rfm_group").combine_chunks(), positions)
    changed = pc.or_kleene(pc.is_null(old_groups), pc.not_equal(old_groups, scored.column("rfm_group")))
    changed = pc.fill_null(changed, True)
    picked = scored.filter(changed)
    olds = pc.filter(old_groups, changed).to_pylist()
    return [
        (m, o, g, c)
        for m, o, g, c in zip(
            picked.column("member_id").to_pylist(),
            olds,
            picked.column("rfm_group").to_pylist(),
            picked.column("rfm_cell").to_pylist(),
            strict=True,
        )
    ]


def _emit_moves(db: Database, moves: list[tuple[int, str | None, str, str]], now: datetime) -> int:
    if not moves:
        return 0
    with db.transaction() as session:
        for start in range(0, len(moves), EMIT_CHUNK):
            emit_many(
                session,
                [
                    envelope(
                        f"{GROUP_ENTERED}:{member}:{uuid4().hex[:16]}",
                        GROUP_ENTERED,
                        member_id=int(member),
                        occurred_at=now,
                        properties={"group": group, "previous_group": old, "cell": cell},
                    )
                    for member, old, group, cell in moves[start : start + EMIT_CHUNK]
                ],
            )
    return len(moves)


def _write_all(wh: Warehouse, scored: pa.Table, previous: pa.Table) -> None:
    """``rfm_scores`` becomes exactly ``scored``."""
    with wh.write_lock:
        if wh.dialect != "clickhouse":
            with wh.transaction():
                wh.execute("DELETE FROM rfm_scores")
                tables.insert(wh, "rfm_scores", scored)
            return
        tables.insert(wh, "rfm_scores", scored)
        old = previous.column("member_id").combine_chunks().cast(pa.int64())
        gone = pc.filter(old, pc.invert(pc.is_in(old, value_set=scored.column("member_id"))))
        if len(gone):
            tables.delete_keys(wh, "rfm_scores", pa.table({"member_id": gone}))


def _recency(target: compiler.Target, now: datetime) -> exp.Expr:
    """Whole days from the last purchase (``max(cheque_at)``) to ``now``."""
    last = exp.Max(this=exp.column("cheque_at"))
    moment = compiler.literal(now, target)
    if target.clickhouse:
        micros = "toUnixTimestamp64Micro"
        diff = exp.Sub(
            this=exp.Anonymous(this=micros, expressions=[moment]),
            expression=exp.Anonymous(this=micros, expressions=[last]),
        )
        return exp.Anonymous(this="intDiv", expressions=[diff, exp.Literal.number(DAY_US)])
    diff = exp.Sub(
        this=exp.Anonymous(this="epoch_us", expressions=[moment]),
        expression=exp.Anonymous(this="epoch_us", expressions=[last]),
    )
    return exp.IntDiv(this=exp.paren(diff), expression=exp.Literal.number(DAY_US))


_MEASURE = """
INSERT INTO rfm_measures (member_id, recency_days, frequency, monetary, last_purchase_at, updated_at)
SELECT member_id, :recency, count(*), sum(amount - discount - refunded), max(cheque_at), :now
FROM purchases
WHERE status = 'confirmed' AND member_id IS NOT NULL AND cheque_at >= :since AND cheque_at <= :now
GROUP BY member_id
"""

_SCORED = """
SELECT member_id, recency_days, frequency, monetary, last_purchase_at, r, f, m,
       'R' || CAST(r AS VARCHAR) || 'F' || CAST(f AS VARCHAR) || 'M' || CAST(m AS VARCHAR) AS rfm_cell,
       :group AS rfm_group, :period AS period_days, :now AS computed_at, :now AS updated_at
FROM (
    SELECT member_id, recency_days, frequency, monetary, last_purchase_at,
           :r_score AS r, :f_score AS f, :m_score AS m
    FROM rfm_measures
) AS s
"""

_SCORE_COLUMNS = ", ".join(tables.RFM_SCORES.column_names)


def _above(column: str, bounds: Sequence[Any], target: compiler.Target) -> exp.Expr:
    """How many of ``bounds`` are strictly below the column's value."""
    parts: list[exp.Expr] = [
        exp.Case()
        .when(exp.GT(this=exp.column(column), expression=compiler.literal(b, target)), exp.Literal.number(1))
        .else_(exp.Literal.number(0))
        for b in bounds
    ]
    total = parts[0]
    for part in parts[1:]:
        total = exp.Add(this=total, expression=part)
    return exp.paren(total)


def _scored_sql(target: compiler.Target, bounds: Bounds, now: datetime, period_days: int) -> str:
    cell = exp.Add(
        this=exp.Add(
            this=exp.Mul(
                this=exp.paren(exp.Sub(this=exp.column("r"), expression=exp.Literal.number(1))),
                expression=exp.Literal.number(25),
            ),
            expression=exp.Mul(
                this=exp.paren(exp.Sub(this=exp.column("f"), expression=exp.Literal.number(1))),
                expression=exp.Literal.number(5),
            ),
        ),
        expression=exp.column("m"),
    )
    names = exp.Array(expressions=[exp.Literal.string(g) for g in _GROUP_TABLE_SQL])
    money = [Decimal(c).scaleb(-2) for c in bounds.m_cents]
    return compiler.render_template(
        _SCORED,
        target,
        group=exp.Bracket(this=names, expressions=[cell]),
        period=period_days,
        now=now,
        r_score=exp.Sub(this=exp.Literal.number(5), expression=_above("recency_days", bounds.r, target)),
        f_score=exp.Add(this=exp.Literal.number(1), expression=_above("frequency", bounds.f, target)),
        m_score=exp.Add(this=exp.Literal.number(1), expression=_above("monetary", money, target)),
    )


def _engine_bounds(wh: Warehouse, n: int) -> Bounds:
    """Nearest-rank boundaries computed by the engine: the quantile levels are chosen half a
    rank below each wanted rank, where DuckDB's ``quantile_disc`` (ceil(q n) - 1) and
    ClickHouse's ``quantilesExactLow`` (floor(q n)) both pick exactly that rank."""
    if n == 0:
        return Bounds(r=[], f=[], m_cents=[])
    levels = [((k * n + 4) // 5 - 0.5) / n for k in range(1, 5)]
    text = ", ".join(repr(q) for q in levels)
    if wh.dialect == "clickhouse":
        sql = (
            f"SELECT quantilesExactLow({text})(recency_days) AS r, "
            f"quantilesExactLow({text})(frequency) AS f, "
            f"quantilesExactLow({text})(monetary) AS m FROM {tables.ref(wh, 'rfm_measures')}"
        )
    else:
        sql = (
            f"SELECT quantile_disc(recency_days, [{text}]) AS r, quantile_disc(frequency, [{text}]) AS f, "
            f"quantile_disc(monetary, [{text}]) AS m FROM rfm_measures"
        )
    row = wh.query(sql)[0]
    return Bounds(
        r=[int(v) for v in row["r"]],
        f=[int(v) for v in row["f"]],
        m_cents=[int(Decimal(v) * 100) for v in row["m"]],
    )


def _stage(wh: Warehouse, target: compiler.Target, now: datetime, period_days: int) -> int:
    if wh.dialect == "clickhouse":
        wh.execute(f"TRUNCATE TABLE {wh.qualified('rfm_measures')}")
    else:
        wh.execute("DELETE FROM rfm_measures")
    sql = compiler.render_template(
        _MEASURE, target, recency=_recency(target, now), now=now, since=now - timedelta(days=period_days)
    )
    wh.execute(tables.escape(sql))
    return int(wh.scalar(f"SELECT count(*) FROM {tables.ref(wh, 'rfm_measures')}") or 0)


def _engine_moves(wh: Warehouse, scored: str) -> list[tuple[int, str | None, str, str]]:
    rows = wh.query(
        tables.escape(
            f"SELECT s.member_id AS member_id, o.rfm_group AS previous_group, s.rfm_group AS grp, "
            f"s.rfm_cell AS cell FROM ({scored}) AS s LEFT JOIN {tables.ref(wh, 'rfm_scores', 'o')} "
            "ON o.member_id = s.member_id WHERE o.rfm_group IS NULL OR o.rfm_group <> s.rfm_group"
        )
    )
    return [(r["member_id"], r["previous_group"], r["grp"], r["cell"]) for r in rows]


def _engine_replace(wh: Warehouse, scored: str, now: datetime) -> None:
    insert = f"INSERT INTO {wh.qualified('rfm_scores')} ({_SCORE_COLUMNS}) {scored}"
    if wh.dialect != "clickhouse":
        with wh.transaction():
            wh.execute("DELETE FROM rfm_scores")
            wh.execute(tables.escape(insert))
        return
    wh.execute(tables.escape(insert))
    columns = [c for c in tables.RFM_SCORES.column_names if c != "updated_at"]
    stamp = tables.escape(wh.lit(now))
    wh.execute(
        f"INSERT INTO {wh.qualified('rfm_scores')} ({', '.join(columns)}, updated_at, {DELETED_COLUMN}) "
        f"SELECT {', '.join(columns)}, {stamp}, 1 FROM {tables.ref(wh, 'rfm_scores')} "
        f"WHERE member_id NOT IN (SELECT member_id FROM {tables.ref(wh, 'rfm_measures')}) "
        "SETTINGS insert_allow_materialized_columns = 1"
    )


def recompute(
    db: Database,
    wh: Warehouse,
    *,
    period_days: int = DEFAULT_PERIOD_DAYS,
    now: datetime | None = None,
    emit: bool = True,
) -> RfmRunOut:
    """Scores every member with purchases in the period; records the run and its boundaries.

    The measures, the boundaries and the scores are computed inside the warehouse engine
    (staged in ``rfm_measures``); only the boundaries and the members who moved to another
    group come back to Python."""
    started = time.perf_counter()
    tables.ensure(wh)
    now = now or utcnow()
    target = service.target_of(wh)
    with db.reading() as session:
        first = session.scalar(select(RfmRun.id).limit(1)) is None
    with wh.write_lock:
        members = _stage(wh, target, now, period_days)
        bounds = _engine_bounds(wh, members)
        scored = _scored_sql(target, bounds, now, period_days) if members else None
        moves = _engine_moves(wh, scored) if scored and emit and not first else []
        if scored:
            _engine_replace(wh, scored, now)
        else:
            tables.delete_where(wh, "rfm_scores", "1 = 1")
        counts = wh.query(
            f"SELECT rfm_group, count(*) AS n FROM {tables.ref(wh, 'rfm_scores')} GROUP BY rfm_group"
        )
    changes = _emit_moves(db, moves, now)
    groups = {g.code: 0 for g in GROUPS}
    groups.update({r["rfm_group"]: int(r["n"]) for r in counts})
    took = int((time.perf_counter() - started) * 1000)
    with db.transaction() as session:
        session.add(
            RfmRun(
                computed_at=now,
                period_days=period_days,
                members=members,
                boundaries=bounds.as_json(),
                group_changes=changes,
                duration_ms=took,
            )
        )
    return RfmRunOut(
        computed_at=now,
        period_days=period_days,
        members=members,
        boundaries=bounds.out(),
        groups=groups,
        group_changes=changes,
        took_ms=took,
    )


def last_run(db: Database) -> RfmRun | None:
    with db.reading() as session:
        run = session.scalar(select(RfmRun).order_by(RfmRun.computed_at.desc(), RfmRun.id.desc()).limit(1))
        if run is not None:
            session.expunge(run)
        return run


def rescore(db: Database, wh: Warehouse, member_ids: Sequence[int], *, now: datetime | None = None) -> int:
    """Scores these members again with the last run's boundaries (after their purchases
    changed); group moves are events. Returns how many moved. Nothing before a first run."""
    run = last_run(db)
    if run is None or not member_ids:
        return 0
    tables.ensure(wh)
    now = now or utcnow()
    ids = sorted({int(i) for i in member_ids})
    values = measures(wh, now, run.period_days, only=ids)
    scored = _scored(values, Bounds.from_json(run.boundaries), now, run.period_days)
    previous = _previous_groups(wh, ids)
    moves = _moves(previous, scored)
    with wh.write_lock, wh.transaction():
        tables.upsert(wh, "rfm_scores", scored)
        scored_ids = set(scored.column("member_id").to_pylist())
        gone = [{"member_id": m} for m in previous.column("member_id").to_pylist() if m not in scored_ids]
        tables.delete_keys(wh, "rfm_scores", gone)
    return _emit_moves(db, moves, now)


# ---------------------------------------------------------------- reading


def _segment_filter(db: Database, wh: Warehouse, segment_id: int | None) -> exp.Expr | None:
    if segment_id is None:
        return None
    from omniloyal.segments import service

    node, _ = service._node_of(db, segment_id)
    query = compiler.members_query(node, service.target_of(wh), service.context(db, node))
    return exp.In(this=exp.column("member_id"), query=exp.Subquery(this=query))


def _rfm_query(wh: Warehouse, columns: list[exp.Expr], group: list[str], where: exp.Expr | None) -> str:
    from omniloyal.segments import service

    target = service.target_of(wh)
    table = exp.Table(
        this=exp.to_identifier("rfm_scores"),
        db=exp.to_identifier(target.database) if target.clickhouse and target.database else None,
    )
    source: exp.Expr = exp.Final(this=table) if target.clickhouse else table
    query = exp.select(*columns).from_(source)
    if where is not None:
        query = query.where(where)
    if group:
        query = query.group_by(*group)
    return tables.escape(query.sql(dialect=target.dialect))


def overview(db: Database, wh: Warehouse, segment_id: int | None = None) -> RfmOverview:
    """Groups with their counts and revenue, and the RF, RM, FM matrices (optionally of a segment)."""
    tables.ensure(wh)
    run = last_run(db)
    where = _segment_filter(db, wh, segment_id)
    count = exp.Count(this=exp.Star()).as_("members")
    revenue = exp.Sum(this=exp.column("monetary")).as_("revenue")
    by_group = {
        r["rfm_group"]: r
        for r in wh.query(_rfm_query(wh, [exp.column("rfm_group"), count, revenue], ["rfm_group"], where))
    }
    groups = [
        RfmGroupOut(
            code=g.code,
            name=g.name,
            definition=g.definition,
            members=int(by_group.get(g.code, {}).get("members") or 0),
            revenue=Decimal(by_group.get(g.code, {}).get("revenue") or 0).quantize(Decimal("0.01")),
        )
        for g in GROUPS
    ]
    bounds = Bounds.from_json(run.boundaries) if run is not None else None
    labels = bounds.as_json() if bounds is not None else {"r": [], "f": [], "m": []}
    matrices = []
    for name, rows, columns in (("rf", "r", "f"), ("rm", "r", "m"), ("fm", "f", "m")):
        found = {
            (int(r[rows]), int(r[columns])): r
            for r in wh.query(
                _rfm_query(
                    wh,
                    [exp.column(rows), exp.column(columns), count.copy(), revenue.copy()],
                    [rows, columns],
                    where,
                )
            )
        }
        cells = [
            MatrixCell(
                row=i,
                column=j,
                members=int(found.get((i, j), {}).get("members") or 0),
                revenue=Decimal(found.get((i, j), {}).get("revenue") or 0).quantize(Decimal("0.01")),
            )
            for i in range(1, 6)
            for j in range(1, 6)
        ]
        matrices.append(
            RfmMatrix(
                name=name,
                rows=rows.upper(),
                columns=columns.upper(),
                cells=cells,
                row_boundaries=[str(v) for v in labels[rows]],
                column_boundaries=[str(v) for v in labels[columns]],
            )
        )
    return RfmOverview(
        computed_at=run.computed_at if run is not None else None,
        period_days=run.period_days if run is not None else None,
        members=sum(g.members for g in groups),
        boundaries=bounds.out() if bounds is not None else None,
        groups=groups,
        matrices=matrices,
    )


def member_scores(wh: Warehouse, member_id: int) -> RfmMemberOut:
    tables.ensure(wh)
    rows = wh.query(f"SELECT * FROM {tables.ref(wh, 'rfm_scores')} WHERE member_id = {int(member_id)}")
    if not rows:
        raise NotFound(
            "unknown_rfm_member", f"Member {member_id} has no RFM scores (no purchase in the period)"
        )
    row = rows[0]
    return RfmMemberOut(
        member_id=row["member_id"],
        r=row["r"],
        f=row["f"],
        m=row["m"],
        cell=row["rfm_cell"],
        group=row["rfm_group"],
        recency_days=row["recency_days"],
        frequency=row["frequency"],
        monetary=row["monetary"],
        computed_at=row["computed_at"],
    )
