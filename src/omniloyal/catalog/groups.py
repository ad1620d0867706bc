"""Product group rules and attribute matching: pure functions (no I/O), shared by the catalogue
(resolving a group's products) and the offers side (deciding which groups a cheque line is in).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

CATEGORY_SEPARATOR = " / "

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def category_under(path: str | None, prefix: str) -> bool:
    """True if ``path`` is the category ``prefix`` or one of its sub-categories."""
    return bool(path) and (path == prefix or path.startswith(prefix + CATEGORY_SEPARATOR))  # type: ignore[union-attr]


def canonical(value: Any) -> str:
    """One text form per attribute value, so 5, 5.0 and "5" compare equal, and true equals "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        number = Decimal(str(value))
    elif isinstance(value, str) and _NUMBER.match(value):
        number = Decimal(value)
    else:
        return str(value)
    try:
        return format(number.normalize(), "f")
    except InvalidOperation:  # inf / nan: not comparable as numbers, keep the text
        return str(value)


def attribute_matches(value: Any, wanted: Iterable[Any]) -> bool:
    """Whether an attribute value (a scalar or a list of them) equals one of ``wanted``."""
    if value is None:
        return False
    wanted_forms = {canonical(w) for w in wanted}
    values = value if isinstance(value, list | tuple | set | frozenset) else (value,)
    return any(canonical(v) in wanted_forms for v in values)


def rule_matches(
    rule: Mapping[str, Any],
    sku: str,
    category_path: str | None,
    brand: str | None,
    attributes: Mapping[str, Any],
) -> bool:
    """Whether a product belongs to a rule group.

    ``rule`` is ``{"categories": [path...], "brands": [...], "attributes": {name: [values]},
    "exclude_skus": [...]}``; every part given (non-empty) must match, a category matches its
    sub-categories, and an excluded sku never matches. A rule with no parts matches every product.
    """
    if sku in (rule.get("exclude_skus") or ()):
        return False
    categories = rule.get("categories") or ()
    if categories and not any(category_under(category_path, c) for c in categories):
        return False
    brands = rule.get("brands") or ()
    if brands and brand not in brands:
        return False
    wanted_attributes: Mapping[str, Any] = rule.get("attributes") or {}
    for name, wanted in wanted_attributes.items():
        values = wanted if isinstance(wanted, list | tuple | set | frozenset) else (wanted,)
        if not attribute_matches(attributes.get(name), values):
            return False
    return True
