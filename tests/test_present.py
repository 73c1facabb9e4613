"""What the gateway's state means, in words (gatewayd.web.present), in process: the verdict and its levels, errors
without errno tags, a past problem with its age and how it ended, readings with units from the profile, and a
relay board's channels. The page, its live updates and ``gatewayd health`` all show these texts."""

from __future__ import annotations

from typing import Any

import pytest

from gatewayd.config import load_config
from gatewayd.devices.manager import channels, fields
from gatewayd.web import present
from tests.conftest import CONFIG

NOW = 1_800_000_000.0
PROFILES = load_config(CONFIG).profiles


def healthy_status(**changes: Any) -> dict[str, Any]:
    """The supervisor's status of the bundled config out of the box: no broker answering, clock not synchronised."""
    status: dict[str, Any] = {
        "healthy": True,
        "phase": "running",
        "uptime_s": 75.0,
        "queue": {"queued": 0, "in_flight": 0},
        "store": {"stalled_s": 0.0, "lost": None},
        "storage": {"full": False, "free_bytes": 80 * 2**30, "min_free_bytes": 32 * 2**20, "path": "/var/lib/gw"},
        "outbox": {"rows": 12, "oldest_age_s": 60.0, "telemetry_dropped": 0},
        "clock": {"synchronised": False},
        "uplink": {
            "enabled": True,
            "broker": "127.0.0.1:1883",
            "connected": False,
            "connects": 0,
            "since": NOW - 60,
            "last_error": "cannot connect to 127.0.0.1:1883: [Errno 111] Connection refused",
        },
    }
    status.update(changes)
    return status


def device(name: str = "pump1", **changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": name,
        "profile": "sim_pump",
        "available": True,
        "last_error": None,
        "since": NOW - 300,
        "down_at": None,
        "last_error_at": None,
        "bus": "bus0",
        "address": 1,
        "breaker": {"state": "closed"},
        "poll": {},
        "actions": {"read": {}},
        "fields": fields(PROFILES["sim_pump"]),
        "channels": [],
        "state": {},
        "telemetry": None,
        "last_seen_ago_s": None,
    }
    d.update(changes)
    return d


def assess(status: dict[str, Any], devices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rate = {"rate": None, "finished": 0}
    return present.assess(present.Facts(status, rate, devices if devices is not None else [device()], NOW))


def tiles(summary: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {t["key"]: t for t in summary["tiles"]}


def test_out_of_the_box_is_working_normally_with_notes_not_faults() -> None:
    summary = assess(healthy_status())
    assert summary["verdict"]["level"] == "ok" and summary["verdict"]["title"] == "Working normally"
    t = tiles(summary)
    assert t["uplink"]["level"] == "info" and t["uplink"]["text"] == "Offline: no broker yet"
    assert (
        "[Errno" not in t["uplink"]["why"]
        and "nothing answers at 127.0.0.1:1883 (connection refused)" in (t["uplink"]["why"])
    )
    assert t["clock"]["level"] == "info" and "timedatectl" in t["clock"]["why"]
    assert "Uplink (MQTT), Clock" in summary["verdict"]["detail"]


@pytest.mark.parametrize(
    ("status", "devices", "level", "key"),
    [
        (
            healthy_status(uplink={"enabled": True, "connected": False, "connects": 3, "since": NOW - 42}),
            None,
            "warn",
            "uplink",
        ),
        (healthy_status(storage={"full": True, "min_free_bytes": 2**25, "path": "/x"}), None, "fault", "storage"),
        (healthy_status(healthy=False, store={"lost": {"message": "deleted"}}), None, "fault", "health"),
        (healthy_status(), [device(available=False, last_error="timeout", down_at=NOW - 7)], "fault", "devices"),
        (healthy_status(), [device(breaker={"state": "open", "retry_after_s": 20})], "warn", "devices"),
        (healthy_status(outbox={"rows": 5, "telemetry_dropped": 9}), None, "warn", "outbox"),
    ],
    ids=["uplink-lost", "disk-full", "store-lost", "device-down", "breaker-open", "readings-dropped"],
)
def test_the_verdict_is_the_worst_part(
    status: dict[str, Any], devices: list[dict[str, Any]] | None, level: str, key: str
) -> None:
    summary = assess(status, devices)
    assert tiles(summary)[key]["level"] == level
    assert summary["verdict"]["level"] == level
    assert summary["verdict"]["title"] == (
        "Needs attention now" if level == "fault" else "Working, with something to check"
    )
    assert tiles(summary)[key]["label"] in summary["verdict"]["detail"]


def test_the_outbox_says_whether_readings_go_out_live_or_a_backlog_is_carried_and_since_when() -> None:
    live = healthy_status(outbox={"rows": 0, "telemetry": {"live": 420, "backlog": None}})
    assert tiles(assess(live))["outbox"]["text"] == "empty · live"
    carried = {"rows": 300, "oldest_age_s": 95.0, "telemetry": {"live": 0, "backlog": {"age_s": 95.0}}}
    tile = tiles(assess(healthy_status(outbox=carried)))["outbox"]
    assert tile["level"] == "info" and tile["text"].endswith("backlog for 1 min 35 s"), tile
    assert "live readings go first" in tile["why"]


def test_an_uplink_that_is_not_configured_is_a_note() -> None:
    assert tiles(assess(healthy_status(uplink={"enabled": False})))["uplink"]["level"] == "info"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (
            "could not open port /dev/ttyUSB0: [Errno 2] No such file or directory: '/dev/ttyUSB0'",
            "the serial port /dev/ttyUSB0 is not there (adapter unplugged or renamed?)",
        ),
        (
            "could not open port /dev/ttyUSB0: [Errno 13] Permission denied: '/dev/ttyUSB0'",
            "no permission to open the serial port /dev/ttyUSB0 (is the service user in the dialout group?)",
        ),
        (
            "cannot connect to 10.0.0.5:1883: [Errno 111] Connection refused",
            "nothing answers at 10.0.0.5:1883 (connection refused)",
        ),
        ("[Errno 5] Input/output error", "Input/output error"),
        (None, ""),
    ],
)
def test_errors_are_said_without_errno_tags(raw: str | None, words: str) -> None:
    assert present.plain_error(raw) == words


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "—"),
        (0.04, "40 ms"),
        (1.5, "1.5 s"),
        (3.0, "3 s"),
        (12.7, "12 s"),
        (185, "3 min 5 s"),
        (7800, "2 h 10 min"),
    ],
)
def test_durations_to_the_precision_a_person_wants(seconds: float | None, text: str) -> None:
    assert present.duration(seconds) == text


def test_a_past_problem_says_when_and_how_it_ended() -> None:
    d = device(
        last_error="could not open port /dev/ttyUSB0: [Errno 2] No such file or directory: '/dev/ttyUSB0'",
        down_at=NOW - 180,
        last_error_at=NOW - 175,
        since=NOW - 168,
    )
    view = present.device_view(d, None, NOW)
    assert view["problem"] == (
        "3 min ago: the serial port /dev/ttyUSB0 is not there (adapter unplugged or renamed?); back 12 s later"
    )
    assert view["problem_level"] == "info" and view["level"] == "ok" and view["badge"] == "answering"


def test_a_current_problem_says_for_how_long() -> None:
    view = present.device_view(
        device(available=False, last_error="no answer within 0.5 s", down_at=NOW - 42), None, NOW
    )
    assert view["problem"] == "not answering for 42 s: no answer within 0.5 s"
    assert view["level"] == "fault" and view["badge"] == "not answering"


def test_readings_are_named_fields_with_units_from_the_profile() -> None:
    telemetry = {"at": "x", "values": {"running": True, "speed": 55, "temperature_c": 20.7612, "frames": 9}}
    view = present.device_view(device(telemetry=telemetry, last_seen_ago_s=2.0), None, NOW)
    assert [(r["label"], r["text"]) for r in view["readings"]] == [
        ("Pump running", "yes"),
        ("Speed set point", "55 %"),
        ("Water temperature at the pump", "20.8 °C"),
    ]  # the frame counter the profile does not describe is not a reading
    assert view["as_of"] == "reported 2 s ago"
    assert present.device_view(device(), None, NOW)["as_of"] == "No reading yet: Read asks the device now."


def test_a_relay_board_is_its_channels_with_labels_states_and_a_toggle() -> None:
    profile = PROFILES["waveshare_relay8"]
    chans = channels(profile, {3: "greenhouse valve"})
    assert [c["channel"] for c in chans] == list(range(1, 9))
    assert chans[2] == {"channel": 3, "label": "greenhouse valve", "on": "on3", "off": "off3", "point": "relay3"}
    d = device("relays1", profile="waveshare_relay8", fields=fields(profile), channels=chans)
    d["telemetry"] = {"at": "x", "values": {f"relay{n}": n == 3 for n in range(1, 9)}}
    view = present.device_view(d, None, NOW)
    three = view["channels"][2]
    assert (three["state"], three["action"], three["button"]) == ("on", "off3", "Turn off")
    assert (view["channels"][0]["state"], view["channels"][0]["action"]) == ("off", "on1")
    assert not any(r["key"].startswith("relay") for r in view["readings"])  # the grid shows them, once
    assert channels(PROFILES["sim_pump"], {}) == []  # one output: no grid
