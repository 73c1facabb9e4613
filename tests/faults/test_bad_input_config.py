"""Bad input at volume in configuration files: hundreds of generated mutations of the bundled config.toml (unknown
keys, wrong types, values out of range or not among the choices, sections and keys removed, broken TOML bytes,
deep nesting, bad environment overrides) through the loader, and a sample through ``gatewayd check-config PATH``.
Every bad document raises ConfigError (never a KeyError, a TypeError, a RecursionError or a pydantic traceback),
each problem names its file and key; the ones that are bad by construction name the very key that was broken;
the ones that are good by construction load with the value that was written."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from gatewayd.config import load_config
from gatewayd.config.models import Config
from gatewayd.errors import ConfigError
from tests.conftest import CONFIG, ROOT
from tests.faults.bad_input import toml_dumps

pytestmark = pytest.mark.timeout(240)

SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
FILE_LEVEL = ("not valid TOML", "cannot read", "file not found", "profiles directory not found")


def base() -> dict[str, Any]:
    """The bundled config with its relative paths made absolute: the mutated copies live in a temporary folder."""
    doc = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    doc["gateway"]["profiles_dir"] = str(ROOT / "hardware" / "profiles")
    doc["interpret"]["rules_file"] = str(ROOT / "hardware" / "interpret_rules.toml")
    return doc


BASE = base()


def leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (path, value) below ``node``: tables and plain values, not the root."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(((*path, key), value))
            out.extend(leaves(value, (*path, key)))
    return out


PLACES = leaves(BASE)
SCALARS = [(p, v) for p, v in PLACES if not isinstance(v, dict | list)]
TABLES = [p for p, v in PLACES if isinstance(v, dict)]
# Tables that map names to entries (devices, buses, providers): a new key there is a new entry, not a typo.
NAMED = {("serial",), ("devices",), ("interpret", "providers")}


def field_of(path: tuple[str, ...]) -> Any:
    """The pydantic FieldInfo of a dotted path in the config, or None (inside a name-keyed table's key itself)."""
    model: type[BaseModel] = Config
    i = 0
    while i < len(path):
        info = model.model_fields.get(path[i])
        if info is None:
            return None
        if i == len(path) - 1:
            return info
        ann = _unoptional(info.annotation)
        if typing.get_origin(ann) is dict:
            ann = _unoptional(typing.get_args(ann)[1])
            i += 1  # the entry's name
            if i == len(path) - 1:
                return None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
        i += 1
    return None


def _unoptional(ann: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def bounds(path: tuple[str, ...]) -> list[tuple[str, float]]:
    info = field_of(path)
    if info is None:
        return []
    out = []
    for meta in info.metadata:
        for name in ("gt", "ge", "lt", "le"):
            value = getattr(meta, name, None) if isinstance(meta, annotated_types.BaseMetadata) else None
            if value is not None:
                out.append((name, float(value)))
    return out


def choices(path: tuple[str, ...]) -> tuple[Any, ...]:
    info = field_of(path)
    if info is None:
        return ()
    ann = _unoptional(info.annotation)
    return typing.get_args(ann) if typing.get_origin(ann) is typing.Literal else ()


RANGED = [(p, v) for p, v in SCALARS if bounds(p) and isinstance(v, int | float) and not isinstance(v, bool)]
CHOSEN = [(p, v) for p, v in SCALARS if choices(p)]


@dataclass(frozen=True)
class Doc:
    """A config document, and what must come of it: "bad" names the key a problem must name (its dotted path),
    "good" the value to find at ``key`` once loaded, "either" only that it loads or fails with typed problems."""

    text: bytes
    expect: str
    how: str
    key: str = ""
    value: Any = None
    env: tuple[tuple[str, str], ...] = ()


def set_at(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def delete_at(doc: dict[str, Any], path: tuple[str, ...]) -> None:
    node = doc
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]


def render(doc: dict[str, Any]) -> bytes:
    return toml_dumps(doc).encode("utf-8")


other_values = st.one_of(
    st.integers(), st.floats(), st.text(max_size=20), st.booleans(), st.lists(st.integers(), max_size=3)
)


@st.composite
def mutations(draw: st.DrawFn) -> Doc:
    doc = copy.deepcopy(BASE)
    how = draw(
        st.sampled_from(
            [
                "unknown_key",
                "container_for_value",
                "value_for_table",
                "out_of_range",
                "not_a_choice",
                "other_type",
                "delete",
                "good_value",
                "broken_bytes",
                "deep",
                "env",
            ]
        )
    )
    if how == "unknown_key":
        table = draw(st.sampled_from([(), *TABLES]))
        node = doc
        for part in table:
            node = node[part]
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in node))
        node[key] = draw(other_values)
        return Doc(render(doc), "bad", how, ".".join((*table, key)))
    if how == "container_for_value":  # a plain value replaced by an array or a table
        path, _ = draw(st.sampled_from(SCALARS))
        set_at(doc, path, draw(st.one_of(st.lists(st.integers(), max_size=2), st.just({"x": 1}), st.just({}))))
        return Doc(render(doc), "bad", how, ".".join(path))
    if how == "value_for_table":  # a table replaced by a plain value
        path = draw(st.sampled_from(TABLES))
        set_at(doc, path, draw(st.one_of(st.integers(), st.text(max_size=5), st.booleans())))
        return Doc(render(doc), "bad", how, ".".join(path))
    if how == "out_of_range":
        path, value = draw(st.sampled_from(RANGED))
        name, limit = draw(st.sampled_from(bounds(path)))
        step = draw(st.sampled_from([1, 2, 10, 1e6, 1e300]))
        outside = limit + step if name in ("lt", "le") else limit - step
        if name in ("lt", "gt") and draw(st.booleans()):
            outside = limit  # the bound itself is outside an open interval
        if isinstance(value, int) and float(outside).is_integer() and abs(outside) < 1e18:
            outside = int(outside)
        set_at(doc, path, outside)
        return Doc(render(doc), "bad", how, ".".join(path))
    if how == "not_a_choice":
        path, _ = draw(st.sampled_from(CHOSEN))
        allowed = choices(path)
        set_at(doc, path, draw(st.one_of(st.text(max_size=12), st.integers(-5, 50)).filter(lambda v: v not in allowed)))
        return Doc(render(doc), "bad", how, ".".join(path))
    if how == "other_type":  # lax coercion may accept some (1 for true, 8080.0 for 8080): either way, no crash
        path, _ = draw(st.sampled_from(SCALARS))
        set_at(doc, path, draw(other_values))
        return Doc(render(doc), "either", how, ".".join(path))
    if how == "delete":  # a section or a key removed: defaults fill most, required ones are named
        path = draw(st.sampled_from([p for p, _ in PLACES]))
        delete_at(doc, path)
        return Doc(render(doc), "either", how, ".".join(path))
    if how == "good_value":
        path, value = draw(
            st.sampled_from(
                [
                    (("devices", "pump1", "description"), st.text(max_size=80)),
                    (("http", "port"), st.integers(0, 65535)),
                    (("gateway", "id"), st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")),
                    (("devices", "sensor1", "simulator", "seed"), st.integers()),
                    (("log", "level"), st.sampled_from(["debug", "info", "warning", "error"])),
                    (("serial", "bus0", "baudrate"), st.integers(300, 4_000_000)),
                    (("commands", "max_wait_s"), st.floats(min_value=0.001, max_value=3600)),
                ]
            )
        )
        chosen = draw(value)
        set_at(doc, path, chosen)
        return Doc(render(doc), "good", how, ".".join(path), chosen)
    if how == "broken_bytes":
        text = bytearray(render(doc))
        edit = draw(st.sampled_from(["insert", "delete", "truncate", "not_utf8", "unclosed"]))
        at = draw(st.integers(0, len(text) - 1))
        if edit == "insert":
            text[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del text[at : at + draw(st.integers(1, 40))]
        elif edit == "truncate":
            del text[at:]
        elif edit == "not_utf8":
            text[at:at] = b"\xff\xfe"
            return Doc(bytes(text), "bad", "not_utf8")
        else:
            text += b'\n[broken\nkey = "unclosed\n'
            return Doc(bytes(text), "bad", "unclosed")
        return Doc(bytes(text), "either", f"bytes_{edit}")
    if how == "deep":
        depth = draw(st.integers(2_000, 20_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a = ", "}")]))
        text = render(doc) + f"\n[extra]\nv = {opener * depth}1{closer * depth}\n".encode()
        return Doc(text, "bad", how)
    real = "GATEWAYD_" + "__".join(draw(st.sampled_from(SCALARS))[0]).upper()
    made_up = "GATEWAYD_" + "__".join(draw(st.lists(st.from_regex(r"\A[A-Z_]{1,12}\Z"), min_size=2, max_size=3)))
    name = draw(st.sampled_from([real, made_up]))
    raw = draw(st.one_of(st.text(max_size=30), st.just("[" * 3000), st.sampled_from(["{", "[1,", '"', "nan", "1e999"])))
    return Doc(render(doc), "either", "env", env=((name, raw.replace("\x00", "")),))


def check_problems(err: ConfigError, path: Path, doc: Doc) -> None:
    assert err.problems, doc
    for problem in err.problems:
        where, key, message = problem.file, problem.key, problem.message
        assert isinstance(message, str) and message.strip(), problem
        assert "Traceback" not in message and "errors.pydantic.dev" not in message, problem
        assert where == str(path) or where.startswith("env GATEWAYD_") or Path(where).is_absolute(), problem
        assert key or message.startswith(FILE_LEVEL), problem  # a problem names its key, or is about the file
    if doc.expect == "bad" and doc.key:
        keys = [p.key for p in err.problems]
        assert any(k == doc.key or k.startswith(doc.key + ".") for k in keys), (doc.key, keys)


def test_hundreds_of_mutated_configs_load_or_fail_with_typed_problems_naming_the_key(tmp_path: Path) -> None:
    outcomes: dict[str, list[int]] = {}
    path = tmp_path / "config.toml"

    @settings(SETTINGS, max_examples=700)
    @given(mutations())
    def each(doc: Doc) -> None:
        path.write_bytes(doc.text)
        try:
            loaded = load_config(path, environ=dict(doc.env))
        except ConfigError as err:
            assert doc.expect != "good", (doc, err.problems)
            check_problems(err, path, doc)
            outcomes.setdefault(doc.how, [0, 0])[1] += 1
            return
        assert doc.expect != "bad", doc
        outcomes.setdefault(doc.how, [0, 0])[0] += 1
        if doc.expect == "good":
            node: Any = loaded.config
            for part in doc.key.split("."):
                node = node[part] if isinstance(node, dict) else getattr(node, part)
            assert node == doc.value or (isinstance(node, float) and math.isclose(node, doc.value)), (node, doc)

    each()
    print(f"\nconfig: {sum(map(sum, outcomes.values()))} documents; (loaded, refused) by mutation {outcomes}")
    assert sum(map(sum, outcomes.values())) >= 500
    refused = sum(r for _, r in outcomes.values())
    assert refused >= 300 and outcomes["good_value"][0] > 10


def test_check_config_reports_the_same_problems_and_exit_codes_for_a_sample(tmp_path: Path) -> None:
    seen = {0: 0, 2: 0}
    path = tmp_path / "config.toml"

    @settings(SETTINGS, max_examples=15)
    @given(mutations())
    def each(doc: Doc) -> None:
        path.write_bytes(doc.text)
        env = {"PATH": "/usr/bin:/bin", **dict(doc.env)}
        try:
            load_config(path, environ=dict(doc.env))
            expected: list[str] | None = None
        except ConfigError as err:
            expected = [str(p) for p in err.problems]
        out = subprocess.run(
            [sys.executable, "-m", "gatewayd", "check-config", str(path)],
            capture_output=True,
            timeout=60,
            env=env,
        )
        stdout, stderr = out.stdout.decode("utf-8", "replace"), out.stderr.decode("utf-8", "replace")
        assert "Traceback" not in stderr, stderr[-2000:]
        if expected is None:
            assert out.returncode == 0 and ": ok (" in stdout, (out.returncode, stdout, stderr)
        else:
            assert out.returncode == 2, (out.returncode, stdout, stderr)
            assert stdout.splitlines() == expected, (stdout, expected)
            assert f"{len(expected)} problem(s) found" in stderr
        seen[out.returncode] += 1

    each()
    print(f"\ncheck-config: exit codes {seen}")
    assert seen[0] >= 1 and seen[2] >= 5
