"""How fast this machine's CPU is right now, printed beside every benchmark's figures.

Shared 2-core build machines differ from one session to the next (and within one, under
neighbours' load) by 2-3x on the same code; a figure means little without the speed it was
measured at. ``reference_ms()`` times a fixed pure-Python loop (3 million additions, best of 3):
lower is faster. README figures give the reference they were measured at.
"""

from __future__ import annotations

import time


def reference_ms() -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        total = 0
        for i in range(3_000_000):
            total += i
        best = min(best, time.process_time() - started)
    return best * 1000


def note() -> str:
    return f"machine reference: {reference_ms():.0f} ms for 3M pure-Python additions (lower is faster)"


if __name__ == "__main__":
    print(note())
