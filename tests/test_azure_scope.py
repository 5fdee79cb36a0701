"""The Azure ``sites`` / ``sensors`` filters on the fields Resource Graph really has: alerts through their
devices (``DeviceResourceIds``), sensors through the ``/sites/<site>/`` segment of their id. The simulator
carries only the reference's alert fields, so a filter on an invented field finds nothing here as on Azure."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from defender_servicenow.azure_models import parse_azure_alert, place_alert, stable_id
from defender_servicenow.azure_scope import alert_device_ids, site_segment, split_by_scope
from defender_servicenow.cmdb_depth.models import parse_azure_sensor
from defender_servicenow.hooks.azure import DefenderIoTAzureHook
from defender_servicenow.models import Alert
from defender_servicenow.triggers.pollers import AzurePoller

from tests.test_azure_forwarding_dag import add_alert

REFERENCE_ALERT_FIELDS = {"SensorId", "SourceDeviceAddress", "DestinationDeviceAddress", "DeviceResourceIds"}


def _site_of(sim, alert: dict) -> str:
    device = next(d for d in sim.devices if d.get("id") == alert["properties"]["extendedProperties"]["DeviceResourceIds"])
    return device["properties"]["sensor"]["site"]


def test_simulated_records_carry_only_the_reference_fields(azure_sim_factory):
    az = azure_sim_factory("az_scope_fields", devices=20, alerts=5, sensors=4)
    assert all(set(a["properties"]["extendedProperties"]) <= REFERENCE_ALERT_FIELDS for a in az.sim.alerts)
    assert all("site" not in s["properties"] for s in az.sim.sensors)   # a sensor's site is in its id only


def test_site_filter_keeps_the_alerts_of_the_sites_devices(azure_sim_factory, capsys):
    probe = azure_sim_factory("az_scope_all", devices=60, alerts=40, sensors=4)
    site = probe.sim.devices[0]["properties"]["sensor"]["site"]
    expected = {stable_id(a["id"]) for a in probe.sim.alerts if _site_of(probe.sim, a) == site}
    assert 0 < len(expected) < len(probe.sim.alerts)
    az = azure_sim_factory("az_scope_site", devices=60, alerts=40, sensors=4, extra={"sites": [site.upper()]})
    hook = DefenderIoTAzureHook(az.conn_id)
    got = hook.get_alerts()
    assert {a.id for a in got if isinstance(a, Alert)} == expected
    assert hook.request_count == 2          # the alerts, then which of their 40 devices are of the site

    # an alert that names no device cannot be placed: kept and counted, not dropped
    orphan = add_alert(az.sim, "High", datetime.now(timezone.utc), DeviceResourceIds=None)
    capsys.readouterr()
    again = DefenderIoTAzureHook(az.conn_id).get_alerts()
    assert stable_id(orphan["id"]) in {a.id for a in again}
    assert "1 alerts from az_scope_site name no device" in capsys.readouterr().out


def test_sensors_filter_matches_the_devices_sensor_name(azure_sim_factory):
    probe = azure_sim_factory("az_scope_probe", devices=60, alerts=40, sensors=4)
    sensor = probe.sim.devices[0]["properties"]["sensor"]["name"]
    by_device = {d["id"]: d["properties"]["sensor"]["name"] for d in probe.sim.devices}
    expected = {stable_id(a["id"]) for a in probe.sim.alerts
                if by_device[a["properties"]["extendedProperties"]["DeviceResourceIds"]] == sensor}
    az = azure_sim_factory("az_scope_sensor", devices=60, alerts=40, sensors=4, extra={"sensors": [sensor]})
    assert expected and {a.id for a in DefenderIoTAzureHook(az.conn_id).get_alerts()} == expected


def test_site_filter_keeps_the_sensors_under_the_sites_path(azure_sim_factory):
    probe = azure_sim_factory("az_scope_s_probe", devices=10, sensors=4)
    site = probe.sim.sites[0]["properties"]["displayName"]   # "Plant …": the site resource is named "plant-…"
    expected = {s["name"] for s in probe.sim.sensors if f"/sites/{probe.sim.sites[0]['name']}/" in s["id"]}
    az = azure_sim_factory("az_scope_sensors", devices=10, sensors=4, extra={"sites": [site]})
    got = DefenderIoTAzureHook(az.conn_id).get_sensors()
    assert {s["name"] for s in got} == expected and 0 < len(expected) < len(probe.sim.sensors)
    assert parse_azure_sensor(got[0], "az").site == probe.sim.sites[0]["name"]   # the site, read from the id


def test_pure_helpers():
    assert site_segment("/subscriptions/s/providers/P/locations/l/sites/Plant-1/sensors/x") == "Plant-1"
    assert site_segment("/subscriptions/s/providers/P/locations/l/deviceGroups/g/devices/d") is None
    assert alert_device_ids({"properties": {"extendedProperties": {"DeviceResourceIds": ["/a", " /b,/c "]}}}) \
        == ["/a", "/b", "/c"]
    alerts = [{"properties": {"extendedProperties": {"DeviceResourceIds": "/A"}}},
              {"properties": {"extendedProperties": {"DeviceResourceIds": "/b"}}}, {"properties": {}}]
    assert split_by_scope(alerts, {"/a"}) == ([alerts[0]], [alerts[2]])
    assert isinstance(parse_azure_alert({"id": "/subscriptions/x/alerts/1", "type": "t", "properties": {
        "startTimeUtc": "2026-01-01T00:00:00Z", "severity": "High", "extendedProperties": {}}}, source="s"), Alert)


async def test_the_trigger_only_wakes_for_alerts_of_its_sites(azure_sim_factory):
    probe = azure_sim_factory("az_scope_poll", devices=40, alerts=0, sensors=4, quota=1000)
    site = probe.sim.devices[0]["properties"]["sensor"]["site"]
    mine = next(d["id"] for d in probe.sim.devices if d["properties"]["sensor"]["site"] == site)
    other = next(d["id"] for d in probe.sim.devices if d["properties"]["sensor"]["site"] != site)
    az2 = azure_sim_factory("az_scope_poll_site", devices=40, alerts=0, sensors=4, quota=1000,
                            extra={"sites": [site]})
    from airflow.sdk import BaseHook

    poller = AzurePoller(await BaseHook.aget_connection(az2.conn_id), az2.conn_id, 600_000)
    start = datetime.now(timezone.utc) - timedelta(seconds=5)
    wm = {"time_ms": int(start.timestamp() * 1000), "ids": []}
    try:
        await asyncio.to_thread(add_alert, az2.sim, "High", start + timedelta(seconds=1),
                                         DeviceResourceIds=other)
        assert await poller.poll(wm) == []                  # another site's alert does not wake the DAG
        before = az2.sim.counters["arg"]
        assert await poller.poll(wm) == [] and az2.sim.counters["arg"] - before == 1   # known: no device query
        ours = await asyncio.to_thread(add_alert, az2.sim, "High", start + timedelta(seconds=2),
                                       DeviceResourceIds=mine)
        found = await poller.poll(wm)
        assert [i for _, i in found] == [stable_id(ours["id"])]
    finally:
        await poller.aclose()


async def test_the_trigger_waits_for_the_quota_before_placing_alerts(azure_sim_factory):
    probe = azure_sim_factory("az_scope_q_probe", devices=40, alerts=0, sensors=4)
    site = probe.sim.devices[0]["properties"]["sensor"]["site"]
    mine = next(d["id"] for d in probe.sim.devices if d["properties"]["sensor"]["site"] == site)
    az = azure_sim_factory("az_scope_quota", devices=40, alerts=0, sensors=4, quota=1, quota_window=0.5,
                           extra={"sites": [site]})
    from airflow.sdk import BaseHook

    poller = AzurePoller(await BaseHook.aget_connection(az.conn_id), az.conn_id, 600_000)
    start = datetime.now(timezone.utc) - timedelta(seconds=5)
    try:
        ours = await asyncio.to_thread(add_alert, az.sim, "High", start + timedelta(seconds=1), DeviceResourceIds=mine)
        found = await poller.poll({"time_ms": int(start.timestamp() * 1000), "ids": []})
        assert [i for _, i in found] == [stable_id(ours["id"])] and az.sim.counters["throttled"] == 0
    finally:
        await poller.aclose()


def _device(rid: str, *addresses: str, sensor: dict | None = None) -> dict:
    return {"id": rid, "properties": {"nics": [{"ipv4Address": a} for a in addresses],
                                      **({"sensor": sensor} if sensor else {})}}


def _raw_alert(ids, src=None, dst=None) -> dict:
    return {"id": "/subscriptions/x/alerts/1", "properties": {"extendedProperties": {
        "DeviceResourceIds": ids, "SourceDeviceAddress": src, "DestinationDeviceAddress": dst}}}


def test_an_alert_is_placed_through_the_devices_it_names():
    s1, s2 = {"name": "sensor-1", "site": "plant-a", "zone": "line-1"}, {"name": "sensor-2", "site": "plant-b"}
    devices = {"/d/plc": _device("/D/PLC", "10.0.0.5", sensor=s1), "/d/hmi": _device("/d/hmi", "10.0.0.9", sensor=s2)}
    # Two devices: source and destination by their addresses (in either order), the source's sensor.
    assert place_alert(_raw_alert(["/d/hmi", "/D/PLC"], "10.0.0.5", "10.0.0.9"), devices) == ("/D/PLC", "/d/hmi", s1)
    assert place_alert(_raw_alert("/d/hmi,/D/PLC", "10.0.0.9", "10.0.0.5"), devices) == ("/d/hmi", "/D/PLC", s2)
    # One device whose addresses match neither side: it is the source.
    assert place_alert(_raw_alert("/D/PLC", "10.9.9.9", "10.9.9.8"), devices) == ("/D/PLC", None, s1)
    # The destination only: no source; the sensor is the destination's.
    assert place_alert(_raw_alert(["/D/PLC", "/d/hmi"], "10.7.7.7", "10.0.0.9"), devices) == (None, "/d/hmi", s2)
    # A device Resource Graph no longer lists: its id still links the CI; no sensor known.
    assert place_alert(_raw_alert("/d/gone", "10.0.0.1"), devices) == ("/d/gone", None, {})
    assert place_alert(_raw_alert(None), devices) == (None, None, {})


def test_an_alert_naming_one_device_twice_is_placed_as_naming_it_once():
    """ARM ids are case-insensitive: the same device named twice (in any case) is one device, the alert's
    source, and never both its source and its destination."""
    s1 = {"name": "sensor-1", "site": "plant-a"}
    devices = {"/d/plc": _device("/D/PLC", "10.0.0.5", sensor=s1)}
    assert place_alert(_raw_alert(["/D/PLC", "/d/plc"], "10.9.9.9"), devices) == ("/D/PLC", None, s1)
    assert place_alert(_raw_alert("/D/PLC,/D/PLC"), devices) == ("/D/PLC", None, s1)
    assert alert_device_ids(_raw_alert(["/d/hmi, /D/PLC", "/d/plc", "/D/HMI"])) == ["/d/hmi", "/D/PLC"]
    assert place_alert(_raw_alert(["/D/PLC", "/d/plc"], "10.0.0.5", "10.0.0.5"), devices) == ("/D/PLC", None, s1)


def test_forwarded_cloud_alerts_carry_their_device_and_sensor_for_one_query_per_100_devices(azure_sim_factory):
    az = azure_sim_factory("az_place", devices=300, alerts=150, quota=1000)
    by_id = {d["id"].lower(): d for d in az.sim.devices}
    named = {a["properties"]["extendedProperties"]["DeviceResourceIds"].lower() for a in az.sim.alerts}
    before = az.sim.counters["arg"]
    alerts = [a for a in DefenderIoTAzureHook(az.conn_id).get_alerts() if isinstance(a, Alert)]
    pages = -(-len(az.sim.alerts) // 1000)
    assert az.sim.counters["arg"] - before == pages + -(-len(named) // 100)
    assert len(alerts) == 150
    for alert in alerts:
        raw = next(r for r in az.sim.alerts if stable_id(r["id"]) == alert.id)
        device = by_id[raw["properties"]["extendedProperties"]["DeviceResourceIds"].lower()]
        sensor = device["properties"]["sensor"]
        assert alert.source_device_id == stable_id(device["id"])
        assert (alert.sensor_name, alert.site_name, alert.zone_name) == (sensor["name"], sensor["site"], sensor["zone"])
    before = az.sim.counters["arg"]
    DefenderIoTAzureHook(az.conn_id).get_alerts(state="unhandled")   # the closed loop needs no placement
    assert az.sim.counters["arg"] - before == pages


def test_addresses_match_in_any_spelling():
    from defender_servicenow.azure_models import address_key

    assert address_key("FE80:0:0::1") == address_key("fe80::1") == "fe80::1"
    assert address_key(" 10.0.0.5 ") == "10.0.0.5"
    assert address_key("00-1B-1B-00-00-01") == address_key("00:1b:1b:00:00:01") == address_key("001b.1b00.0001") \
        == address_key("001B1B000001") == "00:1b:1b:00:00:01"
    assert address_key("plc-7.plant") == "plc-7.plant" and address_key(None) == ""
    s1 = {"name": "sensor-1", "site": "plant-a", "zone": "line-1"}
    devices = {"/d/plc": {"id": "/d/plc", "properties": {"sensor": s1, "nics": [
        {"ipv6Address": "2001:db8:0:0::5", "macAddress": "00:1B:1B:00:00:01"}]}},
               "/d/hmi": {"id": "/d/hmi", "properties": {"nics": [{"ipv4Address": "10.0.0.9"}]}}}
    alert = _raw_alert(["/d/hmi", "/d/plc"], "2001:DB8::5", "10.0.0.9")
    assert place_alert(alert, devices) == ("/d/plc", "/d/hmi", s1)
    alert = _raw_alert(["/d/hmi", "/d/plc"], "00-1b-1b-00-00-01", "10.0.0.9")
    assert place_alert(alert, devices) == ("/d/plc", "/d/hmi", s1)
