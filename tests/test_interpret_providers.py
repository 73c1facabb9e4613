"""The three wire formats, read without a network (pure parsing) and checked against the fakes (health, errors,
hostile bodies), and what counts as a local provider."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gatewayd.config.models import ProviderConfig
from gatewayd.interpret.chain import is_local_url
from gatewayd.interpret.errors import UnusableAnswer
from gatewayd.interpret.providers import (
    MAX_BODY_BYTES,
    AnthropicProvider,
    Completion,
    OllamaProvider,
    OpenAIProvider,
    Prompt,
    answer_of,
    build_provider,
)
from gatewayd.interpret.simulator import FakeProvider, Fault
from gatewayd.resilience import HttpStatusError, classify
from tests.interpret_kit import KEY, START_PUMP, registry

ARGS = {"device": "pump1", "action": "start", "params": {}}


def cfg(kind: str, url: str = "http://127.0.0.1:1", model: str = "fake-model") -> ProviderConfig:
    return ProviderConfig(type=kind, base_url=url, model=model)  # type: ignore[arg-type]


def prompt() -> Prompt:
    reg = registry()
    return Prompt(reg.prompt, "start pump1", reg.tools, 128)


def test_openai_tool_call_arguments_are_a_json_string() -> None:
    p = OpenAIProvider("o", cfg("openai"), KEY)
    data = {
        "model": "m",
        "choices": [
            {"message": {"tool_calls": [{"function": {"name": "run_command", "arguments": json.dumps(ARGS)}}]}}
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 7},
    }
    done = p.parse(data)
    assert answer_of(done).arguments == ARGS and (done.usage and done.usage.tokens_in) == 100
    data["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"device": '  # type: ignore[index]
    with pytest.raises(UnusableAnswer):
        p.parse(data)
    with pytest.raises(UnusableAnswer):
        p.parse({"choices": []})
    assert p.request_body(prompt())["tool_choice"] == "required" and p.headers()["Authorization"] == f"Bearer {KEY}"


def test_anthropic_tool_use_blocks_and_text() -> None:
    p = AnthropicProvider("a", cfg("anthropic"), KEY)
    data = {
        "type": "message",
        "content": [{"type": "text", "text": "ok"}, {"type": "tool_use", "name": "run_command", "input": ARGS}],
        "usage": {"input_tokens": 50, "output_tokens": 9},
    }
    done = p.parse(data)
    assert done.call is not None and done.call.arguments == ARGS and done.content == "ok"
    with pytest.raises(UnusableAnswer):
        p.parse({"type": "error", "error": {"type": "overloaded_error"}})
    body = p.request_body(prompt())
    assert body["tools"][0]["input_schema"]["required"] == ["device", "action", "params"]
    assert body["max_tokens"] == 128 and "pump1" in body["system"]


def test_ollama_native_arguments_are_an_object_and_text_json_is_accepted() -> None:
    p = OllamaProvider("l", cfg("ollama"), None)
    data = {"message": {"tool_calls": [{"function": {"name": "run_command", "arguments": ARGS}}]}, "eval_count": 3}
    done = p.parse(data)
    assert done.call is not None and done.call.arguments == ARGS and done.usage is not None
    assert "Authorization" not in p.headers()
    # A small local model that answers with the JSON in its text instead of a tool call.
    text_only = p.parse({"message": {"content": "```json\n" + json.dumps(ARGS) + "\n```"}})
    assert answer_of(text_only).arguments == ARGS
    assert p.request_body(prompt())["stream"] is False


@pytest.mark.parametrize(
    "completion",
    [
        Completion(None, "Sure, done!", None, "m"),
        Completion(None, '{"answer": 42}', None, "m"),
        Completion(None, None, None, "m"),
    ],
)
def test_prose_or_other_json_is_unusable(completion: Completion) -> None:
    with pytest.raises(UnusableAnswer):
        answer_of(completion)


def test_declining_is_an_answer_not_a_failure() -> None:
    from gatewayd.interpret.providers import ToolCall

    answer = answer_of(Completion(ToolCall("not_understood", {"reason": "no device makes coffee"}), None, None, "m"))
    assert answer.kind == "declined" and answer.reason == "no device makes coffee"
    with pytest.raises(UnusableAnswer):
        answer_of(Completion(ToolCall("rm_rf", {}), None, None, "m"))


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
async def test_health_checks_list_models_and_spend_no_tokens(kind: str) -> None:
    async with FakeProvider(kind, api_key=KEY, default=START_PUMP) as fake, aiohttp.ClientSession() as session:
        good = build_provider("p", cfg(kind, fake.base_url), KEY)
        assert await good.check(session, aiohttp.ClientTimeout(total=2)) == {"models": 1, "model_listed": True}
        other = build_provider("p", cfg(kind, fake.base_url, model="not-there"), KEY)
        assert (await other.check(session, aiohttp.ClientTimeout(total=2)))["model_listed"] is False
        with pytest.raises(HttpStatusError) as caught:
            await build_provider("p", cfg(kind, fake.base_url), "sk-wrong").check(
                session, aiohttp.ClientTimeout(total=2)
            )
    assert caught.value.http_status == 401 and not classify(caught.value).transient
    assert fake.completions() == []


async def test_an_unknown_model_is_a_permanent_404() -> None:
    async with FakeProvider("ollama", default=START_PUMP) as fake, aiohttp.ClientSession() as session:
        p = build_provider("p", cfg("ollama", fake.base_url, model="nope"), None)
        with pytest.raises(HttpStatusError) as caught:
            await p.complete(session, prompt(), aiohttp.ClientTimeout(total=2))
    assert caught.value.http_status == 404 and "try pulling it" in caught.value.message


async def test_a_fake_that_stays_broken_answers_every_request_with_its_fault_until_mended() -> None:
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as fake, aiohttp.ClientSession() as session:
        p = build_provider("p", cfg("openai", fake.base_url), KEY)
        limits = aiohttp.ClientTimeout(total=2)
        fake.always = Fault.http(503)
        fake.script(Fault.http(429, retry_after="1"))  # a scripted fault still comes first
        statuses = []
        for _ in range(4):
            with pytest.raises(HttpStatusError) as caught:
                await p.complete(session, prompt(), limits)
            statuses.append(caught.value.http_status)
        assert statuses == [429, 503, 503, 503]
        fake.always = None
        mended = await p.complete(session, prompt(), limits)
    assert mended.call is not None and mended.call.arguments == START_PUMP
    assert len(fake.completions()) == 5


async def test_an_endless_answer_is_cut_off() -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        chunk = b" " * 65536
        for _ in range(MAX_BODY_BYTES // len(chunk) + 4):
            await resp.write(chunk)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", huge)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        p = build_provider("p", cfg("openai", str(server.make_url("/v1"))), KEY)
        with pytest.raises(UnusableAnswer) as caught:
            await p.complete(session, prompt(), aiohttp.ClientTimeout(total=5))
    assert "larger than" in caught.value.message


def test_the_key_never_shows_in_a_providers_repr() -> None:
    p = build_provider("p", cfg("openai"), "sk-secret-value-123")
    assert "sk-secret" not in repr(p) and "sk-secret" not in str(p)


@pytest.mark.parametrize(
    "url, local",
    [
        ("http://127.0.0.1:11434", True),
        ("http://localhost:8000/v1", True),
        ("http://[::1]:8000", True),
        ("http://192.168.1.20:11434", True),
        ("http://10.0.0.5/v1", True),
        ("http://ollama.local:11434", True),
        ("https://api.openai.com/v1", False),
        ("https://api.anthropic.com", False),
        ("http://8.8.8.8", False),
    ],
)
def test_local_and_cloud_urls(url: str, local: bool) -> None:
    assert is_local_url(url) is local


def test_provider_config_refuses_what_it_cannot_use() -> None:
    from pydantic import ValidationError

    good: dict[str, Any] = {"type": "openai", "base_url": "https://api.openai.com/v1", "model": "m"}
    ProviderConfig(**good)
    for bad in (
        {"type": "gemini"},
        {"base_url": "ftp://x"},
        {"base_url": "https://host with space"},
        {"api_key_env": "sk-abc-not-a-name!"},
        {"price_in_per_mtok": -1},
        {"rpm": 0},
        {"api_key": "sk-123"},  # a key in the file: unknown key, refused
    ):
        with pytest.raises(ValidationError):
            ProviderConfig(**{**good, **bad})


def test_credentials_in_a_base_url_are_not_shown() -> None:
    from gatewayd.interpret.chain import _without_userinfo

    assert _without_userinfo("https://bob:s3cret@proxy.example:8443/v1") == "https://***@proxy.example:8443/v1"
    assert _without_userinfo("http://127.0.0.1:11434") == "http://127.0.0.1:11434"
