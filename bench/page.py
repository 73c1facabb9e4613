"""The status page's first paint and transfer size: the real daemon (bundled config, mock hardware) on loopback,
loaded by Debian's headless Chromium with a cold cache, as a technician's laptop first opens it.

    .venv/bin/python bench/page.py [--runs 3] [--loads 10] [--json PATH]

Each run starts a fresh daemon, then opens the page ``--loads`` times, each in a new browser context (nothing
cached), and reads the browser's own Performance API: first paint and first contentful paint (from navigation
start), the time to the HTML's first byte, and the bytes each request put on the wire (``transferSize``: headers
and body as sent) for the HTML, the stylesheet, the script, and the API calls the script makes once loaded. The
event stream is left out: it stays open. After each load the same browser opens the small login page in a fresh
context: its first paint is the baseline, what the browser and the machine's load cost whatever the page.
Medians over the loads per run, then over the runs. Needs Playwright (the test extras) and /usr/bin/chromium
(scripts/test installs both). Exit 1 if the median first paint of any run is 200 ms or more.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import report  # bench/report.py: the script's own directory is on sys.path
from daemon import CONFIG, ROOT, Daemon, free_port, scan_log

CHROMIUM = os.environ.get("GATEWAYD_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]  # fmt: skip
FIRST_PAINT_LIMIT_MS = 200.0
READY_TIMEOUT_S = 60.0

# What the page's script has asked for once these are all there: the providers panel marks itself done; the
# sensors' charts are drawn from their telemetry; the hour charts from history.
SETTLED = "() => !!(document.querySelector('#providers-body[data-state=done]') && document.querySelector('svg.spark'))"

MEASURE = """async () => {
  const painted = () => performance.getEntriesByType('paint').length >= 2;
  while (!painted()) await new Promise((r) => requestAnimationFrame(r));
  const nav = performance.getEntriesByType('navigation')[0];
  const paint = Object.fromEntries(performance.getEntriesByType('paint').map(p => [p.name, p.startTime]));
  const kind = (url) => url.includes('/static/') ? url.split('.').pop() : url.includes('/api/') ? 'api' : 'other';
  const bytes = {html: nav.transferSize, css: 0, js: 0, api: 0, other: 0};
  const body = {html: nav.decodedBodySize, css: 0, js: 0, api: 0, other: 0};
  let requests = 1;
  for (const r of performance.getEntriesByType('resource')) {
    if (r.name.includes('/events/stream')) continue;
    const k = kind(r.name);
    bytes[k] += r.transferSize; body[k] += r.decodedBodySize; requests += 1;
  }
  return {first_paint: paint['first-paint'], fcp: paint['first-contentful-paint'], ttfb: nav.responseStart,
          dom_loaded: nav.domContentLoadedEventEnd, bytes, body, requests};
}"""


BASELINE = """() => new Promise((done) => {
  const seen = () => performance.getEntriesByType('paint').find(p => p.name === 'first-paint');
  const check = () => seen() ? done(seen().startTime) : requestAnimationFrame(check);
  check();
})"""


@dataclass
class RunResult:
    run: int
    loads: int
    first_paint_ms: float
    first_contentful_paint_ms: float
    baseline_first_paint_ms: float
    html_first_byte_ms: float
    dom_content_loaded_ms: float
    html_kib: float
    css_kib: float
    js_kib: float
    api_kib: float
    total_kib: float
    first_load_kib: float  # HTML, CSS and script: what the first paint needs
    decoded_total_kib: float
    requests: float
    log_warnings: int
    log_errors: int
    log_events: dict[str, int]
    samples: list[dict[str, Any]] = field(repr=False)
    problems: list[str] = field(default_factory=list)


async def one_run(run: int, args: argparse.Namespace, playwright: Any) -> RunResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"gatewayd-page-{run}-"))
    daemon = Daemon(workdir, {"GATEWAYD_MQTT__PORT": str(free_port())})  # no broker: the out-of-the-box state
    samples: list[dict[str, Any]] = []
    async with daemon, aiohttp.ClientSession() as session:
        await daemon.wait_ready(session, READY_TIMEOUT_S)
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            for _ in range(args.loads + 1):  # the first load warms the daemon's own caches; not counted
                context = await browser.new_context(viewport={"width": 1400, "height": 1000})
                page = await context.new_page()
                await page.goto(f"{daemon.url}/", wait_until="load")
                await page.wait_for_function(SETTLED, timeout=15_000)
                sample = await page.evaluate(MEASURE)
                await context.close()
                # The same browser's first paint of the small login page, right after: what the browser and this
                # machine's load cost on their own, whatever the page.
                context = await browser.new_context(viewport={"width": 1400, "height": 1000})
                page = await context.new_page()
                await page.goto(f"{daemon.url}/login", wait_until="load")
                sample["baseline_first_paint"] = await page.evaluate(BASELINE)
                await context.close()
                samples.append(sample)
        finally:
            await browser.close()
        code, _ = await daemon.stop()
    samples = samples[1:]
    log = scan_log(daemon.log_path)

    def med(pick: Any) -> float:
        return float(statistics.median(pick(s) for s in samples))

    kib = 1024.0
    result = RunResult(
        run=run,
        loads=len(samples),
        first_paint_ms=med(lambda s: s["first_paint"]),
        first_contentful_paint_ms=med(lambda s: s["fcp"]),
        baseline_first_paint_ms=med(lambda s: s["baseline_first_paint"]),
        html_first_byte_ms=med(lambda s: s["ttfb"]),
        dom_content_loaded_ms=med(lambda s: s["dom_loaded"]),
        html_kib=med(lambda s: s["bytes"]["html"]) / kib,
        css_kib=med(lambda s: s["bytes"]["css"]) / kib,
        js_kib=med(lambda s: s["bytes"]["js"]) / kib,
        api_kib=med(lambda s: s["bytes"]["api"]) / kib,
        total_kib=med(lambda s: sum(s["bytes"].values())) / kib,
        first_load_kib=med(lambda s: s["bytes"]["html"] + s["bytes"]["css"] + s["bytes"]["js"]) / kib,
        decoded_total_kib=med(lambda s: sum(s["body"].values())) / kib,
        requests=med(lambda s: s["requests"]),
        log_warnings=log.warnings,
        log_errors=log.errors,
        log_events=dict(log.events),
        samples=samples,
    )
    if result.first_paint_ms >= FIRST_PAINT_LIMIT_MS:
        result.problems.append(f"median first paint {result.first_paint_ms:.0f} ms >= {FIRST_PAINT_LIMIT_MS:.0f} ms")
    if code != 0:
        result.problems.append(f"the daemon exited with {code} after SIGTERM")
    return result


ROWS: list[report.Row] = [
    ("first paint (ms)", "first_paint_ms", "{:.0f}"),
    ("first contentful paint (ms)", "first_contentful_paint_ms", "{:.0f}"),
    ("login page first paint, baseline (ms)", "baseline_first_paint_ms", "{:.0f}"),
    ("HTML first byte (ms)", "html_first_byte_ms", "{:.1f}"),
    ("DOMContentLoaded (ms)", "dom_content_loaded_ms", "{:.0f}"),
    ("HTML (KiB on the wire)", "html_kib", "{:.1f}"),
    ("stylesheet (KiB)", "css_kib", "{:.1f}"),
    ("script (KiB)", "js_kib", "{:.1f}"),
    ("API calls after load (KiB)", "api_kib", "{:.1f}"),
    ("first paint needs: HTML+CSS+JS (KiB)", "first_load_kib", "{:.1f}"),
    ("total transfer (KiB)", "total_kib", "{:.1f}"),
    ("total, decoded (KiB)", "decoded_total_kib", "{:.1f}"),
    ("requests (without the event stream)", "requests", "{:.0f}"),
]


def render(results: list[RunResult], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    load = (
        f"the bundled {CONFIG.relative_to(ROOT)} on mock hardware, MQTT broker unreachable; headless Chromium "
        f"({CHROMIUM}) at 1400x1000 on loopback, {args.loads} cold-cache loads per run after one warm-up load; "
        f"{args.runs} run(s), a fresh daemon each; medians of the loads per run"
    )
    lines = report.header("gatewayd status page benchmark", machine, load) + report.runs_table(ROWS, results)
    lines += ["", f"first paint limit: {FIRST_PAINT_LIMIT_MS:.0f} ms (median per run)", ""]
    lines += report.log_events_and_result(results)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh daemon (default 3, max 10)")
    parser.add_argument("--loads", type=int, default=10, help="cold-cache page loads per run (default 10, 1 to 100)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 10:
        parser.error("--runs must be from 1 to 10")
    if not 1 <= args.loads <= 100:
        parser.error("--loads must be from 1 to 100")
    return args


async def bench(args: argparse.Namespace) -> list[RunResult]:
    from playwright.async_api import async_playwright

    report.stop_on_signals()
    results = []
    async with async_playwright() as playwright:
        for run in range(1, args.runs + 1):
            print(f"run {run}/{args.runs} ...", file=sys.stderr, flush=True)
            results.append(await one_run(run, args, playwright))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    results = report.run("page", bench(args))
    print(render(results, args, machine))
    return report.conclude(args, machine, ROWS, results)


if __name__ == "__main__":
    sys.exit(main())
