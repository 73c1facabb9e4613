"""Who a natural-language command is from: with access control on, the authenticated principal, whatever the body
says; a body ``user`` naming anyone else is refused, so it can neither record a command under another name nor
spend (or dodge) anyone's per-user allowance. Where nothing is verified (access control off, MQTT) a body ``user``
is the sender's label, and its allowance is keyed by the sender too, never shared with a verified user."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import Daemon, wait_until
from tests.mqtt_broker import GW, Broker, daemon_env, publish
from tests.webauth import auth_env, bearer, raw

NO_KEYS = {"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""}  # the local rules answer; no provider is called
TWO_A_MINUTE = {"GATEWAYD_INTERPRET__USER_BURST": "2", "GATEWAYD_INTERPRET__USER_RATE_PER_MINUTE": "0.1"}
RELAY_ON = {"text": "turn on relay 1"}  # understood by the local rules


def _post(d: Daemon, body: dict[str, Any], who: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json", "Accept": "application/json", **bearer(who)}
    status, answer_headers, _, data = raw("POST", f"{d.url}/api/v1/commands", headers, json.dumps(body).encode())
    return status, json.loads(data), answer_headers


def _stored(d: Daemon) -> list[dict[str, Any]]:
    headers = {"Accept": "application/json", **bearer("ada")}
    status, _, _, data = raw("GET", f"{d.url}/api/v1/commands?limit=100", headers)
    assert status == 200
    return list(json.loads(data)["commands"])


def test_with_access_control_the_user_is_the_principal_whatever_the_body_says(make_daemon: Any) -> None:
    d: Daemon = make_daemon({**auth_env(anonymous_read=False), **NO_KEYS, **TWO_A_MINUTE})
    d.start()
    status, rec, headers = _post(d, RELAY_ON, "otto")
    assert status == 202 and rec["user"] == "otto" and rec["source"] == "http", rec
    assert headers["X-RateLimit-Remaining"] == "1"

    # Another name in the body: refused, nothing stored, nobody's allowance spent.
    for spoof in ("bob", "ada", " ada "):
        status, err, _ = _post(d, {**RELAY_ON, "user": spoof}, "otto")
        assert status == 422 and err["error"]["code"] == "validation_failed", err
        assert err["error"]["details"]["errors"][0]["field"] == "user"
    # A structured command cannot carry a user at all.
    status, err, _ = _post(d, {"device": "relay1", "action": "on", "user": "bob"}, "otto")
    assert status == 422 and err["error"]["code"] == "validation_failed"
    assert [r["user"] for r in _stored(d)] == ["otto"]

    # Naming oneself is allowed (gatewayd say --user otto), and counts against one's own allowance.
    status, rec, headers = _post(d, {**RELAY_ON, "user": "otto"}, "otto")
    assert status == 202 and rec["user"] == "otto" and headers["X-RateLimit-Remaining"] == "0"
    status, err, _ = _post(d, RELAY_ON, "otto")
    assert status == 429 and err["error"]["code"] == "rate_limited"  # and no other name gets round it
    status, err, _ = _post(d, {**RELAY_ON, "user": "someone-else"}, "otto")
    assert status == 422

    # Ada's allowance is whole: nothing otto sent was counted against her.
    status, rec, headers = _post(d, RELAY_ON, "ada")
    assert status == 202 and rec["user"] == "ada" and headers["X-RateLimit-Remaining"] == "1"
    assert sorted(r["user"] for r in _stored(d)) == ["ada", "otto", "otto"]


def test_an_mqtt_label_never_spends_an_authenticated_users_allowance(broker: Broker, make_daemon: Any) -> None:
    broker.start()
    env = {**auth_env(anonymous_read=False), **NO_KEYS, **TWO_A_MINUTE}
    d: Daemon = make_daemon(daemon_env(broker, **env))
    d.start()

    def uplink_connected() -> bool:
        status, _, _, data = raw("GET", f"{d.url}/api/v1/stats", {"Accept": "application/json", **bearer("ada")})
        return status == 200 and bool((json.loads(data).get("uplink") or {}).get("connected"))

    wait_until(uplink_connected, what="the uplink to connect")
    # Whoever may publish on the cmd topic says these come from "otto": stored as said (the broker's ACL is the
    # access control there), and counted under this uplink's own key.
    for i in range(2):
        publish(broker, f"{GW}/cmd", json.dumps({**RELAY_ON, "id": f"mq-{i}", "user": "otto"}))

    def stored_both() -> bool:
        return {r["id"] for r in _stored(d)} >= {"mq-0", "mq-1"}

    wait_until(stored_both, what="both MQTT commands to be stored")
    assert {(r["user"], r["source"]) for r in _stored(d) if r["id"].startswith("mq-")} == {("otto", "mqtt")}
    # Otto's own allowance is untouched, whether or not he names himself: two more for him.
    status, rec, headers = _post(d, RELAY_ON, "otto")
    assert status == 202 and headers["X-RateLimit-Remaining"] == "1", rec
    status, rec, headers = _post(d, {**RELAY_ON, "user": "otto"}, "otto")
    assert status == 202 and headers["X-RateLimit-Remaining"] == "0", rec
