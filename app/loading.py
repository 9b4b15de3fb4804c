"""A page that answers while the app starts: "memchat is starting", with its steps and progress.

Loading the language model takes 30-70 s; until the real server listens, a browser pointed at the
app would only say "site can't be reached". So, before the slow steps, `LoadingServer` listens on
the app's own host and port and serves a small self-contained page (no external assets: the app
may run offline). The page polls GET /healthz every second and redraws its steps and bar in place.

Hand-over: once the model is ready the loading server is stopped (`stop()` returns with the port
free) and the real app binds the same port. During that short gap the page's polls fail and are
retried silently; the first poll the real app answers with {"ready": true} makes the page reload
itself, which then loads the real app. The loading server itself never says ready: true, even
after `StartupProgress.ready()`, because until it has stopped the real app is not serving yet.

How long a start takes is kept in a small JSON file (e.g. <data-dir>/startup.json) written by
`ready()`; the next start shows its bar against that. On a first start there is no such file: the
bar fills against a guess (FIRST_START_GUESS_S) and the page says the first start converts the model.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .webserver import WebServer

log = logging.getLogger(__name__)

APP_STEPS = ("Python libraries", "database", "language model and memory generator", "web page")
"""The app's start-up steps (app/launch.py): the first runs before anything heavy is imported."""

FIRST_START_GUESS_S = 120.0
"""What the bar fills against on a first start (no startup.json yet): about a first start on 2 cores
(imports, converting the model, building the C++ layers), so that the bar moves there too."""

# The bar never reaches the end on time alone: a start may well take longer than the last one,
# and a bar stuck at 100% reads as "hung"; ready (the reload) is the only real end.
MAX_TIMED_SHARE = 0.95

# A recorded duration outside this range is not a duration of ours (hand-edited, clock jump).
_MAX_PLAUSIBLE_SECONDS = 24 * 3600.0

_NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True)
class StartupSnapshot:
    """Where start-up stands at one moment; what /healthz and the page show."""

    step: int                    # index into `steps` of the current (or last) step
    steps: tuple[str, ...]
    detail: str                  # free text about the current step, may be ""
    elapsed: float               # seconds since start-up began (frozen once ready or failed)
    expected: float | None       # duration of the last successful start, None on a first start
    ready: bool
    failed: str | None           # the failure message, None while all is well

    @property
    def current(self) -> str:
        return self.steps[self.step]

    @property
    def share(self) -> float:
        """Fraction of the bar to fill: the time against the last start's (a first start's: a guess)."""
        if self.ready:
            return 1.0
        return min(self.elapsed / (self.expected or FIRST_START_GUESS_S), MAX_TIMED_SHARE)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; the real app's /healthz can reuse it (with ready: true)."""
        share = self.share
        return {
            "ready": self.ready,
            "step": self.step,
            "current": self.current,
            "steps": list(self.steps),
            "detail": self.detail,
            "elapsed": round(self.elapsed, 1),
            "expected": None if self.expected is None else round(self.expected, 1),
            "share": round(share, 3),
            "failed": self.failed,
        }


class StartupProgress:
    """Thread-safe record of start-up: the launcher writes it, the loading server reads it.

    The first step is current from construction on (start-up begins when this is made);
    `begin()` moves to another step, `ready()` and `fail()` end it.
    """

    def __init__(self, steps: Sequence[str] = APP_STEPS, timing_file: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, started: float | None = None) -> None:
        """started: the clock's reading when start-up began (default: now; app.py gives the
        process's start, process_started(), so the page counts the imports before it too)."""
        if not steps:
            raise ValueError("at least one step is needed")
        self._steps = tuple(steps)
        self._timing_file = timing_file
        self._clock = clock
        self._started = clock() if started is None else started
        self._expected = read_expected_seconds(timing_file) if timing_file is not None else None
        self._lock = threading.Lock()
        self._step = 0
        self._detail = ""
        self._ended_at: float | None = None
        self._ready = False
        self._failed: str | None = None

    @property
    def steps(self) -> tuple[str, ...]:
        return self._steps

    def begin(self, step_name: str, detail: str = "") -> None:
        """Mark `step_name` (one of the steps given at construction) as the one under way."""
        if step_name not in self._steps:
            raise ValueError(f"unknown start-up step {step_name!r}; known: {', '.join(self._steps)}")
        index = self._steps.index(step_name)
        with self._lock:
            self._step, self._detail = index, detail

    def ready(self) -> None:
        """Start-up succeeded: freeze the elapsed time and keep it as the next start's expectation."""
        with self._lock:
            if self._ready:
                return
            self._ready = True
            self._ended_at = self._clock()
            self._step, self._detail = len(self._steps) - 1, ""
            seconds = self._ended_at - self._started
        # Outside the lock: a slow disk must not stall the page's polls.
        if self._timing_file is not None:
            write_expected_seconds(self._timing_file, seconds)

    def fail(self, message: str) -> None:
        """Start-up failed: the page shows `message` (and stops its clock) until the server stops."""
        with self._lock:
            self._failed = message or "start-up failed"
            if self._ended_at is None:
                self._ended_at = self._clock()

    def snapshot(self) -> StartupSnapshot:
        with self._lock:
            end = self._ended_at if self._ended_at is not None else self._clock()
            return StartupSnapshot(step=self._step, steps=self._steps, detail=self._detail,
                                   elapsed=max(0.0, end - self._started), expected=self._expected,
                                   ready=self._ready, failed=self._failed)


def process_started() -> float:
    """time.monotonic()'s reading when this process started (Linux: from /proc; elsewhere: now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic()
    return time.monotonic() - min(max(age, 0.0), _MAX_PLAUSIBLE_SECONDS)


def read_expected_seconds(path: Path) -> float | None:
    """The last successful start's duration, or None when there is none (or it is unreadable)."""
    try:
        seconds = float(json.loads(path.read_text(encoding="utf-8"))["seconds"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        # Only a hint for a progress bar: a damaged file means "first start", never a failed start.
        log.debug("ignoring unreadable start-up timing %s: %s", path, e)
        return None
    if not math.isfinite(seconds) or not 0 < seconds < _MAX_PLAUSIBLE_SECONDS:
        return None
    return seconds


def write_expected_seconds(path: Path, seconds: float) -> None:
    """Atomically (temp file + rename) store `seconds` in `path`, readable by the owner only."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file with mode 0600, so it is never briefly readable by others.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"seconds": round(seconds, 1)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        log.warning("could not record the start-up duration in %s: %s", path, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --- the HTTP side ---------------------------------------------------------------------------

_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def build_loading_app(progress: StartupProgress, retry_after: int = 5) -> Starlette:
    """The loading server's whole app: one catch-all route, so no request falls through to a 404."""

    async def handle(request: Request) -> Response:
        if request.method in ("GET", "HEAD"):
            if request.url.path == "/healthz":
                return _health(progress)
            if request.url.path == "/" or "text/html" in request.headers.get("accept", ""):
                return HTMLResponse(render_page(progress.snapshot()), headers=_NO_STORE)
        # API calls (Gradio's queue, its client, the OpenAI-compatible API, scripts) get an answer
        # they can act on, in the error shape of OpenAI's API, which its clients read and retry.
        return JSONResponse({"error": {"message": "memchat is starting; try again shortly", "type": "loading",
                                       "param": None, "code": "model_loading"}},
                            status_code=503, headers={**_NO_STORE, "Retry-After": str(retry_after)})

    return Starlette(routes=[Route("/{path:path}", handle, methods=_ALL_METHODS)])


def _health(progress: StartupProgress) -> JSONResponse:
    # ready is false here whatever the record says: the page must reload only once the real app
    # answers, and while this server listens the real app cannot.
    body = {**progress.snapshot().as_dict(), "ready": False, "loading": True}
    return JSONResponse(body, headers=_NO_STORE)


class LoadingServer(WebServer):
    """The loading app on the host and port the app will use."""

    def __init__(self, progress: StartupProgress, host: str, port: int, retry_after: int = 5) -> None:
        super().__init__(
            build_loading_app(progress, retry_after), host, port, name="loading-server",
            log_config=None,          # leave the app's logging configuration alone
            access_log=False, server_header=False,
            lifespan="off", ws="none",  # websocket upgrades get the plain 503 like other API calls
            loop="asyncio")
        self.progress = progress


# --- the page ----------------------------------------------------------------------------------

HEADING = "memchat is starting"
HEADING_FAILED = "memchat could not start"
FIRST_START_HINT = ("The first start converts the language model; this takes about half a minute or more. "
                    "Later starts are faster.")


def render_page(snapshot: StartupSnapshot) -> str:
    """The loading page, drawn with the state of `snapshot`; its script keeps it current."""
    share = snapshot.share
    return _PAGE.substitute(
        steps="\n".join(_step_item(i, name, snapshot) for i, name in enumerate(snapshot.steps)),
        bar_width=f"{100 * share:.1f}%",
        bar_value=f' aria-valuenow="{round(100 * share)}"',
        bar_text=html.escape(_bar_text(snapshot), quote=True),
        status=html.escape(_status_text(snapshot)),
        detail=html.escape(snapshot.detail),
        heading=HEADING_FAILED if snapshot.failed else HEADING,
        hint_hidden="" if snapshot.expected is None and not snapshot.failed else " hidden",
        hint=html.escape(FIRST_START_HINT),
        failed_hidden="" if snapshot.failed else " hidden",
        failed=html.escape(snapshot.failed or ""),
        main_class="failed" if snapshot.failed else "",
        heading_ok=HEADING, heading_failed=HEADING_FAILED,
    )


def _step_item(index: int, name: str, snapshot: StartupSnapshot) -> str:
    if index < snapshot.step:
        state, current = "done", ""
    elif index == snapshot.step:
        state, current = "current", ' aria-current="step"'
    else:
        state, current = "pending", ""
    return f'<li class="{state}"{current}>{html.escape(name)}</li>'


def _status_text(snapshot: StartupSnapshot) -> str:
    elapsed = f"{snapshot.elapsed:.0f} s elapsed"
    if snapshot.expected is None:
        return elapsed
    return f"{elapsed} · about {snapshot.expected:.0f} s last time"


def _bar_text(snapshot: StartupSnapshot) -> str:
    return (f"step {snapshot.step + 1} of {len(snapshot.steps)}: {snapshot.current}, "
            f"{snapshot.elapsed:.0f} s elapsed")


# string.Template ($name) rather than str.format: the CSS and the script are full of braces.
# The script only ever sets textContent, classes and attributes, never HTML, so what /healthz
# says cannot inject markup.
_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>memchat is starting</title>
<noscript><meta http-equiv="refresh" content="5"></noscript>
<style>
:root { color-scheme: light dark; --fg: #1f2328; --muted: #59636e; --bg: #f6f8fa; --card: #fff;
  --accent: #f97316; --done: #1a7f37; --track: #e5e7eb; --bad: #cf222e; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6edf3; --muted: #9198a1; --bg: #0d1117; --card: #161b22; --track: #30363d;
    --done: #3fb950; --bad: #f85149; }
}
* { box-sizing: border-box; }
body { margin: 0; min-height: 100vh; display: flex; align-items: center; justify-content: center;
  background: var(--bg); color: var(--fg); padding: 16px;
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { width: 100%; max-width: 480px; background: var(--card); border-radius: 12px; padding: 24px;
  box-shadow: 0 1px 3px rgba(0, 0, 0, .12); }
h1 { font-size: 1.4rem; margin: 0 0 16px; }
ol { list-style: none; padding: 0; margin: 0 0 20px; }
li { padding: 6px 0 6px 32px; position: relative; color: var(--muted); }
li::before { content: ""; position: absolute; left: 4px; top: 50%; width: 14px; height: 14px;
  margin-top: -7px; border-radius: 50%; border: 2px solid var(--track); }
li.done { color: var(--fg); }
li.done::before { content: "\\2713"; border-color: var(--done); background: var(--done); color: #fff;
  font-size: 11px; line-height: 14px; text-align: center; font-weight: 700; }
li.current { color: var(--fg); font-weight: 600; }
li.current::before { border-color: var(--accent); border-top-color: transparent;
  animation: spin 1s linear infinite; }
.track { height: 10px; border-radius: 5px; background: var(--track); overflow: hidden; }
.bar { height: 100%; background: var(--accent); border-radius: 5px; transition: width .8s ease; }
.failed .bar { background: var(--bad); animation: none; }
.failed li.current::before { border-color: var(--bad); animation: none; }
#status { margin: 10px 0 0; color: var(--muted); font-variant-numeric: tabular-nums; }
#detail { margin: 4px 0 0; color: var(--muted); font-size: .9rem; min-height: 1.35em; }
#hint { margin: 16px 0 0; font-size: .9rem; color: var(--muted); }
#failed { margin: 16px 0 0; padding: 12px; border-radius: 8px; border: 1px solid var(--bad);
  color: var(--bad); white-space: pre-wrap; overflow-wrap: anywhere; }
[hidden] { display: none !important; }
@keyframes spin { to { transform: rotate(360deg); } }
@media (prefers-reduced-motion: reduce) {
  li.current::before { animation: none; }
}
</style>
</head>
<body>
<main id="main" class="$main_class">
<h1 id="heading">$heading</h1>
<ol id="steps">
$steps
</ol>
<div class="track"><div id="bar" class="bar" style="width: $bar_width" role="progressbar"
  aria-label="Start-up progress" aria-valuemin="0" aria-valuemax="100"$bar_value
  aria-valuetext="$bar_text"></div></div>
<p id="status" aria-live="polite">$status</p>
<p id="detail">$detail</p>
<p id="hint"$hint_hidden>$hint</p>
<p id="failed" role="alert"$failed_hidden>$failed</p>
</main>
<script>
(function () {
  "use strict";
  var main = document.getElementById("main"), bar = document.getElementById("bar");
  var items = document.getElementById("steps").children;
  function show(id, text) {
    var el = document.getElementById(id);
    el.textContent = text || "";
    el.hidden = !text;
  }
  function draw(s) {
    for (var i = 0; i < items.length; i++) {
      var state = i < s.step ? "done" : i === s.step ? "current" : "pending";
      items[i].className = state;
      if (state === "current") items[i].setAttribute("aria-current", "step");
      else items[i].removeAttribute("aria-current");
    }
    bar.style.width = (100 * s.share).toFixed(1) + "%";
    bar.setAttribute("aria-valuenow", String(Math.round(100 * s.share)));
    var elapsed = Math.round(s.elapsed) + " s elapsed";
    bar.setAttribute("aria-valuetext", "step " + (s.step + 1) + " of " + s.steps.length + ": " +
      s.current + ", " + elapsed);
    document.getElementById("status").textContent = s.expected ?
      elapsed + " \\u00b7 about " + Math.round(s.expected) + " s last time" : elapsed;
    document.getElementById("detail").textContent = s.detail || "";
    document.getElementById("hint").hidden = !!s.expected || !!s.failed;
    document.getElementById("heading").textContent = s.failed ? "$heading_failed" : "$heading_ok";
    show("failed", s.failed);
    main.className = s.failed ? "failed" : "";
  }
  function poll() {
    var ctrl = window.AbortController ? new AbortController() : null;
    var timer = ctrl && setTimeout(function () { ctrl.abort(); }, 4000);
    fetch("/healthz", { cache: "no-store", signal: ctrl && ctrl.signal })
      .then(function (r) {
        // Our loading server always answers /healthz; a 404 is some other server (the app): go.
        if (r.status === 404) { location.reload(); return null; }
        return r.json();
      })
      .then(function (s) {
        if (!s) return;
        if (s.ready === true) { location.reload(); return; }
        draw(s);
        setTimeout(poll, 1000);
      })
      // Refused or cut off: the loading server has stopped and the app is not up yet. Try again.
      .catch(function () { setTimeout(poll, 1000); })
      .then(function () { if (timer) clearTimeout(timer); });
  }
  setTimeout(poll, 1000);
})();
</script>
</body>
</html>
""")
