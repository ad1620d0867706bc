"""Property test: no sequence of till operations creates or loses points.

Random purchases (with and without points), confirms, cancels, repeats of the same request,
partial and whole refunds (some asking for more than is left) are played through the POS API.
After every step the books balance, and the member's points equal the welcome accrual plus
everything the till was told was accrued or returned, minus everything written off or taken back.
"""

from __future__ import annotations

import itertools
from decimal import Decimal as D
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omniloyal.db.engine import Database
from tests.conftest import Api
from tests.ledger.helpers import check_books
from tests.processing.test_pos import EARN_5, PAY_50, POS, add_offer, balance_of, purchase
from tests.processing.test_pos import shop as shop  # the fixture

_ids = itertools.count()

basket = st.lists(
    st.tuples(st.sampled_from([("MILK", "100.00"), ("WINE", "500.00")]), st.integers(1, 3)),
    min_size=1,
    max_size=3,
)
step = st.one_of(
    st.tuples(
        st.just("purchase"),
        basket,
        st.sampled_from([None, "1", "30", "250"]),  # points asked for
        st.sampled_from(["confirm", "confirm", "cancel", "leave"]),
        st.booleans(),  # repeat the confirm
    ),
    st.tuples(st.just("refund"), st.integers(0, 9), st.sampled_from([None, 1, 2, 5])),
)


def _sum(amounts: dict[str, str]) -> D:
    return D(amounts.get("bonus", "0"))


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(step, min_size=2, max_size=8))
def test_no_sequence_of_operations_creates_or_loses_points(
    api: Api, db: Database, shop: dict[str, Any], steps: list[tuple[Any, ...]]
) -> None:
    if "offers" not in shop:  # the fixture lives across examples: set up once
        add_offer(db, "5% back", EARN_5, summable=True)
        add_offer(db, "pay with points", PAY_50, summable=True)
        shop["offers"] = True
        shop["confirmed"] = []
    till, member = shop["hyper"], shop["member"]
    start = balance_of(api, member)
    total = start["available"] + start["pending"] + start["reserved"]
    for item in steps:
        if item[0] == "purchase":
            _, lines, points, outcome, repeat = item
            operation = f"prop-{next(_ids)}"
            body = purchase(
                operation, lines=[(sku, price, str(qty)) for (sku, price), qty in lines], write_off=points
            )
            calculated = till.post(f"{POS}/calculate", json=body)
            if calculated.status_code != 200:
                # Asking for more points than allowed is refused and changes nothing.
                refused = calculated.json()["error"]["code"]
                assert refused in ("insufficient_points", "write_off_limit_exceeded")
                continue
            if outcome == "leave":
                continue
            answer = till.post(f"{POS}/{outcome}", json={"operation_id": operation})
            assert answer.status_code == 200, answer.text
            if repeat:
                again = till.post(f"{POS}/{outcome}", json={"operation_id": operation})
                assert again.json() == answer.json()
            if outcome == "confirm":
                total += _sum(answer.json()["accrued"]) - _sum(answer.json()["written_off"])
                shop["confirmed"].append(operation)
        elif shop["confirmed"]:
            _, index, quantity = item
            original = shop["confirmed"][index % len(shop["confirmed"])]
            refund: dict[str, Any] = {"operation_id": f"prop-{next(_ids)}", "purchase_operation_id": original}
            if quantity is not None:
                refund["lines"] = [{"line": 1, "quantity": str(quantity)}]
            answer = till.post(f"{POS}/refund", json=refund)
            if answer.status_code != 200:
                # Returning more than is left is refused and changes nothing.
                assert answer.status_code in (404, 409, 422), answer.text
                continue
            total += _sum(answer.json()["points_returned"]) - _sum(answer.json()["points_taken_back"])
        check_books(db, [member])
        now = balance_of(api, member)
        assert now["available"] + now["pending"] + now["reserved"] == total
