"""Normalised Defender models: the documented sample responses (copied from defender-api.md) and each quirk."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone

import pytest
from defender_servicenow.models import (
    Alert,
    Device,
    Firmware,
    InvalidRecord,
    merge_v1_extras,
    normalize_mac,
    parse_alert,
    parse_device,
    parse_v3_device,
    v1_extras,
)

SRC, NAME = "defender_iot_default", "sensor-1"


def utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


# --------------------------------------------------------------------------- documented samples (defender-api.md)

# §3.1 GET /api/v1/devices (verbatim, one array item)
SENSOR_DEVICES = json.loads("""[{
    "vendor": null, "name": "10.4.14.102",
    "firmware": [
        {"slot": "N/A", "additionalData": "N/A", "moduleAddress": "Network: Local network (0), Node: 0, Unit: CPU (0x0)",
         "rack": "N/A", "address": "10.4.14.102", "model": "AAAAAAAAAA", "serial": "N/A", "firmwareVersion": "20.55"},
        {"slot": "N/A", "additionalData": "N/A",
         "moduleAddress": "Network: Local network (0), Node: 0, Unit: Unknown (0x3)",
         "rack": "N/A", "address": "10.4.14.102", "model": "AAAAAAAAAAAAAAAAAAAA", "serial": "N/A",
         "firmwareVersion": "20.55"},
        {"slot": "N/A", "additionalData": "N/A", "moduleAddress": "Network: Local network (0), Node: 3, Unit: CPU (0x0)",
         "rack": "N/A", "address": "10.4.14.102", "model": "AAAAAAAAAAAAAAAAAAAA", "serial": "N/A",
         "firmwareVersion": "20.55"},
        {"slot": "N/A", "additionalData": "N/A", "moduleAddress": "Network: 3, Node: 0, Unit: CPU (0x0)",
         "rack": "N/A", "address": "10.4.14.102", "model": "AAAAAAAAAAAAAAAAAAAA", "serial": "N/A",
         "firmwareVersion": "20.55"}
    ],
    "id": 79, "macAddresses": null, "authorized": true, "ipAddresses": ["10.4.14.102"],
    "engineeringStation": false, "type": "PLC", "operatingSystem": null,
    "protocols": [{"addresses": [], "id": 62, "name": "Omron FINS"}],
    "scanner": false
}]""")

# §4.1 GET /external/v1/devices: the same device plus sensorId/zoneId/siteId
CM_DEVICE = {"sensorId": 7, "zoneId": 1, "siteId": 1, **copy.deepcopy(SENSOR_DEVICES[0])}

# §3.4 sensor alerts, verbatim except the docs' trailing comma (the lower-case key is kept on purpose)
SENSOR_ALERTS = json.loads(r"""[
    {"engine": "Policy Violation", "severity": "Major", "title": "Internet Access Detected",
     "additionalinformation": {"information": ["170.60.50.201 over port BACnet (47808)"],
                               "description": "External Addresses"},
     "sourceDevice": null, "destinationDevice": null, "time": 1509881077000,
     "message": "Device 192.168.0.13 tried to access an external IP address which is an address in the Internet and is not allowed by policy. It is recommended to notify the security officer of the incident.",
     "id": 1},
    {"engine": "Protocol Violation", "severity": "Major", "title": "Illegal MODBUS Operation (Exception Raised by Master)",
     "sourceDevice": 3, "destinationDevice": 4, "time": 1505651605000,
     "message": "A MODBUS master 192.168.110.131 attempted to initiate an illegal operation.\nThe operation is considered to be illegal since it incorporated function code #129 which should not be used by a master.\nIt is recommended to notify the security officer of the incident.",
     "id": 2, "additionalInformation": null}
]""")

# §4.2 management console v1 alerts (verbatim, first two)
CM_ALERTS = json.loads(r"""[
    {"engine": "Operational", "handled": false, "title": "Traffic Detected on sensor Interface",
     "additionalInformation": null, "sourceDevice": 0, "zoneId": 1, "siteId": 1, "time": 1594808245000,
     "sensorId": 1, "message": "The sensor resumed detecting network traffic on ens224.", "destinationDevice": 0,
     "id": 1, "severity": "Warning"},
    {"engine": "Anomaly", "handled": false, "title": "Address Scan Detected", "additionalInformation": null,
     "sourceDevice": 4, "zoneId": 1, "siteId": 1, "time": 1594808260000, "sensorId": 1,
     "message": "Address scan detected.\nScanning address: 10.10.10.22\nIt is recommended to notify the security officer of the incident.",
     "destinationDevice": 0, "id": 2, "severity": "Critical"}
]""")

# §4.8 GET /external/v3/integration/devices/<timestamp> (first device, verbatim)
V3_DEVICE = json.loads("""{
    "u_operating_system": "",
    "u_ip_address_objects": [{"u_ip_address": "10.10.50.5",
                              "u_guessed_mac_addresses": [{"u_mac_address": "00:02:a2:1f:1c:59"}]}],
    "u_zone": "asd", "u_name": "10.10.50.5", "u_mac_address_objects": [{"u_mac_address": "00:02:a2:1f:1c:59"}],
    "u_last_update": 1664782919000, "u_vendor": "HILSCHER GMBH",
    "u_cm_device_url": "https://<IP address>/#/sites/1/zones/1/devices-maps?devices=1",
    "u_sensor_ids": [{"u_sensor_id": 1}], "u_appliance": "Management console (CM)", "u_site": "asd",
    "u_device_type": {"u_category": "ICS", "u_purdue_layer": "Process Control", "u_name": "PLC"},
    "u_firmwares": [], "u_last_activity": 1664782791000, "u_purdue_layer": "N/A",
    "u_device_urls": [{"u_device_url": "https://<IP address>9/#/assets/highlight/1"}],
    "u_vlans": [{"u_vlan": "1"}], "u_groups": ["asd"], "u_first_discovered": 1664781051000, "u_id": 1,
    "u_protocol_objects": [{"u_protocol": "MODBUS"}]
}""")


def test_sensor_sample_device():
    device = parse_device(SENSOR_DEVICES[0], source=SRC, appliance_name=NAME, sensor_name=NAME)
    assert isinstance(device, Device)
    assert (device.id, device.name, device.type, device.vendor, device.operating_system) == (
        79, "10.4.14.102", "PLC", None, None)
    assert device.ip_addresses == ["10.4.14.102"] and device.mac_addresses == []
    assert device.protocols == ["Omron FINS"]
    assert (device.authorized, device.scanner, device.engineering_station) == (True, False, False)
    assert device.has_dynamic_address is None  # not in the sample: unknown, not False
    assert device.firmware[0] == Firmware(address="10.4.14.102",
                                          module_address="Network: Local network (0), Node: 0, Unit: CPU (0x0)",
                                          model="AAAAAAAAAA", firmware_version="20.55")
    assert len(device.firmware) == 4
    assert all(fw.serial is None and fw.rack is None and fw.slot is None for fw in device.firmware)
    assert device.sensor_name == NAME and device.sensor_id is None and device.site_id is None
    assert device.native_key == f"{SRC}:79" and device.issues == []


def test_cm_sample_device_sensor_site_zone():
    device = parse_device(CM_DEVICE, source="cm", appliance_name="cm-1", sensor_names={7: "Line 7"})
    assert (device.sensor_id, device.zone_id, device.site_id, device.sensor_name) == (7, 1, 1, "Line 7")
    assert device.native_key == "cm:79"


def test_v3_sample_device():
    device = parse_v3_device(V3_DEVICE, source="cm", appliance_name="cm-1", sensor_names={1: "Microsoft Defender for IoT"})
    assert isinstance(device, Device)
    assert (device.id, device.name, device.type, device.category) == (1, "10.10.50.5", "PLC", "ICS")
    assert device.vendor == "HILSCHER GMBH" and device.operating_system is None  # "" -> None
    assert device.purdue_level == "Process Control"  # u_purdue_layer "N/A" -> the type's default layer
    assert (device.site_name, device.zone_name) == ("asd", "asd")
    assert device.mac_addresses == ["00:02:a2:1f:1c:59"] and device.ip_addresses == ["10.10.50.5"]
    assert device.protocols == ["MODBUS"]
    assert (device.sensor_id, device.sensor_name) == (1, "Microsoft Defender for IoT")
    assert device.first_seen == utc(1664781051000) and device.last_seen == utc(1664782791000)
    assert device.first_seen.tzinfo is not None
    assert device.authorized is None and device.firmware == []  # v3 does not say: unknown


def test_v3_manual_purdue_layer_wins_and_guessed_macs_ignored():
    raw = copy.deepcopy(V3_DEVICE)
    raw["u_purdue_layer"] = "Supervisory"
    raw["u_mac_address_objects"] = []
    device = parse_v3_device(raw, source="cm", appliance_name="cm")
    assert device.purdue_level == "Supervisory"
    assert device.mac_addresses == []  # the guessed MAC (often the router's) is not the device's


def test_merge_v1_extras_into_v3():
    v1 = parse_device({**CM_DEVICE, "id": 1, "hasDynamicAddress": True}, source="cm", appliance_name="cm")
    v3 = parse_v3_device(V3_DEVICE, source="cm", appliance_name="cm")
    merged = merge_v1_extras(v3, v1_extras(v1))
    assert (merged.authorized, merged.scanner, merged.engineering_station, merged.has_dynamic_address) == (
        True, False, False, True)
    assert (merged.site_id, merged.zone_id) == (1, 1)
    assert merged.sensor_id == 1  # v3's own sensor wins over v1's
    assert len(merged.firmware) == 4 and merged.firmware[0].firmware_version == "20.55"
    assert merged.site_name == "asd" and merged.purdue_level == "Process Control"
    assert merge_v1_extras(v3, None) is v3


def test_sensor_sample_alerts_additionalinformation_casing():
    first, second = (parse_alert(raw, source=SRC, sensor_name=NAME) for raw in SENSOR_ALERTS)
    assert isinstance(first, Alert) and isinstance(second, Alert)
    assert first.additional_information == {"information": ["170.60.50.201 over port BACnet (47808)"],
                                            "description": "External Addresses"}
    assert first.time == utc(1509881077000) and first.severity == "Major" and first.engine == "Policy Violation"
    assert first.source_device_id is None and first.destination_device_id is None
    assert (second.source_device_id, second.destination_device_id) == (3, 4)
    assert second.additional_information is None and second.remediation_steps == []
    assert second.handled is None and second.sensor_name == NAME and second.uuid is None
    assert first.key == f"{SRC}:1@1509881077000"   # re-image-proof: the alert time is part of the key


def test_cm_sample_alerts_zero_device_means_none_and_uuid():
    first, second = (parse_alert(raw, source="cm", sensor_names={1: "Line 1"}, derive_uuid=True) for raw in CM_ALERTS)
    assert first.source_device_id is None and first.destination_device_id is None  # 0 = none
    assert second.source_device_id == 4 and second.destination_device_id is None
    assert first.handled is False and first.severity == "Warning" and second.severity == "Critical"
    assert (first.sensor_id, first.sensor_name, first.zone_id, first.site_id) == (1, "Line 1", 1, 1)
    assert first.uuid == "1-1594808245000"  # the documented "<n>-<epoch ms>" pattern


def test_v2_alert_fields():
    raw = {**CM_ALERTS[1], "sourceDeviceAddress": "10.10.10.22", "destinationDeviceAddress": "00-02-A2-1F-1C-59",
           "remediationSteps": ["Check the scanner", "Notify security"], "sensorName": "Line 1",
           "zoneName": "Zone A", "siteName": "Plant", "uuid": "2-1594808260000"}
    alert = parse_alert(raw, source="cm")
    assert alert.source_address == "10.10.10.22" and alert.destination_address == "00:02:a2:1f:1c:59"
    assert alert.remediation_steps == ["Check the scanner", "Notify security"]
    assert (alert.sensor_name, alert.zone_name, alert.site_name) == ("Line 1", "Zone A", "Plant")
    assert alert.uuid == "2-1594808260000"


def test_cm_v1_remediation_steps_string_and_severity_case():
    alert = parse_alert({**CM_ALERTS[0], "remediationSteps": "Do this.", "severity": "MAJOR",
                         "engine": "operational"}, source="cm")
    assert alert.remediation_steps == ["Do this."] and alert.severity == "Major" and alert.engine == "Operational"
    assert alert.severity_rank == 2


def test_sensor_alert_handled_from_state_filter():
    alert = parse_alert(SENSOR_ALERTS[0], source=SRC, handled=True)
    assert alert.handled is True
    assert parse_alert({**CM_ALERTS[0]}, source="cm", handled=True).handled is False  # the record wins


# --------------------------------------------------------------------------- quirks


@pytest.mark.parametrize("raw", ["00:02:a2:1f:1c:59", "00:02:A2:1F:1C:59", "0002A21F1C59", "00-02-a2-1f-1c-59",
                                 "0002.a21f.1c59", " 00 02 a2 1f 1c 59 "])
def test_mac_formats_normalised(raw):
    assert normalize_mac(raw) == "00:02:a2:1f:1c:59"


def test_invalid_macs_dropped_with_reason_and_duplicates_merged():
    raw = {**SENSOR_DEVICES[0], "macAddresses": ["0002A21F1C59", "00-02-a2-1f-1c-59", "00:02:a2:1f:zz:9", 12]}
    device = parse_device(raw, source=SRC, appliance_name=NAME)
    assert device.mac_addresses == ["00:02:a2:1f:1c:59"]
    assert any("00:02:a2:1f:zz:9" in issue for issue in device.issues)
    assert len(device.issues) == 2


def test_ip_validation_ipv6_and_invalid():
    raw = {**SENSOR_DEVICES[0], "ipAddresses": ["10.4.14.102", "FE80:0:0::1:1", "10.1.300.4", "2001:db8::1", ""]}
    device = parse_device(raw, source=SRC, appliance_name=NAME)
    assert device.ip_addresses == ["10.4.14.102", "fe80::1:1", "2001:db8::1"]
    assert any("10.1.300.4" in issue for issue in device.issues)


def test_protocol_ip_addresses_key_and_plain_names():
    raw = {**SENSOR_DEVICES[0], "protocols": [{"ipAddresses": ["10.0.0.1"], "id": 1, "name": "MODBUS"},
                                              {"addresses": ["Master"], "id": 2, "name": "DNP3"},
                                              {"id": 3, "name": "MODBUS"}, "SSH", {"id": 4}]}
    assert parse_device(raw, source=SRC, appliance_name=NAME).protocols == ["MODBUS", "DNP3", "SSH"]


def test_firmware_na_values_and_numbers():
    raw = {**SENSOR_DEVICES[0], "firmware": [{"address": "N/A", "moduleAddress": "CPU", "firmwareVersion": 20.55,
                                              "serial": " n/a ", "rack": "", "slot": "3"},
                                             {"address": "N/A", "moduleAddress": "N/A"}, "garbage"]}
    firmware = parse_device(raw, source=SRC, appliance_name=NAME).firmware
    assert firmware == [Firmware(module_address="CPU", firmware_version="20.55", slot="3")]


def test_missing_name_falls_back_to_address_then_id():
    assert parse_device({"id": 5, "name": None, "ipAddresses": ["10.0.0.5"]}, source=SRC,
                        appliance_name=NAME).name == "10.0.0.5"
    assert parse_device({"id": 5}, source=SRC, appliance_name=NAME).name == "device-5"


@pytest.mark.parametrize(("raw", "record_id", "reason"), [
    ([1, 2], None, "expected a JSON object"),
    ({"name": "x"}, None, "'id'"),
    ({"id": "abc", "name": "x"}, "abc", "not an integer"),
    ({"id": True, "name": "x"}, "True", "'id'"),
    ({"id": 3, "name": "x", "authorized": True, "vendor": {"bad": 1}}, "3", "vendor"),
])
def test_unparseable_devices_become_invalid_records(raw, record_id, reason):
    record = parse_device(raw, source=SRC, appliance_name=NAME)
    assert isinstance(record, InvalidRecord)
    assert record.source == SRC and record.record_id == record_id and reason in record.reason


@pytest.mark.parametrize(("changes", "reason"), [
    ({"severity": "Severe"}, "unknown severity"),
    ({"time": None}, "'time'"),
    ({"time": "yesterday"}, "'time'"),
    ({"id": None}, "'id'"),
])
def test_unparseable_alerts_become_invalid_records(changes, reason):
    record = parse_alert({**CM_ALERTS[0], **changes}, source="cm")
    assert isinstance(record, InvalidRecord) and reason in record.reason


def test_v3_invalid_record_and_string_device_type():
    assert isinstance(parse_v3_device({"u_name": "x"}, source="cm", appliance_name="cm"), InvalidRecord)
    device = parse_v3_device({**V3_DEVICE, "u_device_type": "HMI", "u_purdue_layer": "N/A"}, source="cm",
                             appliance_name="cm")
    assert device.type == "HMI" and device.category is None and device.purdue_level is None
