"""The report written while a run trains, and served: ``report.html`` in the store, ``spotsafe report --serve``.

While a :class:`spotsafe.Run` trains, :class:`LivePage` writes the report into the
store as ``report.html`` every few minutes (an S3 static website, or ``aws s3 cp``,
shows it). :func:`write_report` builds it once (a rehearsal's last word), and
:func:`make_server` serves a page that refreshes itself.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spotsafe.storage.base import Store
from spotsafe.storage.registry import open_store
from spotsafe.story.cost import Prices
from spotsafe.story.facts import StoreReport
from spotsafe.story.html import pick_images, plotly_js, render_html
from spotsafe.story.metrics import metrics_text, require_prometheus

__all__ = ["LIVE_REPORT", "LivePage", "build_page", "embedded_images", "make_server", "write_report"]

log = logging.getLogger(__name__)

#: Where the live page goes in the store.
LIVE_REPORT = "report.html"
#: The images one page embeds hold at most this many bytes in all (the rest are listed, not shown).
MAX_PAGE_IMAGE_BYTES = 6 << 20


def embedded_images(report: StoreReport, events: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """The images the page embeds (:func:`spotsafe.story.html.pick_images`), read from ``media/``.

    Read through the store's safe reads with a size cap (:func:`spotsafe.story.validate.read_media`),
    at most :data:`MAX_PAGE_IMAGE_BYTES` in all; the report's image cache keeps only these (a long
    run's live page holds one page's images, not every image it ever showed). Why an image is
    missing is in ``report.image_problems``.
    """
    picked = [str(e.get("path")) for e in pick_images([e for e in events if e.get("kind") == "image"])]
    report.keep_images(set(picked))
    out: dict[str, bytes] = {}
    total = 0
    for path in picked:
        data = report.image(path)
        if data is None:
            continue
        if total + len(data) > MAX_PAGE_IMAGE_BYTES:
            report.image_problems[path] = (
                f"{path}: not shown (the page's images are capped at {MAX_PAGE_IMAGE_BYTES} bytes)"
            )
            continue
        total += len(data)
        out[path] = data
    return out


def build_page(
    report: StoreReport,
    prices: Prices | None = None,
    *,
    lookup: bool = False,
    refresh_seconds: float | None = None,
    plotly_src: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """(facts, events, the HTML page) of ``report``'s store; images that could not be shown join ``problems``."""
    facts, events = report.build(prices, lookup=lookup)
    images = embedded_images(report, events)
    if report.image_problems:
        facts = {**facts, "problems": [*facts["problems"], *sorted(report.image_problems.values())]}
    page = render_html(facts, events, images, refresh_seconds=refresh_seconds, plotly_src=plotly_src)
    return facts, events, page


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
        facts, _, page = build_page(StoreReport(opened), prices, lookup=lookup)
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
        self._plotly_written: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"spotsafe-live-report({store.url})", daemon=True)

    @classmethod
    def start(cls, store: Store, *, every: float = 300.0) -> LivePage | None:
        if importlib.util.find_spec("plotly") is None:  # found, not imported: the thread imports it later
            log.info("spotsafe: no live report page (install spotsafe[report] for one)")
            return None
        page = cls(store, every=every)
        page.start_thread()
        return page

    def start_thread(self) -> None:
        """Start writing pages in the background (:meth:`start` does; for a page built by hand)."""
        self._thread.start()

    def refresh(self) -> bool:
        """Build the page now and write it into the store. True when written."""
        with self._lock:
            try:
                src = self._shared_plotly()
                _, _, page = build_page(self.report, refresh_seconds=self.every, plotly_src=src)
                self.store.commit_file(LIVE_REPORT, page.encode())
            except Exception as e:  # noqa: BLE001 - a live page must never stop training; kept in last_error
                if self.last_error is None:
                    log.warning("spotsafe: could not write the live report to %s: %s", self.store.url, e)
                self.last_error = e
                return False
            self.written += 1
            return True

    def _shared_plotly(self) -> str:
        """plotly.js's file beside the page, written once per launch where it is missing or differs: its name."""
        name, js = plotly_js()
        if self._plotly_written != name:
            data = js.encode()
            if self.store.file_size(name) != len(data):
                self.store.commit_file(name, data)
            self._plotly_written = name
        return name

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


class _Built:
    """The server's copy of the story (facts, events, page), rebuilt at most every ``refresh_seconds``."""

    def __init__(self, store: Store, refresh_seconds: float, prices: Prices | None) -> None:
        self.store = store
        self.report = StoreReport(store)
        self.refresh_seconds = refresh_seconds
        self.prices = prices
        self.plotly_name, js = plotly_js()
        self.plotly = js.encode()
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._story: tuple[dict[str, Any], list[dict[str, Any]], bytes] | None = None

    def story(self) -> tuple[dict[str, Any], list[dict[str, Any]], bytes]:
        with self._lock:
            if self._story is None or time.monotonic() - self._at >= self.refresh_seconds:
                facts, events, page = build_page(
                    self.report, self.prices, refresh_seconds=self.refresh_seconds, plotly_src=self.plotly_name
                )
                self._story = (facts, events, page.encode())
                self._at = time.monotonic()
            return self._story

    def metrics(self) -> bytes:
        facts, events, _ = self.story()
        return metrics_text(self.store, facts, events)


def make_server(
    store: Store,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    refresh_seconds: float = 30.0,
    prices: Prices | None = None,
) -> ThreadingHTTPServer:
    """An HTTP server for the report of ``store``: ``/`` the page, ``/metrics`` Prometheus metrics.

    The page is rebuilt at most every ``refresh_seconds``; plotly.js is served once beside it
    (cached by the browser). Status lines carry only the standard reason phrases: what the store
    holds reaches a client only in a body, HTML-escaped. Binds to ``host`` (127.0.0.1 unless told).
    """
    built = _Built(store, refresh_seconds, prices)
    pages = ("/", "/index.html", "/report.html")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug("report server: " + format, *args)

        def _send(self, code: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
            self.send_response(code)  # the standard phrase for the code, never a text of ours
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _fail(self, code: int, detail: str) -> None:
            body = f"<!DOCTYPE html><html><body><h1>{code}</h1><p>{html.escape(detail)}</p></body></html>\n"
            self._send(code, body.encode("utf-8", "replace"), "text/html; charset=utf-8")

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path in pages:
                    self._send(200, built.story()[2], "text/html; charset=utf-8")
                elif path == f"/{built.plotly_name}":
                    self._send(200, built.plotly, "text/javascript; charset=utf-8", "public, max-age=86400, immutable")
                elif path == "/metrics":
                    content_type = str(require_prometheus().CONTENT_TYPE_LATEST)
                    self._send(200, built.metrics(), content_type)
                else:
                    self._fail(404, "not found: the report is at /, its metrics at /metrics")
            except Exception as e:  # noqa: BLE001 - any failure is this request's 500, never the server's end
                log.warning("report server: %s: %s", path[:200], e)
                self._fail(500, f"could not build the report: {type(e).__name__}: {e}")

        do_HEAD = do_GET

    return ThreadingHTTPServer((host, port), Handler)
