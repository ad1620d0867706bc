"""`omniloyal serve --workers 2`: several HTTP processes on one port, jobs run once by the supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_api_processes_answer_and_stop_with_the_supervisor(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "OMNILOYAL_DATABASE_URL": f"sqlite:///{tmp_path}/store.db",
        "OMNILOYAL_WAREHOUSE_URL": f"duckdb:///{tmp_path}/warehouse.duckdb",
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "omniloyal"), "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        answered = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and answered < 20:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                assert response.status_code == 200
                answered += 1
            except httpx.TransportError:
                time.sleep(0.2)
        assert answered == 20, (tmp_path / "serve.log").read_text()
        unauthorised = httpx.get(f"http://127.0.0.1:{port}/api/v1/admin/stores", timeout=5)
        assert unauthorised.status_code == 401
        assert unauthorised.json()["error"]["code"] == "missing_api_key"
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) >= 2  # the two HTTP processes (uvicorn may add a helper process)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, (tmp_path / "serve.log").read_text()

    def running(pid: str) -> bool:
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    # A helper (multiprocessing's resource tracker) ends when it notices its parent gone, a
    # moment after the supervisor: wait for that, but nothing may outlive it for long.
    deadline = time.monotonic() + 15
    while any(running(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [child for child in children if running(child)]
