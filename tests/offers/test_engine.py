"""The offer engine on plain data: the seed offers, selection rules, floors, write-off, explain."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal as D

from omniloyal.offers.engine import (
    Chain,
    Cheque,
    Line,
    MemberEvent,
    MemberFacts,
    Offer,
    Payment,
    Rule,
    Snapshot,
    calculate,
    evaluate_member_event,
    render_message,
)

MONDAY_NOON = datetime(2026, 11, 23, 12, 0)
HYPER = {"CustomTradeFormat": "Hypermarket"}
MINI = {"CustomTradeFormat": "Minimarket"}


def line(n: int, sku: str, price: str, qty: str = "1", **kw: object) -> Line:
    amount = D(price) * D(qty)
    return Line(n, sku, D(price), D(qty), amount, **kw)  # type: ignore[arg-type]


def cheque(
    lines: list[Line],
    *,
    attrs: dict[str, object] | None = None,
    channel: str = "offline",
    payments: list[Payment] | None = None,
    member: MemberFacts | None = None,
    write_off: tuple[str, str] | None = None,
    at: datetime = MONDAY_NOON,
) -> Cheque:
    return Cheque(
        local_time=at,
        store_code="S1",
        channel=channel,
        store_attributes=attrs or HYPER,
        lines=tuple(lines),
        payments=tuple(payments or [Payment("cash", sum((x.amount for x in lines), D(0)))]),
        member=member,
        write_off_currency=write_off[0] if write_off else None,
        write_off_amount=D(write_off[1]) if write_off else D(0),
    )


def discount_offer(
    oid: int, percent: str, *, priority: int = 0, summable: bool = False, filters: tuple[Rule, ...] = ()
) -> Offer:
    return Offer(
        oid,
        f"{percent}% off",
        (Chain("discount_calculation", filters, (Rule("discount", {"kind": "percent", "value": percent}),)),),
        priority=priority,
        summable=summable,
    )


HYPERMARKET_10 = discount_offer(
    1, "10", filters=(Rule("stores", {"attribute": "CustomTradeFormat", "values": ["Hypermarket"]}),)
)
ONLINE_PAYMENT_100 = Offer(
    2,
    "100 points for paying online",
    (
        Chain(
            "bonus_calculation",
            (Rule("payment_method", {"methods": ["online"]}),),
            (Rule("extra_bonus", {"value": "100", "currency": "bonus"}),),
        ),
    ),
    summable=True,
)
APP_INSTALL_100 = Offer(
    3,
    "100 points for installing the app",
    (Chain("mobile_app_installed", (), (Rule("extra_bonus", {"value": "100", "lifetime_days": 90}),)),),
)


def test_ten_percent_only_in_hypermarkets() -> None:
    snap = Snapshot.build([HYPERMARKET_10])
    in_hyper = calculate(snap, cheque([line(1, "A", "100.00", "2"), line(2, "B", "55.55")]))
    assert [x.discount for x in in_hyper.lines] == [D("20.00"), D("5.56")]
    in_mini = calculate(snap, cheque([line(1, "A", "100.00")], attrs=MINI), explain=True)
    assert in_mini.discount_total == 0
    assert "CustomTradeFormat='Minimarket'" in in_mini.explain[0].reason


def test_hundred_points_for_online_payment_only() -> None:
    snap = Snapshot.build([ONLINE_PAYMENT_100])
    online = calculate(
        snap, cheque([line(1, "A", "500")], channel="online_store", payments=[Payment("online", D(500))])
    )
    assert online.bonus_total() == {"bonus": D("100.00")}
    cash = calculate(snap, cheque([line(1, "A", "500")]), explain=True)
    assert cash.accruals == []
    assert "not paid by ['online']" in cash.explain[0].reason


def test_app_installation_bonus_is_a_member_event() -> None:
    snap = Snapshot.build([APP_INSTALL_100])
    result = evaluate_member_event(snap, MemberEvent("mobile_app_installed", MONDAY_NOON, MemberFacts(7)))
    assert [(a.amount, a.lifetime_days) for a in result.accruals] == [(D("100.00"), 90)]
    other = evaluate_member_event(snap, MemberEvent("card_activated", MONDAY_NOON, MemberFacts(7)))
    assert other.accruals == []


def test_benefit_over_the_whole_cheque_decides_between_equal_priorities() -> None:
    # The documented example: A = 27% on one sku, B = 24% on everything, both priority 58.
    a = discount_offer(10, "27", priority=58, filters=(Rule("products", {"skus": ["X"]}),))
    b = discount_offer(11, "24", priority=58)
    snap = Snapshot.build([a, b])
    one_line = calculate(snap, cheque([line(1, "X", "100")]))
    assert one_line.lines[0].discount == D("27.00") and one_line.applied_offers == [10]
    many = calculate(snap, cheque([line(1, "X", "100"), line(2, "Y", "100")]))
    assert [x.discount for x in many.lines] == [D("24.00"), D("24.00")]
    assert many.applied_offers == [11]


def test_priority_beats_benefit_and_summable_offers_add_up() -> None:
    high = discount_offer(1, "5", priority=10)
    big = discount_offer(2, "50", priority=1)
    extra = discount_offer(3, "10", summable=True)
    result = calculate(Snapshot.build([high, big, extra]), cheque([line(1, "A", "100")]))
    # 5% first (priority), then the summable 10% of what is left: 100 - 5 - 9.50
    assert result.lines[0].discount == D("14.50")
    assert sorted(result.applied_offers) == [1, 3]


def test_a_line_never_goes_below_its_minimum_price() -> None:
    snap = Snapshot.build([discount_offer(1, "50"), discount_offer(2, "30", summable=True)])
    result = calculate(snap, cheque([line(1, "A", "100", "2", min_price=D("80"))]))
    assert result.lines[0].amount_after_discount == D("160.00")
    floor = Offer(
        3,
        "floor",
        (Chain("discount_calculation", (), (Rule("set_min_price", {"price": "90"}),)),),
        priority=0,
    )
    floored = calculate(
        Snapshot.build([floor, discount_offer(4, "50", summable=True)]), cheque([line(1, "A", "100")])
    )
    assert floored.lines[0].amount_after_discount == D("90.00")


def test_set_min_price_outweighs_a_bigger_non_summable_discount() -> None:
    floor = Offer(1, "floor", (Chain("discount_calculation", (), (Rule("set_min_price", {"price": "95"}),)),))
    snap = Snapshot.build([floor, discount_offer(2, "50")])
    result = calculate(snap, cheque([line(1, "A", "100")]))
    assert result.lines[0].discount == 0 and result.applied_offers == [1]


def test_fixed_amount_and_price_per_unit_discounts() -> None:
    fixed = Offer(
        1,
        "300 off dairy",
        (
            Chain(
                "discount_calculation",
                (Rule("products", {"groups": ["dairy"]}),),
                (Rule("discount", {"kind": "amount", "value": "300"}),),
            ),
        ),
    )
    result = calculate(
        Snapshot.build([fixed]),
        cheque(
            [
                line(1, "M", "100", "2", groups=frozenset({"dairy"})),
                line(2, "K", "200", groups=frozenset({"dairy"})),
                line(3, "B", "50"),
            ]
        ),
    )
    assert [x.discount for x in result.lines] == [D("150.00"), D("150.00"), D("0")]
    unit = Offer(
        2,
        "450 each",
        (
            Chain(
                "discount_calculation",
                (Rule("products", {"skus": ["P"]}),),
                (Rule("discount", {"kind": "price_per_unit", "value": "450"}),),
            ),
        ),
    )
    result = calculate(Snapshot.build([unit]), cheque([line(1, "P", "500", "3")]))
    assert result.lines[0].amount_after_discount == D("1350.00")


def test_quantity_condition_on_products() -> None:
    three = Offer(
        1,
        "3 for 100",
        (
            Chain(
                "discount_calculation",
                (Rule("products", {"skus": ["P"], "min_quantity": "3"}),),
                (Rule("discount", {"kind": "price_per_unit", "value": "100"}),),
            ),
        ),
    )
    snap = Snapshot.build([three])
    assert calculate(snap, cheque([line(1, "P", "150", "2")])).discount_total == 0
    assert calculate(snap, cheque([line(1, "P", "150", "3")])).discount_total == D("150.00")


def test_write_off_is_capped_by_rule_balance_and_card() -> None:
    rule = Offer(
        1,
        "pay up to 30%",
        (
            Chain(
                "write_off",
                (),
                (
                    Rule(
                        "write_off_rule",
                        {"currency": "bonus", "max_percent": "30", "exclude_groups": ["alcohol"]},
                    ),
                ),
            ),
        ),
    )
    snap = Snapshot.build([rule])
    rich = MemberFacts(1, card_state="activated", can_spend=True, available={"bonus": D("1000")})
    result = calculate(
        snap,
        cheque(
            [line(1, "A", "100"), line(2, "W", "500", groups=frozenset({"alcohol"}))],
            member=rich,
            write_off=("bonus", "25"),
        ),
    )
    assert result.max_write_off == {"bonus": D("30.00")}
    assert result.lines[0].write_off == {"bonus": D("25.00")} and result.lines[1].write_off == {}
    poor = MemberFacts(1, card_state="activated", can_spend=True, available={"bonus": D("12.5")})
    assert calculate(snap, cheque([line(1, "A", "100")], member=poor)).max_write_off == {"bonus": D("12.50")}
    not_activated = MemberFacts(1, card_state="issued", can_spend=False, available={"bonus": D("1000")})
    assert calculate(snap, cheque([line(1, "A", "100")], member=not_activated)).max_write_off == {"bonus": 0}


def test_points_are_earned_on_what_is_paid_in_money() -> None:
    earn = Offer(
        1,
        "5% back",
        (
            Chain(
                "bonus_calculation",
                (),
                (
                    Rule(
                        "bonus",
                        {"kind": "percent", "value": "5", "lifetime_days": 365, "activation_delay_days": 14},
                    ),
                ),
            ),
        ),
    )
    pay = Offer(2, "pay", (Chain("write_off", (), (Rule("write_off_rule", {"max_percent": "50"}),)),))
    member = MemberFacts(1, card_state="activated", can_spend=True, available={"bonus": D("40")})
    result = calculate(
        Snapshot.build([earn, pay, discount_offer(3, "10")]),
        cheque([line(1, "A", "200")], member=member, write_off=("bonus", "40")),
    )
    # 200 - 20 discount - 40 points = 140 paid in money → 7 points, activating in 14 days
    assert result.bonus_total() == {"bonus": D("7.00")}
    assert (result.accruals[0].activation_delay_days, result.accruals[0].lifetime_days) == (14, 365)


def test_points_round_down_to_the_currency_precision() -> None:
    earn = Offer(
        1, "3%", (Chain("bonus_calculation", (), (Rule("bonus", {"value": "3", "currency": "stars"}),)),)
    )
    snap = Snapshot.build([earn], currency_precision={"bonus": 2, "stars": 0})
    assert calculate(snap, cheque([line(1, "A", "99.99")])).bonus_total() == {"stars": D("2")}


def test_member_filters_birthday_audience_attribute_and_time() -> None:
    member = MemberFacts(
        1,
        card_state="activated",
        audiences=frozenset({"vip"}),
        attributes={"birth_date": date(1990, 11, 28), "gender": "female", "children_count": 2},
    )
    filters = (
        Rule("birthday", {"within_days": 7}),
        Rule("audience", {"audiences": ["vip"]}),
        Rule("member_attribute", {"attribute": "gender", "op": "eq", "value": "female"}),
        Rule("member_attribute", {"attribute": "children_count", "op": "gte", "value": "2"}),
        Rule("days_of_week", {"days": [1, 2, 3, 4, 5]}),
        Rule("time_of_day", {"from": "10:00", "to": "14:00"}),
        Rule("card_state", {"states": ["activated"]}),
    )
    snap = Snapshot.build([discount_offer(1, "15", filters=filters)])
    assert calculate(snap, cheque([line(1, "A", "100")], member=member)).discount_total == D("15.00")
    evening = calculate(
        snap, cheque([line(1, "A", "100")], member=member, at=datetime(2026, 11, 23, 20)), explain=True
    )
    assert evening.discount_total == 0 and "time_of_day" in evening.explain[0].reason
    anonymous = calculate(snap, cheque([line(1, "A", "100")]), explain=True)
    assert anonymous.discount_total == 0 and "birth date unknown" in anonymous.explain[0].reason


def test_offer_period_limits_and_budget() -> None:
    dated = Offer(1, "December", discount_offer(1, "10").chains, starts_at=datetime(2026, 12, 1))
    used_up = Offer(2, "once", discount_offer(2, "10").chains, max_uses_per_member=1)
    broke = Offer(3, "budget", discount_offer(3, "10").chains, budget_remaining=D(0))
    member = MemberFacts(1, offer_uses={2: 1})
    result = calculate(
        Snapshot.build([dated, used_up, broke]), cheque([line(1, "A", "100")], member=member), explain=True
    )
    assert result.discount_total == 0
    reasons = " | ".join(e.reason for e in result.explain)
    assert "starts at" in reasons and "already used" in reasons and "budget spent" in reasons


def test_explain_lists_every_offer_and_why() -> None:
    snap = Snapshot.build([HYPERMARKET_10, discount_offer(5, "3"), ONLINE_PAYMENT_100])
    result = calculate(snap, cheque([line(1, "A", "100")]), explain=True)
    by_offer = {(e.offer_id, e.event): e for e in result.explain}
    assert by_offer[(1, "discount_calculation")].applied
    assert not by_offer[(5, "discount_calculation")].applied
    assert "taken by non-summable offer 1" in by_offer[(5, "discount_calculation")].reason
    assert not by_offer[(2, "bonus_calculation")].applied


def test_offline_mode_accrues_only() -> None:
    earn = Offer(1, "1%", (Chain("bonus_calculation", (), (Rule("bonus", {"value": "1"}),)),))
    result = calculate(
        Snapshot.build([earn, discount_offer(2, "50")]),
        cheque([line(1, "A", "100")]),
        discounts=False,
        write_off=False,
    )
    assert result.discount_total == 0 and result.bonus_total() == {"bonus": D("1.00")}


def test_messages_are_rendered_and_never_fail() -> None:
    msg = Offer(
        1,
        "hello",
        (
            Chain(
                "discount_calculation",
                (),
                (
                    Rule("cheque_message", {"text": "Hi {first_name}, you saved {discount}{oops}"}),
                    Rule("discount", {"value": "10"}),
                ),
            ),
        ),
    )
    member = MemberFacts(1, attributes={"first_name": "Anna"})
    result = calculate(Snapshot.build([msg]), cheque([line(1, "A", "100")], member=member))
    assert result.cheque_messages == ["Hi Anna, you saved 10.00"]
    assert render_message("{unclosed", {}) == "{unclosed"
