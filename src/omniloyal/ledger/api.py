"""HTTP endpoints of the ledger package."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1/admin", tags=["ledger"])
