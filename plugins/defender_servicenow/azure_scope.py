"""The ``sites`` / ``sensors`` filters of an Azure connection, for alerts and sensors (pure functions).

Resource Graph documents a device's site and sensor (``properties.sensor.site`` / ``.name``), but not an
alert's or a sensor's: an alert names its devices (``properties.extendedProperties.DeviceResourceIds``, which
"joins to the device record's id", as Microsoft's own alerts-by-Purdue-level workbook query does) and a
sensor's site is only the ``/sites/<site>/`` segment of its resource id. So:

* alerts are filtered through their devices: a second query reads which of the alerts' devices are of the
  wanted sites and sensors (:func:`read_alert_devices`, in chunks of :data:`SCOPE_CHUNK` ids); an alert that
  names no device cannot be placed and is kept (and counted in the log), never dropped silently. The same
  device records give a forwarded alert its sensor, site, zone and device ids (``azure_models.place_alert``),
  with or without a filter;
* ``extendedProperties.SensorId`` is not used: the reference does not say whether it holds a sensor's name
  or its id, so the ``sensors`` filter matches the device's ``properties.sensor.name`` as for devices;
* sensors are filtered on the site segment of their id, matched against the configured names directly or
  through the site resources' ``properties.displayName`` (:func:`wanted_site_segments`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from defender_servicenow.azure_models import DEVICE_TYPE, alert_device_ids  # noqa: F401 (re-exported)

SCOPE_CHUNK = 100   # device ids per scope query (keeps the KQL text well under Resource Graph's limits)


def site_segment(resource_id: Any) -> str | None:
    """``…/sites/<site>/sensors/<name>`` -> ``<site>`` (None without a sites segment)."""
    parts = resource_id.split("/") if isinstance(resource_id, str) else []
    lowered = [p.lower() for p in parts]
    if "sites" not in lowered:
        return None
    i = lowered.index("sites")
    return parts[i + 1] or None if i + 1 < len(parts) else None


def wanted_site_segments(sites: Iterable[str], site_records: Iterable[Any]) -> set[str]:
    """Lower-case site resource names meant by the configured ``sites``: a name itself, or the resource name
    of a site whose ``properties.displayName`` is that name."""
    wanted = {s.lower() for s in sites}
    segments = set(wanted)
    for record in site_records:
        if not isinstance(record, dict):
            continue
        name = site_segment(record.get("id")) or record.get("name")
        display = (record.get("properties") or {}).get("displayName")
        if isinstance(name, str) and isinstance(display, str) and display.lower() in wanted:
            segments.add(name.lower())
    return segments


def sensors_in_sites(sensors: Iterable[Any], segments: set[str]) -> list[dict]:
    """The sensor records whose id lies under one of the site segments."""
    return [s for s in sensors if isinstance(s, dict) and (site_segment(s.get("id")) or "").lower() in segments]


def scope_queries(device_ids: Iterable[str], sites: tuple[str, ...], sensors: tuple[str, ...],
                  project: str = "id") -> list[str]:
    """Queries for which of these devices are of the wanted sites and sensors (no filter: all of them that
    Resource Graph has), projecting ``project``."""
    from defender_servicenow.hooks.azure import _kql_list, build_query

    ids = sorted({i.lower() for i in device_ids})
    return [build_query(DEVICE_TYPE, sites=sites, sensors=sensors, project=project,
                        where=(f"where id in~ ({_kql_list(tuple(ids[k:k + SCOPE_CHUNK]))})",))
            for k in range(0, len(ids), SCOPE_CHUNK)]


def read_alert_devices(raws: list[Any], sites: tuple[str, ...], sensors: tuple[str, ...],
                       run_query: Callable[[str], Iterable[Any]]) -> dict[str, dict]:
    """Lower-case device id -> device record (``id``, ``properties``) for the devices these alerts name, of
    the wanted sites and sensors (all of them without a filter): one query per :data:`SCOPE_CHUNK` devices.
    ``run_query``: the hook's Resource Graph reader."""
    device_ids = (i for raw in raws for i in alert_device_ids(raw))
    return {str(r["id"]).lower(): r for q in scope_queries(device_ids, sites, sensors, project="id, properties")
            for r in run_query(q) if isinstance(r, dict) and r.get("id")}


def split_by_scope(alerts: list[Any], scoped_device_ids: set[str]) -> tuple[list[Any], list[Any]]:
    """(alerts in scope, alerts naming no device) given the lower-case ids of the devices in scope. An alert
    is in scope when any of its devices is."""
    kept, unplaced = [], []
    for raw in alerts:
        ids = alert_device_ids(raw)
        if not ids:
            unplaced.append(raw)
        elif any(i.lower() in scoped_device_ids for i in ids):
            kept.append(raw)
    return kept, unplaced


def filter_alerts(raws: list[Any], devices: Mapping[str, Any]) -> tuple[list[Any], int]:
    """(alerts in scope followed by those naming no device, how many name none), given the devices in scope
    (:func:`read_alert_devices` with the filter)."""
    kept, unplaced = split_by_scope(raws, set(devices))
    return [*kept, *unplaced], len(unplaced)
