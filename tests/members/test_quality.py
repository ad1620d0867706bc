"""Contact data quality on realistic messy samples: phones, e-mails, cities; flags on the member and
the per-channel report."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from omniloyal.db.engine import Database
from omniloyal.members import quality
from omniloyal.members.models import Member
from tests.conftest import Api, assert_error, make_key

DATA_QUALITY = "/api/v1/admin/data-quality"


def with_quality_routes(api: Api, app: Any) -> Api:
    """The data-quality router, ahead of the members router (as app.py includes it)."""
    from omniloyal.members.quality_api import router

    if not any(getattr(r, "path", "") == DATA_QUALITY for r in app.router.routes):
        app.router.routes[0:0] = router.routes
    return api


@pytest.fixture
def admin(api: Api, app: Any) -> Api:
    return with_quality_routes(api, app)


# ---------------------------------------------------------------- checks, no database


@pytest.mark.parametrize(
    ("raw", "status", "kind", "issues"),
    [
        ("8 (916) 555-12-34", "valid", "mobile", ()),
        ("+7 958 456 78 90", "valid", "mobile", ()),
        ("+7 (495) 555-12-34", "valid", "fixed_line", ("no_sms",)),
        ("+7 999 999-99-99", "invalid", None, ("placeholder",)),
        ("8 900 000 00 00", "invalid", None, ("placeholder",)),
        ("+7 300 000 00 01", "invalid", None, ("not_a_valid_number",)),
        ("12-34-56", "invalid", None, ("not_a_valid_number",)),
        ("call me", "invalid", None, ("unparseable",)),
        ("+375 29 555-12-34", "valid", "mobile", ()),
        ("  ", "missing", None, ()),
        (None, "missing", None, ()),
    ],
)
def test_phones(raw: str | None, status: str, kind: str | None, issues: tuple[str, ...]) -> None:
    checked = quality.check_phone(raw)
    assert (checked.status, checked.type, checked.issues) == (status, kind, issues)


def test_phone_operator_and_zone_where_offline_data_tells() -> None:
    mobile = quality.check_phone("+7 958 456 78 90")
    assert mobile.operator == "MegaFon" and mobile.timezone is None and mobile.sms
    # A Russian mobile number names no region offline; a fixed line does.
    assert quality.check_phone("8 343 212-34-56").timezone == "Asia/Yekaterinburg"
    assert quality.check_phone("+7 (495) 555-12-34").timezone == "Europe/Moscow"
    assert quality.check_phone("+7 (383) 555-12-34").timezone == "Asia/Novosibirsk"
    assert quality.check_phone("+375 29 555-12-34").country == "BY"


@pytest.mark.parametrize(
    ("raw", "status", "provider", "suggestion", "issues"),
    [
        ("Anna.Smirnova@Mail.ru", "valid", "Mail.ru", None, ()),
        ("olga@yandex.by", "valid", "Yandex", None, ()),
        ("ivan.petrov@romashka-retail.ru", "valid", None, None, ()),
        ("info@магазин.рф", "valid", None, None, ()),
        ("olga@gmial.com", "invalid", None, "olga@gmail.com", ("domain_typo",)),
        ("petr@gmail.ru", "invalid", None, "petr@gmail.com", ("domain_typo",)),
        ("petr@yandx.ru", "invalid", None, "petr@yandex.ru", ("domain_typo",)),
        ("petr@yandex.ry", "invalid", None, "petr@yandex.ru", ("unknown_tld", "domain_typo")),
        ("kate@hotmial.com", "invalid", None, "kate@hotmail.com", ("domain_typo",)),
        ("sam@rambler.ri", "invalid", None, "sam@rambler.ru", ("unknown_tld", "domain_typo")),
        ("x@company.local", "invalid", None, None, ("syntax",)),
        ("test@test.ru", "invalid", None, None, ("placeholder",)),
        ("noemail@mail.ru", "invalid", "Mail.ru", None, ("placeholder",)),
        ("a@mailinator.com", "invalid", None, None, ("disposable",)),
        ("ivan@@mail.ru", "invalid", None, None, ("syntax",)),
        ("ivan.mail.ru", "invalid", None, None, ("syntax",)),
        ("", "missing", None, None, ()),
    ],
)
def test_emails(
    raw: str, status: str, provider: str | None, suggestion: str | None, issues: tuple[str, ...]
) -> None:
    checked = quality.check_email(raw)
    assert (checked.status, checked.provider, checked.suggestion, checked.issues) == (
        status,
        provider,
        suggestion,
        issues,
    )


def test_real_provider_domains_are_not_typos() -> None:
    for domain in (
        "bk.ru",
        "list.ru",
        "inbox.ru",
        "ya.ru",
        "yahoo.co.uk",
        "hotmail.fr",
        "mail.com",
        "email.ru",
    ):
        assert quality.provider_typo(domain) is None, domain


def test_one_mailbox_spelled_two_ways_has_one_canonical_form() -> None:
    assert quality.canonical_email("Ivan.Petrov+shop@googlemail.com") == "ivanpetrov@gmail.com"
    assert quality.canonical_email("ivanpetrov@gmail.com") == "ivanpetrov@gmail.com"
    assert quality.canonical_email("olga.ivanova@ya.ru") == quality.canonical_email("olga-ivanova@yandex.ru")
    assert quality.canonical_email("o.ivanova@company.ru") != quality.canonical_email("oivanova@company.ru")


@pytest.mark.parametrize(
    ("city", "address", "status", "name", "region", "zone"),
    [
        ("г. Москва", None, "valid", "Москва", "Москва", "Europe/Moscow"),
        ("Спб", None, "valid", "Санкт-Петербург", "Санкт-Петербург", "Europe/Moscow"),
        ("ЕКБ", None, "valid", "Екатеринбург", "Свердловская область", "Asia/Yekaterinburg"),
        ("н.новгород", None, "valid", "Нижний Новгород", "Нижегородская область", "Europe/Moscow"),
        ("Орел", None, "valid", "Орёл", "Орловская область", "Europe/Moscow"),
        ("  владивосток ", None, "valid", "Владивосток", "Приморский край", "Asia/Vladivostok"),
        ("Kaliningrad", None, "valid", "Калининград", "Калининградская область", "Europe/Kaliningrad"),
        ("Алма-Ата", None, "valid", "Алматы", "Алматы", "Asia/Almaty"),
        (
            None,
            "620014, Россия, Свердловская обл., г. Екатеринбург, ул. Ленина, д. 1",
            "valid",
            "Екатеринбург",
            "Свердловская область",
            "Asia/Yekaterinburg",
        ),
        ("Кукуево", None, "unrecognised", None, None, None),
        ("-", None, "invalid", None, None, None),
        ("нет", "", "invalid", None, None, None),
        (None, None, "missing", None, None, None),
    ],
)
def test_cities(
    city: str | None, address: str | None, status: str, name: str | None, region: str | None, zone: str | None
) -> None:
    checked = quality.check_address(city, address)
    found = checked.city
    assert checked.status == status
    assert (found.name if found else None, found.region if found else None) == (name, region)
    assert (found.timezone if found else None) == zone


def test_the_gazetteer_covers_big_cities_with_valid_zones() -> None:
    from zoneinfo import ZoneInfo

    places = quality.gazetteer()
    cities = {c.name for c in places.by_name.values()}
    assert len([c for c in places.by_name.values() if c.country == "RU"]) > 150
    assert {"Москва", "Новосибирск", "Минск", "Ташкент", "Ереван"} <= cities
    for city in places.by_name.values():
        ZoneInfo(city.timezone)


# ---------------------------------------------------------------- flags on members, the report

MESSY = [
    {
        "first_name": "Анна",
        "phone": "8 (916) 555-12-34",
        "email": "Anna.Smirnova@Mail.ru",
        "city": "г. Москва",
    },
    {"first_name": "Олег", "phone": "+7 999 999-99-99", "email": "oleg@gmial.com", "city": "Спб"},
    {"first_name": "Ирина", "phone": "+7 (495) 555-12-34", "city": "Кукуево"},
    {"first_name": "Пётр", "email": "test@test.ru", "address": "Россия, Свердловская обл., г. Екатеринбург"},
    {"first_name": "Нина", "phone": "8 343 212-34-56", "city": "-"},
    {"first_name": "Лев"},
]


def _flags(db: Database) -> dict[str, dict[str, Any]]:
    with db.reading() as session:
        return {
            m.first_name or "": {
                "phone": m.phone_status,
                "phone_type": m.phone_type,
                "email": m.email_status,
                "provider": m.email_provider,
                "address": m.address_status,
                "city": m.city_normalized,
                "region": m.region,
                "timezone": m.timezone,
                "quality": m.quality,
            }
            for m in session.scalars(select(Member))
        }


def test_flags_and_the_report_on_messy_members(admin: Api, db: Database) -> None:
    for member in MESSY:
        assert admin.post("/api/v1/admin/members", json=member).status_code == 201
    report = admin.get(DATA_QUALITY)
    assert report.status_code == 200, report.text
    assert report.json() == {
        "members": 6,
        "checked": 6,
        "pending": 0,
        "channels": {
            "phone": {"valid": 3, "invalid": 1, "missing": 2, "unrecognised": None},
            "sms": {"valid": 1, "invalid": 3, "missing": 2, "unrecognised": None},
            "email": {"valid": 1, "invalid": 2, "missing": 3, "unrecognised": None},
            "address": {"valid": 3, "invalid": 1, "missing": 1, "unrecognised": 1},
        },
    }
    flags = _flags(db)
    assert flags["Анна"] | {"quality": None} == {
        "phone": "valid",
        "phone_type": "mobile",
        "email": "valid",
        "provider": "Mail.ru",
        "address": "valid",
        "city": "Москва",
        "region": "Москва",
        "timezone": "Europe/Moscow",
        "quality": None,
    }
    assert flags["Олег"]["phone"] == "invalid" and flags["Олег"]["quality"]["phone"]["issues"] == [
        "placeholder"
    ]
    assert flags["Олег"]["quality"]["email"]["suggestion"] == "oleg@gmail.com"
    assert flags["Ирина"]["phone_type"] == "fixed_line" and flags["Ирина"]["address"] == "unrecognised"
    assert flags["Ирина"]["timezone"] == "Europe/Moscow"  # from the Moscow landline
    assert (
        flags["Пётр"]["region"] == "Свердловская область"
        and flags["Пётр"]["timezone"] == "Asia/Yekaterinburg"
    )
    assert flags["Нина"]["address"] == "invalid" and flags["Нина"]["timezone"] == "Asia/Yekaterinburg"
    assert flags["Лев"]["phone"] == "missing" and flags["Лев"]["email"] == "missing"


def test_a_changed_member_is_checked_again(admin: Api, db: Database) -> None:
    member = admin.post(
        "/api/v1/admin/members", json={"first_name": "Олег", "email": "oleg@gmial.com"}
    ).json()
    assert admin.get(DATA_QUALITY).json()["channels"]["email"]["invalid"] == 1
    fixed = admin.patch(f"/api/v1/admin/members/{member['id']}", json={"email": "oleg@gmail.com"})
    assert fixed.status_code == 200, fixed.text
    # Checked again in the same transaction as the change: nothing waits for a refresh.
    with db.reading() as session:
        assert quality.pending_count(session) == 0
    body = admin.get(DATA_QUALITY).json()
    assert body["pending"] == 0 and body["channels"]["email"] == {
        "valid": 1,
        "invalid": 0,
        "missing": 0,
        "unrecognised": None,
    }
    assert _flags(db)["Олег"]["provider"] == "Gmail"


def test_bulk_refresh_checks_everyone(admin: Api, db: Database) -> None:
    for member in MESSY:
        admin.post("/api/v1/admin/members", json=member)
    seen: list[int] = []
    assert quality.refresh_all(db, progress=seen.append) == len(MESSY)
    assert seen == [len(MESSY)]
    with db.reading() as session:
        assert quality.pending_count(session) == 0
    # Checking again changes nothing a user would see, and is not a change of the member.
    before = _flags(db)
    assert quality.refresh_all(db, only_pending=True) == 0
    again = admin.post(f"{DATA_QUALITY}/refresh", params={"only_pending": "false"})
    assert again.status_code == 200 and again.json()["checked"] == len(MESSY)
    assert _flags(db) == before


def test_who_may_see_the_report(admin: Api, db: Database) -> None:
    member = admin.post("/api/v1/admin/members", json={"first_name": "Лев"}).json()
    assert admin.as_key(make_key(db, "analyst")).get(DATA_QUALITY).status_code == 200
    client = admin.as_key(make_key(db, "client", member_id=member["id"]))
    assert_error(client.get(DATA_QUALITY), 403, "forbidden")
    assert_error(admin.as_key(make_key(db, "marketer")).post(f"{DATA_QUALITY}/refresh"), 403, "forbidden")
