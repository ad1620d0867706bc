"""Demo retailer's year of purchases: purchases/s, seconds and peak memory.

Usage: python bench/demo_purchases.py [--members 100000] [--days 365] [--processes N]
                                      [--database-url URL] [--seed 42]

Generates the demo retailer (stores, catalogue, members, offers) into a fresh database (default:
a temp SQLite file), then a year of purchases priced by the offers engine and booked in bulk,
and prints what the purchases step took. Target (issue 3): 100,000 members' year in under
5 minutes on SQLite with 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from omniloyal.bootstrap import prepare
from omniloyal.db.engine import Database
from omniloyal.demo import generate
from omniloyal.settings import Settings


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--processes", type=int, default=None, help="default: 2 from 4,000 members")
    parser.add_argument(
        "--database-url", default=None, help="an empty database (default: a temp SQLite file)"
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    console = Console(stderr=True)
    workdir = Path(tempfile.mkdtemp(prefix="omniloyal-bench-"))
    try:
        url = args.database_url or f"sqlite:///{workdir / 'demo.db'}"
        db = Database(url)
        prepare(db, Settings(database_url=url))
        started = time.perf_counter()
        summary = generate(
            db,
            members=args.members,
            seed=args.seed,
            days=args.days,
            processes=args.processes,
            console=console,
        )
        total = time.perf_counter() - started
        history = summary.purchases
        assert history is not None
        cpu = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = sum(r.ru_utime + r.ru_stime for r in cpu)
        size = sum(f.stat().st_size for f in workdir.iterdir()) / 2**20 if args.database_url is None else 0.0
        console.print(
            f"[bold]purchases[/bold]: {args.members:,} members, {history.purchases:,} purchases "
            f"({history.lines:,} lines) over {args.days} days in {history.seconds:.1f} s: "
            f"{history.purchases / history.seconds:,.0f} purchases/s on {db.dialect}"
        )
        console.print(
            f"chunks: simulating {history.simulating:.0f} s, waiting {history.waiting:.0f} s, "
            f"writing {history.writing:.0f} s (summed over the worker processes); "
            f"indexes built at the end in {history.indexing:.1f} s"
        )
        console.print(
            f"whole demo {total:.1f} s; CPU {cpu_seconds:.0f} s (all processes); peak RSS "
            f"{peak_rss_mb(resource.RUSAGE_SELF):,.0f} MiB (main), "
            f"{peak_rss_mb(resource.RUSAGE_CHILDREN):,.0f} MiB (largest worker)"
            + (f"; database {size:,.0f} MiB" if size else "")
        )
        db.dispose()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
