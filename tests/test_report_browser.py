"""`rank1 report`'s page in a real browser (docs/commands/report.md#checked-in-a-browser): Debian's
headless Chromium opens it from a file:// URL with the network cut off and is driven over the
DevTools protocol (--remote-debugging-pipe: JSON messages on file descriptors 3 and 4, NUL-ended;
the standard library suffices). The page loads with no console error and no failed or network
request, every figure has a size, the verdict and every section heading are in the rendered text,
a full-page screenshot is written, and at a 390 px wide phone viewport nothing scrolls sideways.

Skipped, saying why, where /usr/bin/chromium is missing (`.ci/run` installs it on CI)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from _report_support import build_inputs
from _support import run_main

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian's chromium package): the browser check is skipped"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    # no network at all: every host name fails and any proxied request goes nowhere
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    "--remote-debugging-pipe",
]


def _high(fd: int) -> int:
    """`fd` moved to a number above 9 (close-on-exec)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """Chromium over --remote-debugging-pipe: send(method, params) waits for the answer; events are kept."""

    def __init__(self, profile: Path):
        # every end above fd 9, so that dup2 onto 3 and 4 always copies (dup2 of an fd onto itself
        # would keep its close-on-exec flag, and the browser would find no pipe)
        to_child_r, self._to_child, self._from_child, from_child_w = (_high(fd) for fd in (*os.pipe(), *os.pipe()))

        def fds():  # the protocol's pipe: the browser reads fd 3 and writes fd 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 20) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 20) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            e = self._read(max(0.1, deadline - time.monotonic()))
            if e.get("method") == method:
                return e
            self.events.append(e)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report_browser")
    out = build_inputs(root, with_logprobs=False)
    html = root / "report.html"
    names = [str(out[k]) for k in ("syn", "fits", "lin", "relex", "bt", "demo")]
    r = run_main("report", *names, "--out", str(html))
    assert r.returncode == 0, r.stderr
    return root, html


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        b.session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable")
        b.send(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        yield b
    finally:
        b.close()


def _open(b: Browser, url: str, width: int, height: int, mobile: bool) -> None:
    b.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )
    b.events.clear()
    b.send("Page.navigate", {"url": url})
    b.wait_for("Page.loadEventFired")


def _problems(events: list[dict]) -> list[str]:
    """Console errors, exceptions, and any request that failed or left the file."""
    found = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            found.append(f"console: {p.get('args')}")
        elif m == "Runtime.exceptionThrown":
            found.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            found.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            found.append(f"failed request: {p.get('errorText')}")
        elif m == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if not url.startswith(("file://", "data:")):
                found.append(f"request to {url}")
    return found


def test_page_in_chromium_desktop_and_phone(page, browser):
    root, html = page
    url = html.resolve().as_uri()
    _open(browser, url, 1200, 900, mobile=False)
    assert _problems(browser.events) == []
    assert browser.evaluate("document.readyState") == "complete"

    # every figure has a size
    sizes = browser.evaluate(
        "Array.from(document.querySelectorAll('figure.fig svg')).map(e => {"
        "const r = e.getBoundingClientRect(); return [r.width, r.height]; })"
    )
    assert len(sizes) >= 8, sizes  # spectra 2, fits 1, linearity 2, backtest 1, demo 2
    assert all(w > 100 and h > 50 for w, h in sizes), sizes

    # the verdict and every section heading in the rendered text
    text = browser.evaluate("document.body.innerText")
    headings = browser.evaluate("Array.from(document.querySelectorAll('section h2')).map(h => h.innerText)")
    source = html.read_text(encoding="utf-8")
    expected = re.findall(r"<h2>([^<]+)</h2>", source)
    assert headings == expected and len(expected) >= 8
    for h in expected:
        assert h in text
    assert "Verdict" in text and re.search(r"Updates are \w[\w -]+ \(mean energy_1 0\.\d\d\)", text)
    items = browser.evaluate("document.querySelectorAll('#verdict li').length")
    assert items == source.count("<li")

    # a full-page screenshot
    metrics = browser.send("Page.getLayoutMetrics")
    height = int(metrics["cssContentSize"]["height"])
    shot = browser.send(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1200, "height": height, "scale": 1},
        },
    )
    png = root / "report-1200.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    if os.environ.get("RANK1_REPORT_SCREENSHOT"):  # docs/commands/report.md's screenshot (make docs-examples)
        Path(os.environ["RANK1_REPORT_SCREENSHOT"]).write_bytes(png.read_bytes())

    # a phone: no horizontal scrolling of the page
    _open(browser, url, 390, 844, mobile=True)
    assert _problems(browser.events) == []
    widths = browser.evaluate("[document.body.scrollWidth, document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[2] == 390 and widths[0] <= widths[2] and widths[1] <= widths[2], widths
    sizes = browser.evaluate(
        "Array.from(document.querySelectorAll('figure.fig svg')).map(e => e.getBoundingClientRect().width)"
    )
    assert all(0 < w <= 390 for w in sizes), sizes
    shot = browser.send("Page.captureScreenshot", {"format": "png"})
    (root / "report-390.png").write_bytes(base64.b64decode(shot["data"]))
