"""A fake LLM provider: a real HTTP server on loopback speaking one provider's wire format, with scripted faults.

``kind`` is ``openai`` (``POST /v1/chat/completions`` with ``tool_calls`` and ``usage``, ``GET /v1/models``),
``anthropic`` (``POST /v1/messages`` with ``tool_use`` blocks and ``usage``, ``GET /v1/models``; wants
``x-api-key`` and ``anthropic-version``) or ``ollama`` (``POST /api/chat`` with ``tool_calls`` and
``prompt_eval_count``/``eval_count``, ``GET /api/tags``). Like the real services it checks the key, the model and
the request's required fields, and answers errors in the service's own error format.

Each completion request takes the next scripted :class:`Fault`, if any: an error status with headers (429 with
``Retry-After``, 500, 503, 529), a hang, a connection reset in the middle of the body, a body that is not JSON, a
valid answer naming a device that does not exist, or prose instead of a tool call. ``down()`` stops listening
(connections are refused) and ``up()`` listens again on the same port.

The answer to a request is ``answers[text]`` when scripted (``None`` declines), else a naive guess from the
request's own tool schema (the first device and action named in the text, the first number as the required
numeric parameter), enough to try the daemon against it by hand:

    .venv/bin/python -m gatewayd.interpret.simulator --kind openai --port 8099 --latency 0.3
    GATEWAYD_INTERPRET__PROVIDERS__OPENAI__BASE_URL=http://127.0.0.1:8099/v1 OPENAI_API_KEY=sk-fake ./scripts/run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

KINDS = ("openai", "anthropic", "ollama")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "service_unavailable",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class Fault:
    kind: str  # status | hang | reset | malformed | unknown_device | prose
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def http(cls, status: int, **headers: str) -> Fault:
        """An error answer; header names with underscores become dashes (``retry_after="2"``)."""
        return cls("status", status, {k.replace("_", "-"): v for k, v in headers.items()})

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Fault:
        return cls("hang", seconds=seconds)

    @classmethod
    def reset(cls) -> Fault:
        return cls("reset")

    @classmethod
    def malformed(cls) -> Fault:
        return cls("malformed")

    @classmethod
    def unknown_device(cls) -> Fault:
        return cls("unknown_device")

    @classmethod
    def prose(cls) -> Fault:
        return cls("prose")


@dataclass
class Seen:
    """One request as the fake received it."""

    path: str
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic()
    fault: Fault | None = None


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def naive_answer(text: str, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first device and action of the tool schema named in the text; the first number for a parameter."""
    schema = next((t for t in tools if t.get("name") == "run_command"), None)
    if schema is None:
        return None
    props = schema.get("parameters", {}).get("properties", {})
    lowered = text.lower()

    def spoken(name: str) -> str:
        return re.sub(r"(?<=[a-z])(?=[0-9])", " ", name.replace("_", " "))

    devices = props.get("device", {}).get("enum", [])
    device = next((d for d in devices if d in lowered or spoken(d) in lowered), None)
    actions = props.get("action", {}).get("enum", [])
    words = set(re.findall(r"[a-z_]+", lowered))
    action = next((a for a in actions if a in words or a.replace("_", " ") in lowered), None)
    if device is None or action is None:
        return None
    params: dict[str, Any] = {}
    rest = lowered.replace(device, " ").replace(spoken(device), " ")
    number = re.search(r"-?\d+(\.\d+)?", rest)
    if number is not None and action.startswith("set"):
        params["percent"] = float(number.group())
    return {"device": device, "action": action, "params": params}


class FakeProvider:
    """``async with FakeProvider("openai", api_key="sk-test") as fake:`` then point a provider at
    ``fake.base_url``. ``fake.script(Fault.http(429, retry_after="1"), None, ...)`` queues faults for the next
    completion requests (``None``: answer normally). ``fake.always = Fault.http(503)`` gives that fault to every
    completion request with none scripted, until set back to ``None``: a provider that stays broken however often
    it is asked."""

    def __init__(
        self,
        kind: str,
        *,
        api_key: str | None = None,
        model: str = "fake-model",
        latency_s: float = 0.0,
        answers: dict[str, dict[str, Any] | None] | None = None,
        default: dict[str, Any] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        self.kind = kind
        self.api_key = api_key
        self.model = model
        self.latency_s = latency_s
        self.answers = dict(answers or {})
        self.default = default
        self.host = host
        self.port = port
        self.faults: deque[Fault | None] = deque()
        self.always: Fault | None = None
        self.health_faults: deque[Fault | None] = deque()
        self.seen: list[Seen] = []
        self.tokens_in = 0  # usage reported in successful answers, for comparing with the gateway's ledger
        self.tokens_out = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._closing = asyncio.Event()
        self._arrived = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeProvider:
        app = web.Application()
        if self.kind == "openai":
            app.router.add_post("/v1/chat/completions", self._openai_chat)
            app.router.add_get("/v1/models", self._models)
        elif self.kind == "anthropic":
            app.router.add_post("/v1/messages", self._anthropic_messages)
            app.router.add_get("/v1/models", self._models)
        else:
            app.router.add_post("/api/chat", self._ollama_chat)
            app.router.add_get("/api/tags", self._ollama_tags)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2, handle_signals=False)
        await self._runner.setup()
        await self.up()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def up(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        assert self._runner is not None
        if self._site is not None:
            return
        self._closing.clear()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._site = site
        if self.port == 0:
            server = site._server
            assert isinstance(server, asyncio.base_events.Server)
            self.port = int(server.sockets[0].getsockname()[1])

    async def down(self) -> None:
        """Stop listening: new connections are refused, as from a host that is gone."""
        if self._site is not None:
            self._closing.set()
            await self._site.stop()
            self._site = None
            server = self._runner.server if self._runner is not None else None
            if server is not None:  # and the open keep-alive connections die with the host
                for handler in server.connections:
                    handler.force_close()
                    if handler.transport is not None:
                        handler.transport.abort()

    @property
    def base_url(self) -> str:
        """What the gateway's provider config takes: OpenAI-compatible URLs end in /v1."""
        root = f"http://{self.host}:{self.port}"
        return f"{root}/v1" if self.kind == "openai" else root

    def script(self, *faults: Fault | None) -> None:
        self.faults.extend(faults)

    async def wait_seen(self, path: str, count: int) -> None:
        """Until ``count`` requests for ``path`` have arrived (bound it with ``asyncio.wait_for``)."""
        while sum(1 for s in self.seen if s.path == path) < count:
            self._arrived.clear()
            await self._arrived.wait()

    def _record(self, seen: Seen) -> None:
        self.seen.append(seen)
        self._arrived.set()

    def completions(self) -> list[Seen]:
        return [s for s in self.seen if s.path in ("/v1/chat/completions", "/v1/messages", "/api/chat")]

    # --- wire formats ------------------------------------------------------------------------------------------

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        kind = _ERROR_TYPES.get(status, "api_error")
        if self.kind == "anthropic":
            body: Any = {"type": "error", "error": {"type": kind, "message": message}}
        elif self.kind == "openai":
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        else:
            body = {"error": message}
        return web.json_response(body, status=status, headers=headers)

    def _auth_problem(self, request: web.Request) -> web.Response | None:
        if self.kind == "anthropic":
            if "anthropic-version" not in request.headers:
                return self._error(400, "anthropic-version: header is required")
            if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
                return self._error(401, "invalid x-api-key")
        elif self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401, "Incorrect API key provided")
        return None

    async def _body(self, request: web.Request) -> tuple[Any, web.Response | None]:
        try:
            body = await request.json()
        except ValueError:
            return None, self._error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return None, self._error(400, "the body must be an object")
        required = {"anthropic": ("model", "max_tokens", "messages")}.get(self.kind, ("model", "messages"))
        missing = [k for k in required if k not in body]
        if missing:
            return body, self._error(400, f"{missing[0]}: Field required")
        if body["model"] != self.model:
            message = f'model "{body["model"]}" not found, try pulling it first'
            return body, self._error(404, message if self.kind == "ollama" else f"model: {body['model']}")
        return body, None

    def _decide(self, body: dict[str, Any], fault: Fault | None) -> tuple[str, dict[str, Any]]:
        """(tool name, arguments) for a request."""
        messages = body.get("messages", [])
        text = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
        tools = [t.get("function", t) for t in body.get("tools", [])]
        for tool in tools:  # Anthropic names the schema input_schema
            if "input_schema" in tool:
                tool["parameters"] = tool["input_schema"]
        if fault is not None and fault.kind == "unknown_device":
            return "run_command", {"device": "no_such_device", "action": "on", "params": {}}
        key = " ".join(text.lower().split()).rstrip(".!?")
        if key in self.answers:
            answer = self.answers[key]
        elif self.default is not None:
            answer = self.default
        else:
            answer = naive_answer(text, tools)
        if answer is None:
            return "not_understood", {"reason": "that is not a command for these devices"}
        return "run_command", answer

    def _usage(self, body: dict[str, Any], arguments: dict[str, Any]) -> tuple[int, int]:
        return (
            _tokens(
                json.dumps(body.get("messages", []))
                + json.dumps(body.get("system", ""))
                + json.dumps(body.get("tools", []))
            ),
            _tokens(json.dumps(arguments)) + 5,
        )

    async def _prelude(self, request: web.Request) -> tuple[Any, Fault | None, web.StreamResponse | None]:
        """Record, apply latency and the scripted fault; a response here ends the request."""
        fault = self.faults.popleft() if self.faults else self.always
        raw = await request.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        self._record(Seen(request.path, dict(request.headers), parsed, time.monotonic(), fault))
        problem = self._auth_problem(request)
        if problem is not None:
            return None, fault, problem
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault is not None:
            if fault.kind == "status":
                return None, fault, self._error(fault.status, f"scripted HTTP {fault.status}", fault.headers)
            if fault.kind == "hang":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(fault.seconds):
                        await self._closing.wait()
            if fault.kind == "malformed":
                return None, fault, web.Response(text='{"id": "x", "choices": [', content_type="application/json")
        body, problem = await self._body(request)
        return body, fault, problem

    async def _send(self, request: web.Request, payload: dict[str, Any], fault: Fault | None) -> web.StreamResponse:
        if fault is not None and fault.kind == "reset":
            data = json.dumps(payload).encode()
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.abort()  # the connection dies mid-body, as when a proxy or the link drops it
            return resp
        return web.json_response(payload)

    def _count(self, tokens_in: int, tokens_out: int) -> None:
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._prelude(request)
        if early is not None:
            return early
        tool, args = self._decide(body, fault)
        tokens_in, tokens_out = self._usage(body, args)
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if fault is not None and fault.kind == "prose":
            message["content"] = "Sure! I have switched it on for you."
        else:
            call = {
                "id": f"call_{uuid.uuid4().hex[:12]}",
                "type": "function",
                "function": {"name": tool, "arguments": json.dumps(args)},
            }
            message["tool_calls"] = [call]
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls", "logprobs": None}],
            "usage": {
                "prompt_tokens": tokens_in,
                "completion_tokens": tokens_out,
                "total_tokens": tokens_in + tokens_out,
            },
        }
        resp = await self._send(request, payload, fault)
        if fault is None or fault.kind != "reset":
            self._count(tokens_in, tokens_out)
        return resp

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._prelude(request)
        if early is not None:
            return early
        tool, args = self._decide(body, fault)
        tokens_in, tokens_out = self._usage(body, args)
        if fault is not None and fault.kind == "prose":
            content: list[dict[str, Any]] = [{"type": "text", "text": "Sure! Done."}]
        else:
            content = [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:12]}", "name": tool, "input": args}]
        payload = {
            "id": f"msg_{uuid.uuid4().hex[:12]}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }
        resp = await self._send(request, payload, fault)
        if fault is None or fault.kind != "reset":
            self._count(tokens_in, tokens_out)
        return resp

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._prelude(request)
        if early is not None:
            return early
        tool, args = self._decide(body, fault)
        tokens_in, tokens_out = self._usage(body, args)
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        if fault is not None and fault.kind == "prose":
            message["content"] = "Okay, turning it on."
        else:
            message["tool_calls"] = [{"function": {"name": tool, "arguments": args}}]
        payload = {
            "model": self.model,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "message": message,
            "done": True,
            "done_reason": "stop",
            "total_duration": int(self.latency_s * 1e9),
            "prompt_eval_count": tokens_in,
            "eval_count": tokens_out,
        }
        resp = await self._send(request, payload, fault)
        if fault is None or fault.kind != "reset":
            self._count(tokens_in, tokens_out)
        return resp

    async def _health_prelude(self, request: web.Request) -> web.Response | None:
        fault = self.health_faults.popleft() if self.health_faults else None
        self._record(Seen(request.path, dict(request.headers), None, time.monotonic(), fault))
        problem = self._auth_problem(request)
        if problem is not None:
            return problem
        if fault is not None and fault.kind == "status":
            return self._error(fault.status, f"scripted HTTP {fault.status}", fault.headers)
        return None

    async def _models(self, request: web.Request) -> web.Response:
        early = await self._health_prelude(request)
        if early is not None:
            return early
        if self.kind == "anthropic":
            data = [
                {"type": "model", "id": self.model, "display_name": self.model, "created_at": "2025-01-01T00:00:00Z"}
            ]
            return web.json_response({"data": data, "has_more": False, "first_id": self.model, "last_id": self.model})
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}]}
        )

    async def _ollama_tags(self, request: web.Request) -> web.Response:
        early = await self._health_prelude(request)
        if early is not None:
            return early
        name = self.model if ":" in self.model else f"{self.model}:latest"
        return web.json_response({"models": [{"name": name, "model": name, "size": 0, "digest": "0" * 64}]})


async def _serve(args: argparse.Namespace) -> None:
    async with FakeProvider(
        args.kind, api_key=args.api_key, model=args.model, latency_s=args.latency, port=args.port
    ) as fake:
        print(f"fake {args.kind} provider at {fake.base_url} (model {fake.model!r}); Ctrl-C stops it", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake LLM provider on loopback, for trying gatewayd by hand.")
    parser.add_argument("--kind", choices=KINDS, default="openai")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--api-key", default=None, help="require this key (default: accept any)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
