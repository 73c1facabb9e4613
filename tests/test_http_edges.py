"""The HTTP edges a hostile or sloppy client finds, tested in-process and fast: what the command envelope refuses
instead of coercing (true as 1 second, "yes" as confirmation, an id trimmed of its newline), and the server's own
limits on a real socket (a deadline for request headers, a cap on connections, a declared body over the limit
refused before it is read). tests/faults/test_http_edges.py drives the real daemon the same way, at volume."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gatewayd.commands.validate import parse_request
from gatewayd.errors import ValidationFailed
from gatewayd.interpret.service import parse_text_request

COMMAND = {"device": "pump1", "action": "read"}


def refused_fields(parse: Any, payload: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as caught:
        parse(payload)
    return {e["field"]: e["message"] for e in caught.value.details["errors"]}


@pytest.mark.parametrize(
    ("value", "quoted"), [(True, "true"), (False, "false"), ("5", '"5"'), ("1e3", '"1e3"'), ([5], "[5]")]
)
def test_ttl_s_must_be_a_json_number_not_a_boolean_or_a_string(value: Any, quoted: str) -> None:
    errors = refused_fields(parse_request, {**COMMAND, "ttl_s": value})
    assert errors == {"ttl_s": f"must be a number of seconds, not {quoted}"}
    assert [parse_request({**COMMAND, "ttl_s": n}).ttl_s for n in (5, 0.25)] == [5.0, 0.25]  # numbers still are


@pytest.mark.parametrize("value", ["yes", "true", "on", 1, 0, None])
def test_confirm_must_be_the_literal_true_or_false(value: Any) -> None:
    errors = refused_fields(parse_request, {**COMMAND, "confirm": value})
    assert list(errors) == ["confirm"] and errors["confirm"].startswith("must be true or false, not ")
    assert [parse_request({**COMMAND, "confirm": b}).confirm for b in (True, False)] == [True, False]


@pytest.mark.parametrize("value", ["nl\n", " nl", "nl ", "\tnl", "nl\r\n", "n l"])
def test_an_id_is_taken_exactly_as_sent_or_refused(value: Any) -> None:
    errors = refused_fields(parse_request, {**COMMAND, "id": value})
    assert list(errors) == ["id"] and "exactly as sent" in errors["id"]
    assert parse_request({**COMMAND, "id": "a.b_c:d-1"}).id == "a.b_c:d-1"


@pytest.mark.parametrize("field", ["device", "action"])
@pytest.mark.parametrize("value", ["pump1 ", " pump1", "pump1\n", "\u00a0pump1", 1])
def test_a_name_is_a_string_without_whitespace_around_it(field: str, value: Any) -> None:
    errors = refused_fields(parse_request, {**COMMAND, field: value})
    if value == 1:
        assert errors == {field: "must be a string, not 1"}
    else:
        assert errors == {field: f"must not begin or end with whitespace, got {json.dumps(value)}"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"id": "nl\n"}, "id"),
        ({"confirm": "yes"}, "confirm"),
        ({"confirm": 1}, "confirm"),
        ({"ttl_s": True}, "ttl_s"),
        ({"ttl_s": "5"}, "ttl_s"),
    ],
)
def test_natural_language_requests_follow_the_same_rules(extra: dict[str, Any], field: str) -> None:
    errors = refused_fields(lambda p: parse_text_request(p, 500), {"text": "read the pump", **extra})
    assert list(errors) == [field], errors
    # The words and the user's name are still trimmed: prose, and a rate-limit key.
    request = parse_text_request({"text": " read the pump\n", "user": " alice ", "id": "nl", "confirm": True}, 500)
    assert (request.text, request.user, request.id, request.confirm) == ("read the pump", "alice", "nl", True)
