"""Normalised, typed Defender for IoT records: one :class:`Device` and one :class:`Alert` model for both
the OT sensor API (``/api/...``) and the on-premises management console API (``/external/...``), so DAGs
never see API differences.

The ``parse_*`` functions are pure: they take one raw record (a decoded JSON object) and return a model
or an :class:`InvalidRecord` -- they never raise for bad data, so one broken record cannot stop an
extraction. Documented API quirks handled here (see defender-api.md):

* protocol addresses under ``addresses`` (samples) or ``ipAddresses`` (2022 table); only names are kept;
* ``additionalInformation`` in any letter case (the docs' sample has ``additionalinformation``);
* alert ``sourceDevice`` / ``destinationDevice`` of ``0`` mean "no device" -> ``None``;
* firmware values ``N/A`` (and empty strings) -> ``None``; ``firmwareVersion`` numbers -> strings;
* MAC addresses in any common format (``0002A21F1C59``, ``00-02-a2-1f-1c-59``, ``0002.a21f.1c59``) ->
  lower-case colon form; invalid ones are dropped and the reason is kept in ``Device.issues``;
* IP addresses validated with :mod:`ipaddress` (IPv4 and IPv6, normalised text form); invalid ones are
  dropped the same way (the device itself is still synced: its name and id are good);
* v3 integration devices (``u_*`` fields): ``u_operating_system`` ``""`` -> ``None``, ``u_purdue_layer``
  ``N/A`` -> the device type's default layer, only confidently identified MACs (``u_mac_address_objects``;
  ``u_guessed_mac_addresses`` are usually a router's MAC and are ignored);
* times are integer milliseconds since the epoch (UTC) -> aware UTC datetimes.

The value normalisers (MAC, IP, ``N/A``, times, ids) are in :mod:`defender_servicenow.normalize`; the
public ones are importable from here too.

A record is an :class:`InvalidRecord` when it is not an object, has no usable integer ``id``, or (alerts)
has no usable ``time`` or an unknown ``severity``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from defender_servicenow.normalize import (  # noqa: F401  (the public normalisers are re-exported for callers)
    _additional,
    _address,
    _device_ref,
    _get,
    _ips,
    _macs,
    _na,
    _opt_int,
    _optional_bool,
    _protocols,
    _record_id,
    _require_id,
    _steps,
    _txt,
    _validation_reason,
    datetime_to_ms,
    ms_to_datetime,
    normalize_ip,
    normalize_mac,
)

SEVERITIES = ("Warning", "Minor", "Major", "Critical")
"""Alert severities, lowest first (CEF weights 1, 4, 8, 10)."""
ENGINES = ("Protocol Violation", "Policy Violation", "Malware", "Anomaly", "Operational")

Severity = Literal["Warning", "Minor", "Major", "Critical"]
_SEVERITY_BY_LOWER = {s.lower(): s for s in SEVERITIES}
_ENGINE_BY_LOWER = {e.lower(): e for e in ENGINES}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Firmware(_Model):
    """One firmware/module entry of a device (``N/A`` values are ``None``)."""

    address: str | None = None
    module_address: str | None = None
    serial: str | None = None
    model: str | None = None
    firmware_version: str | None = None
    additional_data: str | None = None
    rack: str | None = None
    slot: str | None = None


class Device(_Model):
    """A device of a sensor or management console inventory, normalised.

    Fields that an API does not provide are ``None`` (unknown), never a guessed value: e.g. sensors give no
    site/zone/Purdue/first/last seen; v3 delta records give no firmware/authorized/scanner.
    """

    source: str = Field(description="Defender connection id")
    appliance_name: str
    id: int
    name: str
    type: str = "Unknown"
    vendor: str | None = None
    operating_system: str | None = None
    mac_addresses: list[str] = Field(default_factory=list)
    ip_addresses: list[str] = Field(default_factory=list)
    protocols: list[str] = Field(default_factory=list)
    firmware: list[Firmware] = Field(default_factory=list)
    authorized: bool | None = None
    scanner: bool | None = None
    engineering_station: bool | None = None
    has_dynamic_address: bool | None = None
    sensor_id: int | None = None
    sensor_name: str | None = None
    site_id: int | None = None
    site_name: str | None = None
    zone_id: int | None = None
    zone_name: str | None = None
    purdue_level: str | None = None
    category: str | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    issues: list[str] = Field(default_factory=list,
                              description="values dropped while normalising (e.g. an invalid MAC), for logs")
    # Azure (cloud-connected sensors) only; None for appliance devices.
    resource_id: str | None = Field(default=None, description="Azure Resource Manager id of the device")
    hardware_model: str | None = None
    serial_number: str | None = None
    criticality: str | None = None

    @property
    def native_key(self) -> str:
        return f"{self.source}:{self.id}"


class Alert(_Model):
    """An alert of a sensor or management console, normalised."""

    source: str = Field(description="Defender connection id")
    id: int
    uuid: str | None = None
    time: datetime
    title: str
    message: str = ""
    severity: Severity
    engine: str
    source_device_id: int | None = None
    destination_device_id: int | None = None
    source_address: str | None = None
    destination_address: str | None = None
    remediation_steps: list[str] = Field(default_factory=list)
    additional_information: dict | None = None
    handled: bool | None = None
    sensor_id: int | None = None
    sensor_name: str | None = None
    zone_id: int | None = None
    zone_name: str | None = None
    site_id: int | None = None
    site_name: str | None = None
    # Azure (cloud-connected sensors) only; None for appliance alerts.
    resource_id: str | None = Field(default=None, description="Azure Resource Manager id of the alert")
    status: str | None = Field(default=None, description="Azure alert status: New, InProgress or Closed")

    @property
    def key(self) -> str:
        """``<connection id>:<alert id>@<alert time ms>``: a re-imaged appliance restarts its numbering, not
        its clock, so a new alert never takes an old alert's key (records written under the previous key,
        ``<connection id>:<alert id>``, are recognised by the forwarding: ``ledger.legacy_key``)."""
        return f"{self.source}:{self.id}@{datetime_to_ms(self.time)}"

    @property
    def severity_rank(self) -> int:
        """0 (Warning) .. 3 (Critical), for ``minimum_severity`` comparisons."""
        return SEVERITIES.index(self.severity)


class InvalidRecord(_Model):
    """A record that could not be parsed; callers log and count it and go on."""

    source: str
    record_id: str | None = None
    reason: str


# --------------------------------------------------------------------------- record helpers


_FIRMWARE_KEYS = {
    "address": ("address", "u_address"),
    "module_address": ("moduleAddress", "u_module_address"),
    "serial": ("serial", "u_serial"),
    "model": ("model", "u_model"),
    "firmware_version": ("firmwareVersion", "u_version"),
    "additional_data": ("additionalData", "u_additional_data"),
    "rack": ("rack", "u_rack"),
    "slot": ("slot", "u_slot"),
}


def _firmware(values: Any) -> list[Firmware]:
    out = []
    for item in values or []:
        if not isinstance(item, Mapping):
            continue
        fields = {}
        for name, keys in _FIRMWARE_KEYS.items():
            raw = next((item[k] for k in keys if k in item), None)
            fields[name] = _na(raw, keys[0])
        if any(fields.values()):
            out.append(Firmware(**fields))
    return out


def _invalid(source: str, record: Any, reason: str, key: str = "id") -> InvalidRecord:
    return InvalidRecord(source=source, record_id=_record_id(record, key), reason=reason)


# --------------------------------------------------------------------------- devices


def parse_device(record: Any, *, source: str, appliance_name: str, sensor_name: str | None = None,
                 sensor_names: Mapping[int, str] | None = None) -> Device | InvalidRecord:
    """A sensor ``/api/v1/devices`` or management console ``/external/v1/devices`` record -> Device.

    :param sensor_name: the sensor's name for sensor-mode records (the appliance name).
    :param sensor_names: management console sensor id -> name (from the appliances list).
    """
    try:
        device_id = _require_id(record, "id")
        issues: list[str] = []
        sensor_id = _opt_int(record.get("sensorId"))
        macs = _macs(record.get("macAddresses"), issues)
        ips = _ips(record.get("ipAddresses"), issues)
        name = _txt(record, "name") or (ips[0] if ips else None) or (macs[0] if macs else None) \
            or f"device-{device_id}"
        fields = dict(
            source=source, appliance_name=appliance_name, id=device_id, name=name,
            type=_txt(record, "type") or "Unknown", vendor=_txt(record, "vendor"),
            operating_system=_txt(record, "operatingSystem"),
            mac_addresses=macs, ip_addresses=ips, protocols=_protocols(record.get("protocols")),
            firmware=_firmware(record.get("firmware")),
            authorized=_optional_bool(record.get("authorized")),
            scanner=_optional_bool(record.get("scanner")),
            engineering_station=_optional_bool(record.get("engineeringStation")),
            has_dynamic_address=_optional_bool(record.get("hasDynamicAddress")),
            sensor_id=sensor_id,
            sensor_name=sensor_name if sensor_id is None else (sensor_names or {}).get(sensor_id),
            site_id=_opt_int(record.get("siteId")), zone_id=_opt_int(record.get("zoneId")),
            issues=issues,
        )
        return Device(**fields)
    except ValidationError as exc:
        return _invalid(source, record, f"device: {_validation_reason(exc)}")
    except (ValueError, TypeError, AttributeError) as exc:
        return _invalid(source, record, f"device: {exc}")


def parse_v3_device(record: Any, *, source: str, appliance_name: str,
                    sensor_names: Mapping[int, str] | None = None) -> Device | InvalidRecord:
    """A management console ``/external/v3/integration/devices/<ts>`` record (``u_*`` fields) -> Device.

    v3 has no firmware rack/slot, authorized, scanner, engineering station, site/zone ids: those are None
    unless merged from ``/external/v1/devices`` (:func:`merge_v1_extras`).
    """
    try:
        device_id = _require_id(record, "u_id")
        issues: list[str] = []
        macs = _macs([m.get("u_mac_address") for m in record.get("u_mac_address_objects") or []
                      if isinstance(m, Mapping)], issues)
        ips = _ips([o.get("u_ip_address") for o in record.get("u_ip_address_objects") or []
                    if isinstance(o, Mapping)], issues)
        dtype = record.get("u_device_type")
        if isinstance(dtype, Mapping):
            type_name, category, default_layer = (_na(dtype.get("u_name")), _na(dtype.get("u_category")),
                                                  _na(dtype.get("u_purdue_layer")))
        else:  # documented as a String in the field table
            type_name, category, default_layer = _na(dtype), None, None
        sensor_ids = [_opt_int(s.get("u_sensor_id")) for s in record.get("u_sensor_ids") or []
                      if isinstance(s, Mapping)]
        sensor_id = next((s for s in sensor_ids if s is not None), None)
        name = _txt(record, "u_name") or (ips[0] if ips else None) or f"device-{device_id}"
        return Device(
            source=source, appliance_name=appliance_name, id=device_id, name=name,
            type=type_name or "Unknown", vendor=_txt(record, "u_vendor"),
            operating_system=_txt(record, "u_operating_system"),
            mac_addresses=macs, ip_addresses=ips, protocols=_protocols(record.get("u_protocol_objects")),
            firmware=_firmware(record.get("u_firmwares")),
            sensor_id=sensor_id,
            sensor_name=(sensor_names or {}).get(sensor_id) if sensor_id is not None else None,
            site_name=_txt(record, "u_site"), zone_name=_txt(record, "u_zone"),
            purdue_level=_txt(record, "u_purdue_layer") or default_layer, category=category,
            first_seen=ms_to_datetime(record.get("u_first_discovered")),
            last_seen=ms_to_datetime(record.get("u_last_activity")),
            issues=issues,
        )
    except ValidationError as exc:
        return _invalid(source, record, f"v3 device: {_validation_reason(exc)}", "u_id")
    except (ValueError, TypeError, AttributeError) as exc:
        return _invalid(source, record, f"v3 device: {exc}", "u_id")


V1_EXTRA_FIELDS = ("firmware", "authorized", "scanner", "engineering_station", "has_dynamic_address",
                   "site_id", "zone_id", "sensor_id")
"""What ``/external/v1/devices`` adds to a v3 integration device."""


_FIRMWARE_FIELDS = tuple(Firmware.model_fields)


def v1_extras(device: Device) -> tuple:
    """The compact v1-only part of a management console device (kept per id while paging v3): plain
    tuples, firmware values interned (module addresses and models repeat across devices)."""
    firmware = tuple(tuple(None if (v := getattr(fw, f)) is None else sys.intern(v) for f in _FIRMWARE_FIELDS)
                     for fw in device.firmware)
    return tuple(firmware if f == "firmware" else getattr(device, f) for f in V1_EXTRA_FIELDS)


def merge_v1_extras(device: Device, extras: tuple | None) -> Device:
    """Fill a v3 device's v1-only fields from :func:`v1_extras` (None: leave them unknown)."""
    if extras is None:
        return device
    values = dict(zip(V1_EXTRA_FIELDS, extras, strict=True))
    values["firmware"] = [Firmware(**dict(zip(_FIRMWARE_FIELDS, fw, strict=True))) for fw in values["firmware"]]
    if device.sensor_id is not None:
        values.pop("sensor_id")
    if device.firmware and not values["firmware"]:
        values.pop("firmware")
    return device.model_copy(update=values)


# --------------------------------------------------------------------------- alerts


def parse_alert(record: Any, *, source: str, sensor_name: str | None = None,
                sensor_names: Mapping[int, str] | None = None, handled: bool | None = None,
                derive_uuid: bool = False) -> Alert | InvalidRecord:
    """A sensor or management console v1/v2 alert record -> Alert.

    :param sensor_name: the sensor's name for sensor-mode records (the appliance name).
    :param sensor_names: management console sensor id -> name, used when the record has no ``sensorName``
        (v1).
    :param handled: the handled state implied by a ``state=`` filter, when the record has no ``handled``
        field (sensor alerts).
    :param derive_uuid: management console: when the record has no ``uuid``, use ``"<id>-<time ms>"`` --
        the documented UUID pattern ``<n>-<13-digit epoch ms>`` (e.g. ``1-1594550943000``); its exact
        semantics are UNCONFIRMED in the docs (INFERENCE).
    """
    try:
        alert_id = _require_id(record, "id")
        time = ms_to_datetime(record.get("time"))
        if time is None:
            raise ValueError(f"missing or invalid 'time': {str(record.get('time'))[:30]!r}")
        severity_raw = str(record.get("severity") or "")
        severity = _SEVERITY_BY_LOWER.get(severity_raw.strip().lower())
        if severity is None:
            raise ValueError(f"unknown severity {severity_raw[:30]!r} (expected one of {', '.join(SEVERITIES)})")
        engine_raw = _txt(record, "engine") or ""
        sensor_id = _opt_int(record.get("sensorId", record.get("sensor")))
        record_handled = record.get("handled")
        uuid = _na(record.get("uuid", record.get("UUID")))
        if uuid is None and derive_uuid:
            uuid = f"{alert_id}-{datetime_to_ms(time)}"
        return Alert(
            source=source, id=alert_id, uuid=uuid, time=time,
            title=_txt(record, "title") or "(no title)", message=record.get("message") or "",
            severity=severity, engine=_ENGINE_BY_LOWER.get(engine_raw.lower(), engine_raw),
            source_device_id=_device_ref(record.get("sourceDevice")),
            destination_device_id=_device_ref(record.get("destinationDevice")),
            source_address=_address(record.get("sourceDeviceAddress")),
            destination_address=_address(record.get("destinationDeviceAddress")),
            remediation_steps=_steps(record.get("remediationSteps")),
            additional_information=_additional(_get(record, "additionalInformation")),
            handled=record_handled if isinstance(record_handled, bool) else handled,
            sensor_id=sensor_id,
            sensor_name=_txt(record, "sensorName") or (
                (sensor_names or {}).get(sensor_id) if sensor_id is not None else sensor_name),
            zone_id=_opt_int(record.get("zoneId")), zone_name=_txt(record, "zoneName"),
            site_id=_opt_int(record.get("siteId")), site_name=_txt(record, "siteName"),
        )
    except ValidationError as exc:
        return _invalid(source, record, f"alert: {_validation_reason(exc)}")
    except (ValueError, TypeError, AttributeError) as exc:
        return _invalid(source, record, f"alert: {exc}")
