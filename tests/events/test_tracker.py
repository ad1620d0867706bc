"""The site tracker: served with the right type and caching; in a real browser (Chromium driven by
Playwright, when both are installed) the example shop sends page, product, cart and search events
with the visitor cookie and the landing page's utm, and identify links the visitor to the member."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from omniloyal.db.engine import Database
from omniloyal.events.models import OutboxEvent
from tests.conftest import Api, make_key

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shop.html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_tracker_is_served_as_cacheable_javascript(api: Api) -> None:
    answer = api.client.get("/t/tracker.js")  # no key: it is public
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/javascript")
    assert answer.headers["cache-control"] == "public, max-age=3600"
    assert answer.headers["x-content-type-options"] == "nosniff"
    etag = answer.headers["etag"]
    assert "sendBeacon" in answer.text and "ol_aid" in answer.text and "identify" in answer.text
    again = api.client.get("/t/tracker.js", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag


def test_the_example_page_uses_the_tracker() -> None:
    page = EXAMPLE.read_text(encoding="utf-8")
    assert 'src="/t/tracker.js"' in page and "data-ol-product-view" in page and "identify" in page


# ---------------------------------------------------------------- in a browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def live_server(app: Any, db: Database) -> Iterator[tuple[str, str]]:
    """The app under uvicorn in a thread, serving the example shop with a key that may send events."""
    if db.dialect != "sqlite":
        pytest.skip("the browser test runs once, on SQLite")
    key = make_key(db, "marketer", name="site tracker (the tracker role is not there yet)")
    html = EXAMPLE.read_text(encoding="utf-8").replace("YOUR_TRACKER_KEY", key)
    app.add_api_route("/shop.html", lambda: HTMLResponse(html), methods=["GET"])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", key
    server.should_exit = True
    thread.join(timeout=10)


def _ingested(db: Database) -> list[dict[str, Any]]:
    with db.reading() as session:
        return [r.payload for r in session.scalars(select(OutboxEvent).order_by(OutboxEvent.seq))]


def _wait_for(db: Database, check: Any, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        events = _ingested(db)
        if check(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


def test_the_example_shop_in_chromium(live_server: tuple[str, str], api: Api, db: Database) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (Python package) to run the browser test"
    )
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    base, _ = live_server
    member = api.post(f"{'/api/v1/admin'}/members", json={"first_name": "Ivan", "email": "ivan@example.ru"})
    assert member.status_code == 201, member.text
    member_id = member.json()["id"]

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{base}/shop.html?utm_source=newsletter&utm_campaign=november")
            page.wait_for_function("window.omniloyal && window.omniloyal.__omniloyal === true")
            page.click("#add")
            page.click("#search button")
            page.evaluate("omniloyal.flush()")
            page.click("#next")  # leaving the page flushes; the next page has no utm in its URL
            page.wait_for_url("**/shop.html?page=2")
            page.wait_for_function("window.omniloyal && window.omniloyal.__omniloyal === true")
            page.click("#login button")
            page.evaluate("omniloyal.flush()")
            cookies = {c["name"]: c for c in page.context.cookies()}
        finally:
            browser.close()

    events = _wait_for(db, lambda evs: any(e["type"] == "identity.linked" for e in evs))
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)
    assert {"page_view", "section_view", "product_view", "add_to_cart", "search", "identify"} <= set(by_type)
    assert len(by_type["page_view"]) == 2
    visitor = cookies["ol_aid"]["value"]
    assert cookies["ol_aid"]["expires"] - time.time() > 360 * 24 * 3600  # a one-year first-party cookie
    web = [e for e in events if "." not in e["type"]]
    assert {e["anonymous_id"] for e in web} == {visitor}
    # The landing page's campaign stays with the visit, the second page's view included.
    assert all(e["utm"] == {"utm_source": "newsletter", "utm_campaign": "november"} for e in web), web
    assert by_type["product_view"][0]["properties"] | {} == {
        "sku": "MILK-1",
        "price": "89.90",
        "category": "Food/Dairy/Milk",
        "url": by_type["product_view"][0]["properties"]["url"],
    }
    assert by_type["add_to_cart"][0]["properties"]["quantity"] == "1"
    assert by_type["search"][0]["properties"]["query"] == "сыр"
    assert by_type["identify"][0]["member_id"] == member_id
    [link] = by_type["identity.linked"]
    assert link["member_id"] == member_id and link["properties"]["anonymous_id"] == visitor
