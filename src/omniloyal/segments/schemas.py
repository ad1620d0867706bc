"""API models of segments, RFM and reports."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from omniloyal.kernel.money import DecimalStr

SegmentKind = Literal["dynamic", "static"]
SegmentStatus = Literal["active", "archived"]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
AudienceCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]

_CONDITIONS_DOC = (
    'The condition tree: {"all": [...]}, {"any": [...]}, {"not": {...}} or a leaf {"type": ...}; '
    "see docs/segments.md for every condition family."
)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentIn(_In):
    name: Name
    description: Annotated[str, StringConstraints(max_length=5000)] | None = None
    kind: SegmentKind = "dynamic"
    conditions: dict[str, Any] = Field(description=_CONDITIONS_DOC)
    audience: AudienceCode | None = Field(
        default=None, description="A target audience kept equal to this segment's members"
    )


class SegmentUpdate(_In):
    name: Name | None = None
    description: Annotated[str, StringConstraints(max_length=5000)] | None = None
    kind: SegmentKind | None = None
    status: SegmentStatus | None = None
    conditions: dict[str, Any] | None = Field(default=None, description=_CONDITIONS_DOC)
    audience: AudienceCode | None = None


class SegmentOut(BaseModel):
    id: int
    name: str
    description: str | None
    kind: SegmentKind
    status: SegmentStatus
    conditions: dict[str, Any]
    audience: str | None
    version: int
    member_count: int | None = Field(description="Members at the last build or refresh")
    materialised_at: datetime | None = Field(description="Last full build")
    refreshed_at: datetime | None = Field(description="Last time brought up to date (build or events)")
    build_ms: int | None
    last_error: str | None = Field(description="Why the last refresh failed; null after a success")
    last_error_at: datetime | None
    uses: list[int] = Field(description="Segments this one's conditions refer to")
    used_by: list[int] = Field(description="Segments that refer to this one")
    created_at: datetime
    updated_at: datetime


class ConditionsIn(_In):
    conditions: dict[str, Any] = Field(description=_CONDITIONS_DOC)


class CountOut(BaseModel):
    count: int
    at: datetime
    took_ms: int
    engine: str


class SampleMember(BaseModel):
    member_id: int
    external_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    gender: str | None = None
    city: str | None = None
    email: str | None = None
    phone: str | None = None


class SampleOut(BaseModel):
    count: int
    members: list[SampleMember]


class BuildOut(BaseModel):
    segment_id: int
    member_count: int
    entered: int
    left: int
    at: datetime
    took_ms: int
    cause: str


class CountPoint(BaseModel):
    at: datetime
    member_count: int
    entered: int
    left: int
    cause: str
    duration_ms: int


class MemberRow(BaseModel):
    member_id: int
    entered_at: datetime


class MemberPage(BaseModel):
    items: list[MemberRow]
    next_cursor: str | None = None


class ChangeRow(BaseModel):
    member_id: int
    change: Literal["entered", "left"]
    at: datetime
    cause: str


class AudienceExportIn(_In):
    audience: AudienceCode
    mode: Literal["add", "replace", "remove"] = "replace"
    create: bool = Field(default=False, description="Create the audience if it does not exist")
    name: Name | None = Field(default=None, description="Name of the audience when it is created")
    keep_in_sync: bool = Field(
        default=False, description="From now on, keep the audience equal to the segment (mode replace only)"
    )


class AudienceExportOut(BaseModel):
    segment_id: int
    audience: str
    mode: str
    exported: int
    added: int
    removed: int
    member_count: int
    took_ms: int


# ---------------------------------------------------------------- RFM


class RfmRunIn(_In):
    period_days: int = Field(default=365, ge=1, le=3650)


class RfmBoundaries(BaseModel):
    r: list[int] = Field(description="Days since the last purchase: upper bounds of R5, R4, R3, R2")
    f: list[int] = Field(description="Purchases: upper bounds of F1, F2, F3, F4")
    m: list[DecimalStr] = Field(description="Money: upper bounds of M1, M2, M3, M4")


class RfmRunOut(BaseModel):
    computed_at: datetime
    period_days: int
    members: int
    boundaries: RfmBoundaries
    groups: dict[str, int]
    group_changes: int
    took_ms: int


class RfmGroupOut(BaseModel):
    code: str
    name: str
    definition: str
    members: int
    revenue: DecimalStr


class MatrixCell(BaseModel):
    row: int
    column: int
    members: int
    revenue: DecimalStr


class RfmMatrix(BaseModel):
    name: Literal["rf", "rm", "fm"]
    rows: str
    columns: str
    cells: list[MatrixCell] = Field(description="25 cells, rows and columns 1..5")
    row_boundaries: list[str]
    column_boundaries: list[str]


class RfmOverview(BaseModel):
    computed_at: datetime | None
    period_days: int | None
    members: int
    boundaries: RfmBoundaries | None
    groups: list[RfmGroupOut]
    matrices: list[RfmMatrix]


class RfmMemberOut(BaseModel):
    member_id: int
    r: int
    f: int
    m: int
    cell: str
    group: str
    recency_days: int
    frequency: int
    monetary: DecimalStr
    computed_at: datetime


# ---------------------------------------------------------------- reports

Interval = Literal["week", "month"]


class BasePoint(BaseModel):
    period: date
    new: int = Field(description="First purchase ever in this period")
    active: int = Field(description="At least one purchase in this period")
    returning: int = Field(description="Active, and had bought before this period")
    one_time: int = Field(description="At the end of the period: exactly one purchase so far")
    lost: int = Field(
        description="At the end of the period: bought before, nothing in the last lost_after_days"
    )
    registered: int = Field(description="Registered in this period")


class BaseReport(BaseModel):
    interval: Interval
    segment_id: int | None
    lost_after_days: int
    points: list[BasePoint]


class RevenuePoint(BaseModel):
    period: date
    purchases: int
    buyers: int
    revenue: DecimalStr
    average_cheque: DecimalStr | None


class RevenueReport(BaseModel):
    interval: Interval
    segment_id: int | None
    points: list[RevenuePoint]
    total_revenue: DecimalStr
    total_purchases: int


class ChannelRow(BaseModel):
    channel: str
    store_format: str | None
    purchases: int
    buyers: int
    revenue: DecimalStr
    average_cheque: DecimalStr | None


class ChannelReport(BaseModel):
    segment_id: int | None
    since: datetime | None
    until: datetime | None
    rows: list[ChannelRow]


def money(value: Any) -> Decimal:
    return Decimal(str(value or 0)).quantize(Decimal("0.01"))
