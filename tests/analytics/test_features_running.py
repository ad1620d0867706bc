"""Purchase features kept by adding new purchases to each member's stored sums (DuckDB) are
exactly what recomputing every member's history gives, through any mix of purchases, refunds,
cancellations (also arriving before their purchase), repeats and merges; on ClickHouse the
features are recomputed, and the same histories give the same answers."""

from __future__ import annotations

import random
from typing import Any

import pytest

from omniloyal.analytics import features
from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.events.envelope import EventEnvelope
from tests.analytics.helpers import cancelled, merged, purchase, refund, web

STORES = ["S1", "S2", "S3", None]
CATEGORIES = ["Food/Dairy", "Food/Bakery", "Home", "Toys", None]
COMPARED = (
    "purchases_count",
    "purchases_total",
    "refunds_total",
    "ltv",
    "avg_cheque",
    "first_purchase_at",
    "last_purchase_at",
    "favourite_stores",
    "favourite_categories",
    "channels",
)


def _history(seed: int) -> list[list[EventEnvelope]]:
    """Batches of a random shop's life: members 1..6, some anonymous buyers."""
    rng = random.Random(seed)
    batches: list[list[EventEnvelope]] = []
    bought: list[tuple[int, int | None, int]] = []  # (operation, member, lines)
    operation = 0
    for batch_no in range(12):
        batch: list[EventEnvelope] = []
        for _ in range(rng.randint(1, 6)):
            roll = rng.random()
            minutes = batch_no * 100 + rng.uniform(-300, 300)  # not in time order
            if roll < 0.6 or not bought:
                operation += 1
                member = rng.choice([1, 2, 3, 4, 5, 6, None])
                lines = [
                    (
                        f"sku{rng.randrange(9)}",
                        rng.choice(CATEGORIES),
                        f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}",
                    )
                    for _ in range(rng.randint(1, 4))
                ]
                event = purchase(
                    operation,
                    member,
                    lines,
                    minutes=minutes,
                    store=rng.choice(STORES) or "S1",
                    channel=rng.choice(["offline", "online_store"]),
                    discount=f"{rng.randint(0, 30)}.00",
                )
                bought.append((operation, member, len(lines)))
                if rng.random() < 0.15:  # its refund or cancellation came first
                    batch.append(cancelled(operation, member, minutes + 1))
                batch.append(event)
            elif roll < 0.8:
                op, member, count = rng.choice(bought)
                operation += 1
                line = rng.randint(1, count)
                batch.append(
                    refund(operation, op, member, [(line, "sku", f"{rng.randint(1, 50)}.00")], minutes)
                )
            elif roll < 0.9:
                op, member, _ = rng.choice(bought)
                batch.append(cancelled(op, member, minutes))
            elif roll < 0.95 and batches:
                batch.extend(rng.choice(batches)[:2])  # delivered again
            else:
                batch.append(
                    web(f"w{operation}-{batch_no}", member_id=rng.choice([1, 2, 3]), minutes=minutes)
                )
        if batch_no == 8:
            batch.append(merged(kept=1, duplicate=2, minutes=batch_no * 100))
        batches.append(batch)
    return batches


def _stored(wh: Warehouse) -> dict[int, dict[str, Any]]:
    out = {}
    for row in wh.query("SELECT * FROM {member_features}"):
        out[row["member_id"]] = {k: row[k] for k in COMPARED}
    return out


def _recomputed(wh: Warehouse, members: set[int]) -> dict[int, dict[str, Any]]:
    fresh = features.purchase_features(wh, members)
    empty = features.Spend().features()
    out = {}
    for member in members:
        row = fresh.get(member, empty)
        out[member] = {k: row[k] for k in COMPARED if k != "channels"}
    return out


@pytest.mark.parametrize("seed", range(6))
def test_running_sums_give_what_recomputing_gives(wh: Warehouse, seed: int) -> None:
    for batch in _history(seed):
        load(wh, batch)
        stored = _stored(wh)
        expected = _recomputed(wh, set(stored))
        sums = features.purchase_sums(wh, set(stored))
        for member, row in stored.items():
            assert {k: v for k, v in row.items() if k != "channels"} == expected[member], (seed, member)
            kept = wh.query(f"SELECT purchase_spend FROM {{member_features}} WHERE member_id = {member}")
            assert features.Spend.from_json(kept[0]["purchase_spend"]) == sums.get(member, features.Spend())


def test_a_row_written_before_the_sums_were_kept_is_recomputed_once(wh: Warehouse) -> None:
    if wh.dialect != "duckdb":
        pytest.skip("ClickHouse recomputes the features of every batch's buyers: no sums are read")
    load(wh, [purchase(1, 7, [("milk", "Food/Dairy", "100.00")], minutes=0)])
    wh.execute("UPDATE {member_features} SET purchase_spend = NULL")
    load(wh, [purchase(2, 7, [("tv", "Home", "300.00")], minutes=5, store="S2")])
    row = features.member_features(wh, 7)
    assert row is not None
    assert (row["purchases_count"], row["purchases_total"]) == (2, features.quantize(features.Decimal("400")))
    assert row["favourite_categories"] == ["Home", "Food/Dairy"]
    stored = wh.query("SELECT purchase_spend FROM {member_features} WHERE member_id = 7")[0]
    assert features.Spend.from_json(stored["purchase_spend"]) is not None
