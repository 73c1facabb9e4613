"""The OpenAPI 3.1 document of the JSON API, served at ``/api/v1/openapi.json``.

Written out here rather than inferred, so it says what clients may rely on: every route, its parameters, and
every status code it can answer with. ``tests/test_openapi.py`` checks it against the router (no route missing,
none invented) and fuzzes the running daemon with schemathesis for undocumented codes and server errors.
"""

from __future__ import annotations

from typing import Any

from gatewayd import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_JSON_OBJECT = {"type": "object"}

_DESCRIPTIONS = {
    200: "OK",
    202: "Accepted: committed to the store",
    400: "The request is malformed (not JSON, wrong types, bad query parameter)",
    401: "No valid credentials (access control on)",
    403: (
        "The credentials lack the role this needs, the CSRF token is missing, or (csrf_failed) a browser sent this "
        "change on behalf of another site: Origin not this server (null included), Sec-Fetch-Site not same-origin"
    ),
    404: "No such command, device, route or scenario",
    409: "Conflicts with the current state",
    413: "The body is larger than http.max_body_bytes (a declared Content-Length is refused before it is read)",
    415: "The body is not declared application/json (a form or text/plain body is never read by a JSON route)",
    422: "Valid JSON that the device's profile does not accept",
    429: "Rate limited; see Retry-After and X-RateLimit-*",
    503: (
        "Not now: starting, stopping, queue full, storage full (with Retry-After), store unavailable, store lost "
        "(the database file deleted, replaced or unwritable: until a restart), or too many connections open "
        "(http.max_connections, with Retry-After)"
    ),
    504: "?wait ran out before the command finished",
}
_RATE_HEADERS = {
    name: {"schema": {"type": "string"}}
    for name in ("Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
}
# Every API route may be refused for these, whatever it does (413: a request declaring a body over the limit, on
# any route, is refused before its route is looked at).
_ALWAYS = (401, 403, 413, 429, 503)


def _responses(ok: int, *errors: int, content: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        str(ok): {
            "description": _DESCRIPTIONS[ok],
            "content": content or {"application/json": {"schema": _JSON_OBJECT}},
        }
    }
    for code in sorted({*errors, *_ALWAYS}):
        response: dict[str, Any] = {
            "description": _DESCRIPTIONS[code],
            "content": {"application/json": {"schema": _ERROR}},
        }
        if code == 429:
            response["headers"] = _RATE_HEADERS
        elif code == 503:
            response["headers"] = {"Retry-After": _RATE_HEADERS["Retry-After"]}
        out[str(code)] = response
    return out


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


# Nothing in a command is coerced or trimmed: a value of another JSON type, or with whitespace around it, is a 422.
_NAME = "matched exactly: a name with whitespace around it is refused, not trimmed"
_ID = "idempotency key, taken exactly as sent (a trailing newline is refused, not stripped)"
_TTL = 'seconds, a JSON number: true or "5" is refused'

_COMMAND_REQUEST = {
    "type": "object",
    "description": "A structured command; validated against the device's profile.",
    "properties": {
        "device": {"type": "string", "minLength": 1, "maxLength": 64, "description": _NAME},
        "action": {"type": "string", "minLength": 1, "maxLength": 64, "description": _NAME},
        "params": {"type": "object"},
        "id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$", "description": _ID},
        "ttl_s": {"type": "number", "exclusiveMinimum": 0, "description": _TTL},
        "priority": {"type": "string", "enum": ["critical", "high", "normal", "low"]},
        "confirm": {"type": "boolean", "description": 'the literal true or false (not 1, not "yes")'},
    },
    "required": ["device", "action"],
    "additionalProperties": False,
}


_TEXT_REQUEST = {
    "type": "object",
    "description": (
        "A natural-language command: interpreted (providers, else the local rules), then validated; or a question "
        "about state, answered (200) without a command"
    ),
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "user": {
            "type": "string",
            "description": (
                "With access control on: leave it out (the command is the authenticated user's; any other name "
                "is refused, 422). Off: a label kept as the command's user, unverified."
            ),
        },
        "confirm": {"type": "boolean"},
        "id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$", "description": _ID},
        "ttl_s": {"type": "number", "exclusiveMinimum": 0, "description": _TTL},
        "priority": {"type": "string", "enum": ["critical", "high", "normal", "low"]},
    },
    "required": ["text"],
}


_ANSWER = {
    "type": "object",
    "description": (
        'The answer to a question about state ({"text": "is the pump running?"}), from the devices\' state '
        "and latest telemetry. No command is made, stored or run."
    ),
    "properties": {
        "answer": {"type": "string", "description": 'e.g. "Yes: pump1 is running: speed 55 % (2 s ago)"'},
        "device": {"type": "string", "description": "the device asked about (when there is one)"},
        "values": {"type": "object", "description": "its values asked about, as last reported"},
        "devices": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "device": {"type": "string"},
                    "channel": {"type": "integer"},
                    "values": {"type": "object"},
                    "text": {"type": "string"},
                    "at": {"type": "string", "description": "when the reading was taken (UTC)"},
                    "age_s": {"type": "number"},
                },
                "required": ["device", "values", "text"],
            },
        },
        "interpretation": {"type": "object", "description": "text, provider (local), kind (question), latency_ms"},
    },
    "required": ["answer", "devices", "interpretation"],
}


def document() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    html = {"text/html": {"schema": {"type": "string"}}}
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "Liveness", "responses": _responses(200, content=None)}},
        "/readyz": {"get": {"summary": "Readiness: accepting commands", "responses": _responses(200)}},
        "/metrics": {"get": {"summary": "Prometheus text format", "responses": _responses(200, content=text)}},
        "/api/v1/openapi.json": {"get": {"summary": "This document", "responses": _responses(200)}},
        "/api/v1/commands": {
            "post": {
                "summary": "Submit a command (202 once committed; 200 with ?wait once final)",
                "parameters": [_query("wait", {"type": "number", "minimum": 0}, "seconds to wait for a final state")],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"oneOf": [_COMMAND_REQUEST, _TEXT_REQUEST]}}},
                },
                "responses": {
                    **_responses(202, 400, 404, 409, 413, 415, 422, 504),
                    "200": {
                        "description": (
                            "Final (with ?wait), or the existing command for a repeated id; for a question about "
                            'state ({"text": ...} asking, not telling), its answer, and no command'
                        ),
                        "content": {"application/json": {"schema": {"anyOf": [_ANSWER, _JSON_OBJECT]}}},
                    },
                },
            },
            "get": {
                "summary": "Recent commands, newest first",
                "parameters": [
                    _query("state", {"type": "string"}, "only commands in this state"),
                    _query("device", {"type": "string"}, "only commands for this device"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most this many"),
                ],
                "responses": _responses(200, 400),
            },
        },
        "/api/v1/commands/{id}": {
            "get": {
                "summary": "One command with its transitions",
                "parameters": [_path_param("id", "the command's id")],
                "responses": _responses(200, 404),
            }
        },
        "/api/v1/commands/{id}/cancel": {
            "post": {
                "summary": "Cancel a command still waiting in its queue (409 once it may have reached the device)",
                "parameters": [_path_param("id", "the command's id")],
                "responses": _responses(200, 404, 409),
            }
        },
        "/api/v1/devices": {"get": {"summary": "Devices with state and actions", "responses": _responses(200)}},
        "/api/v1/devices/{name}": {
            "get": {
                "summary": "One device",
                "parameters": [_path_param("name", "device name")],
                "responses": _responses(200, 404),
            }
        },
        "/api/v1/devices/{name}/telemetry": {
            "get": {
                "summary": "The device's recent readings, oldest first",
                "parameters": [_path_param("name", "device name")],
                "responses": _responses(200, 404),
            }
        },
        "/api/v1/providers": {
            "get": {"summary": "Interpreter: providers, breakers, limits, spend, cache", "responses": _responses(200)}
        },
        "/api/v1/overview": {
            "get": {
                "summary": "What the page's live status carries: status, error rate, devices, limiters",
                "responses": _responses(200),
            }
        },
        "/api/v1/history": {"get": {"summary": "The page's hour charts", "responses": _responses(200)}},
        "/api/v1/events/stream": {
            "get": {
                "summary": "Server-sent events: status, command, history, resync",
                "responses": _responses(200, content={"text/event-stream": {"schema": {"type": "string"}}}),
            }
        },
        "/api/v1/session": {
            "get": {"summary": "Who you are, and your session's CSRF token", "responses": _responses(200)}
        },
        "/login": {
            "get": {"summary": "The login form", "responses": _responses(200, content=html)},
            "post": {
                "summary": "Log in with a name and token (form); sets the session cookie",
                "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": _JSON_OBJECT}}},
                "responses": {**_responses(200, 400, content=html), "303": {"description": "Logged in"}},
            },
        },
        "/logout": {
            "post": {
                "summary": "End the session",
                "responses": {**_responses(200, 400), "303": {"description": "Logged out"}},
            }
        },
        "/ui/command": {
            "post": {
                "summary": "The page's forms without scripts (form fields; back to the page)",
                "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": _JSON_OBJECT}}},
                "responses": {
                    **_responses(200, 400, 404, 409, 413, 422, content=html),
                    "303": {"description": "Back to the page"},
                },
            }
        },
        "/static/{name}": {
            "get": {
                "summary": "The page's script and style sheet",
                "parameters": [_path_param("name", "file name")],
                "responses": _responses(200, 404, content={"*/*": {"schema": {"type": "string"}}}),
            }
        },
        "/api/v1/outbox": {"get": {"summary": "Records waiting for the uplink", "responses": _responses(200)}},
        "/api/v1/queue": {"get": {"summary": "Queued and executing commands", "responses": _responses(200)}},
        "/api/v1/schedule": {
            "get": {
                "summary": "What the gateway will send by itself: max on-time switch-offs, ends of on-periods",
                "parameters": [
                    _query("device", {"type": "string"}, "only for this device"),
                    _query("all", {"type": "string", "enum": ["0", "1", "true", "false"]}, "1: fired, cancelled too"),
                ],
                "responses": _responses(200),
            }
        },
        "/api/v1/stats": {"get": {"summary": "Counters and component states", "responses": _responses(200)}},
        "/api/v1/admin/config": {
            "get": {"summary": "Effective configuration, secrets redacted (admin)", "responses": _responses(200)}
        },
        "/api/v1/admin/reset": {
            "post": {"summary": "Close breakers, refill limiters (admin)", "responses": _responses(200, 415)}
        },
        "/api/v1/admin/test/{scenario}": {
            "post": {
                "summary": "Run a fault scenario for a bounded time and report (admin)",
                "parameters": [
                    _path_param("scenario", "serial_unplug, serial_garbage, broker_down, slow_disk, provider_*"),
                    _query("duration_s", {"type": "number", "exclusiveMinimum": 0, "maximum": 120}, "fault length"),
                ],
                "responses": _responses(200, 400, 404, 409, 415),
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "gatewayd", "version": __version__, "description": "The gateway's local JSON API."},
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message", "details"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "details": {"type": "object"},
                            },
                        }
                    },
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
