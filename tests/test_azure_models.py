"""Pure mapping of Azure Resource Graph records to Device / Alert."""

from __future__ import annotations

import pytest
from defender_servicenow.azure_models import SEVERITY_MAP, parse_azure_alert, parse_azure_device, stable_id
from defender_servicenow.models import Alert, Device, InvalidRecord

DEV_ID = ("/subscriptions/s/providers/Microsoft.IoTSecurity/locations/westeurope/deviceGroups/plant/devices/abc")
DEVICE = {
    "id": DEV_ID, "name": "abc", "type": "microsoft.iotsecurity/locations/devicegroups/devices",
    "properties": {
        "deviceName": "PLC-1", "deviceSubTypeDisplayName": "PLC", "deviceStatus": "Active",
        "nics": [{"ipv4Address": "10.0.0.5", "macAddress": "00-02-A2-1F-1C-59"},
                 {"ipv4Address": "999.1.1.1", "macAddress": "zz"}, {"ipv6Address": "fe80::1"}],
        "hardware": {"vendor": "Siemens", "model": "S7-1500", "serialNumber": "SN1"},
        "operatingSystem": {"platform": "Linux", "distribution": "Debian", "version": "12"},
        "purdueLevel": "ProcessControl", "criticality": "High", "authorizedState": "Unauthorized",
        "sensor": {"name": "s1", "site": "Plant", "zone": "Z1"},
        "slots": [{"firmwareVersion": "V2.9", "model": "CPU 1516", "rackNumber": 0, "slotNumber": 1,
                   "serialNumber": "N/A"}],
        "firstSeen": "2026-01-01T00:00:00Z", "lastSeen": "2026-02-01T10:00:00.5+01:00",
    },
}


def test_device_mapping():
    device = parse_azure_device(DEVICE, source="az", source_name="Azure")
    assert isinstance(device, Device)
    assert (device.name, device.type, device.vendor, device.hardware_model, device.serial_number) == \
        ("PLC-1", "PLC", "Siemens", "S7-1500", "SN1")
    assert device.mac_addresses == ["00:02:a2:1f:1c:59"] and device.ip_addresses == ["10.0.0.5", "fe80::1"]
    assert len(device.issues) == 2
    assert device.operating_system == "Linux Debian 12" and device.purdue_level == "Process Control"
    assert device.authorized is False and device.criticality == "High"
    assert (device.sensor_name, device.site_name, device.zone_name) == ("s1", "Plant", "Z1")
    assert device.firmware[0].firmware_version == "V2.9" and device.firmware[0].slot == "1"
    assert device.firmware[0].serial is None
    assert device.last_seen.isoformat() == "2026-02-01T09:00:00.500000+00:00"
    assert device.resource_id == DEV_ID and device.id == stable_id(DEV_ID.upper())


@pytest.mark.parametrize("record, reason", [
    ("text", "JSON object"),
    ({"properties": {}}, "ARM 'id'"),
    ({"id": DEV_ID, "properties": []}, "properties"),
    ({"id": DEV_ID, "properties": {"sensor": "s1"}}, "sensor"),
    ({"id": DEV_ID, "properties": {"deviceName": {"x": 1}}}, "deviceName"),
])
def test_bad_device_is_invalid_record(record, reason):
    result = parse_azure_device(record, source="az", source_name="Azure")
    assert isinstance(result, InvalidRecord) and reason in result.reason


def test_device_without_name_falls_back_to_address():
    record = {"id": DEV_ID, "properties": {"nics": [{"ipv4Address": "10.1.1.1"}]}}
    assert parse_azure_device(record, source="az", source_name="A").name == "10.1.1.1"


ALERT = {"id": DEV_ID.replace("devices/abc", "alerts/a-1"), "properties": {
    "displayName": "Unauthorized PLC programming", "severity": "High", "status": "New",
    "startTimeUtc": "2026-03-01T12:00:00.123Z", "productComponentName": "Policy Violation",
    "remediationSteps": ["one", ""], "extendedProperties": {"SourceDeviceAddress": "10.0.0.5",
                                                            "DestinationDeviceAddress": "0002A21F1C59",
                                                            "SensorId": "s1"}}}


@pytest.mark.parametrize("azure, ours", [("Informational", "Warning"), ("low", "Minor"), ("Medium", "Major"),
                                         ("HIGH", "Critical")])
def test_severity_table(azure, ours):
    alert = parse_azure_alert({**ALERT, "properties": {**ALERT["properties"], "severity": azure}}, source="az")
    assert alert.severity == ours
    assert SEVERITY_MAP[azure.lower()] == ours


def test_alert_mapping():
    alert = parse_azure_alert(ALERT, source="az")
    assert isinstance(alert, Alert)
    assert alert.uuid == "a-1" and alert.resource_id == ALERT["id"] and alert.status == "New"
    assert alert.handled is False and alert.engine == "Policy Violation"
    assert (alert.source_address, alert.destination_address) == ("10.0.0.5", "00:02:a2:1f:1c:59")
    assert alert.remediation_steps == ["one"] and alert.sensor_name == "s1"


@pytest.mark.parametrize("change, reason", [
    ({"severity": "Severe"}, "unknown severity"),
    ({"startTimeUtc": "yesterday"}, "startTimeUtc"),
    ({"extendedProperties": "x"}, "extendedProperties"),
])
def test_bad_alert_is_invalid_record(change, reason):
    result = parse_azure_alert({**ALERT, "properties": {**ALERT["properties"], **change}}, source="az")
    assert isinstance(result, InvalidRecord) and reason in result.reason
