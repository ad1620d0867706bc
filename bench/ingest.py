"""Ingest throughput: web events through the batch API into the warehouse (target >= 20,000/s).

Full path (default), in the production shape (README, ``docs/bus.md``): ``omniloyal serve``
with ``OMNILOYAL_RUN_WORKERS=0`` answers the API and writes the outbox, and ``omniloyal
worker`` runs the outbox dispatcher, the in-process bus and the registered consumers (the
warehouse sink and the segments consumer) in its own process, so the API and the sink each
have a core. Both on a fresh SQLite store and DuckDB warehouse (the worker owns the DuckDB
file). ``--shape embedded`` runs everything in one ``omniloyal serve`` process instead
(``OMNILOYAL_RUN_WORKERS=1``, the default). Consumers get the runtime's default batches (up to
2,000). Besides the rates it prints the CPU each process used per event: the figure that holds
when other jobs share the machine.

Setup: --members members are imported (their snapshots go through the event stream too); the
clock starts once every consumer has handled them. Then --clients concurrent connections POST
``/api/v1/events`` in batches of 1,000 web events (a third from members, the rest from
anonymous visitors, with utm and product views), the bodies serialised before the clock starts.
A thread in the process owning the warehouse (it waits for the runtime to drain before
"ready") stops the clock when all the events are counted there; the processes are then stopped
and the warehouse file is opened to count every event again.

--api-only measures the API alone: the same server without a worker (the events stay in the
outbox). --sink-only measures the sink alone: envelopes built in-process, loaded 1,000 at a time.

Usage:
  python bench/ingest.py [--events 200000] [--members 20000] [--clients 2]
                         [--shape split|embedded] [--warehouse duckdb|chdb]
  python bench/ingest.py --api-only [--events 100000]
  python bench/ingest.py --sink-only [--events 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

# A thread in the process that owns the warehouse (the worker, or the embedded server): says
# "ready" once the runtime has handled the setup backlog (the import's member snapshots), then
# "loaded" when every event of the benchmark is in the warehouse.
WATCH = """
import sys, threading, time


def watch(expected):
    from omniloyal.analytics.warehouse import get_warehouse
    from omniloyal.events.consumers import started_runtimes
    from omniloyal.settings import get_settings

    while not started_runtimes():
        time.sleep(0.1)
    runtime = started_runtimes()[0]
    # Every consumer (the segments one takes a while over the member snapshots) is idle.
    while not runtime.drain(600):
        pass
    # Polling the warehouse would slow the sink it watches: the sink's counter says when to look.
    sink = runtime.workers["warehouse"]
    start = sink.handled
    print("ready", flush=True)
    wh = get_warehouse(get_settings())
    while True:
        if sink.handled >= start + int(expected):
            if wh.scalar("SELECT count(*) FROM {events} WHERE id LIKE 'ev-%'") >= int(expected):
                print("loaded", flush=True)
                return
        time.sleep(0.01)


threading.Thread(target=watch, args=(sys.argv[1],), daemon=True).start()
from omniloyal.cli import app
"""

# The embedded shape: `omniloyal serve` with the runtime in its lifespan (OMNILOYAL_RUN_WORKERS=1).
EMBEDDED = (
    WATCH
    + """
app(["serve", "--port", sys.argv[2]])
"""
)

# A server with the runtime embedded and the consumers' batch size given (argv: port, batch), as
# `serve` runs it: what bench/profile_latency.py starts.
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

# The worker of the production shape: `omniloyal worker` (dispatcher + consumers) until SIGTERM.
WORKER = (
    WATCH
    + """
app(["worker"])
"""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str]) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()


async def send_all(base: str, key: str, bodies: list[tuple[int, bytes]], clients: int) -> float:
    import httpx

    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            count, body = queue.get_nowait()
            response = await client.post(f"{base}/api/v1/events", content=body, headers=headers)
            answer = response.json()
            if response.status_code != 200 or answer["accepted"] != count:
                raise SystemExit(f"ingest refused events: {response.status_code} {str(answer)[:500]}")

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return time.perf_counter() - started


class Lines:
    """The lines a child process prints, each with the moment it arrived."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import queue
        import threading

        self.queue: queue.Queue[tuple[str, float]] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout

        def read() -> None:
            for line in stdout:
                self.queue.put((line.strip(), time.perf_counter()))
            self.queue.put(("", time.perf_counter()))

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, word: str, timeout: float, log: Path) -> float:
        import queue

        deadline = time.perf_counter() + timeout
        while True:
            try:
                line, at = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                raise SystemExit(f"no {word!r} within {timeout:.0f} s; see {log}") from None
            if line == word:
                return at
            if line == "":
                raise SystemExit(f"the process ended before {word!r}; see {log}")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_healthy(base: str, log: Path) -> None:
    import httpx

    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server did not start; see {log}")


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def profiler(pid: int) -> None:
    """BENCH_PYSPY=out.txt profiles the process doing the work (the worker, or the embedded
    server; the server with --api-only) for 15 s."""
    if os.environ.get("BENCH_PYSPY"):
        record = ["record", "--pid", str(pid), "-d", "15", "-r", "100", "-f", "raw"]
        subprocess.Popen(
            [str(BIN / "py-spy"), *record, "-o", os.environ["BENCH_PYSPY"]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def full(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="omniloyal-bench-ingest-"))
    wh_url = (
        f"duckdb:///{workdir}/warehouse.duckdb" if args.warehouse == "duckdb" else f"chdb:///{workdir}/chdb"
    )
    split = args.shape == "split" or args.api_only
    env = {
        **os.environ,
        "OMNILOYAL_DATABASE_URL": f"sqlite:///{workdir}/omniloyal.db",
        "OMNILOYAL_WAREHOUSE_URL": wh_url,
        "OMNILOYAL_AUTH_CACHE_SECONDS": "60",
        "OMNILOYAL_RUN_WORKERS": "0" if split else "1",
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
    # The senders' work is not what is measured: bodies are serialised before the clock starts.
    bodies = [
        (len(events[i : i + BATCH]), json.dumps(events[i : i + BATCH]).encode())
        for i in range(0, len(events), BATCH)
    ]
    watched = [str(args.events)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # BENCH_SERVER_PREFIX runs the server under a profiler, e.g. "py-spy record -o prof.txt -f raw --".
    prefix = os.environ.get("BENCH_SERVER_PREFIX", "").split()
    server_log = workdir / "server.log"
    worker_log = workdir / "worker.log"
    server: subprocess.Popen[Any] | None = None
    worker: subprocess.Popen[str] | None = None
    try:
        if split:
            server = subprocess.Popen(
                [*prefix, omniloyal, "serve", "--port", str(port)],
                env=env,
                stdout=server_log.open("wb"),
                stderr=subprocess.STDOUT,
            )
            wait_healthy(base, server_log)
            if args.api_only:
                profiler(server.pid)
                sent = asyncio.run(send_all(base, key, bodies, args.clients))
                stop(server)
                api_only_report(args, env, sent)
                return
            # The worker starts once the server has migrated the store (two migrating at once would race).
            worker = subprocess.Popen(
                [python, "-c", WORKER, *watched],
                env=env,
                stdout=subprocess.PIPE,
                stderr=worker_log.open("wb"),
                text=True,
            )
            lines, log = Lines(worker), worker_log
        else:
            worker = subprocess.Popen(
                [*prefix, python, "-c", EMBEDDED, *watched, str(port)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=server_log.open("wb"),
                text=True,
            )
            wait_healthy(base, server_log)
            lines, log = Lines(worker), server_log
        lines.wait_for("ready", 600, log)  # the import's member snapshots are in the warehouse
        profiler(worker.pid)
        # CPU used meanwhile, per process: what the run costs, whatever else shares the machine.
        processes = {"API": server, "worker": worker} if server is not None else {"server": worker}
        cpu = {name: cpu_seconds(proc.pid) for name, proc in processes.items() if proc is not None}
        load = os.getloadavg()[0]
        started = time.perf_counter()
        sent = asyncio.run(send_all(base, key, bodies, args.clients))
        loaded = lines.wait_for("loaded", 600, log) - started
        for name, proc in processes.items():
            if proc is not None:
                cpu[name] = cpu_seconds(proc.pid) - cpu[name]
    finally:
        stop(worker)
        stop(server)
    from omniloyal.analytics.warehouse import open_warehouse

    wh = open_warehouse(wh_url)
    count = wh.scalar("SELECT count(*) FROM {events} WHERE id LIKE 'ev-%'")
    linked = wh.scalar("SELECT count(*) FROM {events} WHERE id LIKE 'ev-%' AND member_id IS NOT NULL")
    shape = (
        "serve (RUN_WORKERS=0) + worker process" if split else "one process: serve with the embedded runtime"
    )
    print(
        f"full path ({shape}; {args.warehouse}, {args.clients} clients, API batches of {BATCH}): "
        f"{args.events:,} web events\n"
        f"  accepted by the API in {sent:.2f} s = {args.events / sent:,.0f} events/s\n"
        f"  in the warehouse after {loaded:.2f} s = {args.events / loaded:,.0f} events/s sustained\n"
        f"  warehouse count: {count:,} events ({linked:,} with a member)"
    )
    for name, seconds in cpu.items():
        print(
            f"  CPU of the {name} process: {seconds:.2f} s = {seconds / args.events * 1e6:.0f} us/event "
            f"(on a core of its own: {args.events / seconds:,.0f} events/s)"
        )
    print(f"  load average (1 min) when the clock started: {load:.2f} on {os.cpu_count()} cores")
    if count != args.events:
        raise SystemExit(f"expected {args.events:,} events in the warehouse, found {count:,}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


def api_only_report(args: argparse.Namespace, env: dict[str, str], sent: float) -> None:
    import sqlite3

    path = env["OMNILOYAL_DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as con:
        count = con.execute("SELECT count(*) FROM outbox WHERE event_id LIKE 'ev-%'").fetchone()[0]
    print(
        f"API alone (serve, RUN_WORKERS=0, no worker; {args.clients} clients, batches of {BATCH}): "
        f"{args.events:,} web events accepted in {sent:.2f} s = {args.events / sent:,.0f} events/s; "
        f"outbox: {count:,}"
    )
    if count != args.events:
        raise SystemExit(f"expected {args.events:,} events in the outbox, found {count:,}")
    if not args.keep:
        shutil.rmtree(Path(path).parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument(
        "--shape",
        choices=["split", "embedded"],
        default="split",
        help="split: serve (RUN_WORKERS=0) + a worker process, the production shape; embedded: one process",
    )
    parser.add_argument("--api-only", action="store_true", help="The API alone: no worker")
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
    from machine import note

    sys.path.insert(0, str(ROOT / "src"))
    print(note())
    main()
    print(note())
