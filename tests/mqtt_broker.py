"""A real Mosquitto broker for tests, on a free loopback port, and a subscriber that records what it receives.

The broker keeps its state in a file (persistence on), so a broker stopped with SIGTERM and started again still
has the persistent sessions and their queued QoS 1 messages, as a production broker would; ``kill9`` loses what
it had not saved, as a crash does.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.conftest import free_port
from tests.conftest import wait_until as wait_until  # the tests import it from here too


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if found is None:
        raise RuntimeError("mosquitto is not installed: ./scripts/test installs it (apt-get install mosquitto)")
    return found


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=gatewayd test CA",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="ascii")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=gatewayd-gw-dev")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr")
        extra = ["-extfile", "san.ext"] if name == "server" else []
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.pem", *extra)  # fmt: skip
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills it when the thread that started it dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Broker:
    def __init__(self, directory: Path, tls: bool = False, die_with_parent: bool = False):
        """``die_with_parent``: the broker is killed if its starter is (bench/soak.py killed by a timeout); start
        it from a thread that lives as long as it should, e.g. the main thread."""
        self.dir = directory
        self.die_with_parent = die_with_parent
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.certs = make_certificates(self.dir / "certs") if tls else {}
        tls_conf = (
            f"cafile {self.certs['ca.pem']}\ncertfile {self.certs['server.pem']}\nkeyfile {self.certs['server.key']}\n"
            "require_certificate true\n"
            if tls
            else ""
        )
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{tls_conf}"
            # Started as root, mosquitto would switch to its own user and could not write in a test's directory.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.dir}/mosquitto.log\n",
            encoding="utf-8",
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited with {self.proc.returncode}") from None
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the TCP connection stays open, nothing is acknowledged (a link that silently stopped)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class Subscriber:
    """A persistent-session paho client that records every message on ``topic`` (QoS 1)."""

    def __init__(self, broker: Broker, topic: str, client_id: str = "test-subscriber"):
        self.broker = broker
        self.topic = topic
        self.messages: list[tuple[str, bytes, bool]] = []  # topic, payload, retained
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.5)
        if broker.certs:
            self.client.tls_set(
                ca_certs=str(broker.certs["ca.pem"]),
                certfile=str(broker.certs["client.pem"]),
                keyfile=str(broker.certs["client.key"]),
            )

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def __enter__(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.broker.port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscription not confirmed")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def json(self, suffix: str = "") -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _ in self.snapshot() if t.endswith(suffix) and p.startswith(b"{")]

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[tuple[str, bytes, bool]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.snapshot()
            if predicate(messages):
                return messages
            time.sleep(0.05)
        raise AssertionError(f"timed out; {len(self.snapshot())} messages: {self.snapshot()[-5:]}")


def publish(
    broker: Broker,
    topic: str,
    payload: bytes | str,
    qos: int = 1,
    client_id: str = "test-publisher",
    retain: bool = False,
) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect("127.0.0.1", broker.port, keepalive=5)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()


GW = "gatewayd/gw-dev"  # the bundled config's topic prefix


def daemon_env(broker: Broker, **extra: str) -> dict[str, str]:
    """The daemon pointed at ``broker`` with timers shrunk so that outages are noticed and healed in a test's time."""
    return {
        "GATEWAYD_MQTT__PORT": str(broker.port),
        "GATEWAYD_MQTT__RECONNECT_BASE_S": "0.05",
        "GATEWAYD_MQTT__RECONNECT_CAP_S": "0.3",
        "GATEWAYD_MQTT__PUBACK_TIMEOUT_S": "1",
        "GATEWAYD_MQTT__DRAIN_MESSAGES_PER_S": "0",
        "GATEWAYD_MQTT__KEEPALIVE_S": "5",
        **extra,
    }


def results_by_id(sub: Subscriber) -> dict[str, list[dict[str, Any]]]:
    """Every ``result/<id>`` message the subscriber received, by command id, duplicates kept."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for topic, payload, _ in sub.snapshot():
        if topic.startswith(f"{GW}/result/"):
            out[topic.rsplit("/", 1)[1]].append(json.loads(payload))
    return out
