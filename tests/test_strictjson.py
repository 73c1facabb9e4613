"""Strict JSON at every ingress: NaN, Infinity, 1e999 and unpaired surrogates are refused where the bytes are
parsed (HTTP bodies and MQTT payloads, serial frames, provider answers), and what leaves the daemon is always JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd import strictjson
from gatewayd.commands.validate import decode_json
from gatewayd.devices.framing import MALFORMED, Frame, Kind, crc16
from gatewayd.errors import BadRequest, ProtocolError
from gatewayd.interpret.errors import UnusableAnswer
from gatewayd.interpret.providers import _arguments
from gatewayd.telemetry.recorder import shape_values
from tests.faults.bad_input import not_strict_json

values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),  # NaN and the infinities included
        st.text(alphabet=st.characters(exclude_categories=[]), max_size=8) | st.sampled_from(["\ud800", "a\udfffb"]),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)


@given(values)
def test_loads_refuses_exactly_what_json_does_not_allow(value: Any) -> None:
    text = json.dumps(value)  # Python writes NaN, Infinity and \ud800 escapes
    if not_strict_json(value):
        with pytest.raises(strictjson.NotStrictJson):
            strictjson.loads(text)
        with pytest.raises(BadRequest) as err:
            decode_json(text.encode(), "the command")
        assert err.value.details.get("reason") == "not_strict_json"
    else:
        assert strictjson.loads(text) == value


@given(values)
def test_dumps_always_writes_strict_json(value: Any) -> None:
    text = strictjson.dumps(value)
    strictjson.loads(text.encode())
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"percent": NaN}',
        b'{"percent": Infinity}',
        b'{"percent": -Infinity}',
        b'{"percent": 1e999}',
        b'{"percent": -1E400}',
        b'{"device": "\\ud800"}',
        b'{"\\udfff": 1}',
    ],
)
def test_each_form_is_a_typed_bad_request(raw: bytes) -> None:
    with pytest.raises(BadRequest) as err:
        decode_json(raw, "the request body")
    assert err.value.code == "bad_request" and "not valid JSON" in err.value.message


def test_a_surrogate_pair_and_big_integers_are_fine() -> None:
    assert strictjson.loads(b'{"a": "\\ud83d\\ude00", "n": 1' + b"0" * 400 + b"}")["a"] == "\U0001f600"


def _line(payload: bytes) -> bytes:
    body = b"0101T" + payload
    return b":" + body + f"*{crc16(body):04X}".encode()


@pytest.mark.parametrize("payload", [b'{"t":NaN}', b'{"t":Infinity}', b'{"t":1e999}', b'{"t":"\\udc00"}'])
def test_a_serial_frame_with_a_non_finite_number_is_malformed(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        Frame.from_line(_line(payload))
    assert err.value.details.get("reason") == MALFORMED
    assert Frame.from_line(_line(b'{"t":20.5}')).kind is Kind.TELEMETRY


@pytest.mark.parametrize("arguments", ['{"device":"pump1","params":{"percent":NaN}}', '{"x":Infinity}'])
def test_a_provider_answer_with_a_non_finite_number_is_unusable(arguments: str) -> None:
    with pytest.raises(UnusableAnswer):
        _arguments(arguments)


def test_a_device_reading_that_is_not_finite_is_flagged_not_fatal() -> None:
    values_, flagged = shape_values({"t": math.nan, "h": 40.0}, {})
    assert values_ == {"t": None, "h": 40.0} and flagged == ["t"]
    assert strictjson.dumps({"result": {"t": math.inf}}) == '{"result":{"t":"inf"}}'


@pytest.mark.parametrize("kind", [str, bytes])
def test_max_depth_counts_nesting_not_brackets(kind: type) -> None:
    deep = "[" * 70 + "]" * 70
    with pytest.raises(strictjson.TooDeep):
        strictjson.loads(deep if kind is str else deep.encode(), max_depth=64)
    shallow = '{"a": [1, {"b": 2}], "text": "' + "[{" * 40 + '"}'  # brackets in a string are no nesting
    assert strictjson.loads(shallow if kind is str else shallow.encode(), max_depth=3)["a"] == [1, {"b": 2}]
    with pytest.raises(strictjson.TooDeep):
        strictjson.loads('{"a": [1, {"b": [2]}]}', max_depth=3)
