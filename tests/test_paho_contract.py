"""The parts of aiomqtt and paho-mqtt that gatewayd uses beneath aiomqtt's public API (gatewayd/uplink/paho.py):
present in the installed versions, and refused with a clear error where they are not."""

from __future__ import annotations

import re
from importlib.metadata import version

import aiomqtt
import pytest

from gatewayd.uplink import paho


async def test_the_installed_versions_are_the_pinned_majors_and_have_what_the_uplink_uses() -> None:
    assert version("aiomqtt").split(".")[0] == "2" and version("paho-mqtt").split(".")[0] == "2"
    client = aiomqtt.Client("localhost")
    paho.check(client)
    paho.manual_acks(client)
    closed = paho.watch_close(client)
    client._client.on_disconnect(client._client, None, None, 7, None)  # as paho calls it: before the CONNACK
    assert closed == ["7"]


async def test_a_library_without_those_parts_is_refused_at_start_with_the_versions_to_install() -> None:
    class Bare:
        _client = object()

    with pytest.raises(paho.UnsupportedMqttLibrary, match=re.escape("aiomqtt>=2.5,<3")):
        paho.check(Bare())  # type: ignore[arg-type]
