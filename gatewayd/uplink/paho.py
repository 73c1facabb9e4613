"""Every place gatewayd reaches under aiomqtt's public API, in one module, checked at start and by a test.

aiomqtt (2.x) runs paho-mqtt (2.x) underneath and exposes neither of two things the uplink needs:

- manual acknowledgements (paho's ``manual_ack_set`` and ``ack``): a command is PUBACKed only after it is committed,
  so the broker redelivers it if we die first;
- the close of a connection before the broker's CONNACK (a TLS alert for a missing client certificate): aiomqtt
  ignores paho's ``on_disconnect`` until connected and waits out its whole timeout instead.

Both go through the paho client aiomqtt keeps as ``Client._client``. pyproject.toml pins ``aiomqtt<3`` (3.0 drops
paho) and ``paho-mqtt<3``; :func:`check` fails at start-up with a clear error if an installed version no longer has
what this module uses, and tests/test_paho_contract.py fails on such a version before it is ever deployed.
"""

from __future__ import annotations

from typing import Any

import aiomqtt

from gatewayd.errors import PermanentError


class UnsupportedMqttLibrary(PermanentError):
    code = "mqtt_library_unsupported"


def _paho(client: aiomqtt.Client) -> Any:
    return client._client


def check(client: aiomqtt.Client | None = None) -> None:
    """Raise :class:`UnsupportedMqttLibrary` unless the installed aiomqtt (``client``, or a fresh unconnected one)
    has the private parts this module relies on."""
    client = aiomqtt.Client("localhost") if client is None else client
    paho = getattr(client, "_client", None)
    missing = [name for name in ("manual_ack_set", "ack", "on_disconnect") if not hasattr(paho, name)]
    if not hasattr(client, "_connected"):
        missing.append("aiomqtt.Client._connected")
    if missing:
        raise UnsupportedMqttLibrary(
            f"this aiomqtt/paho-mqtt lacks {', '.join(missing)}: install the versions pyproject.toml pins "
            "(aiomqtt>=2.5,<3, paho-mqtt>=2.0,<3)"
        )


def manual_acks(client: aiomqtt.Client) -> None:
    """From now on a QoS 1/2 message is acknowledged only by :func:`ack`."""
    _paho(client).manual_ack_set(True)


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Acknowledge one received message (nothing to do for QoS 0)."""
    if message.qos > 0:
        _paho(client).ack(message.mid, message.qos)


def watch_close(client: aiomqtt.Client) -> list[str]:
    """A list that gets the reason when the connection closes before the broker accepted it. paho reports such a
    close (a TLS handshake alert for a missing client certificate, a proxy that hangs up) only through
    ``on_disconnect``, which aiomqtt ignores before CONNACK and then waits out its whole timeout."""
    closed: list[str] = []
    paho = _paho(client)
    forward = paho.on_disconnect

    def on_disconnect(*args: Any, **kwargs: Any) -> None:
        if not client._connected.done():
            reason = args[3] if len(args) > 3 else kwargs.get("reason_code", "closed")
            closed.append(str(reason))
        if forward is not None:
            forward(*args, **kwargs)

    paho.on_disconnect = on_disconnect
    return closed
