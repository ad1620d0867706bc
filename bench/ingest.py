"""Ingest throughput: web events through the batch API into the warehouse (target >= 20,000/s).

Full path (default): starts a server process (`create_app(..., run_jobs=True)` with the warehouse
sink registered: API + outbox dispatcher + in-process bus + sink, as `omniloyal serve` runs them)
on a fresh SQLite store and DuckDB warehouse, imports --members members, then POSTs
`/api/v1/events` in batches of 1,000 web events (a third of them from members, the rest from
anonymous visitors, with utm and product views) from --clients concurrent connections. The
clock stops when the last event is in the warehouse (its timeline shows it); the server is then
stopped and the warehouse file is opened to count every event.

--sink-only measures the sink alone: envelopes built in-process, loaded 1,000 at a time.

Usage:
  python bench/ingest.py [--events 200000] [--members 20000] [--clients 4] [--consumer-batch 1000]
                         [--warehouse duckdb|chdb]
  python bench/ingest.py --sink-only [--events 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
BATCH = int(os.environ.get("BENCH_BATCH", "1000"))
PAGES = ["/", "/catalog", "/catalog/dairy", "/promo", "/cart", "/about"]
TYPES = ["page_view"] * 6 + ["product_view"] * 3 + ["add_to_cart", "search"]
BASE = datetime(2026, 3, 1, tzinfo=UTC)


def web_event(i: int, members: int, rng: random.Random) -> dict[str, Any]:
    """One ingest-API web event (the body a tracker sends)."""
    kind = rng.choice(TYPES)
    event: dict[str, Any] = {
        "id": f"ev-{i}",
        "type": kind,
        "occurred_at": (BASE + timedelta(milliseconds=i * 5)).isoformat(),
        "source": "web",
        "url": f"https://shop.example{rng.choice(PAGES)}?utm_source=ads&utm_campaign=spring",
    }
    if members and rng.random() < 1 / 3:
        event["member"] = {"id": rng.randint(1, members)}
    else:
        event["anonymous_id"] = f"visitor-{rng.randint(1, 50_000)}"
    if kind == "product_view" or kind == "add_to_cart":
        event["properties"] = {"sku": f"SKU{rng.randint(1, 5000)}", "price": "99.90"}
        if kind == "add_to_cart":
            event["properties"]["quantity"] = 1
    elif kind == "search":
        event["properties"] = {"query": rng.choice(["milk", "bread", "tv", "cheese"])}
    return event


# ---------------------------------------------------------------- sink only


def sink_only(events: int, url: str) -> None:
    from omniloyal.analytics.sink import load
    from omniloyal.analytics.warehouse import open_warehouse
    from omniloyal.events.envelope import EventEnvelope

    wh = open_warehouse(url)
    rng = random.Random(1)
    now = datetime.now(UTC)
    batches = []
    for start in range(0, events, BATCH):
        batch = []
        for i in range(start, min(start + BATCH, events)):
            raw = web_event(i, 20_000, rng)
            batch.append(
                EventEnvelope(
                    id=raw["id"],
                    type=raw["type"],
                    occurred_at=datetime.fromisoformat(raw["occurred_at"]),
                    received_at=now,
                    member_id=raw.get("member", {}).get("id"),
                    anonymous_id=raw.get("anonymous_id"),
                    source="web",
                    properties={**raw.get("properties", {}), "url": raw["url"]},
                    utm={"utm_source": "ads", "utm_campaign": "spring"},
                )
            )
        batches.append(batch)
    started = time.perf_counter()
    for batch in batches:
        load(wh, batch)
    seconds = time.perf_counter() - started
    count = wh.scalar("SELECT count(*) FROM {events}")
    features = wh.scalar("SELECT count(*) FROM {member_features}")
    engine = url.split(":")[0]
    print(f"sink only ({engine}, batches of {BATCH}): {events:,} web events in {seconds:.2f} s")
    print(f"  = {events / seconds:,.0f} events/s; warehouse: {count:,} events, {features:,} feature rows")


# ---------------------------------------------------------------- full path

SERVER = """
import sys, threading, uvicorn
import omniloyal.analytics.sink  # registers the warehouse consumer
from omniloyal.analytics.api import router
from omniloyal.app import create_app
from omniloyal.bootstrap import prepare
from omniloyal.db.engine import Database
from omniloyal.events.consumers import Runtime
from omniloyal.settings import get_settings
settings = get_settings()
db = Database(settings.database_url)
prepare(db, settings)
app = create_app(settings, db)
if not any(getattr(r, "path", "").endswith("/timeline") for r in app.routes):
    app.include_router(router)  # until app.py mounts the profile API
# What `serve` runs in its lifespan, with the consumers' batch size of the benchmark.
runtime = Runtime(settings, db, consumer_batch=int(sys.argv[2]))
runtime.start()
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
runtime.stop()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str]) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()


async def send_all(base: str, key: str, batches: list[list[dict[str, Any]]], clients: int) -> float:
    import httpx

    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    headers = {"Authorization": f"Bearer {key}"}

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            response = await client.post(f"{base}/api/v1/events", json=batch, headers=headers)
            body = response.json()
            if response.status_code != 200 or body["accepted"] != len(batch):
                raise SystemExit(f"ingest refused events: {response.status_code} {str(body)[:500]}")

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return time.perf_counter() - started


def full(args: argparse.Namespace) -> None:
    import httpx

    workdir = Path(tempfile.mkdtemp(prefix="omniloyal-bench-ingest-"))
    wh_url = (
        f"duckdb:///{workdir}/warehouse.duckdb" if args.warehouse == "duckdb" else f"chdb:///{workdir}/chdb"
    )
    env = {
        **os.environ,
        "OMNILOYAL_DATABASE_URL": f"sqlite:///{workdir}/omniloyal.db",
        "OMNILOYAL_WAREHOUSE_URL": wh_url,
        "OMNILOYAL_AUTH_CACHE_SECONDS": "60",
    }
    python = str(BIN / "python")
    omniloyal = str(BIN / "omniloyal")
    run([omniloyal, "migrate"], env)
    if args.members:
        members_csv = workdir / "members.csv"
        members_csv.write_text(
            "external_id,first_name\n" + "".join(f"M{i},Member{i}\n" for i in range(1, args.members + 1)),
            encoding="utf-8",
        )
        run([omniloyal, "import", "members", str(members_csv)], env)
    key = run([omniloyal, "keys", "create", "--role", "admin"], env)
    rng = random.Random(7)
    events = [web_event(i, args.members, rng) for i in range(args.events)]
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    last = events[-1]
    if "member" not in last:  # the clock stops when this member's timeline shows the last event
        last["member"] = {"id": 1}
        last.pop("anonymous_id", None)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # BENCH_SERVER_PREFIX runs the server under a profiler, e.g. "py-spy record -o prof.txt -f raw --".
    prefix = os.environ.get("BENCH_SERVER_PREFIX", "").split()
    server = subprocess.Popen(
        [*prefix, python, "-c", SERVER, str(port), str(args.consumer_batch)],
        env=env,
        stdout=(workdir / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit(f"server did not start; see {workdir / 'server.log'}")
        if os.environ.get("BENCH_PYSPY"):  # profile the server while it works: BENCH_PYSPY=out.txt
            subprocess.Popen(
                [
                    str(BIN / "py-spy"),
                    "record",
                    "--pid",
                    str(server.pid),
                    "-d",
                    "15",
                    "-r",
                    "50",
                    "-f",
                    "raw",
                    "-o",
                    os.environ["BENCH_PYSPY"],
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        started = time.perf_counter()
        sent = asyncio.run(send_all(base, key, batches, args.clients))
        member = last["member"]["id"]
        headers = {"Authorization": f"Bearer {key}"}
        deadline = time.perf_counter() + 600
        while time.perf_counter() < deadline:
            response = httpx.get(
                f"{base}/api/v1/admin/members/{member}/timeline",
                params={"limit": 1},
                headers=headers,
                timeout=30,
            )
            if response.status_code != 200:
                raise SystemExit(f"timeline: {response.status_code} {response.text[:300]}")
            page = response.json()
            if page.get("items") and page["items"][0]["id"] == last["id"]:
                break
            time.sleep(0.05)
        else:
            raise SystemExit("the last event never reached the warehouse")
        loaded = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(30)
    from omniloyal.analytics.warehouse import open_warehouse

    wh = open_warehouse(wh_url)
    count = wh.scalar("SELECT count(*) FROM {events}")
    linked = wh.scalar("SELECT count(*) FROM {events} WHERE member_id IS NOT NULL")
    print(
        f"full path ({args.warehouse}, {args.clients} clients, API batches of {BATCH}, "
        f"consumer batches of {args.consumer_batch}): {args.events:,} web events\n"
        f"  accepted by the API in {sent:.2f} s = {args.events / sent:,.0f} events/s\n"
        f"  in the warehouse after {loaded:.2f} s = {args.events / loaded:,.0f} events/s sustained\n"
        f"  warehouse count: {count:,} events ({linked:,} with a member)"
    )
    if count != args.events:
        raise SystemExit(f"expected {args.events:,} events in the warehouse, found {count:,}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--consumer-batch", type=int, default=1000, help="Events per sink call (the runtime's default is 200)"
    )
    parser.add_argument("--warehouse", choices=["duckdb", "chdb"], default="duckdb")
    parser.add_argument("--sink-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory")
    args = parser.parse_args()
    if args.sink_only:
        workdir = Path(tempfile.mkdtemp(prefix="omniloyal-bench-sink-"))
        url = f"duckdb:///{workdir}/wh.duckdb" if args.warehouse == "duckdb" else f"chdb:///{workdir}/chdb"
        try:
            sink_only(args.events, url)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    full(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
