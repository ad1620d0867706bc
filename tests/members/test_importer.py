"""Bulk member import (``omniloyal import members FILE``): CSV and Parquet, on both stores.

What an operator sees: the members, their cards and consents appear (looked up through the
admin API); phones written any way end up in E.164; a bad row is reported with its row number
and field while the rest load; importing the same file again changes nothing; a corrected
file updates the members it names.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.members.importer import REPORT_COLUMNS, import_members_file
from omniloyal.members.models import AttributeDefinition, Card, Member, MemberConsent
from tests.conftest import Api
from tests.members.helpers import MEMBERS

HEADER = [
    "external_id",
    "first_name",
    "last_name",
    "gender",
    "birth_date",
    "phone",
    "email",
    "city",
    "card_number",
    "card_kind",
    "consent_email",
    "consent_sms",
    "attr_has_car",
]
# Phones as tills and web forms write them; all the same kind of Russian mobile number.
ROWS = [
    ["C001", "Анна", "Иванова", "ж", "1985-04-12", "8 (912) 345-67-89", "Anna.Ivanova@Mail.RU", "Москва",
     "2600 0000 0001", "physical", "1", "0", "да"],
    ["C002", "Пётр", "Смирнов", "m", "03.11.1990", "+7 912 345 67 90", "petr@example.com", "Казань",
     "2600-0000-0002", "", "yes", "1", "0"],
    ["C003", "Олег", "Кузнецов", "male", "", "79123456791", "", "Самара",
     "9643000000000003", "virtual", "", "1", ""],
    ["C004", "Ирина", "Попова", "female", "1979-01-30", "8-912-345-67-92", "irina@example.com", "Москва",
     "", "", "0", "", "true"],
]  # fmt: skip
EXPECTED_PHONES = {
    "C001": "+79123456789",
    "C002": "+79123456790",
    "C003": "+79123456791",
    "C004": "+79123456792",
}


def _csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _parquet(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    columns = {name: [row[i] or None for row in rows] for i, name in enumerate(header)}
    pq.write_table(pa.table(columns), path)
    return path


def _define_has_car(db: Database) -> None:
    with db.transaction() as session:
        session.add(AttributeDefinition(code="has_car", name="Has a car", type="boolean", constraints={}))


def _report(path: Path | None) -> list[dict[str, str]]:
    assert path is not None
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == REPORT_COLUMNS
        return list(reader)


def _lookup(api: Api, **identifier: str) -> dict[str, Any]:
    response = api.get(f"{MEMBERS}/lookup", params=identifier)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _store_state(db: Database) -> tuple[Any, ...]:
    with db.reading() as session:
        return (
            session.execute(select(Member).order_by(Member.id)).scalars().all().__len__(),
            session.execute(
                select(
                    Member.external_id, Member.phone, Member.email, Member.city, Member.updated_at
                ).order_by(Member.id)
            ).all(),
            session.execute(
                select(Card.number, Card.member_id, Card.state, Card.updated_at).order_by(Card.id)
            ).all(),
            session.execute(
                select(MemberConsent.member_id, MemberConsent.channel, MemberConsent.granted).order_by(
                    MemberConsent.member_id, MemberConsent.channel
                )
            ).all(),
        )


@pytest.mark.parametrize("writer", [_csv, _parquet], ids=["csv", "parquet"])
def test_import_creates_members_cards_and_consents(
    db: Database, api: Api, tmp_path: Path, writer: Any
) -> None:
    _define_has_car(db)
    file = writer(tmp_path / ("members.csv" if writer is _csv else "members.parquet"), ROWS)
    result = import_members_file(db, file)
    assert (result.rows, result.inserted, result.updated, result.errors) == (4, 4, 0, 0)
    assert result.report_path is None

    for external_id, phone in EXPECTED_PHONES.items():
        # Whatever way the phone was written, it is found by its E.164 form (and as typed).
        assert _lookup(api, phone=phone)["external_id"] == external_id
    assert _lookup(api, phone="8 912 345-67-89")["external_id"] == "C001"

    anna = _lookup(api, external_id="C001")
    assert (anna["first_name"], anna["gender"], anna["birth_date"]) == ("Анна", "female", "1985-04-12")
    assert anna["email"] == "anna.ivanova@mail.ru"
    assert anna["attributes"] == {"has_car": True}
    assert [(c["number"], c["kind"], c["state"]) for c in anna["cards"]] == [
        ("260000000001", "physical", "activated")
    ]
    assert anna["consents"]["email"]["granted"] is True
    assert anna["consents"]["email"]["source"] == "import"
    assert anna["consents"]["sms"]["granted"] is False

    petr = _lookup(api, card="260000000002")
    assert petr["external_id"] == "C002"
    assert petr["birth_date"] == "1990-11-03"  # DD.MM.YYYY understood
    assert petr["cards"][0]["kind"] == "physical"  # the default kind
    assert petr["attributes"] == {"has_car": False}

    oleg = _lookup(api, external_id="C003")
    assert oleg["cards"][0]["kind"] == "virtual"
    assert oleg["email"] is None and oleg["birth_date"] is None  # empty cells: not given
    assert oleg["consents"]["sms"]["granted"] is True

    irina = _lookup(api, email="irina@example.com")
    assert irina["cards"] == []


@pytest.mark.parametrize("writer", [_csv, _parquet], ids=["csv", "parquet"])
def test_a_bad_row_is_reported_and_the_rest_loads(
    db: Database, api: Api, tmp_path: Path, writer: Any
) -> None:
    _define_has_car(db)
    rows = [list(row) for row in ROWS]
    rows[1][5] = "12345"  # row 2: not a phone number
    rows[3][6] = "irina@@example"  # row 4: not an e-mail
    rows.append(["C001", "Анна", "Дубль", "", "", "", "", "", "", "", "", "", ""])  # row 5: id again
    rows.append(["C006", "Ян", "Новиков", "x", "", "", "", "", "", "", "", "", "maybe"])  # row 6: two errors
    file = writer(tmp_path / ("bad.csv" if writer is _csv else "bad.parquet"), rows)
    report = tmp_path / "report.csv"
    result = import_members_file(db, file, report_path=report)

    assert (result.rows, result.inserted, result.errors) == (6, 2, 4)
    assert result.report_path == report
    problems = [(r["row"], r["external_id"], r["code"], r["field"]) for r in _report(report)]
    assert problems == [
        ("2", "C002", "invalid_phone", "phone"),
        ("4", "C004", "invalid_email", "email"),
        ("5", "C001", "duplicate_identifier", "external_id"),
        ("6", "C006", "invalid_gender", "gender"),
        ("6", "C006", "invalid_attribute", "attr_has_car"),
    ]
    assert all(r["message"] for r in _report(report))
    # The good rows are in; the refused ones changed nothing.
    assert _lookup(api, external_id="C001")["last_name"] == "Иванова"
    assert _lookup(api, external_id="C003")["phone"] == "+79123456791"
    for refused in ("C002", "C004", "C006"):
        assert api.get(f"{MEMBERS}/lookup", params={"external_id": refused}).status_code == 404


def test_importing_the_same_file_again_changes_nothing(db: Database, tmp_path: Path) -> None:
    _define_has_car(db)
    file = _csv(tmp_path / "members.csv", ROWS)
    import_members_file(db, file)
    before = _store_state(db)
    again = import_members_file(db, file)
    assert (again.inserted, again.updated, again.unchanged, again.errors) == (0, 0, 4, 0)
    assert _store_state(db) == before


def test_a_corrected_file_updates_the_members_it_names(db: Database, api: Api, tmp_path: Path) -> None:
    _define_has_car(db)
    import_members_file(db, _csv(tmp_path / "members.csv", ROWS))
    changed = [
        # C001 moved and changed her e-mail; a second card; sms consent now given.
        ["C001", "", "", "", "", "", "anna@new.example", "Санкт-Петербург", "9643 0000 0000 0011", "virtual",
         "", "1", ""],
        ["C004", "Ирина", "Попова", "female", "1979-01-30", "8-912-345-67-92", "irina@example.com", "Москва",
         "", "", "0", "", "true"],
        ["C007", "Вера", "Орлова", "ж", "", "+7 (912) 345-67-97", "", "Уфа", "", "", "", "", ""],
    ]  # fmt: skip
    result = import_members_file(db, _csv(tmp_path / "changes.csv", changed))
    assert (result.inserted, result.updated, result.unchanged, result.errors) == (1, 1, 1, 0)

    anna = _lookup(api, external_id="C001")
    assert (anna["email"], anna["city"]) == ("anna@new.example", "Санкт-Петербург")
    # Empty cells keep what the member had.
    assert (anna["first_name"], anna["phone"], anna["birth_date"]) == ("Анна", "+79123456789", "1985-04-12")
    assert sorted((c["number"], c["kind"]) for c in anna["cards"]) == [
        ("260000000001", "physical"),
        ("9643000000000011", "virtual"),
    ]
    assert anna["consents"]["sms"]["granted"] is True
    assert anna["consents"]["email"]["granted"] is True  # left empty: not withdrawn
    assert _lookup(api, phone="+79123456797")["external_id"] == "C007"
    with db.reading() as session:
        assert session.scalar(select(func.count()).select_from(Member)) == 5


def test_identifiers_of_another_member_are_refused(db: Database, api: Api, tmp_path: Path) -> None:
    _define_has_car(db)
    import_members_file(db, _csv(tmp_path / "members.csv", ROWS))
    thief = [["C008", "Игорь", "Лебедев", "", "", "8 912 345 67 89", "", "", "", "", "", "", ""]]
    result = import_members_file(db, _csv(tmp_path / "thief.csv", thief), report_path=tmp_path / "r.csv")
    assert (result.inserted, result.errors) == (0, 1)
    assert [(r["row"], r["code"], r["field"]) for r in _report(result.report_path)] == [
        ("1", "duplicate_identifier", "phone")
    ]
    assert _lookup(api, phone="+79123456789")["external_id"] == "C001"


def test_a_file_the_importer_cannot_read_is_refused_whole(db: Database, tmp_path: Path) -> None:
    with pytest.raises(AppError) as unknown:
        import_members_file(
            db, _csv(tmp_path / "odd.csv", [["C1", "x"]], header=["external_id", "shoe_size"])
        )
    assert (unknown.value.code, unknown.value.field) == ("unknown_column", "shoe_size")
    with pytest.raises(AppError) as no_id:
        import_members_file(db, _csv(tmp_path / "noid.csv", [["Анна"]], header=["first_name"]))
    assert no_id.value.code == "missing_column"
    (tmp_path / "members.xlsx").write_text("not a member file")
    with pytest.raises(AppError) as format_:
        import_members_file(db, tmp_path / "members.xlsx")
    assert format_.value.code == "unsupported_file"
    with db.reading() as session:
        assert session.scalar(select(func.count()).select_from(Member)) == 0
