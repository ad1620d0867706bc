"""Plausible members of a Russian retail chain, drawn from one seeded random generator.

Identifiers are unique by construction (no set of used values to keep): phones and card
numbers are an affine permutation of a number range, e-mails end with the member's own
sequence number. So a million members cost no more memory than ten.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from math import gcd
from typing import Any
from zoneinfo import ZoneInfo

from omniloyal.demo import data
from omniloyal.members.importer import CardRecord, MemberRecord

# Shares of the demo population (see the test of proportions).
PHONE_SHARE = 0.95
EMAIL_SHARE = 0.70
BIRTH_DATE_SHARE = 0.85
CONSENT_SHARES = {"email": 0.60, "sms": 0.75, "viber": 0.30, "push": 0.40}
REPLACED_CARD_SHARE = 0.02
BLOCKED_CARD_SHARE = 0.005


class Permutation:
    """``i → (a·i + b) mod m``: a bijection of ``range(m)`` that looks random."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        a = rng.randrange(size // 3, size - 1)
        while gcd(a, size) != 1:
            a += 1
        self.a = a
        self.b = rng.randrange(size)

    def __call__(self, i: int) -> int:
        return (self.a * i + self.b) % self.size


@dataclass(frozen=True, slots=True)
class Home:
    """A city members live in, with the store codes there."""

    city: str
    timezone: str
    weight: int
    stores: tuple[str, ...]


def _ean13(body12: str) -> str:
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body12))
    return body12 + str((10 - total % 10) % 10)


class PersonFactory:
    """``member(i)`` is the i-th member (0-based); call in order: one generator drives them all."""

    def __init__(self, rng: random.Random, homes: Sequence[Home], today: date) -> None:
        self.rng = rng
        self.homes = list(homes)
        self.home_weights = [h.weight for h in homes]
        self.today = today
        self.zones = {h.timezone: ZoneInfo(h.timezone) for h in homes}
        self.phones = Permutation(len(data.MOBILE_CODES) * 10_000_000, rng)
        # 10^9 physical (13 digits, EAN-13 with the chain's 2600 prefix), 10^12 virtual numbers.
        self.physical = Permutation(1_000_000_000, rng)
        self.virtual = Permutation(1_000_000_000_000, rng)
        self.domains = [d for d, _ in data.EMAIL_DOMAINS]
        self.domain_weights = [w for _, w in data.EMAIL_DOMAINS]
        self.replacements = 0

    def phone(self, i: int) -> str:
        n = self.phones(i)
        return f"+7{data.MOBILE_CODES[n // 10_000_000]}{n % 10_000_000:07d}"

    def physical_number(self, i: int) -> str:
        return _ean13(f"260{self.physical(i):09d}")

    def virtual_number(self, i: int) -> str:
        return f"9643{self.virtual(i):012d}"

    def _email(self, i: int, first: str, last: str) -> str:
        rng = self.rng
        f, ln = data.translit(first), data.translit(last)
        style = rng.randrange(5)
        if style == 0:
            local = f"{f}.{ln}"
        elif style == 1:
            local = f"{f[0]}{ln}"
        elif style == 2:
            local = f"{ln}.{f}"
        elif style == 3:
            local = f"{f}_{ln[:4]}"
        else:
            local = ln
        # The sequence number keeps addresses unique; the local part always ends in a letter.
        domain = rng.choices(self.domains, self.domain_weights)[0]
        return f"{local}{rng.choice(('', '.', '_'))}{i + 1}@{domain}"

    def _birth_date(self) -> date:
        rng = self.rng
        # Loyalty members skew towards 25-55.
        age = int(rng.triangular(18, 80, 38))
        return self.today - timedelta(days=age * 365 + rng.randrange(365))

    def _children(self, parent_birth: date | None) -> list[dict[str, Any]]:
        rng = self.rng
        children = []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
            gender = rng.choice(("male", "female"))
            names = data.CHILD_NAMES_MALE if gender == "male" else data.CHILD_NAMES_FEMALE
            born = self.today - timedelta(days=rng.randrange(0, 17 * 365))
            if parent_birth is not None and born < parent_birth + timedelta(days=18 * 365):
                born = parent_birth + timedelta(days=18 * 365 + rng.randrange(3650))
                born = min(born, self.today)
            children.append({"name": rng.choice(names), "birth_date": born.isoformat(), "gender": gender})
        return children

    def _address(self, home: Home) -> str:
        rng = self.rng
        street, house, flat = rng.choice(data.STREETS), rng.randrange(1, 150), rng.randrange(1, 300)
        return f"{home.city}, {street}, д. {house}, кв. {flat}"

    def member(self, i: int) -> MemberRecord:
        rng = self.rng
        random_ = rng.random
        home = rng.choices(self.homes, self.home_weights)[0]
        female = random_() < 0.56
        _, son, daughter = rng.choice(data.MALE_NAMES)
        last = rng.choice(data.LAST_NAMES)
        if female:
            first, middle, last = rng.choice(data.FEMALE_NAMES), daughter, data.female_last_name(last)
        else:
            first, middle = rng.choice(data.MALE_NAMES)[0], son
        birth = self._birth_date() if random_() < BIRTH_DATE_SHARE else None
        has_phone = random_() < PHONE_SHARE
        has_email = random_() < EMAIL_SHARE
        local_day = self.today - timedelta(days=rng.randrange(5 * 365))
        local_time = time(rng.randrange(9, 22), rng.randrange(60), rng.randrange(60))
        registered = datetime.combine(local_day, local_time, self.zones[home.timezone]).astimezone(UTC)
        record = MemberRecord(
            row=i + 1,
            external_id=f"C{i + 1:08d}",
            first_name=first,
            last_name=last,
            middle_name=middle if random_() < 0.9 else None,
            gender="female" if female else "male",
            birth_date=birth,
            phone=self.phone(i) if has_phone else None,
            email=self._email(i, first, last) if has_email else None,
            city=home.city,
            address=self._address(home) if random_() < 0.4 else None,
            timezone=home.timezone,
            registered_at=registered,
            children=self._children(birth) if random_() < 0.3 else None,
            pets=list(rng.choice(data.PETS)) if random_() < 0.35 else None,
        )
        # Consents: granted at the overall share; refused explicitly where the contact exists.
        consents: dict[str, bool] = {}
        for channel, share in CONSENT_SHARES.items():
            granted = random_() < share
            reachable = {"email": has_email, "sms": has_phone, "viber": has_phone}.get(channel, True)
            if granted or reachable:
                consents[channel] = granted
        record.consents = consents
        attributes: dict[str, Any] = {}
        if random_() < 0.5:
            attributes["favourite_store"] = rng.choice(home.stores)
        if random_() < 0.45:
            attributes["has_car"] = random_() < 0.4
        if random_() < 0.3:
            attributes["clothing_size"] = rng.choice(data.CLOTHING_SIZES)
        record.attributes = attributes or None
        # Cards: physical ≈80%, virtual ≈50%, everyone at least one.
        draw = random_()
        if draw < 0.8:
            physical = CardRecord(self.physical_number(i), "physical", "activated")
            if random_() < BLOCKED_CARD_SHARE:
                physical.blocked, physical.block_reason = True, rng.choice(("lost", "damaged"))
            if random_() < REPLACED_CARD_SHARE:
                # The member lost a card before: that one is blocked and points to this one.
                old = CardRecord(
                    self.physical_number(900_000_000 + self.replacements),
                    "physical",
                    "replaced",
                    blocked=True,
                    block_reason=rng.choice(("lost", "damaged")),
                    replaced_by=physical.number,
                )
                self.replacements += 1
                record.cards.append(old)
            record.cards.append(physical)
        if draw < 0.3 or draw >= 0.8:
            record.cards.append(CardRecord(self.virtual_number(i), "virtual", "activated"))
        return record


def csv_row(record: MemberRecord, rng: random.Random) -> list[str]:
    """The record as a line of a member file (one card: the active physical one, else virtual)."""
    birth = ""
    if record.birth_date is not None:
        birth = (
            record.birth_date.isoformat() if rng.random() < 0.7 else record.birth_date.strftime("%d.%m.%Y")
        )
    phone = record.phone or ""
    if phone and rng.random() < 0.5:
        # Written the ways tills and web forms write them: the import normalises.
        n = phone[2:]
        phone = rng.choice(
            (f"8 ({n[:3]}) {n[3:6]}-{n[6:8]}-{n[8:]}", f"+7 {n[:3]} {n[3:6]} {n[6:]}", "7" + n)
        )
    card = next((c for c in record.cards if c.state == "activated" and not c.blocked), None)
    consents = record.consents or {}
    attributes = record.attributes or {}

    def flag(value: bool | None) -> str:
        return "" if value is None else ("1" if value else "0")

    registered = (
        record.registered_at.astimezone(ZoneInfo(record.timezone or "Europe/Moscow"))
        if record.registered_at
        else None
    )
    return [
        record.external_id,
        record.first_name or "",
        record.last_name or "",
        record.middle_name or "",
        record.gender or "",
        birth,
        phone,
        record.email or "",
        record.city or "",
        record.address or "",
        registered.isoformat(timespec="seconds") if registered else "",
        card.number if card else "",
        card.kind if card else "",
        flag(consents.get("email")),
        flag(consents.get("sms")),
        flag(consents.get("viber")),
        flag(consents.get("push")),
        flag(attributes.get("has_car")),
        str(attributes.get("clothing_size") or ""),
    ]


CSV_HEADER = [
    "external_id",
    "first_name",
    "last_name",
    "middle_name",
    "gender",
    "birth_date",
    "phone",
    "email",
    "city",
    "address",
    "registered_at",
    "card_number",
    "card_kind",
    "consent_email",
    "consent_sms",
    "consent_viber",
    "consent_push",
    "attr_has_car",
    "attr_clothing_size",
]
