"""Exporting a segment to a target audience on the loyalty side: an offer filtered on that
audience applies at the till at once."""

from __future__ import annotations

from omniloyal.analytics.sink import load
from omniloyal.analytics.warehouse import Warehouse
from omniloyal.db.engine import Database
from tests.conftest import Api, assert_error
from tests.segments.helpers import (
    ADMIN,
    KAZAN,
    SEGMENTS,
    cheque_discount,
    create,
    new_member,
    ok,
    outbox,
    shop,
)


def test_an_offer_filtered_on_the_exported_audience_applies_in_processing(
    api: Api, db: Database, wh: Warehouse
) -> None:
    till = shop(api, db)
    kazan = new_member(api, "1000", "Kazan")
    moscow = new_member(api, "2000", "Moscow")
    load(wh, outbox(db))  # what the warehouse consumer does
    segment = create(api, KAZAN, name="Kazan")
    assert cheque_discount(till, "a1", "1000") == "0.00"

    exported = ok(api.post(f"{SEGMENTS}/{segment['id']}/export/audience", json={"audience": "kazan"}))
    assert (exported["exported"], exported["added"], exported["removed"], exported["member_count"]) == (
        1,
        1,
        0,
        1,
    )
    assert cheque_discount(till, "a2", "1000") == "20.00"
    assert cheque_discount(till, "a3", "2000") == "0.00"
    audience = ok(api.get(f"{ADMIN}/audiences/kazan"))
    assert (audience["member_count"], audience["source"]) == (1, "segment")
    # The warehouse mirror follows at once: "member of audience kazan" is the same member.
    in_audience = ok(
        api.post(f"{SEGMENTS}/count", json={"conditions": {"type": "audience", "audiences": ["kazan"]}})
    )
    assert in_audience["count"] == 1

    # add (idempotent), replace (only the difference), remove.
    assert (
        ok(
            api.post(f"{SEGMENTS}/{segment['id']}/export/audience", json={"audience": "kazan", "mode": "add"})
        )["added"]
        == 0
    )
    others = create(api, {"type": "profile", "field": "city", "op": "eq", "value": "Moscow"})
    replaced = ok(
        api.post(f"{SEGMENTS}/{others['id']}/export/audience", json={"audience": "kazan", "mode": "replace"})
    )
    assert (replaced["added"], replaced["removed"], replaced["member_count"]) == (1, 1, 1)
    assert cheque_discount(till, "a4", "1000") == "0.00" and cheque_discount(till, "a5", "2000") == "20.00"
    removed = ok(
        api.post(f"{SEGMENTS}/{others['id']}/export/audience", json={"audience": "kazan", "mode": "remove"})
    )
    assert (removed["removed"], removed["member_count"]) == (1, 0)
    assert cheque_discount(till, "a6", "2000") == "0.00"
    assert (
        ok(api.post(f"{SEGMENTS}/count", json={"conditions": {"type": "audience", "audiences": ["kazan"]}}))[
            "count"
        ]
        == 0
    )

    # A new audience on the way; or a refusal when it does not exist.
    assert_error(
        api.post(f"{SEGMENTS}/{segment['id']}/export/audience", json={"audience": "fresh"}),
        404,
        "unknown_audience",
        "audience",
    )
    created = ok(
        api.post(
            f"{SEGMENTS}/{segment['id']}/export/audience",
            json={"audience": "fresh", "create": True, "name": "Fresh"},
        )
    )
    assert created["member_count"] == 1 and ok(api.get(f"{ADMIN}/audiences/fresh"))["name"] == "Fresh"
    assert {e.properties["code"] for e in outbox(db, "target_audience.changed")} == {"kazan", "fresh"}
    assert moscow != kazan


def test_keep_in_sync_makes_every_build_update_the_audience(api: Api, db: Database, wh: Warehouse) -> None:
    till = shop(api, db)
    new_member(api, "1000", "Kazan")
    load(wh, outbox(db))
    segment = create(api, KAZAN)
    assert_error(
        api.post(
            f"{SEGMENTS}/{segment['id']}/export/audience",
            json={"audience": "kazan", "mode": "add", "keep_in_sync": True},
        ),
        400,
        "invalid_mode",
        "keep_in_sync",
    )
    ok(
        api.post(
            f"{SEGMENTS}/{segment['id']}/export/audience", json={"audience": "kazan", "keep_in_sync": True}
        )
    )
    assert ok(api.get(f"{SEGMENTS}/{segment['id']}"))["audience"] == "kazan"
    new_member(api, "3000", "Kazan")
    load(wh, outbox(db))
    assert cheque_discount(till, "b1", "3000") == "0.00"
    built = ok(api.post(f"{SEGMENTS}/{segment['id']}/materialise"))
    assert built["member_count"] == 2
    assert cheque_discount(till, "b2", "3000") == "20.00"
    assert ok(api.get(f"{ADMIN}/audiences/kazan"))["member_count"] == 2
