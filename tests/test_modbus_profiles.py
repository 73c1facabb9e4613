"""Modbus RTU mapping in profiles and config, validated once at the edge with clear messages; and the pure codec
(register values, read planning, RTU frame lengths, the hunt for a reply in noise)."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from pymodbus.client.mixin import ModbusClientMixin

from gatewayd.config import load_config
from gatewayd.config.loader import MODBUS_SIMULATORS
from gatewayd.config.models import SerialBusConfig
from gatewayd.config.profiles import Profile, TelemetryPoint
from gatewayd.devices.modbus_codec import (
    decode_registers,
    encode_registers,
    find_reply,
    frame_length,
    plan_reads,
    to_engineering,
    to_raw,
    with_crc,
)
from gatewayd.devices.modbus_sim import MODELS
from gatewayd.errors import ConfigError
from tests.conftest import ROOT

READ = {"actuates": False, "modbus": {"read": "telemetry"}}


def _profile(actions: dict[str, Any], telemetry: dict[str, Any] | None = None, **extra: Any) -> Profile:
    return Profile.model_validate(
        {"name": "dev", "kind": "modbus_rtu", "actions": actions, "telemetry": telemetry or {}, **extra}
    )


def _problem(actions: dict[str, Any], telemetry: dict[str, Any] | None = None, **extra: Any) -> str:
    with pytest.raises(ValidationError) as info:
        _profile(actions, telemetry, **extra)
    return str(info.value)


def test_the_shipped_profiles_map_the_real_devices() -> None:
    meter = Profile.model_validate({"name": "eastron_sdm120", **_toml(ROOT / "hardware/profiles/eastron_sdm120.toml")})
    registers = {
        name: (p.modbus.table, p.modbus.address, p.modbus.register_type)
        for name, p in meter.telemetry.items()
        if p.modbus
    }
    assert registers["voltage"] == ("input", 0x0000, "float32")
    assert registers["current"] == ("input", 0x0006, "float32")
    assert registers["active_power"] == ("input", 0x000C, "float32")
    assert registers["frequency"] == ("input", 0x0046, "float32")
    assert registers["import_energy"] == ("input", 0x0048, "float32")
    assert meter.telemetry["voltage"].unit == "V" and meter.poll_interval_s == 10
    relay = Profile.model_validate(
        {"name": "waveshare_relay8", **_toml(ROOT / "hardware/profiles/waveshare_relay8.toml")}
    )
    coils = {
        name: (a.modbus.address, a.modbus.value) for name, a in relay.actions.items() if a.modbus and a.modbus.write
    }
    assert coils["on1"] == (0, True) and coils["off8"] == (7, False) and coils["all_off"] == (0xFF, False)
    assert relay.safety.off_action == "all_off" and relay.actions["all_off"].safe
    files = (ROOT / "hardware/profiles").glob("*.toml")
    shipped = [Profile.model_validate({"name": f.stem, **_toml(f)}) for f in files]
    modbus = {p.simulator for p in shipped if p.kind == "modbus_rtu"}
    assert sorted(MODELS) == sorted(MODBUS_SIMULATORS) == sorted(modbus), "each shipped Modbus profile is simulated"


def _shipped(name: str) -> Profile:
    return Profile.model_validate({"name": name, **_toml(ROOT / f"hardware/profiles/{name}.toml")})


def _points(profile: Profile) -> dict[str, tuple[str, int, str, str]]:
    return {
        name: (p.modbus.table, p.modbus.address, p.modbus.register_type, p.modbus.word_order)
        for name, p in profile.telemetry.items()
        if p.modbus
    }


def test_the_tcp_profiles_follow_the_register_maps_they_cite() -> None:
    """Addresses on the wire (the manuals number from 1), types and word order, against the documents each profile
    names at its top."""
    for name, document in [
        ("eastron_sdm630", "SDM630 Modbus Protocol"),
        ("fronius_symo", "Fronius Datamanager Modbus TCP & RTU"),
        ("advantech_adam6017", "ADAM-6000 Series User Manual"),
    ]:
        header = (ROOT / f"hardware/profiles/{name}.toml").read_text().split("\nkind")[0]
        assert f"Register map: {'Advantech' if 'adam' in name else name.split('_')[0].capitalize()}" in header, name
        assert document in " ".join(header.replace("# ", "").split()), name

    meter = _shipped("eastron_sdm630")
    m = _points(meter)
    for phase, (volts, amps, watts, pf) in enumerate([(0x00, 0x06, 0x0C, 0x1E), (0x02, 0x08, 0x0E, 0x20)], 1):
        assert m[f"voltage_l{phase}"] == ("input", volts, "float32", "big")  # 30001, 30003
        assert m[f"current_l{phase}"][:2] == ("input", amps)  # 30007, 30009
        assert m[f"power_l{phase}"][:2] == ("input", watts)  # 30013, 30015
        assert m[f"power_factor_l{phase}"][:2] == ("input", pf)  # 30031, 30033
    assert m["total_power"][:2] == ("input", 0x34) and m["frequency"][:2] == ("input", 0x46)  # 30053, 30071
    assert m["import_energy"][:2] == ("input", 0x48) and m["export_energy"][:2] == ("input", 0x4A)  # 30073, 30075
    assert meter.telemetry["import_energy"].unit == "kWh" and meter.telemetry["frequency"].unit == "Hz"
    demand = meter.actions["set_demand_period"].modbus
    assert demand is not None and (demand.address, demand.function_code, demand.register_type) == (2, 16, "float32")

    inverter = _shipped("fronius_symo")
    f = _points(inverter)
    assert f["ac_power"] == ("holding", 40091, "float32", "big")  # W, 40092 (model 113, float)
    assert f["energy"][:2] == ("holding", 40101) and f["state"][:3] == ("holding", 40117, "uint16")  # WH, St
    assert inverter.telemetry["power_limit"].modbus is not None
    assert (f["power_limit"][1], inverter.telemetry["power_limit"].modbus.scale) == (40242, 0.01)  # WMaxLimPct
    limit = inverter.actions["set_power_limit"].modbus
    assert limit is not None and (limit.address, limit.scale) == (40242, 0.01)
    assert inverter.actions["connect"].confirm and inverter.actions["disconnect"].safe

    io = _shipped("advantech_adam6017")
    a = _points(io)
    assert [a[f"ai{ch}"][:2] for ch in range(8)] == [("holding", ch) for ch in range(8)]  # 40001-40008
    assert [a[f"ai{ch}_type"][:2] for ch in range(8)] == [("holding", 200 + ch) for ch in range(8)]  # 40201-40208
    assert (a["do0"][:2], a["do1"][:2]) == (("coil", 16), ("coil", 17))  # 00017, 00018
    ai0 = io.telemetry["ai0"].modbus
    assert ai0 is not None and ai0.scale * 65535 + ai0.offset == pytest.approx(20.0), "4-20 mA across 0-65535"


def _toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


@pytest.mark.parametrize(
    ("actions", "telemetry", "extra", "message"),
    [
        (
            {"on": {"modbus": {"write": "coil", "address": 70000, "value": True}}},
            None,
            {},
            "less than or equal to 65535",
        ),
        ({"on": {"modbus": {"write": "coil", "address": -1, "value": True}}}, None, {}, "greater than or equal to 0"),
        (
            {"on": {"modbus": {"write": "coil", "address": 0, "value": 1.5}}},
            None,
            {},
            "a coil takes true or false, not 1.5",
        ),
        (
            {"on": {"modbus": {"write": "coil", "address": 0, "value": True, "scale": 2}}},
            None,
            {},
            "a coil is one bit: scale",
        ),
        (
            {"on": {"modbus": {"write": "holding", "address": 0, "value": True}}},
            None,
            {},
            "holding register takes a number",
        ),
        ({"on": {"modbus": {"write": "coil", "address": 0}}}, None, {}, "exactly one of 'value' (fixed) or 'param'"),
        ({"on": {"modbus": {"write": "coil", "value": True}}}, None, {}, "a write needs an address"),
        ({"on": {"modbus": {"write": "coil", "read": "telemetry"}}}, None, {}, "exactly one of 'write' or 'read'"),
        ({"on": {}}, None, {}, "maps every action to its unit: ['on'] have no 'modbus'"),
        (
            {
                "set": {
                    "params": {"percent": {"type": "int", "min": 0, "max": 100}},
                    "modbus": {"write": "holding", "address": 1, "param": "speed"},
                }
            },
            None,
            {},
            "modbus param 'speed' is not a parameter of this action",
        ),
        (
            {
                "set": {
                    "params": {"level": {"type": "float", "min": 0, "max": 1}},
                    "modbus": {"write": "coil", "address": 1, "param": "level"},
                }
            },
            None,
            {},
            "parameter 'level' must be a bool",
        ),
        (
            {
                "set": {
                    "params": {"percent": {"type": "int", "min": 0, "max": 100}},
                    "modbus": {"write": "holding", "address": 1, "param": "percent", "scale": 0.001},
                }
            },
            None,
            {},
            "gives register values 0..100000, outside uint16",
        ),
        (
            {
                "set": {
                    "params": {"percent": {"type": "int"}},
                    "modbus": {"write": "holding", "address": 1, "param": "percent"},
                }
            },
            None,
            {},
            "needs min and max",
        ),
        (
            {
                "set": {
                    "params": {"a": {"type": "int", "min": 0, "max": 1}, "b": {"type": "int", "min": 0, "max": 1}},
                    "modbus": {"write": "holding", "address": 1, "param": "a"},
                }
            },
            None,
            {},
            "parameters ['b'] are not written",
        ),
        (
            {"set": {"modbus": {"write": "holding", "address": 1, "value": 7, "type": "float32", "function": 6}}},
            None,
            {},
            "a float32 needs function 16",
        ),
        (
            {"set": {"modbus": {"write": "holding", "address": 65535, "value": 7, "type": "uint32"}}},
            None,
            {},
            "runs past register 65535",
        ),
        ({"set": {"modbus": {"write": "holding", "address": 1, "value": -1}}}, None, {}, "outside uint16"),
        (
            {"set": {"modbus": {"write": "holding", "address": 1, "value": 1, "word_order": "little"}}},
            None,
            {},
            "word_order is for 32-bit types",
        ),
        (
            {"read": {"modbus": {"read": "telemetry"}}},
            {"t": {"modbus": {"table": "input", "address": 0}}},
            {},
            "set actuates = false",
        ),
        (
            {"read": {"actuates": False, "modbus": {"read": ["nope"]}}},
            {"t": {"modbus": {"table": "input", "address": 0}}},
            {},
            "reads ['nope'], which are not telemetry points",
        ),
        (
            {"read": READ},
            {"t": {"type": "float"}},
            {},
            "reads every telemetry point from its unit: ['t'] have no 'modbus'",
        ),
        ({"read": READ}, {"t": {"modbus": {"table": "coil", "address": 0}}}, {}, 'set type = "bool"'),
        (
            {"read": READ},
            {"t": {"type": "bool", "modbus": {"table": "coil", "address": 0, "type": "uint16"}}},
            {},
            "a coil is one bit: type",
        ),
        (
            {"read": READ},
            {"t": {"type": "int", "modbus": {"table": "input", "address": 0, "scale": 0.1}}},
            {},
            'set type = "float"',
        ),
        ({"read": READ}, {"t": {"modbus": {"table": "input", "address": 0, "scale": 0}}}, {}, "scale must not be 0"),
        (
            {"read": READ},
            {"t": {"modbus": {"table": "register", "address": 0}}},
            {},
            "'coil', 'discrete', 'holding' or 'input'",
        ),
        ({"read": READ}, {}, {}, "reads the telemetry points, but the profile has none"),
        (
            {"read": {"actuates": False, "modbus": {"read": ["t"]}}},
            {"t": {"modbus": {"table": "input", "address": 0}}},
            {"poll_interval_s": 0},
            "greater than 0",
        ),
    ],
)
def test_mapping_mistakes_are_refused_with_a_clear_message(
    actions: dict[str, Any], telemetry: dict[str, Any] | None, extra: dict[str, Any], message: str
) -> None:
    assert message in _problem(actions, telemetry, **extra)


def test_modbus_mappings_belong_to_modbus_profiles_only() -> None:
    with pytest.raises(ValidationError, match="modbus mappings are for modbus_rtu profiles, not serial_line"):
        Profile.model_validate(
            {
                "name": "p",
                "kind": "serial_line",
                "actions": {"on": {"modbus": {"write": "coil", "address": 0, "value": True}}},
            }
        )
    with pytest.raises(ValidationError, match="poll_interval_s is for modbus_rtu profiles"):
        Profile.model_validate({"name": "p", "kind": "serial_line", "actions": {"on": {}}, "poll_interval_s": 5})


def test_a_well_formed_mapping_is_accepted_with_its_defaults() -> None:
    profile = _profile(
        {
            "set_speed": {
                "params": {"percent": {"type": "float", "min": 0, "max": 100}},
                "modbus": {"write": "holding", "address": 10, "param": "percent", "scale": 0.1, "type": "uint16"},
            },
            "set_limit": {"modbus": {"write": "holding", "address": 20, "value": 1.5, "type": "float32"}},
            "on": {"modbus": {"write": "coil", "address": 0, "value": True}},
            "read": READ,
        },
        {"temp": {"unit": "°C", "modbus": {"table": "input", "address": 3, "type": "int16", "scale": 0.1}}},
        poll_interval_s=2,
    )
    assert profile.actions["set_speed"].modbus.function_code == 6  # type: ignore[union-attr]
    assert profile.actions["set_limit"].modbus.function_code == 16  # type: ignore[union-attr]
    assert profile.actions["on"].modbus.function_code == 5  # type: ignore[union-attr]


# --- config ----------------------------------------------------------------------------------------------------


def _config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[gateway]\nprofiles_dir = "{ROOT}/hardware/profiles"\n{body}')
    return cfg


def test_check_config_refuses_mismatched_protocols_missing_addresses_and_unknown_simulators(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("eastron_sdm120", "sim_pump"):
        (profiles / f"{name}.toml").write_text((ROOT / f"hardware/profiles/{name}.toml").read_text())
    (profiles / "odd_meter.toml").write_text(
        (ROOT / "hardware/profiles/eastron_sdm120.toml")
        .read_text()
        .replace('simulator = "eastron_sdm120"', 'simulator = "pump"')
    )
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[gateway]\nprofiles_dir = "./profiles"\n'
        '[serial.line]\nport = "/dev/ttyUSB0"\n'
        '[serial.rtu]\nport = "/dev/ttyUSB1"\nprotocol = "modbus_rtu"\n'
        '[devices.meter_on_line]\nprofile = "eastron_sdm120"\nbus = "line"\naddress = 1\n'
        '[devices.pump_on_rtu]\nprofile = "sim_pump"\nbus = "rtu"\naddress = 2\n'
        '[devices.meter_no_address]\nprofile = "eastron_sdm120"\nbus = "rtu"\n'
        '[devices.meter_odd_sim]\nprofile = "odd_meter"\nbus = "rtu"\naddress = 3\n'
        '[devices.meter_twice]\nprofile = "eastron_sdm120"\nbus = "rtu"\naddress = 3\n'
    )
    assert_problems(
        cfg,
        "devices.meter_on_line.bus: profile 'eastron_sdm120' speaks modbus_rtu, but bus 'line' is protocol 'gatewayd'",
        "devices.pump_on_rtu.bus: profile 'sim_pump' speaks gatewayd, but bus 'rtu' is protocol 'modbus_rtu'",
        "devices.meter_no_address.address: a serial device needs an address",
        "devices.meter_odd_sim.profile: unknown simulator 'pump'",
        "devices.meter_twice.address: address 3 on rtu is used by meter_odd_sim",
    )


def assert_problems(cfg: Path, *expect: str) -> None:
    """check-config finds these problems in the file, each at the end of a line of its own, and no others."""
    with pytest.raises(ConfigError) as info:
        load_config(cfg, environ={})
    found = [str(p) for p in info.value.problems]
    for line in expect:
        assert any(p.endswith(line) for p in found), (line, found)
    assert len(found) == len(expect), found


def test_serial_framing_and_transaction_rate_settings(tmp_path: Path) -> None:
    cfg = SerialBusConfig(port="/dev/ttyUSB0")
    assert (cfg.protocol, cfg.bytesize, cfg.parity, cfg.stopbits, cfg.transactions_per_s) == (
        "gatewayd",
        8,
        "N",
        1,
        None,
    )
    with pytest.raises(ValidationError, match="bytesize must be 8"):
        SerialBusConfig(port="x", protocol="modbus_rtu", bytesize=7)
    SerialBusConfig(port="x", protocol="gatewayd", bytesize=7, parity="E", stopbits=2)  # the line protocol is ASCII
    for bad in ({"parity": "M"}, {"stopbits": 3}, {"transactions_per_s": 0}, {"transactions_burst": 0}):
        with pytest.raises(ValidationError):
            SerialBusConfig(port="x", **bad)
    path = _config(tmp_path, '[serial.bus1]\nport = "/dev/ttyUSB1"\nprotocol = "modbus"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert any("serial.bus1.protocol" in str(p) and "'gatewayd' or 'modbus_rtu'" in str(p) for p in info.value.problems)


# --- codec: register values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registers", "type_", "order", "raw"),
    [
        ([0xFFFF], "uint16", "big", 65535),
        ([0xFFFF], "int16", "big", -1),
        ([0x8000], "int16", "big", -32768),
        ([0x0001, 0x0002], "uint32", "big", 0x0001_0002),
        ([0x0002, 0x0001], "uint32", "little", 0x0001_0002),
        ([0xFFFF, 0xFFFE], "int32", "big", -2),
        ([0x4366, 0x199A], "float32", "big", 230.1),
        ([0x199A, 0x4366], "float32", "little", 230.1),
    ],
)
def test_register_values_in_both_word_orders(registers: list[int], type_: Any, order: Any, raw: float) -> None:
    assert decode_registers(registers, type_, order) == raw
    assert encode_registers(raw, type_, order) == registers


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from(["big", "little"]))
def test_float32_round_trips_and_agrees_with_pymodbus(value: float, order: Any) -> None:
    registers = encode_registers(value, "float32", order)
    assert registers == ModbusClientMixin.convert_to_registers(
        value, ModbusClientMixin.DATATYPE.FLOAT32, word_order=order
    )
    decoded = decode_registers(registers, "float32", order)
    assert struct.pack(">f", decoded) == struct.pack(">f", value)  # the same float32, in its shortest decimal


@given(st.integers(-(2**31), 2**31 - 1))
def test_int32_round_trips(value: int) -> None:
    assert decode_registers(encode_registers(value, "int32", "little"), "int32", "little") == value


def test_out_of_range_values_are_refused() -> None:
    for raw, type_ in ((65536, "uint16"), (-1, "uint32"), (1.5, "int16"), (math.inf, "float32"), (math.nan, "float32")):
        with pytest.raises(ValueError):
            encode_registers(raw, type_)  # type: ignore[arg-type]


def test_scaling_is_decimal_both_ways() -> None:
    assert to_engineering(2301, 0.1, 0, "float") == 230.1
    assert to_engineering(-400, 0.1, 20, "float") == -20.0
    assert to_engineering(7, 2, 1, "int") == 15
    assert to_raw(55, "uint16", 0.1, 0) == 550
    assert to_raw(20.05, "int16", 0.1, 0) == 200  # half-even rounding of 200.5
    assert to_raw(-20, "int16", 0.1, 20) == -400
    with pytest.raises(ValueError):
        to_raw(7000, "uint16", 0.1, 0)


# --- codec: read planning --------------------------------------------------------------------------------------


def _point(table: str, address: int, **kw: Any) -> TelemetryPoint:
    kind = "bool" if table in ("coil", "discrete") else "float"
    return TelemetryPoint.model_validate({"type": kind, "modbus": {"table": table, "address": address, **kw}})


def test_reads_merge_touching_points_of_one_table_and_never_read_a_gap() -> None:
    points = {
        "v": _point("input", 0, type="float32"),
        "a": _point("input", 2, type="float32"),  # touches v: one request of 4 registers
        "w": _point("input", 12, type="float32"),  # a gap before it: a request of its own
        "c1": _point("coil", 1),
        "c0": _point("coil", 0),
        "t": _point("holding", 5),
    }
    blocks = [(b.table, b.address, b.count, [n for n, _ in b.points]) for b in plan_reads(points)]
    assert blocks == [
        ("coil", 0, 2, ["c0", "c1"]),
        ("holding", 5, 1, ["t"]),
        ("input", 0, 4, ["v", "a"]),
        ("input", 12, 2, ["w"]),
    ]


def test_a_read_never_exceeds_what_one_request_may_carry() -> None:
    points = {f"r{i}": _point("holding", i) for i in range(300)}
    blocks = plan_reads(points)
    assert [b.count for b in blocks] == [125, 125, 50]
    assert sum(len(b.points) for b in blocks) == 300


# --- codec: RTU frames -----------------------------------------------------------------------------------------


def test_frame_lengths_from_headers() -> None:
    assert frame_length(bytes.fromhex("0103000a0002"), request=True) == 8
    assert frame_length(bytes.fromhex("01100000000204"), request=True) == 13
    assert frame_length(bytes.fromhex("011000"), request=True) is None
    assert frame_length(bytes.fromhex("010304"), request=False) == 9
    assert frame_length(bytes.fromhex("0183"), request=False) == 5
    assert frame_length(bytes.fromhex("0105"), request=False) == 8
    assert frame_length(bytes.fromhex("012b"), request=False) == 0  # not a function this module frames
    assert frame_length(b"\x01", request=False) is None


READ_REQUEST = with_crc(bytes.fromhex("010300000002"))  # unit 1, read 2 holding registers from 0
REPLY = with_crc(bytes.fromhex("0103044366199a"))  # 230.1 as float32


@given(st.binary(max_size=200))
def test_the_reply_is_found_after_any_noise(noise: bytes) -> None:
    data = noise + REPLY
    found = find_reply(data, READ_REQUEST)
    assert found is not None
    assert data[found[0] : found[1]] == REPLY


def test_no_reply_until_it_is_complete_and_its_crc_checks() -> None:
    for cut in range(len(REPLY)):
        assert find_reply(REPLY[:cut], READ_REQUEST) is None
    bad = REPLY[:-1] + bytes([REPLY[-1] ^ 1])
    assert find_reply(bad, READ_REQUEST) is None
    assert find_reply(REPLY, with_crc(bytes.fromhex("020300000002"))) is None, "another unit's reply"
    assert find_reply(REPLY, with_crc(bytes.fromhex("010400000002"))) is None, "a reply to another function"
    stub_then_reply = REPLY[:5] + REPLY
    assert find_reply(stub_then_reply, READ_REQUEST) == (5, 5 + len(REPLY))
    exception = with_crc(bytes.fromhex("018302"))
    assert find_reply(b"\x00\xff" + exception, READ_REQUEST) == (2, 7)


def test_a_late_reply_of_another_shape_is_passed_over() -> None:
    one_register = with_crc(bytes.fromhex("010300000001"))
    assert find_reply(REPLY, one_register) is None, "two registers do not answer a read of one"
    answer = with_crc(bytes.fromhex("01030200de"))
    assert find_reply(REPLY + answer, one_register) == (len(REPLY), len(REPLY) + len(answer))
    write = with_crc(bytes.fromhex("0106000a022b"))  # write 555 to holding 10: the reply echoes it
    other_write = with_crc(bytes.fromhex("0106000a0001"))
    assert find_reply(other_write + write, write) == (len(other_write), 2 * len(write))
    coils = with_crc(bytes.fromhex("0101000a0009"))  # 9 coils: 2 bytes of bits
    assert find_reply(with_crc(bytes.fromhex("010101ff")) + with_crc(bytes.fromhex("010102ff01")), coils) == (6, 13)
