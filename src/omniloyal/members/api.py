"""HTTP endpoints of the members package: members, consents, cards, custom attribute definitions.

Admin and operator (contact centre) keys write; marketer and analyst keys read; a client key
reads only its own member.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from omniloyal.auth.deps import check_member_scope, get_db, get_settings_dep, require
from omniloyal.auth.schemas import Principal
from omniloyal.db.engine import Database
from omniloyal.kernel.pagination import DEFAULT_LIMIT, Page
from omniloyal.members import service
from omniloyal.members.schemas import (
    AttributeDefinitionCreate,
    AttributeDefinitionOut,
    AttributeDefinitionUpdate,
    CardBatchCreate,
    CardBlock,
    CardLink,
    CardOut,
    CardReplace,
    CardReplacement,
    ConsentsIn,
    ConsentsOut,
    MemberCreate,
    MemberOut,
    MemberUpdate,
)
from omniloyal.settings import Settings

router = APIRouter(prefix="/api/v1/admin", tags=["members"])

WRITERS = ("operator",)
READERS = ("operator", "marketer", "analyst")


# ---------------------------------------------------------------- members


@router.post("/members", status_code=201, response_model=MemberOut)
def create_member(
    data: MemberCreate,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    actor: Principal = Depends(require(*WRITERS)),
) -> MemberOut:
    return service.create_member(db, data, actor, settings.default_phone_region)


@router.get("/members", response_model=Page[MemberOut])
def list_members(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    city: str | None = None,
    q: str | None = Query(default=None, description="Part of a first, last or middle name"),
    db: Database = Depends(get_db),
    _: Principal = Depends(require(*READERS)),
) -> Page[MemberOut]:
    return service.list_members(db, limit, cursor, city=city, q=q)


# Declared before /members/{member_id} so "lookup" is not read as an id.
@router.get("/members/lookup", response_model=MemberOut)
def lookup_member(
    phone: str | None = None,
    card: str | None = None,
    email: str | None = None,
    external_id: str | None = None,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    _: Principal = Depends(require(*READERS)),
) -> MemberOut:
    return service.lookup_member(
        db,
        card=card,
        phone=phone,
        email=email,
        external_id=external_id,
        region=settings.default_phone_region,
    )


@router.get("/members/{member_id}", response_model=MemberOut)
def get_member(
    member_id: int,
    db: Database = Depends(get_db),
    principal: Principal = Depends(require(*READERS, "client")),
) -> MemberOut:
    check_member_scope(principal, member_id)
    return service.get_member(db, member_id)


@router.patch("/members/{member_id}", response_model=MemberOut)
def update_member(
    member_id: int,
    data: MemberUpdate,
    db: Database = Depends(get_db),
    settings: Settings = Depends(get_settings_dep),
    actor: Principal = Depends(require(*WRITERS)),
) -> MemberOut:
    return service.update_member(db, member_id, data, actor, settings.default_phone_region)


@router.get("/members/{member_id}/consents", response_model=ConsentsOut)
def get_consents(
    member_id: int,
    db: Database = Depends(get_db),
    principal: Principal = Depends(require(*READERS, "client")),
) -> ConsentsOut:
    check_member_scope(principal, member_id)
    return service.get_consents(db, member_id)


@router.put("/members/{member_id}/consents", response_model=ConsentsOut)
def set_consents(
    member_id: int,
    data: ConsentsIn,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> ConsentsOut:
    return service.set_consents(db, member_id, data, actor)


@router.post("/members/{member_id}/cards", status_code=201, response_model=CardOut)
def link_card(
    member_id: int,
    data: CardLink,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> CardOut:
    return service.link_card(db, member_id, data, actor)


# ---------------------------------------------------------------- cards


@router.post("/cards", status_code=201, response_model=list[CardOut])
def create_cards(
    data: CardBatchCreate, db: Database = Depends(get_db), actor: Principal = Depends(require(*WRITERS))
) -> list[CardOut]:
    return service.create_cards(db, data, actor)


@router.get("/cards/{number}", response_model=CardOut)
def get_card(
    number: str, db: Database = Depends(get_db), _: Principal = Depends(require(*READERS))
) -> CardOut:
    return service.get_card(db, number)


@router.post("/cards/{number}/issue", response_model=CardOut)
def issue_card(
    number: str, db: Database = Depends(get_db), actor: Principal = Depends(require(*WRITERS))
) -> CardOut:
    return service.issue_card(db, number, actor)


@router.post("/cards/{number}/activate", response_model=CardOut)
def activate_card(
    number: str, db: Database = Depends(get_db), actor: Principal = Depends(require(*WRITERS))
) -> CardOut:
    return service.activate_card(db, number, actor)


@router.post("/cards/{number}/block", response_model=CardOut)
def block_card(
    number: str,
    data: CardBlock,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> CardOut:
    return service.block_card(db, number, data, actor)


@router.post("/cards/{number}/unblock", response_model=CardOut)
def unblock_card(
    number: str, db: Database = Depends(get_db), actor: Principal = Depends(require(*WRITERS))
) -> CardOut:
    return service.unblock_card(db, number, actor)


@router.post("/cards/{number}/replace", response_model=CardReplacement)
def replace_card(
    number: str,
    data: CardReplace,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> CardReplacement:
    return service.replace_card(db, number, data.new_number, actor)


# ---------------------------------------------------------------- custom attribute definitions


@router.post("/attribute-definitions", status_code=201, response_model=AttributeDefinitionOut)
def create_attribute_definition(
    data: AttributeDefinitionCreate,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> AttributeDefinitionOut:
    return service.create_attribute_definition(db, data, actor)


@router.get("/attribute-definitions", response_model=Page[AttributeDefinitionOut])
def list_attribute_definitions(
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    db: Database = Depends(get_db),
    _: Principal = Depends(require(*READERS)),
) -> Page[AttributeDefinitionOut]:
    return service.list_attribute_definitions(db, limit, cursor)


@router.get("/attribute-definitions/{code}", response_model=AttributeDefinitionOut)
def get_attribute_definition(
    code: str, db: Database = Depends(get_db), _: Principal = Depends(require(*READERS))
) -> AttributeDefinitionOut:
    return service.get_attribute_definition(db, code)


@router.patch("/attribute-definitions/{code}", response_model=AttributeDefinitionOut)
def update_attribute_definition(
    code: str,
    data: AttributeDefinitionUpdate,
    db: Database = Depends(get_db),
    actor: Principal = Depends(require(*WRITERS)),
) -> AttributeDefinitionOut:
    return service.update_attribute_definition(db, code, data, actor)
