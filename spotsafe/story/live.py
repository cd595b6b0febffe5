"""The report written while a run trains, and served: ``report.html`` in the store, ``spotsafe report --serve``.

While a :class:`spotsafe.Run` trains, :class:`LivePage` writes the report into the
store as ``report.html`` every few minutes (an S3 static website, or ``aws s3 cp``,
shows it). :func:`write_report` builds it once (a rehearsal's last word), and
:func:`make_server` serves a page that refreshes itself.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spotsafe.errors import SpotsafeError
from spotsafe.storage.base import Store
from spotsafe.storage.registry import open_store
from spotsafe.story.cost import Prices
from spotsafe.story.events import MEDIA_DIR
from spotsafe.story.facts import StoreReport
from spotsafe.story.html import pick_images, render_html

__all__ = ["LIVE_REPORT", "LivePage", "embedded_images", "make_server", "write_report"]

log = logging.getLogger(__name__)

#: Where the live page goes in the store.
LIVE_REPORT = "report.html"


def embedded_images(report: StoreReport, events: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """The images the page embeds (:func:`spotsafe.story.html.pick_images`), read from ``media/``."""
    out: dict[str, bytes] = {}
    for e in pick_images([e for e in events if e.get("kind") == "image"]):
        path = str(e.get("path"))
        if path.startswith(f"{MEDIA_DIR}/"):
            data = report.image(path)
            if data is not None:
                out[path] = data
    return out


def write_report(
    store: str | Store,
    output: str | None = None,
    *,
    prices: Prices | None = None,
    lookup: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """Build the report of ``store``; write the HTML to ``output`` (a local path) when given. (facts, html)."""
    opened = open_store(store, storage_options=storage_options) if not isinstance(store, Store) else store
    try:
        report = StoreReport(opened)
        facts, events = report.build(prices, lookup=lookup)
        page = render_html(facts, events, embedded_images(report, events))
    finally:
        if opened is not store:
            opened.close()
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(page)
    return facts, page


# -- the live page -------------------------------------------------------------------


class LivePage:
    """Rewrites ``report.html`` in the store every ``every`` seconds while a run trains.

    A named daemon thread; the first page comes a minute after the launch (or
    ``every``, whichever is shorter). Needs plotly (``spotsafe[report]``): without it
    :meth:`start` logs once and returns None.
    """

    def __init__(self, store: Store, *, every: float = 300.0, first_after: float | None = None) -> None:
        self.store = store
        self.every = float(every)
        self.first_after = min(60.0, self.every) if first_after is None else first_after
        self.report = StoreReport(store)
        #: How many pages were written, and the last error (the thread keeps going).
        self.written = 0
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"spotsafe-live-report({store.url})", daemon=True)

    @classmethod
    def start(cls, store: Store, *, every: float = 300.0) -> LivePage | None:
        if importlib.util.find_spec("plotly") is None:  # found, not imported: the thread imports it later
            log.info("spotsafe: no live report page (install spotsafe[report] for one)")
            return None
        page = cls(store, every=every)
        page._thread.start()
        return page

    def refresh(self) -> bool:
        """Build the page now and write it into the store. True when written."""
        with self._lock:
            try:
                facts, events = self.report.build()
                page = render_html(facts, events, embedded_images(self.report, events), refresh_seconds=self.every)
                self.store.commit_file(LIVE_REPORT, page.encode())
            except Exception as e:  # noqa: BLE001 - a live page must never stop training; kept in last_error
                if self.last_error is None:
                    log.warning("spotsafe: could not write the live report to %s: %s", self.store.url, e)
                self.last_error = e
                return False
            self.written += 1
            return True

    def _loop(self) -> None:
        if self._stop.wait(self.first_after):
            return
        while True:
            self.refresh()
            if self._stop.wait(self.every):
                return

    def close(self, *, refresh: bool = False) -> None:
        """Stop the thread; ``refresh`` writes the page one last time, where one was written before.

        (A run shorter than the first page's delay never had a live page: nothing to update.)
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if refresh and self.written:
            self.refresh()


# -- serving ---------------------------------------------------------------------------


def make_server(
    store: Store,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    refresh_seconds: float = 30.0,
    prices: Prices | None = None,
) -> ThreadingHTTPServer:
    """An HTTP server whose ``/`` is the report of ``store``, rebuilt at most every ``refresh_seconds``."""
    report = StoreReport(store)
    lock = threading.Lock()
    cache: dict[str, Any] = {"at": -1e18, "page": b""}

    def page() -> bytes:
        with lock:
            if time.monotonic() - cache["at"] >= refresh_seconds:
                facts, events = report.build(prices)
                cache["page"] = render_html(
                    facts, events, embedded_images(report, events), refresh_seconds=refresh_seconds
                ).encode()
                cache["at"] = time.monotonic()
            return bytes(cache["page"])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug("report server: " + format, *args)

        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/", "/index.html", "/report.html"):
                self.send_error(404)
                return
            try:
                body = page()
            except SpotsafeError as e:
                self.send_error(500, str(e))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    return ThreadingHTTPServer((host, port), Handler)
