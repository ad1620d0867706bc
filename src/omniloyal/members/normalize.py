"""Contact cleaning at the edge: phones to E.164, e-mails lower-cased and validated.

``phonenumbers`` is the reference; parsing costs ~20-60 µs a number, which dominates a
million-row import, so numbers of the default region written the usual ways
(``8 (912) 345-67-89``, ``+7 912 345 67 89``, ``79123456789``, ``9123456789``) take a fast
path checked against the same metadata patterns the library uses.
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers import PhoneMetadata

from omniloyal.kernel.errors import AppError

_NON_DIGITS = re.compile(r"[\s\-().]")
_PHONE_CHARS = re.compile(r"^\+?[\d\s\-().]{5,32}$")


class InvalidContact(AppError):
    """A phone or e-mail that cannot be a real contact."""


@lru_cache(maxsize=32)
def _region_fast_path(region: str) -> tuple[str, str, re.Pattern[str]] | None:
    """(country code, national trunk prefix, general pattern) for the default region."""
    metadata = PhoneMetadata.metadata_for_region(region)
    if metadata is None or metadata.general_desc is None or not metadata.general_desc.national_number_pattern:
        return None
    trunk = metadata.national_prefix or ""
    return str(metadata.country_code), trunk, re.compile(metadata.general_desc.national_number_pattern)


def normalize_phone(raw: str, region: str = "RU", *, field: str = "phone") -> str:
    """Returns the number in E.164 (``+79123456789``) or raises ``invalid_phone``."""
    text = raw.strip()
    if not text or not _PHONE_CHARS.match(text):
        raise InvalidContact("invalid_phone", f"{raw!r} is not a phone number", field=field)
    digits = _NON_DIGITS.sub("", text)
    fast = _region_fast_path(region.upper())
    if fast is not None:
        country, trunk, pattern = fast
        national: str | None = None
        if digits.startswith("+" + country):
            national = digits[1 + len(country) :]
        elif not digits.startswith("+"):
            if digits.startswith(country) and pattern.fullmatch(digits[len(country) :]):
                national = digits[len(country) :]
            elif trunk and digits.startswith(trunk) and pattern.fullmatch(digits[len(trunk) :]):
                national = digits[len(trunk) :]
            elif pattern.fullmatch(digits):
                national = digits
        if national is not None and pattern.fullmatch(national):
            return f"+{country}{national}"
    try:
        number = phonenumbers.parse(text, region.upper())
    except phonenumbers.NumberParseException as exc:
        raise InvalidContact("invalid_phone", f"{raw!r} is not a phone number: {exc}", field=field) from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidContact("invalid_phone", f"{raw!r} is not a valid phone number", field=field)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_email(raw: str, *, field: str = "email") -> str:
    """Lower-cases and checks the syntax (no DNS: imports must not wait on the network)."""
    text = raw.strip()
    try:
        result = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidContact(
            "invalid_email", f"{raw!r} is not an e-mail address: {exc}", field=field
        ) from exc
    return result.normalized.lower()
