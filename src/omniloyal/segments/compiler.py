"""Segment definitions: the condition tree, its validation, and its compilation to warehouse SQL.

Pure: plain data in, plain data (and SQL text) out; no clock (``now`` is given), no database.

A definition is a JSON tree of groups and leaves::

    {"all": [node, ...]}      every node holds (an empty ``all`` holds for everyone)
    {"any": [node, ...]}      at least one node holds
    {"not": node}             the node does not hold
    {"type": "...", ...}      a leaf condition (families below, documented in docs/segments.md)

Every leaf is a two-valued predicate on a member (never SQL NULL), so ``not`` is exactly the
complement within the segment's universe: the warehouse's members that were not merged away.

The SQL is built as SQLGlot expressions (never by pasting strings) and rendered for DuckDB or
ClickHouse; the few functions the two engines spell differently (JSON, time literals) are
chosen per dialect. Relative conditions ("in the last 30 days", "age at least 30", "5 days
since the last purchase") become comparisons with times computed here from ``now``, so both
engines compare the same stored values with the same constants.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from sqlglot import exp

from omniloyal.analytics.features import VISIT_TYPES

Dialect = Literal["duckdb", "clickhouse"]
DIALECTS: tuple[Dialect, ...] = ("duckdb", "clickhouse")

MAX_DEPTH = 12
MAX_NODES = 300
MAX_VALUES = 10_000

# Store attribute that names a store's format (hypermarket, supermarket, ...).
STORE_FORMAT_ATTRIBUTE = "CustomTradeFormat"
CATEGORY_SEPARATOR = " / "

# Event types of the communications family (written by the messaging side).
MESSAGE_EVENTS = {
    "received": "message.delivered",
    "opened": "message.opened",
    "clicked": "message.clicked",
    "complained": "message.complained",
    "unsubscribed": "message.unsubscribed",
}
CONSENT_COLUMNS = ("email", "sms", "viber", "push")
# Event columns a property filter reads directly (the rest come from the JSON properties).
EVENT_COLUMNS = (
    "sku",
    "category",
    "section",
    "campaign",
    "store",
    "source",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_content",
    "utm_term",
)
RFM_GROUPS = (
    "best",
    "champions",
    "loyal",
    "promising",
    "new",
    "at_risk",
    "hibernating",
    "lost",
)

_CODE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,99}$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,99}$")


# ---------------------------------------------------------------- the tree


class ConditionError(ValueError):
    """A definition refused: ``path`` names the bad node (``conditions.all[2].any[0].value``)."""

    def __init__(self, path: str, code: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.code = code
        self.message = message


Op = Literal[
    "eq",
    "neq",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "between",
    "exists",
    "not_exists",
    "contains",
    "under",
]
_ORDER_OPS = ("gt", "gte", "lt", "lte", "between")
_EQ_OPS = ("eq", "neq", "in", "not_in")
_NULL_OPS = ("exists", "not_exists")
# Negative operators: the complement of their positive form (a missing value matches them).
_NEGATIVE = {"neq": "eq", "not_in": "in", "_range_neq": "_range_eq"}


@dataclass(frozen=True)
class Compare:
    """``op`` with its value: a scalar, a tuple (``in``, ``not_in``, ``between``, ``contains``,
    ``under``) or None (``exists``, ``not_exists``)."""

    op: str
    value: Any = None


@dataclass(frozen=True)
class Period:
    """The last ``days`` days, or ``[start, end)``; neither: all time."""

    days: int | None = None
    start: datetime | None = None
    end: datetime | None = None

    def bounds(self, now: datetime) -> tuple[datetime | None, datetime | None]:
        if self.days is not None:
            return now - timedelta(days=self.days), None
        return self.start, self.end


@dataclass(frozen=True)
class All:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


@dataclass(frozen=True)
class Profile:
    field: str
    cmp: Compare


@dataclass(frozen=True)
class Attribute:
    code: str
    cmp: Compare


@dataclass(frozen=True)
class Contact:
    channel: str
    state: str


@dataclass(frozen=True)
class Consent:
    channel: str
    granted: bool


@dataclass(frozen=True)
class Purchases:
    metric: str
    cmp: Compare
    period: Period = Period()
    skus: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    stores: tuple[str, ...] = ()
    store_formats: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()

    @property
    def by_line(self) -> bool:
        return bool(self.skus or self.categories or self.groups)


@dataclass(frozen=True)
class PropertyFilter:
    name: str
    cmp: Compare


@dataclass(frozen=True)
class Events:
    types: tuple[str, ...]
    metric: str
    cmp: Compare
    period: Period = Period()
    properties: tuple[PropertyFilter, ...] = ()
    sources: tuple[str, ...] = ()
    exclude_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Balance:
    currency: str
    cmp: Compare


@dataclass(frozen=True)
class CardState:
    states: tuple[str, ...] = ()
    blocked: bool | None = None


@dataclass(frozen=True)
class LoyaltyStatus:
    statuses: tuple[str, ...]


@dataclass(frozen=True)
class Audience:
    audiences: tuple[str, ...]


@dataclass(frozen=True)
class Rfm:
    r: tuple[int, ...] = ()
    f: tuple[int, ...] = ()
    m: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class SegmentRef:
    segment: int


Node = (
    All
    | AnyOf
    | Not
    | Profile
    | Attribute
    | Contact
    | Consent
    | Purchases
    | Events
    | Balance
    | CardState
    | LoyaltyStatus
    | Audience
    | Rfm
    | SegmentRef
)


def walk(node: Node) -> Iterable[Node]:
    yield node
    if isinstance(node, All | AnyOf):
        for item in node.items:
            yield from walk(item)
    elif isinstance(node, Not):
        yield from walk(node.item)


def references(node: Node) -> set[int]:
    """Ids of the segments this definition uses (directly)."""
    return {n.segment for n in walk(node) if isinstance(n, SegmentRef)}


def store_formats(node: Node) -> set[str]:
    return {f for n in walk(node) if isinstance(n, Purchases) for f in n.store_formats}


def product_groups(node: Node) -> set[str]:
    return {g for n in walk(node) if isinstance(n, Purchases) for g in n.groups}


def uses_events(node: Node) -> bool:
    return any(isinstance(n, Events) for n in walk(node))


# ---------------------------------------------------------------- parsing


def _fmt(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


class _Leaf:
    """Reads one leaf's fields, remembering which were used (the others are refused)."""

    def __init__(self, obj: dict[str, Any], path: str) -> None:
        self.obj = obj
        self.path = path
        self.used = {"type"}

    def at(self, key: str) -> str:
        return _fmt(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.obj and self.obj[key] is not None

    def raw(self, key: str, *, required: bool = False) -> Any:
        self.used.add(key)
        value = self.obj.get(key)
        if value is None and required:
            raise ConditionError(self.at(key), "missing_field", f"{key} is required")
        return value

    def choice(self, key: str, choices: Sequence[str], *, default: str | None = None) -> str:
        value = self.raw(key, required=default is None)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, str) or value not in choices:
            raise ConditionError(
                self.at(key), "invalid_choice", f"{key} must be one of: {', '.join(choices)}"
            )
        return value

    def codes(self, key: str, *, pattern: re.Pattern[str] = _CODE, required: bool = False) -> tuple[str, ...]:
        value = self.raw(key, required=required)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or (required and not value):
            raise ConditionError(self.at(key), "invalid_value", f"{key} must be a non-empty list of codes")
        if len(value) > MAX_VALUES:
            raise ConditionError(self.at(key), "too_many_values", f"{key}: at most {MAX_VALUES} values")
        out = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item.strip() or len(item) > 300:
                raise ConditionError(
                    _fmt(self.at(key), index), "invalid_value", f"{key} items must be non-empty strings"
                )
            if pattern is not _ANY_TEXT and not pattern.match(item):
                raise ConditionError(
                    _fmt(self.at(key), index), "invalid_code", f"{item!r} is not a valid code"
                )
            out.append(item)
        return tuple(dict.fromkeys(out))

    def ints(self, key: str, low: int, high: int) -> tuple[int, ...]:
        value = self.raw(key)
        if value is None:
            return ()
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ConditionError(self.at(key), "invalid_value", f"{key} must be a list of {low}..{high}")
        for index, item in enumerate(value):
            if not isinstance(item, int) or isinstance(item, bool) or not low <= item <= high:
                raise ConditionError(
                    _fmt(self.at(key), index), "invalid_value", f"{key} values are {low}..{high}"
                )
        return tuple(sorted(set(value)))

    def choice_list(self, key: str, choices: Sequence[str]) -> tuple[str, ...]:
        values = self.codes(key)
        for index, value in enumerate(values):
            if value not in choices:
                raise ConditionError(
                    _fmt(self.at(key), index), "invalid_choice", f"{key} are: {', '.join(choices)}"
                )
        return values

    def boolean(self, key: str, *, default: bool | None = None) -> bool | None:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConditionError(self.at(key), "invalid_value", f"{key} must be true or false")
        return value

    def finish(self) -> None:
        extra = sorted(set(self.obj) - self.used)
        if extra:
            raise ConditionError(
                self.at(extra[0]), "unknown_field", f"{extra[0]} is not a field of this condition"
            )


_ANY_TEXT = re.compile(r".*")

ValueKind = Literal["number", "int", "money", "text", "bool", "date", "any"]


def _number(value: Any, path: str, kind: ValueKind) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConditionError(path, "invalid_value", "value must be true or false")
        return value
    if kind == "text":
        if not isinstance(value, str) or len(value) > 1000:
            raise ConditionError(path, "invalid_value", "value must be a string")
        return value
    if kind == "date":
        if not isinstance(value, str):
            raise ConditionError(path, "invalid_value", "value must be a date YYYY-MM-DD")
        try:
            return date.fromisoformat(value)
        except ValueError as exc:
            raise ConditionError(path, "invalid_value", "value must be a date YYYY-MM-DD") from exc
    if kind == "any":
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return Decimal(str(value))
        if isinstance(value, str) and len(value) <= 1000:
            return value
        raise ConditionError(path, "invalid_value", "value must be a string, a number or true/false")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConditionError(path, "invalid_value", "value must be a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation as exc:
        raise ConditionError(path, "invalid_value", "value must be a number") from exc
    if not number.is_finite() or abs(number) >= Decimal(10) ** 15:
        raise ConditionError(path, "invalid_value", "value is out of range")
    if kind == "int":
        if number != number.to_integral_value():
            raise ConditionError(path, "invalid_value", "value must be a whole number")
        return int(number)
    if kind == "money" and number.as_tuple().exponent < -2:  # type: ignore[operator]
        raise ConditionError(path, "invalid_value", "money has at most 2 decimal places")
    return number


def _compare(leaf: _Leaf, kind: ValueKind, ops: Sequence[str], *, default_op: str | None = None) -> Compare:
    op = leaf.choice("op", ops, default=default_op)
    path = leaf.at("value")
    if op in _NULL_OPS:
        if leaf.raw("value") is not None:
            raise ConditionError(path, "unexpected_value", f"{op} takes no value")
        return Compare(op)
    value = leaf.raw("value", required=True)
    if op in ("in", "not_in", "contains", "under"):
        items = value if isinstance(value, list) else [value]
        if not items or len(items) > MAX_VALUES:
            raise ConditionError(path, "invalid_value", f"{op} takes a list of 1..{MAX_VALUES} values")
        return Compare(op, tuple(_number(v, _fmt(path, i), kind) for i, v in enumerate(items)))
    if op == "between":
        if not isinstance(value, list) or len(value) != 2:
            raise ConditionError(path, "invalid_value", "between takes [low, high]")
        low, high = (_number(v, _fmt(path, i), kind) for i, v in enumerate(value))
        if low > high:
            raise ConditionError(path, "invalid_value", "between: low must not exceed high")
        return Compare(op, (low, high))
    if isinstance(value, list):
        raise ConditionError(path, "invalid_value", f"{op} takes one value")
    return Compare(op, _number(value, path, kind))


def _time(value: Any, path: str) -> datetime:
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return moment.astimezone(UTC)
    raise ConditionError(path, "invalid_value", "a time in ISO 8601 with its offset")


def _period(leaf: _Leaf, *, default_days: int | None = None) -> Period:
    value = leaf.raw("period")
    path = leaf.at("period")
    if value is None:
        return Period(days=default_days)
    if not isinstance(value, dict):
        raise ConditionError(path, "invalid_value", 'period is {"days": N} or {"from": time, "to": time}')
    unknown = sorted(set(value) - {"days", "from", "to"})
    if unknown:
        raise ConditionError(
            _fmt(path, unknown[0]), "unknown_field", f"{unknown[0]} is not a field of period"
        )
    if "days" in value:
        days = value["days"]
        if set(value) != {"days"}:
            raise ConditionError(path, "invalid_value", "period has either days or from/to")
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 36_600:
            raise ConditionError(_fmt(path, "days"), "invalid_value", "days is a whole number 1..36600")
        return Period(days=days)
    start = _time(value["from"], _fmt(path, "from")) if value.get("from") is not None else None
    end = _time(value["to"], _fmt(path, "to")) if value.get("to") is not None else None
    if start is None and end is None:
        raise ConditionError(path, "invalid_value", "period needs days, from or to")
    if start is not None and end is not None and start >= end:
        raise ConditionError(_fmt(path, "to"), "invalid_value", "to must be after from")
    return Period(start=start, end=end)


# Questionnaire fields: name -> (kind, ops).
_PROFILE_FIELDS: dict[str, tuple[ValueKind, tuple[str, ...]]] = {
    "gender": ("text", (*_EQ_OPS, *_NULL_OPS)),
    "city": ("text", (*_EQ_OPS, *_NULL_OPS)),
    "status": ("text", _EQ_OPS),
    "first_name": ("text", (*_EQ_OPS, *_NULL_OPS)),
    "last_name": ("text", (*_EQ_OPS, *_NULL_OPS)),
    "external_id": ("text", (*_EQ_OPS, *_NULL_OPS)),
    "age": ("int", ("eq", "neq", *_ORDER_OPS, *_NULL_OPS)),
    "birth_date": ("date", ("eq", "neq", *_ORDER_OPS, *_NULL_OPS)),
    "birth_month": ("int", ("eq", "neq", "in", "not_in", *_ORDER_OPS)),
    "registered_days": ("int", ("eq", "neq", *_ORDER_OPS, *_NULL_OPS)),
    "has_children": ("bool", ("eq",)),
    "children_count": ("int", ("eq", "neq", *_ORDER_OPS)),
    "pets": ("text", ("contains", *_NULL_OPS)),
    "preferred_categories": ("text", ("contains", *_NULL_OPS)),
}
_ORDER_AND_EQ = ("eq", "neq", "gt", "gte", "lt", "lte", "between")
_CONTACT_STATES = ("present", "missing", "valid", "invalid", "mobile")
_PURCHASE_METRICS = ("count", "sum", "avg", "days_since_last", "days_since_first")
_EVENT_METRICS = ("count", "days_since_last")
_WEB_ACTIONS = ("visited_site", "visited_section", "viewed_product", "viewed_category")


def _profile(leaf: _Leaf) -> Profile:
    name = leaf.choice("field", tuple(_PROFILE_FIELDS))
    kind, ops = _PROFILE_FIELDS[name]
    cmp = _compare(leaf, kind, ops, default_op="eq" if kind == "bool" else None)
    if name == "birth_month" and cmp.value is not None:
        values = cmp.value if isinstance(cmp.value, tuple) else (cmp.value,)
        if any(not 1 <= v <= 12 for v in values):
            raise ConditionError(leaf.at("value"), "invalid_value", "months are 1..12")
    return Profile(name, cmp)


def _attribute(leaf: _Leaf) -> Attribute:
    code = leaf.raw("code", required=True)
    if not isinstance(code, str) or not _NAME.match(code):
        raise ConditionError(
            leaf.at("code"), "invalid_code", "code is the attribute's code (letters, digits, _)"
        )
    op = leaf.obj.get("op")
    kind: ValueKind = "any"
    if op in _ORDER_OPS:
        kind = "number"
    cmp = _compare(leaf, kind, (*_EQ_OPS, *_ORDER_OPS, *_NULL_OPS))
    if cmp.op in _EQ_OPS and isinstance(cmp.value, tuple):
        kinds = {type(v) for v in cmp.value}
        if len(kinds) > 1:
            raise ConditionError(
                leaf.at("value"), "invalid_value", "values of one condition must share a type"
            )
    return Attribute(code, cmp)


def _purchases(leaf: _Leaf) -> Purchases:
    metric = leaf.choice("metric", _PURCHASE_METRICS, default="count")
    kind: ValueKind = "money" if metric in ("sum", "avg") else "int"
    if metric == "count" and not leaf.has("op") and not leaf.has("value"):
        cmp = Compare("gte", 1)  # bought at all
        leaf.used |= {"op", "value"}
    else:
        cmp = _compare(leaf, kind, _ORDER_AND_EQ, default_op="gte")
    if kind == "int" and any(v < 0 for v in (cmp.value if isinstance(cmp.value, tuple) else (cmp.value,))):
        raise ConditionError(leaf.at("value"), "invalid_value", "value must not be negative")
    return Purchases(
        metric=metric,
        cmp=cmp,
        period=_period(leaf),
        skus=leaf.codes("skus", pattern=_ANY_TEXT),
        categories=leaf.codes("categories", pattern=_ANY_TEXT),
        groups=leaf.codes("groups"),
        stores=leaf.codes("stores"),
        store_formats=leaf.codes("store_formats", pattern=_ANY_TEXT),
        channels=leaf.codes("channels"),
    )


def _property_filters(leaf: _Leaf) -> tuple[PropertyFilter, ...]:
    value = leaf.raw("properties")
    if value is None:
        return ()
    path = leaf.at("properties")
    if not isinstance(value, list) or len(value) > 20:
        raise ConditionError(path, "invalid_value", "properties is a list of up to 20 filters")
    out = []
    for index, item in enumerate(value):
        item_path = _fmt(path, index)
        if not isinstance(item, dict):
            raise ConditionError(item_path, "invalid_value", 'a filter is {"name", "op", "value"}')
        sub = _Leaf(item, item_path)
        sub.used = set()
        name = sub.raw("name", required=True)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConditionError(sub.at("name"), "invalid_value", "name is a property name")
        kind: ValueKind = "number" if item.get("op") in _ORDER_OPS else "any"
        cmp = _compare(sub, kind, (*_EQ_OPS, *_ORDER_OPS, *_NULL_OPS, "under"), default_op="eq")
        sub.finish()
        out.append(PropertyFilter(name, cmp))
    return tuple(out)


def _events(leaf: _Leaf) -> Events:
    types = leaf.codes("event", required=True)
    metric = leaf.choice("metric", _EVENT_METRICS, default="count")
    if metric == "count" and not leaf.has("op") and not leaf.has("value"):
        cmp = Compare("gte", 1)  # happened at all
        leaf.used |= {"op", "value"}
    else:
        cmp = _compare(leaf, "int", _ORDER_AND_EQ, default_op="gte")
    if any(v < 0 for v in (cmp.value if isinstance(cmp.value, tuple) else (cmp.value,))):
        raise ConditionError(leaf.at("value"), "invalid_value", "value must not be negative")
    return Events(
        types=types,
        metric=metric,
        cmp=cmp,
        period=_period(leaf),
        properties=_property_filters(leaf),
        sources=leaf.codes("sources"),
    )


def _min_count(leaf: _Leaf) -> Compare:
    value = leaf.raw("min_count")
    if value is None:
        return Compare("gte", 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConditionError(leaf.at("min_count"), "invalid_value", "min_count is a whole number >= 1")
    return Compare("gte", value)


def _web(leaf: _Leaf) -> Events:
    action = leaf.choice("action", _WEB_ACTIONS)
    cmp = _min_count(leaf)
    period = _period(leaf)
    if action == "visited_site":
        leaf.finish()
        return Events(tuple(sorted(VISIT_TYPES)), "count", cmp, period, exclude_sources=("mobile_app",))
    name, event, op = {
        "visited_section": ("section", "section_view", "in"),
        "viewed_product": ("sku", "product_view", "in"),
        "viewed_category": ("category", "category_view", "under"),
    }[action]
    values = leaf.codes("values", pattern=_ANY_TEXT)
    filters = (PropertyFilter(name, Compare(op, values)),) if values else ()
    return Events((event,), "count", cmp, period, properties=filters)


def _message(leaf: _Leaf) -> Events:
    action = leaf.choice("action", tuple(MESSAGE_EVENTS))
    campaigns = leaf.codes("campaigns", pattern=_ANY_TEXT)
    filters = (PropertyFilter("campaign", Compare("in", campaigns)),) if campaigns else ()
    return Events((MESSAGE_EVENTS[action],), "count", _min_count(leaf), _period(leaf), properties=filters)


def _leaf(obj: dict[str, Any], path: str) -> Node:
    leaf = _Leaf(obj, path)
    kind = obj.get("type")
    node: Node
    if kind == "profile":
        node = _profile(leaf)
    elif kind == "attribute":
        node = _attribute(leaf)
    elif kind == "contact":
        node = Contact(leaf.choice("channel", ("phone", "email")), leaf.choice("state", _CONTACT_STATES))
        if node.state == "mobile" and node.channel != "phone":
            raise ConditionError(leaf.at("state"), "invalid_choice", "mobile applies to the phone")
    elif kind == "consent":
        channel = leaf.raw("channel", required=True)
        if not isinstance(channel, str) or not _CODE.match(channel):
            raise ConditionError(
                leaf.at("channel"), "invalid_code", "channel is email, sms, viber, push or a code"
            )
        granted = leaf.boolean("granted", default=True)
        assert granted is not None
        node = Consent(channel, granted)
    elif kind == "purchases":
        node = _purchases(leaf)
    elif kind == "events":
        node = _events(leaf)
    elif kind == "web":
        node = _web(leaf)
    elif kind == "message":
        node = _message(leaf)
    elif kind == "balance":
        currency = leaf.codes("currency", required=True)
        if len(currency) != 1:
            raise ConditionError(leaf.at("currency"), "invalid_value", "one currency code")
        node = Balance(currency[0], _compare(leaf, "money", _ORDER_AND_EQ))
    elif kind == "card":
        states = leaf.codes("states")
        blocked = leaf.boolean("blocked")
        if not states and blocked is None:
            raise ConditionError(leaf.at("states"), "missing_field", "give states, blocked, or both")
        node = CardState(states, blocked)
    elif kind == "status":
        node = LoyaltyStatus(leaf.codes("statuses", required=True))
    elif kind == "audience":
        node = Audience(leaf.codes("audiences", required=True))
    elif kind == "rfm":
        node = Rfm(
            r=leaf.ints("r", 1, 5),
            f=leaf.ints("f", 1, 5),
            m=leaf.ints("m", 1, 5),
            groups=leaf.choice_list("groups", RFM_GROUPS),
        )
        if not (node.r or node.f or node.m or node.groups):
            raise ConditionError(path, "missing_field", "give r, f, m (scores 1..5) or groups")
    elif kind == "segment":
        value = leaf.raw("segment", required=True)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConditionError(leaf.at("segment"), "invalid_value", "segment is a segment id")
        node = SegmentRef(value)
    else:
        raise ConditionError(
            _fmt(path, "type"),
            "unknown_condition",
            "type is one of: profile, attribute, contact, consent, purchases, events, web, message, "
            "balance, card, status, audience, rfm, segment",
        )
    leaf.finish()
    return node


def parse(tree: Any, path: str = "conditions") -> Node:
    """The validated tree; :class:`ConditionError` names the first bad node."""
    count = [0]

    def node(obj: Any, at: str, depth: int) -> Node:
        count[0] += 1
        if count[0] > MAX_NODES:
            raise ConditionError(at, "too_many_conditions", f"a definition has at most {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise ConditionError(at, "too_deep", f"groups nest at most {MAX_DEPTH} deep")
        if not isinstance(obj, dict):
            raise ConditionError(at, "invalid_condition", "a condition is a JSON object")
        groups = [k for k in ("all", "any", "not") if k in obj]
        if groups:
            key = groups[0]
            if len(obj) != 1:
                other = sorted(k for k in obj if k != key)[0]
                raise ConditionError(_fmt(at, other), "unknown_field", f"a {key} group has only {key!r}")
            value = obj[key]
            if key == "not":
                return Not(node(value, _fmt(at, "not"), depth + 1))
            if not isinstance(value, list):
                raise ConditionError(_fmt(at, key), "invalid_condition", f"{key} is a list of conditions")
            if key == "any" and not value:
                raise ConditionError(_fmt(at, key), "empty_group", "any needs at least one condition")
            items = tuple(node(v, _fmt(_fmt(at, key), i), depth + 1) for i, v in enumerate(value))
            return All(items) if key == "all" else AnyOf(items)
        if "type" not in obj:
            raise ConditionError(at, "invalid_condition", "a condition has all, any, not, or a type")
        return _leaf(obj, at)

    return node(tree, path, 0)


# ---------------------------------------------------------------- compiling


@dataclass(frozen=True)
class Target:
    """Where the SQL runs: the dialect, and the ClickHouse database holding the tables."""

    dialect: Dialect = "duckdb"
    database: str | None = None

    @property
    def clickhouse(self) -> bool:
        return self.dialect == "clickhouse"


@dataclass(frozen=True)
class Context:
    """What a definition needs from outside: the time, other segments, catalogue lookups."""

    now: datetime
    # Parsed definitions of the segments referenced (transitively).
    segments: Mapping[int, Node] = field(default_factory=dict)
    # Store format -> store codes; product group -> skus.
    store_formats: Mapping[str, Sequence[str]] = field(default_factory=dict)
    groups: Mapping[str, Sequence[str]] = field(default_factory=dict)


class CompileError(ValueError):
    pass


def _col(name: str, table: str | None = None) -> exp.Column:
    return exp.column(name, table=table)


def _str(value: str) -> exp.Literal:
    return exp.Literal.string(value)


def _int(value: int) -> exp.Expr:
    return exp.Literal.number(int(value))


def _true() -> exp.Expr:
    return exp.true()


def _false() -> exp.Expr:
    return exp.false()


def _from_features(node: Purchases) -> bool:
    """All time, every purchase: the member's kept sums answer it (``purchases_from_features``)."""
    every = not (node.by_line or node.stores or node.store_formats or node.channels)
    return every and node.period == Period()


# Conditions compiled to a predicate on the member row alone (no subquery).
_ROW_ONLY = (Profile, Attribute, Consent)


class _Compiler:
    def __init__(self, target: Target, ctx: Context, only: Sequence[int] | None) -> None:
        self.t = target
        self.ctx = ctx
        self.only = sorted(set(only)) if only is not None else None
        self.stack: list[int] = []
        # Conditions on the member row that an enclosing ``all`` also demands: every subquery
        # below it reads only those members' rows (see all_of).
        self.scope: list[exp.Expr] = []

    # ---- table references and literals per dialect

    def table(self, name: str, alias: str | None = None) -> exp.Expr:
        table = exp.Table(
            this=exp.to_identifier(name),
            db=exp.to_identifier(self.t.database) if self.t.clickhouse and self.t.database else None,
            alias=exp.TableAlias(this=exp.to_identifier(alias)) if alias else None,
        )
        return exp.Final(this=table) if self.t.clickhouse else table

    def ts(self, value: datetime) -> exp.Expr:
        text = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        if self.t.clickhouse:
            return exp.Anonymous(this="toDateTime64", expressions=[_str(text), _int(6), _str("UTC")])
        return exp.cast(_str(text + "+00"), exp.DataType.build("TIMESTAMPTZ", dialect="duckdb"))

    def day(self, value: date) -> exp.Expr:
        if self.t.clickhouse:
            return exp.Anonymous(this="toDate32", expressions=[_str(value.isoformat())])
        return exp.cast(_str(value.isoformat()), exp.DataType.build("DATE"))

    def num(self, value: Decimal | int) -> exp.Expr:
        if isinstance(value, int):
            return _int(value)
        scale = max(0, -int(value.as_tuple().exponent))
        scale = min(scale, 9)
        text = format(value, "f")
        if self.t.clickhouse:
            return exp.Anonymous(this="toDecimal128", expressions=[_str(text), _int(scale)])
        return exp.cast(_str(text), exp.DataType.build(f"DECIMAL(38, {scale})", dialect="duckdb"))

    def lit(self, value: Any) -> exp.Expr:
        if isinstance(value, bool):
            return exp.Boolean(this=value)
        if isinstance(value, Decimal | int):
            return self.num(value)
        if isinstance(value, datetime):
            return self.ts(value)
        if isinstance(value, date):
            return self.day(value)
        return _str(str(value))

    def json_text(self, column: exp.Expr, key: str) -> exp.Expr:
        """The JSON member ``key`` as text (NULL when absent or null): strings unquoted,
        numbers and booleans as written."""
        if self.t.clickhouse:
            kind = exp.Anonymous(this="JSONType", expressions=[column.copy(), _str(key)])
            text = exp.Anonymous(this="JSONExtractString", expressions=[column.copy(), _str(key)])
            return exp.If(this=kind.eq(_str("Null")), true=exp.null(), false=text)
        return exp.Anonymous(this="json_extract_string", expressions=[column, _str(f'$."{key}"')])

    def json_text2(self, column: exp.Expr, key: str, sub: str) -> exp.Expr:
        if self.t.clickhouse:
            args = [column.copy(), _str(key), _str(sub)]
            kind = exp.Anonymous(this="JSONType", expressions=args)
            text = exp.Anonymous(this="JSONExtractString", expressions=[a.copy() for a in args])
            return exp.If(this=kind.eq(_str("Null")), true=exp.null(), false=text)
        return exp.Anonymous(this="json_extract_string", expressions=[column, _str(f'$."{key}"."{sub}"')])

    def to_number(self, text: exp.Expr) -> exp.Expr:
        if self.t.clickhouse:
            return exp.Anonymous(this="toFloat64OrNull", expressions=[text])
        return exp.TryCast(this=text, to=exp.DataType.build("DOUBLE"))

    def json_array_length(self, column: exp.Expr) -> exp.Expr:
        if self.t.clickhouse:
            return exp.Anonymous(this="JSONLength", expressions=[column])
        return exp.func("coalesce", exp.Anonymous(this="json_array_length", expressions=[column]), _int(0))

    def starts_with(self, column: exp.Expr, prefix: str) -> exp.Expr:
        return exp.StartsWith(this=column, expression=_str(prefix))

    def array_has(self, column: exp.Expr, value: str) -> exp.Expr:
        return exp.ArrayContains(this=column, expression=_str(value))

    def array_size(self, column: exp.Expr) -> exp.Expr:
        if self.t.clickhouse:
            return exp.Anonymous(this="length", expressions=[column])
        return exp.func("coalesce", exp.Anonymous(this="len", expressions=[column]), _int(0))

    def month(self, column: exp.Expr) -> exp.Expr:
        if self.t.clickhouse:
            return exp.Anonymous(this="toMonth", expressions=[column])
        return exp.Anonymous(this="month", expressions=[column])

    # ---- helpers

    @staticmethod
    def known(column: exp.Expr, predicate: exp.Expr) -> exp.Expr:
        """``predicate`` with NULL read as false: never SQL NULL."""
        return exp.and_(exp.Not(this=exp.Is(this=column.copy(), expression=exp.null())), predicate)

    def compare(self, value: exp.Expr, cmp: Compare, lit: Callable[[Any], exp.Expr]) -> exp.Expr:
        """``value op constant``; SQL NULL when ``value`` is NULL (callers wrap with known())."""
        op, v = cmp.op, cmp.value
        if op in ("_range_eq", "_range_neq"):
            # (low, high]: produced by the age and days-since rewrites.
            low, high = v
            return exp.and_(
                exp.GT(this=value, expression=lit(low)), exp.LTE(this=value.copy(), expression=lit(high))
            )
        if op == "eq":
            return exp.EQ(this=value, expression=lit(v))
        if op == "neq":
            return exp.NEQ(this=value, expression=lit(v))
        if op == "gt":
            return exp.GT(this=value, expression=lit(v))
        if op == "gte":
            return exp.GTE(this=value, expression=lit(v))
        if op == "lt":
            return exp.LT(this=value, expression=lit(v))
        if op == "lte":
            return exp.LTE(this=value, expression=lit(v))
        if op == "between":
            return exp.and_(
                exp.GTE(this=value, expression=lit(v[0])), exp.LTE(this=value.copy(), expression=lit(v[1]))
            )
        if op == "in":
            return exp.In(this=value, expressions=[lit(x) for x in v])
        if op == "not_in":
            return exp.Not(this=exp.In(this=value, expressions=[lit(x) for x in v]))
        raise CompileError(f"operator {op} is not a comparison")

    def value_predicate(self, column: exp.Expr, cmp: Compare, lit: Callable[[Any], exp.Expr]) -> exp.Expr:
        """A two-valued predicate on a nullable column: a missing value matches ``neq``,
        ``not_in`` and ``not_exists`` only."""
        if cmp.op == "exists":
            return exp.Not(this=exp.Is(this=column, expression=exp.null()))
        if cmp.op == "not_exists":
            return exp.Is(this=column, expression=exp.null())
        if cmp.op in _NEGATIVE:
            positive = Compare(_NEGATIVE[cmp.op], cmp.value)
            return exp.Not(this=exp.paren(self.known(column, self.compare(column.copy(), positive, lit))))
        return self.known(column, self.compare(column.copy(), cmp, lit))

    def member_in(self, query: exp.Select, negate: bool = False) -> exp.Expr:
        member = _col("member_id", "m")
        predicate = exp.In(this=member, query=exp.Subquery(this=query))
        return exp.Not(this=predicate) if negate else predicate

    def restrict(self, where: list[exp.Expr], column: str = "member_id") -> None:
        if self.only is not None:
            where.append(exp.In(this=_col(column), expressions=[_int(i) for i in self.only] or [exp.null()]))
        if self.scope and self.only is None:  # a list of members narrows enough (and costs less)
            members = (
                exp.select(_col("member_id", "m"))
                .from_(self.table("members", "m"))
                .where(exp.and_(*[c.copy() for c in self.scope]))
            )
            where.append(exp.In(this=_col(column), query=exp.Subquery(this=members)))

    def period_where(self, where: list[exp.Expr], column: str, period: Period) -> None:
        start, end = period.bounds(self.ctx.now)
        if start is not None:
            where.append(exp.GTE(this=_col(column), expression=self.ts(start)))
        if end is not None:
            where.append(exp.LT(this=_col(column), expression=self.ts(end)))

    def aggregate(
        self,
        table: str,
        where: Sequence[exp.Expr],
        value: exp.Expr,
        cmp: Compare,
        zero: Any,
        lit: Callable[[Any], exp.Expr],
    ) -> exp.Expr:
        """Members whose aggregate ``value`` (over their rows of ``table`` matching ``where``)
        satisfies ``cmp``; a member without rows has the value ``zero`` (None: never matches)."""
        matches_zero = zero is not None and _holds(cmp, zero)
        return self.grouped(table, where, self.compare(value, cmp, lit), matches_zero)

    def exists_in(self, table: str, conditions: Sequence[exp.Expr]) -> exp.Expr:
        where = [exp.Not(this=exp.Is(this=_col("member_id"), expression=exp.null())), *conditions]
        self.restrict(where)
        return self.member_in(
            exp.select("member_id").from_(self.table(table)).where(exp.and_(*where)).distinct()
        )

    # ---- nodes

    def node(self, node: Node) -> exp.Expr:
        if isinstance(node, All):
            if not node.items:
                return _true()
            return self.all_of(node.items)
        if isinstance(node, AnyOf):
            return exp.or_(*[exp.paren(self.node(i)) for i in node.items])
        if isinstance(node, Not):
            return exp.Not(this=exp.paren(self.node(node.item)))
        method = getattr(self, "leaf_" + type(node).__name__.lower())
        result: exp.Expr = method(node)
        return result

    def leaf_profile(self, node: Profile) -> exp.Expr:
        cmp = node.cmp
        name = node.field
        now = self.ctx.now
        if name in ("gender", "city", "status", "first_name", "last_name", "external_id"):
            return self.value_predicate(_col(name, "m"), cmp, self.lit)
        if name == "birth_date":
            return self.value_predicate(_col("birth_date", "m"), cmp, self.lit)
        if name == "birth_month":
            return self.value_predicate(self.month(_col("birth_date", "m")), cmp, _int)
        if name == "age":
            return self.value_predicate(
                _col("birth_date", "m"), _age_to_birth_date(cmp, now.date()), self.lit
            )
        if name == "registered_days":
            return self.value_predicate(_col("created_at", "m"), _days_to_time(cmp, now), self.lit)
        if name == "children_count":
            return self.value_predicate(self.json_array_length(_col("children", "m")), cmp, _int)
        if name == "has_children":
            count = self.json_array_length(_col("children", "m"))
            has = self.known(_col("children", "m"), exp.GT(this=count, expression=_int(0)))
            return has if cmp.value else exp.Not(this=exp.paren(has))
        if name in ("pets", "preferred_categories"):
            column = _col(name, "m")
            if cmp.op == "exists":
                return exp.GT(this=self.array_size(column), expression=_int(0))
            if cmp.op == "not_exists":
                return exp.EQ(this=self.array_size(column), expression=_int(0))
            return self.known(column, exp.or_(*[self.array_has(column.copy(), v) for v in cmp.value]))
        raise CompileError(f"profile field {name}")

    def leaf_attribute(self, node: Attribute) -> exp.Expr:
        text = self.json_text(_col("attributes", "m"), node.code)
        cmp = node.cmp
        if cmp.op in _NULL_OPS:
            return self.value_predicate(text, cmp, self.lit)
        sample = cmp.value[0] if isinstance(cmp.value, tuple) else cmp.value
        if isinstance(sample, bool):
            values = cmp.value if isinstance(cmp.value, tuple) else (cmp.value,)
            forms = tuple("true" if v else "false" for v in values)
            as_text = Compare(cmp.op, forms if isinstance(cmp.value, tuple) else forms[0])
            return self.value_predicate(text, as_text, _str)
        if isinstance(sample, Decimal):
            return self.value_predicate(
                self.to_number(text), cmp, lambda v: exp.Literal.number(format(v, "f"))
            )
        return self.value_predicate(text, cmp, _str)

    def leaf_contact(self, node: Contact) -> exp.Expr:
        column = _col(node.channel, "m")
        present = self.known(column, exp.NEQ(this=column.copy(), expression=_str("")))
        if node.state == "present":
            return present
        if node.state == "missing":
            return exp.Not(this=exp.paren(present))
        # Validity comes from the loyalty side's data-quality checks (member_loyalty).
        flag = {
            "valid": f"{node.channel}_valid",
            "invalid": f"{node.channel}_valid",
            "mobile": "phone_mobile",
        }
        wanted = node.state != "invalid"
        where = [exp.EQ(this=_col(flag[node.state]), expression=exp.Boolean(this=wanted))]
        return exp.and_(present, self.exists_in("member_loyalty", where))

    def leaf_consent(self, node: Consent) -> exp.Expr:
        if node.channel in CONSENT_COLUMNS:
            column = _col(f"consent_{node.channel}", "m")
            given = self.known(column, exp.EQ(this=column.copy(), expression=exp.true()))
        else:
            text = self.json_text2(_col("consents", "m"), node.channel, "granted")
            given = self.known(text, exp.EQ(this=text.copy(), expression=_str("true")))
        return given if node.granted else exp.Not(this=exp.paren(given))

    def purchase_source(self, node: Purchases) -> tuple[str, list[exp.Expr], exp.Expr, exp.Expr]:
        """(table, row conditions, net money of a row, count of cheques) of a purchases leaf."""
        where: list[exp.Expr] = [exp.EQ(this=_col("status"), expression=_str("confirmed"))]
        self.period_where(where, "cheque_at", node.period)
        stores = list(node.stores)
        if node.store_formats:
            for fmt in node.store_formats:
                stores.extend(self.ctx.store_formats.get(fmt, ()))
            if not stores:
                stores = ["\x00no store of these formats"]
        if stores:
            where.append(exp.In(this=_col("store"), expressions=[_str(s) for s in dict.fromkeys(stores)]))
        if node.channels:
            where.append(exp.In(this=_col("channel"), expressions=[_str(c) for c in node.channels]))
        if not node.by_line:
            net = exp.Sub(
                this=exp.Sub(this=_col("amount"), expression=_col("discount")), expression=_col("refunded")
            )
            return "purchases", where, net, exp.Count(this=exp.Star())
        items: list[exp.Expr] = []
        skus = list(node.skus)
        for group in node.groups:
            skus.extend(self.ctx.groups.get(group, ()))
        if skus:
            items.append(exp.In(this=_col("sku"), expressions=[_str(s) for s in dict.fromkeys(skus)]))
        for category in node.categories:
            items.append(
                exp.or_(
                    exp.EQ(this=_col("category"), expression=_str(category)),
                    self.starts_with(_col("category"), category + CATEGORY_SEPARATOR),
                )
            )
        where.append(exp.paren(exp.or_(*items)) if items else _false())
        net = exp.Sub(
            this=exp.Sub(this=_col("amount"), expression=_col("discount")), expression=_col("refunded_amount")
        )
        return "purchase_lines", where, net, exp.Count(this=exp.Distinct(expressions=[_col("operation")]))

    def purchase_having(self, node: Purchases, net: exp.Expr, count: exp.Expr) -> tuple[exp.Expr, bool]:
        """The condition on a member's group of rows, and whether a member without rows meets it."""
        cmp = node.cmp
        if node.metric == "count":
            return self.compare(count, cmp, self.lit), _holds(cmp, 0)
        if node.metric == "sum":
            return self.compare(exp.Sum(this=net), cmp, self.lit), _holds(cmp, Decimal(0))
        if node.metric == "avg":
            # avg op v  <=>  sum op v * count (exact, no division); no purchases: no average.
            return self.avg_having(exp.Sum(this=net), count, cmp), False
        moment = (
            exp.Max(this=_col("cheque_at"))
            if node.metric == "days_since_last"
            else exp.Min(this=_col("cheque_at"))
        )
        return self.compare(moment, _days_to_time(cmp, self.ctx.now), self.lit), False

    def grouped(
        self, table: str, conditions: Sequence[exp.Expr], having: exp.Expr, matches_zero: bool
    ) -> exp.Expr:
        """Members whose rows of ``table`` (matching ``conditions``) satisfy ``having``; with
        ``matches_zero``, members without such rows too."""
        where = [exp.Not(this=exp.Is(this=_col("member_id"), expression=exp.null())), *conditions]
        self.restrict(where)
        query = exp.select("member_id").from_(self.table(table)).where(exp.and_(*where)).group_by("member_id")
        if matches_zero:
            # Everyone but those whose rows make it false.
            return self.member_in(query.having(exp.Not(this=exp.paren(having))), negate=True)
        return self.member_in(query.having(having))

    def leaf_purchases(self, node: Purchases) -> exp.Expr:
        if _from_features(node):
            return self.purchases_from_features(node)
        table, where, net, count = self.purchase_source(node)
        having, matches_zero = self.purchase_having(node, net, count)
        return self.grouped(table, where, having, matches_zero)

    def purchases_from_features(self, node: Purchases) -> exp.Expr:
        """An all-time condition on all purchases, read from the sums the warehouse keeps per
        member (``member_features``: confirmed purchases, net of refunds, as the purchase rows
        give them) instead of grouping every purchase of every member."""
        count = _col("purchases_count")
        cmp = node.cmp
        if node.metric == "count":
            having, matches_zero = self.compare(count, cmp, self.lit), _holds(cmp, 0)
        elif node.metric == "sum":
            having, matches_zero = self.compare(_col("ltv"), cmp, self.lit), _holds(cmp, Decimal(0))
        elif node.metric == "avg":
            positive = exp.GT(this=count.copy(), expression=_int(0))
            having, matches_zero = exp.and_(positive, self.avg_having(_col("ltv"), count, cmp)), False
        else:
            moment = _col("last_purchase_at" if node.metric == "days_since_last" else "first_purchase_at")
            having, matches_zero = self.compare(moment, _days_to_time(cmp, self.ctx.now), self.lit), False
        where = [exp.Not(this=exp.paren(having)) if matches_zero else having]
        self.restrict(where)
        query = exp.select("member_id").from_(self.table("member_features")).where(exp.and_(*where))
        return self.member_in(query, negate=matches_zero)

    def all_of(self, items: Sequence[Node]) -> exp.Expr:
        """``all``: the conditions on the member row narrow every subquery of the others (a
        purchase or event aggregate then reads the rows of those members only: "women in Kazan
        with 2+ purchases this year" groups their purchases, not everyone's); purchase conditions
        over the same rows (same period and filters) share one scan, their conditions joined in
        one HAVING (when none holds for members without rows).

        Narrowing is exact: a member passes the ``all`` only if it passes the row conditions, and
        for such a member "in the subquery" and "in the narrowed subquery" are the same."""
        row = {id(i): self.node(i) for i in items if isinstance(i, _ROW_ONLY)}
        if not row or len(row) == len(items):
            return self._all_of(items, row)
        self.scope.extend(row.values())
        try:
            return self._all_of(items, row)
        finally:
            del self.scope[-len(row) :]

    def _all_of(self, items: Sequence[Node], done: dict[int, exp.Expr]) -> exp.Expr:
        shared: dict[tuple[Any, ...], list[Purchases]] = {}
        for item in items:
            if isinstance(item, Purchases) and not _from_features(item):
                key = (
                    item.by_line,
                    item.period,
                    item.skus,
                    item.categories,
                    item.groups,
                    item.stores,
                    item.store_formats,
                    item.channels,
                )
                shared.setdefault(key, []).append(item)
        fused: dict[int, exp.Expr] = {}
        skipped: set[int] = set()
        for nodes in shared.values():
            table, where, net, count = self.purchase_source(nodes[0])
            parts = [(n, *self.purchase_having(n, net, count)) for n in nodes]
            joinable = [(n, having) for n, having, zero in parts if not zero]
            if len(joinable) < 2:
                continue
            fused[id(joinable[0][0])] = self.grouped(table, where, exp.and_(*[h for _, h in joinable]), False)
            skipped.update(id(n) for n, _ in joinable[1:])
        out = []
        for item in items:
            if id(item) in skipped:
                continue
            compiled = fused.get(id(item))
            if compiled is None:
                compiled = done[id(item)].copy() if id(item) in done else self.node(item)
            out.append(exp.paren(compiled))
        return exp.and_(*out)

    def avg_having(self, total: exp.Expr, count: exp.Expr, cmp: Compare) -> exp.Expr:
        def scaled(value: Any) -> exp.Expr:
            return exp.Mul(this=exp.paren(self.num(value)), expression=count.copy())

        op, v = cmp.op, cmp.value
        if op == "between":
            return exp.and_(
                exp.GTE(this=total.copy(), expression=scaled(v[0])),
                exp.LTE(this=total.copy(), expression=scaled(v[1])),
            )
        klass = {"eq": exp.EQ, "neq": exp.NEQ, "gt": exp.GT, "gte": exp.GTE, "lt": exp.LT, "lte": exp.LTE}[op]
        result: exp.Expr = klass(this=total.copy(), expression=scaled(v))
        return result

    def event_filter(self, prop: PropertyFilter) -> exp.Expr:
        cmp = prop.cmp
        if prop.name in EVENT_COLUMNS or prop.name == "type":
            column: exp.Expr = _col(prop.name)
        else:
            column = self.json_text(_col("properties"), prop.name)
        if cmp.op == "under":
            return self.known(
                column,
                exp.or_(
                    *[
                        exp.or_(
                            exp.EQ(this=column.copy(), expression=_str(str(v))),
                            self.starts_with(column.copy(), str(v) + CATEGORY_SEPARATOR),
                        )
                        for v in cmp.value
                    ]
                ),
            )
        if cmp.op in _ORDER_OPS:
            return self.value_predicate(
                self.to_number(column), cmp, lambda v: exp.Literal.number(format(v, "f"))
            )
        if cmp.op in _NULL_OPS:
            return self.value_predicate(column, cmp, self.lit)
        values = cmp.value if isinstance(cmp.value, tuple) else (cmp.value,)
        forms = tuple(_text_form(v) for v in values)
        as_text = Compare(cmp.op, forms if isinstance(cmp.value, tuple) else forms[0])
        return self.value_predicate(column, as_text, _str)

    def leaf_events(self, node: Events) -> exp.Expr:
        where: list[exp.Expr] = [
            exp.In(this=_col("type"), expressions=[_str(t) for t in node.types]),
        ]
        self.period_where(where, "occurred_at", node.period)
        if node.sources:
            where.append(exp.In(this=_col("source"), expressions=[_str(s) for s in node.sources]))
        if node.exclude_sources:
            where.append(
                exp.or_(
                    exp.Is(this=_col("source"), expression=exp.null()),
                    exp.Not(
                        this=exp.In(this=_col("source"), expressions=[_str(s) for s in node.exclude_sources])
                    ),
                )
            )
        for prop in node.properties:
            where.append(exp.paren(self.event_filter(prop)))
        if node.metric == "count":
            cmp = node.cmp
            if cmp.op == "gte" and cmp.value == 1:
                return self.exists_in("events", where)
            return self.aggregate("events", where, exp.Count(this=exp.Star()), cmp, 0, self.lit)
        latest = exp.Max(this=_col("occurred_at"))
        return self.aggregate("events", where, latest, _days_to_time(node.cmp, self.ctx.now), None, self.lit)

    def leaf_balance(self, node: Balance) -> exp.Expr:
        where = [exp.EQ(this=_col("currency"), expression=_str(node.currency))]
        return self.aggregate(
            "member_balances", where, exp.Sum(this=_col("balance")), node.cmp, Decimal(0), self.lit
        )

    def leaf_cardstate(self, node: CardState) -> exp.Expr:
        where: list[exp.Expr] = []
        if node.states:
            where.append(exp.In(this=_col("state"), expressions=[_str(s) for s in node.states]))
        if node.blocked is not None:
            where.append(exp.EQ(this=_col("blocked"), expression=exp.Boolean(this=node.blocked)))
        return self.exists_in("member_cards", where)

    def leaf_loyaltystatus(self, node: LoyaltyStatus) -> exp.Expr:
        where = [exp.In(this=_col("status"), expressions=[_str(s) for s in node.statuses])]
        return self.exists_in("member_loyalty", where)

    def leaf_audience(self, node: Audience) -> exp.Expr:
        where = [exp.In(this=_col("audience"), expressions=[_str(a) for a in node.audiences])]
        return self.exists_in("audience_members", where)

    def leaf_rfm(self, node: Rfm) -> exp.Expr:
        where: list[exp.Expr] = []
        for name, values in (("r", node.r), ("f", node.f), ("m", node.m)):
            if values:
                where.append(exp.In(this=_col(name), expressions=[_int(v) for v in values]))
        if node.groups:
            where.append(exp.In(this=_col("rfm_group"), expressions=[_str(g) for g in node.groups]))
        return self.exists_in("rfm_scores", where)

    def leaf_segmentref(self, node: SegmentRef) -> exp.Expr:
        if node.segment in self.stack:
            raise CompileError(f"segment {node.segment} refers to itself")
        definition = self.ctx.segments.get(node.segment)
        if definition is None:
            raise CompileError(f"segment {node.segment} is not given")
        self.stack.append(node.segment)
        try:
            return exp.paren(self.node(definition))
        finally:
            self.stack.pop()


def _text_form(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral_value() else format(value, "f")
    return str(value)


def _holds(cmp: Compare, value: Any) -> bool:
    op, v = cmp.op, cmp.value
    checks: dict[str, Callable[[], bool]] = {
        "eq": lambda: value == v,
        "neq": lambda: value != v,
        "gt": lambda: value > v,
        "gte": lambda: value >= v,
        "lt": lambda: value < v,
        "lte": lambda: value <= v,
        "between": lambda: v[0] <= value <= v[1],
        "in": lambda: value in v,
        "not_in": lambda: value not in v,
    }
    return checks[op]()


def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


def _age_to_birth_date(cmp: Compare, today: date) -> Compare:
    """``age op n`` as a comparison on the birth date (age = completed years today)."""

    def latest_born(age: int) -> date:  # born on or before this day -> at least ``age``
        return _years_before(today, age)

    def earliest_born(age: int) -> date:  # born after this day -> at most ``age``
        return _years_before(today, age + 1)

    op, v = cmp.op, cmp.value
    if op in _NULL_OPS:
        return cmp
    if op == "gte":
        return Compare("lte", latest_born(v))
    if op == "gt":
        return Compare("lte", latest_born(v + 1))
    if op == "lte":
        return Compare("gt", earliest_born(v))
    if op == "lt":
        return Compare("gt", earliest_born(v - 1))
    if op in ("eq", "neq"):
        low, high = earliest_born(v), latest_born(v)
        return Compare("_range_" + op, (low, high))
    if op == "between":
        return Compare("_range_eq", (earliest_born(v[1]), latest_born(v[0])))
    raise CompileError(op)


def _days_to_time(cmp: Compare, now: datetime) -> Compare:
    """``days since t op n`` (whole days elapsed) as a comparison on the time ``t``."""

    def ago(days: int) -> datetime:
        return now - timedelta(days=days)

    op, v = cmp.op, cmp.value
    if op in _NULL_OPS:
        return cmp
    # days(t) >= n  <=>  t <= now - n days ;  days(t) <= n  <=>  t > now - (n + 1) days
    if op == "gte":
        return Compare("lte", ago(v))
    if op == "gt":
        return Compare("lte", ago(v + 1))
    if op == "lte":
        return Compare("gt", ago(v + 1))
    if op == "lt":
        return Compare("gt", ago(v))
    if op in ("eq", "neq"):
        return Compare("_range_" + op, (ago(v + 1), ago(v)))
    if op == "between":
        return Compare("_range_eq", (ago(v[1] + 1), ago(v[0])))
    raise CompileError(op)


# ---------------------------------------------------------------- queries


def predicate(node: Node, target: Target, ctx: Context, *, only: Sequence[int] | None = None) -> exp.Expr:
    """The condition on the member row ``m`` (alias of the warehouse ``members`` table)."""
    return _Compiler(target, ctx, only).node(node)


def _universe(compiler: _Compiler) -> list[exp.Expr]:
    where: list[exp.Expr] = [exp.Is(this=_col("merged_into", "m"), expression=exp.null())]
    if compiler.only is not None:
        where.append(
            exp.In(this=_col("member_id", "m"), expressions=[_int(i) for i in compiler.only] or [exp.null()])
        )
    return where


def members_query(
    node: Node,
    target: Target,
    ctx: Context,
    *,
    only: Sequence[int] | None = None,
    order: bool = False,
    limit: int | None = None,
) -> exp.Select:
    """``SELECT m.member_id`` of the members the definition selects (optionally among ``only``)."""
    compiler = _Compiler(target, ctx, only)
    condition = compiler.node(node)
    query = (
        exp.select(_col("member_id", "m").as_("member_id"))
        .from_(compiler.table("members", "m"))
        .where(exp.and_(*_universe(compiler), exp.paren(condition)))
    )
    if order:
        query = query.order_by(_col("member_id", "m"))
    if limit is not None:
        query = query.limit(limit)
    return query


def count_query(node: Node, target: Target, ctx: Context) -> exp.Select:
    compiler = _Compiler(target, ctx, None)
    condition = compiler.node(node)
    return (
        exp.select(exp.Count(this=exp.Star()).as_("n"))
        .from_(compiler.table("members", "m"))
        .where(exp.and_(*_universe(compiler), exp.paren(condition)))
    )


def render(query: exp.Expr, target: Target) -> str:
    return query.sql(dialect=target.dialect)


def members_sql(node: Node, target: Target, ctx: Context, **kwargs: Any) -> str:
    return render(members_query(node, target, ctx, **kwargs), target)


def count_sql(node: Node, target: Target, ctx: Context) -> str:
    return render(count_query(node, target, ctx), target)


def explain(tree: Any, now: datetime, dialects: Iterable[Dialect] = DIALECTS) -> dict[str, str]:
    """The SQL of a definition without references, per dialect (docs, debugging)."""
    node = parse(tree)
    ctx = Context(now=now)
    return {d: count_sql(node, Target(d, "omniloyal" if d == "clickhouse" else None), ctx) for d in dialects}


def literal(value: Any, target: Target) -> exp.Expr:
    """``value`` (time, date, Decimal, int, bool, str) as a literal of the target's dialect."""
    return _Compiler(target, Context(now=datetime(2000, 1, 1, tzinfo=UTC)), None).lit(value)


def table_ref(name: str, target: Target, alias: str | None = None) -> exp.Expr:
    """A warehouse table for reading (``db.name FINAL`` on ClickHouse)."""
    return _Compiler(target, Context(now=datetime(2000, 1, 1, tzinfo=UTC)), None).table(name, alias)


def render_template(template: str, target: Target, **values: Any) -> str:
    """``template`` (DuckDB SQL with ``:name`` placeholders) for the target's dialect.

    Values are SQLGlot expressions or Python values (made literals, never pasted as text).
    Tables read become ``db.t FINAL`` on ClickHouse; the table an INSERT writes becomes
    ``db.t``; names of CTEs are left alone."""
    from sqlglot import parse_one

    tree = parse_one(template, read="duckdb")
    args = {k: v if isinstance(v, exp.Expr) else literal(v, target) for k, v in values.items()}
    tree = exp.replace_placeholders(tree, **args)
    if target.clickhouse:
        ctes = {cte.alias for cte in tree.find_all(exp.CTE)}
        written = tree.this if isinstance(tree, exp.Insert) else None
        if isinstance(written, exp.Schema):
            written = written.this
        for table in list(tree.find_all(exp.Table)):
            if table.name in ctes or table.db or isinstance(table.parent, exp.Final):
                continue
            if table is written:
                table.set("db", exp.to_identifier(target.database) if target.database else None)
                continue
            alias = table.args.get("alias")
            table.replace(table_ref(table.name, target, alias.name if alias else None))
    return tree.sql(dialect=target.dialect)
