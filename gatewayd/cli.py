"""The ``gatewayd`` command. Client commands talk to the running daemon's HTTP API with the standard library
only, so they start fast on a Pi; ``run`` imports the daemon.

Exit codes: 0 success; 1 the command ended in a state other than succeeded (or did not finish in time);
2 bad usage, invalid configuration or a request the daemon refused; 3 the daemon is not reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gatewayd import strictjson

EXIT_OK, EXIT_NOT_DONE, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3


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
    error = (err.body or {}).get("error", {}) if isinstance(err.body, dict) else {}
    print(f"gatewayd: refused ({err.status} {error.get('code', '?')}): {error.get('message', '')}", file=sys.stderr)
    for item in (error.get("details") or {}).get("errors", []):
        print(f"  {item.get('field')}: {item.get('message')}", file=sys.stderr)
    return EXIT_INVALID if err.status < 500 else EXIT_NOT_DONE


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
    url = base_url(args)
    try:
        _, stats = request(f"{url}/api/v1/stats")
        _, devices = request(f"{url}/api/v1/devices")
        _, recent = request(f"{url}/api/v1/commands?limit=10")
    except Unreachable as err:
        return _unreachable(err)
    except ApiError as err:
        return _api_error(err)
    if args.json:
        print(json.dumps({"stats": stats, "devices": devices["devices"], "recent": recent["commands"]}, indent=2))
        return EXIT_OK
    q = stats["queue"]
    print(
        f"gatewayd {stats['gateway_id']} ({stats['version']}, {stats['mode']} mode) at {url}: {stats['phase']}, "
        f"{'healthy' if stats['healthy'] else 'UNHEALTHY'}, up {stats['uptime_s']:.0f} s"
    )
    print(
        f"queue: {q['queued']} queued, {q['in_flight']} executing; "
        f"commands: {', '.join(f'{k} {v}' for k, v in sorted(stats['commands'].items())) or 'none yet'}"
    )
    print("devices:")
    for d in devices["devices"]:
        state = "available" if d["available"] else f"UNAVAILABLE ({d['last_error']})"
        print(f"  {d['name']:<16} {d['profile']:<14} {state}  actions: {', '.join(d['actions'])}")
    if recent["commands"]:
        print("recent commands:")
        for c in recent["commands"]:
            print(f"  {c['created_at']}  {c['id'][:12]:<12} {c['device']:<12} {c['action']:<10} {c['state']}")
    return EXIT_OK


def _operator(path: str, method: str = "GET", timeout: float = 10.0) -> Callable[[argparse.Namespace], int]:
    """``stats``, ``health``, ``config``, ``reset``, ``test``: the API's answer, as JSON."""

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
            if path == "/healthz" and err.status == 503:  # unhealthy is an answer, not a failure to ask
                print(json.dumps(err.body, indent=2))
                return EXIT_NOT_DONE
            return _api_error(err)
        print(json.dumps(body, indent=2))
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

    status = sub.add_parser("status", help="show the daemon's health, devices and recent commands")
    status.add_argument("--json", action="store_true")
    client(status)
    status.set_defaults(func=cmd_status)

    for name, path, method, text in (
        ("stats", "/api/v1/stats", "GET", "counters: queue, commands per state, outbox, uplink, store"),
        ("health", "/healthz", "GET", "is the daemon healthy (exit 1 if not)"),
        ("config", "/api/v1/admin/config", "GET", "the effective configuration, secrets redacted (admin)"),
        ("reset", "/api/v1/admin/reset", "POST", "close breakers, refill limiters, zero counters (admin)"),
    ):
        p = sub.add_parser(name, help=text)
        client(p)
        p.set_defaults(func=_operator(path, method))
    test = sub.add_parser("test", help="inject a fault scenario for a bounded time and report how it went (admin)")
    test.add_argument("scenario", help="serial_unplug, serial_garbage, broker_down, slow_disk, provider_timeout, ...")
    test.add_argument("--duration", type=float, default=5.0, help="seconds the fault lasts (default 5)")
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
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.config is None:
        args.config = default_config()
    if args.command == "check-config" and args.path is None:
        args.path = default_config()
    return int(args.func(args))
