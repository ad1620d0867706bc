"""DWH imports: CSV, Parquet and JSON lines; bad rows reported, the rest loaded, repeats harmless."""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omniloyal.analytics.features import member_features
from omniloyal.analytics.importer import import_events_file, import_purchases_file
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from tests.conftest import Api


def _report(path: Path | None) -> list[dict[str, str]]:
    assert path is not None
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_events_csv_bad_row_reported_rest_loaded_and_reimport_changes_nothing(
    wh: Warehouse, tmp_path: Path
) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "id,type,occurred_at,member_id,anonymous_id,source,properties,utm_source,sku\n"
        'e1,page_view,2026-01-10T10:00:00+03:00,5,,web,"{""url"": ""/""}",ads,\n'
        "e2,product_view,2026-01-10T10:05:00+03:00,5,,web,,,milk\n"
        "e3,page_view,2026-01-10 10:06:00,5,,web,,,\n"
        "e4,page_view,2026-01-11T09:00:00Z,,anon-1,web,,,\n"
        "e5,contact_center_call,2026-01-12T09:00:00Z,5,,contact_center,{bad json,,\n",
        encoding="utf-8",
    )
    result = import_events_file(wh, path, batch_size=2)
    assert (result.rows, result.loaded, result.errors) == (5, 3, 2)
    report = _report(result.report_path)
    assert [(r["row"], r["id"], r["code"], r["field"]) for r in report] == [
        ("3", "e3", "invalid_time", "occurred_at"),
        ("5", "e5", "invalid_json", "properties"),
    ]
    rows = wh.query("SELECT id, member_id, sku, utm_source FROM {events} ORDER BY id")
    assert rows == [
        {"id": "e1", "member_id": 5, "sku": None, "utm_source": "ads"},
        {"id": "e2", "member_id": 5, "sku": "milk", "utm_source": None},
        {"id": "e4", "member_id": None, "sku": None, "utm_source": None},
    ]
    features = member_features(wh, 5)
    assert features is not None and features["last_site_visit_at"] is not None
    again = import_events_file(wh, path, report_path=tmp_path / "again.csv")
    assert (again.loaded, again.duplicates) == (0, 3)
    assert wh.scalar("SELECT count(*) FROM {events}") == 3


def test_events_jsonl_with_a_broken_line(wh: Warehouse, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = [
        json.dumps(
            {
                "id": "j1",
                "type": "search",
                "occurred_at": "2026-02-01T10:00:00+00:00",
                "member_id": 9,
                "properties": {"query": "milk"},
            }
        ),
        "{not json",
        json.dumps({"id": "j3", "type": "Bad Type", "occurred_at": "2026-02-01T10:00:00+00:00"}),
        json.dumps(
            {
                "id": "j4",
                "type": "message.clicked",
                "occurred_at": "2026-02-02T10:00:00+00:00",
                "member_id": 9,
                "campaign": "spring",
            }
        ),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = import_events_file(wh, path)
    assert (result.loaded, result.errors) == (2, 2)
    assert [(r["row"], r["code"]) for r in _report(result.report_path)] == [
        ("2", "malformed_row"),
        ("3", "invalid_value"),
    ]
    assert wh.scalar("SELECT campaign FROM {events} WHERE id = 'j4'") == "spring"
    features = member_features(wh, 9)
    assert features is not None and features["last_message_clicked_at"] is not None


def test_purchases_parquet_with_lines_refunds_and_cancellations(wh: Warehouse, tmp_path: Path) -> None:
    lines = json.dumps(
        [
            {"sku": "milk", "category": "Food/Dairy", "price": "50", "quantity": "2", "amount": "100"},
            {"sku": "tv", "category": "Electronics", "price": "900", "quantity": "1"},
        ]
    )
    table = pa.table(
        {
            "id": ["P1", "P2", "P3", "P4"],
            "member_id": [3, 3, 3, 3],
            "cheque_at": [
                "2025-12-01T10:00:00+03:00",
                "2025-12-05T10:00:00+03:00",
                "2025-12-06T10:00:00+03:00",
                "2025-12-07T10:00:00+03:00",
            ],
            "amount": ["1000.00", "200.00", "-5", "300.00"],
            "store": ["S1", "S2", "S1", "S1"],
            "lines": [lines, None, None, None],
            "refunded": [None, "50.00", None, None],
            "status": [None, None, None, "cancelled"],
        }
    )
    path = tmp_path / "purchases.parquet"
    pq.write_table(table, path)
    result = import_purchases_file(wh, path)
    assert (result.rows, result.errors) == (4, 1)
    assert [(r["row"], r["id"], r["code"], r["field"]) for r in _report(result.report_path)] == [
        ("3", "P3", "invalid_amount", "amount")
    ]
    features = member_features(wh, 3)
    assert features is not None
    assert features["purchases_count"] == 2
    assert features["purchases_total"] == Decimal("1200.00")
    assert features["ltv"] == Decimal("1150.00")
    assert features["favourite_categories"] == ["Electronics", "Food/Dairy"]
    assert wh.scalar("SELECT status FROM {purchases} WHERE operation = 'dwh:P4'") == "cancelled"
    assert wh.scalar("SELECT sum(amount) FROM {purchase_lines} WHERE operation = 'dwh:P1'") == Decimal(
        "1000.00"
    )
    again = import_purchases_file(wh, path, report_path=tmp_path / "again.csv")
    assert again.loaded == 0
    assert member_features(wh, 3) == {**features, "updated_at": member_features(wh, 3)["updated_at"]}  # type: ignore[index]


def test_purchases_csv_buyers_by_card_and_phone(
    api: Api, db: Database, wh: Warehouse, tmp_path: Path
) -> None:
    created = api.post(
        "/api/v1/admin/members",
        json={
            "phone": "+79001112233",
            "cards": [{"number": "9001", "kind": "physical", "state": "activated"}],
        },
    )
    assert created.status_code == 201, created.text
    member_id = created.json()["id"]
    path = tmp_path / "purchases.csv"
    path.write_text(
        "id;card;phone;cheque_at;amount;channel\n"
        "A1;9001;;2026-01-01T10:00:00+03:00;100.00;offline\n"
        "A2;;8 900 111-22-33;2026-01-02T10:00:00+03:00;50,00;online_store\n"
        "A3;5555;;2026-01-03T10:00:00+03:00;70.00;offline\n"
        "A4;;;2026-01-04T10:00:00+03:00;10.00;offline\n"
        "A5;;12;2026-01-05T10:00:00+03:00;10.00;teleport\n",
        encoding="utf-8",
    )
    result = import_purchases_file(wh, path, db=db)
    assert [(r["id"], r["code"], r["field"]) for r in _report(result.report_path)] == [
        ("A3", "unknown_member", "card"),
        ("A5", "invalid_choice", "channel"),
    ]
    rows = wh.query("SELECT operation, member_id, channel FROM {purchases} ORDER BY operation")
    assert rows == [
        {"operation": "dwh:A1", "member_id": member_id, "channel": "offline"},
        {"operation": "dwh:A2", "member_id": member_id, "channel": "online_store"},
        {"operation": "dwh:A4", "member_id": None, "channel": "offline"},
    ]
    features = member_features(wh, member_id)
    assert features is not None and features["channels"] == ["offline", "online_store"]


def test_cli_import_events_reports_bad_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    from typer.testing import CliRunner

    from omniloyal.analytics.cli import import_app
    from omniloyal.analytics.warehouse import forget_warehouse, get_warehouse
    from omniloyal.settings import get_settings

    wh_url = f"duckdb:///{tmp_path}/cli/wh.duckdb"
    monkeypatch.setenv("OMNILOYAL_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("OMNILOYAL_WAREHOUSE_URL", wh_url)
    get_settings.cache_clear()
    path = tmp_path / "events.csv"
    path.write_text(
        "id,type,occurred_at,anonymous_id\ne1,page_view,2026-01-01T10:00:00Z,v1\ne2,page_view,bad,v1\n",
        encoding="utf-8",
    )
    try:
        result = CliRunner().invoke(import_app, ["events", str(path), "--report", str(tmp_path / "r.csv")])
        assert result.exit_code == 1, result.output
        assert "1 errors" in result.output
        assert get_warehouse(get_settings()).scalar("SELECT count(*) FROM {events}") == 1
        assert _report(tmp_path / "r.csv")[0]["code"] == "invalid_time"
    finally:
        forget_warehouse(wh_url)
        get_settings.cache_clear()
