"""The local rule-based interpreter: sentences generated from the device profiles, the user's rules file, numbers
and durations, its answer validated like any command, its rules file checked at the edge, and hassil imported
only when the interpreter is built."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayd.errors import ValidationFailed
from gatewayd.interpret.errors import NotUnderstood
from gatewayd.interpret.local import LocalQuestion, LocalRefusal, LocalRules, parse_number
from gatewayd.interpret.registry import check_answer
from gatewayd.interpret.rules import RulesFile, check_rules, read_rules, template_problem
from tests.conftest import CONFIG, ROOT
from tests.interpret_kit import DEVICES, Rig, profiles, registry, settings

RULES = RulesFile.model_validate(
    {
        "names": {"pump1": ["irrigation pump"], "fan2": ["ceiling fan"]},
        "verbs": {"start": ["water with"]},
        "sentences": [
            {
                "device": "pump1",
                "action": "set_speed",
                "templates": ["water (gently|slowly)"],
                "params": {"percent": 30},
            },
            {"device": "pump1", "action": "start", "templates": ["water the garden [for <duration>]"]},
            {"device": "pump1", "action": "set_speed", "templates": ["water at {percent} [percent]"]},
        ],
    }
)


@pytest.fixture(scope="module")
def local() -> LocalRules:
    return LocalRules.build(registry(RULES))


@pytest.mark.parametrize(
    "text, number",
    [
        ("40", 40),
        ("-2.5", -2.5),
        (".5", 0.5),
        ("forty five", 45),
        ("forty-five", 45),
        ("a hundred", 100),
        ("two thousand and ten", 2010),
        ("an", 1),
        ("zero", 0),
        ("ninety nine", 99),
        ("fast", None),
        ("40 banana", None),
        ("", None),
        ("hundred", None),
        ("a", 1),
    ],
)
def test_numbers(text: str, number: float | None) -> None:
    assert parse_number(text) == number


@pytest.mark.parametrize(
    "text, device, action, params, duration",
    [
        ("switch the irrigation pump on for 10 minutes", "pump1", "start", {}, 600.0),
        ("Switch the Irrigation Pump on for ten minutes!", "pump1", "start", {}, 600.0),
        ("set fan 2 to 40 percent", "fan2", "set", {"percent": 40.0}, None),
        ("set fan 2 to 40%", "fan2", "set", {"percent": 40.0}, None),
        ("set the ceiling fan level to 12.5 percent", "fan2", "set", {"percent": 12.5}, None),
        ("turn on relay 1 for an hour", "relay1", "on", {}, 3600.0),
        ("turn relay1 off", "relay1", "off", {}, None),
        ("please stop pump 1", "pump1", "stop", {}, None),
        ("start pump1", "pump1", "start", {}, None),
        ("set the speed of pump 1 to fifty", "pump1", "set_speed", {"percent": 50.0}, None),
        (
            "set pump1 speed to 55 percent with ramp 5 seconds",
            "pump1",
            "set_speed",
            {"percent": 55.0, "ramp_s": 5.0},
            None,
        ),
        ("check the irrigation pump", "pump1", "read", {}, None),
        ("read pump 1", "pump1", "read", {}, None),
        ("water gently", "pump1", "set_speed", {"percent": 30}, None),
        ("water at 70 percent", "pump1", "set_speed", {"percent": 70.0}, None),
        ("water with the irrigation pump for 90 seconds", "pump1", "start", {}, 90.0),
        ("water the garden for 2 hours", "pump1", "start", {}, 7200.0),
        ("water the garden", "pump1", "start", {}, None),
    ],
)
def test_everyday_phrasings(
    local: LocalRules, text: str, device: str, action: str, params: dict[str, Any], duration: float | None
) -> None:
    match = local.match(text)
    assert match is not None, text
    assert (match.device, match.action, match.params, match.duration_s) == (device, action, params, duration)
    check_answer(match.answer(), local.registry)  # and it is a valid command


@pytest.mark.parametrize(
    "text",
    [
        "make me a coffee",
        "set fan 2 to fast",  # not a number
        "turn on the toaster",  # no such device
        "switch the fan 2 on for -5 minutes",
        "read pump 1 for 10 minutes",  # a read takes no duration
        "set pump 1 to 40 percent and also open the valve",
    ],
)
def test_what_the_rules_do_not_understand(local: LocalRules, text: str) -> None:
    assert local.match(text) is None


def test_capabilities_give_an_example_of_every_action(local: LocalRules) -> None:
    pairs = {(c["device"], c["action"]) for c in local.capabilities}
    known = profiles()
    assert pairs == {(name, action) for name, profile in DEVICES.items() for action in known[profile].actions}
    for capability in local.capabilities:  # each example is itself understood as what it illustrates
        match = local.match(capability["example"])
        assert match is not None and (match.device, match.action) == (capability["device"], capability["action"])
    assert {c["device"] for c in local.capabilities if c.get("takes_duration")} == {"pump1", "relay1", "fan2"}


async def test_a_match_that_fails_validation_is_the_validation_error_not_a_guess(tmp_path: Path) -> None:
    async with Rig(tmp_path / "db", settings({}), reg=registry(RULES)) as rig:
        with pytest.raises(ValidationFailed) as caught:
            await rig.ask("set fan 2 to 140 percent")
        assert caught.value.details["errors"] == [
            {"field": "params.percent", "message": "must be at most 100 %", "value": 140.0}
        ]
        with pytest.raises(NotUnderstood):
            await rig.ask("fan 2 do a barrel roll")


def test_matching_stays_fast_on_long_and_hostile_text(local: LocalRules) -> None:
    texts = ["set fan 2 to " + "forty " * 80, "turn " * 100 + "on pump 1", "x" * 500, "set set set " * 40]
    for text in texts:
        started = time.perf_counter()
        local.match(text)
        assert time.perf_counter() - started < 0.5, text[:40]


def test_rules_file_problems_name_their_key(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        """
[names]
pump9 = ["ghost pump"]
[verbs]
explode = ["blow up"]
[[sentences]]
device = "pump1"
action = "set_speed"
templates = ["water (gently", "water at {speed}", "water <somehow>"]
params = { percent = 300 }
[[sentences]]
device = "relay1"
action = "dance"
templates = ["dance"]
"""
    )
    rules, problems = read_rules(path)
    assert problems == []
    device_profiles = {name: profiles()[p] for name, p in DEVICES.items()}
    found = dict(check_rules(rules, device_profiles))
    assert found == {
        "names.pump9": "no device named 'pump9'",
        "verbs.explode": "no device has an action 'explode'",
        "sentences.0.params.percent": "must be at most 100 %",
        "sentences.0.templates.0": "unclosed '('",
        "sentences.0.templates.1": "{speed} is not a parameter of 'set_speed'",
        "sentences.0.templates.2": "<somehow> is not a known rule (use <device> or <duration>)",
        "sentences.1.action": "device 'relay1' has no action 'dance'",
    }
    assert template_problem("a ] b") == "unbalanced ']'" and template_problem("( | )") == "matches nothing"
    path.write_text("extra = 1\n[names]\npump1 = ['the (best) pump']\n")
    _, problems = read_rules(path)
    assert {key for key, _ in problems} == {"names.pump1.0", "extra"}


def test_check_config_reports_rules_file_problems(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[names]\npump9 = ["ghost"]\n')
    env = {"PATH": "/usr/bin:/bin", "GATEWAYD_INTERPRET__RULES_FILE": str(rules)}
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 2
    assert f"{rules}: names.pump9: no device named 'pump9'" in out.stdout


def test_the_bundled_rules_file_is_valid_and_understood() -> None:
    rules, problems = read_rules(ROOT / "hardware" / "interpret_rules.toml")
    assert problems == []
    local = LocalRules.build(registry(rules))
    match = local.match("switch the irrigation pump on for 10 minutes")
    assert match is not None and (match.device, match.action, match.duration_s) == ("pump1", "start", 600.0)
    match = local.match("open the garden valve")
    assert match is None or match.device == "relay1"


def test_hassil_is_imported_only_when_the_local_rules_are_built() -> None:
    code = "import sys; import gatewayd.app.supervisor, gatewayd.interpret.service; print('hassil' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_channel_labels_are_checked_against_the_profile(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    text = (ROOT / "config.toml").read_text()
    text = text.replace(
        'channels = { 3 = "greenhouse valve", 4 = "nursery valve" }', 'channels = { 9 = "ghost valve" }'
    )
    text = text.replace(
        '[devices.relay1]\nprofile = "gpio_relay"', '[devices.relay1]\nprofile = "gpio_relay"\nchannels = { 1 = "x" }'
    )
    config.write_text(text.replace('"./', f'"{ROOT}/'))
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2, out.stdout
    assert "devices.relays1.channels.9: profile 'waveshare_relay8' has channels 1 to 8" in out.stdout
    assert "devices.relay1.channels.1: profile 'gpio_relay' has no channels" in out.stdout


@pytest.mark.parametrize(
    "text, reason",
    [
        ("don't start the pump", "negated"),
        ("start pump 1 and turn on relay 1", "several_commands"),
        ("switch on the fan 2 and the pump", "several_commands"),
        ("turn on pump 2", "unexplained_number"),
        ("set fan 2 to four fifty", "unexplained_number"),
        ("turn on the pump in 10 minutes", "scheduled"),
    ],
)
def test_refusals_say_why(local: LocalRules, text: str, reason: str) -> None:
    found = local.understand(text)
    assert isinstance(found, LocalRefusal) and found.reason == reason, found


def test_a_question_is_not_a_command(local: LocalRules) -> None:
    found = local.understand("is pump 1 running?")
    assert isinstance(found, LocalQuestion) and [a.device for a in found.about] == ["pump1"]
    assert found.expects == "on" and local.match("is pump 1 running?") is None
