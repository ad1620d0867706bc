"""Concurrent write-offs at one member never spend more than the member has."""

from __future__ import annotations

import threading
from decimal import Decimal

from omniloyal.db.engine import Database
from omniloyal.kernel.errors import AppError
from omniloyal.ledger import service
from tests.ledger.helpers import T0, check_books, legal_entity, member


def test_twenty_concurrent_write_offs_never_overspend(db: Database) -> None:
    legal_entity(db)
    member_id = member(db)
    with db.transaction() as session:
        for _ in range(2):  # two lots, so write-offs also split across lots
            service.accrue(
                session, member_id=member_id, currency="bonus", amount=Decimal(50), source="t", at=T0
            )
    start = threading.Barrier(20)
    spent: list[Decimal] = []
    refusals: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def spend() -> None:
        start.wait()
        try:
            with db.transaction() as session:
                service.write_off(
                    session, member_id=member_id, currency="bonus", amount=Decimal(7), source="t", at=T0
                )
            with lock:
                spent.append(Decimal(7))
        except AppError as refusal:
            with lock:
                refusals.append(refusal.code)
        except BaseException as exc:  # reported below, not swallowed by the thread
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=spend) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sum(spent) == 98  # 14 x 7 fit into 100; the other 6 are refused
    assert refusals == ["insufficient_points"] * 6
    with db.reading() as session:
        assert service.balance(session, member_id, T0)[0].available == 2
    check_books(db, [member_id])
