"""Errors that reach the client as ``{"error": {"code", "message", "field"}}`` with a 4xx status."""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    """A refusal the client can act on. ``code`` is machine-readable and stable."""

    status_code = 400

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        status_code: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.details = details
        if status_code is not None:
            self.status_code = status_code

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class NotFound(AppError):
    status_code = 404


class Conflict(AppError):
    status_code = 409


class Unauthorized(AppError):
    status_code = 401


class Forbidden(AppError):
    status_code = 403


def not_found(entity: str, key: object, *, field: str | None = None) -> NotFound:
    return NotFound(f"unknown_{entity}", f"No {entity.replace('_', ' ')} {key!r}", field=field)
