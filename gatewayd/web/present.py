"""What the gateway's state means, in words a technician reads: the overview's verdict and tiles, each device's
readings with their units, its problems with their age, a relay board's channels.

The status page renders these on the server, its script places the same texts when the state changes (they
travel in ``GET /api/v1/overview`` and the ``status`` event), and ``gatewayd status`` / ``health`` print them:
one place decides what is a fault, what only needs a look, and what is normal. Pure: every function takes the
wall-clock time it describes against.

Levels, worst last: ``ok`` (working), ``info`` (normal, nothing to do: not configured, offline by design,
waiting for something that comes by itself), ``warn`` (working, but look at it), ``fault`` (broken: act).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

LEVELS = ("ok", "info", "warn", "fault")

# --- words for numbers, times and errors --------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """A length of time, to the precision a person wants: "40 ms", "1.5 s", "12 s", "3 min 5 s", "2 h 10 min",
    "3 d 4 h"."""
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if 0 < seconds < 0.95:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s < 600 and s % 60 else "")
    if s < 86400:
        return f"{s // 3600} h" + (f" {s % 3600 // 60} min" if s % 3600 // 60 else "")
    return f"{s // 86400} d" + (f" {s % 86400 // 3600} h" if s % 86400 // 3600 else "")


def ago(then: float | None, now: float) -> str:
    if then is None:
        return "never"
    return "just now" if now - then < 1 else f"{duration(now - then)} ago"


def size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def number(value: float) -> str:
    """Enough digits to read, not the float's seventeen: 230.5, 21.4, 4.10, 0.95, 1234.5."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


_ERRNO = re.compile(r"\[Errno -?\d+\]\s*")
_MISSING_PORT = re.compile(r"could not open port (\S+?):.*No such file or directory", re.IGNORECASE)
_DENIED_PORT = re.compile(r"could not open port (\S+?):.*Permission denied", re.IGNORECASE)
_REFUSED = re.compile(r"cannot connect to (\S+?): .*Connection refused", re.IGNORECASE)
_UNRESOLVED = re.compile(r"cannot connect to (\S+?): .*(Name or service not known|Temporary failure)", re.IGNORECASE)


def plain_error(text: str | None) -> str:
    """An error as a person reads it: what happened and where, without the C library's errno tags, said once."""
    if not text:
        return ""
    for pattern, words in (
        (_MISSING_PORT, "the serial port {0} is not there (adapter unplugged or renamed?)"),
        (_DENIED_PORT, "no permission to open the serial port {0} (is the service user in the dialout group?)"),
        (_REFUSED, "nothing answers at {0} (connection refused)"),
        (_UNRESOLVED, "the host name in {0} is not known (DNS)"),
    ):
        m = pattern.search(text)
        if m:
            return words.format(m[1])
    return _ERRNO.sub("", text).strip()


# --- values with their units ----------------------------------------------------------------------------------


def label(key: str, meta: Mapping[str, Any] | None) -> str:
    """A field's name as its profile describes it ("Air temperature"), else its key in words ("Active power")."""
    if meta and meta.get("description"):
        return str(meta["description"])
    words = key.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def value_text(value: Any, meta: Mapping[str, Any] | None = None) -> str:
    """One value with its unit: "21.4 °C", "55 %", "yes", "on"."""
    unit = (meta or {}).get("unit")
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        text = number(value)
        return f"{text} {unit}" if unit else text
    if isinstance(value, Mapping):
        return pairs(value)
    if isinstance(value, list | tuple):
        return ", ".join(value_text(v) for v in value)
    return f"{value} {unit}" if unit else str(value)


def pairs(values: Mapping[str, Any] | None, meta: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A small object in words ("percent 40 %, ramp s 0 s"): a command's parameters or result, never JSON."""
    if not values:
        return ""
    meta = meta or {}
    return ", ".join(f"{k.replace('_', ' ')} {value_text(v, meta.get(k))}" for k, v in values.items())


# --- the overview ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    key: str
    label: str
    text: str
    level: str = "ok"
    why: str = ""  # what it means and what to do; shown unless the level is ok

    def to_api(self) -> dict[str, str]:
        return {"key": self.key, "label": self.label, "text": self.text, "level": self.level, "why": self.why}


@dataclass(frozen=True)
class Facts:
    """What the overview is assessed from: the supervisor's status, the last 5 minutes' error rate, the devices
    (as the API describes them) and the wall-clock time."""

    status: Mapping[str, Any]
    error_rate: Mapping[str, Any]
    devices: list[dict[str, Any]]
    now: float


def _health(f: Facts) -> Tile:
    st = f.status
    store = st.get("store") or {}
    if not st.get("healthy"):
        lost = store.get("lost")
        if lost:
            why = f"The database file was lost: {lost.get('message')}. New commands are refused; see the README."
        elif (store.get("stalled_s") or 0) > 1:
            why = f"The database has not answered for {duration(store['stalled_s'])} (a failing SD card?)."
        else:
            why = "The daemon reports itself unhealthy: systemd restarts it if this lasts (journalctl -u gatewayd)."
        return Tile("health", "Daemon", "Not healthy", "fault", why)
    if st.get("phase") == "starting":
        return Tile("health", "Daemon", "Starting", "info", "Devices and the uplink are being opened.")
    if st.get("phase") == "stopping":
        return Tile("health", "Daemon", "Stopping", "warn", "Commands in flight finish; new ones are refused.")
    return Tile("health", "Daemon", f"Running, up {duration(st.get('uptime_s'))}")


def _devices(f: Facts) -> Tile:
    devices = f.devices
    if not devices:
        return Tile("devices", "Devices", "None configured", "info", "Add devices to config.toml ([devices.NAME]).")
    down = [d["name"] for d in devices if not d.get("available")]
    if down:
        return Tile(
            "devices",
            "Devices",
            f"{', '.join(down)} not answering",
            "fault",
            f"{len(devices) - len(down)} of {len(devices)} answer. Commands for the others wait until they are back; "
            "their cards below say since when and why.",
        )
    held = [d["name"] for d in devices if (d.get("breaker") or {}).get("state") in ("open", "half_open")]
    polls = [d["name"] for d in devices if ((d.get("poll") or {}).get("failing") or 0) > 0]
    if held or polls:
        return Tile(
            "devices",
            "Devices",
            f"{', '.join(dict.fromkeys(held + polls))}: recent failures",
            "warn",
            "Answering, but recent commands or readings failed; the gateway leaves a failing device alone for a "
            "while before trying again. Its card says what failed.",
        )
    return Tile("devices", "Devices", f"All {len(devices)} answering")


def _uplink(f: Facts) -> Tile:
    up = f.status.get("uplink")
    name = "Uplink (MQTT)"
    if not up or up.get("enabled") is False:
        return Tile("uplink", name, "Not configured", "info", "This gateway reports to no broker ([mqtt] in config).")
    broker = up.get("broker") or "the broker"
    if up.get("connected"):
        return Tile("uplink", name, f"Connected to {broker}")
    cause = plain_error(up.get("last_error")) or "connecting"
    if not up.get("connects"):
        return Tile(
            "uplink",
            name,
            "Offline: no broker yet",
            "info",
            f"No MQTT broker has answered at {broker} yet: {cause}. Everything works offline: results, events and "
            "readings wait in the outbox and are sent when one answers. If this gateway should report somewhere, "
            "check [mqtt] host and port.",
        )
    return Tile(
        "uplink",
        name,
        f"Link lost {ago(up.get('since'), f.now)}",
        "warn",
        f"The broker at {broker} was reachable and is not now: {cause}. Nothing is lost: the outbox keeps what "
        "is to be sent, and the gateway reconnects by itself.",
    )


def _clock(f: Facts) -> Tile:
    synced = (f.status.get("clock") or {}).get("synchronised")
    if synced:
        return Tile("clock", "Clock", "Synchronised")
    if synced is None:
        return Tile("clock", "Clock", "Unknown", "info", "The daemon has not checked the clock yet.")
    return Tile(
        "clock",
        "Clock",
        "Waiting for time sync",
        "info",
        "No network time (NTP) yet; a Pi has no clock of its own. Nothing waits for it: readings are re-dated "
        "once it syncs. If it never does, check the network and timedatectl.",
    )


def _queue(f: Facts) -> Tile:
    q = f.status.get("queue") or {}
    return Tile("queue", "Queue", f"{q.get('queued', 0)} waiting · {q.get('in_flight', 0)} running")


def _outbox(f: Facts) -> Tile:
    ob = f.status.get("outbox")
    if not ob:
        return Tile("outbox", "Outbox", "—", "info", "Opened with the store.")
    rows = ob.get("rows") or 0
    text = "empty" if not rows else f"{rows} to send · oldest {duration(ob.get('oldest_age_s'))}"
    backlog = (ob.get("telemetry") or {}).get("backlog")
    if ob.get("telemetry_dropped"):
        return Tile(
            "outbox",
            "Outbox",
            f"{text} · {ob['telemetry_dropped']} readings dropped",
            "warn",
            "The outbox reached its size limit while the uplink was down: the oldest readings were dropped. "
            "Command results and events are never dropped.",
        )
    if backlog:
        return Tile(
            "outbox",
            "Outbox",
            f"{text} · backlog for {duration(backlog.get('age_s'))}",
            "info",
            "Readings are kept on disk while the broker is away or slow; live readings go first when it answers "
            "and the backlog drains beside them.",
        )
    if rows and not (f.status.get("uplink") or {}).get("connected"):
        return Tile("outbox", "Outbox", text, "info", "Kept on disk until a broker answers, then sent oldest first.")
    return Tile("outbox", "Outbox", f"{text} · live" if (ob.get("telemetry") or {}).get("live") else text)


def _storage(f: Facts) -> Tile:
    sto = f.status.get("storage")
    if not sto:
        return Tile("storage", "Storage", "Unknown", "info", "Free space is measured once the store is open.")
    if sto.get("full"):
        return Tile(
            "storage",
            "Storage",
            "FULL: new commands refused",
            "fault",
            f"Less than {size(sto.get('min_free_bytes'))} free under {sto.get('path')}. Commands already accepted "
            "finish; free some space and the gateway takes commands again by itself.",
        )
    if sto.get("measure_error"):
        return Tile("storage", "Storage", "Cannot measure", "warn", plain_error(sto["measure_error"]))
    free, floor = sto.get("free_bytes"), sto.get("min_free_bytes") or 0
    if free is not None and free < 3 * floor:
        return Tile(
            "storage",
            "Storage",
            f"{size(free)} free: low",
            "warn",
            f"New commands are refused below {size(floor)} free. Free some space on the card.",
        )
    return Tile("storage", "Storage", f"{size(free)} free")


def _errors(f: Facts) -> Tile:
    rate, finished = f.error_rate.get("rate"), f.error_rate.get("finished") or 0
    name = "Failed (5 min)"
    if rate is None or not finished:
        return Tile("errors", name, "No commands finished")
    failed = round(rate * finished)
    if not failed:
        return Tile("errors", name, f"None of {finished}")
    return Tile(
        "errors",
        name,
        f"{failed} of {finished} ({rate * 100:.0f} %)",
        "warn",
        "Failed, expired or refused by the device in the last 5 minutes; Commands below says why for each.",
    )


# The overview's tiles, in the page's order. Another figure is one more function here, and nothing in the page's
# script: it shows whatever tiles come, by key.
TILES: tuple[Callable[[Facts], Tile], ...] = (_health, _devices, _uplink, _clock, _queue, _outbox, _storage, _errors)


def assess(facts: Facts) -> dict[str, Any]:
    """The verdict first, then each tile: ``{"verdict": {"level", "title", "detail"}, "tiles": [...]}``."""
    tiles = [make(facts) for make in TILES]
    worst = max((t.level for t in tiles), key=LEVELS.index)
    if worst in ("warn", "fault"):
        title = "Needs attention now" if worst == "fault" else "Working, with something to check"
        detail = "; ".join(f"{t.label}: {t.text}" for t in tiles if t.level == worst) + "."
    else:
        worst, title = "ok", "Working normally"
        answering = next((t.text for t in tiles if t.key == "devices"), "")
        notes = [t.label for t in tiles if t.level == "info"]
        detail = f"Devices: {answering[:1].lower()}{answering[1:]}; commands run." + (
            f" Normal here, nothing to do: {', '.join(notes)} (see below)." if notes else ""
        )
    return {"verdict": {"level": worst, "title": title, "detail": detail}, "tiles": [t.to_api() for t in tiles]}


# --- a device ---------------------------------------------------------------------------------------------------

Device = Mapping[str, Any]  # a device as GET /api/v1/devices describes it


def _where(d: Device) -> str:
    if d.get("kind") == "gpio":
        return f"GPIO {d.get('pin')}"
    if d.get("bus") is not None:
        return f"{d.get('bus')}, address {d.get('address')}"
    return ""


def _problem(d: Device, now: float) -> tuple[str, str]:
    """(text, level): the device's current or last problem, with when, and how it ended."""
    error = plain_error(d.get("last_error"))
    poll = d.get("poll") or {}
    if not d.get("available"):
        since = d.get("down_at") or d.get("since")
        return (f"not answering for {duration(now - since) if since else '—'}: {error or 'unknown'}", "fault")
    if (poll.get("failing") or 0) > 0:
        return (f"last {poll['failing']} readings failed: {plain_error(poll.get('last_error'))}", "warn")
    if not error:
        return ("none", "ok")
    down_at, back_at = d.get("down_at"), d.get("since")
    at = down_at or d.get("last_error_at")
    when = f"{duration(now - at)} ago" if at else "earlier"  # a number even within the second: an age, always
    back = f"; back {duration(back_at - down_at)} later" if down_at and back_at and back_at >= down_at else ""
    return (f"{when}: {error}{back}", "info")


def _circuit(d: Device) -> tuple[str, str]:
    b = d.get("breaker") or {}
    if b.get("state") == "open":
        return (f"open: left alone after repeated failures, tried again in {duration(b.get('retry_after_s'))}", "warn")
    if b.get("state") == "half_open":
        return ("half-open: trying it again", "warn")
    return ("closed (normal)" if b else "—", "ok")


def queue_text(q: Mapping[str, Any] | None) -> str:
    if not q or (not q.get("queued") and not q.get("executing")):
        return "nothing waiting"
    text = f"{q.get('queued', 0)} waiting"
    return text + (f", running {str(q['executing'])[:12]}" if q.get("executing") else "")


def scheduled_text(rows: list[dict[str, Any]] | None) -> str:
    """What the gateway will send to the device by itself, soonest first: "all_off in 59 min (max on-time)"."""
    if not rows:
        return "nothing"
    why = {"max_on": "max on-time", "on_period": "end of the on-period"}
    parts = []
    for r in sorted(rows, key=lambda r: (r.get("due_in_s") is None, r.get("due_in_s") or 0)):
        when = "after the command runs" if r.get("due_in_s") is None else f"in {duration(r['due_in_s'])}"
        parts.append(f"{r['action']} {when} ({why.get(r['kind'], r['kind'])})")
    return "; ".join(parts)


def _values(d: Device) -> dict[str, Any]:
    """The device's latest values: its own reports (telemetry) over a command's result."""
    values = dict(d.get("state") or {})
    values.update((d.get("telemetry") or {}).get("values") or {})
    return values


def _channels(d: Device, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for ch in d.get("channels") or ():
        point = ch.get("point")
        on = values.get(point) if point else None
        on = on if isinstance(on, bool) else None
        out.append(
            {
                "channel": ch["channel"],
                "label": ch.get("label") or "",
                "on": on,
                "state": "unknown" if on is None else ("on" if on else "off"),
                "action": ch["off"] if on else ch["on"],  # the toggle: what pressing it does
                "button": "Turn off" if on else "Turn on",
            }
        )
    return out


def device_view(d: Device, queue: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
    """A device's card: its badge, readings with units, problem with its age, circuit, queue, and channels."""
    meta: Mapping[str, Mapping[str, Any]] = d.get("fields") or {}
    values = _values(d)
    channels = _channels(d, values)
    on_grid = {ch.get("point") for ch in d.get("channels") or ()}
    # Values the profile does not describe are shown only for backends whose state is all there is (a GPIO pin's
    # "state"); a sensor's frame counter is not a reading.
    described = any(m.get("source") == "telemetry" for m in meta.values())
    keys = [k for k in (meta if described else values) if k in values and k not in on_grid]
    readings = [{"key": k, "label": label(k, meta.get(k)), "text": value_text(values[k], meta.get(k))} for k in keys]
    seen_s = d.get("last_seen_ago_s")
    seen = "never" if seen_s is None else ago(now - seen_s, now)
    if d.get("telemetry") and (readings or channels):
        as_of = f"reported {seen}"
    elif readings or channels:
        as_of = ""
    elif "read" in (d.get("actions") or {}):
        as_of = "No reading yet: Read asks the device now."
    else:
        as_of = "Nothing reported yet."
    problem, problem_level = _problem(d, now)
    circuit, circuit_level = _circuit(d)
    if not d.get("available"):
        badge, level = "not answering", "fault"
    elif "warn" in (problem_level, circuit_level):
        badge, level = "answering, with failures", "warn"
    else:
        badge, level = "answering", "ok"
    return {
        "level": level,
        "badge": badge,
        "where": _where(d),
        "readings": readings,
        "as_of": as_of,
        "seen": seen,
        "problem": problem,
        "problem_level": problem_level,
        "circuit": circuit,
        "queue": queue_text(queue),
        "scheduled": scheduled_text(d.get("scheduled")),
        "channels": channels,
    }


# --- fault drills -----------------------------------------------------------------------------------------------

# What each of ``gatewayd test``'s scenarios does (gatewayd.app.operator runs them), for the page and the CLI.
SCENARIOS = {
    "serial_unplug": "pull a simulated serial port and plug it back: how fast the loss is seen and the device back",
    "serial_garbage": "random bytes on a simulated serial line: frames still decoded, noise discarded",
    "broker_down": "drop the MQTT link and hold it down: the outbox keeps everything and drains after",
    "slow_disk": "delay every database commit by 250 ms, as a failing SD card does",
    "provider_timeout": "every active language provider hangs: the local rules answer within the deadline",
    "provider_429": "every active language provider answers 429 (rate limited): failover, then local rules",
    "provider_down": "every active language provider refuses connections: failover, then local rules",
}
