"""From a confirmed purchase (POS API) to the member's updated profile features: p50/p95/p99
(target: p99 < 2 s).

Starts the server (API + outbox dispatcher + in-process bus + warehouse sink, as `omniloyal
serve` runs them) on a fresh SQLite store and DuckDB warehouse, creates a store, products and
--members members with cards, then, one purchase at a time, `calculate` + `confirm` at the till
and polls `GET /api/v1/admin/members/{id}/profile` every --poll seconds until its features count
the purchase. With --background N, a client keeps sending N web events/s to the ingest API
meanwhile (the sink is then busy with them too).

Usage:
  python bench/profile_latency.py [--purchases 200] [--members 50] [--background 0] [--warehouse duckdb|chdb]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ingest import BIN, SERVER, free_port, run, wait_healthy, web_event

SKUS = [(f"SKU{i:03d}", f"Food / Cat {i % 7}") for i in range(50)]


def seed(client: httpx.Client, members: int) -> list[tuple[int, str]]:
    def post(url: str, body: Any) -> Any:
        response = client.post(url, json=body)
        if response.status_code not in (200, 201):
            raise SystemExit(f"seeding {url} failed: {response.text}")
        return response.json()

    post("/api/v1/admin/legal-entities", {"code": "LE", "name": "Retail LLC"})
    post(
        "/api/v1/admin/stores",
        {
            "code": "H1",
            "name": "Hyper",
            "legal_entity": "LE",
            "channel": "offline",
            "timezone": "Europe/Moscow",
        },
    )
    post("/api/v1/admin/payment-methods", {"code": "card", "name": "card"})
    for sku, category in SKUS:
        post("/api/v1/admin/products", {"sku": sku, "name": sku, "price": "99.90", "category": category})
    out = []
    for i in range(members):
        number = f"88{i:08d}"
        member = post(
            "/api/v1/admin/members",
            {"first_name": f"M{i}", "cards": [{"number": number, "kind": "physical", "state": "activated"}]},
        )
        out.append((member["id"], number))
    return out


def background(base: str, key: str, rate: int, stop: threading.Event) -> None:
    """Sends ``rate`` web events per second in batches of up to 1,000."""
    rng = random.Random(3)
    i = 10_000_000
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            batch = [web_event(i + n, 0, rng) for n in range(min(rate, 1000))]
            i += len(batch)
            client.post("/api/v1/events", json=batch)
            stop.wait(max(0.0, len(batch) / rate - (time.perf_counter() - started)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--purchases", type=int, default=200)
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--poll", type=float, default=0.01, help="Seconds between profile polls")
    parser.add_argument("--background", type=int, default=0, help="Web events per second sent meanwhile")
    parser.add_argument("--consumer-batch", type=int, default=200, help="Events per sink call")
    parser.add_argument("--warehouse", choices=["duckdb", "chdb"], default="duckdb")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="omniloyal-bench-latency-"))
    wh_url = (
        f"duckdb:///{workdir}/warehouse.duckdb" if args.warehouse == "duckdb" else f"chdb:///{workdir}/chdb"
    )
    env = {
        **os.environ,
        "OMNILOYAL_DATABASE_URL": f"sqlite:///{workdir}/omniloyal.db",
        "OMNILOYAL_WAREHOUSE_URL": wh_url,
        "OMNILOYAL_AUTH_CACHE_SECONDS": "60",
    }
    omniloyal = str(BIN / "omniloyal")
    run([omniloyal, "migrate"], env)
    key = run([omniloyal, "keys", "create", "--role", "admin"], env)
    pos_key = ""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(BIN / "python"), "-c", SERVER, str(port), str(args.consumer_batch)],
        env=env,
        stdout=(workdir / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    stop = threading.Event()
    try:
        wait_healthy(base, workdir / "server.log")
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        members = seed(admin, args.members)
        pos_key = run([omniloyal, "keys", "create", "--role", "pos", "--store", "H1"], env)
        till = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {pos_key}"}, timeout=30)
        if args.background:
            threading.Thread(target=background, args=(base, key, args.background, stop), daemon=True).start()
            time.sleep(1.0)
        rng = random.Random(11)
        counts: dict[int, int] = {}
        latencies: list[float] = []
        for n in range(args.purchases):
            member_id, card = members[n % len(members)]
            lines = []
            for line, (sku, _) in enumerate(rng.sample(SKUS, 3), start=1):
                lines.append({"line": line, "sku": sku, "price": "99.90", "quantity": "1", "amount": "99.90"})
            body = {
                "operation_id": f"lat-{n}",
                "identifier": {"card": card},
                "cheque": {
                    "number": f"C{n}",
                    "created_at": "2026-11-23T12:00:00+03:00",
                    "lines": lines,
                    "payments": [{"method": "card", "amount": "299.70"}],
                },
            }
            calculated = till.post("/api/v1/pos/calculate", json=body)
            if calculated.status_code != 200:
                raise SystemExit(f"calculate: {calculated.text}")
            confirmed = till.post("/api/v1/pos/confirm", json={"operation_id": f"lat-{n}"})
            if confirmed.status_code != 200:
                raise SystemExit(f"confirm: {confirmed.text}")
            started = time.perf_counter()
            expected = counts.get(member_id, 0) + 1
            counts[member_id] = expected
            while True:
                profile = admin.get(f"/api/v1/admin/members/{member_id}/profile", params={"limit": 1})
                if profile.status_code != 200:
                    raise SystemExit(f"profile: {profile.status_code} {profile.text[:300]}")
                features = profile.json()["features"]
                if features and features["purchases_count"] >= expected:
                    break
                if time.perf_counter() - started > 30:
                    raise SystemExit("features not updated within 30 s")
                time.sleep(args.poll)
            latencies.append(time.perf_counter() - started)
    finally:
        stop.set()
        server.terminate()
        server.wait(30)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, round(p / 100 * (len(latencies) - 1)))] * 1000

    print(
        f"confirmed purchase -> updated profile features ({args.warehouse}, {args.purchases} purchases, "
        f"background {args.background} web events/s, consumer batches of {args.consumer_batch}):\n"
        f"  p50 {pct(50):.0f} ms  p95 {pct(95):.0f} ms  p99 {pct(99):.0f} ms  "
        f"max {latencies[-1] * 1000:.0f} ms  mean {statistics.mean(latencies) * 1000:.0f} ms"
    )
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    from machine import note

    print(note())
    main()
    print(note())
