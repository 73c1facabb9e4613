"""``gatewayd scan``: the unit ids that answer on a Modbus TCP host, an RTU line and RTU over TCP, each found unit's
points read once through a profile and printed with their units; a unit that answers but is not the profile's
device told apart from silence; a host that refuses; and the command itself, run in mock mode on the example
config."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.config.models import SerialBusConfig
from gatewayd.config.profiles import Profile
from gatewayd.devices.modbus_scan import (
    EXIT_FOUND,
    EXIT_NONE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    parse_units,
    scan,
    serial_job,
    tcp_job,
)
from gatewayd.devices.modbus_sim import ModbusSimulator, ModbusUnit, Sdm630Model
from gatewayd.devices.modbus_tcp_sim import ModbusTcpSimulator
from tests.conftest import ROOT
from tests.test_modbus import PlantModel, _plant

EXAMPLE = ROOT / "hardware" / "examples" / "modbus_tcp.toml"


def _sdm630() -> Profile:
    import tomllib

    data = tomllib.loads((ROOT / "hardware/profiles/eastron_sdm630.toml").read_text())
    return Profile.model_validate({"name": "eastron_sdm630", **data})


def _units(tmp_path: Path) -> dict[int, ModbusUnit]:
    """A meter at 1, a unit that stays silent at 3, and a plant controller at 4: another device, without the
    meter's registers."""
    return {
        1: ModbusUnit("meter", 1, Sdm630Model(1), tmp_path / "meter.jsonl"),
        3: _plant(tmp_path, 3, mute=True),
        4: _plant(tmp_path, 4, model=PlantModel()),
    }


async def test_scan_finds_the_units_that_answer_and_reads_the_profile_from_each(tmp_path: Path) -> None:
    out = io.StringIO()
    async with ModbusTcpSimulator("host", _units(tmp_path)) as host:
        job = tcp_job("127.0.0.1", host.port, framer="socket", timeout_s=0.2, units=range(1, 6), profile=_sdm630())
        assert await scan(job, out) == EXIT_FOUND
    lines = out.getvalue().splitlines()
    assert (
        lines[0] == f"scanning 127.0.0.1:{host.port} (Modbus TCP), 5 unit id(s), 0.2 s timeout, profile eastron_sdm630"
    )
    assert lines[1] == "unit 1: answers"
    readings = {line.split()[0]: line.split()[1:] for line in lines[2:26]}
    assert set(readings) == set(_sdm630().telemetry)
    assert readings["voltage_l1"][1] == "V" and 215 <= float(readings["voltage_l1"][0]) <= 245
    assert readings["import_energy"] == ["48213.6", "kWh"] and readings["power_factor_l1"] == ["0.95"]
    assert lines[26] == (
        "unit 4: answers, but not as eastron_sdm630 expects: unit 4 on scan answered read input 0+36 with exception 2"
        " (illegal_address)"
    )
    assert lines[27] == "2 unit(s) answered: 1, 4"


async def test_scan_without_a_profile_counts_an_exception_as_an_answer(tmp_path: Path) -> None:
    out = io.StringIO()
    async with ModbusTcpSimulator("host", _units(tmp_path)) as host:
        job = tcp_job("127.0.0.1", host.port, framer="socket", timeout_s=0.2, units=[1, 2, 3, 4], profile=None)
        assert await scan(job, out, as_json=True) == EXIT_FOUND
    found = json.loads(out.getvalue())
    assert found == [
        {"unit": 1, "values": {}, "refused": None},  # the meter has no holding register 0: exception 2, but there
        {"unit": 4, "values": {}, "refused": None},
    ]


async def test_scan_over_an_rtu_line_and_rtu_over_tcp(tmp_path: Path) -> None:
    profile = _sdm630()
    for framing in ("serial", "rtu"):
        units = {1: ModbusUnit("meter", 1, Sdm630Model(1), tmp_path / "m.jsonl"), 3: _plant(tmp_path, 3, mute=True)}
        out = io.StringIO()
        if framing == "serial":
            async with ModbusSimulator("line", units) as line:
                cfg = SerialBusConfig(port=line.port, protocol="modbus_rtu", response_timeout_s=0.2)
                assert await scan(serial_job(cfg, [1, 2, 3], profile), out, as_json=True) == EXIT_FOUND
        else:
            async with ModbusTcpSimulator("server", units, framer="rtu") as host:
                job = tcp_job("127.0.0.1", host.port, framer="rtu", timeout_s=0.2, units=[1, 2, 3], profile=profile)
                assert await scan(job, out, as_json=True) == EXIT_FOUND
        (meter,) = json.loads(out.getvalue())
        assert meter["unit"] == 1 and meter["refused"] is None, framing
        assert meter["values"]["frequency"]["unit"] == "Hz" and 49.9 <= meter["values"]["frequency"]["value"] <= 50.1


async def test_scan_of_a_host_that_refuses_or_where_nobody_answers(tmp_path: Path) -> None:
    async with ModbusTcpSimulator("host", {3: _plant(tmp_path, 3, mute=True)}) as host:
        out = io.StringIO()
        job = tcp_job("127.0.0.1", host.port, framer="socket", timeout_s=0.1, units=[1, 2, 3], profile=None)
        assert await scan(job, out) == EXIT_NONE
        assert out.getvalue().splitlines()[-1] == "0 unit(s) answered: none"
        await host.refuse()
        out = io.StringIO()
        assert await scan(job, out) == EXIT_UNREACHABLE
        assert (
            out.getvalue().splitlines()[-1] == f"gatewayd: cannot connect to 127.0.0.1:{host.port}: Connection refused"
        )


def test_unit_lists() -> None:
    assert parse_units("1-3,7,2,255") == [1, 2, 3, 7, 255]
    for bad in ("0-300", "5-1", "x", "1-"):
        with pytest.raises(ValueError):
            parse_units(bad)
    with pytest.raises(ValueError, match="0 to 247"):
        parse_units("248", highest=247)


def _gatewayd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def test_the_scan_command_on_the_example_config_in_mock_mode() -> None:
    """A technician's first look, here at the example's inverter connection: mock mode starts the simulated host
    the daemon would run and scans it."""
    done = _gatewayd(
        "scan", "--config", str(EXAMPLE), "--bus", "inverter", "--units", "1-2", "--timeout", "0.2",
        "--profile", "fronius_symo", "--json",
    )  # fmt: skip
    assert done.returncode == EXIT_FOUND, done.stderr
    assert "mock mode: scanning the simulated inverter" in done.stderr
    (inverter,) = json.loads(done.stdout)
    values = inverter["values"]
    assert inverter["unit"] == 1 and values["ac_power"]["unit"] == "W" and values["energy"]["unit"] == "Wh"
    assert values["power_limit"] == {"value": 100.0, "unit": "%"} and values["state"]["value"] in (2, 4)
    refused = _gatewayd("scan", "--host", "127.0.0.1", "--units", "300")
    assert refused.returncode == EXIT_USAGE and "unit ids are 0 to 255" in refused.stderr
    unknown = _gatewayd("scan", "--host", "127.0.0.1", "--profile", "no_such_device")
    assert unknown.returncode == EXIT_USAGE and "no profile 'no_such_device'" in unknown.stderr
