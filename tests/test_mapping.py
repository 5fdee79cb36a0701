"""Device -> IRE item mapping (pure): documented samples, every documented type, messy generated devices."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from defender_servicenow.exceptions import ConfigError
from defender_servicenow.mapping import MappingError, load_class_mapping, map_device, payload_digest
from defender_servicenow.models import Device, Firmware, InvalidRecord, parse_device, parse_v3_device

from include.simulators import inventory

MAPPING = load_class_mapping()
SOURCE = "MicrosoftDefenderIoT"


def _device(**fields) -> Device:
    base = dict(source="defender_sensor_1", appliance_name="sensor-1", id=7, name="PLC-Line-7", type="PLC")
    return Device(**{**base, **fields})


def _map(device: Device) -> dict:
    return map_device(device, source_name=SOURCE, mapping=MAPPING)


def _lookups(item: dict, cls: str) -> list[dict]:
    return [entry["values"] for entry in item["lookup"] if entry["className"] == cls]


def _keys(item: dict) -> dict[str, str]:
    return {r["values"]["key"]: r["values"]["value"] for r in item["related"] if r["className"] == "cmdb_key_value"}


def test_documented_sensor_sample():
    device = parse_device(inventory.SAMPLE_SENSOR_DEVICE, source="defender_iot_default", appliance_name="sensor-1",
                          sensor_name="sensor-1")
    item = _map(device)
    assert item["className"] == "cmdb_ci_ot_plc"
    assert item["sys_object_source_info"] == {"source_name": SOURCE, "source_native_key": "defender_iot_default:79"}
    values = item["values"]
    assert values["name"] == "10.4.14.102"
    assert values["model_number"] == "AAAAAAAAAA" and values["firmware_version"] == "20.55"
    assert "serial_number" not in values                     # serial N/A is no serial
    assert not _lookups(item, "cmdb_serial_number")
    assert not _lookups(item, "cmdb_ci_network_adapter")     # macAddresses null
    assert "manufacturer" not in values                       # vendor null
    assert _lookups(item, "cmdb_ci_ip_address") == [{"ip_address": "10.4.14.102", "ip_version": "4"}]
    keys = _keys(item)
    assert keys["defender.protocols"] == "Omron FINS"
    assert keys["defender.authorized"] == "true" and keys["defender.scanner"] == "false"
    assert keys["defender.engineering_station"] == "false"
    assert keys["defender.appliance"] == "sensor-1" and keys["defender.device_id"] == "79"


def test_documented_cm_v3_sample_with_site_zone_purdue_and_times():
    raw = {"u_id": 1, "u_name": "10.10.50.5", "u_vendor": "HILSCHER GMBH", "u_operating_system": "",
           "u_mac_address_objects": [{"u_mac_address": "00:02:a2:1f:1c:59"}],
           "u_ip_address_objects": [{"u_ip_address": "10.10.50.5",
                                     "u_guessed_mac_addresses": [{"u_mac_address": "00:02:a2:1f:1c:59"}]}],
           "u_site": "asd", "u_zone": "asd", "u_purdue_layer": "N/A",
           "u_device_type": {"u_category": "ICS", "u_purdue_layer": "Process Control", "u_name": "PLC"},
           "u_first_discovered": 1664781051000, "u_last_activity": 1664782791000,
           "u_protocol_objects": [{"u_protocol": "MODBUS"}], "u_sensor_ids": [{"u_sensor_id": 1}]}
    device = parse_v3_device(raw, source="defender_cm", appliance_name="cm", sensor_names={1: "sensor-a"})
    item = _map(device)
    assert item["className"] == "cmdb_ci_ot_plc"
    assert item["values"]["manufacturer"] == "HILSCHER GMBH"
    assert item["values"]["first_discovered"] == "2022-10-03 07:10:51"
    assert item["values"]["last_discovered"] == "2022-10-03 07:39:51"
    adapter = _lookups(item, "cmdb_ci_network_adapter")
    assert adapter == [{"name": "00:02:a2:1f:1c:59", "mac_address": "00:02:a2:1f:1c:59", "ip_address": "10.10.50.5"}]
    assert _lookups(item, "cmdb_ci_ip_address") == [
        {"ip_address": "10.10.50.5", "ip_version": "4", "mac_address": "00:02:a2:1f:1c:59"}]
    entity = next(r["values"] for r in item["related"] if r["className"] == "cmdb_ot_entity")
    assert entity == {"ot_asset_type": "PLC", "purdue_level": "1", "ot_correlation_id": "defender_cm:1"}
    keys = _keys(item)
    assert keys["defender.site"] == "asd" and keys["defender.zone"] == "asd"
    assert keys["defender.sensor"] == "sensor-a" and keys["defender.category"] == "ICS"


@pytest.mark.parametrize("device_type", inventory.DEVICE_TYPES)
def test_every_documented_type_has_a_class(device_type):
    cls = MAPPING.class_for(device_type)
    if device_type == "Physical Location":
        assert cls == "skip"
        with pytest.raises(MappingError, match="Physical Location"):
            _map(_device(type=device_type))
    else:
        assert cls.startswith("cmdb_ci_")
        assert _map(_device(type=device_type))["className"] == cls


@pytest.mark.parametrize(("device_type", "os_name", "expected"), [
    ("PLC", None, "cmdb_ci_ot_plc"),
    ("Engineering Station", "Windows 10", "cmdb_ci_ot_ews"),    # OT types keep their class
    ("HMI", "Linux", "cmdb_ci_ot_hmi"),
    ("DCS Controller", None, "cmdb_ci_ot_dcs"),
    ("Alarm System", None, "cmdb_ci_ot_control"),
    ("Fire Alarm", None, "cmdb_ci_iot"),
    ("Server", "Windows Server 2019", "cmdb_ci_win_server"),
    ("Server", "Linux", "cmdb_ci_linux_server"),
    ("DB Server", "HP UX", "cmdb_ci_hpux_server"),
    ("Workstation", "Windows 10 64", "cmdb_ci_computer"),
    ("Workstation", "Mac OS X", "cmdb_ci_osx_server"),
    ("Server", None, "cmdb_ci_server"),
    ("Switch", "Linux", "cmdb_ci_ip_switch"),                  # network types: no OS classification
    ("Something New", None, "cmdb_ci_ot"),
    ("unknown", None, "cmdb_ci_ot"),
    ("plc", None, "cmdb_ci_ot_plc"),                           # case-insensitive
])
def test_class_mapping(device_type, os_name, expected):
    assert MAPPING.class_for(device_type, os_name) == expected


def test_os_goes_to_computer_columns_only():
    server = _map(_device(type="Workstation", operating_system="Windows 10 64"))
    assert server["values"]["os"] == "Windows 10" and server["values"]["os_address_width"] == "64"
    assert "defender.operating_system" not in _keys(server)
    hmi = _map(_device(type="HMI", operating_system="Windows 7"))
    assert "os" not in hmi["values"]
    assert _keys(hmi)["defender.operating_system"] == "Windows 7"


@pytest.mark.parametrize("serial", ["N/A", "0", "00000000", "unknown", "To be filled by O.E.M.", "  "])
def test_placeholder_serials_are_no_serial(serial):
    item = _map(_device(firmware=[Firmware(serial=serial, model="1756-L73")]))
    assert "serial_number" not in item["values"]
    assert not _lookups(item, "cmdb_serial_number")


def test_serial_and_macs_identify_the_ci():
    item = _map(_device(firmware=[Firmware(serial="SN-4711", model="1756-L73", firmware_version="33.11")],
                        mac_addresses=["00:02:a2:1f:1c:59", "00:02:a2:1f:1c:5a"],
                        ip_addresses=["10.1.1.1", "fe80::1"]))
    assert item["values"]["serial_number"] == "SN-4711"
    assert _lookups(item, "cmdb_serial_number") == [
        {"serial_number": "SN-4711", "serial_number_type": "system", "valid": "true"}]
    adapters = _lookups(item, "cmdb_ci_network_adapter")
    assert [a["mac_address"] for a in adapters] == ["00:02:a2:1f:1c:59", "00:02:a2:1f:1c:5a"]
    assert all("ip_address" not in a for a in adapters)          # two MACs: pairing unknown
    assert [(i["ip_address"], i["ip_version"]) for i in _lookups(item, "cmdb_ci_ip_address")] == [
        ("10.1.1.1", "4"), ("fe80::1", "6")]


def test_name_is_cleaned_and_cut_in_the_middle():
    long = "Very-Long-Device-Name-" + "Segment-" * 40
    item = _map(_device(name="  Pumpe\tSüd \x00 " + long + "793"))
    name = item["values"]["name"]
    assert name.startswith("Pumpe Süd Very-Long") and name.endswith("Segment-793") and len(name) == 255
    assert "\x00" not in name and "\t" not in name
    assert _map(_device(name=long + "993"))["values"]["name"] != _map(_device(name=long + "793"))["values"]["name"]


def test_native_key_and_source_name_are_stable():
    a, b = _map(_device(id=12)), _map(_device(id=12, name="renamed"))
    assert a["sys_object_source_info"] == b["sys_object_source_info"]
    assert a["sys_object_source_info"]["source_native_key"] == "defender_sensor_1:12"


def test_digest_changes_with_attributes_but_not_with_recent_activity():
    seen = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
    base = payload_digest(_map(_device(last_seen=seen)))
    assert payload_digest(_map(_device(last_seen=seen.replace(hour=9)))) == base     # same day
    assert payload_digest(_map(_device(last_seen=seen.replace(day=2)))) != base      # a day later
    assert payload_digest(_map(_device(last_seen=seen, vendor="Siemens"))) != base
    assert payload_digest(_map(_device(last_seen=seen, protocols=["MODBUS"]))) != base


GENERATED = [parse_device(raw, source="defender_iot_default", appliance_name="sensor-1", sensor_name="sensor-1")
             for raw in inventory.generate_devices(400, seed=3)]


@pytest.mark.parametrize("chunk", range(8))
def test_messy_generated_devices_map_or_fail_with_a_reason(chunk):
    for device in GENERATED[chunk::8]:
        if isinstance(device, InvalidRecord):
            assert device.reason
            continue
        try:
            item = _map(device)
        except MappingError as exc:
            assert str(exc)
            continue
        values = item["values"]
        assert values["name"] and len(values["name"]) <= 255
        assert item["className"].startswith("cmdb_ci_")
        for adapter in _lookups(item, "cmdb_ci_network_adapter"):
            mac = adapter["mac_address"]
            assert mac == mac.lower() and len(mac) == 17 and mac.count(":") == 5 and adapter["name"] == mac
        if "serial_number" in values:
            assert not MAPPING.is_placeholder_serial(values["serial_number"])
        assert all(isinstance(v, str) for v in values.values())
        assert payload_digest(item) == payload_digest(_map(device))      # deterministic


def test_bad_mapping_file_is_a_plain_config_error(tmp_path):
    path = tmp_path / "class_mapping.yaml"
    path.write_text("types:\n  PLC: 'not a class'\n")
    with pytest.raises(ConfigError, match="PLC.*not a CMDB class name"):
        load_class_mapping(path)
    path.write_text("types: [1, 2]\n")
    with pytest.raises(ConfigError, match="types"):
        load_class_mapping(path)


def test_without_identifiers_moves_shared_serial_and_macs_to_key_values():
    from defender_servicenow.mapping import identifiers, without_identifiers

    item = {"className": "cmdb_ci_ot_plc", "values": {"name": "PLC", "serial_number": "SN-1"},
            "lookup": [{"className": "cmdb_serial_number", "values": {"serial_number": "SN-1"}},
                       {"className": "cmdb_ci_network_adapter", "values": {"name": "aa:bb:cc:00:00:01",
                                                                          "mac_address": "aa:bb:cc:00:00:01"}},
                       {"className": "cmdb_ci_network_adapter", "values": {"name": "aa:bb:cc:00:00:02",
                                                                          "mac_address": "aa:bb:cc:00:00:02"}},
                       {"className": "cmdb_ci_ip_address", "values": {"ip_address": "10.0.0.1"}}],
            "related": []}
    assert identifiers(item) == ["serial:sn-1", "mac:aa:bb:cc:00:00:01", "mac:aa:bb:cc:00:00:02"]
    out = without_identifiers(item, {"serial:sn-1", "mac:aa:bb:cc:00:00:01"})
    assert "serial_number" not in out["values"]
    assert [x["className"] for x in out["lookup"]] == ["cmdb_ci_network_adapter", "cmdb_ci_ip_address"]
    assert identifiers(out) == ["mac:aa:bb:cc:00:00:02"]
    assert {r["values"]["key"]: r["values"]["value"] for r in out["related"]} == {
        "defender.shared_serial": "SN-1", "defender.shared_mac_addresses": "aa:bb:cc:00:00:01"}
    assert item["values"]["serial_number"] == "SN-1"   # the input is not changed
    assert without_identifiers(item, set())["lookup"] == item["lookup"]
