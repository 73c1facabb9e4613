r"""Provider answers are an ingress like any other: whatever a provider (or something pretending to be one) sends
back, the interpreter gets a usable command or a typed :class:`UnusableAnswer`, never another exception.

The raw bytes go the way the chain takes them: :func:`gatewayd.strictjson.loads` (with the depth bound providers
get), the provider's own ``parse``, :func:`answer_of`, :func:`check_answer`. The answers are generated in each
provider's wire format with hostile values in every place a value goes: NaN and the infinities (written as Python's
json writes them), numbers past every limit, booleans where numbers go, control characters and unpaired surrogates,
and nesting far deeper than any answer.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd import strictjson
from gatewayd.config.models import ProviderConfig
from gatewayd.interpret.errors import UnusableAnswer
from gatewayd.interpret.providers import KINDS, answer_of, read_answer
from gatewayd.interpret.registry import RUN_TOOL, Command, check_answer
from tests.faults.bad_input import big_ints, hostile_values
from tests.interpret_kit import registry

REGISTRY = registry()
PROVIDERS = {
    kind: cls(kind, ProviderConfig(type=kind, base_url="http://127.0.0.1:9", model="m", cloud=False), "key")
    for kind, cls in KINDS.items()
}

anything = st.recursive(
    st.one_of(hostile_values, st.none(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@st.composite
def arguments(draw: st.DrawFn) -> Any:
    """A run_command call's arguments: mostly a command with one hostile value, sometimes anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(anything)
    body: dict[str, Any] = {"device": "pump1", "action": "set_speed", "params": {"percent": 40}}
    where = draw(st.sampled_from(["device", "action", "params", "percent", "duration_s", "extra"]))
    value = draw(anything)
    if where == "percent":
        body["params"]["percent"] = value
    elif where == "extra":
        body[draw(st.text(max_size=8))] = value
    else:
        body[where] = value
    return body


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(KINDS)))
    args = draw(arguments())
    as_string = draw(st.booleans())  # OpenAI sends the arguments as a JSON string; Ollama may send either
    tokens = draw(st.one_of(st.integers(0, 100), big_ints, st.floats(), st.booleans(), st.text(max_size=3)))
    if kind == "openai":
        call = {"name": RUN_TOOL, "arguments": json.dumps(args) if as_string else args}
        data: Any = {"choices": [{"message": {"tool_calls": [{"function": call}]}}], "usage": {"prompt_tokens": tokens}}
    elif kind == "anthropic":
        data = {"type": "message", "content": [{"type": "tool_use", "name": RUN_TOOL, "input": args}]}
        data["usage"] = {"input_tokens": tokens, "output_tokens": 1}
    else:
        call = {"name": RUN_TOOL, "arguments": json.dumps(args) if as_string else args}
        data = {"message": {"tool_calls": [{"function": call}]}, "prompt_eval_count": tokens}
    if draw(st.integers(0, 9)) == 0:  # the whole answer, or a part of it, buried deep
        depth = draw(st.sampled_from([70, 500, 5000]))
        data = {"choices": [{"message": {"content": "[" * depth + "1" + "]" * depth}}]} if kind == "openai" else data
        data = [data] if draw(st.booleans()) else data
    return kind, json.dumps(data).encode()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers())
def test_any_provider_answer_is_a_valid_command_or_a_typed_unusable_answer(answer: tuple[str, bytes]) -> None:
    kind, raw = answer
    try:
        completion = PROVIDERS[kind].parse(read_answer(raw, kind))
        outcome = answer_of(completion)
        command = check_answer(outcome.arguments, REGISTRY) if outcome.kind == "run" else None
    except UnusableAnswer:
        return
    if command is not None:
        assert isinstance(command, Command)
        strictjson.loads(strictjson.dumps(command.params))  # nothing non-finite got through
        assert all(not isinstance(v, float) or math.isfinite(v) for v in command.params.values())
        if command.duration_s is not None:
            assert math.isfinite(command.duration_s) and command.duration_s > 0
