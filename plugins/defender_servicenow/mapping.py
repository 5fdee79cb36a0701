"""Defender for IoT :class:`~defender_servicenow.models.Device` -> ServiceNow IRE payload item (pure).

The class mapping lives in ``include/config/class_mapping.yaml`` (ServiceNow's own Defender for IoT
connector mapping, defender-api.md §8.2). What goes where (docs/design.md, "Device sync: CMDB mapping"):

* ``values``: ``name``, ``manufacturer``, ``model_number``, ``serial_number``, ``firmware_version``,
  ``os``/``os_address_width`` (computer classes only), ``first_discovered``, ``last_discovered``;
* ``lookup``: ``cmdb_serial_number`` (a real serial only), one ``cmdb_ci_network_adapter`` per MAC
  (``name`` = ``mac_address`` = lower-case colon form, as the OT identification rule expects; the adapter
  carries the device's IP when the MAC/IP pairing is unambiguous: one MAC) and one ``cmdb_ci_ip_address``
  per IP (IPs never go on the CI itself; they do not identify it either);
* ``related``: one ``cmdb_ot_entity`` (OT device type, Purdue level, correlation id) and ``cmdb_key_value``
  rows (``defender.*`` keys) for what has no CMDB column: protocols, appliance, sensor, site, zone,
  authorized, scanner, engineering station, category, ...;
* ``sys_object_source_info``: ``source_name`` + ``source_native_key = "<conn id>:<device id>"``, so the IRE
  matches re-syncs to the same CI before it applies any identification rule.

:func:`payload_digest` is the change-detection fingerprint of a mapped item.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import yaml

from defender_servicenow.exceptions import ConfigError
from defender_servicenow.settings import PROJECT_ROOT

DEFAULT_CLASS_MAPPING_FILE = PROJECT_ROOT / "include" / "config" / "class_mapping.yaml"
SKIP = "skip"
KEY_PREFIX = "defender."
NAME_MAX = 255
VALUE_MAX = 4000
_CLASS_NAME = re.compile(r"^[a-z][a-z0-9_]{1,79}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_SPACES = re.compile(r"\s+")
_LEVEL = re.compile(r"^(?:level\s*)?(\d(?:\.\d)?)$", re.IGNORECASE)


class MappingError(ValueError):
    """The device cannot be sent to ServiceNow; the message says why (logged with the device id)."""


@dataclass(frozen=True)
class ClassMapping:
    """The validated content of ``class_mapping.yaml``."""

    types: dict[str, str]                      # lower-case Defender type -> class or "skip"
    default_class: str = "cmdb_ci_ot"
    os_classification_types: frozenset[str] = frozenset()   # lower-case types
    os_classification: tuple[tuple[re.Pattern, str], ...] = ()
    computer_classes: frozenset[str] = frozenset()
    purdue_levels: dict[str, str] = field(default_factory=dict)   # lower-case layer -> level
    placeholder_serials: frozenset[str] = frozenset()   # lower-case

    def class_for(self, device_type: str | None, operating_system: str | None = None) -> str:
        """CMDB class for a Defender type (``"skip"`` for types that are not devices)."""
        key = (device_type or "").strip().lower()
        cls = self.types.get(key, self.default_class)
        if operating_system and key in self.os_classification_types:
            for pattern, os_class in self.os_classification:
                if pattern.search(operating_system):
                    return os_class
        return cls

    def purdue_level(self, layer: str | None) -> str | None:
        if not layer:
            return None
        text = layer.strip()
        match = _LEVEL.match(text)
        if match:
            return match.group(1)
        return self.purdue_levels.get(text.lower())

    def is_placeholder_serial(self, serial: str) -> bool:
        text = serial.strip().lower()
        return not text or text in self.placeholder_serials or len(set(text)) == 1


def _check_class(value, where: str, path: Path, allow_skip: bool = False) -> str:
    if allow_skip and value == SKIP:
        return value
    if not isinstance(value, str) or not _CLASS_NAME.match(value):
        raise ConfigError(f"{path}: {where}: {value!r} is not a CMDB class name (e.g. cmdb_ci_ot_plc)")
    return value


def load_class_mapping(path: str | Path | None = None) -> ClassMapping:
    """Read and validate the class mapping file (default ``include/config/class_mapping.yaml``)."""
    path = Path(path) if path else DEFAULT_CLASS_MAPPING_FILE
    return _load(path.resolve())


@lru_cache(maxsize=8)
def _load(path: Path) -> ClassMapping:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read the class mapping file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("types"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'types:' section (Defender type: CMDB class)")
    types = {str(k).strip().lower(): _check_class(v, f"types.{k}", path, allow_skip=True)
             for k, v in raw["types"].items()}
    rules = []
    for i, rule in enumerate(raw.get("os_classification") or []):
        if not isinstance(rule, dict) or "pattern" not in rule:
            raise ConfigError(f"{path}: os_classification[{i}] needs 'pattern' and 'class'")
        try:
            pattern = re.compile(str(rule["pattern"]), re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{path}: os_classification[{i}].pattern is not a valid regular expression: {exc}") \
                from None
        rules.append((pattern, _check_class(rule.get("class"), f"os_classification[{i}].class", path)))
    return ClassMapping(
        types=types,
        default_class=_check_class(raw.get("default_class", "cmdb_ci_ot"), "default_class", path),
        os_classification_types=frozenset(str(t).strip().lower() for t in raw.get("os_classification_types") or []),
        os_classification=tuple(rules),
        computer_classes=frozenset(_check_class(c, "computer_classes", path) for c in raw.get("computer_classes") or []),
        purdue_levels={str(k).strip().lower(): str(v) for k, v in (raw.get("purdue_levels") or {}).items()},
        placeholder_serials=frozenset(str(s).strip().lower() for s in raw.get("placeholder_serials") or []),
    )


# --------------------------------------------------------------------------- helpers


def clean_text(value, limit: int = VALUE_MAX, *, keep_end: bool = False) -> str | None:
    """Printable, NFC-normalised, single-spaced text cut to ``limit`` characters; None when empty.

    ``keep_end``: cut in the middle (``head…tail``), so long names that differ only at the end (a numbered
    suffix) stay distinct -- the IRE matches on ``name`` when nothing else identifies a device.
    """
    if value is None:
        return None
    text = unicodedata.normalize("NFC", str(value))
    text = _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()
    if len(text) > limit and keep_end:
        head = (limit - 1) // 2
        return f"{text[:head].rstrip()}…{text[-(limit - 1 - head):].lstrip()}"
    return text[:limit].rstrip() or None


def sn_datetime(value: datetime | None) -> str | None:
    """Aware datetime -> ServiceNow ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _bool(value: bool | None) -> str | None:
    return None if value is None else ("true" if value else "false")


def _split_os(os_name: str) -> tuple[str, str | None]:
    """``Windows 10 64`` -> (``Windows 10``, ``64``)."""
    parts = os_name.rsplit(" ", 1)
    if len(parts) == 2 and parts[1] in ("32", "64"):
        return parts[0], parts[1]
    return os_name, None


def _ip_version(ip: str) -> str:
    return "6" if ":" in ip else "4"


def _drop_none(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------- mapping


def map_device(device, *, source_name: str, mapping: ClassMapping) -> dict:
    """One IRE payload item for ``device`` (a :class:`~defender_servicenow.models.Device`).

    :raises MappingError: the device cannot be sent (its type is mapped to ``skip``, or it has nothing that
        could identify it); the message is the reason, for the log and the run summary.
    """
    class_name = mapping.class_for(device.type, device.operating_system)
    if class_name == SKIP:
        raise MappingError(f"type {device.type!r} is not a device in the CMDB (class mapping: skip)")
    macs = list(dict.fromkeys(device.mac_addresses or []))
    ips = list(dict.fromkeys(device.ip_addresses or []))
    name = clean_text(device.name, NAME_MAX, keep_end=True) or (macs[0] if macs else None) or (ips[0] if ips else None)
    if not name:
        raise MappingError("no name, MAC address or IP address to identify the device")

    firmware = list(device.firmware or [])
    main = next((f for f in firmware if f.serial or f.model or f.firmware_version), None)
    # Azure gives the device's own hardware model / serial; appliances only the firmware modules'
    serial = clean_text(device.serial_number or (main.serial if main else None), 100)
    if serial and mapping.is_placeholder_serial(serial):
        serial = None
    values = {
        "name": name,
        "manufacturer": clean_text(device.vendor, 100),
        "model_number": clean_text(device.hardware_model or (main.model if main else None), 100),
        "serial_number": serial,
        "firmware_version": clean_text(main.firmware_version, 100) if main else None,
        "first_discovered": sn_datetime(device.first_seen),
        "last_discovered": sn_datetime(device.last_seen),
    }
    operating_system = clean_text(device.operating_system, 100)
    if operating_system and class_name in mapping.computer_classes:
        values["os"], values["os_address_width"] = _split_os(operating_system)
        operating_system = None  # has a column; no key/value row

    lookup = []
    if serial:
        lookup.append({"className": "cmdb_serial_number",
                       "values": {"serial_number": serial, "serial_number_type": "system", "valid": "true"}})
    paired_ip = ips[0] if len(macs) == 1 and ips else None
    for mac in macs:
        lookup.append({"className": "cmdb_ci_network_adapter",
                       "values": _drop_none({"name": mac, "mac_address": mac,
                                             "ip_address": paired_ip if mac == macs[0] else None})})

    for ip in ips:
        lookup.append({"className": "cmdb_ci_ip_address",
                       "values": _drop_none({"ip_address": ip, "ip_version": _ip_version(ip),
                                             "mac_address": macs[0] if len(macs) == 1 else None})})
    related = []
    ot_entity = _drop_none({
        "ot_asset_type": clean_text(device.type, 100),
        "purdue_level": mapping.purdue_level(device.purdue_level),
        "ot_correlation_id": device.native_key,
    })
    related.append({"className": "cmdb_ot_entity", "values": ot_entity})
    attributes = {
        "device_id": str(device.id),
        "type": clean_text(device.type, 100),
        "category": clean_text(device.category, 100),
        "appliance": clean_text(device.appliance_name, 255),
        "sensor": clean_text(device.sensor_name, 255) or (str(device.sensor_id) if device.sensor_id is not None else None),
        "site": clean_text(device.site_name, 255) or (str(device.site_id) if device.site_id is not None else None),
        "zone": clean_text(device.zone_name, 255) or (str(device.zone_id) if device.zone_id is not None else None),
        "purdue_layer": clean_text(device.purdue_level, 100),
        "criticality": clean_text(device.criticality, 100),
        "azure_resource_id": clean_text(device.resource_id, 255, keep_end=True),
        "protocols": clean_text(", ".join(device.protocols or [])),
        "operating_system": operating_system,
        "authorized": _bool(device.authorized),
        "scanner": _bool(device.scanner),
        "engineering_station": _bool(device.engineering_station),
        "has_dynamic_address": _bool(device.has_dynamic_address),
        "mac_addresses": ", ".join(macs) if len(macs) > 1 else None,
        "ip_addresses": ", ".join(ips) if len(ips) > 1 else None,
    }
    related.extend({"className": "cmdb_key_value", "values": {"key": KEY_PREFIX + key, "value": value}}
                   for key, value in attributes.items() if value is not None)

    return {
        "className": class_name,
        "values": _drop_none(values),
        "lookup": lookup,
        "related": related,
        "sys_object_source_info": {"source_name": source_name, "source_native_key": device.native_key},
    }


def payload_digest(item: dict, *, last_seen_resolution_hours: int = 24) -> str:
    """Change-detection fingerprint of a mapped item (16 hex characters).

    ``last_discovered`` counts at ``last_seen_resolution_hours`` resolution only: an active device is seen
    every minute, and resending it for that alone would turn every sync into a full one. The IRE stamps
    ``last_discovered`` itself whenever a device is sent.
    """
    values = item.get("values", {})
    last = values.get("last_discovered")
    if last and last_seen_resolution_hours > 0:
        moment = datetime.strptime(last, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
        bucket = int(moment.timestamp()) // (3600 * last_seen_resolution_hours)
        item = {**item, "values": {**values, "last_discovered": bucket}}
    text = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def identifiers(item: dict) -> list[str]:
    """The identifying values of a mapped item: its serial (``serial:<value>``) and MACs (``mac:<value>``)."""
    out = []
    serial = item["values"].get("serial_number")
    if serial:
        out.append(f"serial:{serial.lower()}")
    out.extend(f"mac:{x['values']['mac_address']}" for x in item.get("lookup") or []
               if x["className"] == "cmdb_ci_network_adapter")
    return out


def without_identifiers(item: dict, shared: set[str]) -> dict:
    """``item`` without the ``shared`` identifiers (see :func:`identifiers`) in its identifying fields.

    When two devices of one inventory report the same serial or MAC (a placeholder serial, a router's MAC
    seen for the devices behind it), the IRE would merge them into one CI or answer MULTI_MATCH. The later
    device keeps those values as ``defender.shared_*`` key/value rows instead, and is identified by its
    ``sys_object_source`` key and its own identifiers.
    """
    values = dict(item["values"])
    lookup, related = [], list(item.get("related") or [])
    serial = values.get("serial_number")
    if serial and f"serial:{serial.lower()}" in shared:
        del values["serial_number"]
        related.append({"className": "cmdb_key_value", "values": {"key": KEY_PREFIX + "shared_serial",
                                                                  "value": serial}})
    shared_macs = []
    for entry in item.get("lookup") or []:
        if entry["className"] == "cmdb_serial_number" and serial and "serial_number" not in values:
            continue
        if entry["className"] == "cmdb_ci_network_adapter" and f"mac:{entry['values']['mac_address']}" in shared:
            shared_macs.append(entry["values"]["mac_address"])
            continue
        lookup.append(entry)
    if shared_macs:
        related.append({"className": "cmdb_key_value", "values": {"key": KEY_PREFIX + "shared_mac_addresses",
                                                                  "value": ", ".join(shared_macs)}})
    return {**item, "values": values, "lookup": lookup, "related": related}
