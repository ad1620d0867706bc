"""``omniloyal segments refresh|materialise|rfm|mirror``: the segments' jobs from the command line.

``app`` holds the commands; the main CLI mounts it as ``segments``. ``refresh`` is the periodic
job (rebuilds every dynamic segment: catches conditions that change with time alone).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from omniloyal.settings import get_settings

app = typer.Typer(help="Segments, RFM and the loyalty mirror.", no_args_is_help=True)
out = Console()


def _stores() -> tuple[Any, Any]:
    from omniloyal.analytics.warehouse import get_warehouse
    from omniloyal.bootstrap import prepare
    from omniloyal.db.engine import Database

    settings = get_settings()
    db = Database(settings.database_url)
    prepare(db, settings)
    return db, get_warehouse(settings)


@app.command("refresh")
def refresh() -> None:
    """Rebuild every active dynamic segment."""
    from omniloyal.segments import service

    db, wh = _stores()
    for built in service.refresh_all(db, wh):
        out.print(
            f"segment {built.segment_id}: {built.member_count} members "
            f"(+{built.entered} -{built.left}) in {built.took_ms} ms"
        )


@app.command("materialise")
def materialise(segment_id: Annotated[int, typer.Argument(help="Segment id")]) -> None:
    """Rebuild one segment."""
    from omniloyal.segments import service

    db, wh = _stores()
    built = service.materialise(db, wh, segment_id)
    out.print(f"segment {segment_id}: {built.member_count} members (+{built.entered} -{built.left})")


@app.command("rfm")
def rfm(period_days: Annotated[int, typer.Option(help="Days of purchases scored")] = 365) -> None:
    """Recompute the RFM scores of every member."""
    from omniloyal.segments import rfm as rfm_module

    db, wh = _stores()
    run = rfm_module.recompute(db, wh, period_days=period_days)
    out.print(f"{run.members} members scored in {run.took_ms} ms; groups: {run.groups}")


@app.command("mirror")
def mirror() -> None:
    """Copy every member's loyalty facts and every audience into the warehouse."""
    from omniloyal.segments import loyalty

    db, wh = _stores()
    out.print(f"{loyalty.rebuild(db, wh)} members mirrored")
