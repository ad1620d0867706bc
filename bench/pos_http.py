"""POS API over HTTP: calculate + confirm latency at a fixed rate, and the most sustained.

Starts `omniloyal serve` on a fresh store (SQLite by default, or --database-url for PostgreSQL),
creates a small retailer (stores, 500 products, 2,000 members with points, the three seed offers
and 20 more), then drives purchases with an open-loop load generator: each purchase is
`calculate` (10 lines, a write-off for a third of them) followed by `confirm`.

Usage:
  python bench/pos_http.py [--rate 200] [--seconds 20] [--database-url URL] [--find-max] [--api-workers N]

Prints p50/p95/p99 of the calculate+confirm pair at --rate, and with --find-max the highest rate
whose p99 stays under 50 ms with no errors (aim: 1,200 requests/s = 600 purchases/s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Server:
    """The API process and, unless embedded, its event worker: stopped together."""

    def __init__(self, api: subprocess.Popen[bytes]) -> None:
        self.api = api
        self.worker: subprocess.Popen[bytes] | None = None

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU used so far by the HTTP processes (the API and its children) and by the worker."""
        api = sum(_cpu(pid) for pid in [self.api.pid, *_children(self.api.pid)])
        return api, _cpu(self.worker.pid) if self.worker is not None else 0.0

    def terminate(self) -> None:
        for proc in (self.api, self.worker):
            if proc is not None and proc.poll() is None:
                proc.terminate()

    def wait(self, timeout: float) -> None:
        for proc in (self.api, self.worker):
            if proc is not None:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()


def start_server(
    database_url: str, port: int, workdir: Path, embedded_workers: bool = False, api_workers: int = 1
) -> Server:
    env = {
        **os.environ,
        "OMNILOYAL_DATABASE_URL": database_url,
        "OMNILOYAL_WAREHOUSE_URL": f"duckdb:///{workdir}/warehouse.duckdb",
        "OMNILOYAL_AUTH_CACHE_SECONDS": "60",
        "OMNILOYAL_RUN_WORKERS": "1" if embedded_workers else "0",
    }
    log = (workdir / "server.log").open("wb")
    # BENCH_SERVER_PREFIX runs the server under a profiler, e.g. "py-spy record -o prof.txt -f raw --".
    prefix = os.environ.get("BENCH_SERVER_PREFIX", "").split()
    server = Server(
        subprocess.Popen(
            [*prefix, str(BIN / "omniloyal"), "serve", "--port", str(port), "--workers", str(api_workers)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                # The worker starts once the server has migrated the store (two migrating at
                # once would race).
                if not embedded_workers:
                    # Production shape: the event consumers (warehouse sink, features, segments) run in their
                    # own process, `omniloyal worker`, and the API process only answers tills.
                    server.worker = subprocess.Popen(
                        [str(BIN / "omniloyal"), "worker"],
                        env=env,
                        stdout=(workdir / "worker.log").open("wb"),
                        stderr=subprocess.STDOUT,
                    )
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.terminate()
    server.wait(5)
    raise SystemExit(f"server did not start; see {workdir / 'server.log'}")


def admin_key(database_url: str) -> str:
    env = {**os.environ, "OMNILOYAL_DATABASE_URL": database_url}
    out = subprocess.run(
        [str(BIN / "omniloyal"), "keys", "create", "--role", "admin"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def seed(base: str, key: str, members: int) -> tuple[str, list[str], list[str]]:
    h = {"Authorization": f"Bearer {key}"}
    c = httpx.Client(base_url=base, headers=h, timeout=30)

    def post(url: str, body: Any) -> Any:
        r = c.post(url, json=body)
        if r.status_code not in (200, 201):
            raise SystemExit(f"seeding {url} failed: {r.text}")
        return r.json()

    post("/api/v1/admin/legal-entities", {"code": "LE", "name": "Retail LLC"})
    post(
        "/api/v1/admin/stores",
        {
            "code": "H1",
            "name": "Hyper",
            "legal_entity": "LE",
            "channel": "offline",
            "timezone": "Europe/Moscow",
            "attributes": {"CustomTradeFormat": "Hypermarket"},
        },
    )
    for m in ("cash", "card", "online"):
        post("/api/v1/admin/payment-methods", {"code": m, "name": m})
    skus = [f"S{i:05d}" for i in range(500)]
    for start in range(0, len(skus), 250):
        post(
            "/api/v1/admin/products/batch",
            {
                "items": [
                    {"sku": s, "name": f"Product {s}", "price": "99.90", "category": f"Food / Cat {i % 20}"}
                    for i, s in enumerate(skus[start : start + 250], start=start)
                ]
            },
        )
    post(
        "/api/v1/admin/product-groups",
        {"code": "g0", "name": "Cat 0", "rule": {"categories": ["Food / Cat 0"]}},
    )
    cards = []
    for i in range(members):
        number = f"77{i:08d}"
        member = post(
            "/api/v1/admin/members",
            {
                "first_name": f"M{i}",
                "phone": f"+7916{i:07d}",
                "cards": [{"number": number, "kind": "physical", "state": "activated"}],
            },
        )
        post(
            f"/api/v1/admin/members/{member['id']}/ledger",
            {"kind": "accrual", "amount": "100000", "reason": "bench"},
        )
        cards.append(number)
    offers = [
        {
            "name": "10% in hypermarkets",
            "chains": [
                {
                    "event": "discount_calculation",
                    "filters": [
                        {"type": "stores", "attribute": "CustomTradeFormat", "values": ["Hypermarket"]}
                    ],
                    "actions": [{"type": "discount", "kind": "percent", "value": "10"}],
                }
            ],
        },
        {
            "name": "100 for online payment",
            "summable": True,
            "chains": [
                {
                    "event": "bonus_calculation",
                    "filters": [{"type": "payment_method", "methods": ["online"]}],
                    "actions": [{"type": "extra_bonus", "value": "100", "currency": "bonus"}],
                }
            ],
        },
        {
            "name": "App install",
            "chains": [
                {
                    "event": "mobile_app_installed",
                    "filters": [],
                    "actions": [{"type": "extra_bonus", "value": "100"}],
                }
            ],
        },
        {
            "name": "5% back",
            "summable": True,
            "chains": [
                {
                    "event": "bonus_calculation",
                    "filters": [],
                    "actions": [{"type": "bonus", "kind": "percent", "value": "5"}],
                }
            ],
        },
        {
            "name": "pay half",
            "chains": [
                {
                    "event": "write_off",
                    "filters": [],
                    "actions": [{"type": "write_off_rule", "max_percent": "50"}],
                }
            ],
        },
    ] + [
        {
            "name": f"extra {i}",
            "priority": i % 5,
            "chains": [
                {
                    "event": "discount_calculation",
                    "filters": [{"type": "products", "groups": ["g0"]}],
                    "actions": [{"type": "discount", "kind": "percent", "value": str(1 + i % 15)}],
                }
            ],
        }
        for i in range(20)
    ]
    for offer in offers:
        created = post("/api/v1/admin/offers", offer)
        post(f"/api/v1/admin/offers/{created['id']}/status", {"status": "active"})
    pos_key = post("/api/v1/admin/keys", {"role": "pos", "store": "H1"})["key"]
    return pos_key, cards, skus


def cheque(rng: random.Random, op: str, card: str, skus: list[str]) -> dict[str, Any]:
    lines = []
    for n in range(10):
        qty = rng.randint(1, 3)
        lines.append(
            {
                "line": n + 1,
                "sku": rng.choice(skus),
                "price": "99.90",
                "quantity": str(qty),
                "amount": str(Decimal("99.90") * qty),
            }
        )
    total = sum(Decimal(x["amount"]) for x in lines)
    body: dict[str, Any] = {
        "operation_id": op,
        "identifier": {"card": card},
        "cheque": {
            "number": op,
            "created_at": "2026-11-23T12:00:00+03:00",
            "lines": lines,
            "payments": [{"method": rng.choice(["cash", "card", "online"]), "amount": str(total)}],
        },
    }
    if rng.random() < 0.33:
        body["write_off"] = {"currency": "bonus", "amount": "10"}
    return body


async def run_load(
    base: str, key: str, cards: list[str], skus: list[str], rate: float, seconds: float, tag: str
) -> tuple[list[float], int, float]:
    """Open loop: a purchase starts every 1/rate s whatever the server does (no coordinated omission)."""
    rng = random.Random(7)
    latencies: list[float] = []
    errors = 0
    # aiohttp costs the client far less CPU per request than httpx: on 2 cores the load generator
    # shares the machine with the server, so its overhead would otherwise show up as latency.
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(
        base, headers={"Authorization": f"Bearer {key}"}, connector=connector
    ) as client:

        async def post(url: str, body: Any) -> int:
            async with client.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
                await r.read()
                return r.status

        async def one(i: int) -> None:
            nonlocal errors
            body = cheque(rng, f"{tag}-{i}", rng.choice(cards), skus)
            start = time.perf_counter()
            try:
                s1 = await post("/api/v1/pos/calculate", body)
                s2 = await post("/api/v1/pos/confirm", {"operation_id": body["operation_id"]})
            except (aiohttp.ClientError, TimeoutError):
                s1 = s2 = 0
            latencies.append((time.perf_counter() - start) * 1000)
            if s1 != 200 or s2 != 200:
                errors += 1

        tasks = []
        started = time.perf_counter()
        total = int(rate * seconds)
        for i in range(total):
            target = started + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def report(
    label: str, lat: list[float], errors: int, elapsed: float, cpu: tuple[float, float] | None = None
) -> None:
    costs = ""
    if cpu is not None and lat:
        costs = (
            f"; CPU per purchase: API {cpu[0] / len(lat) * 1000:.1f} ms, "
            f"worker {cpu[1] / len(lat) * 1000:.1f} ms"
        )
    print(
        f"{label}: {len(lat)} purchases ({2 * len(lat) / elapsed:,.0f} requests/s achieved), "
        f"calculate+confirm p50 {statistics.median(lat):.1f} ms, p95 {pct(lat, 0.95):.1f} ms, "
        f"p99 {pct(lat, 0.99):.1f} ms, errors {errors}{costs}"
    )


def measured(
    server: Server,
    base: str,
    key: str,
    cards: list[str],
    skus: list[str],
    rate: float,
    seconds: float,
    tag: str,
) -> tuple[list[float], int, float, tuple[float, float]]:
    """One load run and the CPU the server processes spent on it."""
    api0, worker0 = server.cpu_seconds()
    lat, errors, elapsed = asyncio.run(run_load(base, key, cards, skus, rate, seconds, tag))
    # The worker drains the events of the last purchases a moment later.
    time.sleep(1.0)
    api1, worker1 = server.cpu_seconds()
    return lat, errors, elapsed, (api1 - api0, worker1 - worker0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200, help="requests/s (2 per purchase)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--members", type=int, default=2000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--find-max", action="store_true")
    parser.add_argument(
        "--api-workers", type=int, default=1, help="HTTP processes of `omniloyal serve --workers N`"
    )
    parser.add_argument(
        "--embedded-workers",
        action="store_true",
        help="run the event consumers inside the API process (the `make demo` shape) instead of a worker",
    )
    a = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="omniloyal-bench-"))
    url = a.database_url or f"sqlite:///{workdir}/bench.db"
    port = free_port()
    proc = start_server(url, port, workdir, a.embedded_workers, a.api_workers)
    try:
        base = f"http://127.0.0.1:{port}"
        print(f"seeding {a.members} members on {url.split('@')[-1]} ...", file=sys.stderr)
        pos_key, cards, skus = seed(base, admin_key(url), a.members)
        asyncio.run(run_load(base, pos_key, cards, skus, 20, 3, "warm"))
        print(f"measuring {a.seconds:.0f} s at {a.rate:.0f} requests/s ...", file=sys.stderr)
        lat, errors, elapsed, cpu = measured(proc, base, pos_key, cards, skus, a.rate / 2, a.seconds, "fixed")
        report(f"at {a.rate:.0f} requests/s", lat, errors, elapsed, cpu)
        if a.find_max:
            best = 0.0
            rate = a.rate
            while True:
                rate *= 1.25
                lat, errors, elapsed, cpu = measured(
                    proc, base, pos_key, cards, skus, rate / 2, 10, f"r{rate:.0f}"
                )
                report(f"at {rate:.0f} requests/s", lat, errors, elapsed, cpu)
                if errors or pct(lat, 0.99) > 50:
                    break
                best = rate
            print(f"maximum sustained with p99 < 50 ms: {best:,.0f} requests/s")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    from machine import note

    print(note())
    main()
    print(note())
