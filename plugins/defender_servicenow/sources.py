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
    """

    source_id: str
    kind: str
    name: str
    supports_deletions: bool
    supports_alert_state: bool
    retires_missing: bool
    aggregates_sensors: bool

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
