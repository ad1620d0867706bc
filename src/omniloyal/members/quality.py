"""Contact data quality: phones, e-mails and addresses checked offline, flags kept on the member.

* **Phone**: parsed and validated with ``phonenumbers`` (E.164), its type (mobile, fixed line...),
  the operator the number range was allocated to (``phonenumbers.carrier``; a ported Russian
  number needs the Rossvyaz numbering plan and the BDPN portability database for the real
  operator) and its time zone where the number says it (fixed lines; a Russian mobile number
  names no region offline). Placeholder numbers (``+7 999 999-99-99``) are invalid.
* **E-mail**: syntax (``email_validator``, no DNS), the domain's top-level domain against the
  Public Suffix List shipped in ``data/tlds.txt``, known typos of big providers
  (``gmial.com`` → ``gmail.com``, ``yandex.ry`` → ``yandex.ru``), disposable and placeholder
  addresses; the provider's name.
* **Address**: the city (from ``city`` or the address text) normalised through an offline
  gazetteer (``data/cities.csv``: Russian cities of 100,000 people and more, regional capitals,
  CIS capitals) with its region and IANA time zone; a member without a time zone gets the
  city's.

:func:`refresh` recomputes the flags of some members in the caller's transaction (call it when
a member is created or changed); :func:`refresh_all` does the whole base in batches
(``python -m omniloyal.members.quality``). A member changed after its last check
(``updated_at > quality_checked_at``) is "pending"; the report and the duplicate search refresh
a bounded number of pending members first (:func:`refresh_pending`).

The same pass keeps ``member_contact_keys``: canonical phones and e-mails (from the contact
columns and from questionnaire attributes whose code says phone or e-mail), with provider
aliases folded (``Ivan.Petrov+shop@googlemail.com`` → ``ivanpetrov@gmail.com``), so members that
share one are found as probable duplicates.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers import carrier, timezone
from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from omniloyal.db.engine import Database
from omniloyal.kernel.clock import utcnow
from omniloyal.members.models import Member, MemberContactKey
from omniloyal.members.normalize import InvalidContact, normalize_phone

DATA = Path(__file__).parent / "data"
VALID, INVALID, MISSING, UNRECOGNISED = "valid", "invalid", "missing", "unrecognised"
# A report or a duplicate search refreshes at most this many pending members in the request;
# a bigger backlog (after a bulk import) is for ``python -m omniloyal.members.quality``.
PENDING_LIMIT = 5000
BATCH = 1000

# ---------------------------------------------------------------- phones

_PHONE_TYPES = {
    phonenumbers.PhoneNumberType.FIXED_LINE: "fixed_line",
    phonenumbers.PhoneNumberType.MOBILE: "mobile",
    phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE: "fixed_line_or_mobile",
    phonenumbers.PhoneNumberType.TOLL_FREE: "toll_free",
    phonenumbers.PhoneNumberType.PREMIUM_RATE: "premium_rate",
    phonenumbers.PhoneNumberType.SHARED_COST: "shared_cost",
    phonenumbers.PhoneNumberType.VOIP: "voip",
    phonenumbers.PhoneNumberType.PERSONAL_NUMBER: "personal_number",
    phonenumbers.PhoneNumberType.PAGER: "pager",
    phonenumbers.PhoneNumberType.UAN: "uan",
    phonenumbers.PhoneNumberType.VOICEMAIL: "voicemail",
}
SMS_TYPES = frozenset({"mobile", "fixed_line_or_mobile"})
_SEQUENCES = ("1234567", "7654321")


@dataclass(frozen=True, slots=True)
class PhoneQuality:
    status: str
    e164: str | None = None
    type: str | None = None
    operator: str | None = None
    timezone: str | None = None
    country: str | None = None
    issues: tuple[str, ...] = ()

    @property
    def sms(self) -> bool:
        return self.status == VALID and self.type in SMS_TYPES


def check_phone(raw: str | None, region: str = "RU") -> PhoneQuality:
    if raw is None or not raw.strip():
        return PhoneQuality(MISSING)
    try:
        number = phonenumbers.parse(raw.strip(), region.upper())
    except phonenumbers.NumberParseException:
        return PhoneQuality(INVALID, issues=("unparseable",))
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if not phonenumbers.is_valid_number(number):
        return PhoneQuality(INVALID, e164=e164, issues=("not_a_valid_number",))
    national = str(number.national_number)
    if len(set(national)) <= 2:
        # 999 999-99-99, 900 000-00-00: what people type to get past a form.
        return PhoneQuality(INVALID, e164=e164, issues=("placeholder",))
    kind = _PHONE_TYPES.get(phonenumbers.number_type(number), "unknown")
    country = phonenumbers.region_code_for_number(number)
    issues: list[str] = []
    if national[-7:] in _SEQUENCES:
        issues.append("suspicious_sequence")
    if kind not in SMS_TYPES:
        issues.append("no_sms")
    operator = (carrier.name_for_number(number, "en") or None) if kind in SMS_TYPES | {"voip"} else None
    return PhoneQuality(
        VALID,
        e164=e164,
        type=kind,
        operator=operator,
        timezone=_phone_zone(number, country),
        country=country,
        issues=tuple(issues),
    )


def _phone_zone(number: phonenumbers.PhoneNumber, country: str | None) -> str | None:
    zones = [z for z in timezone.time_zones_for_number(number) if z != "Etc/Unknown"]
    if len(zones) != 1:
        return None  # a mobile number of a country with several zones says nothing
    zone = zones[0]
    # phonenumbers names some Russian areas by a foreign zone of the same offset (Kaliningrad as
    # Europe/Bucharest): only a zone the gazetteer knows for that country is trusted.
    known = gazetteer().zones.get(country or "")
    if known is not None and zone not in known:
        return None
    return zone


# ---------------------------------------------------------------- e-mails

PROVIDERS: dict[str, str] = {
    "gmail.com": "Gmail",
    "googlemail.com": "Gmail",
    "yandex.ru": "Yandex",
    "ya.ru": "Yandex",
    "yandex.com": "Yandex",
    "yandex.by": "Yandex",
    "yandex.kz": "Yandex",
    "yandex.ua": "Yandex",
    "narod.ru": "Yandex",
    "mail.ru": "Mail.ru",
    "bk.ru": "Mail.ru",
    "inbox.ru": "Mail.ru",
    "list.ru": "Mail.ru",
    "internet.ru": "Mail.ru",
    "mail.ua": "Mail.ru",
    "rambler.ru": "Rambler",
    "lenta.ru": "Rambler",
    "autorambler.ru": "Rambler",
    "myrambler.ru": "Rambler",
    "ro.ru": "Rambler",
    "rambler.ua": "Rambler",
    "icloud.com": "iCloud",
    "me.com": "iCloud",
    "mac.com": "iCloud",
    "outlook.com": "Outlook",
    "hotmail.com": "Outlook",
    "live.com": "Outlook",
    "live.ru": "Outlook",
    "msn.com": "Outlook",
    "yahoo.com": "Yahoo",
    "ymail.com": "Yahoo",
    "aol.com": "AOL",
    "proton.me": "Proton",
    "protonmail.com": "Proton",
    "mail.com": "mail.com",
    "gmx.com": "GMX",
    "gmx.de": "GMX",
    "ukr.net": "ukr.net",
    "i.ua": "i.ua",
    "tut.by": "tut.by",
    "mail.kz": "mail.kz",
}
# A provider's name with the wrong top-level domain is a typo of its canonical domain.
# (Only providers without national domains: hotmail.fr or yahoo.co.uk are real.)
_CANONICAL_BY_LABEL = {"gmail": "gmail.com", "googlemail": "googlemail.com", "icloud": "icloud.com"}
DISPOSABLE = frozenset(
    {
        "mailinator.com",
        "yopmail.com",
        "10minutemail.com",
        "guerrillamail.com",
        "temp-mail.org",
        "tempmail.com",
        "trashmail.com",
        "getnada.com",
        "sharklasers.com",
        "dropmail.me",
        "mailforspam.com",
        "mohmal.com",
    }
)
_PLACEHOLDER_DOMAINS = frozenset(
    {
        "example.com",
        "example.org",
        "example.net",
        "example.ru",
        "test.com",
        "test.ru",
        "domain.com",
        "site.ru",
    }
)
_PLACEHOLDER_LOCALS = frozenset(
    {"noemail", "nomail", "no-email", "no_email", "none", "null", "test", "asdf", "qwerty", "нет", "no"}
)
_GMAIL = frozenset({"gmail.com", "googlemail.com"})
_YANDEX = frozenset({"yandex.ru", "ya.ru", "yandex.com", "yandex.by", "yandex.kz", "yandex.ua", "narod.ru"})
_PLUS_TAGS = (
    _GMAIL | _YANDEX | {"outlook.com", "hotmail.com", "live.com", "icloud.com", "me.com", "proton.me"}
)


@dataclass(frozen=True, slots=True)
class EmailQuality:
    status: str
    normalized: str | None = None
    domain: str | None = None
    provider: str | None = None
    suggestion: str | None = None
    issues: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def public_tlds() -> frozenset[str]:
    lines = (DATA / "tlds.txt").read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def _distance(a: str, b: str, limit: int) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance, cut off above ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
        previous2, previous = previous, current
    return previous[-1]


def provider_typo(domain: str) -> str | None:
    """The big provider's domain ``domain`` is probably a misspelling of, if any."""
    if domain in PROVIDERS:
        return None
    label, _, suffix = domain.partition(".")
    if label in _CANONICAL_BY_LABEL and suffix:
        return _CANONICAL_BY_LABEL[label]
    best: tuple[int, str] | None = None
    for candidate in PROVIDERS:
        if len(candidate) < 7 or domain.endswith(candidate):
            # bk.ru, ya.ru, i.ua: one letter away from countless real domains; email.ru is no mail.ru typo
            continue
        limit = 2 if len(candidate) >= 9 else 1
        d = _distance(domain, candidate, limit)
        if d <= limit and (best is None or d < best[0]):
            best = (d, candidate)
    return best[1] if best else None


def check_email(raw: str | None) -> EmailQuality:
    if raw is None or not raw.strip():
        return EmailQuality(MISSING)
    text = raw.strip()
    try:
        checked = validate_email(text, check_deliverability=False)
    except EmailNotValidError:
        domain = text.rpartition("@")[2].lower() if "@" in text else None
        suggestion = provider_typo(domain) if domain else None
        return EmailQuality(INVALID, domain=domain, suggestion=suggestion, issues=("syntax",))
    normalized = checked.normalized.lower()
    local, _, domain = normalized.rpartition("@")
    ascii_domain = (checked.ascii_domain or domain).lower()
    tld = ascii_domain.rsplit(".", 1)[-1]
    issues: list[str] = []
    suggestion = provider_typo(domain)
    if tld not in public_tlds():
        issues.append("unknown_tld")
    if suggestion is not None:
        issues.append("domain_typo")
    if domain in DISPOSABLE:
        issues.append("disposable")
    if domain in _PLACEHOLDER_DOMAINS or local in _PLACEHOLDER_LOCALS:
        issues.append("placeholder")
    return EmailQuality(
        INVALID if issues else VALID,
        normalized=normalized,
        domain=domain,
        provider=PROVIDERS.get(domain),
        suggestion=f"{local}@{suggestion}" if suggestion else None,
        issues=tuple(issues),
    )


def canonical_email(email: str) -> str:
    """The mailbox an address delivers to: provider aliases and ``+tags`` folded, so two
    spellings of one mailbox compare equal (``Ivan.Petrov+shop@googlemail.com`` =
    ``ivanpetrov@gmail.com``; at Yandex dots and hyphens are the same)."""
    local, _, domain = email.strip().lower().rpartition("@")
    if domain in _PLUS_TAGS:
        local = local.split("+", 1)[0]
    if domain in _GMAIL:
        return local.replace(".", "") + "@gmail.com"
    if domain in _YANDEX:
        return local.replace(".", "-") + "@yandex.ru"
    return f"{local}@{domain}"


# ---------------------------------------------------------------- addresses


@dataclass(frozen=True, slots=True)
class City:
    name: str
    region: str
    timezone: str
    country: str


@dataclass(frozen=True)
class Gazetteer:
    by_name: dict[str, City]
    zones: dict[str, frozenset[str]]

    def find(self, text: str | None) -> City | None:
        if not text:
            return None
        return self.by_name.get(_city_key(text))


_PREFIX = re.compile(
    r"^(?:г\.?\s*о\.?\s+|городской округ\s+|город\s+|гор\.\s*|г\.\s*|г\s+|пгт\.?\s+|c\.\s*|city of\s+)"
)
_SPACES = re.compile(r"\s+")


def _city_key(text: str) -> str:
    key = _SPACES.sub(" ", text.strip().lower().replace("ё", "е")).strip(" .,;")
    key = _PREFIX.sub("", key).strip(" .,;")
    return key.replace(" - ", "-")


@lru_cache(maxsize=1)
def gazetteer() -> Gazetteer:
    by_name: dict[str, City] = {}
    zones: dict[str, set[str]] = {}
    with (DATA / "cities.csv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            city = City(row["city"], row["region"], row["timezone"], row["country"])
            zones.setdefault(city.country, set()).add(city.timezone)
            for name in [city.name, *row["aliases"].split("|")]:
                if name.strip():
                    by_name.setdefault(_city_key(name), city)
    return Gazetteer(by_name, {country: frozenset(z) for country, z in zones.items()})


_JUNK = re.compile(r"^[\W\d_]*$")
_JUNK_WORDS = frozenset(
    {"нет", "не указан", "не указано", "none", "null", "n/a", "na", "test", "тест", "xxx", "-"}
)
_REGION_WORDS = re.compile(r"(област|обл\.|край|республик|округ|россия|russia|рф\b|\d{6})")


@dataclass(frozen=True, slots=True)
class AddressQuality:
    status: str
    city: City | None = None
    issues: tuple[str, ...] = ()


def check_address(city: str | None, address: str | None) -> AddressQuality:
    given = [t for t in (city, address) if t is not None and t.strip()]
    if not given:
        return AddressQuality(MISSING)
    places = gazetteer()
    found = places.find(city)
    if found is None and address:
        for part in re.split(r"[,;\n]", address):
            if _REGION_WORDS.search(part.lower()):
                continue
            found = places.find(part)
            if found is not None:
                break
    if found is not None:
        issues = ("city_normalised",) if city and city.strip() != found.name else ()
        return AddressQuality(VALID, found, issues)
    if all(_JUNK.match(t.strip()) or _city_key(t) in _JUNK_WORDS for t in given):
        return AddressQuality(INVALID, issues=("junk",))
    # A real town may simply be smaller than the gazetteer's cities.
    return AddressQuality(UNRECOGNISED, issues=("city_not_in_gazetteer",))


# ---------------------------------------------------------------- a member as a whole

_PHONE_ATTRIBUTE = re.compile(r"phone|tel|mobile|телефон", re.IGNORECASE)
_EMAIL_ATTRIBUTE = re.compile(r"mail|почт", re.IGNORECASE)


@dataclass(slots=True)
class MemberQuality:
    phone: PhoneQuality
    email: EmailQuality
    address: AddressQuality
    keys: set[tuple[str, str]] = field(default_factory=set)

    def columns(self) -> dict[str, Any]:
        city = self.address.city
        return {
            "phone_status": self.phone.status,
            "phone_type": self.phone.type,
            "phone_operator": self.phone.operator,
            "email_status": self.email.status,
            "email_provider": self.email.provider,
            "address_status": self.address.status,
            "city_normalized": city.name if city else None,
            "region": city.region if city else None,
            "quality": {
                "phone": _drop_empty(
                    {
                        "issues": list(self.phone.issues),
                        "timezone": self.phone.timezone,
                        "country": self.phone.country,
                        "sms": self.phone.sms,
                    }
                ),
                "email": _drop_empty(
                    {
                        "issues": list(self.email.issues),
                        "domain": self.email.domain,
                        "suggestion": self.email.suggestion,
                    }
                ),
                "address": _drop_empty(
                    {
                        "issues": list(self.address.issues),
                        "timezone": city.timezone if city else None,
                        "country": city.country if city else None,
                    }
                ),
            },
        }

    def timezone(self) -> str | None:
        """The member's zone as the contacts tell it: the city's first, else a fixed line's."""
        if self.address.city is not None:
            return self.address.city.timezone
        return self.phone.timezone


def _drop_empty(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v not in (None, [], "")}


def assess(
    *,
    phone: str | None,
    email: str | None,
    city: str | None,
    address: str | None,
    attributes: dict[str, Any] | None = None,
    region: str = "RU",
) -> MemberQuality:
    result = MemberQuality(check_phone(phone, region), check_email(email), check_address(city, address))
    if result.phone.status == VALID and result.phone.e164:
        result.keys.add(("phone", result.phone.e164))
    if result.email.normalized and "syntax" not in result.email.issues:
        result.keys.add(("email", canonical_email(result.email.normalized)))
    for code, value in (attributes or {}).items():
        if not isinstance(value, str) or not value.strip():
            continue
        if _PHONE_ATTRIBUTE.search(code):
            with contextlib.suppress(InvalidContact):
                result.keys.add(("phone", normalize_phone(value, region)))
        elif _EMAIL_ATTRIBUTE.search(code) and "@" in value:
            extra = check_email(value)
            if extra.normalized:
                result.keys.add(("email", canonical_email(extra.normalized)))
    return result


# ---------------------------------------------------------------- keeping the flags


def _pending() -> Any:
    return and_(
        Member.merged_into_id.is_(None),
        or_(Member.quality_checked_at.is_(None), Member.updated_at > Member.quality_checked_at),
    )


def refresh(session: Session, member_ids: Iterable[int], region: str = "RU") -> int:
    """Recomputes the quality flags and contact keys of these members in the caller's
    transaction (a merged member only loses its keys). Returns how many were checked."""
    ids = sorted(set(member_ids))
    done = 0
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        rows = session.execute(
            select(
                Member.id,
                Member.phone,
                Member.email,
                Member.city,
                Member.address,
                Member.attributes,
                Member.timezone,
                Member.updated_at,
                Member.merged_into_id,
            ).where(Member.id.in_(chunk))
        ).all()
        session.execute(delete(MemberContactKey).where(MemberContactKey.member_id.in_(chunk)))
        now = utcnow()
        updates: list[dict[str, Any]] = []
        keys: list[dict[str, Any]] = []
        for member_id, phone, email, city, address, attributes, zone, updated_at, merged_into in rows:
            if merged_into is not None:
                continue
            quality = assess(
                phone=phone, email=email, city=city, address=address, attributes=attributes, region=region
            )
            values = quality.columns()
            values["id"] = member_id
            values["quality_checked_at"] = now
            # Checking is not a change: updated_at stays, unless the time zone is filled in.
            values["updated_at"] = updated_at
            if zone is None and (found := quality.timezone()) is not None:
                values["timezone"] = found
                values["updated_at"] = now
            else:
                values["timezone"] = zone
            updates.append(values)
            keys.extend({"kind": k, "value": v, "member_id": member_id} for k, v in sorted(quality.keys))
        if updates:
            session.execute(update(Member), updates)
            # Members loaded in this session show the new flags (and a filled-in time zone) too.
            checked = {u["id"] for u in updates}
            for obj in list(session.identity_map.values()):
                if isinstance(obj, Member) and obj.id in checked:
                    session.expire(obj)
        if keys:
            session.execute(insert(MemberContactKey), keys)
        done += len(updates)
    return done


def pending_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Member).where(_pending())) or 0


def refresh_pending(db: Database, limit: int = PENDING_LIMIT, region: str = "RU") -> int:
    """Checks members never checked or changed since, at most ``limit`` of them."""
    done = 0
    while done < limit:
        with db.transaction() as session:
            ids = list(
                session.scalars(
                    select(Member.id).where(_pending()).order_by(Member.id).limit(min(BATCH, limit - done))
                )
            )
            if not ids:
                break
            done += refresh(session, ids, region)
    return done


def refresh_all(
    db: Database,
    region: str = "RU",
    *,
    only_pending: bool = False,
    progress: Callable[[int], None] | None = None,
) -> int:
    """The whole member base (or only pending members), ``BATCH`` members per transaction."""
    done = 0
    last = 0
    while True:
        with db.transaction() as session:
            stmt = select(Member.id).where(Member.id > last, Member.merged_into_id.is_(None))
            if only_pending:
                stmt = stmt.where(_pending())
            ids = list(session.scalars(stmt.order_by(Member.id).limit(BATCH)))
            if not ids:
                return done
            done += refresh(session, ids, region)
            last = ids[-1]
        if progress is not None:
            progress(done)


# ---------------------------------------------------------------- report and duplicates


def report(session: Session) -> dict[str, Any]:
    """Valid / invalid / missing counts per channel over the members not merged away."""
    alive = Member.merged_into_id.is_(None)
    checked = Member.quality_checked_at.is_not(None)
    total = session.scalar(select(func.count()).select_from(Member).where(alive)) or 0
    pending = pending_count(session)

    def counts(column: Any) -> dict[str, int]:
        rows = session.execute(select(column, func.count()).where(alive, checked).group_by(column)).all()
        return {str(value): n for value, n in rows if value is not None}

    phone = counts(Member.phone_status)
    email = counts(Member.email_status)
    address = counts(Member.address_status)
    sms_valid = (
        session.scalar(
            select(func.count())
            .select_from(Member)
            .where(alive, checked, Member.phone_status == VALID, Member.phone_type.in_(sorted(SMS_TYPES)))
        )
        or 0
    )

    def channel(values: dict[str, int], *extra: str) -> dict[str, int]:
        out = {name: values.get(name, 0) for name in (VALID, INVALID, MISSING, *extra)}
        return out

    phone_out = channel(phone)
    sms_out = {
        VALID: sms_valid,
        INVALID: phone_out[VALID] + phone_out[INVALID] - sms_valid,
        MISSING: phone_out[MISSING],
    }
    return {
        "members": total,
        "checked": total - pending,
        "pending": pending,
        "channels": {
            "phone": phone_out,
            "sms": sms_out,
            "email": channel(email),
            "address": channel(address, UNRECOGNISED),
        },
    }


@dataclass(frozen=True, slots=True)
class DuplicatePair:
    member_id: int
    duplicate_id: int
    shared: tuple[tuple[str, str], ...]


def duplicate_pairs(
    session: Session, limit: int, after: tuple[int, int] | None = None
) -> list[DuplicatePair]:
    """Pairs of members (not merged away) sharing a canonical phone or e-mail, the older first."""
    a = aliased(MemberContactKey)
    b = aliased(MemberContactKey)
    ma = aliased(Member)
    mb = aliased(Member)
    stmt = (
        select(a.member_id, b.member_id, a.kind, a.value)
        .join(b, and_(a.kind == b.kind, a.value == b.value, a.member_id < b.member_id))
        .join(ma, ma.id == a.member_id)
        .join(mb, mb.id == b.member_id)
        .where(ma.merged_into_id.is_(None), mb.merged_into_id.is_(None))
    )
    if after is not None:
        stmt = stmt.where(or_(a.member_id > after[0], and_(a.member_id == after[0], b.member_id > after[1])))
    # Enough rows for ``limit`` pairs even when a pair shares several keys.
    rows = session.execute(stmt.order_by(a.member_id, b.member_id, a.kind).limit(limit * 4 + 4)).all()
    pairs: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for first, second, kind, value in rows:
        key = (first, second)
        if key not in pairs and len(pairs) == limit:
            break
        pairs.setdefault(key, []).append((kind, value))
    return [DuplicatePair(first, second, tuple(shared)) for (first, second), shared in pairs.items()]


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m omniloyal.members.quality [--pending]``: refresh the flags of every member."""
    from omniloyal.bootstrap import prepare
    from omniloyal.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m omniloyal.members.quality", description=main.__doc__)
    parser.add_argument("--pending", action="store_true", help="only members never checked or changed since")
    args = parser.parse_args(argv)
    settings = get_settings()
    db = Database(settings.database_url)
    prepare(db, settings)
    started = datetime.now()

    def progress(done: int) -> None:
        print(f"\r{done:,} members checked", end="", file=sys.stderr, flush=True)

    done = refresh_all(db, settings.default_phone_region, only_pending=args.pending, progress=progress)
    seconds = (datetime.now() - started).total_seconds()
    print(f"\r{done:,} members checked in {seconds:.1f} s", file=sys.stderr)
    db.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
