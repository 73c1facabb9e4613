"""The status page in a real browser: Debian's headless Chromium, driven by Playwright, against the real daemon.

Every request the browser makes is recorded and must go to the daemon itself (the page works with no internet).
Playwright's own browser download is never used: the tests start /usr/bin/chromium with the flags of a machine
without network access; CI installs it (scripts/test). Each wait is bounded by a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.app.operator import SCENARIOS
from tests.conftest import Daemon, http
from tests.webauth import TOKENS, auth_env, bearer, raw

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

CHROMIUM = os.environ.get("GATEWAYD_TEST_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)),
    reason=f"{CHROMIUM} not found: apt-get install chromium (scripts/test does)",
)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
WAIT_MS = 10_000
FAST = {"GATEWAYD_HTTP__HISTORY_INTERVAL_S": "0.5", "GATEWAYD_HTTP__LIVE_INTERVAL_S": "0.5"}


class Browser:
    """One headless Chromium with its own profile directory, and every URL it asked for."""

    def __init__(self, playwright: Any, profile: Path, *, javascript: bool = True):
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            timeout=20_000,
            viewport={"width": 1280, "height": 1000},
            java_script_enabled=javascript,
        )
        self.context.set_default_timeout(WAIT_MS)
        self.context.on("request", lambda req: self.requests.append(req.url))

    def page(self) -> Any:
        page = self.context.pages[0] if self.context.pages else self.context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        return page

    def assert_only(self, origin: str) -> None:
        outside = [u for u in self.requests if not u.startswith((origin + "/", "data:"))]
        assert self.requests and outside == [], f"requests that left the daemon: {outside}"
        assert self.errors == [], f"script errors: {self.errors}"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    made: list[Browser] = []
    with sync_api.sync_playwright() as playwright:

        def launch(*, javascript: bool = True) -> Browser:
            b = Browser(playwright, tmp_path / f"chromium-{len(made)}", javascript=javascript)
            made.append(b)
            return b

        yield launch
        for b in made:
            b.context.close()


def log_in(page: Any, name: str) -> None:
    page.click("#login-link")
    page.wait_for_url("**/login*")
    page.fill("input[name=name]", name)
    page.fill("input[name=token]", TOKENS[name][1])
    page.click("#login-form button[type=submit]")
    page.wait_for_selector(f"header .who:has-text('{name}')")


def test_the_page_sends_a_command_and_shows_its_result_live(make_daemon: Any, browser: Any, tmp_path: Path) -> None:
    d: Daemon = make_daemon(auth_env(anonymous_read=True, **FAST))
    d.start()
    b = browser()
    page = b.page()
    page.goto(f"{d.url}/")

    # The devices of the bundled config, and the live stream connected.
    for name in ("pump1", "sensor1", "relay1"):
        assert page.locator(f"article.device[data-device={name}] h3").inner_text().startswith(name)
    page.wait_for_selector("body[data-live=sse]")
    page.wait_for_selector("article.device[data-device=sensor1] svg.spark")  # its readings, charted

    # Logged out: the form's command is refused, and so is a direct POST; nothing is accepted.
    form = page.locator("form.action[data-device=pump1][data-action=set_speed]")
    form.locator("input[name='p.percent']").fill("30")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#result:has-text('401 unauthenticated')")
    status, err, _ = http("POST", f"{d.url}/api/v1/commands", {"device": "pump1", "action": "set_speed"})
    assert status == 401 and err["error"]["code"] == "unauthenticated"
    assert http("GET", f"{d.url}/api/v1/commands")[1]["commands"] == []

    # Logged in as an operator, the same form works, and the result arrives over the event stream.
    log_in(page, "otto")
    page.wait_for_selector("body[data-live=sse]")
    page.evaluate("window.__sameDocument = 'yes'")
    # The browser's own session cookie is not enough to change anything: the CSRF token must come along.
    forged = page.evaluate(
        """() => fetch("/api/v1/commands", {method: "POST", headers: {"Content-Type": "application/json"},
                body: JSON.stringify({device: "relay1", action: "on"})}).then(async r => [r.status, await r.json()])"""
    )
    assert forged[0] == 403 and forged[1]["error"]["code"] == "csrf_failed"
    form = page.locator("form.action[data-device=pump1][data-action=set_speed]")
    form.locator("input[name='p.percent']").fill("40")
    form.locator("button[type=submit]").click()
    result = page.locator("#result[data-source=sse]")
    result.wait_for()
    text = result.inner_text()
    assert "pump1 set_speed: succeeded" in text, text
    command_id = text.rsplit("id ", 1)[1].rstrip(")")
    row = page.locator(f"#command-table tr[data-command-id='{command_id}']")
    assert row.locator("td.cstate").inner_text() == "succeeded"
    assert page.evaluate("window.__sameDocument") == "yes"  # no reload happened
    rec = d.command(command_id)
    assert rec["state"] == "succeeded" and rec["params"]["percent"] == 40 and rec["user"] == "otto"

    # Its transitions, on demand.
    row.locator("a.cmd-link").click()
    detail = page.locator("#command-table tr.detail")
    detail.locator("ol.transitions li").first.wait_for()  # fetched when clicked
    for state in ("received", "accepted", "queued", "dispatched", "succeeded"):
        assert detail.locator(f"ol.transitions li:has-text('{state}')").count() == 1

    # The hour charts have samples, the overview is filled in.
    page.wait_for_selector("#chart-throughput path.line")
    assert page.locator(".tile[data-k=health] dd.text").inner_text().startswith("Running, up")

    shot = tmp_path / "status-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nstatus page screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    b.assert_only(d.url)


def test_the_page_falls_back_to_polling_without_the_event_stream(make_daemon: Any, browser: Any) -> None:
    d: Daemon = make_daemon(FAST)  # access control off (the bundled config): no login needed on loopback
    d.start()
    b = browser()
    b.context.route("**/api/v1/events/stream", lambda route: route.abort())
    page = b.page()
    page.goto(f"{d.url}/")
    page.wait_for_selector("body[data-live=polling]")
    assert "polling" in page.locator("#live-state").inner_text()
    page.locator("form.action[data-device=relay1][data-action=on] button").click()
    result = page.locator("#result[data-source=poll]")
    result.wait_for()
    assert "relay1 on: succeeded" in result.inner_text()
    # A command from elsewhere appears too, without a reload.
    status, rec, _ = http("POST", f"{d.url}/api/v1/commands?wait=5", {"device": "relay1", "action": "off"})
    assert status == 200
    page.wait_for_selector(f"#command-table tr[data-command-id='{rec['id']}'] td.cstate:has-text('succeeded')")
    b.assert_only(d.url)


def test_the_page_works_without_javascript(make_daemon: Any, browser: Any) -> None:
    d: Daemon = make_daemon(auth_env(anonymous_read=True))
    d.start()
    b = browser(javascript=False)
    page = b.page()
    page.goto(f"{d.url}/")
    assert page.locator("article.device").count() == 5
    assert page.locator("body").get_attribute("data-live") == "off"
    page.click("#login-link")
    page.fill("input[name=name]", "otto")
    page.fill("input[name=token]", TOKENS["otto"][1])
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("header .who:has-text('otto')")
    page.locator("form.action[data-device=relay1][data-action=on] button").click()  # a plain form post
    page.wait_for_url("**/?sent=*")
    sent = page.url.split("sent=", 1)[1].split("#", 1)[0]
    assert page.locator(f"#command-table tr.sent[data-command-id='{sent}']").count() == 1
    assert d.wait_final(sent)["state"] == "succeeded"
    b.assert_only(d.url)


def test_admin_sees_fault_buttons_and_the_language_form_shows_refusals(make_daemon: Any, browser: Any) -> None:
    d: Daemon = make_daemon(auth_env(anonymous_read=True, **FAST))
    d.start()
    b = browser()
    page = b.page()
    page.goto(f"{d.url}/")
    assert page.locator("#faults").count() == 0  # not for viewers
    # The bundled config lists three providers, inactive without API keys; the panel shows them and the cache.
    page.wait_for_selector("#providers-body table:has-text('openai')")
    assert "Prompt cache" in page.locator("#providers-body").inner_text()
    log_in(page, "ada")
    buttons = page.locator("#faults form.fault button")
    assert sorted(buttons.all_inner_texts()) == sorted(SCENARIOS)
    page.locator("#faults form[data-scenario=serial_unplug] button").click()
    page.wait_for_selector("#fault-result[data-state=done]", timeout=20_000)
    report = page.locator("#fault-result").inner_text()
    assert report.startswith("serial_unplug: recovered, healthy after"), report  # in words, not JSON

    # A sentence the local rules understand: the box stays pending until the command's final state is in.
    page.fill("#nl-form input[name=text]", "turn on relay 1")
    page.click("#nl-form button[type=submit]")
    box = page.locator("#nl-result[data-state=done]")
    box.wait_for()
    command_id = box.get_attribute("data-command-id")
    assert command_id, box.inner_text()
    rec = d.wait_final(command_id)
    assert (rec["device"], rec["action"], rec["state"]) == ("relay1", "on", "succeeded"), rec
    text = box.inner_text()
    # ... with how the words were understood
    assert text.startswith('"turn on relay 1" → relay1 on: succeeded') and f"(id {command_id})" in text, text
    assert box.get_attribute("data-source") in {"http", "sse", "poll"}

    # One it does not: the refusal, with the API's own code, replaces the previous answer.
    page.fill("#nl-form input[name=text]", "make me a cup of coffee")
    page.click("#nl-form button[type=submit]")
    page.wait_for_selector("#nl-result[data-state=done]:has-text('coffee')")
    status, _, _, raw_body = raw(
        "POST",
        f"{d.url}/api/v1/commands",
        {"Content-Type": "application/json", **bearer("ada")},
        json.dumps({"text": "make me a cup of coffee"}).encode(),
    )
    assert status == 422, raw_body
    text = page.locator("#nl-result").inner_text()
    assert f"refused ({status} {json.loads(raw_body)['error']['code']})" in text, text
    assert page.locator("#nl-result").get_attribute("data-command-id") is None
    b.assert_only(d.url)
