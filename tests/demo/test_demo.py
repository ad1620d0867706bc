"""The demo retailer: stores, catalogue, members, the seed offers and a year of purchases.

Small member counts, run on SQLite and PostgreSQL through the ``db`` fixture. The purchase
history is checked the way a user of the demo would notice a mistake: books that do not
balance, an online-paid order without its 100 points, a hypermarket without its 10%.
"""

from __future__ import annotations

from collections import Counter
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from omniloyal.bootstrap import prepare
from omniloyal.catalog.models import Category, Product, ProductGroup, Store
from omniloyal.db.base import Base
from omniloyal.db.engine import Database
from omniloyal.demo import generate
from omniloyal.demo.offers import APP_BONUS, ONLINE_BONUS
from omniloyal.events.models import Event, OutboxEvent
from omniloyal.kernel.clock import utcnow
from omniloyal.kernel.errors import Conflict
from omniloyal.ledger.models import Account, LedgerEntry, Lot, Posting
from omniloyal.members.models import Card, Member, MemberConsent
from omniloyal.processing.events import purchase_confirmed
from omniloyal.processing.models import Operation, PurchaseLine
from omniloyal.settings import Settings
from tests.conftest import Api

TODAY = date(2026, 3, 2)
CENT = Decimal("0.01")
ADMIN = "/api/v1/admin"


def _ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def _check_books(db: Database) -> None:
    """Double entry balances; every member account equals its lots; no lot overdrawn."""
    with db.reading() as session:
        assert Decimal(session.scalar(select(func.coalesce(func.sum(Posting.amount), 0)))) == 0
        posted = dict(
            session.execute(
                select(Posting.account_id, func.sum(Posting.amount))
                .join(Account, Account.id == Posting.account_id)
                .where(Account.kind == "member")
                .group_by(Posting.account_id)
            ).all()
        )
        in_lots = dict(
            session.execute(select(Lot.account_id, func.sum(Lot.remaining)).group_by(Lot.account_id)).all()
        )
        assert posted and posted == in_lots
        assert not session.scalar(
            select(func.count()).where((Lot.remaining < 0) | (Lot.remaining > Lot.amount))
        )
        assert not session.scalar(
            select(func.count()).where((Lot.remaining == 0) != Lot.closed_at.is_not(None))
        )
        # Each entry's amount is what its postings moved on the member's account.
        moved = dict(
            session.execute(
                select(Posting.entry_id, func.sum(Posting.amount))
                .join(Account, Account.id == Posting.account_id)
                .where(Account.kind == "member")
                .group_by(Posting.entry_id)
            ).all()
        )
        entries = session.execute(
            select(LedgerEntry.id, LedgerEntry.amount).where(LedgerEntry.kind != "activation")
        ).all()
        assert all(moved[entry_id] == amount for entry_id, amount in entries)


@pytest.fixture
def demo(db: Database) -> Database:
    generate(db, members=150, seed=11, today=TODAY, quiet=True)
    return db


def test_the_demo_chain(db: Database) -> None:
    summary = generate(db, members=400, seed=3, today=TODAY, days=0, quiet=True)
    assert summary.purchases is None
    with db.reading() as session:
        stores = session.scalars(select(Store)).all()
        offline = [s for s in stores if s.channel == "offline"]
        formats = Counter(s.attributes["CustomTradeFormat"] for s in offline)
        assert 40 <= len(offline) <= 60
        assert set(formats) == {"Hypermarket", "Supermarket", "Minimarket"}
        assert formats["Supermarket"] > formats["Hypermarket"]
        assert {(s.code, s.channel) for s in stores if s.channel != "offline"} == {
            ("ONLINE", "online_store"),
            ("APP", "mobile_app"),
        }
        assert session.scalar(select(func.count()).select_from(Product)) == 5000
        assert session.scalar(select(func.max(Category.depth))) == 2
        leaves = session.scalar(select(func.count()).select_from(Category).where(Category.depth == 2))
        assert leaves is not None and leaves > 50
        groups = session.scalars(select(ProductGroup.code)).all()
        assert {"DAIRY", "ALCOHOL", "WEEKLY_HITS"} <= set(groups)

        members = session.scalar(select(func.count()).select_from(Member)) or 0
        assert members == 400
        with_card = session.scalar(select(func.count(func.distinct(Card.member_id)))) or 0
        assert with_card == members
        physical = session.scalar(
            select(func.count(func.distinct(Card.member_id))).where(
                Card.kind == "physical", Card.state == "activated"
            )
        )
        assert 0.7 <= (physical or 0) / members <= 0.9
        phones = session.scalar(select(func.count()).where(Member.phone.is_not(None))) or 0
        emails = session.scalar(select(func.count()).where(Member.email.is_not(None))) or 0
        assert 0.9 <= phones / members <= 1.0
        assert 0.6 <= emails / members <= 0.8
        sms = session.scalar(
            select(func.count()).where(MemberConsent.channel == "sms", MemberConsent.granted.is_(True))
        )
        assert 0.6 <= (sms or 0) / members <= 0.9
        born = session.scalar(select(func.count()).where(Member.birth_date.is_not(None))) or 0
        assert 0.75 <= born / members <= 0.95


def test_the_seed_offers_are_active_in_the_admin_api(demo: Database, api: Api) -> None:
    offers = _ok(api.get(f"{ADMIN}/offers", params={"status": "active", "limit": 50}))["items"]
    assert len(offers) == 5
    by_event = {offer["chains"][0]["event"]: offer for offer in offers if offer["chains"]}

    app = by_event["mobile_app_installed"]
    assert app["max_uses_per_member"] == 1
    action = app["chains"][0]["actions"][0]
    assert action["type"] == "extra_bonus" and Decimal(action["value"]) == APP_BONUS
    assert action["legal_entity"] == "DOBRYNYA-ONLINE" and "lifetime_days" not in action  # never expire

    hyper = by_event["discount_calculation"]
    assert hyper["chains"][0]["filters"] == [
        {"type": "stores", "attribute": "CustomTradeFormat", "values": ["Hypermarket"], "exclude": False}
    ]
    assert hyper["chains"][0]["actions"][0]["kind"] == "percent"
    assert Decimal(hyper["chains"][0]["actions"][0]["value"]) == 10

    bonus_offers = [o for o in offers if o["chains"][0]["event"] == "bonus_calculation"]
    online = next(o for o in bonus_offers if o["summable"])
    filters = {f["type"]: f for f in online["chains"][0]["filters"]}
    assert filters["payment_method"]["methods"] == ["online"]
    assert Decimal(online["chains"][0]["actions"][0]["value"]) == ONLINE_BONUS

    assert any(o["chains"][0]["event"] == "write_off" for o in offers)
    # They ran: the year of purchases counted their uses and budgets.
    assert all(o["uses"] > 0 for o in offers)
    assert Decimal(hyper["spent_money"]) > 0
    assert Decimal(online["spent_points"]) > 0
    history = _ok(api.get(f"{ADMIN}/offers/{online['id']}/history"))["items"]
    assert [h["to_status"] for h in history] == ["draft", "active"]


def test_a_year_of_purchases(demo: Database, api: Api) -> None:
    _check_books(demo)
    if demo.dialect == "sqlite":
        # The indexes put off while the history was written are all back.
        with demo.engine.connect() as conn:
            present = {
                row[0] for row in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='index'")
            }
        declared = {
            index.name
            for table in ("operations", "purchase_lines", "ledger_entries", "lots", "postings", "outbox")
            for index in Base.metadata.tables[table].indexes
        }
        assert declared and declared <= present
    with demo.reading() as session:
        stores = {s.id: s for s in session.scalars(select(Store))}
        operations = session.scalars(select(Operation).order_by(Operation.id)).all()
        assert len(operations) > 150 * 5
        assert {o.kind for o in operations} == {"purchase"} and {o.state for o in operations} == {"confirmed"}
        first, last = min(o.cheque_at for o in operations), max(o.cheque_at for o in operations)
        assert first.date() >= date(2025, 3, 1) and last.date() < TODAY
        channels = Counter(stores[o.store_id].channel for o in operations)
        assert 0.08 <= (channels["online_store"] + channels["mobile_app"]) / len(operations) <= 0.25
        # Cheques in time order per member: write-offs never took more than the member had.
        written = session.scalar(select(func.count()).where(LedgerEntry.kind == "write_off")) or 0
        assert written > 0
        assert session.scalar(select(func.count()).where(LedgerEntry.kind == "expiry"))
        offers = {o["name"]: o["id"] for o in _ok(api.get(f"{ADMIN}/offers"))["items"]}
        online_offer = next(i for n, i in offers.items() if "онлайн" in n)

        # Paid online in the online store or the app: the 100 points on top of the 3%.
        online_paid = [
            o
            for o in operations
            if stores[o.store_id].channel != "offline" and o.payments[0]["method"] == "online"
        ]
        assert online_paid
        for operation in online_paid[:20]:
            assert online_offer in operation.plan["offers"]
            key = f"{operation.store_id}:{operation.operation_id}"
            bonus = session.execute(
                select(LedgerEntry.amount).where(
                    LedgerEntry.source_ref == key, LedgerEntry.reason == f"offer {online_offer}"
                )
            ).scalar_one()
            assert bonus == ONLINE_BONUS
            assert Decimal(operation.accrual["bonus"]) > ONLINE_BONUS
        # Paid by card in the online store, or in a store: no online bonus.
        others = [o for o in operations if o.payments[0]["method"] != "online"]
        assert others and all(online_offer not in o.plan["offers"] for o in others)

        # Hypermarket lines: 10% off (to the cent); elsewhere no discount.
        hyper_ids = {i for i, s in stores.items() if s.attributes.get("CustomTradeFormat") == "Hypermarket"}
        lines = session.execute(
            select(PurchaseLine.amount, PurchaseLine.discount, Operation.store_id).join(
                Operation, Operation.id == PurchaseLine.operation_id
            )
        ).all()
        in_hyper = [(a, d) for a, d, store_id in lines if store_id in hyper_ids]
        assert in_hyper
        assert all(d == (a * Decimal("0.1")).quantize(CENT, ROUND_HALF_UP) for a, d in in_hyper)
        assert all(d == 0 for a, d, store_id in lines if store_id not in hyper_ids)

        # The app installation: 100 never-expiring points, once.
        installs = session.scalars(select(Event).where(Event.type == "mobile_app_installed")).all()
        assert installs
        member_id = installs[0].member_id
        app_points = session.scalars(
            select(Lot)
            .join(LedgerEntry, LedgerEntry.id == Lot.entry_id)
            .where(LedgerEntry.source_ref == f"event:{installs[0].id}")
        ).all()
        assert [(lot.amount, lot.expires_at) for lot in app_points] == [(APP_BONUS, None)]

        # One purchase.confirmed envelope per purchase, as processing.events builds it.
        envelopes = {
            e.event_id: e.payload
            for e in session.scalars(select(OutboxEvent).where(OutboxEvent.type == "purchase.confirmed"))
        }
        assert len(envelopes) == len(operations)
        categories = dict(
            session.execute(
                select(Product.sku, Category.path).join(Category, Category.id == Product.category_id)
            ).all()
        )
        for operation in operations[:: max(1, len(operations) // 25)]:
            lines_of = session.scalars(
                select(PurchaseLine)
                .where(PurchaseLine.operation_id == operation.id)
                .order_by(PurchaseLine.line)
            ).all()
            expected = purchase_confirmed(
                operation,
                lines_of,
                store_code=stores[operation.store_id].code,
                channel=stores[operation.store_id].channel,
                categories=categories,
            ).to_json()
            stored = envelopes[f"purchase.confirmed:{operation.id}"]
            assert {k: v for k, v in stored.items() if k != "received_at"} == {
                k: v for k, v in expected.items() if k != "received_at"
            }

    # The API sees the same points: available + pending = the open lots not expired by now (the
    # history ends before TODAY; lots that expired since wait for the server's expiry job).
    balance = _ok(api.get(f"{ADMIN}/members/{member_id}/balance"))["balances"][0]
    with demo.reading() as session:
        open_points = session.scalar(
            select(func.sum(Lot.remaining))
            .join(Account, Account.id == Lot.account_id)
            .where(
                Account.member_id == member_id,
                Lot.closed_at.is_(None),
                Lot.expires_at.is_(None) | (Lot.expires_at > utcnow()),
            )
        )
    assert Decimal(balance["available"]) + Decimal(balance["pending"]) == open_points

    # A purchase from the history refunds through the till API like any other.
    with demo.reading() as session:
        operation_id, store, amount, discount, accrual = session.execute(
            select(
                Operation.operation_id, Store.code, Operation.amount, Operation.discount, Operation.accrual
            )
            .join(Store, Store.id == Operation.store_id)
            .order_by(Operation.cheque_at.desc())
            .limit(1)
        ).one()
    body = _ok(
        api.post(
            "/api/v1/pos/refund",
            json={"operation_id": "refund-1", "store": store, "purchase_operation_id": operation_id},
        )
    )
    assert Decimal(body["amount"]) == amount - discount
    assert body["points_taken_back"] == accrual
    _check_books(demo)


def _fingerprint(db: Database) -> dict[str, Any]:
    with db.reading() as session:
        return {
            "members": session.execute(
                select(Member.id, Member.external_id, Member.phone, Member.email, Member.last_name).order_by(
                    Member.id
                )
            ).all(),
            "stores": session.execute(
                select(Store.code, Store.name, Store.attributes).order_by(Store.code)
            ).all(),
            "operations": session.execute(
                select(
                    Operation.id,
                    Operation.operation_id,
                    Operation.cheque_at,
                    Operation.amount,
                    Operation.discount,
                ).order_by(Operation.id)
            ).all(),
            "ledger": session.execute(
                select(LedgerEntry.kind, func.count(), func.sum(LedgerEntry.amount))
                .group_by(LedgerEntry.kind)
                .order_by(LedgerEntry.kind)
            ).all(),
            "lines": session.execute(
                select(func.count(), func.sum(PurchaseLine.amount), func.sum(PurchaseLine.discount))
            ).all(),
        }


def test_the_same_seed_gives_the_same_retailer_and_history(db: Database, tmp_path: Any) -> None:
    generate(db, members=60, seed=5, today=TODAY, quiet=True)
    # Again on a fresh SQLite store, with the purchases spread over two worker processes.
    url = f"sqlite:///{tmp_path / 'again.db'}"
    other = Database(url)
    try:
        prepare(other, Settings(database_url=url))
        generate(other, members=60, seed=5, today=TODAY, processes=2, quiet=True)
        first, second = _fingerprint(db), _fingerprint(other)
        assert first["operations"] and first["ledger"]
        assert first == second
        _check_books(other)
    finally:
        other.dispose()


def test_a_store_that_holds_a_retailer_is_refused(db: Database) -> None:
    generate(db, members=5, seed=1, today=TODAY, days=0, quiet=True)
    with pytest.raises(Conflict) as refused:
        generate(db, members=5, seed=1, today=TODAY, quiet=True)
    assert refused.value.code == "store_not_empty"
