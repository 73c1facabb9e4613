"""Bad input at volume over HTTP, against the real daemon: over a thousand generated bodies and content types to
``POST /api/v1/commands`` (bad in every way: not JSON, the wrong shape, a field wrong, nested thousands deep, too
large, natural-language oddities, an id already used for another command), with valid commands in between, and a
few hundred more to the other write endpoints. Never a 500: always a JSON error with a 4xx status and a typed code,
nothing stored for a rejected request, every valid command run once, the commands accepted before the barrage
unchanged, and the daemon healthy after."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import time
import urllib.parse
import zlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.web import crosssite
from tests.conftest import Daemon
from tests.faults.bad_input import (
    REJECTION_CODES,
    SIZE_LIMIT,
    VALID_ACTIONS,
    Payload,
    bad_payloads,
    conflicts,
    dumps,
    payload,
)

pytestmark = pytest.mark.timeout(300)

BODY_LIMIT = SIZE_LIMIT
SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible as it stands
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# The per-user limit of natural-language requests would answer most of them rate_limited (a typed answer, but
# it would hide how the rest are refused); the daemon's HTTP limits are off in tests/conftest.py's Daemon.
ENV = {"GATEWAYD_INTERPRET__USER_RATE_PER_MINUTE": "100000", "GATEWAYD_INTERPRET__USER_BURST": "100000"}

content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=latin-1",
            "application/json; charset=bogus",
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "application/xml",
            "",
            ";;;",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
)
encodings = st.sampled_from([None, None, None, None, "identity", "gzip", "deflate", "gzip-bad", "deflate-bad"])


def media_type(ctype: str) -> str:
    """A Content-Type's media type, without its parameters, as the daemon reads it."""
    return ctype.split(";", 1)[0].strip().lower()


def declared_json(ctype: str) -> bool:
    return crosssite.is_json(media_type(ctype))


def request(d: Daemon, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def encode(body: bytes, encoding: str | None) -> tuple[bytes, dict[str, str]]:
    if encoding is None:
        return body, {}
    if encoding == "gzip":
        return gzip.compress(body), {"Content-Encoding": "gzip"}
    if encoding == "deflate":
        return zlib.compress(body), {"Content-Encoding": "deflate"}
    if encoding.endswith("-bad"):  # the header says compressed, the bytes are not
        return body or b"x", {"Content-Encoding": encoding.removesuffix("-bad")}
    return body, {"Content-Encoding": encoding}


def assert_typed_error(status: int, ctype: str, raw: bytes, what: Any) -> dict[str, Any]:
    assert 400 <= status < 500, (status, raw[:300], what)
    assert ctype.startswith("application/json"), (status, ctype, raw[:300], what)
    body = json.loads(raw)
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, (error, what)
    assert isinstance(error["message"], str) and error["message"], (error, what)
    assert isinstance(error["details"], dict), (error, what)
    return dict(error)


def stored_counts(d: Daemon) -> dict[str, int]:
    status, stats = d.get("/api/v1/stats")
    assert status == 200
    return dict(stats["commands"])


def accept_before(d: Daemon) -> dict[str, dict[str, Any]]:
    """Ten commands accepted and run before the barrage, to compare after it."""
    records = {}
    for i in range(10):
        status, rec, _ = d.post(
            {"id": f"before-{i}", "device": "pump1", "action": "set_speed", "params": {"percent": i}}, wait=5
        )
        assert status == 200 and rec["state"] == "succeeded", rec
        records[rec["id"]] = d.command(rec["id"])
    return records


@st.composite
def valid_commands(draw: st.DrawFn) -> Payload:
    device, action, params = draw(st.sampled_from(VALID_ACTIONS))
    body = {"device": device, "action": action, "params": params}
    if draw(st.booleans()):
        body["priority"] = draw(st.sampled_from(["critical", "HIGH", "normal", "Low"]))
    return payload(body, "run", "valid")


def test_a_thousand_bad_command_bodies_get_typed_json_errors_and_change_nothing(make_daemon: Any) -> None:
    d: Daemon = make_daemon(ENV)
    d.start()
    before = accept_before(d)
    counts_before = stored_counts(d)
    kinds: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    accepted: dict[str, tuple[str, str]] = {}  # id -> (device, action)
    n = 0
    started = time.monotonic()

    @settings(SETTINGS, max_examples=1200)
    @given(
        st.one_of(
            bad_payloads(BODY_LIMIT),
            bad_payloads(BODY_LIMIT),
            bad_payloads(BODY_LIMIT),
            conflicts(),
            valid_commands(),
        ),
        content_types,
        encodings,
    )
    def barrage(p: Payload, ctype: str, encoding: str | None) -> None:
        nonlocal n
        n += 1
        p = p.with_id(f"h{n}")
        if encoding in ("gzip", "deflate") and p.kind == "huge":
            encoding = None  # compressed, it would fit: the limit is on what arrives
        raw, headers = encode(p.raw, encoding)
        headers["Content-Type"] = ctype
        status, rtype, answer = request(d, "POST", "/api/v1/commands", raw, headers)
        kinds[p.kind] += 1
        if not declared_json(ctype):  # the JSON API reads no other type: nothing a page elsewhere could send
            error = assert_typed_error(status, rtype, answer, (p, ctype))
            # Too large is found first (before anything is read), and an empty body has nothing to refuse.
            assert error["code"] in ("unsupported_media_type", "payload_too_large", "bad_request"), (error, ctype)
            if error["code"] == "unsupported_media_type":
                codes[error["code"]] += 1
                if p.command_id is not None and re.fullmatch(r"h\d+", p.command_id):
                    assert d.get(f"/api/v1/commands/{p.command_id}")[0] == 404, p  # nothing stored for it
                # The same body again, declared JSON: on to the decoder and the validation.
                headers["Content-Type"] = "application/json"
                status, rtype, answer = request(d, "POST", "/api/v1/commands", raw, headers)
        assert status != 415, (ctype, answer[:300])
        if status == 202 and p.expect in ("run", "either"):
            rec = json.loads(answer)
            assert rec["state"] == "queued" and (p.command_id is None or rec["id"] == p.command_id), rec
            accepted[rec["id"]] = (rec["device"], rec["action"])
            return
        if encoding and encoding.endswith("-bad"):
            error = assert_typed_error(status, rtype, answer, (p, encoding))
            assert error["code"] in ("bad_request", "payload_too_large"), error
            codes[error["code"]] += 1
            return
        assert p.expect != "run", (status, answer[:300], p)
        error = assert_typed_error(status, rtype, answer, p)
        assert error["code"] in REJECTION_CODES, (error, p)
        if p.codes is not None:
            assert error["code"] in p.codes, (error, p)
        codes[error["code"]] += 1
        if p.command_id is not None and re.fullmatch(r"h\d+", p.command_id):  # an id this test gave it
            assert d.get(f"/api/v1/commands/{p.command_id}")[0] == 404, p  # nothing stored for it

    barrage()
    took = time.monotonic() - started
    print(f"\nHTTP: {n} bodies in {took:.1f} s; by kind {dict(kinds)}; rejected by code {dict(codes)}")

    assert d.proc is not None and d.proc.poll() is None
    assert d.get("/healthz")[0] == 200
    for command_id, (device, _action) in accepted.items():
        final = d.wait_final(command_id, timeout=20)
        assert final["state"] == "succeeded", final
        if device == "pump1":
            assert d.executions(command_id) == 1, command_id
    counts_after = stored_counts(d)
    assert sum(counts_after.values()) == sum(counts_before.values()) + len(accepted), (counts_before, counts_after)
    for command_id, rec in before.items():
        assert d.command(command_id) == rec, command_id  # the barrage changed nothing already accepted
    assert sum(kinds.values()) >= 1000 and len(accepted) > 20
    assert {"bad_request", "validation_failed", "unknown_device", "payload_too_large", "conflict"} <= set(codes)
    assert "unsupported_media_type" in codes
    assert not [e for e in d.log_lines() if e.get("event") == "request_crashed"]


scenario_names = st.text(min_size=1, max_size=30).filter(
    lambda s: s not in ("serial_unplug", "serial_garbage", "broker_down", "slow_disk") and not s.startswith("provider_")
)
form_fields = st.dictionaries(
    st.sampled_from(["device", "action", "p.percent", "p.seconds", "p.x", "priority", "confirm", "text", "csrf_token"])
    | st.text(max_size=8),
    st.one_of(
        st.sampled_from(["pump1", "relay1", "set_speed", "read", "on", "50", "1e999", "nan", "-1", "critical"]),
        st.text(max_size=30),
    ),
    max_size=5,
)


@st.composite
def other_writes(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """(path, body, content type) for the write endpoints beside POST /api/v1/commands."""
    target = draw(st.sampled_from(["ui", "ui", "ui", "reset", "scenario", "login", "logout"]))
    ctype = draw(content_types)
    if target == "ui":
        fields = draw(
            form_fields
            | st.sampled_from([{"device": "pump1", "action": "read"}, {"device": "pump1", "action": "start"}])
            | st.builds(lambda n: {"device": "pump1", "action": "set_speed", "p.percent": str(n)}, st.integers(-5, 105))
        )
        if draw(st.booleans()):
            return "/ui/command", urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded"
        return "/ui/command", draw(st.binary(max_size=200)), ctype
    if target == "scenario":
        name = urllib.parse.quote(draw(scenario_names), safe="")
        query = draw(st.sampled_from(["", "?duration_s=nan", "?duration_s=-1", "?duration_s=1e9", "?duration_s=x"]))
        return f"/api/v1/admin/test/{name}{query}", draw(st.binary(max_size=50)), ctype
    body = draw(st.one_of(st.binary(max_size=200), st.builds(dumps, st.dictionaries(st.text(max_size=5), st.text()))))
    path = {"reset": "/api/v1/admin/reset", "login": "/login", "logout": "/logout"}[target]
    return path, body, ctype


def test_the_other_write_endpoints_never_answer_500(make_daemon: Any) -> None:
    d: Daemon = make_daemon(ENV)
    d.start()
    before = accept_before(d)
    counts_before = stored_counts(d)
    statuses: Counter[tuple[str, int]] = Counter()

    @settings(SETTINGS, max_examples=400)
    @given(other_writes())
    def barrage(case: tuple[str, bytes, str]) -> None:
        path, body, ctype = case
        status, rtype, answer = request(d, "POST", path, body, {"Content-Type": ctype})
        statuses[(path.split("?")[0].rsplit("/", 1)[0] if "/test/" in path else path, status)] += 1
        assert status < 500, (path, status, answer[:300])
        if path == "/ui/command":  # the page's forms: a redirect to the page, or the page with the refusal
            assert status == 303 or 400 <= status < 500, (status, answer[:200])
            if status >= 400 and rtype.startswith("application/json"):  # a form that cannot be read at all
                assert_typed_error(status, rtype, answer, case)
        elif path in ("/login", "/logout"):
            assert status == 303, (path, status)  # access control is off: both go back to the page
        elif not declared_json(ctype) and (body or media_type(ctype) in crosssite.SIMPLE_TYPES):
            error = assert_typed_error(status, rtype, answer, case)  # a JSON route reads no other body
            assert error["code"] in ("unsupported_media_type", "not_found"), error  # (or no such route)
        elif path == "/api/v1/admin/reset":
            assert status == 200, (status, answer[:200])
        else:
            error = assert_typed_error(status, rtype, answer, case)
            assert error["code"] in ("unknown_scenario", "not_found", "bad_request"), error

    barrage()
    print(f"\nother write endpoints: {sum(statuses.values())} requests; {dict(statuses)}")
    assert d.proc is not None and d.proc.poll() is None
    assert d.get("/healthz")[0] == 200
    counts_after = stored_counts(d)
    sent = sum(n for (path, status), n in statuses.items() if path == "/ui/command" and status == 303)
    assert sum(counts_after.values()) == sum(counts_before.values()) + sent, (counts_before, counts_after, sent)
    for command_id, rec in before.items():
        assert d.command(command_id) == rec, command_id
    assert not [e for e in d.log_lines() if e.get("event") == "request_crashed"]
