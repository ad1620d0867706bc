"""Customer analytics on the warehouse, each filterable by a segment.

* **Customer base over time** (per week or month): *new* = first purchase ever in the period;
  *active* = at least one purchase in it; *returning* = active and had bought before;
  *one-time* = at the period's end, exactly one purchase so far; *lost* = at the period's end,
  bought before but nothing in the last ``lost_after_days`` (default 180); *registered* = joined
  in the period.
* **Revenue and average cheque** per week or month: purchases, buyers, revenue (net of
  discounts and refunds), revenue / purchases.
* **Purchases by channel and store format** (the store attribute ``CustomTradeFormat``).

Periods are UTC calendar weeks (from Monday) and months. A purchase counts while it is not
cancelled. The queries are written once (DuckDB SQL parsed by SQLGlot, with placeholders for
values and the segment filter) and rendered for each engine.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlglot import exp

from omniloyal.analytics.warehouse import Warehouse
from omniloyal.catalog import service as catalog
from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import AppError
from omniloyal.segments import compiler, tables
from omniloyal.segments.schemas import (
    BasePoint,
    BaseReport,
    ChannelReport,
    ChannelRow,
    Interval,
    RevenuePoint,
    RevenueReport,
    money,
)

MAX_PERIODS = 120
DEFAULT_LOST_AFTER_DAYS = 180
NET = "(amount - discount - refunded)"


def _target(wh: Warehouse) -> compiler.Target:
    from omniloyal.segments import service

    return service.target_of(wh)


def _segment(db: Database, wh: Warehouse, segment_id: int | None, column: str = "member_id") -> exp.Expr:
    if segment_id is None:
        return exp.true()
    from omniloyal.segments import service

    node, _ = service._node_of(db, segment_id)
    query = compiler.members_query(node, _target(wh), service.context(db, node))
    return exp.In(this=exp.column(column), query=exp.Subquery(this=query))


def run(wh: Warehouse, template: str, **values: Any) -> list[dict[str, Any]]:
    """``template`` (DuckDB SQL with ``:name`` placeholders) rendered for ``wh`` and run."""
    return wh.query(tables.escape(compiler.render_template(template, _target(wh), **values)))


def _bucket(interval: Interval) -> str:
    return "week" if interval == "week" else "month"


def _starts(interval: Interval, since: datetime, until: datetime) -> list[date]:
    day = since.astimezone(UTC).date()
    if interval == "week":
        day -= timedelta(days=day.weekday())
    else:
        day = day.replace(day=1)
    out = []
    end = until.astimezone(UTC)
    while datetime(day.year, day.month, day.day, tzinfo=UTC) < end:
        out.append(day)
        if len(out) > MAX_PERIODS:
            raise AppError("too_many_periods", f"at most {MAX_PERIODS} periods per report", field="since")
        if interval == "week":
            day += timedelta(days=7)
        else:
            day = date(day.year + (day.month == 12), day.month % 12 + 1, 1)
    return out


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _next(interval: Interval, day: date) -> date:
    if interval == "week":
        return day + timedelta(days=7)
    return date(day.year + (day.month == 12), day.month % 12 + 1, 1)


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.astimezone(UTC).date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _window(since: datetime | None, until: datetime | None, default_days: int) -> tuple[datetime, datetime]:
    until = until or utcnow()
    since = since or until - timedelta(days=default_days)
    if since >= until:
        raise AppError("invalid_period", "since must be before until", field="since")
    return since, until


def customer_base(
    db: Database,
    wh: Warehouse,
    *,
    interval: Interval = "month",
    since: datetime | None = None,
    until: datetime | None = None,
    segment_id: int | None = None,
    lost_after_days: int = DEFAULT_LOST_AFTER_DAYS,
) -> BaseReport:
    since, until = _window(since, until, 365)
    starts = _starts(interval, since, until)
    start, end = _midnight(starts[0]), _midnight(_next(interval, starts[-1]))
    seg = _segment(db, wh, segment_id)
    unit = exp.Literal.string(_bucket(interval))
    activity = run(
        wh,
        """
        WITH p AS (
            SELECT member_id, cheque_at FROM purchases
            WHERE status = 'confirmed' AND member_id IS NOT NULL AND :seg
        ),
        firsts AS (SELECT member_id, min(cheque_at) AS first_at FROM p GROUP BY member_id),
        act AS (
            SELECT DISTINCT member_id, date_trunc(:unit, cheque_at) AS period FROM p
            WHERE cheque_at >= :start AND cheque_at < :end
        )
        SELECT act.period AS period, count(*) AS active,
               sum(CASE WHEN date_trunc(:unit, firsts.first_at) = act.period THEN 1 ELSE 0 END) AS new
        FROM act JOIN firsts ON act.member_id = firsts.member_id
        GROUP BY act.period
        """,
        seg=seg,
        unit=unit,
        start=start,
        end=end,
    )
    registered = run(
        wh,
        """
        SELECT date_trunc(:unit, created_at) AS period, count(*) AS registered FROM members
        WHERE merged_into IS NULL AND created_at >= :start AND created_at < :end AND :seg
        GROUP BY date_trunc(:unit, created_at)
        """,
        seg=seg.copy(),
        unit=unit,
        start=start,
        end=end,
    )
    by_period = {_as_date(r["period"]): r for r in activity}
    joined = {_as_date(r["period"]): int(r["registered"]) for r in registered}
    points = []
    for day in starts:
        period_end = _midnight(_next(interval, day))
        status = run(
            wh,
            """
            SELECT sum(CASE WHEN n = 1 THEN 1 ELSE 0 END) AS one_time,
                   sum(CASE WHEN last_at < :lost_before THEN 1 ELSE 0 END) AS lost
            FROM (
                SELECT member_id, count(*) AS n, max(cheque_at) AS last_at FROM purchases
                WHERE status = 'confirmed' AND member_id IS NOT NULL AND cheque_at < :period_end AND :seg
                GROUP BY member_id
            ) AS s
            """,
            seg=seg.copy(),
            period_end=period_end,
            lost_before=period_end - timedelta(days=lost_after_days),
        )[0]
        row = by_period.get(day, {})
        active = int(row.get("active") or 0)
        new = int(row.get("new") or 0)
        points.append(
            BasePoint(
                period=day,
                new=new,
                active=active,
                returning=active - new,
                one_time=int(status["one_time"] or 0),
                lost=int(status["lost"] or 0),
                registered=joined.get(day, 0),
            )
        )
    return BaseReport(
        interval=interval, segment_id=segment_id, lost_after_days=lost_after_days, points=points
    )


def revenue(
    db: Database,
    wh: Warehouse,
    *,
    interval: Interval = "month",
    since: datetime | None = None,
    until: datetime | None = None,
    segment_id: int | None = None,
) -> RevenueReport:
    since, until = _window(since, until, 365)
    starts = _starts(interval, since, until)
    rows = run(
        wh,
        f"""
        SELECT date_trunc(:unit, cheque_at) AS period, count(*) AS purchases,
               count(DISTINCT member_id) AS buyers, sum({NET}) AS revenue
        FROM purchases
        WHERE status = 'confirmed' AND cheque_at >= :start AND cheque_at < :end AND :seg
        GROUP BY date_trunc(:unit, cheque_at)
        """,
        unit=exp.Literal.string(_bucket(interval)),
        start=_midnight(starts[0]),
        end=_midnight(_next(interval, starts[-1])),
        seg=_segment(db, wh, segment_id),
    )
    found = {_as_date(r["period"]): r for r in rows}
    points = []
    for day in starts:
        row = found.get(day, {})
        purchases = int(row.get("purchases") or 0)
        total = money(row.get("revenue"))
        points.append(
            RevenuePoint(
                period=day,
                purchases=purchases,
                buyers=int(row.get("buyers") or 0),
                revenue=total,
                average_cheque=money(total / purchases) if purchases else None,
            )
        )
    return RevenueReport(
        interval=interval,
        segment_id=segment_id,
        points=points,
        total_revenue=money(sum((p.revenue for p in points), Decimal(0))),
        total_purchases=sum(p.purchases for p in points),
    )


def _store_formats(db: Database) -> dict[str, str | None]:
    formats: dict[str, str | None] = {}
    cursor: str | None = None
    while True:
        page = catalog.list_stores(db, 500, cursor)
        for store in page.items:
            value = (store.attributes or {}).get(compiler.STORE_FORMAT_ATTRIBUTE)
            formats[store.code] = str(value) if value is not None else None
        cursor = page.next_cursor
        if not cursor:
            return formats


def channels(
    db: Database,
    wh: Warehouse,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    segment_id: int | None = None,
) -> ChannelReport:
    """Purchases by channel and store format (``CustomTradeFormat`` of the store; null for
    stores without one and for purchases without a store)."""
    seg = _segment(db, wh, segment_id)
    where = "status = 'confirmed' AND :seg"
    values: dict[str, Any] = {"seg": seg}
    if since is not None:
        where += " AND cheque_at >= :since"
        values["since"] = since
    if until is not None:
        where += " AND cheque_at < :until"
        values["until"] = until
    formats = _store_formats(db)
    by_format: dict[str, list[str]] = {}
    for store, fmt in formats.items():
        if fmt is not None:
            by_format.setdefault(fmt, []).append(store)
    store_format: exp.Expr = exp.null()
    if by_format:
        case = exp.Case()
        for fmt, stores in sorted(by_format.items()):
            case = case.when(
                exp.In(this=exp.column("store"), expressions=[exp.Literal.string(x) for x in sorted(stores)]),
                exp.Literal.string(fmt),
            )
        store_format = case
    values["fmt"] = store_format
    rows = run(
        wh,
        f"""
        SELECT channel, :fmt AS store_format, count(*) AS purchases, count(DISTINCT member_id) AS buyers,
               sum({NET}) AS revenue
        FROM purchases WHERE {where}
        GROUP BY 1, 2
        """,
        **values,
    )
    out = []
    for r in sorted(rows, key=lambda r: (str(r["channel"]), r["store_format"] or "")):
        purchases = int(r["purchases"])
        total = money(r["revenue"])
        out.append(
            ChannelRow(
                channel=str(r["channel"]),
                store_format=r["store_format"],
                purchases=purchases,
                buyers=int(r["buyers"]),
                revenue=total,
                average_cheque=money(total / purchases) if purchases else None,
            )
        )
    return ChannelReport(segment_id=segment_id, since=since, until=until, rows=out)
