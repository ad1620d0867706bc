"""Customer base over time, revenue and average cheque, purchases by channel and store format:
by month and week, for everyone or a segment, on both warehouse engines."""

from __future__ import annotations

from datetime import UTC, datetime

from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import Warehouse
from tests.analytics.helpers import T0, purchase, registered
from tests.conftest import Api, assert_error
from tests.segments.helpers import ADMIN, SEGMENTS, create, ok

REPORTS = f"{ADMIN}/reports"
KAZAN = {"type": "profile", "field": "city", "op": "in", "value": ["Kazan"]}


def on(year: int, month: int, day: int) -> float:
    return (datetime(year, month, day, 12, tzinfo=UTC) - T0).total_seconds() / 60


def history(api: Api, wh: Warehouse) -> None:
    ok(api.post(f"{ADMIN}/legal-entities", json={"code": "LE", "name": "Retail LLC"}), 201)
    for code, fmt, channel in (
        ("S1", "Hypermarket", "offline"),
        ("S2", "Minimarket", "offline"),
        ("WEB", None, "online_store"),
    ):
        attributes = {"CustomTradeFormat": fmt} if fmt else {}
        store = {"code": code, "name": code, "legal_entity": "LE", "channel": channel, "timezone": "UTC"}
        ok(api.post(f"{ADMIN}/stores", json={**store, "attributes": attributes}), 201)
    load(
        wh,
        [
            registered(1, on(2026, 1, 5), city="Kazan"),
            registered(2, on(2026, 2, 1), city="Kazan"),
            registered(3, on(2025, 5, 1), city="Moscow"),
            registered(4, on(2025, 2, 1), city="Moscow"),
            purchase(1, 1, [("A", None, "100.00")], minutes=on(2026, 1, 10), store="S1"),
            purchase(
                2, 1, [("A", None, "200.00")], minutes=on(2026, 2, 5), store="WEB", channel="online_store"
            ),
            purchase(3, 1, [("A", None, "300.00")], minutes=on(2026, 2, 20), store="S1"),
            purchase(4, 2, [("A", None, "50.00")], minutes=on(2026, 2, 10), store="S2"),
            purchase(5, 3, [("A", None, "1000.00")], minutes=on(2025, 6, 1), store="S1"),
            purchase(6, 3, [("A", None, "70.00")], minutes=on(2026, 2, 15), store="S1"),
            purchase(7, 4, [("A", None, "40.00")], minutes=on(2025, 3, 1), store="S1"),
            purchase(8, None, [("A", None, "10.00")], minutes=on(2026, 1, 15), store="S1"),
        ],
    )


WINDOW = {"since": "2026-01-01T00:00:00+00:00", "until": "2026-03-01T00:00:00+00:00"}


def test_customer_base_by_month(api: Api, wh: Warehouse) -> None:
    history(api, wh)
    report = ok(api.get(f"{REPORTS}/customer-base", params=WINDOW))
    assert report["interval"] == "month" and report["lost_after_days"] == 180
    rows = [
        (p["period"], p["new"], p["active"], p["returning"], p["one_time"], p["lost"], p["registered"])
        for p in report["points"]
    ]
    assert rows == [("2026-01-01", 1, 1, 0, 3, 2, 1), ("2026-02-01", 1, 3, 2, 2, 1, 1)]
    kazan = create(api, KAZAN)
    only = ok(api.get(f"{REPORTS}/customer-base", params={**WINDOW, "segment_id": kazan["id"]}))
    assert [(p["new"], p["active"], p["one_time"], p["lost"], p["registered"]) for p in only["points"]] == [
        (1, 1, 1, 0, 1),
        (1, 2, 1, 0, 1),
    ]


def test_revenue_and_average_cheque_by_month_and_week(api: Api, wh: Warehouse) -> None:
    history(api, wh)
    monthly = ok(api.get(f"{REPORTS}/revenue", params=WINDOW))
    assert [
        (p["period"], p["purchases"], p["buyers"], p["revenue"], p["average_cheque"])
        for p in monthly["points"]
    ] == [
        ("2026-01-01", 2, 1, "110.00", "55.00"),
        ("2026-02-01", 4, 3, "620.00", "155.00"),
    ]
    assert (monthly["total_revenue"], monthly["total_purchases"]) == ("730.00", 6)
    kazan = create(api, KAZAN)
    of_segment = ok(api.get(f"{REPORTS}/revenue", params={**WINDOW, "segment_id": kazan["id"]}))
    assert [(p["revenue"], p["purchases"], p["buyers"]) for p in of_segment["points"]] == [
        ("100.00", 1, 1),
        ("550.00", 3, 2),
    ]
    weekly = ok(
        api.get(
            f"{REPORTS}/revenue",
            params={
                "interval": "week",
                "since": "2026-02-01T00:00:00+00:00",
                "until": "2026-03-01T00:00:00+00:00",
            },
        )
    )
    assert [(p["period"], p["revenue"]) for p in weekly["points"]] == [
        ("2026-01-26", "0.00"),
        ("2026-02-02", "200.00"),
        ("2026-02-09", "120.00"),
        ("2026-02-16", "300.00"),
        ("2026-02-23", "0.00"),
    ]
    assert weekly["points"][0]["average_cheque"] is None


def test_purchases_by_channel_and_store_format(api: Api, wh: Warehouse) -> None:
    history(api, wh)
    report = ok(api.get(f"{REPORTS}/channels", params={"since": WINDOW["since"]}))
    assert [
        (r["channel"], r["store_format"], r["purchases"], r["buyers"], r["revenue"], r["average_cheque"])
        for r in report["rows"]
    ] == [
        ("offline", "Hypermarket", 4, 2, "480.00", "120.00"),
        ("offline", "Minimarket", 1, 1, "50.00", "50.00"),
        ("online_store", None, 1, 1, "200.00", "200.00"),
    ]
    kazan = create(api, KAZAN)
    only = ok(api.get(f"{REPORTS}/channels", params={"since": WINDOW["since"], "segment_id": kazan["id"]}))
    assert [(r["channel"], r["store_format"], r["revenue"]) for r in only["rows"]] == [
        ("offline", "Hypermarket", "400.00"),
        ("offline", "Minimarket", "50.00"),
        ("online_store", None, "200.00"),
    ]


def test_report_arguments_are_checked(api: Api) -> None:
    assert_error(
        api.get(f"{REPORTS}/revenue", params={"since": "2026-03-01T00:00:00"}), 400, "invalid_time", "since"
    )
    assert_error(
        api.get(
            f"{REPORTS}/revenue", params={"since": "2026-03-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}
        ),
        400,
        "invalid_period",
        "since",
    )
    assert_error(api.get(f"{REPORTS}/revenue", params={"interval": "day"}), 422, "invalid_choice", "interval")
    assert_error(api.get(f"{REPORTS}/revenue", params={"segment_id": 999}), 404, "unknown_segment")
    assert api.get(f"{SEGMENTS}").status_code == 200
