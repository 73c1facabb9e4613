"""The failover chain against fake providers that are real HTTP servers on loopback, fault by fault: what is
retried and how often, what fails over at once, that the deadline holds, and that the local rules end the chain.

Retry pauses run on a FakeClock where a test checks the schedule (a 2 s Retry-After passes in microseconds);
tests about the deadline run on real time with sub-second timeouts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, MutableMapping
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from gatewayd.interpret.errors import NotUnderstood
from gatewayd.interpret.simulator import FakeProvider, Fault
from gatewayd.resilience import FakeClock
from tests.conftest import free_port
from tests.interpret_kit import KEY, START_PUMP, Rig, provider, settings, tried


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(wrapper_class=wrapper)


def refused_url(kind: str = "openai") -> str:
    """A port with nothing listening: every connection is refused."""
    root = f"http://127.0.0.1:{free_port()}"
    return f"{root}/v1" if kind == "openai" else root


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
async def test_each_wire_format_gives_a_validated_command_and_its_cost(tmp_path: Path, kind: str) -> None:
    async with FakeProvider(kind, api_key=KEY, default=START_PUMP) as fake:
        cfg = settings({"p": provider(fake, price_in_per_mtok=2.0, price_out_per_mtok=8.0)})
        async with Rig(tmp_path / "db", cfg) as rig:
            out = await rig.ask("switch the irrigation pump on")
    assert (out.command.device, out.command.action, out.command.params) == ("pump1", "start", {})
    assert (out.provider, out.model, out.attempts, out.cached, out.degraded) == ("p", "fake-model", 1, False, False)
    assert (out.tokens_in, out.tokens_out) == (fake.tokens_in, fake.tokens_out)
    assert out.cost == pytest.approx((fake.tokens_in * 2.0 + fake.tokens_out * 8.0) / 1e6)
    [seen] = fake.completions()
    if kind == "anthropic":
        assert seen.headers["x-api-key"] == KEY and seen.headers["anthropic-version"] == "2023-06-01"
        assert [t["name"] for t in seen.body["tools"]] == ["run_command", "not_understood"]
        assert seen.body["tool_choice"] == {"type": "any"}
        assert "pump1" in seen.body["system"]
    else:
        assert seen.headers["Authorization"] == f"Bearer {KEY}"
        assert [t["function"]["name"] for t in seen.body["tools"]] == ["run_command", "not_understood"]
        assert seen.body["messages"][0]["role"] == "system" and "pump1" in seen.body["messages"][0]["content"]
    schema = seen.body["tools"][0].get("input_schema") or seen.body["tools"][0]["function"]["parameters"]
    assert schema["properties"]["device"]["enum"] == ["fan2", "pump1", "relay1"]


@pytest.mark.parametrize(
    "headers, hint",
    [
        ({"retry_after": "2"}, 2.0),
        ({"retry_after_ms": "1500"}, 1.5),
        ({"retry_after": "http-date"}, 3.0),
    ],
    ids=["seconds", "milliseconds", "http-date"],
)
async def test_429_retry_after_is_honoured_then_the_same_provider_answers(
    tmp_path: Path, headers: dict[str, str], hint: float
) -> None:
    sent_at = time.time()
    if headers.get("retry_after") == "http-date":
        headers = {"retry_after": formatdate(sent_at + 3.5, usegmt=True)}
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(Fault.http(429, **headers))
        cfg = settings({"a": provider(a, priority=1), "b": provider(b, priority=2)}, deadline_s=10.0)
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            out = await rig.ask("start pump1")
            rpm_rate = rig.slot("a").rpm.rate
    assert out.provider == "a" and tried(out) == [("a", "answered", 2)]
    assert len(a.completions()) == 2 and b.completions() == []
    [pause] = clock.sleeps
    if hint == 3.0:
        # A date has whole seconds, and is read against the wall clock some time after it was written (a loaded
        # machine takes a while to start two fake providers): from (3.5 - 1 - that time) to 3.5.
        taken = time.time() - sent_at
        assert 3.5 - 1.0 - taken <= pause <= 3.5
    else:
        assert pause == pytest.approx(hint, abs=1e-6)
    assert rpm_rate < 1.0  # the 429 cut the provider's request rate (60 rpm = 1/s)


async def test_a_retry_after_longer_than_the_cap_fails_over_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(Fault.http(429, retry_after="60"))
        cfg = settings({"a": provider(a, priority=1), "b": provider(b, priority=2)}, max_hint_s=10)
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            out = await rig.ask("start pump1")
    assert tried(out) == [("a", "failed", 1), ("b", "answered", 1)]
    assert out.tried[0]["http_status"] == 429 and clock.sleeps == []
    assert out.provider == "b" and out.attempts == 2


@pytest.mark.parametrize("status", [408, 409, 500, 503, 529])
async def test_transient_statuses_use_every_attempt_then_fail_over(tmp_path: Path, status: int) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("ollama", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(*[Fault.http(status)] * 3)
        cfg = settings({"a": provider(a, priority=1), "b": provider(b, priority=2)})
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            out = await rig.ask("start pump1")
    assert tried(out) == [("a", "failed", 3), ("b", "answered", 1)]
    assert len(a.completions()) == 3 and len(b.completions()) == 1
    assert out.tried[0]["error"] == "upstream_http_error" and out.tried[0]["http_status"] == status
    assert len(clock.sleeps) == 2 and all(0 <= s <= 0.05 for s in clock.sleeps)  # full jitter under the cap
    assert out.attempts == 4 and out.provider == "b"


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_permanent_errors_fail_over_at_once_and_are_reported(
    tmp_path: Path, status: int, logs: list[MutableMapping[str, Any]]
) -> None:
    async with (
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(Fault.http(status))
        cfg = settings({"a": provider(a, priority=1), "b": provider(b, priority=2)})
        async with Rig(tmp_path / "db", cfg) as rig:
            out = await rig.ask("start pump1")
    assert tried(out) == [("a", "failed", 1), ("b", "answered", 1)]
    assert out.tried[0]["http_status"] == status and f"HTTP {status}" in out.tried[0]["message"]
    [line] = [e for e in logs if e["event"] == "provider_failed"]
    assert line["provider"] == "a" and line["http_status"] == status and line["attempts"] == 1


async def test_a_wrong_key_is_a_401_from_the_real_check_and_fails_over(tmp_path: Path) -> None:
    async with (
        FakeProvider("openai", api_key="sk-other", default=START_PUMP) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        cfg = settings({"a": provider(a, priority=1), "b": provider(b, priority=2)})
        async with Rig(tmp_path / "db", cfg) as rig:
            out = await rig.ask("start pump1")
    assert tried(out) == [("a", "failed", 1), ("b", "answered", 1)] and out.tried[0]["http_status"] == 401


@pytest.mark.parametrize("fault", [Fault.malformed(), Fault.unknown_device(), Fault.prose()], ids=lambda f: f.kind)
async def test_an_unusable_answer_is_a_failure_that_fails_over_at_once(tmp_path: Path, fault: Fault) -> None:
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(fault)
        cfg = settings({"a": provider(a, priority=1), "b": provider(b, priority=2)})
        async with Rig(tmp_path / "db", cfg) as rig:
            out = await rig.ask("start pump1")
            window = rig.slot("a").breaker._window.totals(0.0)
    assert tried(out) == [("a", "failed", 1), ("b", "answered", 1)]
    assert out.tried[0]["error"] == "unusable_answer"
    assert window == (1, 1)  # one call, one failure on a's breaker
    if fault.kind == "unknown_device":
        assert "no_such_device" in out.tried[0]["message"]


async def test_a_reset_mid_body_is_retried_on_the_same_provider(tmp_path: Path) -> None:
    async with FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as a:
        a.script(Fault.reset())
        async with Rig(tmp_path / "db", settings({"a": provider(a)})) as rig:
            out = await rig.ask("start pump1")
    assert tried(out) == [("a", "answered", 2)] and len(a.completions()) == 2
    # The cut-off answer reported no usage we could read: only the second is billed.
    assert out.tokens_in == a.tokens_in and out.tokens_out == a.tokens_out


async def test_connection_refused_is_retried_then_fails_over(tmp_path: Path) -> None:
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as b:
        cfg = settings({"a": provider(refused_url(), priority=1), "b": provider(b, priority=2)})
        async with Rig(tmp_path / "db", cfg) as rig:
            started = time.monotonic()
            out = await rig.ask("start pump1")
            elapsed = time.monotonic() - started
    assert tried(out) == [("a", "failed", 3), ("b", "answered", 1)]
    assert out.tried[0]["error"] == "ClientConnectorError"
    assert elapsed < 1.0  # three refusals and two jittered pauses of at most 50 ms


async def test_a_hang_past_the_timeout_is_retried_within_the_deadline_then_fails_over(tmp_path: Path) -> None:
    async with (
        FakeProvider("ollama", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(*[Fault.hang(10)] * 3)
        cfg = settings(
            {"a": provider(a, priority=1, timeout_s=0.2), "b": provider(b, priority=2)},
            retry={"max_attempts": 2},
            deadline_s=3.0,
        )
        async with Rig(tmp_path / "db", cfg) as rig:
            started = time.monotonic()
            out = await rig.ask("start pump1")
            elapsed = time.monotonic() - started
    assert tried(out) == [("a", "failed", 2), ("b", "answered", 1)]
    assert out.tried[0]["error"] == "TimeoutError"
    assert 0.4 <= elapsed < 1.2  # two timeouts of 0.2 s, then b


async def test_the_deadline_holds_when_every_provider_hangs_and_the_local_rules_answer(tmp_path: Path) -> None:
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(*[Fault.hang(10)] * 5)
        b.script(*[Fault.hang(10)] * 5)
        cfg = settings(
            {"a": provider(a, timeout_s=5.0, priority=1), "b": provider(b, timeout_s=5.0, priority=2)},
            deadline_s=1.0,
            local_reserve_s=0.2,
        )
        async with Rig(tmp_path / "db", cfg) as rig:
            started = time.monotonic()
            out = await rig.ask("switch pump 1 on")
            elapsed = time.monotonic() - started
            breaker_calls = rig.slot("a").breaker._window.totals(0.0)
    assert elapsed < 1.0, elapsed  # the whole request, local rules included, inside deadline_s
    assert out.degraded and out.provider == "local" and out.command.action == "start"
    # a's one attempt was cut short by the request's deadline (0.8 s, not its own 5 s): not the provider's fault.
    assert tried(out)[0] == ("a", "failed", 1) and breaker_calls == (0, 0)
    assert tried(out)[1:] == [("b", "skipped", 0)] and out.tried[1]["reason"] == "deadline"


async def test_when_every_provider_fails_each_way_the_local_rules_answer_degraded(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as b,
        FakeProvider("ollama", api_key=KEY, default=START_PUMP) as c,
    ):
        a.script(*[Fault.http(503)] * 3)
        b.script(Fault.unknown_device())
        c.script(Fault.http(401))
        cfg = settings(
            {
                "a": provider(a, priority=1),
                "b": provider(b, priority=2, price_in_per_mtok=1.0),
                "c": provider(c, priority=3),
                "d": provider(refused_url(), priority=4, cloud=False),
            }
        )
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            out = await rig.ask("set the pump 1 speed to 40 percent")
    assert tried(out) == [("a", "failed", 3), ("b", "failed", 1), ("c", "failed", 1), ("d", "failed", 3)]
    assert out.degraded and (out.provider, out.model) == ("local", "rules")
    assert (out.command.device, out.command.action, out.command.params) == (
        "pump1",
        "set_speed",
        {"percent": 40, "ramp_s": 0},
    )
    assert out.attempts == 8
    assert out.cost > 0  # b's unusable answer was still billed


async def test_no_provider_and_no_rule_is_not_understood_with_what_the_rules_can_do(tmp_path: Path) -> None:
    async with FakeProvider("openai", api_key=KEY, answers={"make me a coffee": None}) as a:
        async with Rig(tmp_path / "db", settings({"a": provider(a)})) as rig:
            with pytest.raises(NotUnderstood) as caught:
                await rig.ask("make me a coffee")
    err = caught.value
    assert err.status == 422 and err.code == "not_understood"
    can_do = {(c["device"], c["action"]) for c in err.details["can_do"]}
    assert ("pump1", "set_speed") in can_do and ("fan2", "set") in can_do and ("relay1", "on") in can_do
    assert all(c["example"] for c in err.details["can_do"])
    # The model declined (called not_understood): no other provider is paid for the same answer.
    assert err.details["provider_reason"] and [p["outcome"] for p in err.details["providers"]] == ["declined"]
    assert "turn on" in err.message


async def test_a_model_that_declines_ends_the_cloud_chain(tmp_path: Path) -> None:
    async with (
        FakeProvider("openai", api_key=KEY, answers={"start pump1": None}) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        cfg = settings({"a": provider(a, priority=1), "b": provider(b, priority=2)})
        async with Rig(tmp_path / "db", cfg) as rig:
            out = await rig.ask("start pump1")
    assert tried(out) == [("a", "declined", 1)] and b.completions() == []
    assert out.degraded and out.command.action == "start"  # the local rules still understood it


async def test_inactive_providers_are_never_asked(tmp_path: Path) -> None:
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("openai", default=START_PUMP) as b,
    ):
        cfg = settings(
            {
                "nokey": provider(a, api_key_env="UNSET_KEY_VAR", priority=1),
                "off": provider(a, enabled=False, priority=1),
                "keyless": provider(b, api_key_env=None, priority=2),
            }
        )
        async with Rig(tmp_path / "db", cfg) as rig:
            out = await rig.ask("start pump1")
            reasons = {s.name: s.inactive for s in rig.slots}
    assert a.seen == [] and out.provider == "keyless" and tried(out) == [("keyless", "answered", 1)]
    assert reasons["off"] == "disabled" and "UNSET_KEY_VAR" in str(reasons["nokey"]) and reasons["keyless"] is None


async def test_equal_priorities_share_the_load_by_weight(tmp_path: Path) -> None:
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        cfg = settings({"a": provider(a, weight=3, rpm=10_000), "b": provider(b, weight=1, rpm=10_000)}, cache_ttl_s=0)
        async with Rig(tmp_path / "db", cfg, seed=7) as rig:
            firsts = [(await rig.ask("start pump1")).provider for _ in range(200)]
    share = firsts.count("a") / len(firsts)
    assert 0.65 <= share <= 0.85, share  # 3:1 is 75 %


async def test_balance_by_latency_prefers_the_faster_provider(tmp_path: Path) -> None:
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP, latency_s=0.08) as slow,
        FakeProvider("openai", api_key=KEY, default=START_PUMP, latency_s=0.0) as fast,
    ):
        cfg = settings({"slow": provider(slow), "fast": provider(fast)}, cache_ttl_s=0, balance="latency")
        async with Rig(tmp_path / "db", cfg) as rig:
            firsts = [(await rig.ask("start pump1")).provider for _ in range(8)]
    # Each is tried once while unmeasured; from then on the faster one goes first.
    assert sorted(firsts[:2]) == ["fast", "slow"] and firsts[2:] == ["fast"] * 6
