"""Normalised sensors and device connections, parsed from each source's raw records (pure, never raise:
a record that cannot be used comes back as an ``InvalidRecord`` with the reason)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from defender_servicenow.azure_scope import site_segment
from defender_servicenow.models import InvalidRecord, ms_to_datetime, normalize_ip, normalize_mac

# Connection states that mean the sensor is not reporting (console v3 ``u_connection_state``, Azure
# ``sensorStatus``): its CI is marked Non-Operational (operational_status 2) while they last.
DISCONNECTED_STATES = {"disconnected", "out_of_sync", "time_diff_offset"}


@dataclass(frozen=True)
class Sensor:
    """One OT sensor of a source. ``key`` is stable within the source (console sensor id, Azure sensor
    name in lower case, ``appliance`` for a sensor connection) and is what devices refer to."""

    key: str
    name: str
    ip: str | None = None
    mac: str | None = None
    fqdn: str | None = None
    version: str | None = None
    status: str | None = None
    zone: str | None = None
    site: str | None = None
    learning_mode: bool | None = None

    @property
    def connected(self) -> bool:
        return (self.status or "").strip().lower() not in DISCONNECTED_STATES


@dataclass(frozen=True)
class Connection:
    """Traffic between two devices of one source. ``first`` -> ``second`` is the direction the relation
    takes (parent -> child); ``last_seen`` is None where the API does not say (console v3)."""

    first: int
    second: int
    last_seen: datetime | None = None
    kind: str | None = None          # console: One Way / Two Way / Multicast
    protocols: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def host_of(url_or_host: str | None) -> tuple[str | None, str | None]:
    """``https://10.1.0.2:443`` -> (ip ``10.1.0.2``, None); ``https://sensor.plant`` -> (None, ``sensor.plant``)."""
    text = _text(url_or_host)
    if not text:
        return None, None
    host = urlsplit(text if "//" in text else f"//{text}").hostname
    if not host:
        return None, None
    try:
        return str(ipaddress.ip_address(host)), None
    except ValueError:
        return None, host


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def parse_v3_sensor(raw: Any, source: str) -> Sensor | InvalidRecord:
    """A management console sensor (``/external/v3/integration/sensors``)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("u_id"), int) or not _text(raw.get("u_name")):
        rid = raw.get("u_id") if isinstance(raw, dict) else None
        return InvalidRecord(source=source, record_id=None if rid is None else str(rid),
                             reason="a sensor record needs an integer u_id and a u_name")
    ip, fqdn = host_of(raw.get("u_interface_address"))
    return Sensor(key=str(raw["u_id"]), name=_text(raw["u_name"]), ip=ip, fqdn=fqdn,
                  version=_text(raw.get("u_version")), status=_text(raw.get("u_connection_state")),
                  learning_mode=_bool(raw.get("u_is_in_learning_mode")))


def parse_azure_sensor(raw: Any, source: str) -> Sensor | InvalidRecord:
    """A cloud-connected sensor (ARG ``microsoft.iotsecurity/locations/sites/sensors``)."""
    props = raw.get("properties") if isinstance(raw, dict) else None
    if not isinstance(props, dict) or not _text(raw.get("name")):
        return InvalidRecord(source=source, record_id=_text(raw.get("id")) if isinstance(raw, dict) else None,
                             reason="a sensor record needs a name and properties")
    return Sensor(key=_text(raw["name"]).lower(), name=_text(raw["name"]), ip=normalize_ip(props.get("ip")),
                  mac=normalize_mac(props.get("mac")), fqdn=_text(props.get("hostname")),
                  version=_text(props.get("sensorVersion")), status=_text(props.get("sensorStatus")),
                  zone=_text(props.get("zone")), site=_text(props.get("site")) or site_segment(raw.get("id")),
                  learning_mode=_bool(props.get("learningMode")))


def appliance_sensor(name: str, host: str | None) -> Sensor:
    """The appliance of a sensor connection is the one sensor of that source."""
    ip, fqdn = host_of(host)
    return Sensor(key="appliance", name=name, ip=ip, fqdn=fqdn)


def _device_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _ends(raw: Any, source: str, first_key: str, second_key: str) -> tuple[int, int] | InvalidRecord:
    first = _device_id(raw.get(first_key)) if isinstance(raw, dict) else None
    second = _device_id(raw.get(second_key)) if isinstance(raw, dict) else None
    if first is None or second is None or first == second:
        return InvalidRecord(source=source, record_id=None, reason="a connection needs two different positive "
                                                                   f"device ids ({first_key}, {second_key})")
    return first, second


def parse_sensor_connection(raw: Any, source: str) -> Connection | InvalidRecord:
    """An OT sensor connection (``/api/v1/devices/connections``): ``firstDeviceId`` -> ``secondDeviceId``."""
    ends = _ends(raw, source, "firstDeviceId", "secondDeviceId")
    if isinstance(ends, InvalidRecord):
        return ends
    protocols = tuple(str(p.get("name")) for p in raw.get("protocols") or [] if isinstance(p, dict) and p.get("name"))
    ports = tuple(p for p in raw.get("ports") or [] if isinstance(p, int))
    return Connection(*ends, ms_to_datetime(raw.get("lastSeen")), None, protocols, ports)


def parse_v3_connection(raw: Any, source: str) -> Connection | InvalidRecord:
    """A management console connection (``/external/v3/integration/connections``): source -> destination."""
    ends = _ends(raw, source, "u_src_device_id", "u_dest_device_id")
    if isinstance(ends, InvalidRecord):
        return ends
    return Connection(*ends, None, _text(raw.get("u_connection_type")))


@dataclass(frozen=True)
class Cve:
    """A CVE Defender reports on a device: id, CVSS score (0-10, None when unreadable), attack vector,
    description."""

    id: str
    score: float | None = None
    attack_vector: str | None = None
    description: str | None = None


def _score(value: Any) -> float | None:
    try:
        score = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return score if 0 <= score <= 10 else None


def _cve(raw: Any, prefix: str) -> Cve | None:
    """One CVE object: sensor keys (``cveId``, ``score``...) with ``prefix=""``, console keys with ``u_``."""
    if not isinstance(raw, dict):
        return None
    keys = ("u_cve_id", "u_score", "u_attack_vector", "u_description") if prefix else \
        ("cveId", "score", "attackVector", "description")
    cve_id = _text(raw.get(keys[0]))
    if not cve_id:
        return None
    return Cve(cve_id.upper(), _score(raw.get(keys[1])), _text(raw.get(keys[2])), _text(raw.get(keys[3])))


def parse_v3_device_cves(raw: Any, source: str) -> tuple[int, list[Cve]] | InvalidRecord:
    """A console ``u_device_cves`` record -> (device id, its CVEs); CVE objects without an id are dropped."""
    device_id = _device_id(raw.get("u_id")) if isinstance(raw, dict) else None
    if device_id is None or not isinstance(raw.get("u_cves"), list):
        return InvalidRecord(source=source, record_id=None, reason="a device CVE record needs a u_id and u_cves")
    return device_id, [c for c in (_cve(x, "u_") for x in raw["u_cves"]) if c]


def sensor_cves_by_ip(raws: Any) -> dict[str, list[Cve]]:
    """Sensor ``/api/v1/devices/cves`` objects grouped by their ``ipAddress`` (the sensor keys CVEs by IP)."""
    out: dict[str, list[Cve]] = {}
    for raw in raws:
        ip = normalize_ip(raw.get("ipAddress")) if isinstance(raw, dict) else None
        cve = _cve(raw, "")
        if ip and cve:
            out.setdefault(ip, []).append(cve)
    return out


def parse_azure_vulnerability(raw: Any, source: str) -> tuple[int, Cve] | InvalidRecord:
    """An ARG ``…/devicegroups/vulnerabilities`` record -> (device key, its CVE).

    The device key is the one the device sync gives the device (``azure_models.stable_id`` of its ARM id):
    ``properties.deviceId`` is the device's ARM id (what ServiceNow's own Azure Vulnerability Response
    integration looks the CI up by); a bare device name is read as ``<the record's device group>/devices/<name>``.
    ``vulnerabilityId`` -> id, ``severityScore`` (else ``score``) -> score, ``description``; no attack vector.
    """
    from defender_servicenow.azure_models import stable_id

    props = raw.get("properties") if isinstance(raw, dict) else None
    rid = _text(raw.get("id")) if isinstance(raw, dict) else None
    cve_id = _text(props.get("vulnerabilityId")) if isinstance(props, dict) else None
    device = _text(props.get("deviceId")) if isinstance(props, dict) else None
    if not cve_id or not device:
        return InvalidRecord(source=source, record_id=None if rid is None else rid[-64:],
                             reason="an Azure vulnerability record needs properties.deviceId and vulnerabilityId")
    if not device.startswith("/"):
        if not rid or "/vulnerabilities/" not in rid.lower():
            return InvalidRecord(source=source, record_id=None if rid is None else rid[-64:],
                                 reason=f"deviceId {device[:64]!r} is not an ARM id and the record's own id "
                                        "names no device group")
        device = f"{rid[:rid.lower().rindex('/vulnerabilities/')]}/devices/{device}"
    score = props.get("severityScore") if props.get("severityScore") is not None else props.get("score")
    return stable_id(device), Cve(cve_id.upper(), _score(score), None, _text(props.get("description")))
