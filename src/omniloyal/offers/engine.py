"""The offer engine: an offers snapshot and a cheque in, discounts, points and messages out.

Pure: no I/O, no clock, no database. The caller resolves everything the engine needs (store
attributes, product groups of each line, member facts, usage counters) into plain data, so
one calculation can be tested, replayed and benchmarked alone.

A purchase is calculated in three phases, each an *event* offers' chains listen to:

1. ``discount_calculation``: discounts and minimum prices;
2. ``write_off``: how much of each line may be paid with points (the member asks for an amount);
3. ``bonus_calculation``: points earned on what is left to pay in money.

In every phase a cheque line gets at most one non-summable chain, chosen by priority, then
weight (set-minimum-price wins), then the larger benefit over the whole cheque, then the lower
offer id; then every matching summable chain applies as well. A line never goes below its
minimum price. Member events (``mobile_app_installed``...) run the same filters and actions
without a cheque (:func:`evaluate_member_event`).
"""

from __future__ import annotations

import string
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any

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


# ---------------------------------------------------------------------------- input data


@dataclass(frozen=True, slots=True)
class Rule:
    """A filter or an action: its type and validated parameters."""

    type: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Chain:
    event: str
    filters: tuple[Rule, ...] = ()
    actions: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class Offer:
    id: int
    name: str
    chains: tuple[Chain, ...]
    priority: int = 0
    summable: bool = False
    # Naive datetimes in the store's local time: an offer from 12:00 starts at 12:00 everywhere.
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    max_uses_per_member: int | None = None
    # What is left of the offer's budget (points or money); None = unlimited.
    budget_remaining: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Line:
    line: int
    sku: str
    price: Decimal
    quantity: Decimal
    amount: Decimal
    min_price: Decimal | None = None
    category_path: str | None = None
    brand: str | None = None
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Payment:
    method: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class MemberFacts:
    id: int
    card_number: str | None = None
    card_state: str | None = None  # prepared | issued | activated
    can_spend: bool = False  # an activated, unblocked card (or identified without card)
    audiences: frozenset[str] = frozenset()
    # questionnaire and custom attributes by name: gender, city, birth_date (date), ...
    attributes: Mapping[str, Any] = field(default_factory=dict)
    available: Mapping[str, Decimal] = field(default_factory=dict)  # spendable points per currency
    offer_uses: Mapping[int, int] = field(default_factory=dict)  # times each offer applied to them


@dataclass(frozen=True, slots=True)
class Cheque:
    """Everything about one purchase the engine may look at."""

    local_time: datetime  # naive, the store's wall clock
    store_code: str
    channel: str
    store_attributes: Mapping[str, Any]
    lines: tuple[Line, ...]
    payments: tuple[Payment, ...] = ()
    member: MemberFacts | None = None
    write_off_currency: str | None = None
    write_off_amount: Decimal = ZERO
    # Offers whose budget the caller found spent (budgets change with every purchase).
    exhausted_offers: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A member event (app installed, card activated...) with the same store/time context."""

    event: str
    local_time: datetime
    member: MemberFacts
    store_code: str | None = None
    channel: str | None = None
    store_attributes: Mapping[str, Any] = field(default_factory=dict)
    properties: Mapping[str, Any] = field(default_factory=dict)
    exhausted_offers: frozenset[int] = frozenset()


# ---------------------------------------------------------------------------- results


@dataclass(slots=True)
class Accrual:
    """Points to book on confirm."""

    currency: str
    amount: Decimal
    offer_id: int
    activation_delay_days: int = 0
    lifetime_days: int | None = None
    legal_entity: str | None = None
    line: int | None = None  # None: for the whole cheque / event


@dataclass(slots=True)
class LineResult:
    line: int
    sku: str
    amount: Decimal
    discount: Decimal = ZERO
    write_off: dict[str, Decimal] = field(default_factory=dict)
    bonus: dict[str, Decimal] = field(default_factory=dict)
    max_write_off: dict[str, Decimal] = field(default_factory=dict)
    offers: list[int] = field(default_factory=list)
    floor: Decimal = ZERO

    @property
    def amount_after_discount(self) -> Decimal:
        return self.amount - self.discount


@dataclass(slots=True)
class Explanation:
    offer_id: int
    offer_name: str
    event: str
    applied: bool
    reason: str
    lines: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Result:
    lines: list[LineResult]
    accruals: list[Accrual] = field(default_factory=list)
    cheque_messages: list[str] = field(default_factory=list)
    cashier_messages: list[str] = field(default_factory=list)
    applied_offers: list[int] = field(default_factory=list)
    explain: list[Explanation] = field(default_factory=list)
    max_write_off: dict[str, Decimal] = field(default_factory=dict)
    write_off: dict[str, Decimal] = field(default_factory=dict)
    # Money each offer took off the cheque (its budget's spending), by offer id.
    offer_discounts: dict[int, Decimal] = field(default_factory=dict)

    @property
    def discount_total(self) -> Decimal:
        return sum((line.discount for line in self.lines), ZERO)

    @property
    def amount_total(self) -> Decimal:
        return sum((line.amount for line in self.lines), ZERO)

    def bonus_total(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = {}
        for accrual in self.accruals:
            totals[accrual.currency] = totals.get(accrual.currency, ZERO) + accrual.amount
        return totals


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
        # Checked on every cheque: the reasons are written once.
        not_paid = f"not paid by {sorted(methods)}"
        too_little = f"paid by {sorted(methods)} less than {min_share}% of the cheque"

        def by_payment(ctx: _Context) -> str | None:
            paid = sum((pay.amount for pay in ctx.payments if pay.method in methods), ZERO)
            if paid <= 0:
                return not_paid
            total = sum((pay.amount for pay in ctx.payments), ZERO)
            if min_share and total > 0 and paid * HUNDRED / total < min_share:
                return too_little
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

        outside = f"member {'in' if negate else 'not in'} target audience {sorted(audiences)}"

        def by_audience(ctx: _Context) -> str | None:
            inside = ctx.member is not None and bool(ctx.member.audiences & audiences)
            return None if inside != negate else outside

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


# ---------------------------------------------------------------------------- compiled offers

# Filters whose verdict depends only on the store, the channel and the local date and time: it is
# decided once per such context and cached (see _Index.plans_for). The other filters read the member
# or the cheque and run per calculation (each distinct one once, see _applies).
_CONTEXT_FILTERS = frozenset({"stores", "channel", "days_of_week", "time_of_day", "dates"})
# Action types each purchase phase reads (others on a chain of that event are ignored, as always).
_PHASE_ACTIONS = {
    "discount_calculation": frozenset({"discount", "set_min_price"}),
    "write_off": frozenset({"write_off_rule"}),
    "bonus_calculation": frozenset({"bonus", "extra_bonus"}),
}
# Up to this many significant digits a percentage ``v`` gives exactly the same amounts as
# ``x * v / 100`` when computed as ``x * (v / 100)`` (no rounding at 28 digits for x below 10^12).
_EXACT_DIGITS = 14


def _dec(value: Any) -> Decimal:
    return Decimal(str(value))


def _check_key(rule: Rule) -> str:
    """Identical filters (same type and parameters) are evaluated once per cheque."""
    try:
        params = repr(sorted(rule.params.items()))
    except TypeError:
        params = repr(rule.params)
    return f"{rule.type}:{params}"


class _Action:
    """An action whose parameters are read once per snapshot: the hot loops never parse ``params``."""

    __slots__ = (
        "currency",
        "delay",
        "exact",
        "exclude_groups",
        "factor",
        "kind",
        "legal_entity",
        "lifetime",
        "memo",
        "percent_of_price",
        "points",
        "price",
        "quantum",
        "type",
        "value",
    )

    def __init__(self, rule: Rule, default_currency: str, precision: Mapping[str, int]) -> None:
        p = rule.params
        self.type = rule.type
        self.kind: Any = p.get("kind", "percent")
        self.value = ZERO
        self.price: Decimal | None = None
        self.percent_of_price = ZERO
        self.exclude_groups: frozenset[str] = frozenset()
        self.currency = str(p.get("currency", default_currency))
        self.quantum = Decimal(1).scaleb(-precision.get(self.currency, 2))
        self.delay = 0
        self.lifetime: int | None = None
        self.legal_entity: str | None = None
        self.points = ZERO
        if rule.type == "set_min_price":
            if "price" in p:
                self.price = _dec(p["price"])
            else:
                self.percent_of_price = _dec(p["percent_of_price"])
        elif rule.type == "write_off_rule":
            self.value = _dec(p.get("max_percent", 100))  # the share of a line points may pay
            self.exclude_groups = _as_set(p.get("exclude_groups", ()))
        else:  # discount, bonus, extra_bonus
            self.value = _dec(p["value"])
            self.delay = int(p.get("activation_delay_days", 0) or 0)
            lifetime = p.get("lifetime_days")
            self.lifetime = int(lifetime) if lifetime is not None else None
            self.legal_entity = str(p["legal_entity"]) if p.get("legal_entity") else None
            if rule.type != "discount":
                # What a fixed bonus or an extra bonus gives: rounded down to the currency's precision.
                self.points = self.value.quantize(self.quantum, ROUND_DOWN)
        self.factor = self.value / HUNDRED
        self.exact = len(self.value.as_tuple().digits) <= _EXACT_DIGITS
        # Actions giving every line the same cap or points share one number (set by _Index), so
        # each is computed once per cheque and reused for benefits and by every chain.
        self.memo = -1

    def line_values_key(self) -> tuple[Any, ...]:
        # Strings, not Decimals: 5 == 5.0, but only the same spelling is the same computation.
        return (self.type, self.kind, str(self.value), str(self.quantum), self.exclude_groups)


class _CompiledChain:
    __slots__ = (
        "actions",
        "bonus_actions",
        "cashier_texts",
        "chain_no",
        "checks",
        "cheque_texts",
        "context_checks",
        "context_rules",
        "discount_actions",
        "error",
        "event",
        "event_property_filters",
        "floor_actions",
        "guarded",
        "max_uses",
        "member_checks",
        "offer",
        "offer_id",
        "priority",
        "product_filters",
        "product_no",
        "quantity_filters",
        "sole",
        "summable",
        "weight",
        "write_off_actions",
    )

    def __init__(
        self,
        offer: Offer,
        chain_no: int,
        chain: Chain,
        default_currency: str = "bonus",
        currency_precision: Mapping[str, int] | None = None,
    ) -> None:
        self.offer = offer
        self.offer_id = offer.id
        self.priority = offer.priority
        self.summable = offer.summable
        self.max_uses = offer.max_uses_per_member
        self.chain_no = chain_no
        self.event = chain.event
        self.actions = chain.actions
        # Every cheque-level filter in declaration order (explanations name the first that fails)...
        self.checks: list[tuple[str, Check]] = []
        # ...split into those decided by the store/channel/time context and those read per cheque.
        self.context_checks: list[Check] = []
        self.context_rules: list[Rule] = []
        self.member_checks: list[tuple[str, Check]] = []
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
                    if rule.type in _CONTEXT_FILTERS:
                        self.context_checks.append(check)
                        self.context_rules.append(rule)
                    else:
                        self.member_checks.append((_check_key(rule), check))
        self.quantity_filters = [
            f
            for f in self.product_filters
            if f.min_quantity is not None or f.max_quantity is not None or f.min_amount is not None
        ]
        self.product_no = -1  # position among the snapshot's product-filtered chains (set by _Index)
        self.sole = False  # the offer's only chain: it can list the offer on a line once (set by _Index)
        self.weight = max((_WEIGHTS.get(a.type, 0) for a in chain.actions), default=0)
        self.cheque_texts = tuple(
            str(a.params.get("text", "")) for a in chain.actions if a.type == "cheque_message"
        )
        self.cashier_texts = tuple(
            str(a.params.get("text", "")) for a in chain.actions if a.type == "cashier_message"
        )
        self.discount_actions: list[_Action] = []
        self.floor_actions: list[_Action] = []
        self.write_off_actions: list[_Action] = []
        self.bonus_actions: list[_Action] = []
        # A malformed action fails the cheques the chain would apply to, not the whole snapshot.
        self.error: Exception | None = None
        wanted = _PHASE_ACTIONS.get(chain.event, frozenset())
        try:
            for rule in chain.actions:
                if rule.type in wanted:
                    action = _Action(rule, default_currency, currency_precision or {default_currency: 2})
                    if rule.type == "discount":
                        self.discount_actions.append(action)
                    elif rule.type == "set_min_price":
                        self.floor_actions.append(action)
                    elif rule.type == "write_off_rule":
                        self.write_off_actions.append(action)
                    else:
                        self.bonus_actions.append(action)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            self.error = exc
        # Whether applying needs more than the context plan and the product index (see _applies).
        self.guarded = bool(
            self.member_checks or self.max_uses is not None or self.quantity_filters or self.error is not None
        )

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

    def passes_context(self, ctx: _Context) -> bool:
        """The part of :meth:`failed_check` that only depends on the store, channel and local time."""
        offer = self.offer
        if offer.starts_at is not None and ctx.local_time < offer.starts_at:
            return False
        if offer.ends_at is not None and ctx.local_time >= offer.ends_at:
            return False
        if offer.budget_remaining is not None and offer.budget_remaining <= 0:
            return False
        return all(check(ctx) is None for check in self.context_checks)


def _quantity_failure(chain: _CompiledChain, lines: Sequence[Line], chosen: list[int]) -> str | None:
    for f in chain.quantity_filters:
        quantity = sum((lines[i].quantity for i in chosen), ZERO)
        amount = sum((lines[i].amount for i in chosen), ZERO)
        if f.min_quantity is not None and quantity < f.min_quantity:
            return f"filter products: quantity {quantity} below {f.min_quantity}"
        if f.max_quantity is not None and quantity > f.max_quantity:
            return f"filter products: quantity {quantity} above {f.max_quantity}"
        if f.min_amount is not None and amount < f.min_amount:
            return f"filter products: amount {amount} below {f.min_amount}"
    return None


class _EventPlan:
    """The chains of one purchase event that pass the context filters, in evaluation order."""

    __slots__ = ("groups", "summable")

    def __init__(
        self, groups: tuple[tuple[_CompiledChain, ...], ...], summable: tuple[_CompiledChain, ...]
    ) -> None:
        # Non-summable chains in groups of equal (priority, weight), best group first, each by offer id.
        self.groups = groups
        self.summable = summable


_Plans = dict[str, _EventPlan]
_MAX_PLANS = 4096  # contexts (store x channel x day x time slice) kept per snapshot
_MAX_PRODUCTS = 200_000  # products whose matching chains are kept per snapshot


class _Index:
    """Snapshot-wide lookups that let a cheque visit only the chains that can apply to it.

    * ``plans``: per context (store code and the store attributes filters read, channel, local date
      and the slice of the day between two filter boundaries) the chains passing the context filters;
    * ``products``: per product (sku, groups, category, brand) the product-filtered chains it matches.
    Both are plain dicts filled on first use; concurrent fills compute the same value (GIL-safe).
    """

    __slots__ = (
        "attribute_names",
        "boundaries",
        "by_event",
        "non_summable",
        "plans",
        "product_chains",
        "products",
        "uses_channel",
        "uses_date",
        "uses_store_code",
    )

    def __init__(self, by_event: Mapping[str, list[_CompiledChain]]) -> None:
        self.by_event = by_event
        self.non_summable = {
            event: sorted(
                (c for c in by_event.get(event, ()) if not c.summable),
                key=lambda c: (-c.priority, -c.weight, c.offer_id, c.chain_no),
            )
            for event in PURCHASE_EVENTS
        }
        self.product_chains: list[_CompiledChain] = []
        names: dict[str, None] = {}
        boundaries: set[time] = set()
        self.uses_store_code = self.uses_channel = self.uses_date = False
        chains_of: dict[int, int] = {}
        for chains in by_event.values():
            for chain in chains:
                chains_of[chain.offer_id] = chains_of.get(chain.offer_id, 0) + 1
        memos: dict[tuple[Any, ...], int] = {}
        for event in PURCHASE_EVENTS:
            for chain in by_event.get(event, ()):
                chain.sole = chains_of[chain.offer_id] == 1
                for action in chain.write_off_actions + chain.bonus_actions:
                    action.memo = memos.setdefault(action.line_values_key(), len(memos))
                if chain.product_filters:
                    chain.product_no = len(self.product_chains)
                    self.product_chains.append(chain)
                for moment in (chain.offer.starts_at, chain.offer.ends_at):
                    if moment is not None:
                        self.uses_date = True
                        boundaries.add(moment.time())
                for rule in chain.context_rules:
                    if rule.type == "stores":
                        if "codes" in rule.params:
                            self.uses_store_code = True
                        else:
                            names[str(rule.params["attribute"])] = None
                    elif rule.type == "channel":
                        self.uses_channel = True
                    elif rule.type == "time_of_day":
                        boundaries.update(_parse_time(str(rule.params[k])) for k in ("from", "to"))
                    else:  # dates, days_of_week
                        self.uses_date = True
        self.attribute_names = tuple(names)
        self.boundaries = sorted(boundaries)
        self.plans: dict[tuple[Any, ...], _Plans] = {}
        self.products: dict[tuple[Any, ...], tuple[int, ...]] = {}

    def plans_for(self, cheque: Cheque, ctx: _Context) -> _Plans:
        attrs = cheque.store_attributes
        values: list[Any] = []
        for name in self.attribute_names:
            value = attrs.get(name)
            values.append(value if value is None or type(value) is str else _attr_values(value))
        moment = cheque.local_time
        key = (
            cheque.store_code if self.uses_store_code else None,
            tuple(values),
            cheque.channel if self.uses_channel else None,
            moment.date() if self.uses_date else None,
            # Between two consecutive boundaries (time-of-day limits, offer start/end times) every
            # time filter gives the same answer, so the slice number stands for the time.
            bisect_right(self.boundaries, moment.time()) if self.boundaries else 0,
        )
        plans = self.plans.get(key)
        if plans is None:
            plans = {}
            for event in PURCHASE_EVENTS:
                groups: list[list[_CompiledChain]] = []
                rank: tuple[int, int] | None = None
                for chain in self.non_summable[event]:
                    if chain.passes_context(ctx):
                        if (chain.priority, chain.weight) != rank:
                            rank = (chain.priority, chain.weight)
                            groups.append([])
                        groups[-1].append(chain)
                summable = tuple(
                    c for c in self.by_event.get(event, ()) if c.summable and c.passes_context(ctx)
                )
                plans[event] = _EventPlan(tuple(tuple(g) for g in groups), summable)
            if len(self.plans) >= _MAX_PLANS:
                self.plans.clear()
            self.plans[key] = plans
        return plans

    def lines_by_chain(self, lines: Sequence[Line]) -> list[list[int] | None]:
        """For each product-filtered chain (by ``product_no``) the indexes of the lines it matches.

        A list by position, not a dict: indexing it is cheaper, and it is built on every cheque.
        """
        by_chain: list[list[int] | None] = [None] * len(self.product_chains)
        if not by_chain:
            return by_chain
        products = self.products
        for i, line in enumerate(lines):
            key = (line.sku, line.groups, line.category_path, line.brand)
            try:
                hits = products.get(key)
            except TypeError:  # unhashable groups (a plain set): match without caching
                hits = self._matches(line)
            else:
                if hits is None:
                    hits = self._matches(line)
                    if len(products) >= _MAX_PRODUCTS:
                        products.clear()
                    products[key] = hits
            for no in hits:
                got = by_chain[no]
                if got is None:
                    by_chain[no] = [i]
                else:
                    got.append(i)
        return by_chain

    def _matches(self, line: Line) -> tuple[int, ...]:
        return tuple(
            c.product_no for c in self.product_chains if all(f.matches(line) for f in c.product_filters)
        )


@dataclass(slots=True)
class Snapshot:
    """Active offers compiled for evaluation; build once, evaluate many cheques."""

    offers: tuple[Offer, ...]
    by_event: dict[str, list[_CompiledChain]]
    currency_precision: dict[str, int]
    default_currency: str
    _index: _Index = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = _Index(self.by_event)

    @classmethod
    def build(
        cls,
        offers: Iterable[Offer],
        *,
        currency_precision: Mapping[str, int] | None = None,
        default_currency: str = "bonus",
    ) -> Snapshot:
        offers = tuple(offers)
        precision = dict(currency_precision or {default_currency: 2})
        by_event: dict[str, list[_CompiledChain]] = {}
        for offer in offers:
            for number, chain in enumerate(offer.chains):
                by_event.setdefault(chain.event, []).append(
                    _CompiledChain(offer, number, chain, default_currency, precision)
                )
        for chains in by_event.values():
            chains.sort(key=lambda c: (-c.offer.priority, -c.weight, c.offer.id, c.chain_no))
        return cls(offers, by_event, precision, default_currency)

    def points(self, currency: str, amount: Decimal) -> Decimal:
        """Rounds earned points down to the currency's precision (never give a fraction more)."""
        places = self.currency_precision.get(currency, 2)
        return amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)


# ---------------------------------------------------------------------------- helpers


# 10^-places for the usual currency precisions, not rebuilt on every cheque.
_QUANTA = {places: Decimal(1).scaleb(-places) for places in range(9)}


def _quantum(places: int) -> Decimal:
    return _QUANTA.get(places) or Decimal(1).scaleb(-places)


def _money(value: Decimal) -> Decimal:
    return value.quantize(CENT, ROUND_HALF_UP)


def _spread(total: Decimal, weights: Sequence[Decimal], quantum: Decimal = CENT) -> list[Decimal]:
    """Splits ``total`` over lines in proportion to ``weights``; parts sum exactly to ``total``."""
    base = sum(weights, ZERO)
    if not weights:
        return []
    if base <= 0:
        return [total] + [ZERO] * (len(weights) - 1)
    parts = [(total * w / base).quantize(quantum, ROUND_DOWN) for w in weights]
    rest = total - sum(parts, ZERO)
    if rest >= quantum:
        # The rounding remainder goes to the largest lines, one quantum each (equal weights: the
        # first line first; a reversed sort keeps equal keys in order).
        order = sorted(range(len(weights)), key=weights.__getitem__, reverse=True)
        for i in range(int(rest // quantum)):  # as many quanta as the remainder holds, exactly
            parts[order[i % len(order)]] += quantum
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


def _context_of(cheque: Cheque, amounts: list[Decimal]) -> _Context:
    # Positional: built on every cheque, and keywords cost a dataclass call twice as much.
    return _Context(
        cheque.local_time,
        cheque.store_code,
        cheque.channel,
        cheque.store_attributes,
        cheque.member,
        cheque.payments,
        sum(amounts, ZERO),
        cheque.exhausted_offers,
    )


# ---------------------------------------------------------------------------- selection

# A chain's benefit over the lines it matches (ranking only).
_Benefit = Callable[[_CompiledChain, list[int]], Decimal]
# The chains a phase applies, in order, each with the indexes of the lines it applies to.
_Selection = list[tuple[_CompiledChain, list[int]]]


class _Run:
    """One calculation's working state, shared by its three phases."""

    __slots__ = (
        "all_lines",
        "amounts",
        "by_chain",
        "cheque",
        "ctx",
        "exhausted",
        "explain",
        "lines",
        "member",
        "memo",
        "offers_of",
        "paid",
        "plans",
        "result",
        "snapshot",
        "states",
    )

    def __init__(self, snapshot: Snapshot, cheque: Cheque, result: Result, explain: bool) -> None:
        self.snapshot = snapshot
        self.cheque = cheque
        self.lines = cheque.lines
        self.states = result.lines
        self.result = result
        self.explain = explain
        self.member = cheque.member
        self.exhausted = cheque.exhausted_offers
        self.amounts = [line.amount for line in cheque.lines]
        self.ctx = _context_of(cheque, self.amounts)
        index = snapshot._index
        # Explanations need every chain's reason, so explain mode walks all chains.
        self.plans = None if explain else index.plans_for(cheque, self.ctx)
        self.by_chain = index.lines_by_chain(cheque.lines)
        self.all_lines = list(range(len(cheque.lines)))  # shared, never mutated
        self.memo: dict[str, bool] = {}  # per-cheque filter verdicts by filter key
        self.offers_of = [st.offers for st in result.lines]
        # What is left to pay in money on each line, once the write-off phase ran.
        self.paid: list[Decimal] | None = None


def _lines_of(run: _Run, chain: _CompiledChain) -> tuple[list[int], str | None]:
    """Indexes of lines the chain touches, or why none qualifies."""
    if chain.product_no < 0:
        return run.all_lines, None
    chosen = run.by_chain[chain.product_no]
    if chosen is None:
        return [], "filter products: no line matches"
    if chain.quantity_filters:
        reason = _quantity_failure(chain, run.lines, chosen)
        if reason is not None:
            return [], reason
    return chosen, None


def _applies(run: _Run, chain: _CompiledChain) -> list[int] | None:
    """Fast path for a chain that passed the context filters: the lines it touches, or None."""
    if chain.offer_id in run.exhausted:
        return None
    member = run.member
    if (
        chain.max_uses is not None
        and member is not None
        and member.offer_uses.get(chain.offer_id, 0) >= chain.max_uses
    ):
        return None
    if chain.member_checks:
        memo = run.memo
        for key, check in chain.member_checks:
            ok = memo.get(key)
            if ok is None:
                ok = memo[key] = check(run.ctx) is None
            if not ok:
                return None
    if chain.product_no < 0:
        chosen: list[int] | None = run.all_lines
    else:
        chosen = run.by_chain[chain.product_no]
        if chosen is None or (chain.quantity_filters and _quantity_failure(chain, run.lines, chosen)):
            return None
    if chain.error is not None:
        raise chain.error
    return chosen


def _select(run: _Run, event: str, benefit: _Benefit) -> _Selection:
    """At most one non-summable chain per line (priority, weight, benefit, offer id), then summables.

    The fast path walks the groups of equal (priority, weight) best first and stops once every line
    is taken; benefits are computed only inside a group where two chains still compete for lines.
    ``benefit`` rates chains on the phase's starting state, so choosing never depends on applying:
    the phase applies the whole selection afterwards, in its order (one call, no callback per chain).
    """
    if run.explain:
        return _select_explained(run, event, benefit)
    assert run.plans is not None
    plan = run.plans[event]
    all_lines = run.all_lines
    by_chain = run.by_chain
    exhausted = run.exhausted
    count = len(all_lines)
    taken = [False] * count
    left = count
    selected: _Selection = []
    for group in plan.groups:
        if not left:
            break
        contenders: _Selection = []
        for chain in group:
            if chain.guarded:
                chosen = _applies(run, chain)
            elif exhausted and chain.offer_id in exhausted:
                continue
            else:  # the common case inlined: no member filter, limit or quantity condition
                chosen = all_lines if chain.product_no < 0 else by_chain[chain.product_no]
            if chosen is not None:
                if left == count:
                    contenders.append((chain, chosen))
                    continue
                for i in chosen:
                    if not taken[i]:
                        contenders.append((chain, chosen))
                        break
        if len(contenders) > 1:
            # Stable: equal benefits keep the group's offer id order.
            contenders.sort(key=lambda c: -benefit(c[0], c[1]))
        for chain, chosen in contenders:
            if chosen is all_lines and left == count:
                # The usual winner, a chain without product filter: it takes the whole cheque.
                left = 0
                selected.append((chain, chosen))
                break
            free = chosen if left == count else [i for i in chosen if not taken[i]]
            if free:
                for i in free:
                    taken[i] = True
                left -= len(free)
                selected.append((chain, free))
                if not left:
                    break
    for chain in plan.summable:
        if chain.guarded:
            chosen = _applies(run, chain)
        elif exhausted and chain.offer_id in exhausted:
            continue
        else:
            chosen = all_lines if chain.product_no < 0 else by_chain[chain.product_no]
        if chosen is not None:
            selected.append((chain, chosen))
    _record(run, selected)
    return selected


def _select_explained(run: _Run, event: str, benefit: _Benefit) -> _Selection:
    """Every chain with its reason: the straightforward selection, in the explanation's order."""
    result = run.result
    candidates: _Selection = []
    for chain in run.snapshot.by_event.get(event, ()):
        reason = chain.failed_check(run.ctx)
        chosen: list[int] = []
        if reason is None:
            chosen, reason = _lines_of(run, chain)
        if reason is not None:
            result.explain.append(Explanation(chain.offer_id, chain.offer.name, event, False, reason))
            continue
        if chain.error is not None:
            raise chain.error
        candidates.append((chain, chosen))
    ranked = [(chain, chosen, benefit(chain, chosen)) for chain, chosen in candidates if not chain.summable]
    ranked.sort(key=lambda c: (-c[0].priority, -c[0].weight, -c[2], c[0].offer_id, c[0].chain_no))
    taken: dict[int, int] = {}
    selected: _Selection = []
    for chain, chosen, _ in ranked:
        free = [i for i in chosen if i not in taken]
        if not free:
            reason = (
                f"lines taken by non-summable offer {taken[chosen[0]]}"
                if chosen
                else "the cheque has no lines"
            )
            result.explain.append(Explanation(chain.offer_id, chain.offer.name, chain.event, False, reason))
            continue
        for i in free:
            taken[i] = chain.offer_id
        selected.append((chain, free))
        _record(run, selected[-1:])  # now: explanations keep the order chains were considered in
    for chain, chosen in candidates:
        if chain.summable:
            selected.append((chain, chosen))
            _record(run, selected[-1:])
    return selected


def _record(run: _Run, selected: _Selection) -> None:
    """Lists the selected chains' offers on their lines and the result, with their messages."""
    offers_of = run.offers_of
    result = run.result
    for chain, targets in selected:
        offer_id = chain.offer_id
        if chain.sole:  # applied once per calculation: the offer cannot be listed yet
            if targets is run.all_lines:  # the common case, without indexing
                for offers in offers_of:
                    offers.append(offer_id)
            else:
                for i in targets:
                    offers_of[i].append(offer_id)
            result.applied_offers.append(offer_id)
        else:
            for i in targets:
                offers = offers_of[i]
                if offer_id not in offers:
                    offers.append(offer_id)
            if offer_id not in result.applied_offers:
                result.applied_offers.append(offer_id)
        if chain.cheque_texts:
            result.cheque_messages.extend(chain.cheque_texts)
        if chain.cashier_texts:
            result.cashier_messages.extend(chain.cashier_texts)
        if run.explain:
            result.explain.append(
                Explanation(
                    offer_id,
                    chain.offer.name,
                    chain.event,
                    True,
                    "applied",
                    [run.states[i].line for i in targets],
                )
            )


# ---------------------------------------------------------------------------- phases


def _discount_for(action: _Action, line: Line, current: Decimal, floor: Decimal) -> Decimal:
    """The discount one action gives one line whose amount is ``current`` now."""
    kind = action.kind
    if kind == "percent":
        discount = _money(current * action.value / HUNDRED)
    elif kind == "price_per_unit":
        discount = current - _money(action.value * line.quantity)
    else:  # "amount": per line share is computed by the caller
        discount = action.value
    return max(ZERO, min(discount, current - floor))


def _run_discounts(run: _Run) -> None:
    lines = run.lines
    states = run.states
    for line, st in zip(lines, states, strict=True):
        if line.min_price is not None:
            st.floor = _money(line.min_price * line.quantity)
    # The phase's starting point: benefits rank chains on it (no discount is applied yet).
    floors = [st.floor for st in states]
    has_floor = any(floors)
    amounts = run.amounts
    cheque_amount = run.ctx.cheque_amount
    all_lines = run.all_lines

    def benefit(chain: _CompiledChain, chosen: list[int]) -> Decimal:
        total = ZERO
        for action in chain.discount_actions:
            if action.kind == "amount":
                total += min(action.value, sum((amounts[i] - floors[i] for i in chosen), ZERO))
            elif action.kind == "percent" and not (has_floor and any(floors[i] for i in chosen)):
                # Ranking only: the unrounded percent of the lines' sum orders offers the same way.
                base = cheque_amount if chosen is all_lines else sum([amounts[i] for i in chosen], ZERO)
                total += base * action.value / HUNDRED
            else:
                for i in chosen:
                    total += _discount_for(action, lines[i], amounts[i], floors[i])
        return total

    offer_discounts = run.result.offer_discounts
    for chain, targets in _select(run, "discount_calculation", benefit):
        touched = states if targets is all_lines else [states[i] for i in targets]
        before = sum([st.discount for st in touched], ZERO)
        for action in chain.floor_actions:
            for i in targets:
                line = lines[i]
                st = states[i]
                if action.price is not None:
                    unit = action.price
                else:
                    unit = line.price * action.percent_of_price / HUNDRED
                st.floor = max(st.floor, min(line.amount, _money(unit * line.quantity)))
        for action in chain.discount_actions:
            if action.kind == "amount":
                room = [max(ZERO, states[i].amount - states[i].discount - states[i].floor) for i in targets]
                total = min(action.value, sum(room, ZERO))
                for i, part in zip(targets, _spread(total, room), strict=True):
                    st = states[i]
                    st.discount += min(part, st.amount - st.discount - st.floor)
            elif action.kind == "percent" and action.exact:
                # _discount_for inlined for the common case (same operations, same rounding).
                factor = action.factor
                for st in states if targets is all_lines else [states[i] for i in targets]:
                    # x - 0 is x: without a discount yet or a floor, no subtraction (the current
                    # amount's exponent only shows through the line's discount, already at most 0).
                    current = st.amount - st.discount if st.discount else st.amount
                    discount = (current * factor).quantize(CENT, ROUND_HALF_UP)
                    room_left = current - st.floor if st.floor else current
                    if room_left < discount:
                        discount = room_left
                    st.discount += discount if discount > ZERO else ZERO
            else:
                for i in targets:
                    st = states[i]
                    st.discount += _discount_for(action, lines[i], st.amount - st.discount, st.floor)
        given = sum([st.discount for st in touched], ZERO) - before
        if given:
            offer_id = chain.offer_id
            offer_discounts[offer_id] = offer_discounts.get(offer_id, ZERO) + given


def _run_write_off(run: _Run) -> None:
    lines = run.lines
    states = run.states
    all_lines = run.all_lines
    result = run.result
    # Applying write-off rules changes no line: what is left to pay is fixed for the phase.
    after = run.paid = [st.amount - st.discount for st in states]
    # Per line and currency, the most of its amount the rules let points pay.
    caps: dict[str, list[Decimal]] = {}
    rule_caps: dict[int, list[Decimal]] = {}

    def caps_of(action: _Action) -> list[Decimal]:
        """What one rule lets points pay on each line."""
        got = rule_caps.get(action.memo)
        if got is None:
            excluded = action.exclude_groups
            if action.exact and not excluded:  # the common case, as one comprehension
                factor = action.factor
                got = [(amount * factor).quantize(CENT, ROUND_HALF_UP) for amount in after]
            else:
                got = []
                for line, amount in zip(lines, after, strict=True):
                    if excluded and line.groups & excluded:
                        got.append(ZERO)
                    elif action.exact:
                        got.append((amount * action.factor).quantize(CENT, ROUND_HALF_UP))
                    else:
                        got.append(_money(amount * action.value / HUNDRED))
            rule_caps[action.memo] = got
        return got

    def benefit(chain: _CompiledChain, chosen: list[int]) -> Decimal:
        total = ZERO
        for action in chain.write_off_actions:
            per_line = caps_of(action)
            total += sum(per_line if chosen is all_lines else [per_line[i] for i in chosen], ZERO)
        return total

    applied_before = set(result.applied_offers)
    selected = _select(run, "write_off", benefit)
    for chain, targets in selected:
        for action in chain.write_off_actions:
            per_line = caps.get(action.currency)
            if per_line is None:
                per_line = caps[action.currency] = [ZERO] * len(lines)
            rule = caps_of(action)
            for i in targets:
                cap = per_line[i] + rule[i]
                per_line[i] = cap if cap < after[i] else after[i]
    member = run.member
    precision = run.snapshot.currency_precision
    for currency, per_line in caps.items():
        available = member.available.get(currency, ZERO) if member is not None and member.can_spend else ZERO
        limit = min(sum(per_line, ZERO), max(ZERO, available))
        limit = limit.quantize(_quantum(precision.get(currency, 2)), rounding=ROUND_DOWN)
        result.max_write_off[currency] = limit
        for st, cap in zip(states, per_line, strict=True):
            if cap > ZERO:
                st.max_write_off[currency] = cap
    wanted = run.cheque.write_off_currency
    requested = run.cheque.write_off_amount
    if wanted and requested > 0:
        granted = min(requested, result.max_write_off.get(wanted, ZERO))
        if granted > 0:
            parts = _spread(granted, caps[wanted])
            for st, part in zip(states, parts, strict=True):
                if part:
                    st.write_off[wanted] = part
            result.write_off[wanted] = granted
            # What is left to pay in money, for the points phase (only the wanted currency is written
            # off, so a line's part is all its write-off).
            run.paid = [amount - part if part else amount for amount, part in zip(after, parts, strict=True)]
    _withdraw_unused_rules(run, selected, applied_before)


def _withdraw_unused_rules(run: _Run, selected: _Selection, applied_before: set[int]) -> None:
    """A write-off rule counts as applied only when points were written off in its currency: an
    offer whose rules paid nothing is taken off its lines and off the applied offers, so its
    per-member limit and its uses count real payments with points (the rule still set the
    ``max_write_off`` the till shows). Offers applied in an earlier phase stay."""
    written = run.result.write_off
    used: set[int] = set()
    unused: set[int] = set()
    for chain, _ in selected:
        if not chain.write_off_actions:
            continue
        if any(action.currency in written for action in chain.write_off_actions):
            used.add(chain.offer_id)
        else:
            unused.add(chain.offer_id)
    unused -= used | applied_before
    if not unused:
        return
    result = run.result
    result.applied_offers[:] = [o for o in result.applied_offers if o not in unused]
    for offers in run.offers_of:
        offers[:] = [o for o in offers if o not in unused]
    for chain, _ in selected:
        if chain.offer_id in unused:  # its messages ("paid with points...") did not happen either
            _drop_texts(result.cheque_messages, chain.cheque_texts)
            _drop_texts(result.cashier_messages, chain.cashier_texts)
    for explanation in result.explain:
        if explanation.offer_id in unused and explanation.event == "write_off" and explanation.applied:
            explanation.applied = False
            explanation.reason = "no points written off"
            explanation.lines = []


def _drop_texts(messages: list[str], texts: Sequence[str]) -> None:
    """Takes one occurrence of each text off the messages (another offer may show the same)."""
    for text in texts:
        if text in messages:
            messages.remove(text)


def _run_bonuses(run: _Run) -> None:
    states = run.states
    append = run.result.accruals.append
    all_lines = run.all_lines
    bonuses = [st.bonus for st in states]
    # Points are earned on what is left to pay in money (kept by the write-off phase when it ran);
    # bonuses do not change it.
    paid = run.paid if run.paid is not None else [st.amount - st.discount for st in states]
    # Every line's points per percent rate, kept once a chain over the whole cheque needed them.
    line_points: dict[int, list[Decimal]] = {}

    def percent_points(action: _Action, chosen: list[int]) -> list[Decimal]:
        """What a percent bonus gives the chosen lines, rounded down to the currency's precision."""
        got = line_points.get(action.memo)
        if got is not None:
            return got if chosen is all_lines else [got[i] for i in chosen]
        quantum = action.quantum
        if action.exact:
            factor = action.factor
            amounts = paid if chosen is all_lines else [paid[i] for i in chosen]
            got = [(amount * factor).quantize(quantum, ROUND_DOWN) for amount in amounts]
        else:
            value = action.value
            got = [(paid[i] * value / HUNDRED).quantize(quantum, ROUND_DOWN) for i in chosen]
        if chosen is all_lines:
            line_points[action.memo] = got
        return got

    def points_for(action: _Action, targets: list[int]) -> list[tuple[int | None, Decimal]]:
        if action.type == "extra_bonus":
            return [(None, action.points)]
        if action.kind == "percent":
            return list(zip(targets, percent_points(action, targets), strict=True))
        parts = _spread(action.points, [paid[i] for i in targets])
        return list(zip(targets, parts, strict=True))

    def benefit(chain: _CompiledChain, chosen: list[int]) -> Decimal:
        total = ZERO
        for action in chain.bonus_actions:
            if action.type == "bonus" and action.kind == "percent":
                total += sum(percent_points(action, chosen), ZERO)
            else:
                total += sum((pts for _, pts in points_for(action, chosen)), ZERO)
        return total

    for chain, targets in _select(run, "bonus_calculation", benefit):
        offer_id = chain.offer_id
        for action in chain.bonus_actions:
            currency = action.currency
            delay, lifetime, legal_entity = action.delay, action.lifetime, action.legal_entity
            if action.type == "bonus" and action.kind == "percent":
                points = percent_points(action, targets)
                bonuses_of = bonuses if targets is all_lines else [bonuses[i] for i in targets]
                total = ZERO
                for bonus, pts in zip(bonuses_of, points, strict=True):
                    if pts > ZERO:
                        bonus[currency] = bonus.get(currency, ZERO) + pts
                        total += pts
                if total:  # one accrual per offer action: what all its lines earned
                    append(Accrual(currency, total, offer_id, delay, lifetime, legal_entity))
                continue
            total = ZERO
            for n, pts in points_for(action, targets):
                if pts <= 0:
                    continue
                if n is not None:
                    bonus = bonuses[n]
                    bonus[currency] = bonus.get(currency, ZERO) + pts
                total += pts
            if total:
                append(Accrual(currency, total, offer_id, delay, lifetime, legal_entity))


def _messages(actions: Iterable[Rule], offer: Offer, result: Result) -> None:
    for action in actions:
        if action.type == "cheque_message":
            result.cheque_messages.append(str(action.params.get("text", "")))
        elif action.type == "cashier_message":
            result.cashier_messages.append(str(action.params.get("text", "")))


def _render_messages(result: Result, member: MemberFacts | None, default_currency: str) -> None:
    if not (result.cheque_messages or result.cashier_messages):
        return  # nothing to fill in: skip totalling the cheque
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
    # Every field given: the dataclasses' default factories cost more than the literals.
    states = [LineResult(x.line, x.sku, x.amount, ZERO, {}, {}, {}, [], ZERO) for x in cheque.lines]
    result = Result(
        lines=states,
        accruals=[],
        cheque_messages=[],
        cashier_messages=[],
        applied_offers=[],
        explain=[],
        max_write_off={},
        write_off={},
    )
    run = _Run(snapshot, cheque, result, explain)
    if discounts:
        _run_discounts(run)
    if write_off:
        _run_write_off(run)
    _run_bonuses(run)
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


def local_time(moment: datetime, zone: Any) -> datetime:
    """The store's wall-clock time (naive) for an aware moment; ``zone`` is a ZoneInfo."""
    return moment.astimezone(zone).replace(tzinfo=None)


__all__ = [
    "EVENTS",
    "EVENT_ACTIONS",
    "MEMBER_EVENTS",
    "PURCHASE_EVENTS",
    "Accrual",
    "Chain",
    "Cheque",
    "Line",
    "MemberEvent",
    "MemberFacts",
    "Offer",
    "Payment",
    "Result",
    "Rule",
    "Snapshot",
    "calculate",
    "evaluate_member_event",
    "local_time",
    "render_message",
]
