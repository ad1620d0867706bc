"""The demo retailer's offers: the three seed examples, a base accrual and a write-off rule.

Created through the offers service (validated, audited, with their status history) and
activated, exactly as a marketer would through ``/api/v1/admin/offers``:

* "100 bonus points for a purchase paid online" (online store and app, payment method
  ``online``; summable, so it comes on top of the base accrual);
* "100 bonus points for installing the mobile app" (member event ``mobile_app_installed``,
  once per member, never expiring, paid by the online legal entity);
* "10% discount only in stores whose attribute CustomTradeFormat is Hypermarket";
* a base accrual: 3% of what is paid in money, usable the day after, for 180 days;
* a write-off rule: points pay up to 50% of a cheque, alcohol excluded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.offers import service
from omniloyal.offers.schemas import OfferCreate

# Whom the audit log names for what the demo generator creates.
DEMO_ACTOR = Principal(key_id=None, name="demo-data", role="admin")

BASE_PERCENT = 3
BONUS_LIFETIME_DAYS = 180
BONUS_ACTIVATION_DAYS = 1
ONLINE_BONUS = 100
APP_BONUS = 100
HYPERMARKET_DISCOUNT = 10
WRITE_OFF_SHARE = 50


@dataclass(frozen=True, slots=True)
class SeedOffers:
    """Ids of the demo offers."""

    base: int
    online_payment: int
    app_install: int
    hypermarket: int
    write_off: int


def offer_bodies(online_entity: str, online_stores: list[str]) -> dict[str, dict[str, Any]]:
    """The offers as the admin API takes them (``OfferCreate``), by role."""
    return {
        "base": {
            "name": f"{BASE_PERCENT}% бонусами за каждую покупку",
            "description": (
                f"Базовое начисление: {BASE_PERCENT}% от суммы, оплаченной деньгами; бонусы доступны "
                f"через {BONUS_ACTIVATION_DAYS} день и действуют {BONUS_LIFETIME_DAYS} дней."
            ),
            "priority": 0,
            "chains": [
                {
                    "event": "bonus_calculation",
                    "actions": [
                        {
                            "type": "bonus",
                            "kind": "percent",
                            "value": str(BASE_PERCENT),
                            "activation_delay_days": BONUS_ACTIVATION_DAYS,
                            "lifetime_days": BONUS_LIFETIME_DAYS,
                        }
                    ],
                }
            ],
        },
        "online_payment": {
            "name": "Начисление бонусов за онлайн-оплату покупки",
            "description": (
                f"Начислять всем участникам ПЛ, оплатившим покупку онлайн, по {ONLINE_BONUS} бонусов."
            ),
            "priority": 10,
            "summable": True,
            "chains": [
                {
                    "event": "bonus_calculation",
                    "filters": [
                        {"type": "stores", "codes": online_stores},
                        {"type": "payment_method", "methods": ["online"]},
                    ],
                    "actions": [
                        {
                            "type": "bonus",
                            "kind": "fixed",
                            "value": str(ONLINE_BONUS),
                            "activation_delay_days": BONUS_ACTIVATION_DAYS,
                            "lifetime_days": BONUS_LIFETIME_DAYS,
                        },
                        {"type": "cheque_message", "text": "+{bonus} бонусов, из них 100 — за онлайн-оплату"},
                    ],
                }
            ],
        },
        "app_install": {
            "name": "Преференции за установку мобильного приложения",
            "description": f"Начислять участнику ПЛ {APP_BONUS} бонусов за установку мобильного приложения.",
            "priority": 0,
            "max_uses_per_member": 1,
            "chains": [
                {
                    "event": "mobile_app_installed",
                    "actions": [
                        # No lifetime: these points never expire; the online company's account pays.
                        {"type": "extra_bonus", "value": str(APP_BONUS), "legal_entity": online_entity}
                    ],
                }
            ],
        },
        "hypermarket": {
            "name": f"Скидка {HYPERMARKET_DISCOUNT}% только в гипермаркетах",
            "description": 'Акция действует только в магазинах формата "Гипермаркет".',
            "priority": 0,
            "chains": [
                {
                    "event": "discount_calculation",
                    "filters": [
                        {"type": "stores", "attribute": "CustomTradeFormat", "values": ["Hypermarket"]}
                    ],
                    "actions": [{"type": "discount", "kind": "percent", "value": str(HYPERMARKET_DISCOUNT)}],
                }
            ],
        },
        "write_off": {
            "name": f"Оплата бонусами до {WRITE_OFF_SHARE}% чека",
            "description": "Бонусами можно оплатить до половины чека; алкоголь бонусами не оплачивается.",
            "priority": 0,
            "chains": [
                {
                    "event": "write_off",
                    "actions": [
                        {
                            "type": "write_off_rule",
                            "max_percent": str(WRITE_OFF_SHARE),
                            "exclude_groups": ["ALCOHOL"],
                        }
                    ],
                }
            ],
        },
    }


def create_offers(db: Database, *, online_entity: str, online_stores: list[str]) -> SeedOffers:
    """Creates the demo offers through the offers service and activates them."""
    ids: dict[str, int] = {}
    for role, body in offer_bodies(online_entity, online_stores).items():
        offer = service.create_offer(db, OfferCreate.model_validate(body), DEMO_ACTOR)
        service.change_status(db, offer.id, "active", DEMO_ACTOR)
        ids[role] = offer.id
    return SeedOffers(**ids)
