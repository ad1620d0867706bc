"""Today's offer engine (before the speed-up), kept verbatim as the oracle for the optimised one.

Only the data classes are imported from the real engine instead of being redefined, so results
of both can be compared field by field (``repr`` included, which shows each Decimal's exponent).
Do not optimise this file: it is the straightforward reference.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any

from omniloyal.offers.engine import (
    Accrual,
    Chain,
    Cheque,
    Explanation,
    Line,
    LineResult,
    MemberEvent,
    MemberFacts,
    Offer,
    Payment,
    Result,
    Rule,
)

ZERO = Decimal(0)
CENT = Decimal("0.01")
HUNDRED = Decimal(100)

PURCHASE_EVENTS = ("discount_calculation", "write_off", "bonus_calculation")
MEMBER_EVENTS = (
    "purchase_confirmed",
    "member_registered",
    "card_activated",
    "questionnaire_completed",
    "phone_linked",
    "mobile_app_installed",
    "birthday",
    "referral_purchase",
)
EVENTS = PURCHASE_EVENTS + MEMBER_EVENTS

# Actions each event may carry (the offers API refuses others).
EVENT_ACTIONS: dict[str, frozenset[str]] = {
    "discount_calculation": frozenset({"discount", "set_min_price", "cheque_message", "cashier_message"}),
    "write_off": frozenset({"write_off_rule", "cheque_message", "cashier_message"}),
    "bonus_calculation": frozenset({"bonus", "extra_bonus", "cheque_message", "cashier_message"}),
    **{event: frozenset({"extra_bonus", "cheque_message", "cashier_message"}) for event in MEMBER_EVENTS},
}
# Filters that need a cheque (the rest also work on member events).
CHEQUE_FILTERS = frozenset({"products", "cheque_amount", "payment_method"})

# Weight used to order non-summable chains after priority.
_WEIGHTS = {"set_min_price": 100}

# ---------------------------------------------------------------------------- compilation

# A cheque-level check: returns None when it passes, else why it failed.
Check = Callable[["_Context"], str | None]


@dataclass(slots=True)
class _Context:
    local_time: datetime
    store_code: str | None
    channel: str | None
    store_attributes: Mapping[str, Any]
    member: MemberFacts | None
    payments: tuple[Payment, ...]
    cheque_amount: Decimal
    exhausted_offers: frozenset[int] = frozenset()


def _as_set(values: Iterable[Any]) -> frozenset[str]:
    return frozenset(str(v) for v in values)


def _attr_values(value: Any) -> frozenset[str]:
    if isinstance(value, list | tuple | set | frozenset):
        return _as_set(value)
    if isinstance(value, bool):
        return frozenset({"true" if value else "false"})
    return frozenset({str(value)})


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "eq":
        return bool(left == right)
    if op == "neq":
        return bool(left != right)
    if op == "gt":
        return bool(left > right)
    if op == "gte":
        return bool(left >= right)
    if op == "lt":
        return bool(left < right)
    if op == "lte":
        return bool(left <= right)
    raise ValueError(f"unknown comparison {op!r}")


def _coerce_like(value: Any, sample: Any) -> Any:
    """Reads a filter's value as the type of the member's attribute value."""
    if isinstance(sample, bool):
        return value if isinstance(value, bool) else str(value).lower() in {"true", "1", "yes"}
    if isinstance(sample, int | float | Decimal):
        return Decimal(str(value))
    if isinstance(sample, datetime):
        return datetime.fromisoformat(str(value))
    if isinstance(sample, date):
        return date.fromisoformat(str(value))
    return str(value)


def _member_attr(member: MemberFacts, name: str) -> Any:
    value = member.attributes.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(str(value))
    return value


def _days_to_birthday(birth: date, today: date) -> int:
    for year in (today.year, today.year + 1):
        try:
            next_birthday = birth.replace(year=year)
        except ValueError:  # 29 February in a common year: celebrated on 1 March
            next_birthday = date(year, 3, 1)
        if next_birthday >= today:
            return (next_birthday - today).days
    return 366


def _parse_time(text: str) -> time:
    return time.fromisoformat(text)


def _compile_check(rule: Rule) -> Check | None:
    """Cheque-level filters as closures; ``None`` for line-level filters (products)."""
    p = rule.params
    kind = rule.type
    if kind == "stores":
        negate = bool(p.get("exclude", False))
        if "codes" in p:
            codes = _as_set(p["codes"])

            def by_code(ctx: _Context) -> str | None:
                inside = ctx.store_code in codes
                if inside != negate:
                    return None
                return f"store {ctx.store_code!r} {'is' if negate else 'is not'} in the list"

            return by_code
        attribute = str(p["attribute"])
        wanted = _as_set(p["values"])

        def by_attribute(ctx: _Context) -> str | None:
            value = ctx.store_attributes.get(attribute)
            inside = value is not None and bool(_attr_values(value) & wanted)
            if inside != negate:
                return None
            return (
                f"store {ctx.store_code!r} has {attribute}={value!r}, wanted {'not ' if negate else ''}"
                f"{sorted(wanted)}"
            )

        return by_attribute
    if kind == "channel":
        channels = _as_set(p["channels"])
        return lambda ctx: (
            None if ctx.channel in channels else f"channel {ctx.channel!r} not in {sorted(channels)}"
        )
    if kind == "payment_method":
        methods = _as_set(p["methods"])
        min_share = Decimal(str(p.get("min_share_percent", "0")))

        def by_payment(ctx: _Context) -> str | None:
            paid = sum((pay.amount for pay in ctx.payments if pay.method in methods), ZERO)
            if paid <= 0:
                return f"not paid by {sorted(methods)}"
            total = sum((pay.amount for pay in ctx.payments), ZERO)
            if min_share and total > 0 and paid * HUNDRED / total < min_share:
                return f"paid by {sorted(methods)} less than {min_share}% of the cheque"
            return None

        return by_payment
    if kind == "cheque_amount":
        low = Decimal(str(p["min"])) if p.get("min") is not None else None
        high = Decimal(str(p["max"])) if p.get("max") is not None else None

        def by_amount(ctx: _Context) -> str | None:
            if low is not None and ctx.cheque_amount < low:
                return f"cheque amount {ctx.cheque_amount} below {low}"
            if high is not None and ctx.cheque_amount > high:
                return f"cheque amount {ctx.cheque_amount} above {high}"
            return None

        return by_amount
    if kind == "days_of_week":
        days = frozenset(int(d) for d in p["days"])  # ISO: 1 = Monday
        return lambda ctx: (
            None
            if ctx.local_time.isoweekday() in days
            else f"weekday {ctx.local_time.isoweekday()} not in {sorted(days)}"
        )
    if kind == "time_of_day":
        start, end = _parse_time(str(p["from"])), _parse_time(str(p["to"]))

        def by_time(ctx: _Context) -> str | None:
            now = ctx.local_time.time()
            inside = start <= now < end if start <= end else (now >= start or now < end)
            return None if inside else f"local time {now:%H:%M} outside {start:%H:%M}-{end:%H:%M}"

        return by_time
    if kind == "dates":
        first = date.fromisoformat(str(p["from"])) if p.get("from") else None
        last = date.fromisoformat(str(p["to"])) if p.get("to") else None

        def by_dates(ctx: _Context) -> str | None:
            today = ctx.local_time.date()
            if (first and today < first) or (last and today > last):
                return f"date {today} outside {first or '…'}..{last or '…'}"
            return None

        return by_dates
    if kind == "members_only":
        return lambda ctx: None if ctx.member is not None else "buyer not identified"
    if kind == "card_state":
        states = _as_set(p["states"])

        def by_card_state(ctx: _Context) -> str | None:
            state = ctx.member.card_state if ctx.member else None
            return None if state in states else f"card state {state!r} not in {sorted(states)}"

        return by_card_state
    if kind == "cards":
        numbers = _as_set(p["numbers"])

        def by_card(ctx: _Context) -> str | None:
            number = ctx.member.card_number if ctx.member else None
            return None if number in numbers else "card not in the list"

        return by_card
    if kind == "audience":
        audiences = _as_set(p["audiences"])
        negate = bool(p.get("exclude", False))

        def by_audience(ctx: _Context) -> str | None:
            inside = ctx.member is not None and bool(ctx.member.audiences & audiences)
            if inside != negate:
                return None
            return f"member {'in' if negate else 'not in'} target audience {sorted(audiences)}"

        return by_audience
    if kind == "member_attribute":
        name = str(p["attribute"])
        op = str(p.get("op", "eq"))
        raw = p.get("values") if op in {"in", "not_in"} else p.get("value")

        def by_attribute_value(ctx: _Context) -> str | None:
            if ctx.member is None:
                return "buyer not identified"
            value = _member_attr(ctx.member, name)
            if op == "exists":
                return None if value not in (None, "", []) else f"{name} not filled"
            if value is None:
                return f"{name} not filled"
            if op in {"in", "not_in"}:
                inside = bool(_attr_values(value) & _as_set(raw or []))
                return None if inside == (op == "in") else f"{name}={value!r} {op} {raw!r} is false"
            try:
                ok = _compare(op, value, _coerce_like(raw, value))
            except (TypeError, ValueError, ArithmeticError):
                ok = False
            return None if ok else f"{name}={value!r} {op} {raw!r} is false"

        return by_attribute_value
    if kind == "birthday":
        within = p.get("within_days")
        this_month = bool(p.get("this_month", False))

        def by_birthday(ctx: _Context) -> str | None:
            birth = ctx.member.attributes.get("birth_date") if ctx.member else None
            if not isinstance(birth, date):
                return "birth date unknown"
            today = ctx.local_time.date()
            if this_month and birth.month != today.month:
                return "birthday not this month"
            if within is not None and _days_to_birthday(birth, today) > int(within):
                return f"birthday not within {within} days"
            return None

        return by_birthday
    if kind == "event_property":
        return None  # evaluated against the event's properties, see _event_property_checks
    if kind == "products":
        return None
    raise ValueError(f"unknown filter type {kind!r}")


@dataclass(slots=True)
class _ProductFilter:
    skus: frozenset[str]
    groups: frozenset[str]
    categories: tuple[str, ...]
    brands: frozenset[str]
    exclude_skus: frozenset[str]
    exclude_groups: frozenset[str]
    min_quantity: Decimal | None
    max_quantity: Decimal | None
    min_amount: Decimal | None

    @classmethod
    def build(cls, p: Mapping[str, Any]) -> _ProductFilter:
        def dec(key: str) -> Decimal | None:
            return Decimal(str(p[key])) if p.get(key) is not None else None

        return cls(
            skus=_as_set(p.get("skus", ())),
            groups=_as_set(p.get("groups", ())),
            categories=tuple(str(c) for c in p.get("categories", ())),
            brands=_as_set(p.get("brands", ())),
            exclude_skus=_as_set(p.get("exclude_skus", ())),
            exclude_groups=_as_set(p.get("exclude_groups", ())),
            min_quantity=dec("min_quantity"),
            max_quantity=dec("max_quantity"),
            min_amount=dec("min_amount"),
        )

    def matches(self, line: Line) -> bool:
        if line.sku in self.exclude_skus or (self.exclude_groups and line.groups & self.exclude_groups):
            return False
        if not (self.skus or self.groups or self.categories or self.brands):
            return True
        if line.sku in self.skus or (self.groups and line.groups & self.groups):
            return True
        if self.brands and line.brand in self.brands:
            return True
        path = line.category_path
        return bool(path) and any(path == c or path.startswith(c + " / ") for c in self.categories)  # type: ignore[union-attr]


def _check_event_properties(params: Mapping[str, Any], properties: Mapping[str, Any]) -> str | None:
    name = str(params["property"])
    wanted = _as_set(params.get("values", ()))
    value = properties.get(name)
    if value is None or not (_attr_values(value) & wanted):
        return f"event property {name}={value!r} not in {sorted(wanted)}"
    return None


class _CompiledChain:
    __slots__ = (
        "_line_cache",
        "actions",
        "chain_no",
        "checks",
        "event",
        "event_property_filters",
        "offer",
        "product_filters",
        "weight",
    )

    def __init__(self, offer: Offer, chain_no: int, chain: Chain) -> None:
        self.offer = offer
        self.chain_no = chain_no
        self.event = chain.event
        self.actions = chain.actions
        self.checks: list[tuple[str, Check]] = []
        self.product_filters: list[_ProductFilter] = []
        self.event_property_filters: list[Mapping[str, Any]] = []
        for rule in chain.filters:
            if rule.type == "products":
                self.product_filters.append(_ProductFilter.build(rule.params))
            elif rule.type == "event_property":
                self.event_property_filters.append(rule.params)
            else:
                check = _compile_check(rule)
                if check is not None:
                    self.checks.append((rule.type, check))
        self.weight = max((_WEIGHTS.get(a.type, 0) for a in chain.actions), default=0)
        # Whether a sku passes the product filters never changes within a snapshot.
        self._line_cache: dict[str, bool] = {}

    def failed_check(self, ctx: _Context) -> str | None:
        offer = self.offer
        if offer.starts_at is not None and ctx.local_time < offer.starts_at:
            return f"offer starts at {offer.starts_at.isoformat()} local time"
        if offer.ends_at is not None and ctx.local_time >= offer.ends_at:
            return f"offer ended at {offer.ends_at.isoformat()} local time"
        if (
            offer.max_uses_per_member is not None
            and ctx.member is not None
            and ctx.member.offer_uses.get(offer.id, 0) >= offer.max_uses_per_member
        ):
            return f"member already used this offer {offer.max_uses_per_member} time(s)"
        if (
            offer.budget_remaining is not None and offer.budget_remaining <= 0
        ) or offer.id in ctx.exhausted_offers:
            return "offer budget spent"
        for name, check in self.checks:
            reason = check(ctx)
            if reason is not None:
                return f"filter {name}: {reason}"
        return None

    def eligible_lines(self, lines: Sequence[Line]) -> tuple[list[int], str | None]:
        """Indexes of lines the chain touches, or why none qualifies."""
        if not self.product_filters:
            return list(range(len(lines))), None
        cache = self._line_cache
        chosen: list[int] = []
        for index, line in enumerate(lines):
            ok = cache.get(line.sku)
            if ok is None:
                ok = all(f.matches(line) for f in self.product_filters)
                if line.groups or line.category_path:
                    cache[line.sku] = ok
            if ok:
                chosen.append(index)
        if not chosen:
            return chosen, "filter products: no line matches"
        for f in self.product_filters:
            quantity = sum((lines[i].quantity for i in chosen), ZERO)
            amount = sum((lines[i].amount for i in chosen), ZERO)
            if f.min_quantity is not None and quantity < f.min_quantity:
                return [], f"filter products: quantity {quantity} below {f.min_quantity}"
            if f.max_quantity is not None and quantity > f.max_quantity:
                return [], f"filter products: quantity {quantity} above {f.max_quantity}"
            if f.min_amount is not None and amount < f.min_amount:
                return [], f"filter products: amount {amount} below {f.min_amount}"
        return chosen, None


@dataclass(slots=True)
class Snapshot:
    """Active offers compiled for evaluation; build once, evaluate many cheques."""

    offers: tuple[Offer, ...]
    by_event: dict[str, list[_CompiledChain]]
    currency_precision: dict[str, int]
    default_currency: str

    @classmethod
    def build(
        cls,
        offers: Iterable[Offer],
        *,
        currency_precision: Mapping[str, int] | None = None,
        default_currency: str = "bonus",
    ) -> Snapshot:
        offers = tuple(offers)
        by_event: dict[str, list[_CompiledChain]] = {}
        for offer in offers:
            for number, chain in enumerate(offer.chains):
                by_event.setdefault(chain.event, []).append(_CompiledChain(offer, number, chain))
        for chains in by_event.values():
            chains.sort(key=lambda c: (-c.offer.priority, -c.weight, c.offer.id, c.chain_no))
        return cls(offers, by_event, dict(currency_precision or {default_currency: 2}), default_currency)

    def points(self, currency: str, amount: Decimal) -> Decimal:
        """Rounds earned points down to the currency's precision (never give a fraction more)."""
        places = self.currency_precision.get(currency, 2)
        return amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)


# ---------------------------------------------------------------------------- helpers


def _money(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def _spread(total: Decimal, weights: Sequence[Decimal], quantum: Decimal = CENT) -> list[Decimal]:
    """Splits ``total`` over lines in proportion to ``weights``; parts sum exactly to ``total``."""
    base = sum(weights, ZERO)
    if not weights:
        return []
    if base <= 0:
        return [total] + [ZERO] * (len(weights) - 1) if weights else []
    parts = [(total * w / base).quantize(quantum, rounding=ROUND_DOWN) for w in weights]
    rest = total - sum(parts, ZERO)
    # The rounding remainder goes to the largest lines, one quantum each.
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    i = 0
    while rest >= quantum and order:
        parts[order[i % len(order)]] += quantum
        rest -= quantum
        i += 1
    return parts


class _SafeFormat(string.Formatter):
    def get_value(self, key: int | str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return kwargs.get(str(key), "")


_FORMATTER = _SafeFormat()


def render_message(template: str, values: Mapping[str, Any]) -> str:
    """``{first_name}``-style placeholders; unknown ones render empty, never fail a purchase."""
    try:
        return _FORMATTER.vformat(template, (), values)
    except (ValueError, IndexError, KeyError):
        return template


def _context_of(cheque: Cheque) -> _Context:
    return _Context(
        local_time=cheque.local_time,
        store_code=cheque.store_code,
        channel=cheque.channel,
        store_attributes=cheque.store_attributes,
        member=cheque.member,
        payments=cheque.payments,
        cheque_amount=sum((line.amount for line in cheque.lines), ZERO),
        exhausted_offers=cheque.exhausted_offers,
    )


@dataclass(slots=True)
class _Candidate:
    chain: _CompiledChain
    lines: list[int]
    benefit: Decimal


# ---------------------------------------------------------------------------- phases


def _discount_for(action: Rule, line: Line, current: Decimal, floor: Decimal) -> Decimal:
    """The discount one action gives one line whose amount is ``current`` now."""
    kind = action.params.get("kind", "percent")
    value = Decimal(str(action.params["value"]))
    if kind == "percent":
        discount = _money(current * value / HUNDRED)
    elif kind == "price_per_unit":
        discount = current - _money(value * line.quantity)
    else:  # "amount": per line share is computed by the caller
        discount = value
    return max(ZERO, min(discount, current - floor))


def _run_discounts(snapshot: Snapshot, cheque: Cheque, ctx: _Context, result: Result, explain: bool) -> None:
    lines = cheque.lines
    states = result.lines
    for index, line in enumerate(lines):
        states[index].floor = _money(line.min_price * line.quantity) if line.min_price is not None else ZERO
    candidates = _candidates(snapshot, "discount_calculation", lines, ctx, result, explain)

    def benefit(cand: _Candidate, only: Sequence[int] | None = None) -> Decimal:
        total = ZERO
        for action in cand.chain.actions:
            if action.type != "discount":
                continue
            targets = only if only is not None else cand.lines
            if action.params.get("kind") == "amount":
                total += min(
                    Decimal(str(action.params["value"])),
                    sum((states[i].amount_after_discount - states[i].floor for i in targets), ZERO),
                )
            elif action.params.get("kind", "percent") == "percent" and not any(
                states[i].floor for i in targets
            ):
                # Ranking only: the unrounded percent of the lines' sum orders offers the same way.
                value = Decimal(str(action.params["value"]))
                total += sum((states[i].amount - states[i].discount for i in targets), ZERO) * value / HUNDRED
            else:
                for i in targets:
                    st = states[i]
                    total += _discount_for(action, lines[i], st.amount_after_discount, st.floor)
        return total

    def apply(cand: _Candidate, targets: list[int]) -> None:
        before = sum((states[i].discount for i in targets), ZERO)
        for action in cand.chain.actions:
            if action.type == "set_min_price":
                for i in targets:
                    line = lines[i]
                    if "price" in action.params:
                        unit = Decimal(str(action.params["price"]))
                    else:
                        unit = line.price * Decimal(str(action.params["percent_of_price"])) / HUNDRED
                    states[i].floor = max(states[i].floor, min(line.amount, _money(unit * line.quantity)))
        for action in cand.chain.actions:
            if action.type != "discount":
                continue
            if action.params.get("kind") == "amount":
                room = [max(ZERO, states[i].amount_after_discount - states[i].floor) for i in targets]
                total = min(Decimal(str(action.params["value"])), sum(room, ZERO))
                for i, part in zip(targets, _spread(total, room), strict=True):
                    states[i].discount += min(part, states[i].amount_after_discount - states[i].floor)
            else:
                for i in targets:
                    st = states[i]
                    st.discount += _discount_for(action, lines[i], st.amount_after_discount, st.floor)
        given = sum((states[i].discount for i in targets), ZERO) - before
        if given:
            offer_id = cand.chain.offer.id
            result.offer_discounts[offer_id] = result.offer_discounts.get(offer_id, ZERO) + given

    _select_and_apply(candidates, benefit, apply, result, explain)


def _run_write_off(snapshot: Snapshot, cheque: Cheque, ctx: _Context, result: Result, explain: bool) -> None:
    lines = cheque.lines
    states = result.lines
    candidates = _candidates(snapshot, "write_off", lines, ctx, result, explain)
    # Per line and currency, the most of its amount the rules let points pay.
    caps: dict[str, list[Decimal]] = {}

    def rule_cap(action: Rule, i: int) -> Decimal:
        if lines[i].groups & _as_set(action.params.get("exclude_groups", ())):
            return ZERO
        share = Decimal(str(action.params.get("max_percent", 100)))
        return _money(states[i].amount_after_discount * share / HUNDRED)

    def benefit(cand: _Candidate, only: Sequence[int] | None = None) -> Decimal:
        return sum(
            (
                rule_cap(a, i)
                for a in cand.chain.actions
                if a.type == "write_off_rule"
                for i in (only or cand.lines)
            ),
            ZERO,
        )

    def apply(cand: _Candidate, targets: list[int]) -> None:
        for action in cand.chain.actions:
            if action.type != "write_off_rule":
                continue
            currency = str(action.params.get("currency", snapshot.default_currency))
            per_line = caps.setdefault(currency, [ZERO] * len(lines))
            for i in targets:
                per_line[i] = min(states[i].amount_after_discount, per_line[i] + rule_cap(action, i))

    applied: list[_Candidate] = []

    def apply_and_note(cand: _Candidate, targets: list[int]) -> None:
        applied.append(cand)
        apply(cand, targets)

    applied_before = set(result.applied_offers)
    _select_and_apply(candidates, benefit, apply_and_note, result, explain)
    member = cheque.member
    for currency, per_line in caps.items():
        available = member.available.get(currency, ZERO) if member is not None and member.can_spend else ZERO
        limit = min(sum(per_line, ZERO), max(ZERO, available))
        places = snapshot.currency_precision.get(currency, 2)
        limit = limit.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)
        result.max_write_off[currency] = limit
        for i, cap in enumerate(per_line):
            if cap > 0:
                states[i].max_write_off[currency] = cap
    wanted = cheque.write_off_currency
    requested = cheque.write_off_amount
    if wanted and requested > 0:
        granted = min(requested, result.max_write_off.get(wanted, ZERO))
        if granted > 0:
            for i, part in enumerate(_spread(granted, caps[wanted])):
                if part:
                    states[i].write_off[wanted] = part
            result.write_off[wanted] = granted
    # A rule that wrote nothing off is not applied (unless its offer applied in an earlier phase).
    rule_currencies: dict[int, set[str]] = {}
    for cand in candidates:
        for action in cand.chain.actions:
            if action.type == "write_off_rule" and cand.chain.offer.id in result.applied_offers:
                currency = str(action.params.get("currency", snapshot.default_currency))
                rule_currencies.setdefault(cand.chain.offer.id, set()).add(currency)
    unused = {
        offer_id
        for offer_id, currencies in rule_currencies.items()
        if not currencies & set(result.write_off) and offer_id not in applied_before
    }
    if unused:
        result.applied_offers[:] = [o for o in result.applied_offers if o not in unused]
        for st in states:
            st.offers[:] = [o for o in st.offers if o not in unused]
        for explanation in result.explain:
            if explanation.offer_id in unused and explanation.event == "write_off" and explanation.applied:
                explanation.applied = False
                explanation.reason = "no points written off"
                explanation.lines = []
        for cand in applied:
            if cand.chain.offer.id in unused:
                for action in cand.chain.actions:
                    text = str(action.params.get("text", ""))
                    if action.type == "cheque_message" and text in result.cheque_messages:
                        result.cheque_messages.remove(text)
                    elif action.type == "cashier_message" and text in result.cashier_messages:
                        result.cashier_messages.remove(text)


def _run_bonuses(snapshot: Snapshot, cheque: Cheque, ctx: _Context, result: Result, explain: bool) -> None:
    lines = cheque.lines
    states = result.lines

    def paid(i: int) -> Decimal:
        st = states[i]
        return st.amount_after_discount - sum(st.write_off.values(), ZERO)

    candidates = _candidates(snapshot, "bonus_calculation", lines, ctx, result, explain)

    def points_for(action: Rule, targets: Sequence[int]) -> list[tuple[int | None, str, Decimal]]:
        currency = str(action.params.get("currency", snapshot.default_currency))
        value = Decimal(str(action.params["value"]))
        if action.type == "extra_bonus":
            return [(None, currency, snapshot.points(currency, value))]
        if action.params.get("kind", "percent") == "percent":
            return [(i, currency, snapshot.points(currency, paid(i) * value / HUNDRED)) for i in targets]
        parts = _spread(snapshot.points(currency, value), [paid(i) for i in targets])
        return list(zip(targets, [currency] * len(targets), parts, strict=True))

    def benefit(cand: _Candidate, only: Sequence[int] | None = None) -> Decimal:
        return sum(
            (
                pts
                for a in cand.chain.actions
                if a.type in {"bonus", "extra_bonus"}
                for _, _, pts in points_for(a, only or cand.lines)
            ),
            ZERO,
        )

    def apply(cand: _Candidate, targets: list[int]) -> None:
        for action in cand.chain.actions:
            if action.type not in {"bonus", "extra_bonus"}:
                continue
            delay = int(action.params.get("activation_delay_days", 0) or 0)
            lifetime = action.params.get("lifetime_days")
            legal_entity = action.params.get("legal_entity")
            earned = ZERO
            for i, currency, pts in points_for(action, targets):
                if pts <= 0:
                    continue
                if i is not None:
                    states[i].bonus[currency] = states[i].bonus.get(currency, ZERO) + pts
                earned += pts
            if earned > 0:  # one accrual per offer action: what all its lines earned
                result.accruals.append(
                    Accrual(
                        str(action.params.get("currency", snapshot.default_currency)),
                        earned,
                        cand.chain.offer.id,
                        delay,
                        int(lifetime) if lifetime is not None else None,
                        str(legal_entity) if legal_entity else None,
                    )
                )

    _select_and_apply(candidates, benefit, apply, result, explain)


def _candidates(
    snapshot: Snapshot, event: str, lines: Sequence[Line], ctx: _Context, result: Result, explain: bool
) -> list[_Candidate]:
    found: list[_Candidate] = []
    for chain in snapshot.by_event.get(event, ()):
        reason = chain.failed_check(ctx)
        chosen: list[int] = []
        if reason is None:
            chosen, reason = chain.eligible_lines(lines)
        if reason is not None:
            if explain:
                result.explain.append(Explanation(chain.offer.id, chain.offer.name, event, False, reason))
            continue
        found.append(_Candidate(chain, chosen, ZERO))
    return found


def _select_and_apply(
    candidates: list[_Candidate],
    benefit: Callable[..., Decimal],
    apply: Callable[[_Candidate, list[int]], None],
    result: Result,
    explain: bool,
) -> None:
    non_summable = [c for c in candidates if not c.chain.offer.summable]
    for cand in non_summable:
        cand.benefit = benefit(cand)
    non_summable.sort(
        key=lambda c: (
            -c.chain.offer.priority,
            -c.chain.weight,
            -c.benefit,
            c.chain.offer.id,
            c.chain.chain_no,
        )
    )
    taken: dict[int, int] = {}
    for cand in non_summable:
        free = [i for i in cand.lines if i not in taken]
        if not free:
            if explain:
                winner = taken[cand.lines[0]]
                result.explain.append(
                    Explanation(
                        cand.chain.offer.id,
                        cand.chain.offer.name,
                        cand.chain.event,
                        False,
                        f"lines taken by non-summable offer {winner}",
                    )
                )
            continue
        for i in free:
            taken[i] = cand.chain.offer.id
        _apply(cand, free, apply, result, explain)
    for cand in candidates:
        if cand.chain.offer.summable:
            _apply(cand, cand.lines, apply, result, explain)


def _apply(
    cand: _Candidate,
    targets: list[int],
    apply: Callable[[_Candidate, list[int]], None],
    result: Result,
    explain: bool,
) -> None:
    apply(cand, targets)
    offer_id = cand.chain.offer.id
    for i in targets:
        offers = result.lines[i].offers
        if offer_id not in offers:
            offers.append(offer_id)
    if offer_id not in result.applied_offers:
        result.applied_offers.append(offer_id)
    _messages(cand.chain.actions, cand.chain.offer, result)
    if explain:
        result.explain.append(
            Explanation(
                offer_id,
                cand.chain.offer.name,
                cand.chain.event,
                True,
                "applied",
                [result.lines[i].line for i in targets],
            )
        )


def _messages(actions: Iterable[Rule], offer: Offer, result: Result) -> None:
    for action in actions:
        if action.type == "cheque_message":
            result.cheque_messages.append(str(action.params.get("text", "")))
        elif action.type == "cashier_message":
            result.cashier_messages.append(str(action.params.get("text", "")))


def _render_messages(result: Result, member: MemberFacts | None, default_currency: str) -> None:
    values: dict[str, Any] = {
        "discount": result.discount_total,
        "bonus": result.bonus_total().get(default_currency, ZERO),
        "amount": result.amount_total - result.discount_total,
    }
    if member is not None:
        values.update({k: v for k, v in member.attributes.items() if isinstance(v, str | int | Decimal)})
        values["balance"] = member.available.get(default_currency, ZERO)
        values["card"] = member.card_number or ""
    result.cheque_messages = [render_message(t, values) for t in result.cheque_messages]
    result.cashier_messages = [render_message(t, values) for t in result.cashier_messages]


# ---------------------------------------------------------------------------- entry points


def calculate(
    snapshot: Snapshot,
    cheque: Cheque,
    *,
    explain: bool = False,
    discounts: bool = True,
    write_off: bool = True,
) -> Result:
    """Discounts, write-off and points for one cheque.

    ``discounts=False, write_off=False`` is the offline-cheque mode: accrual only.
    """
    result = Result(lines=[LineResult(line.line, line.sku, line.amount) for line in cheque.lines])
    ctx = _context_of(cheque)
    if discounts:
        _run_discounts(snapshot, cheque, ctx, result, explain)
    if write_off:
        _run_write_off(snapshot, cheque, ctx, result, explain)
    _run_bonuses(snapshot, cheque, ctx, result, explain)
    _render_messages(result, cheque.member, snapshot.default_currency)
    return result


def evaluate_member_event(snapshot: Snapshot, event: MemberEvent, *, explain: bool = False) -> Result:
    """Points and messages for a member event (no cheque)."""
    result = Result(lines=[])
    ctx = _Context(
        event.local_time,
        event.store_code,
        event.channel,
        event.store_attributes,
        event.member,
        (),
        ZERO,
        event.exhausted_offers,
    )
    for chain in snapshot.by_event.get(event.event, ()):
        reason = chain.failed_check(ctx)
        if reason is None and chain.product_filters:
            reason = "filter products: the event has no cheque"
        if reason is None:
            for params in chain.event_property_filters:
                reason = _check_event_properties(params, event.properties)
                if reason:
                    reason = f"filter event_property: {reason}"
                    break
        if reason is not None:
            if explain:
                result.explain.append(
                    Explanation(chain.offer.id, chain.offer.name, event.event, False, reason)
                )
            continue
        for action in chain.actions:
            if action.type == "extra_bonus":
                currency = str(action.params.get("currency", snapshot.default_currency))
                lifetime = action.params.get("lifetime_days")
                result.accruals.append(
                    Accrual(
                        currency,
                        snapshot.points(currency, Decimal(str(action.params["value"]))),
                        chain.offer.id,
                        int(action.params.get("activation_delay_days", 0) or 0),
                        int(lifetime) if lifetime is not None else None,
                        str(action.params["legal_entity"]) if action.params.get("legal_entity") else None,
                    )
                )
        _messages(chain.actions, chain.offer, result)
        if chain.offer.id not in result.applied_offers:
            result.applied_offers.append(chain.offer.id)
        if explain:
            result.explain.append(Explanation(chain.offer.id, chain.offer.name, event.event, True, "applied"))
    _render_messages(result, event.member, snapshot.default_currency)
    return result
