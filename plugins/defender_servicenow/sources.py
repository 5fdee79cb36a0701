"""The one source interface the engines take: a Defender for IoT appliance (OT sensor, management console)
or Defender for IoT in Azure is one :class:`Source`; engines never branch on the kind.

``source_for(conn_id)`` picks the implementation from the connection's ``conn_type``:
``defender_iot`` -> :class:`ApplianceSource` (wraps ``DefenderIoTHook`` unchanged), ``defender_iot_azure`` ->
the Azure hook (which implements the interface itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Protocol, runtime_checkable

from defender_servicenow.exceptions import ConfigError, DefenderError
from defender_servicenow.models import Alert, Device, InvalidRecord

KINDS = ("sensor", "management_console", "azure")


@runtime_checkable
class Source(Protocol):
    """What an engine needs from a Defender source.

    * ``kind``: ``sensor`` | ``management_console`` | ``azure`` (health data); ``name``: display name.
    * ``supports_deletions`` / ``supports_alert_state``: capabilities, so engines ask instead of comparing kinds.
    * ``retires_missing``: a device missing from ``iter_devices`` for N syncs is retired (a sensor's or
      Azure's inventory; a console reports its deletions instead).
    * ``aggregates_sensors``: alerts come from several sensors (per-sensor progress in the health data).
    * ``reports_protocols``: its devices carry protocols (rules with ``protocols`` can match its alerts;
      Resource Graph has no device protocols).

    Optional capabilities (CMDB depth, ``cmdb_depth``): ``iter_sensors()`` with ``device_sensor_key(device)``
    (which sensor sees a device), and ``supports_connections`` with ``iter_connections()``.
    """

    source_id: str
    kind: str
    name: str
    supports_deletions: bool
    supports_alert_state: bool
    retires_missing: bool
    aggregates_sensors: bool
    reports_protocols: bool

    def iter_devices(self) -> Iterator[Device | InvalidRecord]: ...

    def deleted_device_ids(self, since: datetime) -> list[int]: ...

    def get_alerts(self, from_time: datetime | None = None, to_time: datetime | None = None,
                   state: str | None = None) -> list[Alert | InvalidRecord]: ...

    def set_alert_state(self, alert: Alert, action: str = "handle") -> str: ...

    def get_sensors(self) -> list[dict]: ...

    def test_connection(self) -> tuple[bool, str]: ...


class ApplianceSource:
    """:class:`Source` over an unchanged ``DefenderIoTHook``."""

    def __init__(self, hook):
        self.hook = hook
        self.source_id = hook.defender_conn_id

    @property
    def kind(self) -> str:
        return self.hook.appliance

    @property
    def name(self) -> str:
        return self.hook.appliance_name

    @property
    def supports_deletions(self) -> bool:
        return self.kind == "management_console"

    supports_alert_state = supports_deletions
    aggregates_sensors = supports_deletions
    reports_protocols = True

    @property
    def retires_missing(self) -> bool:
        return not self.supports_deletions

    def iter_devices(self) -> Iterator[Device | InvalidRecord]:
        return self.hook.iter_devices()

    def deleted_device_ids(self, since: datetime) -> list[int]:
        return self.hook.deleted_device_ids(since) if self.supports_deletions else []

    def get_alerts(self, from_time=None, to_time=None, state=None) -> list[Alert | InvalidRecord]:
        return self.hook.get_alerts(from_time=from_time, to_time=to_time, state=state)

    def set_alert_state(self, alert: Alert, action: str = "handle") -> str:
        """``handle`` / ``handleAndLearn`` the alert (by its UUID) on the management console."""
        if not alert.uuid:
            raise DefenderError(f"Alert {alert.key} has no UUID; the management console cannot handle it")
        return self.hook.handle_alert(alert.uuid, action)

    def get_sensors(self) -> list[dict]:
        return self.hook.get_sensors() if self.kind == "management_console" else []

    # CMDB depth: a sensor connection is itself the one sensor of its devices; a console lists its sensors.
    supports_connections = True

    def iter_sensors(self):
        from defender_servicenow.cmdb_depth.models import appliance_sensor, parse_v3_sensor

        if self.kind == "management_console":
            return [parse_v3_sensor(raw, self.source_id) for raw in self.hook.get_sensors()]
        return [appliance_sensor(self.name, self.hook.base_url)]

    def device_sensor_key(self, device: Device) -> str | None:
        if self.kind == "management_console":
            return None if device.sensor_id is None else str(device.sensor_id)
        return "appliance"

    def iter_connections(self):
        from defender_servicenow.cmdb_depth.models import parse_sensor_connection, parse_v3_connection

        if self.kind == "management_console":
            return (parse_v3_connection(raw, self.source_id) for raw in self.hook.iter_v3_connections(0))
        return (parse_sensor_connection(raw, self.source_id) for raw in self.hook.iter_device_connections())

    supports_cves = True

    def iter_device_cves(self, min_score: float = 0):
        """(device id, its CVEs): the console's v3 device CVEs; a sensor's CVEs are keyed by IP, so they go
        to every device of the inventory with that IP."""
        from defender_servicenow.cmdb_depth.models import parse_v3_device_cves, sensor_cves_by_ip

        if self.kind == "management_console":
            yield from (parse_v3_device_cves(raw, self.source_id)
                        for raw in self.hook.iter_v3_device_cves(0, min_score or None))
            return
        by_ip = sensor_cves_by_ip(self.hook.iter_device_cves())
        if not by_ip:
            return
        for device in self.hook.iter_devices():
            found = [c for ip in getattr(device, "ip_addresses", ()) for c in by_ip.get(ip, ())]
            if found:
                yield device.id, found

    def test_connection(self) -> tuple[bool, str]:
        return self.hook.test_connection()


class AzureSource:
    """:class:`Source` over ``DefenderIoTAzureHook``; ``set_alert_state`` closes the alert in Azure (any
    ``action``: handling an alert in the appliance sense is closing it in Azure)."""

    kind = "azure"
    supports_deletions = True
    supports_alert_state = True
    retires_missing = True    # Removed/Deleted at once; a resource gone from ARG after N syncs
    aggregates_sensors = True
    reports_protocols = False  # Resource Graph has no device protocols

    def __init__(self, hook):
        self.hook = hook
        self.source_id = hook.defender_conn_id

    @property
    def name(self) -> str:
        return self.hook.appliance_name

    def iter_devices(self):
        return self.hook.iter_devices()

    def deleted_device_ids(self, since: datetime) -> list[int]:
        return self.hook.deleted_device_ids(since)

    def get_alerts(self, from_time=None, to_time=None, state=None):
        return self.hook.get_alerts(from_time=from_time, to_time=to_time, state=state)

    def set_alert_state(self, alert: Alert, action: str = "handle") -> str:
        if not alert.resource_id:
            raise DefenderError(f"Alert {alert.key} has no Azure resource id; it cannot be closed in Azure")
        self.hook.set_alert_status(alert.resource_id, "Closed")
        return "Closed"

    def get_sensors(self) -> list[dict]:
        return self.hook.get_sensors()

    # CMDB depth: sensors from Resource Graph; Azure publishes no device-to-device connections.
    supports_connections = False

    def iter_sensors(self):
        from defender_servicenow.cmdb_depth.models import parse_azure_sensor

        return [parse_azure_sensor(raw, self.source_id) for raw in self.hook.get_sensors()]

    def device_sensor_key(self, device: Device) -> str | None:
        return device.sensor_name.lower() if device.sensor_name else None

    def iter_connections(self):
        return iter(())

    # CVEs: Resource Graph's device vulnerabilities, one record per device and CVE.
    supports_cves = True

    def iter_device_cves(self, min_score: float = 0):
        """(device id, its CVEs) per device, the id the device sync keys the device by (``stable_id`` of its
        ARM id); unusable records as ``InvalidRecord``. ``min_score`` is applied by the CVE sync (counted)."""
        from defender_servicenow.cmdb_depth.models import parse_azure_vulnerability

        by_device: dict[int, list] = {}
        for raw in self.hook.iter_vulnerabilities():
            record = parse_azure_vulnerability(raw, self.source_id)
            if isinstance(record, InvalidRecord):
                yield record
            else:
                by_device.setdefault(record[0], []).append(record[1])
        yield from by_device.items()

    def test_connection(self) -> tuple[bool, str]:
        return self.hook.test_connection()


def source_for(conn_id: str, *, auth_guard=None) -> Source:
    """The source for a Defender connection id, by its ``conn_type``. ``auth_guard``: a
    ``hooks.lockout.AuthGuard`` (no login after rejected credentials), for either kind."""
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    conn_type = (conn.conn_type or "").strip().lower()
    if conn_type == "defender_iot":
        from defender_servicenow.hooks.defender import DefenderIoTHook

        return ApplianceSource(DefenderIoTHook(conn_id, auth_guard=auth_guard))
    if conn_type == "defender_iot_azure":
        from defender_servicenow.hooks.azure import DefenderIoTAzureHook

        return AzureSource(DefenderIoTAzureHook(conn_id, auth_guard=auth_guard))
    raise ConfigError(f"Connection {conn_id!r} has type {conn_type or '(none)'!r}; a Defender source needs "
                      "type defender_iot (sensor / management console) or defender_iot_azure")
