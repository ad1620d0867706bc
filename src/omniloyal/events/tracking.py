"""Web, app and contact-centre events: the types, their properties, utm capture, the JS tracker.

Each ingest type has a few required properties (``product_view`` needs ``sku``...); they are
checked and normalised here (decimals become strings such as ``"199.90"``, quantities
positive), everything else the sender gives is kept as it is. Pure functions: no database.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from omniloyal.events.envelope import UTM_FIELDS
from omniloyal.kernel.errors import AppError

# Types from sites, apps, the contact centre and integrations: they go to the outbox (and so
# to the warehouse, features and triggers) and never run offers.
WEB_TYPES = frozenset(
    {
        "page_view",
        "section_view",
        "product_view",
        "category_view",
        "search",
        "add_to_cart",
        "remove_from_cart",
        "order_placed",
        "order_paid",
        "order_cancelled",
        "order_status_changed",
        "login",
        "registration",
        "identify",
        "app_installed",
        "contact_center_call",
        "custom",
    }
)
# Events that say "this visitor is this member": with an anonymous id they link the two.
IDENTIFYING_TYPES = frozenset({"login", "registration", "identify"})
# A click from a message (the tracking link adds it) identifies the visitor too.
MESSAGE_ID_PROPERTY = "message_id"
# How far back the anonymous history of a visitor is attached to the member (the warehouse
# applies it when it handles ``identity.linked``).
ANONYMOUS_HISTORY_DAYS = 60

_SOURCE = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
_DEFAULT_SOURCES = {"app_installed": "mobile_app", "contact_center_call": "contact_center"}
MAX_TEXT = 500


def _text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("a string")
    text = str(value).strip()
    if not text:
        raise ValueError("a non-empty string")
    if len(text) > MAX_TEXT:
        raise ValueError(f"at most {MAX_TEXT} characters")
    return text


def _number(value: Any) -> Decimal:
    # Trackers send JavaScript numbers: a float is read through its shortest repr ("199.9").
    if isinstance(value, bool):
        raise ValueError("a number")
    try:
        if isinstance(value, float):
            number = Decimal(repr(value))
        elif isinstance(value, int | str):
            number = Decimal(str(value).strip())
        else:
            raise ValueError("a number")
    except InvalidOperation as exc:
        raise ValueError("a number") from exc
    if not number.is_finite():
        raise ValueError("a finite number")
    return number


def _amount(value: Any) -> str:
    number = _number(value)
    if number < 0:
        raise ValueError("zero or more")
    return format(number.quantize(Decimal("0.01")), "f")


def _quantity(value: Any) -> str:
    number = _number(value)
    if number <= 0:
        raise ValueError("more than zero")
    return format(number.normalize(), "f") if number == number.to_integral_value() else format(number, "f")


def _seconds(value: Any) -> int:
    number = _number(value)
    if number < 0:
        raise ValueError("zero or more seconds")
    return int(number.to_integral_value())


Check = Callable[[Any], Any]
# type -> (required properties, optional properties with a type to check)
RULES: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    "page_view": ({}, {}),
    "section_view": ({"section": _text}, {}),
    "product_view": ({"sku": _text}, {"price": _amount, "category": _text}),
    "category_view": ({"category": _text}, {}),
    "search": ({"query": _text}, {}),
    "add_to_cart": ({"sku": _text}, {"quantity": _quantity, "price": _amount}),
    "remove_from_cart": ({"sku": _text}, {"quantity": _quantity, "price": _amount}),
    "order_placed": ({"order_id": _text, "amount": _amount}, {"status": _text}),
    "order_paid": ({"order_id": _text, "amount": _amount}, {"status": _text}),
    "order_cancelled": ({"order_id": _text}, {"amount": _amount, "status": _text}),
    "order_status_changed": ({"order_id": _text, "status": _text}, {"amount": _amount}),
    "login": ({}, {}),
    "registration": ({}, {}),
    "identify": ({}, {}),
    "app_installed": ({}, {"platform": _text}),
    "contact_center_call": ({"topic": _text, "duration": _seconds}, {}),
    "custom": ({"name": _text}, {}),
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "add_to_cart": {"quantity": "1"},
    "remove_from_cart": {"quantity": "1"},
    "order_placed": {"status": "placed"},
    "order_paid": {"status": "paid"},
    "order_cancelled": {"status": "cancelled"},
}


def check_properties(event_type: str, properties: dict[str, Any]) -> dict[str, Any]:
    """The properties with the type's required ones present and checked values normalised."""
    required, optional = RULES[event_type]
    if (
        not required
        and not optional
        and event_type not in _DEFAULTS
        and MESSAGE_ID_PROPERTY not in properties
    ):
        return properties
    result = dict(properties)
    for name, check in required.items():
        value = properties.get(name)
        if value is None or value == "":
            raise AppError(
                "missing_property",
                f"A {event_type} event needs properties.{name}",
                field=f"properties.{name}",
            )
        result[name] = _checked(check, value, event_type, name)
    for name, check in optional.items():
        value = properties.get(name)
        if value is not None:
            result[name] = _checked(check, value, event_type, name)
    for name, value in _DEFAULTS.get(event_type, {}).items():
        result.setdefault(name, value)
    message_id = properties.get(MESSAGE_ID_PROPERTY)
    if message_id is not None:
        result[MESSAGE_ID_PROPERTY] = _checked(_text, message_id, event_type, MESSAGE_ID_PROPERTY)
    return result


def _checked(check: Check, value: Any, event_type: str, name: str) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise AppError(
            "invalid_property",
            f"properties.{name} of a {event_type} event must be {exc}",
            field=f"properties.{name}",
        ) from exc


def check_source(source: str | None, event_type: str, fallback: str) -> str:
    if source is None:
        return _DEFAULT_SOURCES.get(event_type, fallback)
    if not _SOURCE.match(source):
        raise AppError(
            "invalid_source",
            "source is a lower-case channel name: web, mobile_app, online_store, contact_center...",
            field="source",
        )
    return source


def utm_of(given: dict[str, str] | None, url: str | None) -> dict[str, str]:
    """utm fields: those given (with or without the ``utm_`` prefix) win over the page URL's."""
    result: dict[str, str] = {}
    if url and "utm_" in url:
        result.update(utm_from_url(url))
    if given:
        for key, value in given.items():
            name = key if key.startswith("utm_") else f"utm_{key}"
            if name not in UTM_FIELDS:
                raise AppError(
                    "unknown_field",
                    f"utm.{key} is not a utm field; use {', '.join(UTM_FIELDS)}",
                    field=f"utm.{key}",
                )
            if len(value) > MAX_TEXT:
                raise AppError("invalid_value", f"utm.{key} is too long", field=f"utm.{key}")
            if value:
                result[name] = value
    return result


def utm_from_url(url: str) -> dict[str, str]:
    try:
        query = urlsplit(url).query
    except ValueError:
        return {}
    result: dict[str, str] = {}
    for key, value in parse_qsl(query):
        if key in UTM_FIELDS and value and key not in result:
            result[key] = value[:MAX_TEXT]
    return result


def identity_link_id(anonymous_id: str, member_id: int) -> str:
    """The ``identity.linked`` event id: one per (visitor, member), however often they log in."""
    key = anonymous_id if len(anonymous_id) <= 120 else hashlib.sha256(anonymous_id.encode()).hexdigest()
    return f"identity.linked:{key}:{member_id}"


# ---------------------------------------------------------------- the JS tracker

STATIC = Path(__file__).parent / "static"
TRACKER_FILE = STATIC / "tracker.js"
TRACKER_CACHE_SECONDS = 3600


@lru_cache(maxsize=1)
def tracker_script() -> tuple[bytes, str]:
    """The tracker's bytes and their ETag (the file ships with the package; read once)."""
    body = TRACKER_FILE.read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
