"""Pure mapping of Azure Resource Graph (``iotsecurityresources``) records to the project's models.

One :class:`~defender_servicenow.models.Device` / :class:`~defender_servicenow.models.Alert` model serves
appliances and Azure, so the class mapping, rules and engines see no difference:

* ``Device.type`` comes from ``properties.deviceSubTypeDisplayName`` (e.g. ``PLC``, ``Engineering
  Station``), the same names the appliances use, so ``include/config/class_mapping.yaml`` applies as is;
* ``Device.id`` / ``Alert.id`` must be integers (native keys ``<source>:<id>``): Azure ids are ARM
  resource ids (strings), so the integer is derived from the lower-cased ARM id (:func:`stable_id`: the
  first 62 bits of its SHA-256; stable across runs and machines). The ARM id itself is kept in
  ``resource_id`` (the closed loop PATCHes it);
* alert severities map as :data:`SEVERITY_MAP` (documented in README.md);
* NICs -> MAC / IP lists (invalid values dropped and noted in ``issues``), hardware -> vendor / model /
  serial, operating system -> one text, ``slots[]`` and ``firmwares[]`` -> firmware entries,
  ``purdueLevel``, ``criticality``, ``authorizedState``, ``sensor.{name,site,zone}``.

A record that cannot be used becomes an :class:`InvalidRecord` with a reason; nothing here raises.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from defender_servicenow.models import Alert, Device, Firmware, InvalidRecord
from defender_servicenow.normalize import _address, _ips, _macs, _na, _steps, _validation_reason

DEVICE_TYPE = "microsoft.iotsecurity/locations/devicegroups/devices"
ALERT_TYPE = "microsoft.iotsecurity/locations/devicegroups/alerts"
SENSOR_TYPE = "microsoft.iotsecurity/locations/sites/sensors"
SITE_TYPE = "microsoft.iotsecurity/locations/sites"
VULNERABILITY_TYPE = "microsoft.iotsecurity/locations/devicegroups/vulnerabilities"

SEVERITY_MAP = {"informational": "Warning", "low": "Minor", "medium": "Major", "high": "Critical"}
"""Azure alert severity (case-insensitive) -> the rule model's severity."""
REMOVED_STATUSES = frozenset({"removed", "deleted"})
"""``properties.deviceStatus`` values meaning the device is gone (the sync retires its CI)."""
PURDUE = {"processcontrol": "Process Control", "supervisory": "Supervisory", "enterprise": "Enterprise"}


def stable_id(resource_id: str) -> int:
    """A positive 62-bit integer derived from an ARM id (case-insensitive, as ARM ids are)."""
    digest = hashlib.sha256(resource_id.strip().lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 2 or 1


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 text (``Z`` or an offset; naive = UTC) -> aware UTC datetime; None for anything else."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _obj(value: Any, field: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{field!r} should be a JSON object, got {type(value).__name__}")
    return value


def _resource(record: Any, kind: str) -> tuple[str, Mapping]:
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str) or not rid.strip().startswith("/"):
        raise ValueError(f"missing or invalid ARM 'id' for a {kind}")
    return rid.strip(), _obj(record.get("properties"), "properties")


def _invalid(source: str, record: Any, reason: str) -> InvalidRecord:
    rid = record.get("id") if isinstance(record, Mapping) else None
    return InvalidRecord(source=source, record_id=None if rid is None else str(rid)[-64:], reason=reason)


def _operating_system(os_info: Mapping) -> str | None:
    parts = [_na(os_info.get(k), f"operatingSystem.{k}") for k in ("platform", "distribution", "version")]
    text = " ".join(dict.fromkeys(p for p in parts if p))
    return text or None


def _firmware(props: Mapping) -> list[Firmware]:
    out = []
    for slot in props.get("slots") or []:
        if isinstance(slot, Mapping):
            fw = Firmware(model=_na(slot.get("model")), serial=_na(slot.get("serialNumber")),
                          firmware_version=_na(slot.get("firmwareVersion")), rack=_na(slot.get("rackNumber")),
                          slot=_na(slot.get("slotNumber")), additional_data=_na(slot.get("hardwareVendor")))
            if any(fw.model_dump().values()):
                out.append(fw)
    for item in props.get("firmwares") or []:
        if isinstance(item, Mapping):
            fw = Firmware(model=_na(item.get("name")), firmware_version=_na(item.get("version")),
                          module_address=_na(item.get("moduleAddress")), additional_data=_na(item.get("vendor")))
            if any(fw.model_dump().values()):
                out.append(fw)
    return out


def _authorized(value: Any) -> bool | None:
    text = str(value or "").strip().lower()
    return {"authorized": True, "unauthorized": False}.get(text)


def device_status(record: Any) -> str | None:
    """``properties.deviceStatus`` of a raw device record (None when absent or unreadable)."""
    props = record.get("properties") if isinstance(record, Mapping) else None
    return _na(props.get("deviceStatus")) if isinstance(props, Mapping) else None


def parse_azure_device(record: Any, *, source: str, source_name: str) -> Device | InvalidRecord:
    """One ARG ``…/devicegroups/devices`` record -> Device (or InvalidRecord with the reason)."""
    try:
        rid, props = _resource(record, "device")
        issues: list[str] = []
        nics = [n for n in props.get("nics") or [] if isinstance(n, Mapping)]
        macs = _macs([n.get("macAddress") for n in nics if n.get("macAddress")], issues)
        ips = _ips([n.get(k) for n in nics for k in ("ipv4Address", "ipv6Address") if n.get(k)], issues)
        hardware = _obj(props.get("hardware"), "hardware")
        sensor = _obj(props.get("sensor"), "sensor")
        purdue = _na(props.get("purdueLevel"), "purdueLevel")
        name = (_na(props.get("deviceName"), "deviceName") or _na(props.get("name"), "name")
                or (ips[0] if ips else None) or (macs[0] if macs else None) or str(record.get("name") or rid))
        return Device(
            source=source, appliance_name=source_name, id=stable_id(rid), name=name,
            type=_na(props.get("deviceSubTypeDisplayName"), "deviceSubTypeDisplayName") or "Unknown",
            category=_na(props.get("deviceCategoryDisplayName"), "deviceCategoryDisplayName"),
            vendor=_na(hardware.get("vendor"), "hardware.vendor"),
            hardware_model=_na(hardware.get("model"), "hardware.model"),
            serial_number=_na(hardware.get("serialNumber"), "hardware.serialNumber"),
            operating_system=_operating_system(_obj(props.get("operatingSystem"), "operatingSystem")),
            mac_addresses=macs, ip_addresses=ips, firmware=_firmware(props),
            authorized=_authorized(props.get("authorizedState")),
            engineering_station=(props.get("programmingState") == "ProgrammingDevice") if props.get(
                "programmingState") else None,
            sensor_name=_na(sensor.get("name"), "sensor.name"), site_name=_na(sensor.get("site"), "sensor.site"),
            zone_name=_na(sensor.get("zone"), "sensor.zone"),
            purdue_level=PURDUE.get(purdue.lower().replace(" ", ""), purdue) if purdue else None,
            criticality=_na(props.get("criticality"), "criticality"),
            first_seen=parse_time(props.get("firstSeen")), last_seen=parse_time(props.get("lastSeen")),
            resource_id=rid, issues=issues,
        )
    except ValidationError as exc:
        return _invalid(source, record, f"Azure device: {_validation_reason(exc)}")
    except (ValueError, TypeError, AttributeError) as exc:
        return _invalid(source, record, f"Azure device: {exc}")


def alert_device_ids(raw: Any) -> list[str]:
    """The device resource ids an alert names (``DeviceResourceIds``: one id, a list, or comma-separated),
    each once (ARM ids are case-insensitive: the first spelling is kept)."""
    props = raw.get("properties") if isinstance(raw, Mapping) else None
    ext = props.get("extendedProperties") if isinstance(props, Mapping) else None
    value = ext.get("DeviceResourceIds") if isinstance(ext, Mapping) else None
    items = value if isinstance(value, list) else [value]
    ids = (part.strip() for item in items if isinstance(item, str) for part in item.split(",") if part.strip())
    first: dict[str, str] = {}
    for rid in ids:
        first.setdefault(rid.lower(), rid)
    return list(first.values())


_MAC = re.compile(r"^[0-9a-f]{2}([-:.]?)[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}$|^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$")


def address_key(value: Any) -> str:
    """One spelling per address, for comparing an alert's addresses with a device's NICs: an IP in its
    compressed form (``fe80:0:0::1`` = ``fe80::1``), a MAC as lower-case colon pairs (``00-1B-…`` =
    ``00:1b:…``, also Cisco's ``001b.1b00.0001``); anything else lower-cased ('' for nothing)."""
    text = str(value or "").strip().lower()
    if not text:
        return ""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).compressed
    except ValueError:
        pass
    if _MAC.match(text):
        digits = re.sub(r"[-:.]", "", text)
        return ":".join(digits[i:i + 2] for i in range(0, 12, 2))
    return text


def _device_addresses(record: Any) -> set[str]:
    props = record.get("properties") if isinstance(record, Mapping) else None
    nics = props.get("nics") if isinstance(props, Mapping) else None
    return {address_key(n[k]) for n in nics or [] if isinstance(n, Mapping)
            for k in ("ipv4Address", "ipv6Address", "macAddress") if n.get(k)}


def place_alert(raw: Any, devices: Mapping[str, Any]) -> tuple[str | None, str | None, Mapping]:
    """(source device ARM id, destination device ARM id, the ``sensor`` object {name, site, zone}) of an alert,
    from the devices it names (``DeviceResourceIds``, which joins to the device records' ``id``).

    ``devices``: lower-case device id -> device record, as read for these alerts. A device is the source
    (destination) when one of its NIC addresses is ``SourceDeviceAddress`` (``DestinationDeviceAddress``); an
    alert naming one device whose addresses match neither takes it as its source. The sensor is the source
    device's, else the destination's, else that of the first device found."""
    ids = alert_device_ids(raw)
    ext = raw["properties"].get("extendedProperties") if isinstance(raw.get("properties"), Mapping) else None
    ext = ext if isinstance(ext, Mapping) else {}
    src_addr, dst_addr = address_key(ext.get("SourceDeviceAddress")), address_key(ext.get("DestinationDeviceAddress"))
    found = {rid: devices.get(rid.lower()) for rid in ids}
    source = next((rid for rid, rec in found.items() if src_addr and src_addr in _device_addresses(rec)), None)
    destination = next((rid for rid, rec in found.items()
                        if rid != source and dst_addr and dst_addr in _device_addresses(rec)), None)
    if source is None and destination is None and len(ids) == 1:
        source = ids[0]
    sensor: Mapping = {}
    for rid in (source, destination, *ids):
        props = (found.get(rid) or {}).get("properties") if rid else None
        candidate = props.get("sensor") if isinstance(props, Mapping) else None
        if isinstance(candidate, Mapping) and candidate:
            sensor = candidate
            break
    return source, destination, sensor


def parse_azure_alert(record: Any, *, source: str, devices: Mapping[str, Any] | None = None
                      ) -> Alert | InvalidRecord:
    """One ARG ``…/devicegroups/alerts`` record -> Alert (or InvalidRecord with the reason).

    ``engine`` is ``properties.productComponentName`` (Azure has no engine field); ``handled`` is true
    for status ``Closed``; ``uuid`` is the alert's resource name (the last segment of its ARM id).
    ``devices`` (lower-case device id -> device record, see :func:`place_alert`): the alert's source and
    destination device ids (the ids the device sync keys their CIs by: the incident's ``cmdb_ci`` and the
    rules' protocols come from them) and its sensor, site and zone, which Azure alerts do not carry.
    """
    try:
        rid, props = _resource(record, "alert")
        time = parse_time(props.get("startTimeUtc"))
        if time is None:
            raise ValueError(f"missing or invalid 'startTimeUtc': {str(props.get('startTimeUtc'))[:30]!r}")
        raw_severity = str(props.get("severity") or "")
        severity = SEVERITY_MAP.get(raw_severity.strip().lower())
        if severity is None:
            raise ValueError(f"unknown severity {raw_severity[:30]!r} (expected Informational, Low, Medium "
                             "or High)")
        ext = _obj(props.get("extendedProperties"), "extendedProperties")
        status = _na(props.get("status"), "status")
        src_rid, dst_rid, sensor = place_alert(record, devices or {})
        return Alert(
            source=source, id=stable_id(rid), uuid=rid.rsplit("/", 1)[-1], time=time,
            title=_na(props.get("displayName"), "displayName") or _na(props.get("alertType")) or "(no title)",
            message=str(props.get("description") or ""), severity=severity,
            engine=_na(props.get("productComponentName")) or "",
            source_address=_address(ext.get("SourceDeviceAddress")),
            destination_address=_address(ext.get("DestinationDeviceAddress")),
            remediation_steps=_steps(props.get("remediationSteps")),
            additional_information={str(k): v for k, v in ext.items()} or None,
            handled=None if status is None else status.lower() == "closed",
            source_device_id=stable_id(src_rid) if src_rid else None,
            destination_device_id=stable_id(dst_rid) if dst_rid else None,
            sensor_name=_na(sensor.get("name")) or _na(ext.get("SensorName")) or _na(ext.get("SensorId")),
            zone_name=_na(sensor.get("zone")) or _na(ext.get("Zone")),
            site_name=_na(sensor.get("site")) or _na(ext.get("Site")),
            resource_id=rid, status=status,
        )
    except ValidationError as exc:
        return _invalid(source, record, f"Azure alert: {_validation_reason(exc)}")
    except (ValueError, TypeError, AttributeError) as exc:
        return _invalid(source, record, f"Azure alert: {exc}")
