"""Offer engine alone: evaluations per second of a 10-line cheque against N active offers.

Usage: python bench/engine.py [--offers 100] [--lines 10] [--seconds 5] [--processes 2]
Prints evaluations/s per process and in total. Target (issue 3): >= 20,000/s on 2 cores.
The CPU figures (process time) say what the engine costs when other work shares the machine.

A cheque here gets about 3 discount chains, 2 write-off rules and 5-6 bonus chains (39 accruals:
one per line and bonus chain). Of an evaluation, the bonus phase takes about 45%, the write-off
25% (over a quarter of that is spreading the points written off over the lines), discounts 15%,
preparing the result and finding the cheque's offers 15%; most of each is Decimal arithmetic and
building the Accrual and LineResult objects.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time
from datetime import datetime
from decimal import Decimal

from omniloyal.offers.engine import (
    Chain,
    Cheque,
    Line,
    MemberFacts,
    Offer,
    Payment,
    Rule,
    Snapshot,
    calculate,
)

FORMATS = ["Hypermarket", "Supermarket", "Minimarket"]


def build_offers(n: int, rng: random.Random) -> list[Offer]:
    offers: list[Offer] = []
    for i in range(n):
        filters: list[Rule] = []
        kind = i % 5
        if kind == 0:
            filters.append(
                Rule("stores", {"attribute": "CustomTradeFormat", "values": [rng.choice(FORMATS)]})
            )
        if kind in (1, 2):
            filters.append(Rule("products", {"groups": [f"g{rng.randrange(30)}"]}))
        if kind == 3:
            filters.append(Rule("payment_method", {"methods": ["online"]}))
        if i % 7 == 0:
            filters.append(Rule("days_of_week", {"days": [1, 2, 3, 4, 5]}))
        if i % 4 == 0:
            event, action = (
                "bonus_calculation",
                Rule("bonus", {"kind": "percent", "value": str(rng.randint(1, 10))}),
            )
        elif i % 9 == 0:
            event, action = "write_off", Rule("write_off_rule", {"max_percent": "50"})
        else:
            event, action = (
                "discount_calculation",
                Rule("discount", {"kind": "percent", "value": str(rng.randint(1, 30))}),
            )
        offers.append(
            Offer(
                i + 1,
                f"offer {i}",
                (Chain(event, tuple(filters), (action,)),),
                priority=rng.randint(0, 5),
                summable=i % 6 == 0,
            )
        )
    return offers


def build_cheques(count: int, lines: int, rng: random.Random) -> list[Cheque]:
    cheques = []
    for _ in range(count):
        items = []
        for n in range(lines):
            price = Decimal(rng.randint(50, 5000)) / 10
            qty = Decimal(rng.randint(1, 3))
            sku = rng.randrange(5000)
            # A product's groups are fixed by the catalogue: derive them from the sku.
            items.append(
                Line(
                    n + 1,
                    f"sku{sku}",
                    price,
                    qty,
                    price * qty,
                    category_path="Food / Dairy / Milk",
                    groups=frozenset({f"g{sku % 30}", f"g{(sku // 30) % 30}"}),
                )
            )
        total = sum((x.amount for x in items), Decimal(0))
        member = MemberFacts(1, card_state="activated", can_spend=True, available={"bonus": Decimal(500)})
        cheques.append(
            Cheque(
                datetime(2026, 11, 23, 12),
                "S1",
                "offline",
                {"CustomTradeFormat": rng.choice(FORMATS)},
                tuple(items),
                (Payment("card", total),),
                member,
                "bonus",
                Decimal(50),
            )
        )
    return cheques


def worker(args: tuple[int, int, float, int]) -> tuple[int, float, float]:
    """Evaluations done, wall seconds and CPU seconds they took."""
    offers_n, lines, seconds, seed = args
    rng = random.Random(seed)
    snapshot = Snapshot.build(build_offers(offers_n, random.Random(1)))
    cheques = build_cheques(500, lines, rng)
    done = 0
    start = time.perf_counter()
    cpu = time.process_time()
    while time.perf_counter() - start < seconds:
        for cheque in cheques:
            calculate(snapshot, cheque)
        done += len(cheques)
    return done, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--offers", type=int, default=100)
    parser.add_argument("--lines", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--processes", type=int, default=2)
    a = parser.parse_args()
    one_done, one_time, one_cpu = worker((a.offers, a.lines, a.seconds, 0))
    print(
        f"engine, 1 process : {one_done / one_time:,.0f} evaluations/s "
        f"({a.lines}-line cheque, {a.offers} active offers, {one_time / one_done * 1e6:.0f} µs each, "
        f"{one_cpu / one_done * 1e6:.0f} µs of CPU)"
    )
    if a.processes > 1:
        with mp.Pool(a.processes) as pool:
            results = pool.map(worker, [(a.offers, a.lines, a.seconds, s) for s in range(a.processes)])
        total = sum(d / t for d, t, _ in results)
        share = sum(c / t for _, t, c in results) / a.processes
        print(
            f"engine, {a.processes} processes: {total:,.0f} evaluations/s in total "
            f"(each process got {share:.0%} of a CPU)"
        )


if __name__ == "__main__":
    from machine import note

    print(note())
    main()
    print(note())
