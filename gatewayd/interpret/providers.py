"""LLM providers behind one protocol: the OpenAI-compatible chat-completions API (OpenAI, and Ollama's ``/v1``,
vLLM and llama.cpp servers), the Anthropic Messages API, and Ollama's native API. aiohttp clients, no SDKs.

A provider makes exactly one HTTP request per call and never retries: the chain's retry policy decides what is
tried again. It raises what :func:`gatewayd.resilience.classify` reads: :class:`HttpStatusError` (status, headers
with ``Retry-After``) for an error answer, aiohttp's own errors for connections and bodies cut short,
``TimeoutError`` for a hang, and :class:`UnusableAnswer` for a 2xx body that is not the JSON it should be.
Building the request and reading the answer are pure functions, tested without a network.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp

from gatewayd import __version__, strictjson
from gatewayd.config.models import ProviderConfig
from gatewayd.interpret.errors import UnusableAnswer
from gatewayd.interpret.registry import DECLINE_TOOL, RUN_TOOL
from gatewayd.observability.logging import scrub
from gatewayd.resilience import HttpStatusError

MAX_BODY_BYTES = 1 << 20  # an answer is a few hundred bytes; a megabyte is a broken or hostile server
ANTHROPIC_VERSION = "2023-06-01"
USER_AGENT = f"gatewayd/{__version__}"


@dataclass(frozen=True)
class Prompt:
    system: str
    text: str
    tools: list[dict[str, Any]]  # provider-neutral: name, description, parameters (JSON schema)
    max_tokens: int


@dataclass(frozen=True)
class Usage:
    tokens_in: int
    tokens_out: int
    reported: bool = True  # False: the provider did not say, these are our estimate


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any


@dataclass(frozen=True)
class Completion:
    call: ToolCall | None
    content: str | None
    usage: Usage | None
    model: str


@dataclass(frozen=True)
class Answer:
    """What a completion says: a command's arguments (``run``), or that the text is no command (``declined``)."""

    kind: str  # "run" | "declined"
    arguments: Any = None
    reason: str = ""


class Provider(Protocol):
    name: str
    kind: str
    model: str
    base_url: str

    async def complete(
        self, session: aiohttp.ClientSession, prompt: Prompt, limits: aiohttp.ClientTimeout
    ) -> Completion: ...

    async def check(self, session: aiohttp.ClientSession, limits: aiohttp.ClientTimeout) -> dict[str, Any]:
        """A health check that spends no tokens (the model list); raises like ``complete`` when unhealthy."""
        ...


def answer_of(completion: Completion) -> Answer:
    """The command arguments or the refusal in a completion. A model that answers in text rather than with a
    tool call (small local models do) is accepted when the text is the JSON object a tool call would carry."""
    call = completion.call
    if call is not None:
        if call.name == RUN_TOOL:
            return Answer("run", call.arguments)
        if call.name == DECLINE_TOOL:
            reason = call.arguments.get("reason") if isinstance(call.arguments, dict) else None
            return Answer("declined", reason=str(reason or "")[:300])
        raise UnusableAnswer(f"the model called an unknown tool {call.name[:64]!r}")
    text = (completion.content or "").strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        data = strictjson.loads(text, max_depth=ANSWER_MAX_DEPTH)
    except ValueError:
        raise UnusableAnswer(
            "the model answered in prose, not with a command", details={"content": text[:200]}
        ) from None
    if isinstance(data, dict) and "device" in data:
        return Answer("run", data)
    raise UnusableAnswer("the model's JSON is not a command", details={"content": text[:200]})


ANSWER_MAX_DEPTH = 64  # a provider's answer nests some six levels; far deeper is junk that recursion would choke on


def read_answer(raw: bytes, provider: str) -> Any:
    """A provider's answer body, parsed as strictly as a client's command (no NaN, no Infinity, no lone surrogate,
    no nesting past ANSWER_MAX_DEPTH), or :class:`UnusableAnswer`."""
    try:
        return strictjson.loads(raw, max_depth=ANSWER_MAX_DEPTH)
    except ValueError as err:
        raise UnusableAnswer(
            f"{provider}: the answer is not JSON ({err})", details={"body": raw[:200].decode("utf-8", "replace")}
        ) from None


def _arguments(raw: Any) -> Any:
    """Tool arguments: an object, or (OpenAI) a JSON string of one."""
    if isinstance(raw, str):
        try:
            return strictjson.loads(raw, max_depth=ANSWER_MAX_DEPTH)
        except ValueError:
            raise UnusableAnswer("the tool call's arguments are not JSON", details={"arguments": raw[:200]}) from None
    return raw


def _error_message(data: Any, raw: bytes) -> str:
    """The provider's own words from an error body: OpenAI and Anthropic ``{"error": {"message"}}``, Ollama
    ``{"error": "..."}``; else the start of the body. Secrets are taken out before it is cut short (a key cut in
    two would no longer be recognised): a provider or a proxy may quote the key it was sent, and these words end up
    in the log, in /api/v1/providers and in the command's stored interpretation."""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return scrub(str(error["message"]))[:200]
        if isinstance(error, str):
            return scrub(error)[:200]
    return scrub(raw[:4096].decode("utf-8", "replace"))[:200]


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise UnusableAnswer(f"the answer is larger than {MAX_BODY_BYTES} bytes")
    return bytes(body)


class HttpProvider:
    """What the three APIs share: one JSON request, the error answer translated, the body size bounded."""

    kind = "http"

    def __init__(self, name: str, cfg: ProviderConfig, api_key: str | None):
        self.name = name
        self.model = cfg.model
        self.base_url = cfg.base_url.rstrip("/")
        self._api_key = api_key
        # An operator's fault scenario (``gatewayd test provider_*``): every call fails this way meanwhile.
        self.fault: Literal["timeout", "429", "down"] | None = None

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self.name!r}, {self.base_url!r}, {self.model!r})"

    def headers(self) -> dict[str, str]:
        return {"User-Agent": USER_AGENT, "Accept": "application/json"}

    async def _call(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        limits: aiohttp.ClientTimeout,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        if self.fault is not None:
            await self._injected(limits)
        url = self.base_url + path
        async with session.request(method, url, json=body, headers=self.headers(), timeout=limits) as resp:
            raw = await _read(resp)
            if resp.status >= 300:
                try:
                    data = strictjson.loads(raw)
                except ValueError:
                    data = None
                raise HttpStatusError(
                    resp.status,
                    dict(resp.headers),
                    message=f"{self.name}: HTTP {resp.status}: {_error_message(data, raw)}",
                )
            return read_answer(raw, self.name)

    async def _injected(self, limits: aiohttp.ClientTimeout) -> None:
        """Fail as the real thing would: a hang cut by the timeout, a 429 with Retry-After, a refused connection."""
        if self.fault == "timeout":
            await asyncio.sleep(limits.total or 30.0)
            raise TimeoutError(f"{self.name}: no answer within {limits.total} s (operator test)")
        if self.fault == "429":
            raise HttpStatusError(
                429, {"Retry-After": "1"}, message=f"{self.name}: HTTP 429: rate limited (operator test)"
            )
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"{self.name}: connection refused (operator test)")


class _ListsModels(HttpProvider):
    """OpenAI's and Anthropic's shared shape: a chat POST, and a model list ``{"data": [{"id": ...}]}``."""

    chat_path = ""
    models_path = ""

    def request_body(self, prompt: Prompt) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, data: Any) -> Completion:
        raise NotImplementedError

    async def complete(
        self, session: aiohttp.ClientSession, prompt: Prompt, limits: aiohttp.ClientTimeout
    ) -> Completion:
        return self.parse(await self._call(session, "POST", self.chat_path, limits, self.request_body(prompt)))

    async def check(self, session: aiohttp.ClientSession, limits: aiohttp.ClientTimeout) -> dict[str, Any]:
        data = await self._call(session, "GET", self.models_path, limits)
        try:
            ids = [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError) as err:
            raise _shape(self.name, "model list", err) from err
        return {"models": len(ids), "model_listed": self.model in ids}


def _chat_with_functions(prompt: Prompt) -> dict[str, Any]:
    """The messages and tools of a chat request as OpenAI's API and Ollama's native one both take them."""
    return {
        "messages": [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.text}],
        "tools": [
            {
                "type": "function",
                "function": {"name": t["name"], "description": t["description"], "parameters": t["parameters"]},
            }
            for t in prompt.tools
        ],
    }


def _shape(provider: str, what: str, err: Exception) -> UnusableAnswer:
    return UnusableAnswer(f"{provider}: unexpected answer ({what}: {type(err).__name__} {err})")


class OpenAIProvider(_ListsModels):
    """``POST {base_url}/chat/completions`` with tools; health: ``GET {base_url}/models``. base_url ends in /v1."""

    kind = "openai"

    def headers(self) -> dict[str, str]:
        out = super().headers()
        if self._api_key:
            out["Authorization"] = f"Bearer {self._api_key}"
        return out

    def request_body(self, prompt: Prompt) -> dict[str, Any]:
        return {
            "model": self.model,
            **_chat_with_functions(prompt),
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": prompt.max_tokens,
        }

    def parse(self, data: Any) -> Completion:
        try:
            message = data["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            call = None
            if calls:
                function = calls[0]["function"]
                call = ToolCall(str(function["name"]), _arguments(function.get("arguments", "{}")))
            usage = data.get("usage")
            counted = (
                Usage(int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0))
                if isinstance(usage, dict)
                else None
            )
            content = message.get("content")
            return Completion(
                call, content if isinstance(content, str) else None, counted, str(data.get("model") or self.model)
            )
        except UnusableAnswer:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise _shape(self.name, "chat completion", err) from err

    chat_path = "/chat/completions"
    models_path = "/models"


class AnthropicProvider(_ListsModels):
    """``POST {base_url}/v1/messages`` with tools; health: ``GET {base_url}/v1/models``."""

    kind = "anthropic"

    def headers(self) -> dict[str, str]:
        out = super().headers()
        out["anthropic-version"] = ANTHROPIC_VERSION
        if self._api_key:
            out["x-api-key"] = self._api_key
        return out

    def request_body(self, prompt: Prompt) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_tokens": prompt.max_tokens,
            "system": prompt.system,
            "messages": [{"role": "user", "content": prompt.text}],
            "tools": [
                {"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
                for t in prompt.tools
            ],
            "tool_choice": {"type": "any"},
            "temperature": 0,
        }

    def parse(self, data: Any) -> Completion:
        try:
            if data.get("type") != "message":
                raise UnusableAnswer(f"{self.name}: the answer is not a message", details={"type": data.get("type")})
            call, texts = None, []
            for block in data["content"]:
                if block.get("type") == "tool_use" and call is None:
                    call = ToolCall(str(block["name"]), block.get("input"))
                elif block.get("type") == "text":
                    texts.append(str(block.get("text", "")))
            usage = data.get("usage")
            counted = (
                Usage(int(usage["input_tokens"]), int(usage.get("output_tokens") or 0))
                if isinstance(usage, dict)
                else None
            )
            return Completion(call, "".join(texts) or None, counted, str(data.get("model") or self.model))
        except UnusableAnswer:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise _shape(self.name, "message", err) from err

    chat_path = "/v1/messages"
    models_path = "/v1/models"


class OllamaProvider(HttpProvider):
    """Ollama's native ``POST {base_url}/api/chat`` (``stream: false``) with tools; health: ``GET /api/tags``."""

    kind = "ollama"

    def headers(self) -> dict[str, str]:
        out = super().headers()
        if self._api_key:  # Ollama itself takes none; a reverse proxy in front of it may
            out["Authorization"] = f"Bearer {self._api_key}"
        return out

    def request_body(self, prompt: Prompt) -> dict[str, Any]:
        return {
            "model": self.model,
            **_chat_with_functions(prompt),
            "stream": False,
            "options": {"temperature": 0, "num_predict": prompt.max_tokens},
        }

    def parse(self, data: Any) -> Completion:
        try:
            message = data["message"]
            calls = message.get("tool_calls") or []
            call = None
            if calls:
                function = calls[0]["function"]
                call = ToolCall(str(function["name"]), _arguments(function.get("arguments", {})))
            counted = None
            if "prompt_eval_count" in data or "eval_count" in data:
                counted = Usage(int(data.get("prompt_eval_count") or 0), int(data.get("eval_count") or 0))
            content = message.get("content")
            return Completion(
                call, content if isinstance(content, str) else None, counted, str(data.get("model") or self.model)
            )
        except UnusableAnswer:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise _shape(self.name, "chat", err) from err

    async def complete(
        self, session: aiohttp.ClientSession, prompt: Prompt, limits: aiohttp.ClientTimeout
    ) -> Completion:
        return self.parse(await self._call(session, "POST", "/api/chat", limits, self.request_body(prompt)))

    async def check(self, session: aiohttp.ClientSession, limits: aiohttp.ClientTimeout) -> dict[str, Any]:
        data = await self._call(session, "GET", "/api/tags", limits)
        try:
            names = [str(m["name"]) for m in data["models"]]
        except (KeyError, TypeError) as err:
            raise _shape(self.name, "tag list", err) from err
        wanted = self.model if ":" in self.model else f"{self.model}:latest"
        return {"models": len(names), "model_listed": wanted in names or self.model in names}


KINDS: dict[str, type[OpenAIProvider | AnthropicProvider | OllamaProvider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "ollama": OllamaProvider,
}


def build_provider(name: str, cfg: ProviderConfig, api_key: str | None) -> Provider:
    return KINDS[cfg.type](name, cfg, api_key)
