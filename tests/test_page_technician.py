"""The status page as a technician in a plant room reads it, on a laptop (1400x1000) and on a phone (390x844), in
headless Chromium against the real daemon with the bundled mock config.

Out of the box the overview gives one verdict, and it is "Working normally": an uplink with no broker and a clock
not yet synchronised are notes, not faults. Nothing on the page is JSON or a C library's errno; an error that has
passed says when it happened and how it ended; every device's state is a list of named fields with units; the
relay board is a grid of channels toggled in place; nothing is wider than the screen; axe-core finds no serious
accessibility problem. Screenshots go to ``GATEWAYD_SCREENSHOTS`` when set (the README's are made so:
``GATEWAYD_SCREENSHOTS=docs/screenshots .venv/bin/pytest tests/test_page_technician.py``).

Every wait is on a condition the page shows (data-state, data-live, an element), never a fixed sleep.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, http
from tests.test_page import Browser
from tests.test_page import browser as _browser  # noqa: F401 (the fixture, under its own name)

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
FAST = {"GATEWAYD_HTTP__HISTORY_INTERVAL_S": "0.5", "GATEWAYD_HTTP__LIVE_INTERVAL_S": "0.5"}
VIEWPORTS = {"laptop": (1400, 1000), "phone": (390, 844)}


@pytest.fixture
def chromium(_browser: Any) -> Any:  # noqa: F811 (the fixture, asked for by name)
    """tests/test_page.py's headless Chromium launcher (its own profile, every request recorded)."""
    return _browser


# A value with its unit as the page prints it: "20.9 °C", "45.1 %RH", "1012.8 hPa", "400.0 W", "55 %".
WITH_UNIT = re.compile(r"^-?\d+(\.\d+)? (°C|%RH|%|hPa|V|A|W|Hz|kWh|rpm|s|bar|l/min)$")
# How long ago, or for how long: "3.2 s ago", "12 s ago", "2 min ago", "not answering for 4 s".
AGE = re.compile(r"(\d+(\.\d+)? (ms|s|min|h|d) ago|just now|not answering for \d)")


def visible_text(page: Any) -> str:
    return str(page.evaluate("document.body.innerText"))


def no_horizontal_overflow(page: Any) -> None:
    widths = page.evaluate(
        """() => ({doc: document.documentElement.scrollWidth, body: document.body.scrollWidth, view: innerWidth,
                   wide: [...document.querySelectorAll('main *')].filter(e => e.getBoundingClientRect().right
                          > innerWidth + 0.5).slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id)})"""
    )
    assert widths["doc"] <= widths["view"] and widths["body"] <= widths["view"], widths
    assert widths["wide"] == [], widths


def axe_serious(page: Any) -> list[dict[str, Any]]:
    # Evaluated through the debugging protocol: the page's own Content-Security-Policy (script-src 'self') stays
    # as it is, and forbids a script tag the page did not ship.
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.evaluate(AXE.read_text(encoding="utf-8") + "\n;true")
    found = page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
             .filter(v => v.impact === 'serious' || v.impact === 'critical')
             .map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 3).map(n => n.target)}))"""
    )
    return list(found)


def open_page(browser_factory: Any, d: Daemon, size: tuple[int, int]) -> tuple[Browser, Any]:
    b: Browser = browser_factory()
    page = b.page()
    page.set_viewport_size({"width": size[0], "height": size[1]})
    page.goto(f"{d.url}/")
    page.wait_for_selector("body[data-live=sse]")
    page.wait_for_selector("#providers-body[data-state=done]")
    return b, page


def press(page: Any, selector: str) -> str:
    """Presses a device's button and waits for its result box to say how it ended."""
    box = page.locator("#result")
    page.locator(selector).click()
    page.wait_for_selector("#result[data-state=done]")
    return str(box.inner_text())


@pytest.mark.parametrize("viewport", list(VIEWPORTS), ids=list(VIEWPORTS))
def test_the_page_answers_a_technicians_questions(
    make_daemon: Any, chromium: Any, tmp_path: Path, viewport: str
) -> None:
    d: Daemon = make_daemon(FAST)  # access control off, as the bundled config ships
    d.start()
    size = VIEWPORTS[viewport]
    b, page = open_page(chromium, d, size)

    # One verdict, first, and on a healthy gateway out of the box it says so: nothing is red.
    assert page.locator("#verdict").count() == 1
    assert page.evaluate("document.querySelector('main').firstElementChild.querySelector('#verdict') !== null")
    verdict = page.locator("#verdict")
    assert verdict.get_attribute("data-level") == "ok"
    assert verdict.locator(".title").inner_text() == "Working normally"
    assert page.locator("[data-level=fault]").count() == 0
    # The uplink with no broker and the unsynchronised clock are notes, each saying what it means and what to do.
    uplink = page.locator(".tile[data-k=uplink]")
    assert uplink.get_attribute("data-level") == "info"
    assert "Everything works offline" in uplink.locator(".why").inner_text()
    clock = page.locator(".tile[data-k=clock]")
    assert clock.get_attribute("data-level") == "info" and "timedatectl" in clock.locator(".why").inner_text()

    # Each device's state: named fields with units. pump1 reports nothing by itself: Read asks it.
    assert "Read asks the device now" in page.locator("article[data-device=pump1] .as-of").inner_text()
    assert "pump1 read: succeeded" in press(page, "form.action[data-device=pump1][data-action=read] button")
    page.wait_for_selector("article[data-device=pump1] .readings .reading")
    page.wait_for_selector("article[data-device=sensor1] .readings .reading")
    page.wait_for_selector("article[data-device=meter1] .readings .reading")
    readings = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('article.device')].map(a => [a.dataset.device,
             [...a.querySelectorAll('.reading')].map(r => [r.querySelector('dt').innerText,
                                                           r.querySelector('dd').innerText])]))"""
    )
    for name in ("pump1", "sensor1", "meter1"):
        assert readings[name], name
        for label, text in readings[name]:
            assert label[:1].isupper() and "_" not in label, (name, label)
            assert WITH_UNIT.match(text) or text in ("yes", "no") or (label, name) == ("Power factor", "meter1"), (
                name,
                label,
                text,
            )
    assert dict(readings["sensor1"])["Air temperature"].endswith(" °C")
    assert dict(readings["meter1"])["Line to neutral voltage"].endswith(" V")
    assert dict(readings["relay1"]) == {"State": "off"}
    assert {text.split()[-1] for _, text in readings["pump1"]} >= {"%", "°C"}
    # Charts of readings are captioned with the field's name, value and unit ("Air temperature 20.9 °C").
    page.wait_for_selector("article[data-device=sensor1] figure.spark")
    labels = {label for device in readings.values() for label, _ in device}
    for caption in page.locator("figure.spark figcaption").all_inner_texts():
        assert any(caption.startswith(label + " ") for label in labels), caption

    # The relay board: a grid of its eight channels, named from the config, each toggled in place.
    board = page.locator("article[data-device=relays1]")
    channels = board.locator("form.channel")
    assert channels.count() == 8
    assert board.locator("form.channel[data-channel='3'] .ch-label").inner_text() == "greenhouse valve"
    columns = page.evaluate(
        "new Set([...document.querySelectorAll('article[data-device=relays1] form.channel')]"
        ".map(f => Math.round(f.getBoundingClientRect().left))).size"
    )
    assert columns >= (4 if viewport == "laptop" else 2), columns
    assert board.bounding_box()["height"] < (700 if viewport == "laptop" else 1200)
    assert board.locator("form.action").all_inner_texts() == ["all_off", "read"]  # not 16 on/off buttons as well
    three = board.locator("form.channel[data-channel='3']")
    assert three.get_attribute("data-state") == "off"
    press(page, "article[data-device=relays1] form.channel[data-channel='3'] button")
    page.wait_for_selector("article[data-device=relays1] form.channel[data-channel='3'][data-state=on]")
    assert three.locator("button").inner_text() == "Turn off" and three.locator(".ch-state").text_content() == "on"
    press(page, "article[data-device=relays1] form.channel[data-channel='3'] button")
    page.wait_for_selector("article[data-device=relays1] form.channel[data-channel='3'][data-state=off]")
    assert [c["action"] for c in http("GET", f"{d.url}/api/v1/commands?device=relays1")[1]["commands"]] == [
        "off3",
        "on3",
    ]

    # An error that has passed: when it happened, what it was in words, and how long until the device was back.
    status, report, _ = http("POST", f"{d.url}/api/v1/admin/test/serial_unplug?duration_s=0.5", {})
    assert status == 200 and report["recovered"] is True, report
    problem = page.locator("article[data-device=pump1] .last-error[data-level=info]")
    problem.wait_for()
    text = problem.inner_text()
    assert re.search(r"ago: the serial port \S+ is not there .*; back \d+(\.\d+)? (ms|s) later$", text), text
    for last in page.locator(".last-error").all_inner_texts():
        assert last == "none" or AGE.search(last), last  # no error without its age, on any card

    # The language providers: a table that fits, in words, with no counters of a cache nobody uses.
    providers = page.locator("#providers-body").inner_text()
    assert "cache misses" not in providers and "No language provider is active" in providers
    fits = page.evaluate(
        "(() => { const t = document.querySelector('#provider-table'); "
        "return t.getBoundingClientRect().right <= t.parentElement.getBoundingClientRect().right + 0.5; })()"
    )
    assert fits

    # Nowhere: JSON, errno tags, or anything wider than the screen.
    text = visible_text(page)
    for bad in ("{", "}", '":', "[Errno", "Errno", "null", "undefined", "NaN"):
        assert bad not in text, bad
    no_horizontal_overflow(page)
    if viewport == "laptop":
        assert page.evaluate("document.documentElement.scrollHeight") < 4000

    # Accessibility: axe-core (vendored, offline) finds nothing serious or critical.
    assert axe_serious(page) == []

    shot = tmp_path / f"page-{size[0]}x{size[1]}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("GATEWAYD_SCREENSHOTS"):
        out = Path(os.environ["GATEWAYD_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        (out / shot.name).write_bytes(shot.read_bytes())
    b.assert_only(d.url)


def test_a_device_that_is_down_is_the_verdict_and_says_since_when(make_daemon: Any, chromium: Any) -> None:
    d: Daemon = make_daemon(FAST)
    d.start()
    b, page = open_page(chromium, d, VIEWPORTS["laptop"])
    # The drill keeps the port unplugged for 3 s: long enough to see the page turn, then undoes itself.
    import threading

    done: dict[str, Any] = {}
    drill = threading.Thread(
        target=lambda: done.update(
            result=http("POST", f"{d.url}/api/v1/admin/test/serial_unplug?duration_s=3", {}, timeout=60)
        )
    )
    drill.start()
    try:
        page.wait_for_selector("#verdict[data-level=fault]")
        assert page.locator("#verdict .title").inner_text() == "Needs attention now"
        assert "not answering" in page.locator("#verdict .detail").inner_text()
        card = page.locator("article[data-device=pump1][data-level=fault]")
        card.wait_for()
        text = card.locator(".last-error").inner_text()
        assert re.match(r"not answering for \d+(\.\d+)? (ms|s): the serial port \S+ is not there", text), text
        assert "[Errno" not in visible_text(page)
        assert axe_serious(page) == []
    finally:
        drill.join(60)
    assert done["result"][0] == 200
    page.wait_for_selector("#verdict[data-level=ok]")
    b.assert_only(d.url)
