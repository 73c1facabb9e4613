"""The ``gatewayd`` command. Client commands talk to the running daemon's HTTP API with the standard library
only, so they start fast on a Pi; ``run`` imports the daemon.

Exit codes: 0 success; 1 the command ended in a state other than succeeded (or did not finish in time);
2 bad usage, invalid configuration or a request the daemon refused; 3 the daemon is not reachable; 141 the
reader of the output went away (``gatewayd status | head -1``), as for any Unix tool killed by SIGPIPE: no
traceback, nothing on standard error.

Output is for people by default (aligned columns, words, units); ``--json`` gives the API's answer for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gatewayd import strictjson

EXIT_OK, EXIT_NOT_DONE, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_PIPE_CLOSED = 128 + 13  # SIGPIPE, as the shell reports a tool that wrote to a closed pipe


def default_config() -> Path:
    env = os.environ.get("GATEWAYD_CONFIG")
    if env:
        return Path(env)
    local = Path("config.toml")
    return local if local.exists() else Path("/etc/gatewayd/config.toml")


# --- daemon ------------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from gatewayd.app.supervisor import Supervisor
    from gatewayd.config import load_config
    from gatewayd.errors import ConfigError
    from gatewayd.observability import logging as gwlog

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # one JSON line reaches journald as soon as it is written
    try:
        loaded = load_config(args.config)
    except ConfigError as err:
        print(f"gatewayd: invalid configuration ({len(err.problems)} problem(s)):", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_INVALID
    gwlog.configure(loaded.config.log.level)
    return asyncio.run(Supervisor(loaded, hard_exit=_hard_exit).run())


def _hard_exit(code: int) -> None:
    """The supervisor's last resort (a second signal, a stop that overran): the log flushed, the process ended."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def cmd_check_config(args: argparse.Namespace) -> int:
    from gatewayd.config import load_config
    from gatewayd.errors import ConfigError

    try:
        loaded = load_config(args.path)
    except ConfigError as err:
        for problem in err.problems:
            print(problem)
        print(f"{len(err.problems)} problem(s) found", file=sys.stderr)
        return EXIT_INVALID
    cfg = loaded.config
    print(f"{loaded.path}: ok ({len(cfg.devices)} devices, {len(loaded.profiles)} profiles, mode {cfg.gateway.mode})")
    for key, var in sorted(loaded.overrides.items()):
        print(f"  {key} overridden by {var}")
    return EXIT_OK


# --- client ------------------------------------------------------------------------------------------------------


class Unreachable(Exception):
    pass


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(status)
        self.status, self.body = status, body


def base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    if os.environ.get("GATEWAYD_URL"):
        return os.environ["GATEWAYD_URL"].rstrip("/")
    host, port = "127.0.0.1", 8080
    path = Path(args.config) if args.config else default_config()
    if path.exists():
        try:
            from gatewayd.config import load_config

            http = load_config(path).config.http
            host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
            port = http.port
        except Exception:  # an unreadable config must not stop a status check; the default is tried
            pass
    return f"http://{host}:{port}"


def request(url: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    req.add_header("X-Gatewayd-Client", "cli")
    token = os.environ.get("GATEWAYD_TOKEN")
    if token:  # a daemon with [http.auth] enabled: an operator's token (gatewayd hash-token makes them)
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            payload = json.loads(err.read() or b"null")
        except ValueError:
            payload = {"error": {"code": "http_error", "message": str(err), "details": {}}}
        raise ApiError(err.code, payload) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise Unreachable(f"{url.split('/api')[0]}: {reason}") from None


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``key=value``; the value is JSON when it parses (``50``, ``true``, ``"x"``), a string otherwise."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"parameter {pair!r} is not key=value")
        try:
            params[key] = strictjson.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def _unreachable(err: Unreachable) -> int:
    print(
        f"gatewayd: the daemon is not reachable at {err} — is it running? (systemctl status gatewayd, or gatewayd run)",
        file=sys.stderr,
    )
    return EXIT_UNREACHABLE


def _api_error(err: ApiError) -> int:
    """The daemon's refusal on standard error: its code and message, each field's problem, and, for a name it does
    not know, the names it does (devices, a device's actions, fault scenarios)."""
    error = (err.body or {}).get("error", {}) if isinstance(err.body, dict) else {}
    details = error.get("details") or {}
    print(f"gatewayd: refused ({err.status} {error.get('code', '?')}): {error.get('message', '')}", file=sys.stderr)
    for item in details.get("errors", []):
        print(f"  {item.get('field')}: {item.get('message')}", file=sys.stderr)
    for key, what in (("known", "devices"), ("actions", "actions"), ("scenarios", "scenarios")):
        names = details.get(key)
        if isinstance(names, list) and names:
            print(f"  {what} here: {', '.join(str(n) for n in names)}", file=sys.stderr)
    return EXIT_INVALID if err.status < 500 else EXIT_NOT_DONE


def columns(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows as aligned columns, each as wide as its widest cell (long device or profile names included); the last
    column is not padded."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return [
        indent + "  ".join(cell if i == len(r) - 1 else cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip()
        for r in rows
    ]


def _actions_text(d: dict[str, Any]) -> str:
    """A device's actions, a relay board's on1/off1 ... on8/off8 said once: "on1-8/off1-8 (channels), all_off"."""
    actions = list(d.get("actions") or ())
    channels = d.get("channels") or []
    if not channels:
        return ", ".join(actions)
    paired = {a for ch in channels for a in (ch["on"], ch["off"])}
    nums = [ch["channel"] for ch in channels]
    span = f"{min(nums)}-{max(nums)}" if nums == list(range(min(nums), max(nums) + 1)) else ",".join(map(str, nums))
    return ", ".join([f"on{span}/off{span} (channels)", *[a for a in actions if a not in paired]])


def cmd_send(args: argparse.Namespace) -> int:
    try:
        params = parse_params(args.params)
    except ValueError as err:
        print(f"gatewayd: {err}", file=sys.stderr)
        return EXIT_INVALID
    body: dict[str, Any] = {"device": args.device, "action": args.action, "params": params}
    if args.id:
        body["id"] = args.id
    if args.ttl is not None:
        body["ttl_s"] = args.ttl
    if args.priority:
        body["priority"] = args.priority
    url = base_url(args)
    try:
        _, record = request(f"{url}/api/v1/commands?wait={args.wait:g}", "POST", body, timeout=args.wait + 10)
    except Unreachable as err:
        return _unreachable(err)
    except ApiError as err:
        return _api_error(err)
    print(json.dumps(record, indent=2))
    if record.get("state") == "succeeded":
        return EXIT_OK
    if record.get("state") not in ("failed", "expired", "rejected", "cancelled"):
        print(
            f"gatewayd: command {record.get('id')} is still {record.get('state')} after {args.wait:g} s; "
            f"check later with: gatewayd status",
            file=sys.stderr,
        )
    return EXIT_NOT_DONE


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a command still waiting in its queue; exit 1 (with its state) once it may have reached the device."""
    url = base_url(args)
    try:
        _, record = request(f"{url}/api/v1/commands/{quote(args.id, safe='')}/cancel", "POST", {}, timeout=10)
    except Unreachable as err:
        return _unreachable(err)
    except ApiError as err:
        return _api_error(err)
    print(f"cancelled {record.get('id')} ({record.get('device')} {record.get('action')}): it was never sent")
    return EXIT_OK


def cmd_say(args: argparse.Namespace) -> int:
    """A natural-language command: the daemon interprets it (LLM providers, else its local rules) and runs it."""
    body: dict[str, Any] = {"text": args.text}
    if args.user:
        body["user"] = args.user
    if args.confirm:
        body["confirm"] = True
    if args.id:
        body["id"] = args.id
    url = base_url(args)
    try:
        _, record = request(f"{url}/api/v1/commands?wait={args.wait:g}", "POST", body, timeout=args.wait + 30)
    except Unreachable as err:
        return _unreachable(err)
    except ApiError as err:
        error = (err.body or {}).get("error", {}) if isinstance(err.body, dict) else {}
        details = error.get("details") or {}
        code = _api_error(err)
        if error.get("code") == "not_understood":
            suggestions = details.get("suggestions")
            if suggestions:  # the few closest sentences for the device it names
                print("  try:", file=sys.stderr)
                for sentence in suggestions:
                    print(f'    "{sentence}"', file=sys.stderr)
            elif suggestions is None:
                for capability in details.get("can_do", []):
                    print(
                        f'  {capability.get("device")} {capability.get("action")}: "{capability.get("example")}"',
                        file=sys.stderr,
                    )
        if error.get("code") == "confirmation_required":
            how = details.get("interpretation") or {}
            print(
                f"  interpreted as: {how.get('understood') or json.dumps(details.get('command'))}; "
                "add --confirm to run it",
                file=sys.stderr,
            )
        return code
    print(json.dumps(record, indent=2))
    if "answer" in record and "id" not in record:  # a question: answered from state, nothing was run
        print(f"gatewayd: {record['answer']}", file=sys.stderr)
        return EXIT_OK
    how = record.get("interpretation") or {}
    understood = how.get("understood") or (
        f"{record.get('device')} {record.get('action')} {json.dumps(record.get('params'))}"
    )
    print(
        f"gatewayd: understood as {understood} "
        f"by {how.get('provider')}{' (cached)' if how.get('cached') else ''}"
        f"{' (degraded: local rules)' if how.get('degraded') else ''} in {how.get('latency_ms')} ms",
        file=sys.stderr,
    )
    if record.get("state") == "succeeded":
        return EXIT_OK
    return EXIT_NOT_DONE


def cmd_status(args: argparse.Namespace) -> int:
    """The verdict, the queue, a line per device (its state and last problem, in words), the recent commands."""
    from gatewayd.web import present

    url = base_url(args)
    try:
        _, stats = request(f"{url}/api/v1/stats")
        _, overview = request(f"{url}/api/v1/overview")
        _, recent = request(f"{url}/api/v1/commands?limit=10")
    except Unreachable as err:
        return _unreachable(err)
    except ApiError as err:
        return _api_error(err)
    devices = overview.get("devices") or []
    if args.json:
        out = {"summary": overview.get("summary"), "stats": stats, "devices": devices, "recent": recent["commands"]}
        print(json.dumps(out, indent=2))
        return EXIT_OK
    verdict = (overview.get("summary") or {}).get("verdict") or {}
    q = stats["queue"]
    print(
        f"{stats['gateway_id']}: {verdict.get('title', stats['phase'])} (gatewayd {stats['version']}, "
        f"{stats['mode']} mode, {stats['phase']}, up {present.duration(stats['uptime_s'])}, at {url})"
    )
    if verdict.get("detail"):
        print(f"  {verdict['detail']}")
    done = ", ".join(f"{v} {k}" for k, v in sorted(stats["commands"].items())) or "none yet"
    print(f"queue: {q['queued']} waiting, {q['in_flight']} running; commands since start: {done}")
    print("devices:")
    rows = [["NAME", "PROFILE", "STATE", "LAST PROBLEM", "ACTIONS"]]
    for d in devices:
        view = d.get("view") or {}
        state = view.get("badge") or ("answering" if d.get("available") else "NOT ANSWERING")
        problem = view.get("problem") or present.plain_error(d.get("last_error")) or "none"
        rows.append([d["name"], str(d.get("profile")), state, problem, _actions_text(d)])
    for line in columns(rows):
        print(line)
    if recent["commands"]:
        print("recent commands (UTC):")
        rows = [["RECEIVED", "ID", "DEVICE", "ACTION", "STATE"]]
        for c in recent["commands"]:
            received = str(c["created_at"]).replace("T", " ").split(".")[0].rstrip("Z")
            rows.append([received, c["id"][:12], c["device"], c["action"], c["state"]])
        for line in columns(rows):
            print(line)
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """Is it working, and if not, what and what to do: the verdict and the overview's tiles, as on the page. Exit 1
    when the daemon reports itself unhealthy (its /healthz answers 503)."""
    url = base_url(args)
    try:
        try:
            _, health = request(f"{url}/healthz")
            code = EXIT_OK
        except ApiError as err:
            if err.status != 503:  # unhealthy is an answer, not a failure to ask
                raise
            health, code = err.body, EXIT_NOT_DONE
        try:
            _, overview = request(f"{url}/api/v1/overview")
        except ApiError as err:
            if err.status not in (401, 403):
                raise
            overview = {}  # a daemon with access control and no token here: /healthz alone
    except Unreachable as err:
        return _unreachable(err)
    except ApiError as err:
        return _api_error(err)
    summary = overview.get("summary")
    if args.json:
        print(json.dumps({"healthz": health, "summary": summary}, indent=2))
        return code
    if not summary:
        verdict_text = "healthy" if health.get("healthy") else "NOT HEALTHY"
        print(f"{health.get('gateway_id')}: {verdict_text} ({health.get('phase')})")
        print("  (set GATEWAYD_TOKEN to a viewer's token to see what each part means)")
        return code
    verdict = summary["verdict"]
    print(f"{health.get('gateway_id')}: {verdict['title']}")
    print(f"  {verdict['detail']}")
    marks = {"ok": "ok", "info": "note", "warn": "CHECK", "fault": "FAULT"}
    rows = [[marks.get(t["level"], t["level"]), t["label"], t["text"]] for t in summary["tiles"]]
    for tile, line in zip(summary["tiles"], columns(rows), strict=True):
        print(line)
        if tile.get("why") and tile["level"] != "ok":  # what it means and what to do, under its line
            for text in textwrap.wrap(tile["why"], width=92):
                print(f"        {text}")
    return code


def cmd_stats(args: argparse.Namespace) -> int:
    """The counters, for a technician watching them move: commands per state, queue per device, outbox, uplink,
    store and storage. ``health`` says what they mean."""
    from gatewayd.web import present

    url = base_url(args)
    try:
        _, st = request(f"{url}/api/v1/stats")
    except Unreachable as err:
        return _unreachable(err)
    except ApiError as err:
        return _api_error(err)
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    q, ob, up = st.get("queue") or {}, st.get("outbox") or {}, st.get("uplink") or {}
    store, storage = st.get("store") or {}, st.get("storage") or {}
    print(f"{st['gateway_id']} (gatewayd {st['version']}, {st['mode']} mode), up {present.duration(st['uptime_s'])}")
    rows = [
        ["commands", ", ".join(f"{v} {k}" for k, v in sorted((st.get("commands") or {}).items())) or "none yet"],
        ["queue", f"{q.get('queued', 0)} waiting, {q.get('in_flight', 0)} running"],
        [
            "outbox",
            f"{ob.get('rows', 0)} records ({present.size(ob.get('bytes'))}), oldest "
            f"{present.duration(ob.get('oldest_age_s')) if ob.get('rows') else '—'}, "
            f"{ob.get('telemetry_dropped', 0)} readings dropped",
        ],
    ]
    if up.get("enabled") is False or not up:
        rows.append(["uplink", "not configured"])
    else:
        rows.append(
            [
                "uplink",
                f"{'connected' if up.get('connected') else 'not connected'} ({up.get('broker')}), "
                f"{up.get('connects', 0)} connects, {up.get('published', 0)} published, "
                f"{up.get('commands_received', 0)} commands received",
            ]
        )
    rows.append(["store", f"{store.get('commits', 0)} commits, stalled {present.duration(store.get('stalled_s'))}"])
    rows.append(["storage", f"{present.size(storage.get('free_bytes'))} free at {storage.get('path')}"])
    for line in columns(rows, indent=""):
        print(line)
    per = q.get("per_device") or {}
    if per:
        print("per device:")
        rows = [["DEVICE", "WAITING", "RUNNING", "CIRCUIT"]]
        for name, dq in per.items():
            breaker = (dq.get("breaker") or {}).get("state") or "—"
            rows.append([name, str(dq.get("queued", 0)), str(dq.get("executing") or "—")[:12], breaker])
        for line in columns(rows):
            print(line)
    return EXIT_OK


def _report_lines(report: dict[str, Any]) -> list[str]:
    """A fault drill's report in words: how it ended, what was done, what was seen."""
    from gatewayd.web import present

    head = (
        f"{report.get('scenario')}: {'recovered' if report.get('recovered') else 'NOT recovered'}, "
        f"{'healthy after' if report.get('healthy_after') else 'NOT healthy after'}"
        + (f" (took {present.duration(report['took_s'])})" if isinstance(report.get("took_s"), int | float) else "")
    )
    lines = [head, *(f"  done: {a}" for a in report.get("actions") or ())]
    for key, value in (report.get("observed") or {}).items():
        if key.endswith("_s") and isinstance(value, int | float) and not isinstance(value, bool):
            key, text = key[:-2], present.duration(value)
        elif isinstance(value, str):
            text = present.plain_error(value)
        else:
            text = present.value_text(value)
        lines.append(f"  {key.replace('_', ' ')}: {text}")
    return lines


def _operator(path: str, method: str = "GET", timeout: float = 10.0) -> Callable[[argparse.Namespace], int]:
    """``config``, ``reset``, ``test``: the API's answer (``config`` as JSON; the others in words, or JSON with
    ``--json``)."""

    def run(args: argparse.Namespace) -> int:
        url = base_url(args)
        target = path
        if "{scenario}" in target:
            target = target.format(scenario=args.scenario) + f"?duration_s={args.duration}"
        wait = args.duration + 60 if "{scenario}" in path else timeout
        try:
            _, body = request(f"{url}{target}", method=method, body={} if method == "POST" else None, timeout=wait)
        except Unreachable as err:
            return _unreachable(err)
        except ApiError as err:
            return _api_error(err)
        if getattr(args, "json", True):
            print(json.dumps(body, indent=2))
        elif "{scenario}" in path:
            print("\n".join(_report_lines(body)))
        else:
            print(
                f"reset: {body.get('breakers_closed', 0)} breakers closed, "
                f"{body.get('limiter_keys_cleared', 0)} rate-limit keys cleared"
            )
        if "{scenario}" in path:
            return EXIT_OK if body.get("recovered", True) and body.get("healthy_after", True) else EXIT_NOT_DONE
        return EXIT_OK

    return run


def cmd_scan(args: argparse.Namespace) -> int:
    """Probe a Modbus bus or host for the unit ids that answer; with a profile, read its points once
    (gatewayd.devices.modbus_scan). Logs go to standard error, at error level only: the output is the scan."""
    from gatewayd.devices import modbus_scan
    from gatewayd.observability import logging as gwlog

    gwlog.configure("error", stream=sys.stderr)
    if args.bus and args.config is None:
        args.config = default_config()
    return modbus_scan.main(args)


def cmd_hash_token(args: argparse.Namespace) -> int:
    """A new token (or the one given on standard input) and the hash for ``[http.auth] tokens``."""
    from gatewayd.web.auth import hash_token, new_token

    if args.stdin:
        token = sys.stdin.readline().rstrip("\r\n")
        if not token:
            print("gatewayd: no token on standard input", file=sys.stderr)
            return EXIT_INVALID
    else:
        token = new_token()
    digest = hash_token(token)
    if args.name:
        print(f'{{ name = "{args.name}", role = "{args.role}", hash = "{digest}" }}')
    else:
        print(digest)
    if not args.stdin:
        print(f"token (give it to its holder; it is not stored anywhere): {token}", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatewayd", description="Edge gateway daemon: devices, commands, status.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground (systemd runs this)")
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: ./config.toml, else /etc/gatewayd/config.toml; or $GATEWAYD_CONFIG)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and its device profiles")
    check.add_argument("path", nargs="?", type=Path, default=None)
    check.set_defaults(func=cmd_check_config)

    def client(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="daemon URL (default: $GATEWAYD_URL, else from the config's [http])")
        p.add_argument("--config", type=Path, default=None, help="config file to read the daemon's address from")

    send = sub.add_parser("send", help="send a command and print its final record")
    send.add_argument("device")
    send.add_argument("action")
    send.add_argument("params", nargs="*", metavar="key=value")
    send.add_argument("--id", help="idempotency key: sending the same id again never runs the command twice")
    send.add_argument("--ttl", type=float, help="deadline in seconds; the command expires unexecuted after it")
    send.add_argument("--priority", choices=["critical", "high", "normal", "low"])
    send.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a final state (default 30)")
    client(send)
    send.set_defaults(func=cmd_send)

    cancel = sub.add_parser("cancel", help="cancel a command still waiting in its queue (never sent)")
    cancel.add_argument("id", help="the command's id (as send, say and status show it)")
    client(cancel)
    cancel.set_defaults(func=cmd_cancel)

    say = sub.add_parser("say", help="send a command in plain words and print its final record")
    say.add_argument("text", help='e.g. "switch the irrigation pump on for 10 minutes"')
    say.add_argument("--user", help="who is asking (the per-user limit counts it)")
    say.add_argument("--confirm", action="store_true", help="confirm an action its profile marks confirm")
    say.add_argument("--id", help="idempotency key: sending the same id again never runs the command twice")
    say.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a final state (default 30)")
    client(say)
    say.set_defaults(func=cmd_say)

    def as_json(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="the API's answer as JSON, for scripts")

    for name, func, text in (
        ("status", cmd_status, "the verdict, each device's state and last problem, and the recent commands"),
        ("health", cmd_health, "is it working, and what to do if not: the verdict and each part (exit 1 if unhealthy)"),
        ("stats", cmd_stats, "the counters: commands per state, queue per device, outbox, uplink, store"),
    ):
        p = sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")
        as_json(p)
        client(p)
        p.set_defaults(func=func)

    config = sub.add_parser("config", help="the effective configuration as JSON, secrets redacted (admin)")
    client(config)
    config.set_defaults(func=_operator("/api/v1/admin/config"))
    reset = sub.add_parser("reset", help="close breakers, refill limiters, zero counters (admin)")
    as_json(reset)
    client(reset)
    reset.set_defaults(func=_operator("/api/v1/admin/reset", "POST"))

    from gatewayd.web.present import SCENARIOS

    width = max(map(len, SCENARIOS))
    test = sub.add_parser(
        "test",
        help="inject a fault scenario for a bounded time and report how it went (admin)",
        description="Injects a fault on this gateway for --duration seconds, undoes it, and reports how the\n"
        "gateway coped (exit 1 if it did not recover). The provider_* scenarios need an active\n"
        "language provider.",
        epilog="scenarios:\n" + "\n".join(f"  {n.ljust(width)}  {what}" for n, what in SCENARIOS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    test.add_argument("scenario", help="one of the scenarios below")
    test.add_argument("--duration", type=float, default=5.0, help="seconds the fault lasts (default 5)")
    as_json(test)
    client(test)
    test.set_defaults(func=_operator("/api/v1/admin/test/{scenario}", "POST"))
    scan = sub.add_parser(
        "scan",
        help="probe a Modbus bus or host for the unit ids that answer, and read a profile's points once",
        description="Exit status: 0 a unit answered, 1 none did, 2 bad usage, 3 the port or host cannot be opened.",
    )
    where = scan.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="a Modbus TCP device, gateway or serial server")
    where.add_argument("--serial", metavar="PORT", help="an RS-485 adapter, e.g. /dev/serial/by-id/usb-...")
    where.add_argument("--bus", help="a [modbus_tcp.NAME] or Modbus [serial.NAME] of the config (mock mode: simulated)")
    scan.add_argument("--port", type=int, default=502, help="with --host (default 502)")
    scan.add_argument("--rtu-over-tcp", action="store_true", help="with --host: a serial server passing RTU frames")
    scan.add_argument("--baudrate", type=int, default=9600, help="with --serial (default 9600)")
    scan.add_argument("--parity", choices=["N", "E", "O"], default="N", help="with --serial (default N)")
    scan.add_argument("--stopbits", type=int, choices=[1, 2], default=1, help="with --serial (default 1)")
    scan.add_argument("--units", default="1-247", help="unit ids to probe: 1-247 (default), 1,2,5, 255")
    scan.add_argument("--timeout", type=float, help="seconds a unit has to answer (default 1 over TCP, 0.5 serial)")
    scan.add_argument("--profile", help="read this profile's points from each unit (a name, or a .toml file)")
    scan.add_argument("--profiles", type=Path, help="the profiles directory (default: the config's)")
    scan.add_argument("--config", type=Path, help="the config with --bus, and for its profiles directory")
    scan.add_argument("--json", action="store_true", help="print the units and their values as JSON")
    scan.set_defaults(func=cmd_scan)
    hasher = sub.add_parser(
        "hash-token",
        help="make an access token and its hash for [http.auth] tokens",
        description="Prints the hash (or, with --name, a whole tokens entry) on standard output and the new "
        "token on standard error. With --stdin, hashes the token read from standard input instead.",
    )
    hasher.add_argument("--name", help="print a complete entry for [http.auth] tokens with this name")
    hasher.add_argument("--role", choices=["viewer", "operator", "admin"], default="operator")
    hasher.add_argument("--stdin", action="store_true", help="hash the token on standard input")
    hasher.set_defaults(func=cmd_hash_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
            if args.command == "run" and args.config is None:
                args.config = default_config()
            if args.command == "check-config" and args.path is None:
                args.path = default_config()
            return int(args.func(args))
        finally:  # here, where a closed pipe can still be caught (also after --help), not at the interpreter's exit
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader has gone (| head -1): what it took is all it wanted. Standard output goes to /dev/null so the
        # interpreter's own flush at exit cannot raise again, and the command ends quietly, as SIGPIPE ends cat.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
