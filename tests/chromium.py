"""Render a page in headless Chromium and report what it did, over the DevTools protocol on a pipe.

Used by the report tests (no console errors, no network requests, the charts drew)
and to take the README's screenshot::

    python -m tests.chromium report.html docs/report.png

Chromium (Debian's ``chromium``) runs with a fresh profile and everything that
phones home turned off; ``--remote-debugging-pipe`` gives the protocol on fds 3/4,
so no port is opened.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Rendered:
    console: list[dict[str, Any]] = field(default_factory=list)  # Runtime.consoleAPICalled params
    exceptions: list[dict[str, Any]] = field(default_factory=list)  # Runtime.exceptionThrown params
    log_entries: list[dict[str, Any]] = field(default_factory=list)  # Log.entryAdded entries
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    evaluated: Any = None
    screenshot: bytes | None = None

    @property
    def errors(self) -> list[str]:
        out = [
            f"console.{c.get('type')}: {c.get('args')}" for c in self.console if c.get("type") in ("error", "assert")
        ]
        out += [f"exception: {e.get('exceptionDetails', {}).get('text')} {e}" for e in self.exceptions]
        out += [
            f"log {e.get('level')}: {e.get('text')} ({e.get('url')})"
            for e in self.log_entries
            if e.get("level") == "error"
        ]
        return out


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc = proc
        self.to_browser = to_browser
        self.from_browser = from_browser
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self.cond:
                    self.cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self.cond:
                    if "id" in msg:
                        self.replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self.cond.notify_all()

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        with self.cond:
            while self.next_id not in self.replies:
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"chromium did not answer {method}")
                self.cond.wait(left)
            reply = self.replies.pop(self.next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if e.get("method") == method:
                        return e
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"no {method} from chromium")
                self.cond.wait(left)


def render(
    path: str | Path,
    *,
    evaluate: str | None = None,
    ready: str | None = None,
    screenshot: bool = False,
    width: int = 1280,
    timeout: float = 120,
) -> Rendered:
    """Open ``path`` in headless Chromium; wait until the JS expression ``ready`` is true (if given)."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("chromium is not installed")
    profile = tempfile.mkdtemp(prefix="spotsafe-chromium-")
    to_r, to_w = os.pipe()  # we write commands; chromium reads fd 3
    from_r, from_w = os.pipe()  # chromium writes fd 4; we read

    def child_fds() -> None:
        os.dup2(to_r, 3)
        os.dup2(from_w, 4)

    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},900", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=child_fds,  # noqa: PLW1509 - the pipe must sit on fds 3 and 4 in the child
        pass_fds=(3, 4),  # kept open in the child after preexec_fn put the pipe there
    )
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(proc, to_w, from_r)
    out = Rendered()
    try:
        targets = pipe.send("Target.getTargets", timeout=timeout)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session = pipe.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout=timeout)
        if ready:
            end = time.monotonic() + timeout
            while True:
                got = pipe.send("Runtime.evaluate", {"expression": ready, "returnByValue": True}, session=session)
                if got.get("result", {}).get("value"):
                    break
                if time.monotonic() > end:
                    raise TimeoutError(f"page never became ready: {ready}")
                time.sleep(0.2)
        time.sleep(0.5)  # late console errors from timers
        if evaluate:
            got = pipe.send("Runtime.evaluate", {"expression": evaluate, "returnByValue": True}, session=session)
            out.evaluated = got.get("result", {}).get("value")
        if screenshot:
            metrics = pipe.send("Page.getLayoutMetrics", session=session)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            shot = pipe.send(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
                },
                session=session,
            )
            out.screenshot = base64.b64decode(shot["data"])
        with pipe.cond:
            events = list(pipe.events)
        for e in events:
            params = e.get("params", {})
            method = e.get("method")
            if method == "Runtime.consoleAPICalled":
                out.console.append(params)
            elif method == "Runtime.exceptionThrown":
                out.exceptions.append(params)
            elif method == "Log.entryAdded":
                out.log_entries.append(params.get("entry", {}))
            elif method == "Network.requestWillBeSent":
                out.requests.append(params.get("request", {}).get("url", ""))
        try:
            pipe.send("Browser.close", timeout=10)
        except (TimeoutError, RuntimeError, OSError):
            pass
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_w)
        os.close(from_r)
        shutil.rmtree(profile, ignore_errors=True)
    return out


PLOTS_READY = "document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3"


def main(argv: list[str]) -> int:
    page, png = argv[0], argv[1]
    got = render(page, ready=PLOTS_READY, screenshot=True)
    assert got.screenshot is not None
    Path(png).write_bytes(got.screenshot)
    print(f"{png}: {len(got.screenshot)} bytes; errors: {got.errors}; requests: {got.requests}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
