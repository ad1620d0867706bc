"""``omniloyal import events|purchases FILE``: DWH history into the warehouse.

``import_app`` holds both commands; the main CLI mounts them on its ``import`` group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from omniloyal.settings import get_settings

import_app = typer.Typer(help="Bulk imports of history into the warehouse.", no_args_is_help=True)
err = Console(stderr=True)

FileArg = Annotated[
    Path,
    typer.Argument(help="CSV (.csv, .csv.gz), Parquet or JSON lines (.jsonl)", exists=True, dir_okay=False),
]
ReportOpt = Annotated[
    Path | None, typer.Option(help="Where to write the per-row error report (CSV); default FILE.errors.csv")
]
BatchOpt = Annotated[int, typer.Option(help="Rows per batch")]


def _stores() -> tuple[object, object]:
    from omniloyal.analytics.warehouse import get_warehouse
    from omniloyal.bootstrap import prepare
    from omniloyal.db.engine import Database

    settings = get_settings()
    db = Database(settings.database_url)
    prepare(db, settings)
    return db, get_warehouse(settings)


@import_app.command("events")
def import_events(file: FileArg, report: ReportOpt = None, batch_size: BatchOpt = 5000) -> None:
    """Import events (web, app, contact centre, anything with id, type, occurred_at); idempotent by id."""
    from omniloyal.analytics.importer import import_events_file
    from omniloyal.analytics.warehouse import Warehouse
    from omniloyal.db.engine import Database
    from omniloyal.kernel.errors import AppError

    db, wh = _stores()
    assert isinstance(db, Database) and isinstance(wh, Warehouse)
    try:
        result = import_events_file(
            wh,
            file,
            db=db,
            report_path=report,
            batch_size=batch_size,
            console=err,
            region=get_settings().default_phone_region,
        )
    except AppError as exc:
        err.print(f"[red]error ({exc.code}):[/red] {exc.message}")
        raise typer.Exit(2) from exc
    if result.errors:
        raise typer.Exit(1)


@import_app.command("purchases")
def import_purchases(file: FileArg, report: ReportOpt = None, batch_size: BatchOpt = 5000) -> None:
    """Import purchases from the DWH (buyer by member_id, card, phone, email or external_id);
    idempotent by id."""
    from omniloyal.analytics.importer import import_purchases_file
    from omniloyal.analytics.warehouse import Warehouse
    from omniloyal.db.engine import Database
    from omniloyal.kernel.errors import AppError

    db, wh = _stores()
    assert isinstance(db, Database) and isinstance(wh, Warehouse)
    try:
        result = import_purchases_file(
            wh,
            file,
            db=db,
            report_path=report,
            batch_size=batch_size,
            console=err,
            region=get_settings().default_phone_region,
        )
    except AppError as exc:
        err.print(f"[red]error ({exc.code}):[/red] {exc.message}")
        raise typer.Exit(2) from exc
    if result.errors:
        raise typer.Exit(1)
