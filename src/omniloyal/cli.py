"""The ``omniloyal`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from omniloyal.analytics.cli import import_events, import_purchases
from omniloyal.events.cli import app as events_app
from omniloyal.events.cli import worker as events_worker
from omniloyal.segments.cli import app as segments_app
from omniloyal.settings import Settings, get_settings

app = typer.Typer(
    help="Omniloyal: loyalty processing and marketing automation for retailers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
import_app = typer.Typer(help="Bulk imports (CSV or Parquet, streamed).", no_args_is_help=True)
ledger_app = typer.Typer(help="Ledger jobs.", no_args_is_help=True)
members_app = typer.Typer(help="Member base maintenance.", no_args_is_help=True)
app.add_typer(members_app, name="members")
app.add_typer(keys_app, name="keys")
app.add_typer(import_app, name="import")
import_app.command("events", help="Import events from the retailer's DWH (CSV, Parquet, JSON lines).")(
    import_events
)
import_app.command("purchases", help="Import purchase history (CSV, Parquet, JSON lines).")(import_purchases)
app.add_typer(ledger_app, name="ledger")
app.add_typer(events_app, name="events")
app.add_typer(segments_app, name="segments")
# Production runs `omniloyal serve` replicas plus `omniloyal worker` replicas (ARCHITECTURE.md).
app.command("worker", help="Run the outbox dispatcher and the event consumers until Ctrl-C.")(events_worker)

err = Console(stderr=True)


def tune_gc() -> None:
    """A long-running server allocates many short-lived objects per request: freezing what startup
    made and collecting the young generation less often cuts CPU per request by about a third."""
    import gc

    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    # A till's transaction gives up the GIL at every SQL statement; with the default 5 ms switch
    # interval it can then wait that long behind a busy thread (HTTP parsing, the event sink) each
    # time. A shorter interval keeps the one writer moving.
    sys.setswitchinterval(float(os.environ.get("OMNILOYAL_SWITCH_INTERVAL", "0.0005")))


def _db(settings: Settings):  # type: ignore[no-untyped-def]
    from omniloyal.bootstrap import prepare
    from omniloyal.db.engine import Database

    db = Database(settings.database_url)
    prepare(db, settings)
    return db


@app.command()
def migrate() -> None:
    """Apply database migrations (also done by `serve`)."""
    settings = get_settings()
    _db(settings)
    err.print(f"[green]migrated[/green] {settings.database_url}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="OMNILOYAL_API_WORKERS",
            help="HTTP processes. Above 1, this process supervises them and runs the background jobs "
            "(and the event consumers, unless OMNILOYAL_RUN_WORKERS=0) once for all",
        ),
    ] = 1,
) -> None:
    """Apply migrations, then serve the API (and its background jobs)."""
    import uvicorn

    from omniloyal.app import Background, create_app

    settings = get_settings()
    db = _db(settings)
    h, p = host or settings.host, port or settings.port
    if workers == 1:
        application = create_app(settings, db, run_jobs=True)
        tune_gc()
        uvicorn.run(application, host=h, port=p, log_level="info", access_log=settings.access_log)
        return
    background = Background(settings, db)
    background.start()
    try:
        uvicorn.run(
            "omniloyal.app:api_process",
            factory=True,
            workers=workers,
            host=h,
            port=p,
            log_level="info",
            access_log=settings.access_log,
        )
    finally:
        background.stop()


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin, marketer, operator, analyst, pos, client or tracker")],
    store: Annotated[str | None, typer.Option(help="Store code (role pos)")] = None,
    member: Annotated[int | None, typer.Option(help="Member id (role client)")] = None,
    name: Annotated[str, typer.Option(help="A name to recognise the key by")] = "",
) -> None:
    """Create an API key and print only the key (so scripts can capture it)."""
    from pydantic import ValidationError

    from omniloyal.auth.schemas import KeyCreate
    from omniloyal.auth.service import create_key
    from omniloyal.kernel.errors import AppError

    db = _db(get_settings())
    try:
        created = create_key(db, KeyCreate(role=role, store=store, member_id=member, name=name))
    except ValidationError as exc:
        err.print(f"[red]error:[/red] role {role!r}: {exc.errors()[0]['msg']}")
        raise typer.Exit(2) from exc
    except AppError as exc:
        err.print(f"[red]error ({exc.code}):[/red] {exc.message}")
        raise typer.Exit(2) from exc
    sys.stdout.write(created.key + "\n")


@app.command("demo-data")
def demo_data(
    members: Annotated[int, typer.Option(help="How many members to generate")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same retailer")] = 42,
    days: Annotated[int, typer.Option(min=0, help="Days of purchase history ending today (0: none)")] = 365,
    processes: Annotated[
        int | None, typer.Option(min=1, help="Processes for the purchases (default: 2 from 4,000 members)")
    ] = None,
) -> None:
    """Generate the demo retailer: stores, catalogue, members with cards and consents."""
    from omniloyal.demo import generate

    db = _db(get_settings())
    generate(db, members=members, seed=seed, days=days, processes=processes)


@app.command()
def demo(
    members: Annotated[int, typer.Option(help="Members to generate if the store is empty")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed")] = 42,
    days: Annotated[int, typer.Option(min=0, help="Days of purchase history ending today (0: none)")] = 365,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Migrate, load the demo retailer if the store is empty, print an admin key, serve."""
    import uvicorn
    from sqlalchemy import func, select

    from omniloyal.app import create_app
    from omniloyal.auth.schemas import KeyCreate
    from omniloyal.auth.service import create_key
    from omniloyal.catalog.models import Store
    from omniloyal.demo import generate

    settings = get_settings()
    db = _db(settings)
    with db.reading() as session:
        empty = not session.scalar(select(func.count()).select_from(Store))
    if empty:
        generate(db, members=members, seed=seed, days=days)
    else:
        err.print("store already holds a retailer: demo data not regenerated (delete ./data to start over)")
    key = create_key(db, KeyCreate(role="admin", name="demo admin")).key
    h, p = host or settings.host, port or settings.port
    err.print(f"\n[bold]Admin API key:[/bold] {key}")
    err.print(
        f"API docs: http://{h}:{p}/docs   e.g. curl -H 'Authorization: Bearer {key}' "
        f"http://{h}:{p}/api/v1/admin/stores\n"
    )
    application = create_app(settings, db, run_jobs=True)
    tune_gc()
    uvicorn.run(application, host=h, port=p, log_level="info")


@import_app.command("members")
def import_members(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file of members", exists=True, dir_okay=False)],
    report: Annotated[Path | None, typer.Option(help="Where to write the per-row error report (CSV)")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per transaction")] = 5000,
) -> None:
    """Import members with cards and consents; idempotent by external id."""
    from omniloyal.kernel.clock import utcnow
    from omniloyal.members.importer import import_members_file
    from omniloyal.members.quality import refresh_all
    from omniloyal.members.service import publish_snapshots

    settings = get_settings()
    db = _db(settings)
    started = utcnow()
    result = import_members_file(db, file, report_path=report, batch_size=batch_size, console=err)
    # Imported and changed members reach the warehouse (segments, profiles) as snapshot events.
    published = publish_snapshots(db, changed_since=started)
    err.print(f"member snapshots published to the event stream: {published:,}")
    # Data-quality flags (valid phone, e-mail typos, city and time zone) of the new and changed rows.
    checked = refresh_all(db, settings.default_phone_region, only_pending=True)
    err.print(f"data quality checked for {checked:,} members")
    if result.errors:
        raise typer.Exit(1)


@members_app.command("quality")
def members_quality(
    pending: Annotated[bool, typer.Option("--pending", help="Only members changed since checked")] = False,
) -> None:
    """Recompute data-quality flags (phones, e-mails, addresses) for the member base."""
    from omniloyal.members.quality import refresh_all

    settings = get_settings()
    checked = refresh_all(_db(settings), settings.default_phone_region, only_pending=pending)
    err.print(f"data quality checked for {checked:,} members")


@ledger_app.command("run-jobs")
def ledger_jobs() -> None:
    """Burn expired lots and record activations now (the server does this every minute)."""
    from omniloyal.ledger.service import run_jobs

    db = _db(get_settings())
    run_jobs(db)


@app.command("birthdays")
def birthdays(
    day: Annotated[str | None, typer.Option("--date", help="YYYY-MM-DD; default: today")] = None,
) -> None:
    """Send today's `birthday` member events to the offers (the server does this daily)."""
    from datetime import date, datetime
    from zoneinfo import ZoneInfo

    from omniloyal.events.service import run_birthdays

    settings = get_settings()
    try:
        today = date.fromisoformat(day) if day else datetime.now(ZoneInfo(settings.default_timezone)).date()
    except ValueError as exc:
        err.print(f"[red]error (invalid_date):[/red] --date {day!r} is not YYYY-MM-DD")
        raise typer.Exit(2) from exc
    count = run_birthdays(_db(settings), today, settings.default_timezone)
    err.print(f"birthday events for {today.isoformat()}: {count} members")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
